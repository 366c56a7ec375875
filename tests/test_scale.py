"""Scale (issue 12): the fast decoding gives what bson.json_util gives, the counting folder read and the MongoDB
pipeline give the same dormant_users.json and future_events.json as the literal reading, bad records are still
counted, truncated files still one line, and the candidate index scores exactly as score_candidates.

No timings here: bench/bench_scale.py measures speed and memory.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import mongo_expressions
import mongomock
import pytest
from bson import ObjectId, json_util
from builders import CliRun, leaves, run_main
from hypothesis import example, given, settings
from hypothesis import strategies as st

import return_to_table as rtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from make_world import NOW, World, member_id

NOW_ISO = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
MONGO_ENV = {"MONGO_URI": "mongodb://127.0.0.1:1/x", "MONGO_DB_NAME": "testdb"}
OUTPUTS = ("data/processed/dormant_users.json", "data/processed/future_events.json")


# --- messy worlds: the generator's forms plus every rare one, explicitly ------------------------------------


def edge_events(members: int) -> list[dict[str, Any]]:
    """One event per rare date and participant form, each naming members who would otherwise be churned."""
    when = NOW - timedelta(days=45)
    millis = int(when.timestamp() * 1000)
    dates: list[Any] = [
        "TBD", None, f" {when.strftime('%Y-%m-%dT%H:%M:%SZ')} ", when.strftime("%Y-%m-%d"), float(millis),
        {"$date": {"$numberLong": str(millis)}}, {"$date": when.strftime("%Y-%m-%dT%H:%M:%S.000Z")},
        when.strftime("%Y-%m-%dT%H:%M:%S") + "-05:00", millis, "17100720", {"$date": "TBD"}, True,
    ]
    participants: list[Any] = [
        [member_id(members - 1), None, 42, {"name": "x"}], [{"userId": {"$oid": member_id(members - 2)}}],
        [{"id": f" {member_id(members - 3)} "}, member_id(members - 3)], "not-a-list",
        [{"_id": {"$oid": member_id(members - 4)}}, {"$oid": member_id(members - 5)}], [""], [],
    ]
    events = []
    for n, start in enumerate(dates):
        events.append({"_id": f"edge{n:02d}", "name": "Jazz Brunch", "categories": ["MUSIC"], "features": ["jazz"],
                       "neighborhood": "soho", "participants": participants[n % len(participants)],
                       "maxParticipants": 10, "startDate": start, "type": "public", "active": True,
                       "ownerId": {"$oid": member_id(members - 6 - n)} if n % 2 else None})
    future = (NOW + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    events.append({"_id": "edge-future", "name": "Wine Night", "categories": ["WINE"], "features": [],
                   "participants": [member_id(1)], "maxParticipants": {"$numberLong": "12"}, "startDate": f" {future}",
                   "type": "public", "active": True, "eventStatus": "approved", "ownerId": member_id(2)})
    return events


def messy_world(members: int = 400, *, canonical: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    world = World(members, members * 3 // 4, canonical=canonical, seed=7)
    users, events = list(world.users()), list(world.events_())
    users[3]["bio"] = "line one\u0007\u202e and two"  # control characters: cleaned and counted
    users[5]["createdAt"] = {"$date": "TBD"}  # an unreadable Extended JSON value: None and counted
    users.append(dict(users[8]))  # a repeated _id: kept once, counted
    return users, events + edge_events(members)


def write_world(folder: Path, users: list[dict[str, Any]], events: list[dict[str, Any]], *, lines: bool = False,
                ) -> Path:
    """The documents as mongoexport would write them (they are Extended JSON already)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in (("users.json", users), ("events.json", events)):
        texts = [json.dumps(doc, ensure_ascii=False) for doc in docs]
        (folder / name).write_text("\n".join(texts) + "\n" if lines else "[" + ",\n".join(texts) + "]",
                                   encoding="utf-8")
    return folder


REACH_ALL = "1000"  # a --limit above the world's member count: the walk reaches (``reach_member``) every eligible one


def assert_history_exercised(members: list[dict[str, Any]]) -> None:
    """The world gives the history signals something to say (else the equality tests would prove little):
    places, tags, series, co-attendees going, and the contact fields the walk sets on every member it reaches."""
    histories = [m["event_history"] for m in members]
    for key in ("places", "tags", "series", "weekdays", "company_going"):
        assert sum(1 for h in histories if h[key]) > len(members) // 3, key
    assert any(h["hosts"] for h in histories)
    assert all(m["phone_e164"] for m in members) and any(m["phone_timezone"] for m in members)


def run_folder(folder: Path, out: Path, *flags: str) -> CliRun:
    run = run_main(["--source", str(folder), "--now", NOW_ISO, "--llm", "off", "--dry-run", *flags], out)
    assert run.code == 0, run.err
    return run


