"""Records that must not end a run: hostile text, dates at the calendar's edges, deep nesting, odd ids,
and JSON Lines errors that name the real line.

Each class of problem has one mechanism in ``return_to_table.py`` and one test here with several members
of the class: the unit under test first, then an end-to-end run through the CLI harness showing that the
run completes, the report counts the issue, and ``data/raw/`` still holds what was read.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mongomock
import pytest
from bson import ObjectId, json_util
from builders import JAZZ_BRUNCH, MAYA, NOW, NOW_ISO, ZOE, CliRun, run_main, small_world, write_folder
from fake_anthropic import FakeMessagesAPI, text_reply
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_claude import claude_cli, last_user_turn, smart
from test_claude import write_world as write_claude_world
from test_cli import MONGO_ENV, assert_one_line_error

import return_to_table as rtt

# Every character the read-time sanitiser must remove (or turn into a space).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\u2028\u2029]")
HOSTILE_CHARACTERS = [
    *map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\u061c", "\u200b", "\u200c", "\u200d",
    "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)), "\u2060", *map(chr, range(0x2066, 0x206A)), "\ufeff",
    "\u2028", "\u2029",
]
MISSING = object()  # a record without the field at all


def folder_run(root: Path, users: list[dict[str, Any]], events: list[dict[str, Any]], *flags: str) -> CliRun:
    """A ``--dry-run`` of the small world's folder (a JSON array), from ``root/export`` into ``root/out``."""
    folder = write_folder(root / "export", users, events)
    return run_main(["--source", str(folder), "--now", NOW_ISO, "--dry-run", *flags], root / "out")


def raw_folder(root: Path, users_text: str, events_text: str | None = None) -> Path:
    """A folder whose files hold exactly the text given (events: the small world's, unless given)."""
    folder = root / "export"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.json").write_text(users_text, encoding="utf-8")
    if events_text is None:
        events_text = json_util.dumps(small_world()[1], json_options=json_util.RELAXED_JSON_OPTIONS)
    (folder / "events.json").write_text(events_text, encoding="utf-8")
    return folder


def user_lines() -> list[str]:
    """The small world's members, one relaxed Extended JSON document per line."""
    return [json_util.dumps(u, json_options=json_util.RELAXED_JSON_OPTIONS) for u in small_world()[0]]


