"""Settings and flags that could make a run write where or when it must not: the database base path
on disk, and a --now in the future without --dry-run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import return_to_table as rtt


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("base_path", ["../../x", "..", "Leo/../..", "./Leo", "~", "Leo/a.b", "Leo/$x", "Le o",
                                       "Leo//x"])
def test_a_base_path_that_is_not_plain_database_segments_exits_2_and_writes_nothing_outside_out(
        run_cli, tmp_path, base_path):
    before = files_under(tmp_path)
    run = run_cli("--demo", env={"FIREBASE_BASE_PATH": base_path})
    assert run.code == rtt.EXIT_USAGE
    assert run.err.startswith("error: FIREBASE_BASE_PATH=") and run.err.count("\n") == 1
    assert files_under(tmp_path) - before <= files_under(run.root)  # nothing new outside --out


@pytest.mark.parametrize("base_path, stored", [("Leo", "Leo"), ("/Staging/", "Staging"), ("team-a/Leo_2", "team-a/Leo_2")])
def test_a_plain_base_path_is_used_as_given(base_path, stored):
    assert rtt.Settings.from_env({"FIREBASE_BASE_PATH": base_path}).firebase_base_path == stored


@pytest.mark.parametrize("ahead", [timedelta(days=2), timedelta(days=400), timedelta(days=365 * 50)])
def test_a_campaign_more_than_a_day_ahead_must_be_a_dry_run(run_cli, ahead):
    later = (datetime.now(UTC) + ahead).strftime("%Y-%m-%dT%H:%M:%SZ")
    run = run_cli("--demo", "--now", later)
    assert run.code == rtt.EXIT_USAGE
    assert "--dry-run" in run.err and run.err.count("\n") == 1
    assert not (run.root / "data" / "firebase").exists()


def test_a_rehearsal_in_the_future_runs_with_dry_run(run_cli):
    later = (datetime.now(UTC) + timedelta(days=400)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert run_cli("--demo", "--now", later, "--dry-run").code == rtt.EXIT_OK


def test_a_campaign_within_a_day_ahead_is_an_ordinary_run(run_cli):
    soon = (datetime.now(UTC) + timedelta(hours=20)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert run_cli("--demo", "--now", soon).code == rtt.EXIT_OK