# --- the converter: orjson's values made into bson.json_util's ---------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=12),
                    st.floats(allow_nan=False, allow_infinity=False))
OID = st.text("0123456789abcdefABCDEF", min_size=23, max_size=25)
EXTENDED = st.one_of(
    st.builds(lambda h: {"$oid": h}, OID),
    st.builds(lambda n: {"$date": {"$numberLong": str(n)}}, st.integers(-2**63, 2**63)),
    st.builds(lambda s: {"$date": s}, st.sampled_from(["2026-01-15T12:00:00Z", "2026-01-15T12:00:00.123+02:00",
                                                         "TBD", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00"])),
    st.builds(lambda n: {"$date": n}, st.integers(-2**62, 2**62)),
    st.builds(lambda n: {"$numberLong": n}, st.one_of(st.integers(-2**64, 2**64).map(str), st.text(max_size=4))),
    st.builds(lambda n: {"$numberInt": n}, st.integers(-2**33, 2**33).map(str)),
    st.builds(lambda n: {"$numberDouble": n}, st.sampled_from(["1.5", "-0.0", "Infinity", "-Infinity", "NaN", "x"])),
    st.builds(lambda n: {"$numberDecimal": n}, st.sampled_from(["1.10", "NaN", "bad"])),
    st.builds(lambda p, o: {"$regularExpression": {"pattern": p, "options": o}}, st.text(max_size=4),
              st.sampled_from(["", "i", "q"])),
    st.builds(lambda t: {"$timestamp": {"t": t, "i": 1}}, st.integers(0, 2**33)),
    st.just({"$minKey": 1}), st.just({"$maxKey": 1}), st.just({"$undefined": True}),
    st.builds(lambda s: {"$symbol": s}, st.text(max_size=4)),
    st.builds(lambda s: {"$binary": {"base64": s, "subType": "00"}}, st.sampled_from(["", "AAEC", "!!"])),
    st.builds(lambda s: {"$ref": "user", "$id": s}, st.text(max_size=4)),
    st.builds(lambda k: {k: 1}, st.sampled_from(["$other", "$", "$date2"])),
)
VALUES = st.recursive(st.one_of(SCALARS, EXTENDED), lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=25)
DOCUMENTS = st.dictionaries(st.text(max_size=8), VALUES, max_size=6)


def literal_decode(text: str) -> tuple[Any, int]:
    decoder = rtt.ExtendedJsonDecoder()
    return decoder.loads(text), decoder.bad_values


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (1 == 1.0 == True would hide a difference)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@settings(max_examples=300, deadline=None)
@given(DOCUMENTS, st.booleans())
@example({"": {"$oid": None}}, False)  # json_util: a new random ObjectId each time; here a bad value
@example({"": -9223372036854775809}, False)  # 19 digits below -2**63: orjson reads a float, json an int
def test_the_fast_decoding_gives_json_util_values_and_counts_the_same_bad_ones(doc, canonical):
    text = json_util.dumps(json_util.loads(json.dumps(doc)), json_options=json_util.CANONICAL_JSON_OPTIONS) \
        if canonical and literal_decode(json.dumps(doc))[1] == 0 else json.dumps(doc)
    expected, bad = literal_decode(text)
    fast = rtt.ExtendedJsonDecoder()
    docs = rtt.fast_decode(("[" + text + "]").encode(), fast)
    if docs is None:  # the literal path reads it (big integers, NaN, lone surrogates...)
        return
    assert same(docs[0], expected) and fast.bad_values == bad


# --- the folder: the counting read against the literal reading -------------------------------------------------


def literal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The literal reading from now on: every record through json with bson.json_util's hook, in Python."""
    monkeypatch.setattr(rtt, "orjson", None)
    monkeypatch.setattr(rtt.FolderSource, "read_dormant", lambda self, now, progress=None: self.read(progress))


@pytest.mark.parametrize(("canonical", "lines"), [(False, False), (True, False), (False, True), (True, True)])
def test_the_counting_read_and_the_literal_reading_give_the_same_outputs(tmp_path, monkeypatch, canonical, lines):
    folder = write_world(tmp_path / "world", *messy_world(canonical=canonical), lines=lines)
    assert rtt.FolderSource(folder).read_dormant(NOW).activity is not None  # the engine, not its fallback
    monkeypatch.setattr(rtt, "HISTORY_AHEAD", 1 if lines else 7 if canonical else 1000)  # histories read n at a time
    fast = run_folder(folder, tmp_path / "fast", "--limit", REACH_ALL)
    with monkeypatch.context() as patch:
        literal(patch)
        slow = run_folder(folder, tmp_path / "slow", "--limit", REACH_ALL)
    for name in OUTPUTS:
        assert fast.load(name) == slow.load(name), name
    assert len(fast.load(OUTPUTS[0])) > 20 and fast.load(OUTPUTS[1])
    assert_history_exercised(fast.load(OUTPUTS[0]))
    assert [m["event_history"] for m in fast.load(OUTPUTS[0])] == [m["event_history"] for m in slow.load(OUTPUTS[0])]
    assert fast.matches == slow.matches and fast.messages == slow.messages
    for key in ("summary", "engagement_counts"):
        assert fast.report()[key] == slow.report()[key], key
    issues, every = fast.report()["data_issues"], slow.report()["data_issues"]
    assert all(issues[kind] <= every[kind] for kind in issues)  # the records read (README: data_issues)
    for kind in ("repeated_user_ids", "events_without_valid_start_date", "text_values_with_control_characters"):
        assert issues[kind] == every[kind], kind  # (the control characters: a dormant member's bio)
    assert fast.load("data/raw/users.json") == json.loads((folder / "users.json").read_text(encoding="utf-8")) \
        if not lines else len(fast.load("data/raw/users.json")) == len(messy_world()[0])


def test_the_counting_read_keeps_only_the_dormant_members_and_the_events_they_went_to(tmp_path):
    users, events = messy_world()
    data = rtt.FolderSource(write_world(tmp_path / "w", users, events)).read_dormant(NOW)
    assert data.read == {"users": len(users), "events": len(events)}
    assert 0 < len(data.users) < len(users) // 2 and len(data.events) < len(events)
    assert sum(data.statuses.values()) == len(users) - 1  # the repeated one counted once
    for user in data.users:
        assert rtt.derive_engagement(data.activity[rtt.id_of(user["_id"])].last_event, NOW)[1] == "dormant"


def test_an_integer_beyond_64_bits_is_read_exactly(tmp_path):
    users, events = messy_world(120)
    dormant = rtt.id_of(rtt.FolderSource(write_world(tmp_path / "a", users, events)).read_dormant(NOW).users[0]["_id"])
    for user in users:
        if rtt.id_of(user["_id"]) == dormant:
            user["loyaltyPoints"] = 123456789012345678901234
    data = rtt.FolderSource(write_world(tmp_path / "b", users, events)).read_dormant(NOW)
    assert data.activity is not None  # the engine read it
    [read] = [u for u in data.users if rtt.id_of(u["_id"]) == dormant]
    assert read["loyaltyPoints"] == 123456789012345678901234 and type(read["loyaltyPoints"]) is int


@pytest.mark.parametrize("bad", [
    '{"_id": 42, "firstName": "Odd"}',  # an odd _id: screening skips it
    '{"_id": "n", "x": ' + "[" * 70 + "]" * 70 + "}",  # nested too deep
    '{"_id": "n", "x": ' + "[" * 1200 + "]" * 1200 + "}",  # deeper than the decoder's stack
    '{"_id": "nan", "n": NaN}',
    '{"_id": "twice", "_id": "\\u0007"}',  # a repeated key: Python reads the last
])
def test_records_screening_skips_are_counted_and_left_out_of_data_raw(tmp_path, monkeypatch, bad):
    users, events = messy_world(120)
    folder = write_world(tmp_path / "w", users, events)
    text = (folder / "users.json").read_text(encoding="utf-8")
    (folder / "users.json").write_text(text[:-1] + ",\n" + bad + "]", encoding="utf-8")
    run = run_folder(folder, tmp_path / "out")
    with monkeypatch.context() as patch:
        literal(patch)
        slow = run_folder(folder, tmp_path / "slow")
    for kind in ("users_without_usable_id", "users_nested_too_deep"):
        assert run.report()["data_issues"].get(kind, 0) == slow.report()["data_issues"].get(kind, 0), kind
    assert run.load(OUTPUTS[0]) == slow.load(OUTPUTS[0]) and len(run.load(OUTPUTS[0])) > 3
    assert len(run.load("data/raw/users.json")) == len(slow.load("data/raw/users.json"))


@pytest.mark.parametrize("lines", [False, True])
def test_a_truncated_file_is_still_one_line_naming_the_file(tmp_path, lines):
    folder = write_world(tmp_path / "w", *messy_world(60), lines=lines)
    text = (folder / "events.json").read_text(encoding="utf-8")
    (folder / "events.json").write_text(text[: len(text) // 2], encoding="utf-8")
    run = run_main(["--source", str(folder), "--now", NOW_ISO, "--dry-run"], tmp_path / "out")
    assert run.code == 2
    assert run.err.startswith("error: ") and run.err.count("\n") == 1 and "Traceback" not in run.err
    assert "events.json" in run.err and "invalid JSON" in run.err
    if lines:
        assert f"line {text[: len(text) // 2].count(chr(10)) + 1}:" in run.err


def test_a_failed_read_leaves_data_raw_as_it_was_and_no_staged_copy(tmp_path):
    folder = write_world(tmp_path / "w", *messy_world(60))
    raw = run_folder(folder, tmp_path / "out").path("data/raw")  # a dry run's own data folder
    before = {path.name: path.read_bytes() for path in raw.iterdir()}
    (folder / "users.json").write_text('[{"_id": "late-joiner"}]', encoding="utf-8")
    text = (folder / "events.json").read_text(encoding="utf-8")
    (folder / "events.json").write_text(text[: len(text) // 2], encoding="utf-8")
    assert run_main(["--source", str(folder), "--now", NOW_ISO, "--dry-run"], tmp_path / "out").code == 2
    assert {path.name: path.read_bytes() for path in raw.iterdir()} == before  # the copies made while reading: dropped


# --- MongoDB: the pipeline path against the folder path ------------------------------------------------------


def mongo_world(users: list[dict[str, Any]], events: list[dict[str, Any]]) -> mongomock.MongoClient:
    """The same documents as the folder path decodes them, stored in mongomock."""
    decoder = rtt.ExtendedJsonDecoder()
    client = mongomock.MongoClient()
    seen: set[Any] = set()
    unique = []
    for doc in users:  # a collection cannot repeat an _id
        decoded = mongo_expressions.naive(decoder.loads(json.dumps(doc)))
        if str(decoded["_id"]) not in seen:
            seen.add(str(decoded["_id"]))
            unique.append(decoded)
    client["testdb"]["user"].insert_many(unique)
    client["testdb"]["event"].insert_many([mongo_expressions.naive(decoder.loads(json.dumps(doc))) for doc in events])
    return client


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """mongomock lacks $type, $trim, $convert and $dateFromString: those stages run in tests/mongo_expressions.py."""
    monkeypatch.setattr(mongomock.collection.Collection, "aggregate", mongo_expressions.patched_aggregate)
    mongo_expressions.DELIVERED.clear()


def test_the_normalising_stage_gives_what_python_reads_for_every_form():
    _users, events = messy_world()
    decoder = rtt.ExtendedJsonDecoder()
    stage = rtt.normalise_events_stage()["$project"]
    for raw in events:
        event = mongo_expressions.naive(decoder.loads(json.dumps(raw)))
        out = mongo_expressions.project(event, stage, add=False)
        start = rtt.to_utc(event.get("startDate"))
        if out["start"] is not None or start is None or not isinstance(event.get("startDate"), dict):
            assert out["start"] == (start.replace(tzinfo=None, microsecond=start.microsecond // 1000 * 1000)
                                    if start else None), raw["startDate"]
        assert sorted(out["members"]) == sorted(rtt.event_member_ids(event, rtt.DataIssues())), raw["participants"]


def test_the_pipeline_and_the_folder_give_the_same_outputs(tmp_path, pipeline):
    users, events = messy_world()
    folder = run_folder(write_world(tmp_path / "w", users, events), tmp_path / "folder", "--limit", REACH_ALL)
    mongo = run_main(["--source", "mongo", "--now", NOW_ISO, "--llm", "off", "--dry-run", "--limit", REACH_ALL],
                     tmp_path / "mongo", MONGO_ENV, mongo_client=mongo_world(users, events))
    assert mongo.code == 0, mongo.err
    for name in OUTPUTS:
        assert mongo.load(name) == folder.load(name), name
    assert_history_exercised(mongo.load(OUTPUTS[0]))
    assert [m["event_history"] for m in mongo.load(OUTPUTS[0])] == [m["event_history"] for m in folder.load(OUTPUTS[0])]
    assert mongo.matches == folder.matches and mongo.messages == folder.messages
    assert mongo_expressions.DELIVERED["aggregate user"] == 0
    assert mongo.report()["summary"]["total_dormant_users_found"] == folder.report()["summary"]["total_dormant_users_found"]


def test_the_pipeline_reads_only_the_dormant_members(pipeline):
    users, events = messy_world()
    client = mongo_world(users, events)
    data = rtt.MongoSource(client, "testdb").read_dormant(NOW)
    assert data.read["users"] == len(users) - 1
    kept = {rtt.id_of(u["_id"]) for u in data.users}
    assert kept <= set(data.activity)  # (beside them: their co-attendees' upcoming events, for company_going)
    assert all(rtt.derive_engagement(data.activity[m].last_event, NOW)[1] == "dormant" for m in kept)
    assert data.statuses["dormant"] == len(data.users) < len(users) // 2
    mongo_expressions.DELIVERED.clear()  # the history fetch: exactly the events that name a kept member
    decoded = [mongo_expressions.naive(rtt.ExtendedJsonDecoder().loads(json.dumps(e))) for e in events]
    naming = [e for e in decoded if kept & rtt.event_member_ids(e, rtt.DataIssues()) and rtt.usable_id(e["_id"])]
    history = rtt.MongoSource.attended(client["testdb"]["event"], sorted(kept), [])
    assert mongo_expressions.DELIVERED["aggregate event"] == len(naming) < len(events)
    assert all(history[m].event_count == data.activity[m].event_count for m in kept)  # every event of theirs


def test_a_server_without_the_operators_gets_the_full_read():
    users, events = messy_world(80)
    data = rtt.MongoSource(mongo_world(users, events), "testdb").read_dormant(NOW)
    assert data.activity is None and len(data.users) == len(users) - 1


# --- step 5: the candidate index scores exactly as score_candidates -----------------------------------------


def reached_world(tmp_path: Path, hoods: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """Every eligible member of a messy world with their history (the walk reached them all), the future
    events, and the candidate index over them."""
    run = run_folder(write_world(tmp_path / "w", *messy_world(600)), tmp_path / "out", "--limit", REACH_ALL)
    members, events = run.load(OUTPUTS[0]), run.load(OUTPUTS[1])
    assert sum(1 for m in members if m["event_history"]["events"] >= 2) > len(members) // 2
    return members, events, rtt.CandidateIndex.build(events, hoods, NOW)


def test_the_candidate_index_scores_every_member_as_score_candidates(tmp_path, hoods):
    members, events, index = reached_world(tmp_path, hoods)
    members.append({"_id": "nobody", "interests": ["travel", "Live Music", "jazz "], "homeNeighborhood": "Nomad"})
    for member in members:
        assert index.score(member) == rtt.score_candidates(member, events, hoods, NOW)


def test_no_event_scores_above_its_bound(tmp_path, hoods):
    members, events, index = reached_world(tmp_path, hoods)
    position = {id(e): n for n, e in enumerate(events)}
    named = 0  # candidates whose host, series or company the member's history counts: bounded on their own rows
    for member in members:
        reader = index.reader(member)
        for c in rtt.score_candidates(member, events, hoods, NOW):
            assert c.total <= index.bound(reader, position[id(c.event)])
            named += bool(c.history.host_events or c.history.series_events or c.history.company)
    assert named > 10


def test_the_first_candidates_are_found_without_scoring_every_event(tmp_path, hoods, monkeypatch):
    members, events, index = reached_world(tmp_path, hoods)
    scored: list[int] = []
    score = rtt.score_candidates
    monkeypatch.setattr(rtt, "score_candidates", lambda user, batch, *rest: scored.append(len(batch)) or score(
        user, batch, *rest))
    monkeypatch.setattr(rtt, "RANKED_BATCH", 1)  # the world is small: one event at a time shows the bound at work
    monkeypatch.setattr(rtt, "BEST_FIRST", 3)  # and the events past the first few, sorted only when reached
    wanted = rtt.MAX_NEXT_EVENTS + 1  # the rules' pick and the fallbacks after it
    for member in members:
        first = list(itertools.islice(index.ranked(member), wanted))
        assert first == score(member, events, hoods, NOW)[:wanted]
    narrowed = sum(len(index.positions(m)) for m in members)
    assert all(index.positions(m) == [n for n, e in enumerate(events) if e.get("remaining_spots") != 0 and
                                      rtt.matched_interests(m["interests"], rtt.event_tags(e))] for m in members)
    assert sum(scored) < narrowed * 0.9  # the bounds spare scoring even in a small world (at 1M: 146 of 3,724)


# Weights far from the built-in ones on every name: a bound read with the built-in weights (history, plan or
# half-life) falls below some candidate's total with these, and the order they give differs.
OTHER_WEIGHTS = rtt.MatchWeights({"W_HOST": 0.25, "W_SERIES": 4.0, "W_COMPANY": 0.5, "W_PLACE": 40.0, "W_TAGS": 12.0,
                                  "W_WEEKDAY": 9.0, "W_DAY_PART": 7.0, "PLAN_WEIGHT": 6.0, "FAR_HALVING_DAYS": 365.0},
                                 "other weights (test)")


def test_an_index_built_with_other_weights_bounds_and_scores_with_those_weights(tmp_path, hoods, monkeypatch):
    members, events, _ = reached_world(tmp_path, hoods)
    monkeypatch.setattr(rtt, "MAX_INDEX_CACHE_BYTES", 0)  # (and keeping no column: each computed for each member)
    index = rtt.CandidateIndex.build(events, hoods, NOW, OTHER_WEIGHTS)
    position = {id(e): n for n, e in enumerate(events)}
    reordered = 0
    for member in members:
        expected = rtt.score_candidates(member, events, hoods, NOW, OTHER_WEIGHTS)
        reader = index.reader(member)
        assert all(c.total <= index.bound(reader, position[id(c.event)]) for c in expected)
        assert index.score(member) == expected
        assert all(c.weights is OTHER_WEIGHTS for c in expected)
        built_in = rtt.score_candidates(member, events, hoods, NOW)
        reordered += [c.event["_id"] for c in expected] != [c.event["_id"] for c in built_in]
    assert reordered > len(members) // 4  # the weights matter here: a test that can tell them apart


def round_robin(walks: list[Any], step: int) -> list[list[Any]]:
    """Everything each iterator gives, taking ``step`` items from each in turn until all are done."""
    found: list[list[Any]] = [[] for _ in walks]
    live = list(range(len(walks)))
    while live:
        for k in list(live):
            taken = list(itertools.islice(walks[k], step))
            found[k] += taken
            if len(taken) < step:
                live.remove(k)
    return found


def test_two_sets_of_weights_score_side_by_side_in_one_process(tmp_path, hoods):
    members, events, built_in = reached_world(tmp_path, hoods)
    other = rtt.CandidateIndex.build(events, hoods, NOW, OTHER_WEIGHTS)
    expected = {id(index): [rtt.score_candidates(m, events, hoods, NOW, index.weights) for m in members]
                for index in (built_in, other)}
    # one thread: every member's walk under both weights started at once, then advanced a few steps each in turn
    walks = [index.ranked(m) for index in (built_in, other) for m in members]
    assert round_robin(walks, 3) == expected[id(built_in)] + expected[id(other)]
    # threads: each set of weights scored by two threads at once, many times
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda index: (id(index), [index.score(m) for m in members]),
                                [built_in, other] * 4))
    assert all(scored == expected[key] for key, scored in results)


def test_a_large_limit_gives_the_matches_of_the_unindexed_scoring(tmp_path, monkeypatch):
    folder = write_world(tmp_path / "w", *messy_world(600))
    indexed = run_folder(folder, tmp_path / "indexed", "--limit", "1000")
    monkeypatch.setattr(rtt.MemberWalk, "ranked", lambda self, user, events: iter(
        rtt.score_candidates(user, events, self.hoods, self.options.now)))
    plain = run_folder(folder, tmp_path / "plain", "--limit", "1000")
    assert len(indexed.matches) > 30
    assert indexed.matches == plain.matches and indexed.messages == plain.messages


def test_ids_of_members_stored_as_object_ids_or_strings_are_both_fetched():
    query = rtt.member_id_query(["64d000000000000000000001", "plain"])
    assert ObjectId("64d000000000000000000001") in query["_id"]["$in"] and "plain" in query["_id"]["$in"]


# --- output files: written in pieces, laid out as the standard encoder lays them out -----------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=12),
                         st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.lists(JSON_VALUES, max_size=6), JSON_VALUES), chunk=st.sampled_from([1, 2, 1000]))
def test_a_file_written_in_pieces_reads_back_as_the_standard_encoders(value, chunk, tmp_path_factory):
    path = tmp_path_factory.mktemp("json") / "out.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rtt, "JSON_CHUNK_ITEMS", chunk)
        rtt.write_json(path, value)
    standard = json.dumps(value, ensure_ascii=False, indent=2) + "\n"
    written = path.read_text(encoding="utf-8")
    assert json.loads(written) == json.loads(standard)
    if not any(isinstance(v, float) for v in leaves(value)):  # float spellings may differ (1e16 / 1e+16)
        assert written == standard


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.sampled_from(
    [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=13, minutes=45))])))
def test_iso_utc_writes_what_strftime_writes(moment):
    utc = moment.astimezone(UTC)
    assert rtt.iso_utc(moment) == utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def test_data_raw_is_a_byte_copy_of_an_array_file(tmp_path):
    source = tmp_path / "users.json"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"_id": str(n), "bio": "x" * 50} for n in range(3000)]).encode())
    rtt.copy_raw(tmp_path / "raw.json", source)
    assert (tmp_path / "raw.json").read_bytes() == source.read_bytes()[3:]