def strings_in(value: Any) -> list[str]:
    """Every string (keys and values) in a decoded JSON value, iteratively."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def nested_record(levels: int, container: str = "object") -> dict[str, Any]:
    """A member record whose objects (or arrays) nest ``levels`` deep, the record itself being level 1."""
    value: Any = 1
    for _ in range(levels - 1):
        value = {"a": value} if container == "object" else [value]
    return {"_id": f"deep-{levels}", "firstName": "Deep", "x": value}


def nested_text(levels: int, container: str = "object") -> str:
    """``nested_record`` as JSON text, built without recursion (json.dumps could not write it)."""
    inner = '{"a":' * (levels - 1) + "1" + "}" * (levels - 1) if container == "object" else \
        "[" * (levels - 1) + "1" + "]" * (levels - 1)
    return f'{{"_id": "deep-{levels}", "firstName": "Deep", "x": {inner}}}'


# =============================================================================================
# Text: control characters stripped and every value bounded when read; data/raw/ keeps the original
# =============================================================================================


@pytest.mark.parametrize(("text", "clean"), [
    ("\x1b[31mJazz\x1b[0m Brunch", "Jazz Brunch"),  # a colour escape goes whole, no "[31m" left
    ("Jazz\x1b]0;owned\x07 Brunch", "Jazz Brunch"),  # an OSC (window title) sequence
    ("Jazz \x9b2J\x1bcBrunch", "Jazz Brunch"),  # C1 CSI and a two-character escape
    ("Jazz\u202e Brunch", "Jazz Brunch"),  # right-to-left override
    ("\u2066Jazz\u2069 Brunch\u200f", "Jazz Brunch"),  # isolates and a bidi mark
    ("Ja\u200bzz\u200d Bru\u2060nch\ufeff", "Jazz Brunch"),  # zero-width characters and a BOM
    ("Jazz\x00\x07\x08 Bru\x7f\x80\x9fnch", "Jazz Brunch"),  # C0, DEL and C1
    ("Jazz\x85Brunch", "Jazz Brunch"),  # NEL, a C1 line break: a space
    ("Jazz\tBrunch", "Jazz Brunch"),
    ("Jazz\r\n\r\nBrunch", "Jazz Brunch"),  # line breaks: one space
    ("Jazz\u2028Brunch", "Jazz Brunch"),
])
def test_clean_text_removes_every_kind_of_control_character(text, clean):
    cleaned, stripped, cut = rtt.clean_text(text, rtt.MAX_TEXT_CHARS)
    assert cleaned == clean
    assert (stripped, cut) == (True, False)


@given(st.text(alphabet=st.one_of(st.sampled_from(HOSTILE_CHARACTERS), st.characters()), max_size=600),
       st.sampled_from([rtt.MAX_TEXT_CHARS, rtt.MAX_LONG_TEXT_CHARS, 5]))
def test_no_control_character_survives_clean_text_and_the_bound_holds(text, limit):
    cleaned, stripped, cut = rtt.clean_text(text, limit)
    assert not CONTROL.search(cleaned)
    assert len(cleaned) <= limit
    whole = rtt.clean_text(text, 10 * len(text) + 10)[0]
    assert cut or cleaned == whole  # nothing is lost unless it says it was cut
    assert cut or len(whole) <= limit
    assert stripped == bool(CONTROL.search(text[: 4 * limit]))


@pytest.mark.parametrize(("field", "bound"), [
    ("firstName", rtt.MAX_TEXT_CHARS), ("name", rtt.MAX_TEXT_CHARS), ("occupation", rtt.MAX_TEXT_CHARS),
    ("homeNeighborhood", rtt.MAX_TEXT_CHARS), ("description", rtt.MAX_LONG_TEXT_CHARS),
    ("bio", rtt.MAX_LONG_TEXT_CHARS),
])
def test_every_text_field_is_cut_to_the_bound_of_its_class_and_counted(field, bound):
    record = {"_id": "m1", field: "x" * 1_000_000, "interests": ["y" * 5000, "music"],
              "nested": {"description": "z" * 5000, "list": ["w" * 300]}}
    screened = rtt.screen_records([record], "users")
    [clean] = screened.records
    assert len(clean[field]) == bound
    assert [len(i) for i in clean["interests"]] == [rtt.MAX_TEXT_CHARS, 5]
    assert len(clean["nested"]["description"]) == rtt.MAX_LONG_TEXT_CHARS
    assert len(clean["nested"]["list"][0]) == rtt.MAX_TEXT_CHARS
    assert screened.issues["text_values_cut"] == 4
    assert screened.originals == [record] and len(record[field]) == 1_000_000


def test_a_huge_value_is_cleaned_in_bounded_time():
    start = time.perf_counter()
    rtt.clean_text("\u200b" * 5_000_000, rtt.MAX_LONG_TEXT_CHARS)
    assert time.perf_counter() - start < 0.5


def hostile_world() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """The small world with hostile text in Maya's record and in her best event, a 5 MB description."""
    users, events = small_world()
    maya = next(u for u in users if u["_id"] == MAYA)
    maya.update(firstName="Ma\x00ya\u2066", lastName="Rivera\x1b]0;pwned\x07", occupation="AI\tSpecialist")
    jazz = next(e for e in events if e["_id"] == JAZZ_BRUNCH)
    description = "A live trio plays while we linger over eggs. " + "More jazz. " * 450_000  # ~5 MB
    jazz.update(name="\x1b[31mJazz\u202e Brunch\u200b", description=description)
    return users, events, {"description": description, "name": jazz["name"], "firstName": maya["firstName"]}


