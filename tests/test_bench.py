"""Every script in bench/ runs in its smoke mode (``--smoke``: tiny sizes, seconds), so none rots unseen.

Marked ``bench``: the default test run leaves them out (pytest.ini); CI runs them with ``pytest -m bench``
(``.ci/run``). Each is a real process, as it is run by hand, and must exit 0 within a minute.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py"))


def test_every_bench_script_is_listed():
    assert len(SCRIPTS) >= 9 and "bench_llm.py" in SCRIPTS


@pytest.mark.bench
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_bench_script_runs_in_its_smoke_mode(script: str, tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], cwd=BENCH.parent, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
