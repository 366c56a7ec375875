"""How many documents each MongoDB path brings into Python, on a generated world (mongomock).

Run by hand: ``python bench/mongo_counts.py --members 100000``. mongomock lacks $type, $trim, $convert and
$dateFromString, so the pipeline's normalising stages run in ``tests/mongo_expressions.py`` (counted as what
the server would hand over: the stage's output stays in the server). Counts, not times: mongomock is no server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import mongo_expressions
import mongomock
from make_world import NOW, World

import return_to_table as rtt


def load(members: int) -> mongomock.MongoClient:
    world = World(members, members * 3 // 10, canonical=False)
    decoder = rtt.ExtendedJsonDecoder()
    client = mongomock.MongoClient()
    for name, docs in (("user", world.users()), ("event", world.events_())):
        client["db"][name].insert_many([mongo_expressions.naive(decoder.loads(json.dumps(d))) for d in docs])
    return client


ORIGINAL_FIND = mongomock.collection.Collection.find
INSIDE = {"aggregate": False}  # the pipeline's own reads stay in the server


BY_ID: dict[str, dict[Any, Any]] = {}  # the server's _id index (mongomock scans the collection per $in value)


def by_id(collection: Any, values: list[Any]) -> list[Any]:
    if collection.name not in BY_ID:
        BY_ID[collection.name] = {doc["_id"]: doc for doc in ORIGINAL_FIND(collection)}
    index = BY_ID[collection.name]
    return [index[v] for v in dict.fromkeys(values) if v in index]


def counted_find(delivered: Counter[str]) -> Any:
    def find(self: Any, *args: Any, **kwargs: Any) -> Any:
        query = args[0] if args else {}
        if not INSIDE["aggregate"] and list(query) == ["_id"] and list(query["_id"]) == ["$in"]:
            docs = by_id(self, query["_id"]["$in"])
        else:
            docs = list(ORIGINAL_FIND(self, *args, **kwargs))
        if not INSIDE["aggregate"]:
            delivered[f"find {self.name}"] += len(docs)
        return iter(docs)

    return ORIGINAL_FIND, find


def aggregate(self: Any, pipeline: list[dict[str, Any]], session: Any = None, **options: Any) -> Any:
    INSIDE["aggregate"] = True
    try:
        return mongo_expressions.patched_aggregate(self, pipeline, session, **options)
    finally:
        INSIDE["aggregate"] = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI: 300 members")
    args = parser.parse_args()
    if args.smoke:
        args.members = 300
    client = load(args.members)
    original, find = counted_find(Counter())
    print(f"| path | documents into Python ({args.members:,} members, {args.members * 3 // 10:,} events) |")
    print("| --- | --- |")
    for label, pipeline in (("full read (read)", False), ("pipeline (read_dormant)", True)):
        delivered: Counter[str] = Counter()
        original, find = counted_find(delivered)
        mongomock.collection.Collection.find = find
        mongomock.collection.Collection.aggregate = aggregate
        mongo_expressions.DELIVERED.clear()
        source = rtt.MongoSource(client, "db")
        data = source.read_dormant(NOW) if pipeline else source.read()
        mongomock.collection.Collection.find = original
        delivered.update(mongo_expressions.DELIVERED)
        parts = ", ".join(f"{k}: {v:,}" for k, v in sorted(delivered.items()))
        print(f"| {label} | {sum(delivered.values()):,} ({parts}); kept {len(data.users):,} members, "
              f"{len(data.events):,} events |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
