"""Benchmark: how long ``backtest`` takes on a year of the Montana sample (the target: well under a minute).

Run by hand (not a test): ``python bench/bench_backtest.py [REPEAT]``; ``--smoke`` (CI): once, on two months. It runs
``backtest --source samples/meetup_montana --from 2015-06-01 --to 2016-05-01 --every-days 14 --window-days 30``
as a real process REPEAT times (3 by default) and prints the wall time of each, the median, and the
pooled hit@1 row of the last run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["backtest", "--source", str(ROOT / "samples" / "meetup_montana"), "--from", "2015-06-01",
        "--to", "2016-05-01", "--every-days", "14", "--window-days", "30"]


def main() -> None:
    global ARGS
    smoke = "--smoke" in sys.argv[1:]
    numbers = [a for a in sys.argv[1:] if a != "--smoke"]
    repeat = 1 if smoke else int(numbers[0]) if numbers else 3
    if smoke:  # seconds, for CI: the same command on two months
        ARGS = [*ARGS[:ARGS.index("--to") + 1], "2015-08-01", *ARGS[ARGS.index("--to") + 2:]]
    seconds, pooled = [], {}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "return_to_table.py"), *ARGS, "--out", out], check=True,
                           capture_output=True)
            seconds.append(time.perf_counter() - start)
            [path] = Path(out, "reports").glob("*.json")
            pooled = json.loads(path.read_text(encoding="utf-8"))["pooled"]
    print("wall s:", ", ".join(f"{s:.2f}" for s in seconds), f"(median {statistics.median(seconds):.2f})")
    print("pooled hit@1:", {k: v for k, v in pooled["hit_at_1"].items()}, "oracle:", pooled["oracle"])


if __name__ == "__main__":
    main()
