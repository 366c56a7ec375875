"""Step 8's report as a growth lead reads it (issue 20): the funnel (the same numbers on the console, in the
Markdown and in the JSON), the preview of every drafted message, the cost, recommendations from the run's
figures, ``skipped.csv`` and the holdout's power. All people here are the demo's or fictional."""

from __future__ import annotations

import csv
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from builders import NOW, NOW_ISO, CliRun, run_main

import return_to_table as rtt

FUNNEL_ROW = re.compile(r"^\| ([a-z ]+) \| (\d+) \| .* \|$")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> CliRun:
    """The demo with room for everyone and a holdout: members left out at several stages, some held out."""
    root = tmp_path_factory.mktemp("wide")
    return run_main(["--demo", "--now", NOW_ISO, "--limit", "60", "--holdout", "0.2"], root,
                    {"SMS_SEGMENT_PRICE": "0.0079"})


def console_funnel(out: str) -> list[dict[str, Any]]:
    """The funnel as the console's summary line spells it."""
    [line] = [line for line in out.splitlines() if "Step 8" in line]
    text = re.search(r"funnel (.*?) \((\d+) held out\);", line)
    assert text is not None, line
    stages = [re.fullmatch(r"(\d+) ([a-z ]+)", part) for part in text.group(1).split(" > ")]
    rows = [{"stage": m.group(2), "count": int(m.group(1))} for m in stages if m is not None]
    return rows + [{"stage": "held out", "count": int(text.group(2))}]


def markdown_funnel(markdown: str) -> list[dict[str, Any]]:
    """The funnel as the Markdown report's table spells it."""
    section = markdown.split("## Funnel\n", 1)[1].split("\n## ", 1)[0]
    rows = [FUNNEL_ROW.match(line) for line in section.splitlines()]
    return [{"stage": m.group(1), "count": int(m.group(2))} for m in rows if m and m.group(1) != "stage"]


# --- the funnel ---------------------------------------------------------------------------------


def test_the_funnel_is_the_same_in_the_console_the_markdown_and_the_json(wide):
    assert wide.code == 0, wide.err
    report = wide.report()
    funnel = report["funnel"]
    assert [row["stage"] for row in funnel] == [*rtt.FUNNEL_STAGES, rtt.HELD_OUT_STAGE]
    assert console_funnel(wide.out) == funnel
    assert markdown_funnel(wide.report_path(".md").read_text(encoding="utf-8")) == funnel
    counts = {row["stage"]: row["count"] for row in funnel}
    summary = report["summary"]
    assert counts["eligible"] == summary["total_users_with_complete_profiles"]
    assert counts["drafted"] == summary["total_messages_generated"] == len(wide.messages)
    assert counts["held out"] == report["holdout"]["count"] > 0
    reached = re.search(r"Steps 5-6: (\d+) members reached", wide.out)
    assert reached is not None and counts["reached"] == int(reached.group(1))
    # each stage lost exactly the members whose skip_reason belongs to it (the demo plants opted-out and
    # unreachable numbers)
    assert counts["reached"] - counts["textable"] == report["skip_reasons"]["no_valid_phone"] > 0
    assert counts["textable"] - counts["not opted out"] == report["skip_reasons"]["opted_out"] > 0
    assert [row["count"] for row in funnel[:-1]] == sorted((row["count"] for row in funnel[:-1]), reverse=True)


def test_the_report_no_longer_contradicts_itself(wide):
    markdown = wide.report_path(".md").read_text(encoding="utf-8")
    assert "Users tried" not in markdown
    skipped_section = markdown.split("## Members skipped\n", 1)[1].split("\n## ", 1)[0]
    assert "None." not in skipped_section  # the reasons table counts members not texted
    left_out = sum(n for code, n in wide.report()["skip_reasons"].items() if code != "holdout")
    assert f"{left_out} eligible members not texted" in skipped_section


def test_every_skip_reason_has_a_funnel_stage_and_a_new_one_falls_by_its_place(monkeypatch):
    assert set(rtt.SKIP_REASONS) <= set(rtt.REASON_STAGES)
    assert set(rtt.REASON_STAGES.values()) <= set(rtt.FUNNEL_STAGES)
    monkeypatch.setattr(rtt, "SKIP_REASONS", ("cooldown", "no_valid_phone", "number_recycled", "opted_out",
                                              "no_matching_event", "venue_closed", "below_min_confidence"))
    assert rtt.reason_stage("number_recycled") == "textable"  # after no_valid_phone in the walk
    assert rtt.reason_stage("venue_closed") == "event in send window"
    assert rtt.reason_stage("never_heard_of") == "drafted"