DATE_TEXTS = st.builds(
    lambda y, mo, d, h, mi, s, frac, zone: f"{y}-{mo}-{d}T{h}:{mi}:{s}{frac}{zone}",
    st.sampled_from(["2026", "1999", "0999", "0000", "9999", "２０２６"]), st.sampled_from(["01", "02", "12", "13", "00"]),
    st.sampled_from(["01", "28", "29", "30", "31", "32"]), st.sampled_from(["00", "23", "24"]),
    st.sampled_from(["00", "59", "60"]), st.sampled_from(["00", "59", "60", "61"]),
    st.one_of(st.just(""), st.text(alphabet="0123456789", min_size=1, max_size=12).map(lambda t: "." + t)),
    st.sampled_from(["Z", "", "+01:00", "z"]))


@settings(max_examples=500, deadline=None)
@given(st.one_of(DATE_TEXTS.map(lambda t: {"$date": t}),
                 st.text(alphabet="0123456789abcdefABCDEFxz", min_size=22, max_size=25).map(lambda t: {"$oid": t})))
@example({"$date": "2026-01-02T03:04:05.9999997Z"})  # int(0.9999997 * 1e6): 999999, as json_util truncates
@example({"$date": "2026-01-02T03:04:05.0000015Z"})
def test_the_usual_extended_forms_decode_to_what_json_util_gives(obj):
    found = rtt.usual_extended(obj)
    try:
        expected = json_util.object_hook(dict(obj), json_util.RELAXED_JSON_OPTIONS)
    except Exception:  # noqa: BLE001 (json_util's failure: the fast form must leave it to json_util)
        assert found is None
        return
    assert found is None or (type(found) is type(expected) and found == expected)
    if isinstance(expected, datetime) and obj["$date"].endswith("Z") and obj["$date"][:4].isascii():
        assert found is not None  # the usual form is read here, not left to json_util