def test_hostile_text_never_reaches_the_outputs_while_data_raw_keeps_it_whole(tmp_path):
    users, events, original = hostile_world()
    run = folder_run(tmp_path, users, events)
    assert run.code == 0, run.err
    assert run.report()["data_issues"] == {"text_values_cut": 1, "text_values_with_control_characters": 4}
    [maya_match] = [m for m in run.matches if m["user_id"] == str(MAYA)]
    assert maya_match["event_id"] == str(JAZZ_BRUNCH) and maya_match["event_name"] == "Jazz Brunch"
    assert len(maya_match["event"]["description"]) == rtt.MAX_LONG_TEXT_CHARS
    [maya_message] = [m for m in run.messages if m["user_id"] == str(MAYA)]
    assert maya_message["message_text"].startswith("Hi Maya! ")
    processed = run.path("data/processed")
    for path in [*processed.glob("*.json"), *(run.root / "reports").glob("*.json")]:
        assert path.stat().st_size < 1_000_000, path
        assert not any(CONTROL.search(s) for s in strings_in(json.loads(path.read_text(encoding="utf-8")))), path
    for text in [run.out, run.err, run.report_path(".md").read_text(encoding="utf-8"),
                 *(p.read_text(encoding="utf-8") for p in (run.root / "logs").glob("*.log"))]:
        assert not CONTROL.search(text.replace("\n", ""))
    raw_events = json_util.loads(run.path("data/raw/events.json").read_text(encoding="utf-8"))
    raw_jazz = next(e for e in raw_events if e["_id"] == JAZZ_BRUNCH)
    assert raw_jazz["description"] == original["description"] and raw_jazz["name"] == original["name"]
    raw_users = json_util.loads(run.path("data/raw/users.json").read_text(encoding="utf-8"))
    assert next(u for u in raw_users if u["_id"] == MAYA)["firstName"] == original["firstName"]


# =============================================================================================
# Dates at the edges of the calendar: no date, counted, never a traceback
# =============================================================================================

EDGE_DATES = [
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999-23:59", {"$date": 1e300}, {"$date": -1e300}, {"$date": 10**30},
    {"$date": {"$numberLong": "9" * 30}}, {"$date": {"$numberLong": "-" + "9" * 5000}},
    {"$date": "9999-12-31T23:59:59-01:00"}, {"$date": {"$date": 0}}, 10**30, -(10**30), 10**400, 1e300,
    datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-1))),
    datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), datetime.max, datetime.min,
]


@pytest.mark.parametrize("value", EDGE_DATES, ids=lambda v: repr(v)[:40])
def test_a_date_at_the_edges_of_the_calendar_is_no_date(value):
    assert rtt.to_utc(value) is None


@pytest.mark.parametrize("value", ["0001-01-02T00:00:00Z", "9999-12-30T00:00:00Z", {"$date": 0},
                                   {"$date": {"$numberLong": "1700000000000"}}, 1700000000000])
def test_a_date_a_day_inside_the_calendar_is_still_read(value):
    assert rtt.to_utc(value) is not None


ISO_LIKE = st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
                         r"(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)?)?\Z")
ANY_DATE_VALUE = st.one_of(
    st.text(), ISO_LIKE, st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(timezones=st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                                                             max_value=timedelta(hours=23, minutes=59)))),
    st.datetimes(),
)


@given(st.one_of(ANY_DATE_VALUE, st.builds(lambda v: {"$date": v}, ANY_DATE_VALUE),
                 st.builds(lambda v: {"$date": {"$numberLong": v}}, st.one_of(st.text(), st.integers()))))
