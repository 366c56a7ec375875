"""Try matcher weights on history before changing them: the backtest's lead over the best baseline,
per range, for each set of weights given (``NAME=VALUE,...``, names from ``rtt.WEIGHT_NAMES``; empty string =
the weights as shipped). Each set is one ``MatchWeights`` passed to the backtest; nothing in the module changes.

    python bench/tune_weights.py "" "W_WEEKDAY=0.5" "W_PLACE=3,FAR_HALVING_DAYS=28"

Run by hand (about 30 s per set on the Montana sample); nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import return_to_table as rtt

RANGES = (("2012-01-01", "2013-01-01"), ("2013-01-01", "2014-01-01"), ("2014-01-01", "2015-01-01"),
          ("2015-06-01", "2016-05-01"), ("2016-01-01", "2017-01-01"))
BASELINES = ("soonest", "soonest_nearby", "host_next")


def day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def leads(history: rtt.History, hoods: rtt.NeighbourhoodMap, weights: rtt.MatchWeights) -> list[float]:
    """Pooled hit@1 of the rules (scoring with ``weights``) minus the best baseline's, in points, for each range."""
    found = []
    for start, end in RANGES:
        days = rtt.as_of_dates(day(start), day(end), 14)
        trials = [t for _, _, ts in rtt.run_backtest(history, days, 30, hoods, weights=weights) for t in ts]
        rate = {name: sum(t.hits[name] for t in trials) / len(trials) for name in ("rules", *BASELINES)}
        found.append(100 * (rate["rules"] - max(rate[name] for name in BASELINES)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=[""], help="NAME=VALUE,... (module constants of the matcher)")
    parser.add_argument("--source", type=Path, default=ROOT / "samples" / "meetup_montana")
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI: the shipped weights on two months")
    args = parser.parse_args()
    if args.smoke:
        global RANGES
        RANGES = (("2015-06-01", "2015-08-01"),)
        args.specs = [""]
    screened = rtt.read_screened(rtt.FolderSource(args.source))
    history = rtt.build_history(screened.users, screened.events, rtt.DataIssues())
    hoods = rtt.NeighbourhoodMap.from_csv(rtt.CENTROIDS_CSV)
    print("weights".ljust(40), *(f"{start[:7]}+".rjust(9) for start, _ in RANGES))
    for spec in args.specs:
        print((spec or "as shipped").ljust(40), *(f"{lead:+9.1f}" for lead in leads(history, hoods, weights_of(spec))))


def weights_of(spec: str) -> rtt.MatchWeights:
    """``NAME=VALUE,...`` as weights, checked as ``MATCH_WEIGHTS`` checks a file (names left out: built-in)."""
    pairs = dict(pair.split("=", 1) for pair in filter(None, spec.split(",")))
    try:
        return rtt.MatchWeights(rtt.checked_weights({k: float(v) for k, v in pairs.items()}, spec), spec or "built-in")
    except (ValueError, rtt.UsageError) as exc:
        raise SystemExit(f"tune_weights: {exc}") from None


if __name__ == "__main__":
    main()
