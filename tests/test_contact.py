"""Who may be texted: valid numbers (phonenumbers), opt-outs and consent, the holdout, and the walk that
gives every eligible member ``selected`` or a ``skip_reason`` in ``dormant_users.json``.

All people here are fictional: ``@example.com`` emails and phones in the 555-01xx range set aside for fiction.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import bson
import bson.errors
import mongo_expressions
import mongomock
import pytest
from builders import NOW, NOW_ISO, CliRun

import return_to_table as rtt

FRACTION = 0.25


def iso(moment: Any) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ids_by_group(n: int, *, held_out: bool) -> list[str]:
    """``n`` member ids that fall in (or out of) a holdout of ``FRACTION``, by the tool's own hash."""
    found = (f"m{i:04d}" for i in range(10_000))
    return [i for i in found if rtt.in_holdout(rtt.CAMPAIGN_NAME, i, FRACTION) == held_out][:n]


FICTION_AREAS = ("212", "646", "917", "718", "347", "332", "929")  # NYC area codes; 555-0100..0199 in each
PHONES: dict[str, str] = {}  # each member id its own number (one number gets one text: ``NumberLedger``)


def phone_of(uid: str) -> str:
    """The member's own fictional number, the same for the same id."""
    if uid not in PHONES:
        n = len(PHONES)
        PHONES[uid] = f"+1{FICTION_AREAS[n // 100 % len(FICTION_AREAS)]}55501{n % 100:02d}"
    return PHONES[uid]