def test_the_funnel_drops_each_reason_at_its_stage():
    reasons = {"cooldown": 5, "no_valid_phone": 2, "shared_phone": 1, "opted_out": 1, "holdout": 2,
               "no_matching_event": 3, "seats_exhausted": 4, "no_sms_within_contract": 1, "below_limit": 10}
    counts = {row["stage"]: row["count"] for row in rtt.run_funnel(40, reasons)}
    assert counts == {"eligible": 40, "outside cooldown": 35, "reached": 25, "textable": 22, "not opted out": 21,
                      "event in send window": 18, "matched": 14, "drafted": 11, "held out": 2}


# --- the preview ------------------------------------------------------------------------------


def test_the_preview_has_a_row_per_drafted_message_with_the_first_name_only(wide):
    report, messages = wide.report(), wide.messages
    preview = report["preview"]
    assert len(preview) == len(messages) > 0
    users = {u["_id"]: u for u in wide.load("data/processed/dormant_users.json")}
    for row, message in zip(preview, messages, strict=True):
        user = users[message["user_id"]]
        assert row["first_name"] == (rtt.greeting_name(user.get("firstName")) or "-")  # "-": no usable first name
        assert not user.get("lastName") or user["lastName"] not in row["first_name"]
        assert row["event_name"] == message["event_name"]
        assert row["encoding"] == message["sms_encoding"] in ("GSM-7", "UCS-2")
        assert row["segments"] == message["sms_segments"]
        assert row["reason"] and "\n" not in row["reason"] and len(row["reason"]) <= 120
        assert re.fullmatch(r"\w{3} \w{3} \d+ \d\d:\d\d to \w{3} \w{3} \d+ \d\d:\d\d \S+", row["send_window"])
        assert "variant" not in row
    markdown = wide.report_path(".md").read_text(encoding="utf-8")
    section = markdown.split("## Preview of the drafted messages\n", 1)[1].split("\n## ", 1)[0]
    assert "| variant |" not in section
    assert sum(bool(re.match(r"\| \d+ \| ", line)) for line in section.splitlines()) == len(preview)
    for message in messages:  # no surname, number or address in the preview
        last = users[message["user_id"]].get("lastName")
        assert not last or f"| {last}" not in section
        assert message["user_phone"] not in section and (message["user_email"] or "@") not in section


def test_the_preview_window_is_local_to_the_member():
    message = {"send_after": "2026-01-15T13:00:00.000Z", "send_before": "2026-01-16T01:30:00.000Z",
               "recipient_timezone": "America/Los_Angeles"}
    assert rtt.send_window_text(message) == "Thu Jan 15 05:00 to Thu Jan 15 17:30 PST"


def test_a_variant_column_only_when_a_message_has_one():
    row = {"first_name": "Ana", "event_name": "Supper", "send_window": "-", "encoding": "GSM-7", "segments": 1,
           "reason": "shares her interests"}
    plain = "\n".join(rtt.preview_lines([row]))
    assert "variant" not in plain
    with_variant = "\n".join(rtt.preview_lines([row, {**row, "variant": "playful"}]))
    assert "| variant |" in with_variant and "| playful |" in with_variant
    user = {"firstName": "Ana María"}
    message = {"event_name": "Supper", "sms_encoding": "UCS-2", "sms_segments": 2, "reasoning": "A. B.",
               "send_after": "", "send_before": "", "recipient_timezone": "UTC", "variant": "warm"}
    assert rtt.preview_row(user, message) == {"first_name": "Ana", "event_name": "Supper", "send_window": "-",
                                              "encoding": "UCS-2", "segments": 2, "reason": "A", "variant": "warm"}


# --- skipped.csv ------------------------------------------------------------------------------


