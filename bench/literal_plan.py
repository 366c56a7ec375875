"""The plan read literally, as the yardstick for bench/bench_scale.py (not used by the campaign).

``python bench/literal_plan.py DIR --now ISO --out OUT`` (``--smoke``: on a 50-member world, for CI): ``bson.json_util`` loads both files whole, then
steps 1 and 2 loop as the plan's "Exact Pattern" code does (a user -> events map, each member's count and
latest date, engagement, profile, score, ``_convert_objectid``), and it writes what the plan persists:
``data/raw/`` (``json_util.dumps``), ``dormant_users.json`` and ``future_events.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bson import ObjectId, json_util

REQUIRED = ["firstName", "lastName", "email", "phone", "gender", "interests", "occupation", "homeNeighborhood"]


def parse_iso_date(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, str):
            moment = datetime.fromisoformat(value)
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except ValueError:  # the plan catches everything; a bad string is the only failure here
        return None
    return None


def convert_objectid(obj: Any) -> Any:
    if isinstance(obj, ObjectId):
        return str(obj)
    if isinstance(obj, dict):
        return {k: convert_objectid(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [convert_objectid(item) for item in obj]
    return obj


def engagement(last: datetime | None, now: datetime) -> tuple[int, str]:
    days = (now - last).days if last else 9999
    if days <= 30:
        return days, "active"
    if days <= 90:
        return days, "dormant"
    return days, "churned" if days != 9999 else "new"


def score(user: dict[str, Any]) -> float:
    completeness = min(40, sum(1 for f in REQUIRED if user.get(f)) * 5)
    days = user["days_inactive"]
    dormancy = 10 + ((days - 31) / 59) * 20 if 31 <= days <= 90 else 0
    n = user["eventCount"]
    history = 30 if n >= 20 else 25 if n >= 15 else 20 if n >= 10 else 15 if n >= 5 else 10 if n >= 1 else 0
    return completeness + dormancy + history


def read(path: Path) -> list[dict[str, Any]]:
    """A JSON array whole, or JSON Lines line by line, through ``bson.json_util``."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json_util.loads(text)
    return [json_util.loads(line) for line in text.split("\n") if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--now")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI: a 50-member world, all temporary")
    args = parser.parse_args()
    if args.smoke:
        from make_world import NOW, make_world

        scratch = Path(tempfile.mkdtemp(prefix="rtt-smoke-"))
        args.folder, args.out = make_world(scratch / "world", 50), scratch / "out"
        args.now = NOW.isoformat()
    elif args.folder is None or args.now is None or args.out is None:
        parser.error("FOLDER, --now and --out are required (or --smoke)")
    now = datetime.fromisoformat(args.now)
    users, events = read(args.folder / "users.json"), read(args.folder / "events.json")
    (args.out / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (args.out / "data" / "processed").mkdir(parents=True, exist_ok=True)
    for name, docs in (("users", users), ("events", events)):
        (args.out / "data" / "raw" / f"{name}.json").write_text(json_util.dumps(docs), encoding="utf-8")
    user_event_map: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        participants = [str(p) for p in event.get("participants", []) or []]
        owner_id = str(event.get("ownerId", ""))
        for uid in set([owner_id] + participants):
            if uid and uid != "None":
                user_event_map.setdefault(uid, []).append(event)
    dormant = []
    for user in users:
        user_id = str(user.get("_id", ""))
        user_events = user_event_map.get(user_id, [])
        dates = [d for d in (parse_iso_date(e.get("startDate")) for e in user_events) if d]
        days, status = engagement(max(dates) if dates else None, now)
        if status != "dormant" or sum(1 for f in REQUIRED if user.get(f)) < 4:
            continue
        enriched = convert_objectid(user) | {"eventCount": len(user_events), "days_inactive": days,
                                             "engagement_status": status}
        enriched["reactivation_score"] = score(enriched)
        dormant.append(enriched)
    dormant.sort(key=lambda u: -u["reactivation_score"])
    future = []
    for event in events:
        start = parse_iso_date(event.get("startDate"))
        if start and start > now and event.get("type") == "public" and event.get("active") is True:
            enriched = convert_objectid(event)
            count = len(event.get("participants") or [])
            cap = event.get("maxParticipants") or 0
            enriched["participationPercentage"] = count / cap * 100 if isinstance(cap, (int, float)) and cap else 0
            future.append(enriched)
    future.sort(key=lambda e: -e["participationPercentage"])
    for name, value in (("dormant_users", dormant), ("future_events", future)):
        with (args.out / "data" / "processed" / f"{name}.json").open("w", encoding="utf-8") as out:
            json.dump(value, out, indent=2, default=str)
    if args.smoke:
        shutil.rmtree(args.out.parent)


if __name__ == "__main__":
    main()
