"""Fixtures: an isolated environment, a fixed clock, the small hand-built world, a CLI runner."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from builders import NOW, CliRun, run_main, small_world, write_folder

import return_to_table as rtt

PROXY_VARIABLES = tuple(
    name for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY") for name in (proxy, proxy.lower())
)
ISOLATED_VARIABLES = (
    "MONGO_URI", "MONGO_USERNAME", "MONGO_PASSWORD", "MONGO_HOST", "MONGO_DB_NAME",
    "FIREBASE_DATABASE_URL", "FIREBASE_BASE_PATH", "FIREBASE_AUTH_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
    "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL",
    "ANTHROPIC_MATCH_MODEL", "ANTHROPIC_WRITE_MODEL", "ANTHROPIC_MAX_RETRIES", "ANTHROPIC_TIMEOUT",
    "ANTHROPIC_EFFORT", "ANTHROPIC_PRICES", "CAMPAIGN_TIMEZONE", "FIREBASE_TIMEOUT", "NEIGHBOURHOODS_CSV",
    "QUIET_HOURS", "SMS_SENDER", "SMS_OPT_OUT_TEXT", "SMS_DEFAULT_REGION", "SMS_OPT_OUT_FIELDS",
    "SMS_CONSENT_FIELDS", "SMS_SEGMENT_PRICE", "MATCH_WEIGHTS", "RANK_BY",
    *PROXY_VARIABLES,  # the fakes listen on 127.0.0.1: no proxy may sit in between
)


RAM_DISK = Path("/dev/shm")


def pytest_configure(config: pytest.Config) -> None:
    """``tmp_path`` on the RAM disk where there is one with room: the runs' atomic writes fsync some seven
    thousand times a suite (4 ms each on this machine's disk, nothing there). ``TMPDIR``, ``--basetemp`` or
    ``PYTEST_DEBUG_TEMPROOT`` set by hand win; pytest keeps the last three runs' folders, as under /tmp."""
    if os.environ.get("TMPDIR") or os.environ.get("PYTEST_DEBUG_TEMPROOT") or config.option.basetemp:
        return
    try:
        room = os.statvfs(RAM_DISK)
    except OSError:
        return
    if os.access(RAM_DISK, os.W_OK) and room.f_bavail * room.f_frsize >= 2 << 30:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(RAM_DISK)


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer setting, proxy or ``.env`` leaks into a test (the only copy of this isolation)."""
    for name in ISOLATED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(rtt, "DOTENV_PATH", tmp_path / "no-such-folder" / ".env")


@pytest.fixture
def now() -> datetime:
    return NOW


@pytest.fixture
def zone() -> ZoneInfo:
    return ZoneInfo("America/New_York")


@pytest.fixture(scope="session")
def hoods() -> rtt.NeighbourhoodMap:
    return rtt.NeighbourhoodMap.from_csv(rtt.CENTROIDS_CSV)


@pytest.fixture
def world() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return copy.deepcopy(small_world())


@pytest.fixture
def world_folder(tmp_path: Path, world: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> Path:
    """The small world as a ``mongoexport --jsonArray`` folder (relaxed Extended JSON)."""
    return write_folder(tmp_path / "export", *world)


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliRun]:
    """``run_cli(*args, env=..., root=..., **options)``: ``builders.run_main`` into ``tmp_path/out`` by default.

    ``options`` are ``run_main``'s (``complete``, ``real_environment``, ``mongo_client``).
    """

    def run(*argv: str, env: dict[str, str] | None = None, root: Path | None = None, **kwargs: Any) -> CliRun:
        return run_main(argv, root or tmp_path / "out", env, **kwargs)

    return run
