"""MongoDB's aggregation expressions that mongomock lacks ($type, $trim, $convert, $dateFromString), modelled
in Python after the MongoDB 5.0 manual, so the pipeline's stages that use them can be tested.

``patched_aggregate`` runs a pipeline stage by stage: ``$project`` and ``$addFields`` through ``evaluate``
here, every other stage ($match, $unwind, $group) through mongomock itself. It also counts the documents each
aggregation hands to Python (``DELIVERED``).
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from bson import Int64, ObjectId
from mongomock import aggregate as mongomock_aggregate

MISSING = object()
DELIVERED: Counter[str] = Counter()  # documents into Python, per pipeline kind


def naive(value: Any) -> Any:
    """Dates as a server returns them: naive UTC."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, dict):
        return {k: naive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [naive(v) for v in value]
    return value


def bson_type(value: Any) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, ObjectId):
        return "objectId"
    if isinstance(value, Int64):
        return "long"
    if isinstance(value, int):
        return "int" if -2**31 <= value < 2**31 else "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, datetime):
        return "date"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def naive_utc(moment: datetime) -> datetime:
    """A BSON date as pymongo returns it: naive UTC, milliseconds."""
    moment = moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def path(doc: Any, name: str, names: dict[str, Any]) -> Any:
    parts = name.split(".")
    if name.startswith("$$"):
        value = doc if parts[0] == "$$ROOT" else names[parts[0][2:]]
    else:
        value = doc.get(parts[0][1:], MISSING)
    for part in parts[1:]:
        value = value.get(part, MISSING) if isinstance(value, dict) else MISSING
    return value


def evaluate(expr: Any, doc: dict[str, Any], names: dict[str, Any] | None = None) -> Any:
    names = names or {}

    def ev(e: Any) -> Any:
        value = evaluate(e, doc, names)
        return None if value is MISSING else value

    if isinstance(expr, str) and expr.startswith("$"):
        return path(doc, expr, names)
    if isinstance(expr, list):
        return [ev(e) for e in expr]
    if not isinstance(expr, dict) or not expr or not next(iter(expr)).startswith("$"):
        return expr
    [(op, arg)] = expr.items()
    if op == "$type":
        return bson_type(evaluate(arg, doc, names))
    if op == "$in":
        return ev(arg[0]) in ev(arg[1])
    if op == "$switch":
        for branch in arg["branches"]:
            if ev(branch["case"]):
                return ev(branch["then"])
        return ev(arg.get("default"))
    if op == "$cond":
        return ev(arg[1]) if ev(arg[0]) else ev(arg[2])
    if op == "$let":
        inner = names | {k: ev(v) for k, v in arg["vars"].items()}
        return evaluate(arg["in"], doc, inner)
    if op in ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"):
        a, b = ev(arg[0]), ev(arg[1])
        if op in ("$eq", "$ne"):
            return (a == b) == (op == "$eq")
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) and type(a) is not type(b):
            return False
        return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]
    if op == "$and":
        return all(ev(e) for e in arg)
    if op == "$ifNull":
        value = ev(arg[0])
        return ev(arg[1]) if value is None else value
    if op == "$isArray":
        return isinstance(ev(arg), list)
    if op == "$setUnion":
        union: list[Any] = []
        for items in (ev(e) for e in arg):
            union.extend(i for i in items if i not in union)
        return union
    if op == "$map":
        return [evaluate(arg["in"], doc, names | {arg["as"]: item}) for item in ev(arg["input"])]
    if op == "$filter":
        return [item for item in ev(arg["input"]) if evaluate(arg["cond"], doc, names | {arg["as"]: item})]
    if op == "$literal":
        return arg
    if op == "$objectToArray":
        value = ev(arg)
        return [{"k": k, "v": v} for k, v in value.items()] if isinstance(value, dict) else None
    if op == "$toString":
        value = ev(arg)
        return str(value) if value is not None else None
    if op == "$trim":  # whitespace, as str.strip (MongoDB also trims U+0000; no data here holds one)
        value = ev(arg["input"])
        return value.strip() if isinstance(value, str) else None
    if op == "$regexMatch":
        return re.search(arg["regex"], ev(arg["input"])) is not None
    if op == "$convert":
        value = ev(arg["input"])
        if value is None:
            return arg.get("onNull")
        try:
            return naive_utc(datetime.fromtimestamp(int(value) / 1000, tz=UTC))
        except (ValueError, OverflowError, OSError):
            return arg.get("onError")
    if op == "$dateFromString":  # ISO 8601 with Z, an offset or nothing (the timezone given: UTC)
        text = ev(arg["dateString"])
        if text is None:
            return arg.get("onNull")
        try:
            moment = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            return arg.get("onError")
        return naive_utc(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    raise NotImplementedError(op)


def project(doc: dict[str, Any], spec: dict[str, Any], add: bool) -> dict[str, Any]:
    if add:
        return doc | {k: evaluate(v, doc) for k, v in spec.items()}
    if all(v == 0 for v in spec.values()):
        return {k: v for k, v in doc.items() if k not in spec}
    out = {"_id": doc.get("_id")} if spec.get("_id", 1) else {}
    for key, value in spec.items():
        if key == "_id":
            continue
        result = doc.get(key, MISSING) if value == 1 else evaluate(value, doc)
        if result is not MISSING:
            out[key] = result
    return out


def patched_aggregate(self: Any, pipeline: list[dict[str, Any]], session: Any = None, **_options: Any) -> Any:
    docs = list(self.find())
    for stage in pipeline:
        [(name, spec)] = stage.items()
        if name in ("$project", "$addFields"):
            docs = [project(doc, spec, name == "$addFields") for doc in docs]
        else:
            docs = list(mongomock_aggregate.process_pipeline(docs, self.database, [stage], session))
    DELIVERED[f"aggregate {self.name}"] += len(docs)
    return iter(docs)