def test_skipped_csv_lists_member_ids_and_reasons_only(wide):
    path = wide.root / "data" / "processed" / rtt.SKIP_LIST
    with path.open(encoding="utf-8", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["member_id", "reason"]
    assert all(len(row) == 2 for row in rows)
    decisions = {u["_id"]: u.get("skip_reason") for u in wide.load("data/processed/dormant_users.json")}
    assert rows and all(decisions[member] == reason for member, reason in rows)
    counts = {row["stage"]: row["count"] for row in wide.report()["funnel"]}
    assert len(rows) == counts["reached"] - counts["drafted"] - counts["held out"]
    assert {reason for _, reason in rows} >= {"no_valid_phone", "opted_out"}
    eligible = wide.load("data/processed/dormant_users.json")
    text = path.read_text(encoding="utf-8")
    for user in eligible:  # no name, phone or email of anyone
        for key in ("firstName", "lastName", "email", "phone"):
            value = user.get(key)
            assert not (isinstance(value, str) and len(value) > 3 and value in text), (key, value)
    assert "@" not in text


def test_skipped_csv_withholds_ids_that_are_contact_details_and_defuses_formulas():
    ids = ["ana@example.com", "=HYPERLINK(1)", "plain", "later", "+1 (212) 555-0101", "64d0000000000000000000cf",
           "12345678901", "+12125550101"]
    eligible = [{"_id": member} for member in ids]
    decisions = {"ana@example.com": "no_valid_phone", "=HYPERLINK(1)": "opted_out", "plain": "cooldown",
                 "+1 (212) 555-0101": "shared_phone", "64d0000000000000000000cf": "no_matching_event",
                 "12345678901": "opted_out", "+12125550101": "failed"}
    assert list(rtt.skip_list_rows(eligible, decisions)) == [
        ["(withheld: rank 1)", "no_valid_phone"], ["'=HYPERLINK(1)", "opted_out"],  # not cooldown, not below_limit
        ["(withheld: rank 5)", "shared_phone"], ["64d0000000000000000000cf", "no_matching_event"],
        ["12345678901", "opted_out"], ["(withheld: rank 8)", "failed"]]


# --- the cost ---------------------------------------------------------------------------------


def test_the_cost_with_a_segment_price(wide):
    cost = wide.report()["cost"]
    segments = wide.report()["summary"]["total_sms_segments"]
    assert cost["sms_segments"] == segments > 0
    assert cost["sms_segment_price_usd"] == 0.0079
    assert cost["sms_cost_usd"] == pytest.approx(segments * 0.0079)
    assert cost["claude_used"] is False and cost["claude_cost_usd"] is None
    shown = f"{segments} SMS segments x 0.0079 USD = {segments * 0.0079:.4f} USD"
    assert shown in wide.out and shown in wide.report_path(".md").read_text(encoding="utf-8")


def test_the_cost_without_a_price_is_segments_only(tmp_path):
    run = run_main(["--demo", "--now", NOW_ISO], tmp_path)
    cost = run.report()["cost"]
    assert cost["sms_segments"] == run.report()["summary"]["total_sms_segments"]
    assert cost["sms_segment_price_usd"] is None and cost["sms_cost_usd"] is None and cost["total_usd"] is None
    assert "SMS_SEGMENT_PRICE unset" in run.out and " USD" not in run.out.splitlines()[-1]


def test_the_cost_beside_claude():
    assert rtt.run_cost(10, 0.01, 0.25, True)["total_usd"] == pytest.approx(0.35)
    assert rtt.run_cost(10, 0.01, None, True)["total_usd"] is None  # Claude's prices unknown
    text = rtt.cost_text(rtt.run_cost(10, 0.01, 0.25, True))
    assert text == "10 SMS segments x 0.0100 USD = 0.1000 USD; Claude 0.2500 USD; in all 0.3500 USD"


@pytest.mark.parametrize("price", ["cheap", "-0.01", "nan", "inf", "12"])
def test_a_bad_segment_price_is_exit_2_in_one_line(tmp_path, price):
    run = run_main(["--demo", "--now", NOW_ISO], tmp_path, {"SMS_SEGMENT_PRICE": price})
    assert run.code == 2
    assert "SMS_SEGMENT_PRICE" in run.err and len(run.err.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists()


# --- recommendations ------------------------------------------------------------------------------


def figures(**changes: Any) -> dict[str, Any]:
    """A report's figures as ``recommendations`` reads them: a quiet day unless changed."""
    report: dict[str, Any] = {
        "skip_reasons": {"below_limit": 30}, "summary": {"total_messages_generated": 10},
        "cost": rtt.run_cost(10, None, None, False),
        "preview": [{"event_name": f"Supper {i}"} for i in range(10)],
        "holdout": {"fraction": 0.2, "count": 400},
        "holdout_power": rtt.holdout_power((400, 400), (1000, 1000)),
        "fallbacks": {"matching": 0, "writing": 0}}
    report.update(changes)
    return report


def test_a_quiet_day_says_nothing_calls_for_a_change():
    assert rtt.recommendations(figures()) == ["Nothing in this run's figures calls for a change."]


def test_recommendations_follow_the_figures():
    phones = rtt.recommendations(figures(skip_reasons={"no_valid_phone": 30, "opted_out": 2}))
    assert any("30 members" in r and "no number that takes texts" in r and "skipped.csv" in r for r in phones)
    cooled = rtt.recommendations(figures(skip_reasons={"cooldown": 40, "no_valid_phone": 1}))
    assert any("40 members" in r and "--cooldown-days" in r for r in cooled) and cooled != phones
    unknown = rtt.recommendations(figures(skip_reasons={"venue_closed": 25}))
    assert any("venue_closed" in r for r in unknown)
    crowded = rtt.recommendations(figures(preview=[{"event_name": "Jazz Brunch"}] * 7 + [{"event_name": "X"}] * 3))
    assert any(r.startswith("Jazz Brunch takes 7 of 10 invitations") for r in crowded)
    no_holdout = rtt.recommendations(figures(holdout={"fraction": 0.0, "count": 0}))
    assert any("--holdout 0.1" in r for r in no_holdout)
    small = rtt.recommendations(figures(holdout_power=rtt.holdout_power((70, 2), (0, 0))))
    assert any("too small to tell" in r and "2 held out against 70 texted" in r for r in small)
    nothing = rtt.recommendations(figures(summary={"total_messages_generated": 0}, preview=[],
                                          skip_reasons={"no_matching_event": 12}))
    assert nothing[0].startswith("No message was drafted") and any("12 members" in r for r in nothing)


def test_the_runs_recommendations_are_its_own(wide, tmp_path):
    tight = run_main(["--demo", "--now", NOW_ISO], tmp_path)  # no holdout this time
    assert any("--holdout 0.1" in r for r in tight.report()["recommendations"])
    assert not any("--holdout 0.1" in r for r in wide.report()["recommendations"])
    markdown = wide.report_path(".md").read_text(encoding="utf-8")
    for line in wide.report()["recommendations"]:
        assert f"- {line}" in markdown


# --- holdout power --------------------------------------------------------------------------------


def test_the_detectable_lift_matches_the_textbook_sample_size():
    """Worked by hand: two groups at p = 0.5, 80% power, two-sided 5%, need n = (1.95996 + 0.84162)**2 * 2 * 0.25
    / d**2 members each to detect d: 392.4 for 10 points, 1569.6 for 5. Issue 20's ten days (70 texted, 2 held
    out): 2.80158 * sqrt(0.25 * (1/70 + 1/2)) = 1.0046, a 100.5-point lift: nothing is detectable."""
    assert rtt.detectable_lift_pp(392, 392) == pytest.approx(10.0, abs=0.01)
    assert rtt.detectable_lift_pp(1570, 1570) == pytest.approx(5.0, abs=0.01)
    assert rtt.detectable_lift_pp(70, 2) > 100  # issue 20's ten days with --holdout 0.1
    assert rtt.detectable_lift_pp(70, 0) is None
    figure = rtt.holdout_power((70, 2), None)
    assert figure["this_run"] == {"treated": 70, "held_out": 2, "detectable_lift_pp": 100.5}
    assert figure["last_30_days"] is None


def test_the_last_30_days_add_the_dashboards_members_to_this_runs(tmp_path):
    first = run_main(["--demo", "--now", NOW_ISO, "--holdout", "0.2", "--limit", "8"], tmp_path)
    later = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    second = run_main(["--demo", "--now", later, "--holdout", "0.2", "--limit", "8"], tmp_path)
    assert first.code == second.code == 0, second.err
    reports = sorted((tmp_path / "reports").glob("*.json"))
    one, two = (json.loads(p.read_text(encoding="utf-8")) for p in reports)
    power = two["holdout_power"]
    assert power["this_run"]["treated"] == len(second.messages)
    assert power["last_30_days"]["treated"] == len(first.messages) + len(second.messages)
    assert power["last_30_days"]["held_out"] == one["holdout"]["count"] + two["holdout"]["count"]
    markdown = sorted((tmp_path / "reports").glob("*.md"))[1].read_text(encoding="utf-8")
    assert f"- Last 30 days: {power['last_30_days']['treated']} texted" in markdown


def test_a_dry_run_without_a_dashboard_says_last_30_days_unknown():
    power = rtt.holdout_power((5, 1), None)
    assert "- Last 30 days: unknown" in "\n".join(rtt.power_lines(power))
