"""Benchmark: how long the template writer takes for one member as the event name grows.

Run by hand (not a test): ``python bench/bench_template.py`` (``--smoke``: one run each, for CI). It prints the median wall time of
``write_template_sms`` for event names of 100, 1,000 and 10,000 characters, each call on a name it
has not seen before (nothing cached from an earlier run), plus the same for a name whose only
usable part comes before a web address.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import return_to_table as rtt

LENGTHS = (100, 1_000, 10_000)
RUNS = 7
WORDS = "Natural Wine Tasting with Orange Pours from Finger Lakes Producers and Friends "


def name_of(length: int, run: int, tail: str = "") -> str:
    """A realistic name of exactly ``length`` characters, unique per run (so no cache helps)."""
    body = (f"Run{run} " + WORDS * (length // len(WORDS) + 1))[: length - len(tail)]
    return body + tail


def facts_for(name: str) -> rtt.MessageFacts:
    return rtt.MessageFacts(first_name="Maya", event_id="6600000000000000000000f1", event_name=name,
                            interests=("wine", "food"), when="Sat 7:30pm", spots_left=3, going=9,
                            neighbourhood="west-village")


def median_ms(length: int, tail: str = "") -> float:
    seconds = []
    for run in range(RUNS):
        facts = facts_for(name_of(length, run, tail))
        start = time.perf_counter()
        text = rtt.write_template_sms(facts)
        seconds.append(time.perf_counter() - start)
        assert text is not None and rtt.validate_sms(text, facts) == [], text
    return statistics.median(seconds) * 1000


def main() -> None:
    global RUNS, LENGTHS
    if "--smoke" in sys.argv[1:]:  # seconds, for CI
        RUNS, LENGTHS = 1, LENGTHS[:2]
    print(f"write_template_sms, median of {RUNS} runs (Python {sys.version.split()[0]})")
    for length in LENGTHS:
        print(f"  name of {length:>6,} characters: {median_ms(length):7.2f} ms")
    for length in LENGTHS:
        print(f"  name of {length:>6,} characters ending in a domain: {median_ms(length, ' at evil-login.ru'):7.2f} ms")


if __name__ == "__main__":
    main()