def test_any_string_or_number_given_to_to_utc_never_raises(value):
    moment = rtt.to_utc(value)
    if moment is not None:  # a date: in UTC, and shown in any time zone without overflowing
        assert moment.utcoffset() == timedelta(0)
        moment.astimezone(timezone(timedelta(hours=14)))
        moment.astimezone(timezone(timedelta(hours=-12)))


EXTENDED_JSON_KEYS = ["$date", "$numberLong", "$numberInt", "$numberDouble", "$numberDecimal", "$oid", "$binary",
                      "$uuid", "$regex", "$options", "$timestamp", "$code", "$scope", "$minKey", "$maxKey",
                      "$symbol", "$dbPointer", "$ref", "$id", "$undefined", "$type", "base64", "subType", "t", "i"]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30),
              ISO_LIKE),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(EXTENDED_JSON_KEYS), inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(EXTENDED_JSON_KEYS), JSON_VALUES, min_size=1, max_size=3))
@example({"$binary": None, "$type": False})  # json_util raised AttributeError on it (found by this test)
def test_any_extended_json_value_is_decoded_or_counted_never_raised(obj):
    decoder = rtt.ExtendedJsonDecoder()
    decoder.hook(obj)
    assert decoder.bad_values in (0, 1)


@pytest.mark.parametrize("value", [
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", {"$date": 1e300}, {"$date": -1e20},
    {"$date": {"$numberLong": "9" * 30}}, {"$date": "9999-12-31T23:59:59-01:00"},
], ids=lambda v: repr(v)[:40])
def test_an_event_dated_at_the_calendar_edges_is_counted_and_the_run_completes(tmp_path, value):
    users, events = small_world()
    events.append({"_id": "edge", "name": "Edge", "type": "public", "active": True, "startDate": value,
                   "participants": [MAYA], "categories": ["MUSIC"]})
    run = folder_run(tmp_path, users, events)
    assert run.code == 0, run.err
    assert run.report()["data_issues"]["events_without_valid_start_date"] == 1
    assert run.ranked == [str(ZOE), str(MAYA)]
    assert "Traceback" not in run.out + run.err


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00",
                                    "9999-12-31T23:59:59.999999-23:59", "0001-01-01T00:00:00-00:01"])
def test_now_at_the_edges_of_the_calendar_is_bad_input_in_one_line(run_cli, moment):
    assert_one_line_error(run_cli("--demo", "--now", moment), "--now")


@pytest.mark.parametrize("days", [10**12, 10**30, 999_999_999, 740_000])
def test_days_before_beyond_the_calendar_is_its_first_day(days):
    assert rtt.days_before(NOW, days) == datetime.min.replace(tzinfo=UTC)


def test_days_before_within_the_calendar_is_plain_subtraction():
    assert rtt.days_before(NOW, 30) == NOW - timedelta(days=30)
    assert rtt.days_before(NOW, 0) == NOW


@pytest.mark.parametrize("option", ["--cooldown-days", "--keep-logs"])
@pytest.mark.parametrize("days", [str(10**12), str(10**30)])
def test_day_counts_beyond_the_calendar_never_overflow(run_cli, option, days):
    run = run_cli("--demo", "--now", NOW_ISO, option, days)
    assert run.code == 0, run.err
    assert "Traceback" not in run.out + run.err


def mirror_messages(run: CliRun) -> Path:
    return run.root / "data" / "firebase" / rtt.DEFAULT_BASE_PATH / "messages.json"


def latest_report(run: CliRun) -> dict[str, Any]:
    """The report of the latest of several runs on one ``--out`` (campaign ids sort by time)."""
    latest = max((run.root / "reports").glob("return_to_table_report_*.json"))
    return json.loads(latest.read_text(encoding="utf-8"))


