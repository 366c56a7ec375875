"""The command line end to end: the demo, folders and MongoDB as sources, bad input, settings, real data."""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import mongomock
import pytest
from bson import json_util
from builders import (
    FULL_KARAOKE,
    JAZZ_BRUNCH,
    MAYA,
    NOW,
    NOW_ISO,
    PROCESSED,
    WINE_TASTING,
    ZOE,
    CliRun,
    run_main,
    write_folder,
)

import return_to_table as rtt

SCRIPT = Path(rtt.__file__).resolve()
MONTANA = SCRIPT.parent / "samples" / "meetup_montana"  # shipped with the repository
MONTANA_NOW = datetime(2016, 6, 3, tzinfo=UTC)  # the as-of instant of the real Montana data
MONTANA_NOW_ISO = "2016-06-03T00:00:00Z"  # MONTANA_NOW as --now takes it

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
PHONE = re.compile(r"\+1[\d\s().-]{9,}\d")


def assert_messages_keep_the_contract(run: CliRun, now: datetime, zone: str = "America/New_York") -> None:
    """Every drafted message passes ``validate_sms`` against the facts of its own match (the demo's carry
    its sample sender and opt-out text)."""
    matches = {m["user_id"]: m for m in run.matches}
    messages = run.messages
    assert messages
    demo = run.report()["source"] == "demo"
    compliance = {"sender": rtt.DEMO_SENDER, "opt_out_text": rtt.DEMO_OPT_OUT_TEXT} if demo else {}
    for message in messages:
        facts = rtt.message_facts(matches[message["user_id"]], ZoneInfo(zone), now, **compliance)
        assert rtt.validate_sms(message["message_text"], facts) == [], message["message_text"]
        size = rtt.sms_size(message["message_text"])
        assert (message["sms_encoding"], message["sms_segments"], message["character_count"]) == (
            size.encoding, size.segments, size.units)


def assert_one_line_error(run: CliRun, *fragments: str) -> None:
    assert run.code == 2
    assert run.err.startswith("error: ")
    assert run.err.count("\n") == 1, run.err
    assert "Traceback" not in run.err + run.out
    for fragment in fragments:
        assert fragment in run.err


# --- the demo, end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> CliRun:
    return run_main(["--demo", "--now", NOW_ISO], tmp_path_factory.mktemp("demo"))


def test_demo_exits_0_and_writes_every_output(demo):
    assert demo.code == 0, demo.err
    for relative in ("data/raw/users.json", "data/raw/events.json",
                     *(f"data/processed/{name}.json" for name in PROCESSED),
                     *(f"data/firebase/Leo/{name}.json" for name in ("users", "events", "matches", "messages"))):
        assert (demo.root / relative).is_file(), relative
    assert demo.report_path(".md").is_file()
    assert list((demo.root / "logs").glob("*.log"))


def test_raw_data_is_readable_by_the_owner_only(demo):
    for name in ("users.json", "events.json"):
        assert stat.S_IMODE((demo.root / "data" / "raw" / name).stat().st_mode) == 0o600


def test_raw_data_keeps_every_document_read(demo):
    users, events = rtt.build_demo_world(NOW)
    raw_users = json_util.loads((demo.root / "data/raw/users.json").read_text(encoding="utf-8"))
    raw_events = json_util.loads((demo.root / "data/raw/events.json").read_text(encoding="utf-8"))
    assert (len(raw_users), len(raw_events)) == (len(users), len(events))


def test_dormant_users_file_lists_every_eligible_member_in_rank_order(demo):
    dormant = demo.load("data/processed/dormant_users.json")
    report = demo.report()
    assert len(dormant) == report["summary"]["total_users_with_complete_profiles"] > report["limit"]
    assert [rtt.dormant_rank_key(u) for u in dormant] == sorted(rtt.dormant_rank_key(u) for u in dormant)
    for user in dormant:
        assert user["engagement_status"] == "dormant" and 31 <= user["days_inactive"] <= 90
        assert user["personalization_ready"] is True and user["eventCount"] >= 1
        assert isinstance(user["_id"], str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",
                                                            user["last_event_date"])