def member(uid: str, days_inactive: int, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dormant member with a full profile, their own phone number, and the one past event that makes them
    dormant."""
    user = {"_id": uid, "firstName": "Robin", "lastName": "Testwell", "email": f"{uid}@example.com",
            "phone": phone_of(uid), "gender": "female", "interests": ["wine"], "occupation": "Teacher",
            "homeNeighborhood": "chelsea", **fields}
    past = {"_id": f"past-{uid}", "name": "Neighbourhood Supper", "categories": ["DINNER"], "participants": [uid],
            "ownerId": uid, "maxParticipants": 8, "startDate": iso(NOW - timedelta(days=days_inactive)),
            "type": "public", "active": True, "eventStatus": "approved"}
    return user, past


def future(eid: str, name: str, categories: list[str], starts_in: timedelta) -> dict[str, Any]:
    return {"_id": eid, "name": name, "categories": categories, "features": [], "neighborhood": "chelsea",
            "participants": [f"guest-{eid}-{k}" for k in range(3)], "ownerId": "host-1", "maxParticipants": 10,
            "startDate": iso(NOW + starts_in), "type": "public", "active": True, "eventStatus": "approved"}


EVENTS = [
    future("ev-wine", "Natural Wine Social", ["WINE"], timedelta(days=5, hours=11)),
    future("ev-soon", "Sunday Brunch Club", ["BRUNCH"], timedelta(hours=1)),  # no time left to text
]


def write(folder: Path, members: list[tuple[dict[str, Any], dict[str, Any]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.json").write_text(json.dumps([u for u, _ in members]), encoding="utf-8")
    (folder / "events.json").write_text(json.dumps([e for _, e in members] + EVENTS), encoding="utf-8")
    return folder


def decisions(run: CliRun) -> dict[str, str]:
    return {u["_id"]: "selected" if u["selected"] else u["skip_reason"]
            for u in run.load("data/processed/dormant_users.json")}


# --------------------------------------------------------------------------------------------
# Phone numbers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("phone", "e164"), [
    ("+12125550123", "+12125550123"),            # E.164
    ("2125550123", "+12125550123"),              # national digits
    ("(212) 555-0123", "+12125550123"),          # national, punctuated
    ("212.555.0123", "+12125550123"),
    (" +1 212 555 0123 ", "+12125550123"),       # spaces
    ("1-212-555-0123", "+12125550123"),
    (2125550123, "+12125550123"),                # a number, as some exports store it
    ("+44 7400 123456", "+447400123456"),        # a mobile elsewhere
])
def test_a_valid_number_that_takes_texts_is_kept_in_e164(phone: Any, e164: str) -> None:
    assert rtt.textable_phone(phone, "US") == (e164, rtt.textable_phone(e164, "US").timezone, None)


@pytest.mark.parametrize(("phone", "problem"), [
    (None, "missing"), ("", "missing"),
    ("555-0123", "invalid"), ("12345", "invalid"), ("call me", "invalid"), ("+1 212 555 01234567", "invalid"),
    ("212-555-0123 ext. 7", "extension"), ("+1 212 555 0123 x12", "extension"),
    ("+1 800 555 0100", "type"), ("1-888-555-0100", "type"),   # toll-free
    ("+1 900 555 0100", "type"),                               # premium rate
    ("+44 20 7946 0958", "type"),                              # a fixed line, where the library can tell
    (True, "not_text"), (2125550123.0, "not_text"), ({"number": "2125550123"}, "not_text"),
    (["2125550123"], "not_text"), ("2" * 60, "not_text"),
])
def test_a_number_that_cannot_take_a_text_is_refused_with_its_reason(phone: Any, problem: str) -> None:
    assert rtt.textable_phone(phone, "US") == (None, None, problem)


def test_the_default_region_reads_national_numbers() -> None:
    assert rtt.textable_phone("020 7946 0958", "US").problem == "invalid"
    assert rtt.textable_phone("07400 123456", "GB").e164 == "+447400123456"


def test_the_run_reads_national_numbers_in_sms_default_region(run_cli, tmp_path: Path) -> None:
    user, past = member("m-uk", 60, phone="07400 123456")
    folder = write(tmp_path / "w", [(user, past)])
    assert run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run").messages == []  # not a US number
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run", env={"SMS_DEFAULT_REGION": "GB"})
    assert [m["user_phone"] for m in run.messages] == ["+447400123456"]


@pytest.mark.parametrize(("phone", "zone"), [
    ("+12125550123", "America/New_York"), ("+14155550123", "America/Los_Angeles"),
    ("+14065550123", "America/Denver"), ("+13125550123", "America/Chicago"),
])
def test_a_number_that_maps_to_one_zone_gives_it(phone: str, zone: str) -> None:
    assert rtt.textable_phone(phone, "US").timezone == zone


def test_a_number_without_one_zone_gives_the_campaign_zone(run_cli, tmp_path: Path) -> None:
    user, past = member("m-many", 60, phone="+447400123456")  # UK mobiles: London, Jersey, Guernsey, Man
    assert len(rtt.phonenumbers.timezone.time_zones_for_number(rtt.phonenumbers.parse(user["phone"]))) > 1
    assert rtt.textable_phone(user["phone"], "US").timezone is None
    run = run_cli("--source", str(write(tmp_path / "w", [(user, past)])), "--now", NOW_ISO, "--dry-run",
                  env={"CAMPAIGN_TIMEZONE": "America/Chicago"})
    [message] = run.messages
    assert message["recipient_timezone"] == "America/Chicago"


def test_a_member_without_a_zone_of_their_own_is_texted_in_the_campaign_zone(run_cli, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt, "number_zone", lambda _number: None)
    user, past = member("m-nozone", 60, phone="+14155550123")
    run = run_cli("--source", str(write(tmp_path / "w", [(user, past)])), "--now", NOW_ISO, "--dry-run",
                  env={"CAMPAIGN_TIMEZONE": "America/Chicago"})
    [message] = run.messages
    assert message["recipient_timezone"] == "America/Chicago"


def test_a_415_member_is_texted_in_pacific_hours(run_cli, tmp_path: Path) -> None:
    user, past = member("m-sf", 60, phone="(415) 555-0123")
    run = run_cli("--source", str(write(tmp_path / "w", [(user, past)])), "--now", NOW_ISO, "--dry-run")
    [message] = run.messages
    assert message["recipient_timezone"] == "America/Los_Angeles"
    assert message["send_after"] == "2026-01-15T16:00:00.000Z"  # 8am in San Francisco; --now is 4am there


def test_messages_carry_e164_and_the_dashboard_user_keeps_the_phone_as_stored(run_cli, tmp_path: Path) -> None:
    user, past = member("m-punct", 60, phone="(212) 555-0150")
    run = run_cli("--source", str(write(tmp_path / "w", [(user, past)])), "--now", NOW_ISO)
    assert run.code == 0, run.err
    [message] = run.messages
    assert message["user_phone"] == "+12125550150"
    [stored] = run.load("data/firebase/Leo/users.json")["users"]
    assert stored["phone"] == "(212) 555-0150" and stored["phone_e164"] == "+12125550150"


# --------------------------------------------------------------------------------------------
# Opt-outs and consent
# --------------------------------------------------------------------------------------------


def nested(path: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``"a.b"``."""
    doc: Any = value
    for part in reversed(path.split(".")):
        doc = {part: doc}
    return doc


def opted_out(user: dict[str, Any]) -> tuple[bool, int]:
    return rtt.sms_opt_out(user, rtt.DEFAULT_OPT_OUT_FIELDS, rtt.DEFAULT_CONSENT_FIELDS)


@pytest.mark.parametrize("path", rtt.DEFAULT_OPT_OUT_FIELDS)
@pytest.mark.parametrize("value", [True, 1, "yes", "TRUE", "2025-11-02"])
def test_every_default_opt_out_field_opts_out_when_set(path: str, value: Any) -> None:
    said, _ = opted_out(nested(path, value))
    assert said is True


@pytest.mark.parametrize("path", rtt.DEFAULT_OPT_OUT_FIELDS)
@pytest.mark.parametrize("value", [False, 0, "no", "false", "", None])
def test_an_opt_out_field_that_says_no_opts_nobody_out(path: str, value: Any) -> None:
    assert opted_out(nested(path, value)) == (False, 0)


@pytest.mark.parametrize("path", rtt.DEFAULT_CONSENT_FIELDS)
@pytest.mark.parametrize("value", [False, "no", "No", 0, "false"])
def test_every_default_consent_field_refused_opts_out(path: str, value: Any) -> None:
    assert opted_out(nested(path, value)) == (True, 0)


@pytest.mark.parametrize("path", rtt.DEFAULT_CONSENT_FIELDS)
@pytest.mark.parametrize("value", [True, "yes", 1, None])
def test_a_consent_field_given_or_missing_keeps_the_member_textable(path: str, value: Any) -> None:
    assert opted_out(nested(path, value)) == (False, 0)


def test_no_field_at_all_records_no_opt_out() -> None:
    assert opted_out({"firstName": "Robin"}) == (False, 0)


def test_a_literal_dotted_key_is_read_as_the_path() -> None:
    assert opted_out({"optOut.sms": True}) == (True, 0)
    assert opted_out({"preferences.sms": False}) == (True, 0)


@pytest.mark.parametrize("value", [{"at": "2025-01-01"}, ["sms"], "maybe", 2, 0.5, float("nan")])
def test_an_odd_opt_out_value_opts_out_and_is_counted(value: Any) -> None:
    assert opted_out({"smsOptOut": value}) == (True, 1)


@pytest.mark.parametrize("value", [{"enabled": True}, ["yes"], "maybe", 7])
def test_an_odd_consent_value_opts_out_and_is_counted(value: Any) -> None:
    assert opted_out({"allowSms": value}) == (True, 1)


def test_a_scalar_where_the_path_needs_a_document_is_read_as_the_value() -> None:
    assert opted_out({"optOut": True}) == (True, 0)  # "optOut.sms" meets a bare true: out of everything
    assert opted_out({"preferences": "weekly"}) == (True, 1)


def test_the_field_lists_are_configurable(run_cli, tmp_path: Path) -> None:
    out, past = member("m-out", 60, marketing={"texts": "stop"})
    kept, past2 = member("m-kept", 50, smsOptOut=True)  # not a field of this configuration
    env = {"SMS_OPT_OUT_FIELDS": "marketing.texts", "SMS_CONSENT_FIELDS": ""}
    run = run_cli("--source", str(write(tmp_path / "w", [(out, past), (kept, past2)])), "--now", NOW_ISO,
                  "--dry-run", env=env)
    assert decisions(run) == {"m-out": "opted_out", "m-kept": "selected"}
    assert run.report()["data_issues"]["odd_sms_preference_values"] == 1  # "stop" is neither yes nor no


@pytest.mark.parametrize(("name", "value"), [("SMS_OPT_OUT_FIELDS", "a..b"), ("SMS_CONSENT_FIELDS", "x y"),
                                             ("SMS_DEFAULT_REGION", "USA"), ("QUIET_HOURS", "9pm-8am")])
def test_a_bad_sms_setting_is_a_one_line_usage_error(run_cli, name: str, value: str) -> None:
    run = run_cli("--demo", "--dry-run", env={name: value})
    assert run.code == rtt.ExitCode.USAGE
    assert run.err.count("\n") == 1 and name in run.err and "Traceback" not in run.err


def assert_refused_at_start(run: Any, name: str) -> None:
    """Exit 2 before anything runs: one line naming the variable, no traceback, nothing written."""
    assert run.code == rtt.ExitCode.USAGE, run.err
    assert run.err.startswith("error: ") and run.err.count("\n") == 1 and name in run.err, run.err
    assert "Traceback" not in run.err + run.out and not (run.root / "reports").exists()


@pytest.mark.parametrize(("env", "name"), [
    ({"SMS_SENDER": "Cuculi!!"}, "SMS_SENDER"),
    ({"SMS_SENDER": "Cuculi?? Really??"}, "SMS_SENDER"),
    ({"SMS_SENDER": "Cuculi?", "SMS_OPT_OUT_TEXT": "Reply STOP to stop?"}, "SMS_SENDER and SMS_OPT_OUT_TEXT"),
    ({"SMS_SENDER": "CUCULI"}, "SMS_SENDER"),
    ({"SMS_OPT_OUT_TEXT": "REPLY STOP TO OPT OUT"}, "SMS_OPT_OUT_TEXT"),
    ({"SMS_SENDER": "Cuculi 21"}, "SMS_SENDER"),
    ({"SMS_SENDER": "Cuculi 10.0.0.1:8080"}, "SMS_SENDER"),
    ({"SMS_SENDER": "Cuculi 1-800-EVIL-NOW"}, "SMS_SENDER"),
    ({"SMS_OPT_OUT_TEXT": "Text STOP to sms:+1555"}, "SMS_OPT_OUT_TEXT"),
    ({"SMS_OPT_OUT_TEXT": "Or mailto:stop"}, "SMS_OPT_OUT_TEXT"),
])
def test_a_sender_or_opt_out_text_that_breaks_the_sms_contract_is_refused_at_start(run_cli, env, name) -> None:
    assert_refused_at_start(run_cli("--demo", "--dry-run", env=env), name)


@pytest.mark.parametrize("env", [{"SMS_SENDER": "Cuculi NYC", "SMS_OPT_OUT_TEXT": "Reply STOP to opt out"},
                                 {"SMS_SENDER": "Cuculi?", "SMS_OPT_OUT_TEXT": "Reply STOP to opt out."}])
def test_a_sender_and_opt_out_text_within_the_contract_are_carried(run_cli, env) -> None:
    run = run_cli("--demo", "--dry-run", env=env)
    assert run.code == 0, run.err
    assert all(m["message_text"].startswith(env["SMS_SENDER"]) for m in run.messages)


@pytest.mark.parametrize("value", ["XX", "ZZ", "", "  ", "001"])
def test_a_region_phonenumbers_does_not_know_is_refused_at_start(run_cli, value: str) -> None:
    assert_refused_at_start(run_cli("--demo", "--dry-run", env={"SMS_DEFAULT_REGION": value}), "SMS_DEFAULT_REGION")


@pytest.mark.parametrize("value", ["08:00-21:00", "22:00-07:00", "21:30-08:00", "21:00-07:59", "00:00-08:00",
                                   "21:00-23:59"])
def test_quiet_hours_that_allow_texts_before_8am_or_after_9pm_are_refused_at_start(run_cli, value: str) -> None:
    run = run_cli("--demo", "--dry-run", env={"QUIET_HOURS": value})
    assert_refused_at_start(run, "QUIET_HOURS")
    assert "before 8am or after 9pm" in run.err


@pytest.mark.parametrize("value", ["21:00-08:00", "20:00-09:00", "18:30-10:15"])
def test_a_stricter_quiet_window_is_fine(run_cli, value: str) -> None:
    run = run_cli("--demo", "--dry-run", env={"QUIET_HOURS": value})
    assert run.code == 0, run.err


# --------------------------------------------------------------------------------------------
# The holdout
# --------------------------------------------------------------------------------------------


def test_the_holdout_share_is_stable_and_depends_on_campaign_and_member() -> None:
    assert rtt.holdout_share("return-to-table", "m1") == rtt.holdout_share("return-to-table", "m1")
    assert rtt.holdout_share("return-to-table", "m1") != rtt.holdout_share("return-to-table", "m2")
    assert rtt.holdout_share("return-to-table", "m1") != rtt.holdout_share("another-campaign", "m1")
    assert not rtt.in_holdout("return-to-table", "m1", 0.0)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.5])
