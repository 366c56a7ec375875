"""Scale (issue 12): the fast decoding gives what bson.json_util gives, the counting folder read and the MongoDB
pipeline give the same dormant_users.json and future_events.json as the literal reading, bad records are still
counted, truncated files still one line, and the candidate index scores exactly as score_candidates.

No timings here: bench/bench_scale.py measures speed and memory.
"""

from __future__ import annotations

import functools
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
    walked = rtt.ExtendedJsonDecoder()
    value, clean = rtt.clean_values(json.loads(text), walked)
    assert same(value, expected) and walked.bad_values == bad
    if clean:
        assert rtt.already_clean(expected)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "bio", "description", "x"]),
                       st.one_of(st.text(max_size=260), st.lists(st.text(max_size=30), max_size=3)), max_size=4))
def test_a_record_that_skips_the_walk_is_one_clean_document_would_leave_alone(doc):
    data = json.dumps({"_id": "a", **doc}, ensure_ascii=False).encode()
    if rtt.plain_and_clean(data):
        found: Any = rtt.Counter()
        record = json.loads(data)
        assert rtt.clean_document(record, found) == record and not found


RECORD_TEXT = st.one_of(st.text(max_size=8), st.text(alphabet="ab\u0007\u202e\u00e9\\\"$", max_size=8),
                       st.sampled_from(["x" * 240, '{"$date": "2024-02-29T00:00:00Z"}', "2023-02-29"]))
RECORD_VALUES = st.one_of(RECORD_TEXT, st.sampled_from([{"$date": "2025-07-31T12:00:00Z"}, {"$date": "TBD"},
                                                         {"$date": {"$numberLong": "1757247896000"}},
                                                         {"$oid": "64d000000000000000000001"}, {"$oid": "zz"}]))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", "\u00e9", "\u0085", "\u061c", "\u180e", "\u200b", "\u2028", "\u2060",
                                         "\ufeff", "\u4e2d", "\u00a0", "\u200a", "\u2030", "\u2070", "\U0001f600"])))
def test_the_unsafe_character_test_reads_only_the_bytes_above_ascii_and_agrees(text):
    data = text.encode()
    assert rtt.unsafe_utf8(data) == (rtt._UNSAFE_UTF8.search(data) is not None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["name", "bio", "createdAt", "x"]), RECORD_VALUES, max_size=3),
                min_size=1, max_size=5))
def test_records_screened_together_have_nothing_to_count_each(docs):
    records = [json.dumps({"_id": "a", **doc}, ensure_ascii=False).encode() for doc in docs]
    if rtt.quiet_records(b"[" + b",".join(records) + b"]"):
        assert all(rtt.nothing_to_count(r) == rtt.few_brackets(r) for r in records)
    else:
        assert not all(rtt.nothing_to_count(r) for r in records)


# --- the folder: the counting read against the literal reading -------------------------------------------------


@pytest.fixture(params=[False, True], ids=["keys-here", "keys-in-child"])
def keys_in_child(request, monkeypatch) -> list[bool]:
    """Whether the users' ids are read by the child process (``MemberKeysChild``, any file size) or here;
    the list gets, per child answer taken, whether it was used (not None)."""
    answers: list[bool] = []
    if request.param:
        monkeypatch.setattr(rtt, "PARALLEL_KEYS_BYTES", 0)
        result = rtt.MemberKeysChild.result

        def recorded(self, data, seconds=math.inf):
            found = result(self, data, seconds)
            answers.append(found is not None)
            return found
        monkeypatch.setattr(rtt.MemberKeysChild, "result", recorded)
    return answers


@pytest.mark.parametrize(("canonical", "lines"), [(False, False), (True, False), (False, True), (True, True)])
def test_the_counting_read_and_the_literal_reading_give_the_same_outputs(tmp_path, monkeypatch, canonical, lines,
                                                                         keys_in_child):
    folder = write_world(tmp_path / "world", *messy_world(canonical=canonical), lines=lines)
    assert rtt.FolderSource(folder).read_dormant(NOW).activity is not None  # the fast path, not its fallback
    fast = run_folder(folder, tmp_path / "fast", "--limit", REACH_ALL)
    assert all(keys_in_child) and len(keys_in_child) == (2 if rtt.PARALLEL_KEYS_BYTES == 0 else 0)
    with monkeypatch.context() as patch:  # the literal reading: json with bson.json_util's hook, every record
        patch.setattr(rtt, "orjson", None)
        patch.setattr(rtt, "msgspec", None)
        slow = run_folder(folder, tmp_path / "slow", "--limit", REACH_ALL)
    for name in OUTPUTS:
        assert fast.load(name) == slow.load(name), name
    assert len(fast.load(OUTPUTS[0])) > 20 and fast.load(OUTPUTS[1])
    assert_history_exercised(fast.load(OUTPUTS[0]))
    assert [m["event_history"] for m in fast.load(OUTPUTS[0])] == [m["event_history"] for m in slow.load(OUTPUTS[0])]
    assert fast.matches == slow.matches and fast.messages == slow.messages
    for key in ("data_issues", "summary"):
        assert fast.report()[key] == slow.report()[key], key
    issues = fast.report()["data_issues"]
    assert issues["text_values_with_control_characters"] == 1 and issues["unreadable_extended_json_values"] >= 1
    assert issues["repeated_user_ids"] == 1 and issues["odd_participants"] >= 3
    assert issues["events_without_valid_start_date"] >= 3
    assert fast.load("data/raw/users.json") == json.loads((folder / "users.json").read_text(encoding="utf-8")) \
        if not lines else len(fast.load("data/raw/users.json")) == len(messy_world()[0])


