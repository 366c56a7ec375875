"""Who may be texted: valid numbers (phonenumbers), opt-outs and consent, the holdout, and the walk that
gives every eligible member ``selected`` or a ``skip_reason`` in ``dormant_users.json``.

All people here are fictional: ``@example.com`` emails and phones in the 555-01xx range set aside for fiction.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

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


def member(uid: str, days_inactive: int, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dormant member with a full profile and the one past event that makes them dormant."""
    user = {"_id": uid, "firstName": "Robin", "lastName": "Testwell", "email": f"{uid}@example.com",
            "phone": "+12125550150", "gender": "female", "interests": ["wine"], "occupation": "Teacher",
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
    assert run.code == rtt.EXIT_USAGE
    assert run.err.count("\n") == 1 and name in run.err and "Traceback" not in run.err


def assert_refused_at_start(run: Any, name: str) -> None:
    """Exit 2 before anything runs: one line naming the variable, no traceback, nothing written."""
    assert run.code == rtt.EXIT_USAGE, run.err
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
    assert run.code == rtt.EXIT_USAGE and "--holdout" in run.err


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
    second = run_cli("--source", str(write(tmp_path / "w", members)), "--now", NOW_ISO, "--holdout", str(FRACTION),
                     "--limit", "2", root=run.root)
    assert [decisions(second)[i] for i in (plain[6], plain[7], plain[8])] == ["cooldown", "cooldown", "selected"]


def test_only_the_members_the_walk_reaches_are_checked_and_read(run_cli, tmp_path: Path) -> None:
    members = [member("m-top", 80), member("m-next", 70, phone="555-0123"), member("m-low", 60, phone="555-0123")]
    run = run_cli("--source", str(write(tmp_path / "w", members)), "--now", NOW_ISO, "--limit", "1")
    assert run.code == 0, run.err
    assert decisions(run) == {"m-top": "selected", "m-next": "below_limit", "m-low": "below_limit"}
    top, *below = run.load("data/processed/dormant_users.json")
    assert top["phone_e164"] == "+12125550150" and top["event_history"]["events"] == 1
    assert all("phone_e164" not in u and "event_history" not in u for u in below)  # never reached, never checked


def test_a_member_whose_events_cannot_be_phrased_is_skipped_as_no_sms_within_contract(
        run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt, "write_template_sms", lambda _facts: None)  # no wording fits, for any event
    user, past = member("m-long", 60)
    run = run_cli("--source", str(write(tmp_path / "w", [(user, past)])), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    assert decisions(run) == {"m-long": "no_sms_within_contract"} and run.matches == []
    assert run.report()["skip_reasons"] == {"no_sms_within_contract": 1}