def test_the_holdout_takes_its_fraction_of_ten_thousand_ids_within_two_points(fraction: float) -> None:
    ids = [str(rtt.ObjectId.from_datetime(NOW + timedelta(seconds=i))) + f"{i}" for i in range(10_000)]
    share = sum(rtt.in_holdout(rtt.CAMPAIGN_NAME, i, fraction) for i in ids) / len(ids)
    assert abs(share - fraction) <= 0.02


@pytest.mark.parametrize("value", ["0.6", "-0.1", "x", "nan"])
def test_a_holdout_outside_0_to_half_is_a_usage_error(run_cli, value: str) -> None:
    run = run_cli("--demo", "--dry-run", "--holdout", value)
    assert run.code == rtt.ExitCode.USAGE and "--holdout" in run.err


def holdout_world(folder: Path) -> tuple[Path, list[str], list[str]]:
    """Four treatment members and two holdout members, the holdout ranked first and third."""
    held, treated = ids_by_group(2, held_out=True), ids_by_group(4, held_out=False)
    order = [held[0], treated[0], held[1], *treated[1:]]
    members = [member(uid, 85 - 5 * rank) for rank, uid in enumerate(order)]
    return write(folder, members), held, treated


def test_holdout_members_passed_on_the_way_are_recorded_and_never_texted(run_cli, tmp_path: Path) -> None:
    folder, held, treated = holdout_world(tmp_path / "w")
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--holdout", str(FRACTION), "--limit", "2")
    assert run.code == 0, run.err
    assert [m["user_id"] for m in run.messages] == treated[:2]
    records = run.load("data/processed/holdout.json")
    assert [(h["user_id"], h["rank"], h["event_id"]) for h in records] == [(held[0], 1, "ev-wine"),
                                                                           (held[1], 3, "ev-wine")]
    assert all(h["held_out_at"] == "2026-01-15T12:00:00.000Z" and h["holdout_fraction"] == FRACTION
               for h in records)
    assert decisions(run) == {held[0]: "holdout", treated[0]: "selected", held[1]: "holdout",
                              treated[1]: "selected", treated[2]: "below_limit", treated[3]: "below_limit"}
    report = run.report()
    assert report["holdout"] == {"fraction": FRACTION, "count": 2, "ranks": [1, 3]}
    mirror = run.root / "data" / "firebase" / "Leo"
    dashboard = json.loads((mirror / "holdout.json").read_text(encoding="utf-8"))
    assert [h["user_id"] for h in dashboard["holdout"]] == held and dashboard["count"] == 2
    archive = mirror / "campaigns" / report["campaign_id"] / "holdout.json"
    assert [h["user_id"] for h in json.loads(archive.read_text(encoding="utf-8"))["holdout"]] == held
    assert not {m["user_id"] for m in run.load("data/firebase/Leo/messages.json")["messages"]} & set(held)