@pytest.mark.parametrize("stored", [False, True], ids=["plain", "stored-selected-field"])
def test_the_walk_listing_is_written_as_the_merged_records_would_be(tmp_path, monkeypatch, stored):
    monkeypatch.setattr(rtt, "JSON_CHUNK_ITEMS", 3)
    eligible = [{"_id": f"m{n}", "bio": "a\n  },\n  {" * n, "tags": {"x": [n, {"y": []}], "z": {}}, "name": "Zoë"}
                for n in range(8)]
    if stored:
        eligible[4] = {"_id": "m4", "selected": "stored", "skip_reason": 7, "n": 1.5}
    decisions = {"m0": "selected", "m2": "holdout", "m5": "no_valid_phone"}
    rtt.write_json_items(tmp_path / "listing.json", rtt.walk_listing(eligible, decisions))
    merged = [{**user, **rtt.decision_keys(decisions.get(user["_id"], "below_limit"))} for user in eligible]
    rtt.write_json(tmp_path / "merged.json", merged)
    assert (tmp_path / "listing.json").read_bytes() == (tmp_path / "merged.json").read_bytes()
    rtt.write_json_items(tmp_path / "empty.json", rtt.walk_listing([], {}))
    assert json.loads((tmp_path / "empty.json").read_text()) == []