@pytest.mark.parametrize("child", [
    "import sys; sys.exit(1)",  # failed
    "import sys; sys.stdout.write('torn')",  # an answer that is no pickle
    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",  # killed
    None,  # no process can be started
])
def test_a_child_that_fails_leaves_the_ids_to_this_process_with_the_same_outputs(tmp_path, monkeypatch, child):
    folder = write_world(tmp_path / "world", *messy_world())
    here = run_folder(folder, tmp_path / "here")
    monkeypatch.setattr(rtt, "PARALLEL_KEYS_BYTES", 0)
    if child is None:
        monkeypatch.setattr(rtt.sys, "executable", str(tmp_path / "no-such-python"))
    else:
        monkeypatch.setattr(rtt, "MEMBER_KEYS_CHILD", child)
    failed = run_folder(folder, tmp_path / "failed")
    for name in OUTPUTS:
        assert failed.load(name) == here.load(name), name
    assert failed.report()["data_issues"] == here.report()["data_issues"]


def test_the_child_answer_is_refused_for_other_bytes_than_this_process_read(tmp_path):
    folder = write_world(tmp_path / "world", *messy_world(40))
    data = (folder / "users.json").read_bytes()
    child = rtt.MemberKeysChild.start(folder / "users.json")
    try:
        assert child.result(data + b" ") is None  # the file changed between the two reads
    finally:
        child.close()
    child = rtt.MemberKeysChild.start(folder / "users.json")
    try:
        found = child.result(data)
    finally:
        child.close()
    assert found is not None and len(found.keys) == len(messy_world(40)[0]) and found.keys.count(None) == 1


def test_the_counting_read_keeps_only_the_dormant_members_and_the_candidate_events(tmp_path):
    users, events = messy_world()
    data = rtt.FolderSource(write_world(tmp_path / "w", users, events)).read_dormant(NOW)
    assert data.read == {"users": len(users), "events": len(events)}
    assert 0 < len(data.users) < len(users) // 2 and len(data.events) < len(events) // 5
    assert sum(data.statuses.values()) == len(users) - 1  # the repeated one counted once
    for user in data.users:
        assert rtt.derive_engagement(data.activity[rtt.id_of(user["_id"])].last_event, NOW)[1] == "dormant"


def test_an_integer_beyond_64_bits_is_read_exactly_by_the_fast_path(tmp_path):
    users, events = messy_world(120)
    dormant = rtt.id_of(rtt.FolderSource(write_world(tmp_path / "a", users, events)).read_dormant(NOW).users[0]["_id"])
    for user in users:
        if rtt.id_of(user["_id"]) == dormant:
            user["loyaltyPoints"] = 123456789012345678901234
    data = rtt.FolderSource(write_world(tmp_path / "b", users, events)).read_dormant(NOW)
    assert data.activity is not None  # the fast path read it
    [read] = [u for u in data.users if rtt.id_of(u["_id"]) == dormant]
    assert read["loyaltyPoints"] == 123456789012345678901234 and type(read["loyaltyPoints"]) is int


@pytest.mark.parametrize("bad", [
    '{"_id": 42, "firstName": "Odd"}',  # an odd _id: screening skips it
    '{"_id": "n", "x": ' + "[" * 70 + "]" * 70 + "}",  # nested too deep
    '{"_id": "nan", "n": NaN}',
])
def test_a_file_the_fast_path_cannot_vouch_for_is_read_the_classic_way_and_counted(tmp_path, bad, keys_in_child):
    users, events = messy_world(120)
    folder = write_world(tmp_path / "w", users, events)
    text = (folder / "users.json").read_text(encoding="utf-8")
    (folder / "users.json").write_text(text[:-1] + ",\n" + bad + "]", encoding="utf-8")
    assert rtt.FolderSource(folder).read_dormant(NOW).activity is None  # the classic read took over
    run = run_folder(folder, tmp_path / "out")
    assert run.report()["data_issues"].get("users_without_usable_id", 0) == (1 if '"_id": 42' in bad else 0)
    assert run.report()["data_issues"].get("users_nested_too_deep", 0) == (1 if "[[[" in bad else 0)
    assert len(run.load(OUTPUTS[0])) > 3


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
    for member in members:
        reader = index.reader(member)
        for c in rtt.score_candidates(member, events, hoods, NOW):
            assert c.total <= index.bound(reader, position[id(c.event)])