def test_a_huge_cooldown_leaves_out_everyone_ever_messaged(tmp_path):
    folder = write_folder(tmp_path / "export", *small_world())
    first = run_main(["--source", str(folder), "--now", NOW_ISO], tmp_path / "out")
    assert first.code == 0 and len(first.messages) == 2
    second = run_main(["--source", str(folder), "--now", NOW_ISO, "--cooldown-days", str(10**12)], tmp_path / "out")
    assert second.code == rtt.ExitCode.ATTENTION, second.err  # nobody left to message today
    assert latest_report(second)["summary"]["users_left_out_by_cooldown"] == 2


@pytest.mark.parametrize("poison", ["9999-12-31T23:59:59-01:00", 1e300, "x", {"$date": 1e300}, None, [2026]],
                         ids=repr)
def test_a_poisoned_generated_at_in_the_dashboard_is_skipped_and_counted(tmp_path, poison):
    folder = write_folder(tmp_path / "export", *small_world())
    first = run_main(["--source", str(folder), "--now", NOW_ISO], tmp_path / "out")
    assert first.code == 0
    listing = json.loads(mirror_messages(first).read_text(encoding="utf-8"))
    listing["messages"][0]["generated_at"] = poison
    mirror_messages(first).write_text(json.dumps(listing), encoding="utf-8")
    second = run_main(["--source", str(folder), "--now", NOW_ISO], tmp_path / "out")
    assert second.code == 0, second.err
    assert latest_report(second)["data_issues"]["dashboard_messages_without_valid_generated_at"] == 1
    assert latest_report(second)["summary"]["users_left_out_by_cooldown"] == 1
    third = run_main(["--source", str(folder), "--now", NOW_ISO], tmp_path / "out")  # every later run, too
    assert third.code == 0, third.err


# =============================================================================================
# Nesting beyond MAX_NESTING_DEPTH: refused per record or per answer, never a RecursionError
# =============================================================================================


@pytest.mark.parametrize("container", ["object", "array"])
def test_a_record_nested_exactly_to_the_bound_is_kept_and_one_level_more_is_refused(container):
    screened = rtt.screen_records([nested_record(rtt.MAX_NESTING_DEPTH, container),
                                   nested_record(rtt.MAX_NESTING_DEPTH + 1, container)], "users")
    assert [r["_id"] for r in screened.records] == [f"deep-{rtt.MAX_NESTING_DEPTH}"]
    assert screened.issues == {"users_nested_too_deep": 1}


@pytest.mark.parametrize("levels", [100, 5000, 200_000])
def test_a_record_thousands_of_levels_deep_is_refused_without_recursion(levels):
    screened = rtt.screen_records([nested_record(levels), {"_id": "ok"}], "events")
    assert [r["_id"] for r in screened.records] == ["ok"]
    assert screened.issues == {"events_nested_too_deep": 1}


@pytest.mark.parametrize("form", ["array", "lines"])
@pytest.mark.parametrize(("levels", "container"), [(65, "object"), (500, "object"), (5000, "object"),
                                                   (5000, "array"), (100_000, "array")])
def test_a_deep_record_in_an_export_file_is_skipped_and_counted_not_the_file(tmp_path, form, levels, container):
    lines = [*user_lines(), nested_text(levels, container)]
    lines.insert(2, nested_text(levels, container))  # one in the middle, one at the end
    text = "[" + ",\n".join(lines) + "]" if form == "array" else "\n".join(lines) + "\n"
    folder = raw_folder(tmp_path, text)
    run = run_main(["--source", str(folder), "--now", NOW_ISO, "--dry-run"], tmp_path / "out")
    assert run.code == 0, run.err
    assert run.report()["data_issues"]["users_nested_too_deep"] == 2
    assert run.ranked == [str(ZOE), str(MAYA)]
    assert len(run.load("data/raw/users.json")) == len(small_world()[0])


@pytest.mark.parametrize("text", ["[" + "[" * 5000, '[{"_id": "a"}, ' + '{"a":' * 5000])
def test_a_deep_unterminated_array_element_is_invalid_json_in_one_line(run_cli, tmp_path, text):
    folder = raw_folder(tmp_path, text)
    assert_one_line_error(run_cli("--source", str(folder), "--now", NOW_ISO), "users.json", "invalid JSON")


