"""Benchmark: how long a whole campaign takes, and what it sends to Firebase.

Run by hand (not a test): ``python bench/bench_campaign.py`` (``--smoke``: each run once, for CI). It prints
1. the wall time of ``--demo`` (rules, template, local mirror) and of the real Montana Meetup data,
2. the bytes a 10-member campaign sends to a Realtime Database (the fake REST server in
   ``tests/fake_rtdb.py`` on 127.0.0.1), per path, against re-sending whole arrays per item.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_rtdb import FakeRealtimeDatabase

import return_to_table as rtt

MONTANA = ROOT / "samples" / "meetup_montana"
MONTANA_NOW = "2016-06-03T00:00:00Z"


def timed_run(args: list[str], env: dict[str, str], repeat: int) -> tuple[list[float], dict]:
    seconds, report = [], {}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            code = rtt.main([*args, "--out", out], env=env)
            seconds.append(time.perf_counter() - start)
            assert code == 0, code
            [path] = Path(out, "reports").glob("*.json")
            report = json.loads(path.read_text(encoding="utf-8"))
    return seconds, report


def quiet() -> None:
    """Campaign logging goes to its files; the console would drown the table."""
    import logging

    logging.getLogger("ReturnToTable").disabled = True


def main() -> None:
    quiet()
    repeat = 1 if "--smoke" in sys.argv[1:] else 5  # --smoke: seconds, for CI
    print("| run | median s | min s | dormant | ready | matched | messages | segments |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = [("--demo", ["--demo"], repeat)]
    if MONTANA.is_dir():
        runs.append(("Montana (real data)", ["--source", str(MONTANA), "--now", MONTANA_NOW, "--dry-run"], repeat))
    for label, args, repeat in runs:
        seconds, report = timed_run(args, {}, repeat)
        s = report["summary"]
        print(f"| {label} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | "
              f"{s['total_dormant_users_found']} | {s['total_users_with_complete_profiles']} | "
              f"{s['total_matches_created']} | {s['total_messages_generated']} | {s['total_sms_segments']} |")

    if not MONTANA.is_dir():
        return
    with FakeRealtimeDatabase(auth_token="bench-secret") as db:
        env = {"FIREBASE_DATABASE_URL": db.url, "FIREBASE_AUTH_TOKEN": "bench-secret",  # a live run: compliance set
               "SMS_SENDER": "Cuculi", "SMS_OPT_OUT_TEXT": "Reply STOP to opt out"}
        _, report = timed_run(["--source", str(MONTANA), "--now", MONTANA_NOW, "--limit", "10"], env, 1)
        sent: dict[str, int] = defaultdict(int)
        for request in db.requests:
            parts = request.path.strip("/").removesuffix(".json").split("/")
            key = "/".join(parts[1:3]) if parts[1:2] != ["campaigns"] else "campaigns/<id>/" + "/".join(parts[3:4])
            sent[f"{request.method} {key}"] += len(request.body)
        print(f"\nFirebase, 10-member campaign: {report['firebase']['bytes_sent']:,} bytes in "
              f"{len(db.requests)} requests")
        print("| request | bytes |")
        print("| --- | --- |")
        for key, size in sorted(sent.items(), key=lambda kv: -kv[1]):
            if size:
                print(f"| {key} | {size:,} |")
        for name in ("matches", "messages"):
            items = db.get_rendered(f"Leo/{name}")[name]
            sizes = [len(json.dumps(item).encode()) for item in items]
            whole = sum(sum(sizes[: i + 1]) for i in range(len(sizes)))
            print(f"{name}: {len(items)} items, {sum(sizes):,} bytes as an array; re-sending the whole "
                  f"array for every item would send {whole:,}")


if __name__ == "__main__":
    main()