# --- the engine's macros read each form as Python reads it, or leave it to Python ------------------------------

ID_FORMS = st.one_of(
    st.text(alphabet=st.sampled_from(["a", "B", "7", " ", "\t", "\u00a0", "\u3000", "\u200b", "\x07", "é", "-"]),
            max_size=8),
    st.just("x" * 201), OID.map(lambda h: {"$oid": h}), st.none(), st.integers(-5, 5), st.booleans(),
    st.builds(lambda k, v: {k: v}, st.sampled_from(["_id", "userId", "id", "name", "$numberLong", "$symbol"]),
              st.one_of(st.text(alphabet=" ab\x07", max_size=4), OID.map(lambda h: {"$oid": h}), st.integers(0, 3),
                        st.just({"_id": "deeper"}))),
    st.just({"_id": "a", "id": "b"}), st.lists(st.just("a"), max_size=2))
START_FORMS = st.one_of(
    DATE_TEXTS, DATE_TEXTS.map(lambda t: {"$date": t}), st.integers(-2**62, 2**62),
    st.integers(-10**13, 10**13), st.integers(-10**13, 10**13).map(lambda n: {"$date": n}),
    st.integers(-10**13, 10**13).map(lambda n: {"$date": {"$numberLong": str(n)}}),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["TBD", "2026-01-02", " 2026-01-02", "17100720",
                                                                       "2026-01-02T03:04:05.123456+05:30", True, None]),
    st.just({"$numberLong": "1767225600000"}), st.lists(st.integers(), max_size=1))