def deep_mongo_client() -> mongomock.MongoClient:
    """The small world in mongomock, plus a member 300 levels deep and members with odd ids."""
    users, events = small_world()
    client = mongomock.MongoClient()
    odd = [{"_id": odd_id, "firstName": "Odd", "interests": ["music"]} for odd_id in (42, None, 4.5, {"a": 1})]
    client["testdb"]["user"].insert_many([*users, nested_record(300), *odd])
    client["testdb"]["event"].insert_many([*events, {**nested_record(80), "_id": "deep-event"}])
    return client


def test_a_deep_document_and_odd_ids_from_mongodb_are_skipped_and_counted(tmp_path):
    run = run_main(["--source", "mongo", "--now", NOW_ISO, "--dry-run"], tmp_path / "out", MONGO_ENV,
                   mongo_client=deep_mongo_client())
    assert run.code == 0, run.err
    issues = run.report()["data_issues"]
    assert issues["users_nested_too_deep"] == 1 and issues["events_nested_too_deep"] == 1
    assert issues["users_without_usable_id"] == 4
    assert run.ranked == [str(ZOE), str(MAYA)]
    assert len(run.load("data/raw/users.json")) == len(small_world()[0])


def reply(text: str) -> SimpleNamespace:
    """A Messages API reply as ``answer_json`` reads it: one text block."""
    return SimpleNamespace(stop_reason="end_turn", content=[SimpleNamespace(type="text", text=text)])


@pytest.mark.parametrize("text", [
    "[" * 100_000, "{" * 100_000, '{"a":' * 5000, '{"a":[' * 10_000, '{"' * 50_000,
    '{"a": ' + "[" * 100 + "1" + "]" * 100 + "}",  # decodable, but deeper than the bound
    "Here it is: " + '{"a":' * 200 + "1" + "}" * 200,  # inside prose
    "Here it is: " + '{"a":' * 5000,
])
def test_claude_answers_of_deep_brackets_are_invalid_answers_quickly(text):
    start = time.perf_counter()
    with pytest.raises(rtt.InvalidAnswer):
        rtt.answer_json(reply(text))
    assert time.perf_counter() - start < 0.5


def test_an_answer_nested_to_the_bound_is_still_read():
    levels = rtt.MAX_NESTING_DEPTH - 1
    text = '{"event_id": "e", "x": ' + "[" * levels + "]" * levels + "}"
    assert rtt.answer_json(reply(text))["event_id"] == "e"


@pytest.fixture
def fake():
    with FakeMessagesAPI(default=smart) as server:
        yield server


def test_deep_claude_answers_get_the_corrective_retry_then_the_rules(fake, tmp_path):
    fake.queue(lambda r: text_reply("[" * 100_000), lambda r: text_reply('{"a":' * 5000))
    run = claude_cli(fake, write_claude_world(tmp_path / "export"), tmp_path / "out", "--limit", "1")
    assert run.code == 0, run.err
    assert run.matches[0]["matcher"] == "rules"
    assert run.report()["fallbacks"]["matching"] == 1
    assert f"deeper than {rtt.MAX_NESTING_DEPTH} levels" in last_user_turn(fake.requests[1])
    assert "Traceback" not in run.out + run.err


# =============================================================================================
# Odd _id: that record is skipped and counted; only a file that is not a list of documents is refused
# =============================================================================================

ODD_IDS = [42, None, 4.5, True, {"a": 1}, {"_id": "nested"}, [1, 2], "", "   ", "bad\x1bid", "x" * 201,
           "zw\u200bid", MISSING]