def test_future_events_file_lists_open_events_best_attended_first(demo):
    events = demo.load("data/processed/future_events.json")
    assert events
    percentages = [e["participationPercentage"] for e in events]
    assert percentages == sorted(percentages, reverse=True)
    for event in events:
        assert event["type"] == "public" and event["active"] is True
        assert event.get("eventStatus", "approved") == "approved"
        assert event["startDate"] > rtt.iso_utc(NOW)
        assert {"participantCount", "participationPercentage", "remaining_spots", "summary"} <= set(event)


def test_demo_uses_the_rules_matcher_and_the_template_writer(demo):
    matches, messages = demo.matches, demo.messages
    assert matches and len(messages) == len(matches)
    assert {m["matcher"] for m in matches} == {"rules"}
    assert {m["generator"] for m in messages} == {"template"}
    assert {m["status"] for m in messages} == {"pending"}
    assert {m["match_purpose"] for m in matches} == {"reactivate_dormant_user"}


def test_every_demo_message_passes_the_sms_contract(demo):
    assert_messages_keep_the_contract(demo, NOW)


@pytest.mark.parametrize("as_of", ["2024-02-29T23:59:59Z", "2026-03-08T06:30:00Z", "2030-12-31T23:00:00-05:00"])
def test_demo_is_valid_whatever_the_date_for_every_eligible_member(tmp_path, as_of):
    run = run_main(["--demo", "--dry-run", "--limit", "1000", "--now", as_of], tmp_path)
    assert run.code == 0, run.err
    report = run.report()
    assert report["errors"] == []
    # With the demo's sample sender and opt-out text, a UCS-2 name (two segments: 134 characters) may leave
    # no room for a long event's name and time: that member is skipped, never sent a message over the limit.
    crowded = report["skipped"]
    assert all(s["code"] == "no_sms_within_contract" and rtt.sms_size(s["user_name"]).encoding == "UCS-2"
               for s in crowded), crowded
    not_textable = {"opted_out": 2, "no_valid_phone": 1}  # the demo's planted members who may not be texted
    assert report["skip_reasons"] == not_textable | ({"no_sms_within_contract": len(crowded)} if crowded else {})
    assert report["summary"]["total_messages_generated"] == (
        report["summary"]["total_users_with_complete_profiles"] - 3 - len(crowded))
    assert_messages_keep_the_contract(run, rtt.to_utc(as_of))


def test_demo_never_matches_an_event_without_spots_left(demo):
    assert all(m["event"]["remaining_spots"] != 0 for m in demo.matches)


def test_firebase_mirror_holds_the_dashboard_lists_as_arrays(demo):
    mirror = demo.root / "data" / "firebase" / "Leo"
    payloads = {name: json.loads((mirror / f"{name}.json").read_text(encoding="utf-8"))
                for name in ("users", "events", "matches", "messages")}
    for name, payload in payloads.items():
        assert set(payload) == {name, "count", "updatedAt"}
        assert isinstance(payload[name], list) and payload["count"] == len(payload[name]) > 0
    for user in payloads["users"]["users"]:
        assert user["id"] == user["_id"] and user["event_count"] == user["eventCount"]
        assert "reactivation_score" in user and user["summary"]
    matched = {m["event_id"] for m in demo.matches}
    assert {e["id"] for e in payloads["events"]["events"]} == matched
    for event in payloads["events"]["events"]:
        assert event["id"] == event["_id"] and event.get("capacity") == event.get("maxParticipants")
        assert {"participantCount", "participationPercentage", "summary"} <= set(event)


def test_report_has_statistics_summary_and_recommendations(demo):
    report = demo.report()
    assert re.fullmatch(r"return-to-table-\d{8}-\d{6}", report["campaign_id"])
    assert demo.report_path().name == f"return_to_table_report_{report['campaign_id']}.json"
    assert demo.report_path(".md").name == f"return_to_table_report_{report['campaign_id']}.md"
    summary = report["summary"]
    messages = demo.messages
    assert summary["total_matches_created"] == len(demo.matches)
    assert summary["total_messages_generated"] == len(messages)
    assert summary["total_sms_segments"] == sum(m["sms_segments"] for m in messages)
    assert summary["total_future_events"] == len(demo.load("data/processed/future_events.json"))
    assert report["statistics"]["users_processed"] == 10
    assert report["recommendations"] and report["errors"] == []
    assert "## Members skipped" in demo.report_path(".md").read_text(encoding="utf-8")


