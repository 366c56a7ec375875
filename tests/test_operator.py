"""What an operator running the campaign every morning meets (issue 20): the compliance decision, placeholders
left from .env.example, days that draft nothing, dry-run isolation, near-miss flags, cron mail, one funnel
from errors to exit codes. Every case goes through the one CLI harness (``run_cli``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from builders import NOW, NOW_ISO, CliRun, write_folder

import return_to_table as rtt

SCRIPT_DIR = Path(rtt.__file__).resolve().parent
UNSET = {"SMS_SENDER": "", "SMS_OPT_OUT_TEXT": ""}  # empty is unset: the harness's default compliance undone
COMPLIANT = {"SMS_SENDER": "Cuculi", "SMS_OPT_OUT_TEXT": "Reply STOP to opt out"}


def assert_refused(run: CliRun, *fragments: str) -> None:
    """Exit 2 in one line on stderr, no traceback, and nothing written: not even the ``--out`` folder."""
    assert run.code == rtt.ExitCode.USAGE == 2, (run.out, run.err)
    assert run.err.startswith("error: ") and run.err.count("\n") == 1, run.err
    assert "Traceback" not in run.out + run.err
    for fragment in fragments:
        assert fragment in run.err, run.err
    assert not run.root.exists() or not any(run.root.iterdir())


def live(run_cli: Any, folder: Path, *flags: str, env: dict[str, str] | None = None) -> CliRun:
    """A run that writes messages for review (the local mirror): no --dry-run, no --demo."""
    return run_cli("--source", str(folder), "--now", NOW_ISO, "--llm", "off", *flags, env=env)


# --- compliance text is a decision, not a default -------------------------------------------------------------


@pytest.mark.parametrize(("env", "missing"), [
    (UNSET, "SMS_SENDER and SMS_OPT_OUT_TEXT not set"),
    ({**UNSET, "SMS_SENDER": "Cuculi"}, "SMS_OPT_OUT_TEXT not set"),
    ({**UNSET, "SMS_OPT_OUT_TEXT": "Reply STOP to opt out"}, "SMS_SENDER not set"),
])
def test_a_live_run_without_the_compliance_decision_exits_2_before_anything_is_written(run_cli, world_folder,
                                                                                        env, missing):
    assert_refused(live(run_cli, world_folder, env=env), missing, "SMS_OPT_OUT_TEXT=none")


def test_the_same_run_rehearsed_needs_no_compliance_text(run_cli, world_folder):
    run = run_cli("--source", str(world_folder), "--now", NOW_ISO, "--llm", "off", "--dry-run", env=UNSET)
    assert run.code == rtt.ExitCode.OK, run.err
    assert run.messages


def test_with_both_set_every_message_names_the_sender_and_says_how_to_stop(run_cli, world_folder):
    run = live(run_cli, world_folder, env=COMPLIANT)
    assert run.code == rtt.ExitCode.OK, run.err
    assert run.messages
    for message in run.messages:
        assert message["message_text"].startswith("Cuculi: ")
        assert "Reply STOP to opt out. https://" in message["message_text"]


@pytest.mark.parametrize("none", ["none", "NONE"])
def test_opt_out_none_is_the_sending_systems_job_and_no_opt_out_text_is_drafted(run_cli, world_folder, none):
    run = live(run_cli, world_folder, env={**UNSET, "SMS_OPT_OUT_TEXT": none})
    assert run.code == rtt.ExitCode.OK, run.err
    assert run.messages and not any("STOP" in m["message_text"] or "none" in m["message_text"].lower()
                                    for m in run.messages)


def test_demo_messages_carry_the_sample_sender_and_opt_out_text(run_cli):
    run = run_cli("--demo", "--now", NOW_ISO, env=UNSET)
    assert run.code == rtt.ExitCode.OK, run.err
    assert run.messages
    for message in run.messages:
        text = message["message_text"]
        assert text.startswith(f"{rtt.DEMO_SENDER}: ") and f"{rtt.DEMO_OPT_OUT_TEXT}. https://" in text, text


# --- a .env copied from .env.example unchanged ----------------------------------------------------------------


def test_an_env_copied_from_the_example_exits_2_naming_the_variables_before_any_network_call(
        run_cli, monkeypatch):
    monkeypatch.setattr(rtt, "DOTENV_PATH", SCRIPT_DIR / ".env.example")
    started = time.monotonic()
    run = run_cli("--now", NOW_ISO, real_environment=True)
    assert time.monotonic() - started < 5  # no server selection, no Firebase request (it was 22 s, then exit 3)
    assert_refused(run, "MONGO_URI", "MONGO_PASSWORD", "FIREBASE_AUTH_TOKEN", "ANTHROPIC_API_KEY", ".env.example")
    assert "<mongo-password>" not in run.err  # names only: a value may be a secret


@pytest.mark.parametrize("command", [["--now", NOW_ISO], ["measure"], ["backtest", "--from", "2025-01-01", "--to",
                                                                        "2025-02-01"]])
def test_one_placeholder_left_is_exit_2_naming_it_for_the_campaign_and_both_subcommands(run_cli, world_folder,
                                                                                         command):
    env = {**COMPLIANT, "SMS_SENDER": "<brand-name>"}
    run = run_cli(*command, "--source", str(world_folder), env=env)
    assert_refused(run, "SMS_SENDER still holds a placeholder")


def test_a_variable_this_tool_does_not_read_may_hold_angle_brackets(run_cli, world_folder):
    run = live(run_cli, world_folder, env={"PS1": "<prompt>", "HOME_NOTE": "<x>"})
    assert run.code == rtt.ExitCode.OK, run.err


# --- a day that drafts no message -----------------------------------------------------------------------------


def idle_line(reason: rtt.IdleReason) -> str:
    return f"warning: no message drafted: {rtt.IDLE_LINES[reason]}\n"


def assert_idle(run: CliRun, reason: rtt.IdleReason) -> None:
    """Exit 3, the one line saying why, and a report that says it too and shows no average of nothing."""
    assert run.code == rtt.ExitCode.ATTENTION, run.err
    assert run.err == idle_line(reason)
    assert "No message drafted" not in run.out  # once in cron mail; the log keeps it
    [log] = (run.root / "logs").glob("*.log")
    assert f"WARNING - No message drafted: {rtt.IDLE_LINES[reason]}" in log.read_text(encoding="utf-8")
    report = run.report()
    assert report["no_message"]["reason"] == reason.value
    assert report["summary"]["average_confidence_score"] is None
    markdown = run.report_path(".md").read_text(encoding="utf-8")
    assert "| average confidence score | — |" in markdown and "average confidence score | 0.0" not in markdown
    assert f"No message drafted: {rtt.IDLE_LINES[reason]}" in markdown


def test_nobody_dormant_exits_3_saying_so(run_cli, tmp_path, world):
    users, events = world
    future_only = [e for e in events if e["startDate"] > NOW.replace(tzinfo=None)]  # nobody was ever at a table
    assert_idle(live(run_cli, write_folder(tmp_path / "w", users, future_only)), rtt.IdleReason.NOBODY_DORMANT)


def test_everyone_in_cooldown_exits_3_saying_so(run_cli, world_folder):
    assert live(run_cli, world_folder).code == rtt.ExitCode.OK
    again = live(run_cli, world_folder, "--now", "2026-01-16T12:00:00Z")
    assert again.code == rtt.ExitCode.ATTENTION and again.err == idle_line(rtt.IdleReason.ALL_IN_COOLDOWN)


def test_nobody_textable_exits_3_saying_so(run_cli, tmp_path, world):
    users, events = world
    for user in users:
        user.pop("phone", None)
    assert_idle(live(run_cli, write_folder(tmp_path / "w", users, events)), rtt.IdleReason.NOBODY_TEXTABLE)


def test_no_open_event_in_the_send_window_exits_3_saying_so(run_cli, world_folder):
    run = live(run_cli, world_folder, "--min-lead-hours", "720")
    assert_idle(run, rtt.IdleReason.NO_EVENT_IN_SEND_WINDOW)
    assert set(run.report()["skip_reasons"]) == {"no_event_in_send_window"}


def test_every_other_reason_names_the_commonest_skip(run_cli, world_folder):
    run = live(run_cli, world_folder, "--min-confidence", "100")
    assert run.code == rtt.ExitCode.ATTENTION
    assert run.err == ("warning: no message drafted: no member reached was messaged: below_min_confidence for 2 "
                       "of 2 textable members\n")


def test_todays_limit_already_drafted_is_exit_0_and_no_warning(run_cli, world_folder):
    """The per-day limit hands its reason over (``idle_hint``): a third run of the day drafts nothing, as planned."""
    assert live(run_cli, world_folder, "--limit", "1").code == rtt.ExitCode.OK
    again = live(run_cli, world_folder, "--limit", "1", "--now", "2026-01-15T13:00:00Z")
    assert again.code == rtt.ExitCode.OK and again.err == ""
    latest = max((again.root / "reports").glob("return_to_table_report_*.json"))  # campaign ids sort by time
    assert json.loads(latest.read_text(encoding="utf-8"))["no_message"]["reason"] == "day_limit_drafted"


def test_a_day_with_messages_has_no_idle_reason(run_cli, world_folder):
    run = live(run_cli, world_folder)
    assert run.code == rtt.ExitCode.OK and run.err == ""
    assert run.report()["no_message"] is None and run.report()["summary"]["average_confidence_score"] > 0


# --- --dry-run never overwrites a live run's files ------------------------------------------------------------


def test_a_dry_run_writes_its_own_data_and_report_and_leaves_the_live_runs_alone(run_cli, world_folder):
    first = live(run_cli, world_folder, "--limit", "1")
    assert first.code == rtt.ExitCode.OK and len(first.messages) == 1
    processed = first.root / "data" / "processed"
    before = {p.name: p.read_bytes() for p in [*processed.iterdir(), *(first.root / "data" / "raw").iterdir()]}
    rehearsal = run_cli("--source", str(world_folder), "--now", NOW_ISO, "--llm", "off", "--dry-run",
                        "--cooldown-days", "0", "--limit", "5")
    assert rehearsal.code == rtt.ExitCode.OK, rehearsal.err
    after = {p.name: p.read_bytes() for p in [*processed.iterdir(), *(first.root / "data" / "raw").iterdir()]}
    assert after == before
    assert rehearsal.messages  # read from data/dry-run/processed/
    assert (first.root / "data" / "dry-run" / "processed" / "messages.json").is_file()
    reports = sorted(p.name for p in (first.root / "reports").iterdir())
    assert len(reports) == 4 and [name for name in reports if "dry-run" in name] == [
        f"return_to_table_report_{rehearsal.report()['campaign_id']}_dry-run.{suffix}" for suffix in ("json", "md")]


# --- flags an operator mistypes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fraction", "meant"), [("0.7", "70"), ("0.85", "85"), ("1.0", "100")])
def test_a_fraction_for_min_confidence_asks_for_the_percentage(run_cli, fraction, meant):
    assert_refused(run_cli("--demo", "--min-confidence", fraction), "--min-confidence",
                   f"did you mean {meant}?")


def test_a_whole_percentage_is_taken(run_cli):
    assert run_cli("--demo", "--now", NOW_ISO, "--min-confidence", "1").code == rtt.ExitCode.OK


@pytest.mark.parametrize("argv", [
    ["--demo", "--hold", "0.1"],
    ["--demo", "--dry", "--now", NOW_ISO],
    ["measure", "--wind", "7"],
    ["backtest", "--source", "x", "--from", "2025-01-01", "--to", "2025-02-01", "--every", "7"],
])
def test_abbreviated_flags_are_refused_not_guessed(run_cli, argv):
    assert_refused(run_cli(*argv), "unrecognized arguments")


@pytest.mark.parametrize("command", [[], ["measure"]])
def test_a_near_miss_of_mongo_suggests_it(run_cli, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert_refused(run_cli(*command, "--source", "mong", "--now", NOW_ISO), "'mong': no such folder",
                   "did you mean mongo?")


def test_main_help_lists_the_subcommands(run_cli):
    run = run_cli("--help")
    assert run.code == rtt.ExitCode.OK
    assert "measure" in run.out and "backtest" in run.out and "subcommands" in run.out


# --- cron mail: every error once ------------------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_unreachable_mongodb_is_one_line_in_cron_mail_and_kept_in_the_log(run_cli, quiet):
    env = {"MONGO_URI": "mongodb://127.0.0.1:9/campaign?serverSelectionTimeoutMS=300", "MONGO_DB_NAME": "campaign"}
    run = run_cli("--source", "mongo", "--now", NOW_ISO, *quiet, env={**env, **COMPLIANT})
    assert run.code == rtt.ExitCode.FAILURE
    assert run.err.startswith("error: MongoDB: ") and run.err.count("\n") == 1
    assert "MongoDB" not in run.out  # stdout and stderr both land in cron mail: once is enough
    [log] = (run.root / "logs").glob("*.log")
    assert "ERROR - MongoDB: " in log.read_text(encoding="utf-8")


# --- one funnel from errors to exit codes ---------------------------------------------------------------------


def test_the_exit_codes_keep_their_numbers():
    assert {c.name: int(c) for c in rtt.ExitCode} == {
        "OK": 0, "FAILURE": 1, "USAGE": 2, "ATTENTION": 3, "LOCKED": 75, "SIGINT": 130, "SIGTERM": 143}


@pytest.mark.parametrize(("command", "program"), [([], "run_campaign"), (["measure"], "run_measure"),
                                                  (["backtest", "--source", "x", "--from", "2025-01-01", "--to",
                                                    "2025-02-01"], "backtest")])
@pytest.mark.parametrize(("error", "code"), [(rtt.UsageError("bad"), 2), (rtt.ServiceError("down"), 1),
                                             (rtt.Locked("held"), 75), (KeyboardInterrupt(), 130)])
def test_every_program_reaches_its_exit_code_through_the_one_funnel(run_cli, monkeypatch, command, program,
                                                                     error, code):
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(rtt, program, fail)
    run = run_cli(*command)
    assert run.code == code
    assert run.err.startswith("error: ") and run.err.count("\n") == 1 and "Traceback" not in run.err