@pytest.fixture(scope="module")
def engine_db():
    import duckdb

    db = duckdb.connect()
    db.execute(rtt.sql_macros())
    yield db
    db.close()


@settings(max_examples=400, deadline=None)
@given(owner=ID_FORMS, start=START_FORMS)
def test_the_engine_reads_an_id_and_a_start_as_python_reads_the_screened_record_or_leaves_it_to_python(
        engine_db, owner, start):
    text = json.dumps({"_id": "e", "ownerId": owner, "participants": [owner], "startDate": start}, ensure_ascii=False)
    screened = rtt.screen_records([rtt.ExtendedJsonDecoder().loads(text)], "events").records
    [(members, when)] = engine_db.execute(
        "SELECT rtt_members(json_extract(doc, '$.ownerId'), json_extract(doc, '$.participants')),"
        " rtt_start(json_extract(doc, '$.startDate')) FROM (SELECT ?::JSON AS doc)", [text]).fetchall()
    record = screened[0]
    if "\x00" not in members:
        assert sorted(members) == sorted(rtt.event_member_ids(record, rtt.DataIssues())), owner
    if when != rtt.SQL_ODD_START:
        assert when == rtt.epoch_micros(rtt.to_utc(record.get("startDate"))), start


def test_the_engine_leaves_a_record_repeating_a_key_it_reads_to_python(tmp_path):
    events = ['{"_id": "a", "startDate": "2026-01-01T00:00:00Z"}', '{"_id": "b", "type": "x", "type": "public"}',
              '{"_id": "c", "participants": [], "name": "participants list"}',  # (a value "participants" is odd too)
              '{"_id": "d", "active": true, "bio": "x",\n "active": false}']
    (tmp_path / "users.json").write_text('[{"_id": "u"}, {"_id": "v", "_id": "w"}, {"_id": "x", "y": "_idea"}]')
    (tmp_path / "events.json").write_text("[" + ",".join(events) + "]")
    engine = rtt.FolderEngine(tmp_path / "users.json", tmp_path / "events.json")
    engine.scan("events", now=0)
    assert engine.db.execute("SELECT list(odd ORDER BY n) FROM events_read").fetchone()[0] == [False, True, False, True]
    engine.db.execute("CREATE TEMP TABLE activity (member VARCHAR, last BIGINT)")  # (the members' scan reads it)
    engine.scan("users", after=0, until=0)
    assert engine.db.execute("SELECT list(odd ORDER BY n) FROM users_read").fetchone()[0] == [False, True, False]
    engine.close()