@pytest.mark.parametrize("odd_id", ODD_IDS, ids=lambda v: "missing" if v is MISSING else repr(v)[:20])
def test_a_record_with_an_odd_id_is_skipped_and_counted(odd_id):
    odd = {"firstName": "Odd"} if odd_id is MISSING else {"_id": odd_id, "firstName": "Odd"}
    good = [{"_id": ObjectId("6500000000000000000000b1")}, {"_id": "m-2"}, {"_id": {"$oid": "65" * 12}}]
    screened = rtt.screen_records([good[0], odd, *good[1:]], "users")
    assert screened.records == good and screened.originals == good
    assert screened.issues == {"users_without_usable_id": 1}


@pytest.mark.parametrize("collection", ["users", "events"])
def test_records_with_odd_ids_in_an_export_are_skipped_and_the_run_completes(tmp_path, collection):
    users, events = small_world()
    records = users if collection == "users" else events
    records += [{"_id": odd_id, "name": "Odd", "firstName": "Odd"} for odd_id in (42, None, 4.5, {"a": 1}, [1])]
    records += [{"_id": {"$oid": "zz"}, "name": "Bad oid"}, {"name": "No id"}]
    run = folder_run(tmp_path, users, events)
    assert run.code == 0, run.err
    assert run.report()["data_issues"][f"{collection}_without_usable_id"] == 7
    assert "Step 1: 7 records skipped" in run.out
    assert run.ranked == [str(ZOE), str(MAYA)]
    assert len(run.matches) == 2


@pytest.mark.parametrize("text", ["not json at all", "[1, 2]", '"a string"\n', '{"_id": "a"}\n7\n', "[null]",
                                  '[{"_id": "a"}', '[{"_id": "a"}] trailing', '[{"_id": "a"} {"_id": "b"}]'])
def test_only_a_file_that_is_not_a_list_of_documents_is_refused_whole(run_cli, tmp_path, text):
    folder = raw_folder(tmp_path, text)
    assert_one_line_error(run_cli("--source", str(folder), "--now", NOW_ISO), "users.json")


# =============================================================================================
# JSON Lines (and JSON array) errors name the file's real line
# =============================================================================================


@pytest.mark.parametrize(("before", "bad_line"), [
    ([], 1),
    ([""], 2),
    (["", "", ""], 4),
    (["member", "", "   "], 4),
    (["member", "member", "", "member"], 5),
    (["member with U+2028", "member"], 3),  # a raw U+2028 inside a string value does not end a line
])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_json_lines_error_names_the_real_line(run_cli, tmp_path, before, bad_line, newline):
    members = iter(user_lines())
    lines = [next(members) if line == "member" else
             next(members).replace('"Maya"', '"Ma\u2028ya"') if line == "member with U+2028" else line
             for line in before]
    text = newline.join([*lines, '{"_id": "bad", "firstName": }', *members]) + newline
    run = run_cli("--source", str(raw_folder(tmp_path, text)), "--now", NOW_ISO)
    assert_one_line_error(run, "users.json", f"line {bad_line}:", "invalid JSON")


def test_a_json_array_error_names_the_real_line(run_cli, tmp_path):
    text = '\n\n[\n  {"_id": "a1"},\n\n  {"_id": }\n]\n'
    run = run_cli("--source", str(raw_folder(tmp_path, text)), "--now", NOW_ISO)
    assert_one_line_error(run, "users.json", "invalid JSON", "line 6 column 11")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_json_lines_with_blank_lines_and_separators_in_values_load_every_record(tmp_path, newline):
    lines = user_lines()
    lines[0] = lines[0].replace('"Maya"', '"Ma\u2028y\u0085a"')
    text = newline.join(["", *lines[:3], "", "  ", *lines[3:], ""])
    run = run_main(["--source", str(raw_folder(tmp_path, text)), "--now", NOW_ISO, "--dry-run"], tmp_path / "out")
    assert run.code == 0, run.err
    assert len(run.load("data/raw/users.json")) == len(lines)
    assert run.report()["data_issues"] == {"text_values_with_control_characters": 1}
