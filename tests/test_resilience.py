"""Resilience of one run: files, disk, logs, console, exit codes, Claude under load, saving and time bounds.

Covered here, in-process (the subprocess, signal, lock and silent-server cases are in test_unattended.py):

* atomic writes: a write that fails part-way keeps the old file byte for byte, leaves no temporary file and
  raises ``OutputError``; two writers of one path at once both succeed;
* a full disk or a blocked folder (``reports``, ``logs`` or ``data`` a regular file) ends a run with exit 1 in
  one stderr line, and what was already written stays valid JSON; a full disk under the local mirror is a
  Firebase failure (exit 3, the report complete); an unusable ``--out`` is exit 2;
* ``--keep-logs`` removes only this tool's own old log files;
* ``--quiet`` keeps the console to warnings, errors and the final summary line;
* exit codes: 0 / 2 / 3 from ``main``, the ``--help`` table, and ``RunResult.exit_code``'s rule;
* Claude's "stop after four failures in a row" under concurrency, and the bounded quote in the corrective retry;
* progress files and the local mirror are rewritten a bounded number of times, not once per member;
* ``RunControl.budget`` / ``status`` with a fake clock, and ``bounded_call``;
* out of memory in the main thread, a member's thread, a helper thread or ``measure``: one line, exit 1, the
  lock released (``Worker`` raises a helper's failure where it is waited for); a helper process that never
  answers cannot hold a run past its deadline.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from builders import NOW_ISO, CliRun
from fake_anthropic import FakeMessagesAPI, RecordedRequest, Reply, error_reply, text_reply
from test_claude import MEMBERS, claude_cli, is_matching, smart, write_world

import return_to_table as rtt

DAY = 86400


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def temporary_files(folder: Path) -> list[Path]:
    """``atomic_write``'s temporary files (``.<name>.*.tmp``) anywhere under ``folder``."""
    return [p for p in folder.rglob(".*.tmp")]


def assert_all_json_valid(root: Path) -> None:
    for path in root.rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))


def assert_one_error_line(run: CliRun, code: int) -> None:
    assert run.code == code, (run.out, run.err)
    assert run.err.startswith("error: "), run.err
    assert run.err.count("\n") == 1, run.err
    assert "Traceback" not in run.out + run.err


# =============================================================================================
# 1. Atomic writes
# =============================================================================================


def partial_then_enospc(handle: Any) -> None:
    handle.write('{"new": "half a file')
    handle.flush()
    raise enospc()


def fail_inside_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def dump(value: Any, handle: Any) -> None:
        partial_then_enospc(handle)

    monkeypatch.setattr(rtt, "dump_json", dump)


def fail_at_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise enospc()

    monkeypatch.setattr(rtt.os, "fsync", fsync)


def fail_at_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def replace(src: Any, dst: Any) -> None:
        raise enospc()

    monkeypatch.setattr(rtt.os, "replace", replace)


@pytest.mark.parametrize("inject", [fail_inside_write, fail_at_fsync, fail_at_replace],
                         ids=["inside-json-dump", "at-fsync", "at-replace"])
def test_a_write_that_fails_part_way_keeps_the_old_file_byte_for_byte(tmp_path, monkeypatch, inject):
    path = tmp_path / "out" / "matches.json"
    rtt.write_json(path, [{"user_id": "u-1", "event_id": "ev-1"}])
    before = path.read_bytes()
    inject(monkeypatch)
    with pytest.raises(rtt.OutputError, match="No space left on device"):
        rtt.write_json(path, [{"user_id": "u-2"}] * 100)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert temporary_files(tmp_path) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["matches.json"]


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path):
    path = tmp_path / "report.md"
    with pytest.raises(rtt.OutputError):
        rtt.atomic_write(path, partial_then_enospc)
    assert list(tmp_path.iterdir()) == []


def test_a_write_into_a_path_blocked_by_a_file_is_an_output_error(tmp_path):
    (tmp_path / "reports").write_text("not a folder", encoding="utf-8")
    with pytest.raises(rtt.OutputError, match="reports"):
        rtt.write_json(tmp_path / "reports" / "r.json", {"a": 1})
    assert (tmp_path / "reports").read_text(encoding="utf-8") == "not a folder"