def test_a_group_bound_is_at_least_the_bound_of_each_event_in_it_the_history_does_not_name(tmp_path, hoods):
    members, _events, index = reached_world(tmp_path, hoods)
    opened = 0
    for member in members:
        reader = index.reader(member)
        own = index.own_positions(reader.habits)
        for bound, kind, item in index.pending(reader, index.narrowed_groups(reader.interests), own):
            if kind == 1:
                inside = [n for n in index.groups[item].positions if n not in own]
                opened += len(inside)
                assert all(b <= -bound for b, _ in index.bounds(reader, inside))
    assert opened > 300 and any(index.own_positions(index.reader(m).habits) for m in members)


def test_the_first_candidates_are_found_without_scoring_every_event(tmp_path, hoods, monkeypatch):
    members, events, index = reached_world(tmp_path, hoods)
    scored: list[int] = []
    score = rtt.score_candidates
    monkeypatch.setattr(rtt, "score_candidates", lambda user, batch, *rest: scored.append(len(batch)) or score(
        user, batch, *rest))
    monkeypatch.setattr(rtt, "RANKED_BATCH", 1)  # the world is small: one event at a time shows the bound at work
    wanted = rtt.MAX_NEXT_EVENTS + 1  # the rules' pick and the fallbacks after it
    for member in members:
        first = list(itertools.islice(index.ranked(member), wanted))
        assert first == score(member, events, hoods, NOW)[:wanted]
    narrowed = sum(len(index.positions(m)) for m in members)
    assert sum(scored) < narrowed * 0.9  # the bounds spare scoring even in a small world (at 1M: 146 of 3,724)


# Weights far from the built-in ones on every name: a bound read with the built-in weights (history, plan or
# half-life) falls below some candidate's total with these, and the order they give differs.
OTHER_WEIGHTS = rtt.MatchWeights({"W_HOST": 0.25, "W_SERIES": 4.0, "W_COMPANY": 0.5, "W_PLACE": 40.0, "W_TAGS": 12.0,
                                  "W_WEEKDAY": 9.0, "W_DAY_PART": 7.0, "PLAN_WEIGHT": 6.0, "FAR_HALVING_DAYS": 365.0},
                                 "other weights (test)")


def test_an_index_built_with_other_weights_bounds_and_scores_with_those_weights(tmp_path, hoods):
    members, events, _ = reached_world(tmp_path, hoods)
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


@pytest.mark.parametrize("days", [0, 30, 31, 90, 91, -3])
@pytest.mark.parametrize("offset", [timedelta(0), timedelta(microseconds=1), timedelta(microseconds=-1)])
def test_the_activity_index_gives_each_member_the_status_derive_engagement_gives(days, offset):
    last = NOW - timedelta(days=days) + offset
    index = rtt.ActivityIndex([(last, {}, ("m",))], {}, {"m": [0]})
    assert index.status("m", NOW) == rtt.derive_engagement(last, NOW)[1]
    assert index.status("nobody", NOW) == "new"


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.sampled_from(
    [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=13, minutes=45))])))
def test_iso_utc_writes_what_strftime_writes(moment):
    utc = moment.astimezone(UTC)
    assert rtt.iso_utc(moment) == utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@pytest.mark.parametrize("kernel", [True, False])
def test_data_raw_is_a_byte_copy_of_an_array_file_with_or_without_the_kernel_copy(tmp_path, monkeypatch, kernel):
    source = tmp_path / "users.json"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"_id": str(n), "bio": "x" * 50} for n in range(3000)]).encode())
    if not kernel:
        monkeypatch.setattr(rtt.os, "sendfile", lambda *args: (_ for _ in ()).throw(OSError(22, "Invalid argument")))
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


def test_the_ids_read_apart_give_the_dormant_members_and_counts_read_here_and_tick_every_record(tmp_path):
    folder = write_world(tmp_path / "world", *messy_world(700))
    data = rtt.FolderSource(folder).read_dormant(NOW)
    statuses_of = functools.partial(data.activity.statuses, now=NOW)
    raw = (folder / "users.json").read_bytes()
    issues, ticks, tally, plain = rtt.Counter(), [], rtt.Counter(), set()
    keys, flags = rtt.member_keys(rtt.export_elements(raw), rtt.ExtendedJsonDecoder(), issues)
    found = rtt.MemberKeys(keys, bytes(flags), dict(issues), 0, 0)
    users = rtt.dormant_from_keys(rtt.export_elements(raw), found, statuses_of, tally, plain, ticks.append)
    here_issues, here_tally, here_plain = rtt.Counter(), rtt.Counter(), set()
    here = rtt.dormant_read_here(rtt.export_elements(raw), rtt.ExtendedJsonDecoder(), here_issues, None,
                                 statuses_of, here_tally, here_plain)
    assert users == here and tally == here_tally and plain == here_plain and issues == here_issues
    assert sum(ticks) == len(keys) == data.read["users"] and len(ticks) > 2