def test_console_and_info_log_lines_carry_no_email_or_phone(tmp_path):
    run = run_main(["--demo", "--now", NOW_ISO], tmp_path)
    assert run.code == 0
    assert "Step 8" in run.out
    [log] = (tmp_path / "logs").glob("*.log")
    info_lines = [line for line in log.read_text(encoding="utf-8").splitlines() if " - INFO - " in line]
    assert info_lines
    for text in (run.out, run.err, *info_lines):
        assert not EMAIL.search(text), EMAIL.search(text)
        assert not PHONE.search(text), PHONE.search(text)


def test_demo_dry_run_writes_no_firebase_mirror(tmp_path):
    run = run_main(["--demo", "--dry-run", "--now", NOW_ISO], tmp_path)
    assert run.code == 0
    assert not (tmp_path / "data" / "firebase").exists()
    assert (tmp_path / "data" / "dry-run" / "processed" / "messages.json").is_file()
    assert not (tmp_path / "data" / "processed").exists()
    assert run.report()["dry_run"] is True


def test_demo_never_touches_configured_remote_services(tmp_path):
    env = {"MONGO_URI": "mongodb://127.0.0.1:1/x", "MONGO_DB_NAME": "testdb",
           "FIREBASE_DATABASE_URL": "http://127.0.0.1:1", "ANTHROPIC_API_KEY": "sk-ant-test",
           "ANTHROPIC_BASE_URL": "http://127.0.0.1:1"}
    run = run_main(["--demo", "--now", NOW_ISO], tmp_path, env)
    assert run.code == 0, run.err
    report = run.report()
    assert (report["source"], report["llm"]) == ("demo", "off")
    assert (tmp_path / "data" / "firebase" / "Leo" / "messages.json").is_file()


def test_demo_is_deterministic_for_the_same_now(tmp_path, demo):
    again = run_main(["--demo", "--now", NOW_ISO], tmp_path)
    assert again.matches == demo.matches
    assert again.messages == demo.messages


