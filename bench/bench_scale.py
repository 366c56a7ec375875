"""Benchmark: the plan read literally against the tool, on the same generated files, side by side.

Run by hand (not a test)::

    python bench/bench_scale.py --sizes 100000,1000000 [--shapes current,lines,canonical,mixed] [--limit 1000]
    python bench/bench_scale.py --smoke     # seconds, for CI: 300 members, a fresh world, --limit 5

For each size it generates a world once (``bench/make_world.py``: members, 30% as many events, the
messy forms; cached under ``--worlds``), then runs, each in its own process, ``bench/literal_plan.py``
(``bson.json_util`` loads both files, then the plan's loops) and ``return_to_table.py --source DIR
--llm off --dry-run`` (and, with ``--limit``, once more with that ``--limit``), and prints wall time
and peak memory (the child's ``ru_maxrss`` from ``os.wait4``; for the tool also its whole process tree at
once, sampled every 20 ms) as a Markdown table; the memory ratio is the tool's whole tree against the
literal reading. World shapes: ``current`` (``make_world``'s JSON array), ``lines`` (JSON Lines),
``canonical`` (canonical Extended JSON) and ``mixed`` (``make_world --mixed``: issue 21's shape).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

from make_world import NOW, make_world

NOW_ISO = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")


def tree_rss(root: int) -> int:
    """Resident kB of a process and all its descendants now (``/proc``; 0 once it is gone)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[int(entry.name)] = next((int(line.split()[1]) for line in status.splitlines()
                                     if line.startswith("VmRSS:")), 0)
    tree, grown = {root}, True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    return sum(rss.get(pid, 0) for pid in tree)


def measured(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak resident memory (MB) of one child process (``ru_maxrss``: its own, or its largest
    descendant's), and the peak of its whole process tree at once (sampled every 20 ms); it must exit 0."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                             env={k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "ANTHROPIC"))})
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], tree_rss(child.pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode not in (0, 3):
        raise SystemExit(f"{command[1]} exited {child.returncode}: {child.stderr.read().decode()[-400:]}")
    child.stderr.close()
    return seconds, usage.ru_maxrss / 1024, max(peak[0], usage.ru_maxrss) / 1024


SHAPES = {"current": {}, "lines": {"lines": True}, "canonical": {"canonical": True}, "mixed": {"mixed": True}}


def world(folder: Path, members: int, shape: str) -> Path:
    path = folder / f"w{members}{'' if shape == 'current' else '-' + shape}"
    if not (path / "events.json").is_file():
        make_world(path, members, **SHAPES[shape])
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--worlds", type=Path, default=Path(tempfile.gettempdir()) / "rtt-worlds")
    parser.add_argument("--shapes", default="current", help=f"world shapes, comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--limit", type=int, help="also time the tool with this --limit")
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI: 300 members, --limit 5")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.limit, args.worlds = "300", 5, Path(tempfile.mkdtemp(prefix="rtt-smoke-"))
    print(f"| members | events | shape | literal s | literal MB | tool s | tool MB | tool MB, all processes | time |"
          f" memory |{f' tool --limit {args.limit} s |' if args.limit else ''}")
    print(f"| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |{' --- |' if args.limit else ''}")
    for shape, members in ((s, int(n)) for s in args.shapes.split(",") for n in args.sizes.split(",")):
        folder = world(args.worlds, members, shape)
        with tempfile.TemporaryDirectory() as out:
            literal = measured([sys.executable, "bench/literal_plan.py", str(folder), "--now", NOW_ISO,
                                "--out", f"{out}/literal"])
            tool_args = [sys.executable, "return_to_table.py", "--source", str(folder), "--now", NOW_ISO,
                         "--llm", "off", "--dry-run", "-q"]
            tool = measured([*tool_args, "--out", f"{out}/tool"])
            limited = measured([*tool_args, "--limit", str(args.limit), "--out", f"{out}/limit"]) if args.limit else None
        row = (f"| {members:,} | {members * 3 // 10:,} | {shape} | {literal[0]:.1f} | "
               f"{literal[1]:,.0f} | {tool[0]:.1f} | {tool[1]:,.0f} | {tool[2]:,.0f} | {tool[0] / literal[0]:.2f}x | "
               f"{tool[2] / literal[1]:.0%} |")
        print(row + (f" {limited[0]:.1f} |" if limited else ""), flush=True)
    if args.smoke:
        shutil.rmtree(args.worlds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