def test_the_engine_gives_the_consent_rows_the_literal_read_gives(tmp_path):
    users, events = messy_world(200)
    users[4]["smsOptOut"] = {"$date": "TBD"}  # unreadable: kept as UNREADABLE (doubt), never missing
    users[6]["optOut.sms"] = True  # a literal dotted key
    users[9]["preferences"] = {"sms": False}
    users[11]["smsConsent"] = None
    folder = write_world(tmp_path / "w", users, events)
    paths = rtt.DEFAULT_OPT_OUT_FIELDS + rtt.DEFAULT_CONSENT_FIELDS
    keys = rtt.consent_keys(paths)
    docs, _ = rtt.load_collection_file(folder / "users.json", rtt.ExtendedJsonDecoder(keep_unreadable=True))
    literal_rows = [row for row in (rtt.consent_row(doc, keys) for doc in docs) if row is not None]
    rows = list(rtt.FolderSource(folder).consent_rows(paths))
    assert rows == literal_rows and len(rows) == 4 and rows[0]["smsOptOut"] is rtt.UNREADABLE
    source = rtt.FolderSource(folder, consent_paths=paths)
    source.read_dormant(NOW)  # the members' scan keeps the texts of the consent keys' holders: read from there
    assert source.engine.consent_kept and list(source.consent_rows(paths)) == literal_rows
    source.close()
    text = (folder / "users.json").read_text(encoding="utf-8")
    escaped = text[:-1] + ', {"_id": "y", "\\u0073msOptOut": true}]'  # a key written escaped is found too
    (folder / "users.json").write_text(escaped, encoding="utf-8")
    docs, _ = rtt.load_collection_file(folder / "users.json", rtt.ExtendedJsonDecoder(keep_unreadable=True))
    escaped_rows = list(rtt.FolderSource(folder).consent_rows(paths))
    assert escaped_rows == [row for row in (rtt.consent_row(doc, keys) for doc in docs) if row is not None]
    assert len(escaped_rows) == 5
    (folder / "users.json").write_text(text[:-1] + ', {"_id": "z", "bio": "\\ud800"}]', encoding="utf-8")
    assert list(rtt.FolderSource(folder).consent_rows(paths)) == literal_rows  # the engine refuses it: read whole


def test_a_record_longer_than_the_engines_object_size_is_still_read_by_the_engine(tmp_path, monkeypatch):
    users, events = messy_world(60)
    users[0]["bio"] = "x" * 5000
    folder = write_world(tmp_path / "w", users, events)
    expected = rtt.FolderSource(folder).read_dormant(NOW)
    monkeypatch.setattr(rtt, "ENGINE_OBJECT_BYTES", 4096)  # (the read buffers' size, not a limit: README, Scale)
    data = rtt.FolderSource(folder).read_dormant(NOW)
    assert data.activity is not None and data.users == expected.users and data.events == expected.events