def test_demo_runs_as_a_script(tmp_path):
    # A subprocess on purpose, not the in-process harness: this checks the file runs as a script.
    result = subprocess.run([sys.executable, str(SCRIPT), "--demo", "--now", NOW_ISO, "--out", str(tmp_path)],
                            check=False, capture_output=True, text=True, env=dict(os.environ), cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Step 8" in result.stdout
    [report] = (tmp_path / "reports").glob("*.json")
    assert json.loads(report.read_text(encoding="utf-8"))["summary"]["total_messages_generated"] > 0
    [log] = (tmp_path / "logs").glob("*.log")  # flushed before the process ends at once (exit_now)
    assert "Step 8 (completed)" in log.read_text(encoding="utf-8").splitlines()[-1]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--source", str(tmp_path / "missing"), "--out", str(tmp_path)],
                         check=False, capture_output=True, text=True, env=dict(os.environ), cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


# --- usage and bad input -------------------------------------------------------------------------------------


def test_no_source_and_nothing_configured_exits_2_and_points_at_demo(run_cli):
    run = run_cli()
    assert_one_line_error(run, "MONGO_URI", "--demo")
    assert not (run.root / "data").exists()


def test_mongo_source_without_configuration_exits_2(run_cli):
    assert_one_line_error(run_cli("--source", "mongo"), "MONGO_URI")


def test_missing_source_folder_exits_2(run_cli, tmp_path):
    assert_one_line_error(run_cli("--source", str(tmp_path / "nowhere"), "--now", NOW_ISO), "nowhere")


def test_folder_without_events_file_exits_2(run_cli, world_folder):
    (world_folder / "events.json").unlink()
    assert_one_line_error(run_cli("--source", str(world_folder), "--now", NOW_ISO), "events.json")


@pytest.mark.parametrize("text", ['[{"_id": "a1", ', "{not json}\n"])
def test_invalid_json_exits_2_naming_the_file(run_cli, world_folder, text):
    (world_folder / "events.json").write_text(text, encoding="utf-8")
    assert_one_line_error(run_cli("--source", str(world_folder), "--now", NOW_ISO), "events.json", "invalid JSON")


def test_an_invalid_objectid_is_no_id_and_skips_that_event_counted(run_cli, world_folder):
    (world_folder / "events.json").write_text('[{"_id": {"$oid": "zz"}}]', encoding="utf-8")
    run = run_cli("--source", str(world_folder), "--now", NOW_ISO, "--dry-run")
    # no event left: nobody was ever at a table, so nobody is dormant
    assert run.code == rtt.ExitCode.ATTENTION, run.err
    assert run.err == f"warning: no message drafted: {rtt.IDLE_LINES[rtt.IdleReason.NOBODY_DORMANT]}\n"
    assert run.report()["data_issues"]["events_without_usable_id"] == 1


def test_a_bad_extended_json_date_counts_as_a_missing_date_not_a_fatal_error(run_cli, world_folder):
    events = json.loads((world_folder / "events.json").read_text(encoding="utf-8"))
    events[0]["startDate"] = {"$date": "TBD"}
    (world_folder / "events.json").write_text(json.dumps(events), encoding="utf-8")
    run = run_cli("--source", str(world_folder), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    assert run.report()["data_issues"]["events_without_valid_start_date"] >= 1


def test_a_document_without_id_is_skipped_and_counted_not_the_run(run_cli, tmp_path, world):
    users, events = world
    del users[2]["_id"]
    folder = write_folder(tmp_path / "export", users, events)
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    assert run.report()["data_issues"]["users_without_usable_id"] == 1
    assert run.ranked == [str(ZOE), str(MAYA)]


@pytest.mark.parametrize("value", ["yesterday", "2026-02-30T00:00:00Z", "1/15/2026"])
def test_bad_now_exits_2(run_cli, value):
    assert_one_line_error(run_cli("--demo", "--now", value), "--now")


def test_empty_now_is_bad_input_not_the_current_time(run_cli):
    assert_one_line_error(run_cli("--demo", "--now", ""), "--now")


def test_unknown_campaign_timezone_exits_2(run_cli):
    assert_one_line_error(run_cli("--demo", env={"CAMPAIGN_TIMEZONE": "Mars/Olympus_Mons"}), "CAMPAIGN_TIMEZONE")


def test_mongo_host_without_credentials_exits_2(run_cli):
    assert_one_line_error(run_cli(env={"MONGO_HOST": "cluster0.example.net"}), "MONGO_USERNAME")


# --- folders as sources ---------------------------------------------------------------------------------------


def folder_run(tmp_path: Path, world: tuple[list[dict[str, Any]], list[dict[str, Any]]], form: str,
               *extra: str) -> CliRun:
    folder = write_folder(tmp_path / f"export-{form}", *world, form=form)
    return run_main(["--source", str(folder), "--now", NOW_ISO, "--dry-run", *extra], tmp_path / f"out-{form}")


def test_small_world_picks_the_dormant_members_and_their_best_events(tmp_path, world):
    run = folder_run(tmp_path, world, "relaxed")
    assert run.code == 0, run.err
    assert run.ranked == [str(ZOE), str(MAYA)]
    picks = {m["user_id"]: m["event_id"] for m in run.matches}
    assert picks == {str(ZOE): str(WINE_TASTING), str(MAYA): str(JAZZ_BRUNCH)}
    future = {e["_id"] for e in run.load("data/processed/future_events.json")}
    assert str(FULL_KARAOKE) in future and str(FULL_KARAOKE) not in picks.values()
    assert run.report()["engagement_counts"] == {"active": 1, "churned": 1, "dormant": 3, "new": 1}
    assert_messages_keep_the_contract(run, NOW)


@pytest.mark.parametrize("form", ["canonical", "lines"])
def test_canonical_extended_json_and_json_lines_load_like_a_json_array(tmp_path, world, form):
    baseline = folder_run(tmp_path, world, "relaxed")
    other = folder_run(tmp_path, world, form)
    assert other.code == 0, other.err
    if form == "canonical":
        assert '{"$date": {"$numberLong": ' in (tmp_path / "export-canonical" / "events.json").read_text()
    for name in PROCESSED:
        assert other.load(f"data/processed/{name}.json") == baseline.load(f"data/processed/{name}.json")


def test_bad_single_records_are_counted_in_the_report_not_fatal(tmp_path, world):
    users, events = world
    events.append({"_id": "6600000000000000000000ee", "name": "Draft", "startDate": "TBD", "type": "public",
                   "active": True, "participants": [None, 42, {"name": "x"}, str(MAYA)]})
    events.append({"_id": "6600000000000000000000ef", "name": "Typo", "startDate": "2026-13-45T19:00:00Z",
                   "participants": [str(ZOE)]})
    run = folder_run(tmp_path, (users, events), "relaxed")
    assert run.code == 0, run.err
    assert run.report()["data_issues"] == {"events_without_valid_start_date": 2, "odd_participants": 3}
    dormant = {u["_id"]: u for u in run.load("data/processed/dormant_users.json")}
    assert dormant[str(MAYA)]["eventCount"] == 4 and dormant[str(ZOE)]["eventCount"] == 2


def test_member_below_min_confidence_is_skipped_and_named_in_the_report(tmp_path, world):
    run = folder_run(tmp_path, world, "relaxed", "--min-confidence", "100")
    assert run.code == rtt.ExitCode.ATTENTION, run.err  # a day without a message: one line says why
    assert "below_min_confidence for 2 of 2 textable members" in run.err and run.err.count("\n") == 1
    skipped = {s["user_id"]: s for s in run.report()["skipped"]}
    assert set(skipped) == {str(ZOE), str(MAYA)}
    assert "min-confidence" in skipped[str(MAYA)]["reason"]
    assert run.matches == []
    markdown = run.report_path(".md").read_text(encoding="utf-8")
    assert "Maya Rivera" in markdown and "Zoë Okafor" in markdown


def test_limit_counts_messages_so_the_walk_goes_past_members_who_get_none(tmp_path, world):
    run = folder_run(tmp_path, world, "relaxed", "--limit", "1", "--min-confidence", "100")
    report = run.report()
    assert report["summary"]["total_messages_generated"] == 0
    assert report["statistics"]["users_processed"] == len(run.ranked)  # nobody reached 100%: every member tried
    assert {s["user_id"] for s in report["skipped"]} == set(run.ranked)
    assert report["skip_reasons"] == {"below_min_confidence": len(run.ranked)}


def test_campaign_timezone_sets_the_message_times(tmp_path, world):
    folder = write_folder(tmp_path / "export", *world)
    env = {"CAMPAIGN_TIMEZONE": "America/Los_Angeles"}
    run = run_main(["--source", str(folder), "--now", NOW_ISO, "--dry-run"], tmp_path / "out", env)
    assert run.code == 0, run.err
    texts = {m["user_id"]: m["message_text"] for m in run.messages}
    assert "Sun 8am" in texts[str(MAYA)]  # Jazz Brunch starts 16:00 UTC
    assert_messages_keep_the_contract(run, NOW, zone="America/Los_Angeles")


# --- MongoDB through pymongo's API (mongomock) ----------------------------------------------------------------

MONGO_ENV = {"MONGO_URI": "mongodb://127.0.0.1:1/x", "MONGO_DB_NAME": "testdb"}


@pytest.fixture
def mongo_client(world) -> mongomock.MongoClient:
    """The small world in the mongomock database ``MONGO_ENV`` names."""
    users, events = world
    client = mongomock.MongoClient()
    client["testdb"]["user"].insert_many(copy.deepcopy(users))
    client["testdb"]["event"].insert_many(copy.deepcopy(events))
    return client


def test_mongo_source_gives_the_same_results_as_the_folder_source(tmp_path, world, mongo_client):
    mongo = run_main(["--source", "mongo", "--now", NOW_ISO, "--dry-run"], tmp_path / "mongo", MONGO_ENV,
                     mongo_client=mongo_client)
    folder = folder_run(tmp_path, world, "relaxed")
    assert mongo.code == 0, mongo.err
    assert mongo.report()["source"] == "mongo"
    for name in PROCESSED:
        assert mongo.load(f"data/processed/{name}.json") == folder.load(f"data/processed/{name}.json"), name
    assert mongo.ranked == [str(ZOE), str(MAYA)]


def test_configured_mongo_is_the_default_source(tmp_path, mongo_client):
    run = run_main(["--now", NOW_ISO, "--dry-run"], tmp_path, MONGO_ENV, mongo_client=mongo_client)
    assert run.code == 0, run.err
    assert run.report()["summary"]["total_matches_created"] == 2


# --- settings and .env -----------------------------------------------------------------------------------------


def test_dotenv_values_are_used_but_never_override_the_environment(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("MONGO_DB_NAME=from_file\nCAMPAIGN_TIMEZONE=Europe/Paris\n", encoding="utf-8")
    monkeypatch.setenv("MONGO_DB_NAME", "from_environment")
    env = rtt.read_environment(dotenv)
    assert env["MONGO_DB_NAME"] == "from_environment"
    assert env["CAMPAIGN_TIMEZONE"] == "Europe/Paris"


def test_missing_dotenv_file_is_not_an_error(tmp_path):
    assert "MONGO_URI" not in rtt.read_environment(tmp_path / "absent.env")


def test_cli_reads_dotenv_under_the_real_environment(run_cli, tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("CAMPAIGN_TIMEZONE=Mars/Olympus_Mons\n", encoding="utf-8")
    monkeypatch.setattr(rtt, "DOTENV_PATH", dotenv)
    argv = ["--demo", "--dry-run", "--now", NOW_ISO]
    run = run_cli(*argv, real_environment=True)
    assert run.code == 2
    assert "CAMPAIGN_TIMEZONE" in run.err
    monkeypatch.setenv("CAMPAIGN_TIMEZONE", "America/Chicago")
    assert run_cli(*argv, real_environment=True).code == 0


def test_mongo_credentials_are_url_quoted():
    settings = rtt.Settings.from_env({"MONGO_USERNAME": "leo", "MONGO_PASSWORD": "p@ss:w/rd",
                                      "MONGO_HOST": "cluster0.example.net", "MONGO_DB_NAME": "app"})
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(settings.mongo_uri)
    assert (parts.scheme, parts.hostname, parts.path) == ("mongodb+srv", "cluster0.example.net", "/")
    assert (parts.username, parts.password) == ("leo", "p%40ss%3Aw%2Frd")
    assert unquote(parts.password) == "p@ss:w/rd"


def test_nothing_configured_means_no_host_secret_or_database():
    settings = rtt.Settings.from_env({})
    assert (settings.mongo_uri, settings.mongo_db_name, settings.firebase_url, settings.anthropic_api_key) == (
        None, None, None, None)
    assert (settings.firebase_base_path, settings.campaign_timezone) == ("Leo", "America/New_York")


# --- real data -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def montana(tmp_path_factory) -> CliRun:
    if not (MONTANA / "users.json").is_file():
        pytest.skip(f"real data not found at {MONTANA}")
    return run_main(["--source", str(MONTANA), "--now", MONTANA_NOW_ISO, "--dry-run"], tmp_path_factory.mktemp("mt"))


def test_real_data_runs_cleanly(montana):
    assert montana.code == 0, montana.err
    summary = montana.report()["summary"]
    assert summary["total_dormant_users_found"] > 0
    assert summary["total_messages_generated"] > 0


def test_real_data_has_300_upcoming_event_records_read_once_per_id(montana):
    now = MONTANA_NOW
    records = json_util.loads((MONTANA / "events.json").read_text(encoding="utf-8"))
    upcoming = [e for e in records if (rtt.to_utc(e.get("startDate")) or now) > now]
    assert len(upcoming) == 300  # as the data's README says; a few records repeat an _id
    distinct = {str(e["_id"]) for e in upcoming}
    assert montana.report()["summary"]["total_future_events"] == len(distinct)
    assert {e["_id"] for e in montana.load("data/processed/future_events.json")} == distinct


def test_every_real_data_message_passes_the_sms_contract(montana):
    assert_messages_keep_the_contract(montana, MONTANA_NOW)


def test_every_matched_real_member_gets_a_message(tmp_path):
    if not (MONTANA / "users.json").is_file():
        pytest.skip(f"real data not found at {MONTANA}")
    run = run_main(["--source", str(MONTANA), "--now", MONTANA_NOW_ISO, "--dry-run", "--limit", "1000"], tmp_path)
    assert run.code == 0, run.err
    report = run.report()
    assert report["errors"] == []
    assert report["summary"]["total_messages_generated"] == report["summary"]["total_matches_created"] > 0
    assert_messages_keep_the_contract(run, MONTANA_NOW)


def test_a_usage_error_is_one_line_and_exit_2(run_cli):
    assert_one_line_error(run_cli("--demo", "--limit", "0"), "--limit")


def test_help_exits_0(run_cli):
    assert run_cli("--help").code == 0


def test_unreachable_mongodb_exits_1_with_one_line_and_no_host(run_cli):
    env = {"MONGO_URI": "mongodb://127.0.0.1:9/campaign?serverSelectionTimeoutMS=300", "MONGO_DB_NAME": "campaign"}
    run = run_cli("--source", "mongo", "--now", NOW_ISO, "--dry-run", env=env)
    assert run.code == 1
    assert run.err.startswith("error: MongoDB: ") and run.err.count("\n") == 1
    assert "127.0.0.1" not in run.err and "Traceback" not in run.err


def test_a_folder_named_demo_is_read_as_a_folder_not_the_demo(run_cli, tmp_path, world):
    folder = write_folder(tmp_path / "demo", *world)
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    assert run.report()["source"].startswith("folder ")
    assert len(run.load("data/raw/users.json")) == len(world[0])


def test_source_demo_without_such_a_folder_is_bad_input(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli("--source", "demo", "--now", NOW_ISO), "demo")


def test_a_bad_value_in_a_canonical_export_never_lets_a_full_event_through(run_cli, tmp_path, world):
    users, events = world
    events.append({"_id": "bad-date", "name": "Draft", "startDate": "TBD", "type": "public", "active": True})
    folder = write_folder(tmp_path / "canonical", users, events, form="canonical")
    text = (folder / "events.json").read_text(encoding="utf-8").replace('"TBD"', '{"$date": "TBD"}')
    (folder / "events.json").write_text(text, encoding="utf-8")
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    assert str(FULL_KARAOKE) not in {m["event_id"] for m in run.matches}
    assert next(e for e in run.load("data/processed/future_events.json")
                if e["_id"] == str(FULL_KARAOKE))["remaining_spots"] == 0
    assert run.report()["data_issues"]["unreadable_extended_json_values"] == 1


def test_out_pointing_at_a_file_is_bad_input(run_cli, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x", encoding="utf-8")
    assert_one_line_error(run_cli("--demo", root=target), "--out")


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"])
def test_now_outside_a_sane_range_is_bad_input(run_cli, moment):
    assert_one_line_error(run_cli("--demo", "--now", moment), "--now")


def test_a_member_whose_best_event_cannot_be_phrased_gets_the_next_event(run_cli, tmp_path, world):
    users, events = world
    jazz = next(e for e in events if e["_id"] == JAZZ_BRUNCH)
    jazz["name"] = "Visit jazzbrunch.com for the Jazz Brunch"  # a web address in the name: never in an SMS
    folder = write_folder(tmp_path / "export", users, events)
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    matches = run.matches
    messages = run.messages
    assert str(JAZZ_BRUNCH) not in {m["event_id"] for m in matches}
    assert {m["user_id"] for m in matches} == {m["user_id"] for m in messages}
    assert_messages_keep_the_contract(run, NOW)


def test_two_runs_in_the_same_second_get_two_campaign_ids(run_cli, monkeypatch):
    class FrozenClock(rtt.datetime):
        @classmethod
        def now(cls, tz=None):
            return rtt.datetime(2026, 1, 15, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(rtt, "datetime", FrozenClock)
    first = run_cli("--demo", "--now", NOW_ISO)
    second = run_cli("--demo", "--now", NOW_ISO)
    ids = sorted(p.name for p in (second.root / "reports").glob("*.json"))
    assert first.code == second.code == 0
    assert ids == ["return_to_table_report_return-to-table-20260115-120000.json",
                   "return_to_table_report_return-to-table-20260115-120001.json"]


def test_logs_and_reports_are_readable_by_the_owner_only(run_cli):
    run = run_cli("--demo", "--now", NOW_ISO)
    files = [*(run.root / "logs").glob("*.log"), *(run.root / "reports").glob("*")]
    assert len(files) == 3
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