def test_the_same_members_are_held_out_run_after_run(run_cli, tmp_path: Path) -> None:
    folder, held, _ = holdout_world(tmp_path / "w")
    first = run_cli("--source", str(folder), "--now", NOW_ISO, "--holdout", str(FRACTION), "--dry-run",
                    root=tmp_path / "a")
    later = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    second = run_cli("--source", str(folder), "--now", later, "--holdout", str(FRACTION), "--dry-run",
                     root=tmp_path / "b")
    assert [h["user_id"] for h in first.load("data/processed/holdout.json")] == held
    assert [h["user_id"] for h in second.load("data/processed/holdout.json")] == held


def test_holdout_records_obey_the_cooldown_like_messages(run_cli, tmp_path: Path) -> None:
    folder, held, treated = holdout_world(tmp_path / "w")
    out = tmp_path / "out"
    run_cli("--source", str(folder), "--now", NOW_ISO, "--holdout", str(FRACTION), "--limit", "2", root=out)
    later = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    second = run_cli("--source", str(folder), "--now", later, "--holdout", str(FRACTION), "--limit", "2", root=out)
    assert second.code == 0, second.err
    assert second.load("data/processed/holdout.json") == []  # both held out yesterday: not recorded again
    got = decisions(second)
    assert [got[i] for i in held] == ["cooldown", "cooldown"]
    assert [got[i] for i in treated] == ["cooldown", "cooldown", "selected", "selected"]
    dashboard = json.loads((out / "data" / "firebase" / "Leo" / "holdout.json").read_text(encoding="utf-8"))
    assert dashboard["count"] == 2