def test_two_writers_of_one_path_at_once_both_succeed_with_distinct_temporary_files(tmp_path):
    path = tmp_path / "matches.json"
    both_open = threading.Barrier(2, timeout=5)
    seen_temporaries: list[set[str]] = []
    errors: list[BaseException] = []

    def writer(value: dict[str, Any]) -> None:
        def write(handle: Any) -> None:
            json.dump(value, handle)
            handle.flush()
            both_open.wait()  # both temporary files exist now
            seen_temporaries.append({p.name for p in temporary_files(tmp_path)})
            both_open.wait()

        try:
            rtt.atomic_write(path, write)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    values = [{"writer": "a", "items": list(range(50))}, {"writer": "b", "items": list(range(80))}]
    threads = [threading.Thread(target=writer, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert all(len(names) == 2 for names in seen_temporaries), seen_temporaries
    assert json.loads(path.read_text(encoding="utf-8")) in values
    assert temporary_files(tmp_path) == []


# =============================================================================================
# 2. Full disk and blocked folders: exit 1, one line, what was written stays valid
# =============================================================================================


def disk_full_under(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[Path]:
    """Every atomic write under ``folder`` writes some bytes, then fails with ENOSPC; returns the paths tried."""
    real = rtt.atomic_write
    tried: list[Path] = []

    def atomic_write(path: Path, write: Any, *, private: bool = False) -> None:
        if folder in path.parents:
            tried.append(path)
            real(path, partial_then_enospc, private=private)
        else:
            real(path, write, private=private)

    monkeypatch.setattr(rtt, "atomic_write", atomic_write)
    return tried


@pytest.mark.parametrize("full", ["reports", "data/processed"])
def test_a_full_disk_ends_the_run_with_exit_1_in_one_line_and_earlier_files_stay_valid(run_cli, tmp_path,
                                                                                        monkeypatch, full):
    tried = disk_full_under(monkeypatch, tmp_path / "out" / full)
    run = run_cli("--demo", "--now", NOW_ISO)
    assert tried, "no write was tried under the full folder"
    assert_one_error_line(run, rtt.ExitCode.FAILURE)
    assert "No space left on device" in run.err
    assert (run.root / "data" / "raw" / "users.json").is_file()
    assert_all_json_valid(run.root)
    assert temporary_files(run.root) == []
    assert not (run.root / full).exists() or not any((run.root / full).iterdir())


@pytest.mark.parametrize("blocked", ["reports", "logs", "data"])
def test_a_file_where_a_folder_must_be_ends_the_run_with_exit_1_in_one_line(run_cli, tmp_path, blocked):
    root = tmp_path / "out"
    root.mkdir()
    (root / blocked).write_text("in the way\n", encoding="utf-8")
    run = run_cli("--demo", "--now", NOW_ISO)
    assert_one_error_line(run, rtt.ExitCode.FAILURE)
    assert blocked in run.err
    assert (root / blocked).read_text(encoding="utf-8") == "in the way\n"
    assert_all_json_valid(root)
    assert temporary_files(root) == []


def test_a_full_disk_under_the_local_mirror_is_a_firebase_failure_exit_3_with_a_complete_report(
        run_cli, tmp_path, monkeypatch):
    disk_full_under(monkeypatch, tmp_path / "out" / "data" / "firebase")
    run = run_cli("--demo", "--now", NOW_ISO, complete=True)
    assert run.code == rtt.ExitCode.ATTENTION
    assert run.report()["firebase"]["errors"]
    assert run.err.startswith("error: ") and run.err.count("\n") == 1 and "Traceback" not in run.err
    assert_all_json_valid(run.root)
    assert temporary_files(run.root) == []


def mirror_file(root: Path, written: str) -> Path:
    """The local mirror's file for a path the report lists as written (``campaigns/<id>/<name>`` or ``<name>``)."""
    return root / "data" / "firebase" / rtt.DEFAULT_BASE_PATH / f"{written.split(' (')[0]}.json"


def test_a_mirror_that_could_not_be_saved_is_not_reported_as_written(run_cli, tmp_path, monkeypatch):
    disk_full_under(monkeypatch, tmp_path / "out" / "data" / "firebase")
    run = run_cli("--demo", "--now", NOW_ISO)
    firebase = run.report()["firebase"]
    assert [w for w in firebase["written"] if not mirror_file(run.root, w).is_file()] == []
    assert firebase["not_written"]
    assert not run.err.startswith("error: 0 Firebase writes failed")


def test_out_under_a_regular_file_cannot_be_created_and_exits_2(run_cli, tmp_path):
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    run = run_cli("--demo", root=tmp_path / "a-file" / "out")
    assert_one_error_line(run, rtt.ExitCode.USAGE)
    assert "--out" in run.err


def test_out_that_is_not_writable_exits_2(run_cli, tmp_path, monkeypatch):
    out = (tmp_path / "out").resolve()
    real_access = rtt.os.access
    monkeypatch.setattr(rtt.os, "access", lambda p, mode, **kw: False if Path(p) == out else real_access(p, mode, **kw))
    run = run_cli("--demo", root=out)  # root can write anywhere, so "not writable" is simulated
    assert_one_error_line(run, rtt.ExitCode.USAGE)
    assert "not writable" in run.err
    assert list(out.iterdir()) == []


# =============================================================================================
# 3. Log pruning
# =============================================================================================


OLD_LOGS = ["return_to_table_2026-01-01_06-00-00.log", "return_to_table_2026-01-01_06-00-00_2.log"]
KEPT_NAMES = ["other.log", "return_to_table_notes.txt", "return_to_table_x.log",
              "return_to_table_2026-01-01_06-00-00.log.gz", "old_return_to_table_2026-01-01_06-00-00.log"]


def make_logs(log_dir: Path, now: float) -> None:
    """Old files under every name, a recent log, and an old folder named like a log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for name in OLD_LOGS + KEPT_NAMES:
        (log_dir / name).write_text("old\n", encoding="utf-8")
        os.utime(log_dir / name, (now - 40 * DAY, now - 40 * DAY))
    recent = log_dir / "return_to_table_2026-02-01_06-00-00.log"
    recent.write_text("recent\n", encoding="utf-8")
    os.utime(recent, (now - 29 * DAY, now - 29 * DAY))
    folder = log_dir / "return_to_table_2025-12-01_06-00-00.log"
    folder.mkdir()
    os.utime(folder, (now - 400 * DAY, now - 400 * DAY))


def test_prune_logs_removes_only_this_tools_old_log_files(tmp_path):
    now = datetime(2026, 3, 1, tzinfo=UTC)
    make_logs(tmp_path, now.timestamp())
    assert rtt.prune_logs(tmp_path, now, 30) == len(OLD_LOGS)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {*KEPT_NAMES, "return_to_table_2026-02-01_06-00-00.log", "return_to_table_2025-12-01_06-00-00.log"}
    assert (tmp_path / "return_to_table_2025-12-01_06-00-00.log").is_dir()


def test_prune_logs_leaves_a_symlink_named_like_a_log_and_its_target(tmp_path):
    now = datetime(2026, 3, 1, tzinfo=UTC)
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n", encoding="utf-8")
    link = tmp_path / "return_to_table_2026-01-01_06-00-00.log"
    link.symlink_to(target)
    os.utime(target, (now.timestamp() - 40 * DAY,) * 2)
    assert rtt.prune_logs(tmp_path, now, 30) == 0
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "keep me\n"


def test_prune_logs_with_0_days_keeps_everything(tmp_path):
    now = datetime(2026, 3, 1, tzinfo=UTC)
    make_logs(tmp_path, now.timestamp())
    before = sorted(p.name for p in tmp_path.iterdir())
    assert rtt.prune_logs(tmp_path, now, 0) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_run_prunes_old_logs_by_default_and_says_so_in_its_log(run_cli, tmp_path):
    log_dir = tmp_path / "out" / "logs"
    make_logs(log_dir, time.time())
    run = run_cli("--demo", "--now", NOW_ISO)
    assert run.code == 0, run.err
    left = {p.name for p in log_dir.iterdir()}
    assert not left & set(OLD_LOGS)
    assert set(KEPT_NAMES) <= left and "return_to_table_2026-02-01_06-00-00.log" in left
    new_logs = [p for p in log_dir.iterdir() if p.is_file() and p.name not in KEPT_NAMES
                and p.name != "return_to_table_2026-02-01_06-00-00.log"]
    assert len(new_logs) == 1 and rtt.LOG_FILE_PATTERN.match(new_logs[0].name)
    assert f"Removed {len(OLD_LOGS)} log files older than 30 days" in new_logs[0].read_text(encoding="utf-8")


def test_keep_logs_0_keeps_every_old_log(run_cli, tmp_path):
    log_dir = tmp_path / "out" / "logs"
    make_logs(log_dir, time.time())
    run = run_cli("--demo", "--now", NOW_ISO, "--keep-logs", "0")
    assert run.code == 0, run.err
    assert set(OLD_LOGS) <= {p.name for p in log_dir.iterdir()}


def test_keep_logs_days_is_the_age_limit(run_cli, tmp_path):
    log_dir = tmp_path / "out" / "logs"
    make_logs(log_dir, time.time())  # the recent one is 29 days old
    run_cli("--demo", "--now", NOW_ISO, "--keep-logs", "28")
    assert "return_to_table_2026-02-01_06-00-00.log" not in {p.name for p in log_dir.iterdir()}


# =============================================================================================
# 4. --quiet
# =============================================================================================


def test_quiet_console_holds_only_the_final_summary_line_on_a_clean_run(run_cli):
    run = run_cli("--demo", "--now", NOW_ISO, "--quiet")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("INFO - Step 8"), run.out
    assert run.err == ""


def test_quiet_console_still_shows_warnings(run_cli, tmp_path):
    mirror = tmp_path / "out" / "data" / "firebase" / rtt.DEFAULT_BASE_PATH
    mirror.mkdir(parents=True)
    (mirror / "messages.json").write_text("{not json", encoding="utf-8")  # the cooldown cannot be read
    run = run_cli("--demo", "--now", NOW_ISO, "--dry-run", "--quiet")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert any(line.startswith("WARNING - Cooldown not applied") for line in lines), run.out
    assert all(line.startswith(("WARNING - ", "ERROR - ")) for line in lines[:-1]), run.out
    assert lines[-1].startswith("INFO - Step 8")


def test_quiet_keeps_info_and_debug_in_the_log_file(run_cli):
    run = run_cli("--demo", "--now", NOW_ISO, "--quiet")
    [log] = (run.root / "logs").glob("*.log")
    text = log.read_text(encoding="utf-8")
    assert " - INFO - Step 1: read " in text and " - DEBUG - " in text


def test_without_quiet_the_console_has_the_info_lines(run_cli):
    run = run_cli("--demo", "--now", NOW_ISO)
    assert "INFO - Step 1: read " in run.out and "INFO - Step 2: " in run.out
    assert run.out.splitlines()[-1].startswith("INFO - Step 8")


def test_quiet_and_verbose_together_are_a_usage_error(run_cli):
    run = run_cli("--demo", "--quiet", "--verbose")
    assert_one_error_line(run, rtt.ExitCode.USAGE)
    assert not (run.root / "logs").exists()


def test_console_filter_passes_the_summary_record_below_its_level():
    quiet = rtt.console_filter(rtt.logging.WARNING)

    def record(level: int, **extra: Any) -> rtt.logging.LogRecord:
        r = rtt.logging.LogRecord("ReturnToTable", level, __file__, 1, "m", None, None)
        r.__dict__.update(extra)
        return r

    assert not quiet(record(rtt.logging.INFO))
    assert quiet(record(rtt.logging.INFO, summary=True))
    assert quiet(record(rtt.logging.WARNING)) and quiet(record(rtt.logging.ERROR))


# =============================================================================================
# 5. Exit codes
# =============================================================================================


def test_a_clean_demo_exits_0(run_cli):
    run = run_cli("--demo", "--now", NOW_ISO, complete=True)
    assert run.code == rtt.ExitCode.OK == 0
    assert run.report()["status"] == "completed"


@pytest.mark.parametrize("flags", [
    ["--deadline-minutes", "0"], ["--deadline-minutes", "-5"], ["--deadline-minutes", "nan"],
    ["--deadline-minutes", "inf"], ["--keep-logs", "-1"], ["--keep-logs", "1.5"], ["--concurrency", "0"],
])
def test_a_bad_flag_value_exits_2_in_one_line(run_cli, flags):
    run = run_cli("--demo", *flags)
    assert_one_error_line(run, rtt.ExitCode.USAGE)
    assert flags[0] in run.err


@pytest.mark.parametrize("flags", [
    ["--min-lead-hours", "1e11"], ["--min-lead-hours", "1e9"], ["--min-lead-hours", "720.5"],
    ["--candidates", "99999999999999999999"], ["--candidates", "101"], ["--concurrency", "99999999999999999999"],
])
def test_a_numeric_flag_beyond_its_bound_exits_2_in_one_line(run_cli, flags):
    run = run_cli("--demo", "--dry-run", *flags)
    assert_one_error_line(run, rtt.ExitCode.USAGE)
    assert flags[0] in run.err and "must be at most" in run.err


@pytest.mark.parametrize("flags", [["--min-lead-hours", "720"], ["--candidates", "100", "--concurrency", "64"]])
def test_a_numeric_flag_at_its_bound_runs(run_cli, flags):
    run = run_cli("--demo", "--dry-run", *flags)
    assert run.code == rtt.ExitCode.OK, run.err
    assert "Traceback" not in run.out + run.err and run.report()["status"] == "completed"
    assert run.report()["summary"]["users_failed"] == 0


def test_a_member_that_crashes_is_skipped_as_failed_the_others_are_done_and_the_run_exits_3(run_cli, monkeypatch):
    real = rtt.write_template_sms
    calls = [0]

    def crash_on_the_second(facts: rtt.MessageFacts) -> str | None:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")
        return real(facts)

    monkeypatch.setattr(rtt, "write_template_sms", crash_on_the_second)
    run = run_cli("--demo", "--now", NOW_ISO, "--limit", "4", "--dry-run", complete=True)
    assert run.code == rtt.ExitCode.ATTENTION
    report = run.report()
    assert report["summary"]["users_failed"] == 1
    [failed] = [s for s in report["skipped"] if s["reason"].startswith("failed:")]
    assert "RuntimeError" in failed["reason"]
    assert failed["user_id"] == run.ranked[1]
    assert run.report()["skip_reasons"]["failed"] == 1 and failed["code"] == "failed"
    assert [m["user_id"] for m in run.matches] == [run.ranked[i] for i in (0, 2, 3, 4)]  # the walk goes on to --limit
    assert len(run.messages) == 4
    assert run.err.startswith("warning: 1 members failed") and run.err.count("\n") == 1
    assert "Traceback" not in run.out + run.err
    [log] = (run.root / "logs").glob("*.log")
    assert "Traceback" in log.read_text(encoding="utf-8")  # the traceback is in the log file, only there


def test_help_shows_the_exit_code_table(run_cli):
    run = run_cli("--help")
    assert run.code == 0
    assert rtt.EXIT_CODES_HELP in run.out
    for code in ("75", "130", "143", " 3 ", " 1 ", " 2 ", " 0 "):
        assert code in run.out


def result(**kwargs: Any) -> rtt.RunResult:
    firebase = {"not_written": kwargs.pop("not_written", []), "errors": kwargs.pop("errors", [])}
    report = {"firebase": firebase, "status": kwargs.pop("status", "completed"), "empty_input": []}
    return rtt.RunResult(report=report, report_path=Path("r.json"),
                         claude_unavailable=kwargs.pop("claude_unavailable", None), **kwargs)


@pytest.mark.parametrize(("kwargs", "code"), [
    ({}, 0),
    ({"signal": signal.SIGTERM, "status": "interrupted"}, 143),
    ({"signal": signal.SIGINT, "status": "interrupted"}, 130),
    ({"signal": signal.SIGTERM, "status": "interrupted", "failed_members": 2, "not_written": ["x"]}, 143),
    ({"status": "deadline"}, 3),
    ({"not_written": ["matches (u-1, ev-1)"]}, 3),
    ({"errors": ["Firebase messages: refused"]}, 3),
    ({"claude_unavailable": "4 calls in a row failed"}, 3),
    ({"failed_members": 1}, 3),
], ids=["clean", "sigterm", "sigint", "signal-wins", "deadline", "not-written", "firebase-error", "claude-down",
        "member-failed"])
def test_run_result_exit_code_rule(kwargs, code):
    assert result(**kwargs).exit_code == code


# =============================================================================================
# 6-7. Claude: failures in a row under concurrency, calls in flight, the bounded quote
# =============================================================================================


class InFlight:
    """A responder wrapper that holds each request ``seconds`` and records the peak number held at once."""

    def __init__(self, answer: Callable[[RecordedRequest], Reply], seconds: float) -> None:
        self.answer, self.seconds = answer, seconds
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def __call__(self, request: RecordedRequest) -> Reply:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return self.answer(request)


def test_an_outage_under_concurrency_costs_at_most_four_calls_and_every_member_still_gets_a_message(tmp_path):
    folder = write_world(tmp_path / "export")
    responder = InFlight(lambda r: error_reply(500, "api_error"), 0.3)
    with FakeMessagesAPI(default=responder) as fake:
        run = claude_cli(fake, folder, tmp_path / "out", "--concurrency", "6", env={"ANTHROPIC_MAX_RETRIES": "0"})
    limit = rtt.ClaudeAdvisor.MAX_CONSECUTIVE_FAILURES
    assert responder.peak >= 2  # the calls did overlap
    assert len(fake.requests) <= limit
    assert run.code == rtt.ExitCode.ATTENTION
    assert [m["matcher"] for m in run.matches] == ["rules"] * len(MEMBERS)
    assert [m["generator"] for m in run.messages] == ["template"] * len(MEMBERS)
    assert f"{limit} calls in a row failed" in run.report()["llm_usage"]["unavailable"]


def test_healthy_calls_overlap_but_never_more_than_four_in_flight(tmp_path):
    folder = write_world(tmp_path / "export")
    responder = InFlight(smart, 0.15)
    with FakeMessagesAPI(default=responder) as fake:
        run = claude_cli(fake, folder, tmp_path / "out", "--concurrency", "6", env={"ANTHROPIC_MAX_RETRIES": "0"})
    assert run.code == 0, run.err
    assert 2 <= responder.peak <= rtt.ClaudeAdvisor.MAX_CONSECUTIVE_FAILURES
    assert len(fake.requests) == 2 * len(MEMBERS)
    assert {m["matcher"] for m in run.matches} == {"claude"}


def test_an_outage_with_sdk_retries_under_concurrency_stops_after_four_calls_in_a_row(tmp_path):
    """Calls waiting out the SDK's backoff give their slots back, yet no fifth call starts while all fail."""
    folder = write_world(tmp_path / "export")
    responder = InFlight(lambda r: error_reply(500, "api_error", headers={"retry-after-ms": "50"}), 0.1)
    with FakeMessagesAPI(default=responder) as fake:
        run = claude_cli(fake, folder, tmp_path / "out", "--concurrency", "6")
    limit = rtt.ClaudeAdvisor.MAX_CONSECUTIVE_FAILURES
    assert len(fake.requests) == limit * 3  # four calls, each 1 try + ANTHROPIC_MAX_RETRIES=2; then none
    assert len({r.raw for r in fake.requests}) == limit  # an SDK retry sends the same body again
    assert responder.peak <= limit
    assert f"{limit} calls in a row failed" in run.report()["llm_usage"]["unavailable"]
    assert [m["generator"] for m in run.messages] == ["template"] * len(MEMBERS)


class BackoffWindow(InFlight):
    """The first request gets a 529 asking for a long backoff; records the peak of requests held at once
    before that call's retry arrives."""

    def __init__(self, backoff_ms: int, seconds: float) -> None:
        super().__init__(smart, seconds)
        self.backoff_ms, self.first, self.retried = backoff_ms, True, False

    def __call__(self, request: RecordedRequest) -> Reply:
        with self.lock:
            first, self.first = self.first, False
            self.retried = self.retried or request.headers.get("x-stainless-retry-count") == "1"
            counted = not self.retried
        if first:
            return error_reply(529, "overloaded_error", headers={"retry-after-ms": str(self.backoff_ms)})
        if counted:
            return super().__call__(request)
        time.sleep(self.seconds)
        return smart(request)


def test_a_call_waiting_out_a_529_backoff_does_not_hold_up_the_others(tmp_path):
    """While one call waits out the SDK's retry backoff, four other calls are on the wire at once
    (it used to keep its slot, so three): a transient failure does not serialise the run."""
    folder = write_world(tmp_path / "export")
    window = BackoffWindow(backoff_ms=1500, seconds=0.25)
    with FakeMessagesAPI(default=window) as fake:
        run = claude_cli(fake, folder, tmp_path / "out", "--concurrency", "6")
    assert run.code == 0, run.err
    assert window.retried  # the first call was retried by the SDK, after the others had run
    assert window.peak == rtt.ClaudeAdvisor.MAX_CONSECUTIVE_FAILURES
    assert {m["matcher"] for m in run.matches} == {"claude"}
    assert len(fake.requests) == 2 * len(MEMBERS) + 1


def test_a_call_whose_time_runs_out_during_the_backoff_sends_nothing_more(tmp_path):
    folder = write_world(tmp_path / "export")
    with FakeMessagesAPI(default=smart) as fake:
        fake.queue(error_reply(529, "overloaded_error", headers={"retry-after-ms": "2500"}))
        started = time.monotonic()
        run = claude_cli(fake, folder, tmp_path / "out", "--limit", "1", env={"ANTHROPIC_TIMEOUT": "1"})
        assert time.monotonic() - started < 2.4  # the member did not wait for the backoff
        time.sleep(max(0.0, started + 3.0 - time.monotonic()))  # the SDK's worker has woken by now
    assert len(fake.requests) == 1  # no retry after the time bound, and no writing call
    assert "no answer in time" in run.report()["llm_usage"]["unavailable"]
    assert (run.matches[0]["matcher"], run.messages[0]["generator"]) == ("rules", "template")


LONG_ANSWER = "I would go with the wine tasting because " + "it is really lovely and " * 420  # ~10,000 chars


@pytest.mark.parametrize("step", ["matching", "writing"])
def test_the_corrective_retry_quotes_only_a_bounded_excerpt_of_a_long_bad_answer(tmp_path, step):
    assert len(LONG_ANSWER) >= 10_000
    folder = write_world(tmp_path / "export")
    with FakeMessagesAPI(default=smart) as fake:
        fake.queue(*([smart] if step == "writing" else []), text_reply(LONG_ANSWER))
        claude_cli(fake, folder, tmp_path / "out", "--limit", "1")
    retry = [r for r in fake.requests if is_matching(r) == (step == "matching")][1]
    assistant = retry.body["messages"][1]
    assert assistant["role"] == "assistant"
    quoted = assistant["content"]
    assert len(quoted) <= rtt.ClaudeAdvisor.MAX_QUOTED_ANSWER + 10
    assert quoted.startswith(LONG_ANSWER[:rtt.ClaudeAdvisor.MAX_QUOTED_ANSWER])
    assert len(retry.raw) < len(fake.requests[0].raw) + rtt.ClaudeAdvisor.MAX_QUOTED_ANSWER + 1000


# =============================================================================================
# 8. Progress saving is bounded
# =============================================================================================


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> Counter[Path]:
    """Count calls of ``rtt.<name>(path, ...)`` per path, still doing the real work."""
    real = getattr(rtt, name)
    counts: Counter[Path] = Counter()

    def counted(path: Path, *args: Any, **kwargs: Any) -> None:
        counts[Path(path)] += 1
        real(path, *args, **kwargs)

    monkeypatch.setattr(rtt, name, counted)
    return counts


def test_processed_files_are_written_a_few_times_not_once_per_member(run_cli, tmp_path, monkeypatch):
    counts = count_calls(monkeypatch, "write_json")
    run = run_cli("--demo", "--now", NOW_ISO, "--limit", "50", "--dry-run", complete=True)
    assert run.code == 0, run.err
    processed = run.path("data/processed")
    assert 1 <= counts[processed / "matches.json"] <= 3, counts
    assert 1 <= counts[processed / "messages.json"] <= 3, counts
    summary = run.report()["summary"]
    assert summary["total_matches_created"] >= 40
    assert [m["user_id"] for m in run.matches] == [m["user_id"] for m in run.report()["matches"]]
    assert len(run.messages) == summary["total_messages_generated"]


def test_the_local_mirror_is_written_a_bounded_number_of_times_and_ends_complete(run_cli, tmp_path, monkeypatch):
    counts = count_calls(monkeypatch, "atomic_write")
    run = run_cli("--demo", "--now", NOW_ISO, "--limit", "50", complete=True)
    assert run.code == 0, run.err
    mirror = tmp_path / "out" / "data" / "firebase" / rtt.DEFAULT_BASE_PATH
    assert 1 <= counts[mirror / "matches.json"] <= 3, counts
    assert 1 <= counts[mirror / "messages.json"] <= 3, counts
    summary = run.report()["summary"]
    for name, total in (("matches", summary["total_matches_created"]),
                        ("messages", summary["total_messages_generated"])):
        stored = run.load(f"data/firebase/{rtt.DEFAULT_BASE_PATH}/{name}.json")
        assert stored["count"] == len(stored[name]) == total >= 40


def test_the_local_mirror_holds_writes_in_memory_until_a_checkpoint_is_due_or_a_flush(tmp_path):
    mirror = rtt.LocalMirrorTransport(tmp_path, "Leo", save_every=3600)
    file = tmp_path / "Leo" / "matches.json"
    assert mirror.put("matches", {"matches": [{"user_id": "u-1"}], "count": 1}).ok
    assert not file.exists()
    assert mirror.get("matches")[0]["count"] == 1  # read back from memory
    mirror.flush()
    assert json.loads(file.read_text(encoding="utf-8"))["count"] == 1

    eager = rtt.LocalMirrorTransport(tmp_path, "Eager", save_every=0.0)
    eager.put("matches", {"matches": [], "count": 0})
    assert (tmp_path / "Eager" / "matches.json").is_file()


# =============================================================================================
# 9. RunControl and bounded_call
# =============================================================================================


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_budget_is_cut_at_the_deadline_then_grace_seconds_after_it():
    clock = FakeClock()
    control = rtt.RunControl(deadline_seconds=60, clock=clock)
    assert control.budget(30) == 30 and control.status == "completed" and not control.stopping
    clock.t += 50
    assert control.budget(30) == pytest.approx(10)
    clock.t += 10  # at the deadline
    assert control.status == "deadline" and control.stopping
    assert control.budget(30) == pytest.approx(rtt.GRACE_SECONDS)
    clock.t += rtt.GRACE_SECONDS / 2
    assert control.budget(30) == pytest.approx(rtt.GRACE_SECONDS / 2)
    clock.t += rtt.GRACE_SECONDS
    assert control.budget(30) == 0


def test_after_a_stop_budget_is_at_most_grace_seconds_and_status_is_interrupted():
    clock = FakeClock()
    control = rtt.RunControl(clock=clock)
    assert control.budget(300) == 300 and control.status == "completed"
    control.request_stop(signal.SIGTERM)
    assert control.status == "interrupted" and control.stopping and control.signal == signal.SIGTERM
    assert control.budget(300) == pytest.approx(rtt.GRACE_SECONDS)
    assert control.budget(3) == 3  # a shorter wish stays as it is
    clock.t += 4
    assert control.budget(300) == pytest.approx(rtt.GRACE_SECONDS - 4)
    clock.t += 100
    assert control.budget(300) == 0


def test_a_stop_before_the_deadline_is_interrupted_not_deadline():
    clock = FakeClock()
    control = rtt.RunControl(deadline_seconds=60, clock=clock)
    control.request_stop(signal.SIGINT)
    clock.t += 120
    assert control.status == "interrupted"
    assert control.budget(30) == 0


@pytest.fixture
def release() -> Any:
    """An event that lets the abandoned calls' threads end when the test is over."""
    done = threading.Event()
    yield done
    done.set()


def test_bounded_call_raises_service_timeout_for_a_call_past_its_bound(release):
    started = time.monotonic()
    with pytest.raises(rtt.ServiceTimeout, match="Slow"):
        rtt.bounded_call(lambda: release.wait(5), 0.2, "Slow")
    assert time.monotonic() - started < 1.0


def test_bounded_call_with_no_budget_left_does_not_wait(release):
    started = time.monotonic()
    with pytest.raises(rtt.ServiceTimeout):
        rtt.bounded_call(lambda: release.wait(5), 0.0, "Late")
    assert time.monotonic() - started < 0.5


def test_bounded_call_returns_the_value_and_re_raises_the_exception():
    assert rtt.bounded_call(lambda: {"ok": 42}, 2, "Fast") == {"ok": 42}
    assert rtt.bounded_call(lambda: None, 2, "Fast") is None

    def boom() -> None:
        raise ValueError("bad answer")

    with pytest.raises(ValueError, match="bad answer"):
        rtt.bounded_call(boom, 2, "Fast")


# =============================================================================================
# 10. Out of memory anywhere: one line, exit 1, the lock released; helpers never hold a run
# =============================================================================================


def out_of_memory(*_args: Any, **_kwargs: Any) -> Any:
    raise MemoryError


def assert_out_of_memory(run: CliRun) -> None:
    assert_one_error_line(run, rtt.ExitCode.FAILURE)
    assert "out of memory" in run.err
    with rtt.run_lock(run.root):  # released: the next run may take it
        pass


def test_worker_raises_its_threads_exception_in_the_waiting_thread_memory_error_included(release):
    with pytest.raises(MemoryError):
        rtt.Worker(out_of_memory, "helper").wait(2, "helper")
    assert rtt.Worker(lambda: 7, "helper").wait(math.inf, "helper") == 7
    started = time.monotonic()
    with pytest.raises(rtt.ServiceTimeout, match="helper"):
        rtt.Worker(lambda: release.wait(5), "helper").wait(0.2, "helper")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("error", [MemoryError(), SystemError("error return without exception set"),
                                   RuntimeError("can't start new thread"), OSError(errno.ENOMEM, "no memory"),
                                   ImportError("x.so: failed to map segment from shared object")],
                         ids=["MemoryError", "frame", "thread", "ENOMEM", "mapped-module"])
def test_every_form_of_out_of_memory_is_recognised(error):
    assert rtt.out_of_memory(error)


def test_a_librarys_own_out_of_memory_exception_is_recognised():  # DuckDB's, for a read through an engine
    class OutOfMemoryException(Exception):
        pass

    assert rtt.out_of_memory(OutOfMemoryException("could not allocate block of 262144 bytes"))


@pytest.mark.parametrize("error", [SystemError("a bug"), RuntimeError("a bug"), OSError(errno.ENOSPC, "full"),
                                   ImportError("no module"), ValueError("no")])
def test_other_errors_are_not_taken_for_out_of_memory(error):
    assert not rtt.out_of_memory(error)


def test_helpers_are_waited_for_until_the_deadline_and_a_signal_does_not_cut_that_wait():
    clock = FakeClock()
    control = rtt.RunControl(deadline_seconds=60, clock=clock)
    control.request_stop(signal.SIGTERM)  # the read goes on: the report still needs it
    assert control.until_deadline() == 60 and control.budget(300) == pytest.approx(rtt.GRACE_SECONDS)
    clock.t += 70
    assert control.until_deadline() == 0
    assert rtt.RunControl().until_deadline() == math.inf


SLOW_QUERY = "SELECT sum(hash(range)) FROM range(6000000000);"  # half a minute or more on this machine


def test_a_folder_read_by_the_engine_is_interrupted_at_the_deadline_in_one_line_exit_1(
        run_cli, world_folder, monkeypatch):
    monkeypatch.setattr(rtt, "ENGINE_ACTIVITY", SLOW_QUERY + rtt.ENGINE_ACTIVITY)  # step 1's counting made slow
    began = time.monotonic()
    run = run_cli("--source", str(world_folder), "--now", NOW_ISO, "--llm", "off", "--dry-run",
                  "--deadline-minutes", "0.02")  # 1.2 s
    assert time.monotonic() - began < 8
    assert run.code == rtt.ExitCode.FAILURE, run.err  # (not the literal read taking over past the deadline)
    [line] = run.err.splitlines()
    assert "--deadline-minutes" in line and str(world_folder) in line


def test_the_consent_read_by_the_engine_is_interrupted_at_the_deadline(world_folder, monkeypatch):
    slow = SLOW_QUERY.replace(") FROM", ") AS s FROM").rstrip(";")
    monkeypatch.setattr(rtt, "engine_records", lambda path: f"""(SELECT 1 AS n, '{{"smsOptOut": ' || s || '}}' AS doc FROM ({slow}))""")
    began = time.monotonic()
    with pytest.raises(rtt.ServiceTimeout, match="--deadline-minutes"):
        rtt.engine_consent_texts(world_folder / "users.json", ["smsOptOut"], limit=lambda: 0.0)
    assert time.monotonic() - began < 8


def test_the_engine_watch_interrupts_queries_started_after_its_limit_and_between_batches():
    import duckdb

    with contextlib.closing(duckdb.connect()) as db:
        watch = rtt.EngineWatch(db, lambda: 0.0)
        time.sleep(2 * watch.POLL)  # (an interrupt with nothing running is lost: the watch keeps polling)
        with pytest.raises(duckdb.InterruptException):
            db.execute(SLOW_QUERY).fetchall()
        with pytest.raises(duckdb.InterruptException):
            watch.check()
        watch.close()
        assert db.execute("SELECT 1").fetchall() == [(1,)]


def test_out_of_memory_in_the_main_thread_is_one_line_exit_1_and_the_lock_released(
        run_cli, world_folder, monkeypatch):
    monkeypatch.setattr(rtt, "find_dormant_users", out_of_memory)
    assert_out_of_memory(run_cli("--source", str(world_folder), "--now", NOW_ISO, "--llm", "off"))


def test_out_of_memory_in_a_members_thread_ends_the_run_not_only_the_member(run_cli, world_folder, monkeypatch):
    monkeypatch.setattr(rtt, "write_template_sms", out_of_memory)
    assert_out_of_memory(run_cli("--source", str(world_folder), "--now", NOW_ISO, "--llm", "off"))


def test_out_of_memory_in_measure_is_one_line_exit_1(run_cli, world_folder, monkeypatch):
    monkeypatch.setattr(rtt, "read_campaigns", out_of_memory)
    run = run_cli("measure", "--source", str(world_folder), "--now", NOW_ISO)
    assert_one_error_line(run, rtt.ExitCode.FAILURE)
    assert "out of memory" in run.err