def test_a_dry_run_writes_the_holdout_locally_and_nothing_remotely(run_cli, tmp_path: Path) -> None:
    folder, held, _ = holdout_world(tmp_path / "w")
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--holdout", str(FRACTION), "--dry-run")
    assert [h["user_id"] for h in run.load("data/processed/holdout.json")] == held
    assert not (run.root / "data" / "firebase" / "Leo" / "holdout.json").exists()


def test_without_a_holdout_no_holdout_list_is_written(run_cli, tmp_path: Path) -> None:
    folder, _, _ = holdout_world(tmp_path / "w")
    run = run_cli("--source", str(folder), "--now", NOW_ISO)
    assert run.load("data/processed/holdout.json") == []
    assert not (run.root / "data" / "firebase" / "Leo" / "holdout.json").exists()
    assert run.report()["holdout"] == {"fraction": 0.0, "count": 0, "ranks": []}


# --------------------------------------------------------------------------------------------
# Every reason, end to end
# --------------------------------------------------------------------------------------------


def test_every_eligible_member_gets_selected_or_a_skip_reason(run_cli, tmp_path: Path) -> None:
    [held] = ids_by_group(1, held_out=True)
    plain = ids_by_group(9, held_out=False)
    special = {
        plain[0]: {"phone": "555-0123"},                           # no_valid_phone
        plain[1]: {"phone": "+1 800 555 0100"},                    # no_valid_phone (toll-free)
        plain[2]: {"smsOptOut": True},                             # opted_out
        plain[3]: {"notificationSettings": {"sms": False}},        # opted_out
        held: {},                                                  # holdout
        plain[4]: {"interests": ["chess"]},                        # no_matching_event
        plain[5]: {"interests": ["brunch"]},                       # no_event_in_send_window
    }
    order = [plain[0], plain[1], plain[2], plain[3], held, plain[4], plain[5], plain[6], plain[7], plain[8]]
    members = [member(uid, 88 - 4 * rank, **special.get(uid, {})) for rank, uid in enumerate(order)]
    run = run_cli("--source", str(write(tmp_path / "w", members)), "--now", NOW_ISO, "--holdout", str(FRACTION),
                  "--limit", "2")
    assert run.code == 0, run.err
    assert decisions(run) == {
        plain[0]: "no_valid_phone", plain[1]: "no_valid_phone", plain[2]: "opted_out", plain[3]: "opted_out",
        held: "holdout", plain[4]: "no_matching_event", plain[5]: "no_event_in_send_window",
        plain[6]: "selected", plain[7]: "selected", plain[8]: "below_limit"}
    assert [u["_id"] for u in run.load("data/processed/dormant_users.json")] == order  # the plan's list, whole
    assert run.report()["skip_reasons"] == {"no_valid_phone": 2, "opted_out": 2, "holdout": 1,
                                            "no_matching_event": 1, "no_event_in_send_window": 1, "below_limit": 1}
    markdown = run.report_path(".md").read_text(encoding="utf-8")
    assert "| no_event_in_send_window | 1 |" in markdown
    console = run.out + run.err
    assert not re.search(r"555[-. ]?01", console) and "@example.com" not in console  # (not "555" alone: a clock reads 05:55:50)
    assert "2 no_valid_phone" in console and "2 opted_out" in console
    tomorrow = iso(NOW + timedelta(days=1))  # (the same day, --limit is already drafted: issue 20)
    second = run_cli("--source", str(write(tmp_path / "w", members)), "--now", tomorrow, "--holdout", str(FRACTION),
                     "--limit", "2", root=run.root)
    assert [decisions(second)[i] for i in (plain[6], plain[7], plain[8])] == ["cooldown", "cooldown", "selected"]


def test_only_the_members_the_walk_reaches_are_checked_and_read(run_cli, tmp_path: Path) -> None:
    members = [member("m-top", 80), member("m-next", 70, phone="555-0123"), member("m-low", 60, phone="555-0123")]
    run = run_cli("--source", str(write(tmp_path / "w", members)), "--now", NOW_ISO, "--limit", "1")
    assert run.code == 0, run.err
    assert decisions(run) == {"m-top": "selected", "m-next": "below_limit", "m-low": "below_limit"}
    top, *below = run.load("data/processed/dormant_users.json")
    assert top["phone_e164"] == phone_of("m-top") and top["event_history"]["events"] == 1
    assert all("phone_e164" not in u and "event_history" not in u for u in below)  # never reached, never checked


def test_a_member_whose_events_cannot_be_phrased_is_skipped_as_no_sms_within_contract(
        run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt, "write_template_sms", lambda _facts: None)  # no wording fits, for any event
    user, past = member("m-long", 60)
    run = run_cli("--source", str(write(tmp_path / "w", [(user, past)])), "--now", NOW_ISO, "--dry-run")
    assert run.code == rtt.ExitCode.ATTENTION, run.err  # the day drafted nothing
    assert decisions(run) == {"m-long": "no_sms_within_contract"} and run.matches == []
    assert run.report()["skip_reasons"] == {"no_sms_within_contract": 1}


# --------------------------------------------------------------------------------------------
# Consent belongs to the number; one number gets one text; doubt never sends
# --------------------------------------------------------------------------------------------

MONGO_ENV = {"MONGO_URI": "mongodb://127.0.0.1:1/x", "MONGO_DB_NAME": "testdb"}
PATHS = ("folder", "demo", "mongo")  # the three sources: files, the in-process world, MongoDB (mongomock)


def as_stored(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Extended JSON documents as a driver hands them over (``{"$numberDouble": "NaN"}`` becomes a float)."""
    return [rtt.json_util.loads(json.dumps(doc)) for doc in docs]


def run_on(kind: str, run_cli, tmp_path: Path, members: list[tuple[dict[str, Any], dict[str, Any]]],
           *args: str, monkeypatch: pytest.MonkeyPatch, root: Path | None = None) -> CliRun:
    """One run of ``members`` (and ``EVENTS``) read from a folder, as the demo world, or from MongoDB."""
    users, events = [u for u, _ in members], [e for _, e in members] + EVENTS
    if kind == "folder":
        return run_cli("--source", str(write(tmp_path / "w", members)), "--now", NOW_ISO, *args, root=root)
    if kind == "demo":
        monkeypatch.setattr(rtt, "build_demo_world", lambda now: (as_stored(users), as_stored(events)))
        return run_cli("--demo", "--now", NOW_ISO, *args, root=root)
    client = mongomock.MongoClient()
    client["testdb"]["user"].insert_many(as_stored(users))
    client["testdb"]["event"].insert_many(as_stored(events))
    return run_cli("--source", "mongo", "--now", NOW_ISO, *args, env=MONGO_ENV, mongo_client=client, root=root)


def listing(run: CliRun) -> dict[str, dict[str, Any]]:
    return {u["_id"]: u for u in run.load("data/processed/dormant_users.json")}


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("refusal", [{"smsOptOut": True}, {"allowSms": "no"}, {"smsOptOut": "\u200b"},
                                     {"smsConsent": {"$numberDouble": "NaN"}}])
def test_an_opt_out_on_any_record_stops_every_member_with_that_number(run_cli, tmp_path, monkeypatch, kind,
                                                                      refusal) -> None:
    """A's record refuses (or is in doubt); A is not even dormant (active: 10 days), so only a lookup over every
    member read finds it. B gives the same number in another spelling: never texted."""
    a, a_past = member("m-a", 10, phone="+1 646 555 0177", **refusal)
    b, b_past = member("m-b", 60, phone="(646) 555-0177")
    c, c_past = member("m-c", 50)
    run = run_on(kind, run_cli, tmp_path, [(a, a_past), (b, b_past), (c, c_past)], "--dry-run",
                 monkeypatch=monkeypatch)
    assert run.code == 0, run.err
    found = listing(run)
    assert "m-a" not in found  # active: not eligible, but their refusal counts
    assert (found["m-b"]["skip_reason"], found["m-b"]["skip_detail"]) == ("opted_out", rtt.OTHER_RECORD)
    assert [m["user_id"] for m in run.messages] == ["m-c"]
    report = run.report()
    assert report["skip_reasons"] == {"opted_out": 1} and report["skip_details"] == {rtt.OTHER_RECORD: 1}
    assert f"Of these, 1: {rtt.OTHER_RECORD}." in run.report_path(".md").read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", PATHS)
def test_one_number_in_three_spellings_gets_one_message(run_cli, tmp_path, monkeypatch, kind) -> None:
    spellings = ["+16465550178", "(646) 555-0178", "646.555.0178"]
    members = [member(f"m-{n}", 80 - 10 * n, phone=phone) for n, phone in enumerate(spellings)]
    run = run_on(kind, run_cli, tmp_path, members, "--dry-run", monkeypatch=monkeypatch)
    assert run.code == 0, run.err
    assert [(m["user_id"], m["user_phone"]) for m in run.messages] == [("m-0", "+16465550178")]
    assert decisions(run) == {"m-0": "selected", "m-1": "shared_phone", "m-2": "shared_phone"}
    assert run.report()["skip_reasons"] == {"shared_phone": 2}
    console = run.out + run.err
    assert "2 shared_phone" in console and not re.search(r"555[-. ]?01", console)  # counts, never a number


def test_a_number_stays_free_when_its_first_member_gets_nothing(run_cli, tmp_path) -> None:
    """The first member with the number has no event to be offered: the next one with it is texted."""
    first, past = member("m-chess", 80, phone="+16465550179", interests=["chess"])
    second, past2 = member("m-wine", 70, phone="646-555-0179")
    run = run_cli("--source", str(write(tmp_path / "w", [(first, past), (second, past2)])), "--now", NOW_ISO,
                  "--dry-run")
    assert decisions(run) == {"m-chess": "no_matching_event", "m-wine": "selected"}


def test_a_number_messaged_or_held_out_within_the_cooldown_is_not_texted_for_another_member(run_cli,
                                                                                          tmp_path) -> None:
    held, treated = ids_by_group(1, held_out=True)[0], ids_by_group(2, held_out=False)
    out = tmp_path / "out"
    first = [member(treated[0], 80, phone="+16465550180"), member(held, 75, phone="+16465550181")]
    run = run_cli("--source", str(write(tmp_path / "w", first)), "--now", NOW_ISO, "--holdout", str(FRACTION),
                  root=out)
    assert decisions(run) == {treated[0]: "selected", held: "holdout"}
    assert run.load("data/processed/holdout.json")[0]["user_phone"] == "+16465550181"
    later = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    newcomers = [member("m-same-a", 70, phone="(646) 555-0180"), member(treated[1], 65, phone="646 555 0181")]
    second = run_cli("--source", str(write(tmp_path / "w", first + newcomers)), "--now", later,
                     "--holdout", str(FRACTION), root=out)
    assert second.code == rtt.ExitCode.ATTENTION, second.err  # nobody left to text today, and the line says why
    assert second.err == f"warning: no message drafted: {rtt.IDLE_LINES[rtt.IdleReason.NOBODY_TEXTABLE]}\n"
    assert decisions(second) == {treated[0]: "cooldown", held: "cooldown", "m-same-a": "shared_phone",
                                 treated[1]: "shared_phone"}
    assert second.messages == []


def test_a_holdout_member_takes_the_number_within_the_run(run_cli, tmp_path) -> None:
    held, treated = ids_by_group(1, held_out=True)[0], ids_by_group(1, held_out=False)[0]
    members = [member(held, 80, phone="+16465550182"), member(treated, 70, phone="(646) 555-0182")]
    run = run_cli("--source", str(write(tmp_path / "w", members)), "--now", NOW_ISO, "--holdout", str(FRACTION),
                  "--dry-run")
    assert decisions(run) == {held: "holdout", treated: "shared_phone"}


DOUBTS = {  # a value present but unreadable, of an odd type, or empty only once cleaned: each blocks the text
    "NaN opt-out (Extended JSON)": {"smsOptOut": {"$numberDouble": "NaN"}},
    "NaN consent": {"smsConsent": float("nan")},
    "date beyond the calendar": {"smsOptOut": {"$date": {"$numberLong": "999999999999999999"}}},
    "date beyond year 9999": {"doNotText": {"$date": "10000-01-01T00:00:00Z"}},
    "odd type": {"smsConsent": {"$binary": {"base64": "AA==", "subType": "00"}}},
    "a lone zero-width character (opt-out)": {"smsOptOut": "\u200b"},
    "a lone zero-width character (consent)": {"allowSms": "\u200b"},
    "a lone bidi mark": {"unsubscribed": "\u202e"},
}
PYTHON_DOUBTS = ("NaN opt-out (Extended JSON)", "NaN consent", "odd type", "a lone zero-width character (opt-out)",
                 "a lone zero-width character (consent)", "a lone bidi mark")  # what a driver can hand over


def doubt_run(kind: str, run_cli, tmp_path: Path, monkeypatch, fields: dict[str, Any]) -> CliRun:
    if kind == "folder":  # NaN written as JSON's NaN literal, as some exports do
        members = [member("m-doubt", 70, **fields), member("m-clear", 60)]
        folder = write(tmp_path / "w", members)
        return run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run")
    return run_on(kind, run_cli, tmp_path, [member("m-doubt", 70, **fields), member("m-clear", 60)], "--dry-run",
                  monkeypatch=monkeypatch)


@pytest.mark.parametrize("doubt", DOUBTS)
def test_doubt_never_sends_from_a_folder(run_cli, tmp_path, monkeypatch, doubt) -> None:
    run = doubt_run("folder", run_cli, tmp_path, monkeypatch, DOUBTS[doubt])
    assert run.code == 0, run.err
    assert decisions(run) == {"m-doubt": "opted_out", "m-clear": "selected"}
    assert run.report()["data_issues"]["odd_sms_preference_values"] == 1


@pytest.mark.parametrize("kind", ["demo", "mongo"])
@pytest.mark.parametrize("doubt", PYTHON_DOUBTS)
def test_doubt_never_sends_from_the_demo_world_or_mongodb(run_cli, tmp_path, monkeypatch, kind, doubt) -> None:
    run = doubt_run(kind, run_cli, tmp_path, monkeypatch, DOUBTS[doubt])
    assert run.code == 0, run.err
    assert decisions(run) == {"m-doubt": "opted_out", "m-clear": "selected"}
    assert run.report()["data_issues"]["odd_sms_preference_values"] == 1


@pytest.mark.parametrize("kind", PATHS)
def test_a_literal_dotted_key_and_the_nested_field_that_disagree_opt_out(run_cli, tmp_path, monkeypatch,
                                                                         kind) -> None:
    members = [member("m-both", 70, **{"optOut.sms": False, "optOut": {"sms": True}}),
               member("m-other", 60, **{"optOut": {"sms": False}, "optOut.sms": True}),
               member("m-clear", 50, **{"optOut.sms": False, "optOut": {"sms": False}})]
    run = run_on(kind, run_cli, tmp_path, members, "--dry-run", monkeypatch=monkeypatch)
    assert decisions(run) == {"m-both": "opted_out", "m-other": "opted_out", "m-clear": "selected"}


def test_values_at_finds_every_spelling_of_a_path() -> None:
    doc = {"optOut.sms": False, "optOut": {"sms": True}, "a": {"b.c": 1, "b": {"c": 2}}, "a.b": {"c": 3}}
    assert sorted(rtt.values_at(doc, "optOut.sms")) == [False, True]
    assert sorted(rtt.values_at(doc, "a.b.c")) == [1, 2, 3]
    assert rtt.values_at({"optOut": {"sms": None}}, "optOut.sms") == []


@pytest.mark.parametrize(("value", "said"), [("\u200b", "ODD"), ("\u200bno", "NO"), ("", "NO"), ("  ", "NO"),
                                             ("\u00a0", "ODD"), (float("nan"), "ODD"), (rtt.UNREADABLE, "ODD")])
def test_a_preference_empty_only_once_cleaned_is_doubt(value: Any, said: str) -> None:
    assert rtt.read_preference(value) is rtt.Preference[said]


def test_one_number_however_it_is_written() -> None:
    keys = {rtt.number_key(v, "US") for v in ("+12125550101", "(212) 555-0101", "212.555.0101", 2125550101,
                                              "1-212-555-0101", "212-555-0101 ext. 9", "+1 212\u200b555 0101")}
    assert keys == {"+12125550101"}
    assert rtt.number_key("call me", "US") is None and rtt.number_key(None, "US") is None


def test_the_folder_finds_a_preference_key_spelled_with_an_escape(tmp_path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "users.json").write_text('[{"_id": "a", "phone": "1", "sms\\u004fptOut": true},\n'
                                       '{"_id": "b", "phone": "2"}, {"_id": "c", "smsConsent": NaN}]',
                                       encoding="utf-8")
    rows = list(rtt.FolderSource(folder).consent_rows(rtt.DEFAULT_OPT_OUT_FIELDS + rtt.DEFAULT_CONSENT_FIELDS))
    assert (rows[0]["_id"], rows[0].get("smsOptOut")) == ("a", True)
    assert [r["_id"] for r in rows] == ["a", "c"]


def test_mongodb_hands_over_only_the_members_with_a_preference(monkeypatch) -> None:
    """The aggregation picks them (a literal dotted key included); the others never reach Python."""
    monkeypatch.setattr(mongomock.collection.Collection, "aggregate", mongo_expressions.patched_aggregate)
    mongo_expressions.DELIVERED.clear()
    client = mongomock.MongoClient()
    client["testdb"]["user"].insert_many([
        {"_id": "a", "phone": "+12125550101", "smsOptOut": True, "bio": "x" * 100},
        {"_id": "b", "phone": "+12125550102", "firstName": "Robin"},
        {"_id": "c", "optOut.sms": True}, {"_id": "d", "preferences": {"sms": False, "email": True}}])
    source = rtt.MongoSource(client, "testdb")
    rows = list(source.consent_rows(rtt.DEFAULT_OPT_OUT_FIELDS + rtt.DEFAULT_CONSENT_FIELDS))
    assert rows == [{"smsOptOut": True, "_id": "a", "phone": "+12125550101"},
                    {"optOut.sms": True, "_id": "c", "phone": None},
                    {"preferences": {"sms": False, "email": True}, "_id": "d", "phone": None}]
    assert mongo_expressions.DELIVERED["aggregate user"] == 3


def test_mongodb_reads_a_date_beyond_the_calendar_as_doubt_not_as_an_error() -> None:
    """pymongo raises InvalidBSON on such a date by default (the read would end); the client reads it as a
    DatetimeMS, which no date check takes and which opts out as a preference."""
    settings = rtt.Settings(mongo_uri="mongodb://127.0.0.1:1/x", mongo_db_name="x")
    client = rtt.connect_mongo(settings, False, logging.getLogger("test"))
    try:
        stored = bson.encode({"_id": "a", "smsOptOut": bson.DatetimeMS(2**62)})
        doc = bson.decode(stored, client.codec_options)
    finally:
        client.close()
    with pytest.raises(bson.errors.InvalidBSON):
        bson.decode(stored)
    assert rtt.sms_opt_out(doc, rtt.DEFAULT_OPT_OUT_FIELDS, ()) == (True, 1)
    assert rtt.to_utc(doc["smsOptOut"]) is None
