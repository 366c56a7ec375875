"""Hostile data and a careless host never make the dashboard lose values or the report lie.

Each class of trouble is driven end to end through the one CLI harness (``run_cli``) against
``tests/fake_rtdb.FakeRealtimeDatabase`` on 127.0.0.1 and against the local mirror (no
``FIREBASE_DATABASE_URL``), and every run is checked to write nothing outside its ``--out``:

* Firebase keys: a key over the database's 768-byte limit, or keys that spell the same after
  sanitising (``a.b``, ``a_b``, ``a/b``), are renamed per record and counted; the write goes through.
* ``FIREBASE_BASE_PATH`` is a path inside the database: ``..``, ``../../x`` and friends exit 2.
* ``--now`` more than a day ahead of the clock needs ``--dry-run`` (exit 2 otherwise).
* A write answered 200 with a body that is not what was sent (a captive portal's HTML page) is not
  written: listed in ``firebase.not_written``, exit 3.
* Empty input (``[]``, an empty or blank file, an empty collection) is reported as such, exit 3.

All members and contact details are fictional (``@example.com``, ``+1555`` numbers).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mongomock
import pytest
from builders import CliRun, leaves, run_main
from fake_rtdb import CAPTIVE_PORTAL_PAGE, FakeRealtimeDatabase
from hypothesis import given, settings
from hypothesis import strategies as st
from test_firebase import BASE, FIREBASE_NOW_ISO, TOKEN, items_of, rest_env, world_docs

import return_to_table as rtt
from return_to_table import (
    MAX_KEY_BYTES,
    FirebaseError,
    LocalMirrorTransport,
    RestTransport,
    UsageError,
    check_key,
    firebase_ready,
    key_digest,
    storable_keys,
)

Cli = Callable[..., CliRun]
HOSTILE = "u00"  # the member whose document carries the hostile keys (ranked, selected and matched)
MIRROR = "data/firebase"  # the local mirror under --out


@pytest.fixture
def db() -> Iterator[FakeRealtimeDatabase]:
    with FakeRealtimeDatabase(auth_token=TOKEN) as server:
        yield server


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file() or path.is_symlink()}


def assert_stays_in_out(tmp_path: Path, before: set[Path], run: CliRun) -> None:
    """Every file that appeared under ``tmp_path`` since ``before`` was taken is under the run's --out."""
    outside = {p for p in files_under(tmp_path) - before if not p.is_relative_to(run.root)}
    assert not outside, sorted(outside)


def write_source(folder: Path, users: list[dict[str, Any]], events: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.json").write_text(json.dumps(users, indent=1), encoding="utf-8")
    (folder / "events.json").write_text(json.dumps(events, indent=1), encoding="utf-8")
    return folder


def hostile_world(folder: Path, fields: dict[str, Any]) -> Path:
    """Ten dormant members; the first one's document also holds ``fields``."""
    users, events = world_docs(10)
    users[0].update(fields)
    return write_source(folder, users, events)


def campaign(run_cli: Cli, source: Path, env: dict[str, str] | None = None, *args: str) -> CliRun:
    return run_cli("--source", str(source), "--now", FIREBASE_NOW_ISO, "--llm", "off", *args, env=env or {})


def one_line(text: str, prefix: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), text
    assert "Traceback" not in text
    return lines[0]


# =============================================================================================
# Firebase keys: renamed per record, counted, never a failed write
# =============================================================================================

LONG = "k" * (MAX_KEY_BYTES + 1)
HOSTILE_FIELDS = {
    "one key over the limit": {LONG: "long"},
    "a very long key": {"note " * 2000: "very long"},
    "multi-byte key over the limit": {"é" * 385: "accents"},
    "colliding keys": {"a.b": 1, "a_b": 2, "a/b": 3},
    "colliding nested keys": {"prefs": {"v.2": "dot", "v_2": "underscore", "v#2": "hash"}},
    "collision and length at once": {LONG + ".x": "dot", LONG + "/x": "slash"},
    "a long key in a list": {"history": [{LONG: 1}, {LONG: 2}]},
}


def all_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(k for child in value.values() for k in all_keys(child))]
    if isinstance(value, list):
        return [k for child in value for k in all_keys(child)]
    return []


def stored_member(record: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The part of a stored member record that holds ``fields`` (after renaming)."""
    wanted = firebase_ready(fields)
    return {key: record[key] for key in wanted}


@dataclass
class HostileRun:
    """One campaign on ``hostile_world`` against its own database, and what was under ``tmp`` before it ran."""

    fields: dict[str, Any]
    db: FakeRealtimeDatabase
    run: CliRun
    tmp: Path
    before: set[Path]


@pytest.fixture(scope="module", params=HOSTILE_FIELDS.values(), ids=HOSTILE_FIELDS.keys())
def hostile_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    """Each kind of hostile keys run once; the three tests below only read the run and its database."""
    tmp = tmp_path_factory.mktemp("hostile")
    source = hostile_world(tmp / "world", request.param)
    before = files_under(tmp)
    with FakeRealtimeDatabase(auth_token=TOKEN) as db:
        run = run_main(["--source", str(source), "--now", FIREBASE_NOW_ISO, "--llm", "off"], tmp / "out",
                       rest_env(db))
        yield HostileRun(request.param, db, run, tmp, before)


def test_hostile_keys_in_a_member_never_stop_the_users_and_matches_writes(hostile_run: HostileRun) -> None:
    db, run = hostile_run.db, hostile_run.run
    assert run.code == 0, run.err
    assert run.err == ""
    assert run.report()["firebase"]["not_written"] == []
    users, matches, messages = items_of(db, "users"), items_of(db, "matches"), items_of(db, "messages")
    assert len(users) == len(matches) == len(messages) == 10
    assert HOSTILE in {u["id"] for u in users} and HOSTILE in {m["user_id"] for m in matches}
    assert all(r.status is not None and r.status < 400 for r in db.requests), [r.status for r in db.requests]
    assert_stays_in_out(hostile_run.tmp, hostile_run.before, run)


def test_hostile_keys_lose_no_value_in_the_dashboard(hostile_run: HostileRun) -> None:
    db, run, fields = hostile_run.db, hostile_run.run, hostile_run.fields
    assert run.code == 0, run.err
    user = next(u for u in items_of(db, "users") if u["id"] == HOSTILE)
    match = next(m for m in items_of(db, "matches") if m["user_id"] == HOSTILE)
    for record in (user, match["user"]):
        kept = stored_member(record, fields)
        assert sorted(map(str, leaves(kept))) == sorted(map(str, leaves(fields)))
        assert all(len(key.encode("utf-8")) <= MAX_KEY_BYTES for key in all_keys(kept))


def test_hostile_keys_are_counted_in_the_reports_firebase_section(hostile_run: HostileRun) -> None:
    run = hostile_run.run
    firebase = run.report()["firebase"]
    changes: set[tuple[str, str | None]] = set()
    firebase_ready(hostile_run.fields, changes)
    assert firebase["keys_renamed"] == len(changes) > 0  # each distinct change once, however often it is written
    assert firebase["keys_dropped"] == 0
    assert firebase["key_changes"] and all("->" in line and "\n" not in line for line in firebase["key_changes"])
    assert "Keys changed to be storable" in run.report_path(".md").read_text(encoding="utf-8")


@pytest.mark.parametrize("fields", HOSTILE_FIELDS.values(), ids=HOSTILE_FIELDS.keys())
def test_hostile_keys_go_through_the_local_mirror_too(
        run_cli: Cli, tmp_path: Path, fields: dict[str, Any]) -> None:
    source = hostile_world(tmp_path / "world", fields)
    before = files_under(tmp_path)
    run = campaign(run_cli, source)
    assert run.code == 0, run.err
    assert run.report()["firebase"]["not_written"] == []
    users = run.load(f"{MIRROR}/{BASE}/users.json")["users"]
    matches = run.load(f"{MIRROR}/{BASE}/matches.json")["matches"]
    assert len(users) == len(matches) == 10
    user = next(u for u in users if u["id"] == HOSTILE)
    assert sorted(map(str, leaves(stored_member(user, fields)))) == sorted(map(str, leaves(fields)))
    assert_stays_in_out(tmp_path, before, run)


def test_a_key_that_needs_no_change_keeps_its_name_and_the_others_get_the_digest_of_their_own_key() -> None:
    ready = firebase_ready({"a.b": 1, "a_b": 2, "a/b": 3})
    assert ready == {f"a_b_{key_digest('a.b')}": 1, "a_b": 2, f"a_b_{key_digest('a/b')}": 3}


def test_keys_that_spell_alike_are_all_suffixed_when_none_of_them_is_storable_as_is() -> None:
    assert firebase_ready({"a.b": 1, "a#b": 2}) == {f"a_b_{key_digest('a.b')}": 1, f"a_b_{key_digest('a#b')}": 2}


def test_a_lone_key_with_forbidden_characters_is_only_sanitised() -> None:
    assert firebase_ready({"prefs.v2": True, "links": {"example.com": "home"}}) == {
        "prefs_v2": True, "links": {"example_com": "home"}}


@pytest.mark.parametrize("key", [LONG, "é" * 385, "x" * 10_000, "€" * 300, "a.b" * 300])
def test_a_long_key_is_cut_to_the_limit_and_ends_with_the_digest_of_the_key_as_found(key: str) -> None:
    (name,) = firebase_ready({key: 1})
    check_key(name, "test")
    assert len(name.encode("utf-8")) <= MAX_KEY_BYTES
    assert name.endswith(f"_{key_digest(key)}")


def test_long_keys_that_differ_only_past_the_cut_stay_apart() -> None:
    ready = firebase_ready({LONG + "1": "one", LONG + "2": "two"})
    assert sorted(ready.values()) == ["one", "two"]


def test_a_key_with_a_lone_surrogate_is_renamed_not_sent() -> None:
    (name,) = firebase_ready({"bad\ud800key": 1})
    check_key(name, "test")
    with pytest.raises(FirebaseError):
        check_key("bad\ud800key", "test")


def test_a_renamed_key_that_is_still_taken_is_dropped_and_reported() -> None:
    taken = f"a_b_{key_digest('a.b')}"
    changes: set[tuple[str, str | None]] = set()
    ready = firebase_ready({"a.b": 1, "a_b": 2, taken: 3}, changes)
    assert ready == {"a_b": 2, taken: 3}
    assert changes == {("a.b", None)}


key_text = (st.text(alphabet=st.sampled_from("ab_./#$[]\x00\x7fé€ \ud800"), max_size=6)
            | st.sampled_from([LONG, LONG + ".", LONG + "/", "_" * MAX_KEY_BYTES + "x"]))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(key_text, st.integers(), max_size=8))
def test_storable_keys_keep_every_value_under_a_valid_and_distinct_key_whatever_the_keys(
        doc: dict[str, int]) -> None:
    changes: set[tuple[str, str | None]] = set()
    ready = firebase_ready(doc, changes)
    for key in ready:
        check_key(key, "property")
    dropped = [original for original, stored in changes if stored is None]
    assert len(ready) == len(doc) - len(dropped)
    assert sorted(ready.values()) == sorted(v for k, v in doc.items() if k not in dropped)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(key_text, st.integers(), max_size=8))
def test_storable_keys_depend_on_the_keys_not_on_their_order(doc: dict[str, int]) -> None:
    assert storable_keys(list(doc)) == storable_keys(list(reversed(doc)))


# =============================================================================================
# FIREBASE_BASE_PATH: a path inside the database, never outside --out
# =============================================================================================

BAD_BASE_PATHS = ["..", "../x", "../../x", "../../../x", "../../../../../../../tmp/escaped", "a/../../..", "./x",
                  ".", "a//b", "a\\..\\..\\x", "C:\\Users\\x", "x.y", "a$b", "a#b", "[a]", "ctl\x01", "new\nline",
                  "k" * 769,
                  "Leo/" + "é" * 385]
GOOD_BASE_PATHS = {"Leo": "Leo", "/Staging/": "Staging", "Team A/Staging": "Team A/Staging", "/": "",
                   "Zoë": "Zoë", "a-b_c": "a-b_c"}


@pytest.mark.parametrize("base", BAD_BASE_PATHS)
def test_a_base_path_that_could_leave_the_database_path_exits_2_before_anything_is_written(
        run_cli: Cli, tmp_path: Path, base: str) -> None:
    before = files_under(tmp_path)
    run = run_cli("--demo", "--now", FIREBASE_NOW_ISO, env={"FIREBASE_BASE_PATH": base})
    assert run.code == 2
    assert "FIREBASE_BASE_PATH" in one_line(run.err, "error: ")
    assert files_under(tmp_path) == before and not run.root.exists()


@pytest.mark.parametrize("base", BAD_BASE_PATHS[:6] + ["a#b"])
def test_a_bad_base_path_is_refused_for_the_rest_api_too(db: FakeRealtimeDatabase, run_cli: Cli, tmp_path: Path,
                                                         base: str) -> None:
    source = hostile_world(tmp_path / "world", {})
    before = files_under(tmp_path)
    run = campaign(run_cli, source, {**rest_env(db), "FIREBASE_BASE_PATH": base})
    assert run.code == 2
    assert "FIREBASE_BASE_PATH" in one_line(run.err, "error: ")
    assert db.requests == []
    assert files_under(tmp_path) - before == set()


@pytest.mark.parametrize(("base", "path"), GOOD_BASE_PATHS.items())
def test_settings_read_a_database_path(base: str, path: str) -> None:
    assert rtt.Settings.from_env({"FIREBASE_BASE_PATH": base}).firebase_base_path == path


@pytest.mark.parametrize("base", ["..", "../../x", "a/../..", "a//b"])
def test_the_transports_refuse_a_bad_base_path_themselves(db: FakeRealtimeDatabase, tmp_path: Path, base: str) -> None:
    with pytest.raises(UsageError):
        LocalMirrorTransport(tmp_path / "mirror", base)
    with pytest.raises(UsageError):
        RestTransport(db.url, base, auth_token=TOKEN)


@pytest.mark.parametrize("base", ["Staging", "/Team A/Staging/"])
def test_the_mirror_writes_under_its_base_path_inside_out(run_cli: Cli, tmp_path: Path,
                                                           base: str) -> None:
    source = hostile_world(tmp_path / "world", {})
    before = files_under(tmp_path)
    run = campaign(run_cli, source, {"FIREBASE_BASE_PATH": base})
    assert run.code == 0, run.err
    assert len(run.load(f"{MIRROR}/{base.strip('/')}/users.json")["users"]) == 10
    assert_stays_in_out(tmp_path, before, run)


def test_a_mirror_base_folder_that_is_a_symlink_out_of_out_exits_2_and_writes_nothing_there(
        run_cli: Cli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mirror = tmp_path / "out" / MIRROR
    mirror.mkdir(parents=True)
    (mirror / BASE).symlink_to(elsewhere, target_is_directory=True)
    run = campaign(run_cli, hostile_world(tmp_path / "world", {}))
    assert run.code == 2
    assert "outside" in one_line(run.err, "error: ")
    assert list(elsewhere.iterdir()) == []


# =============================================================================================
# --now in the future: a rehearsal, so --dry-run only
# =============================================================================================

AHEAD = [timedelta(days=1, minutes=5), timedelta(days=2), timedelta(days=30), timedelta(days=400),
         timedelta(days=365 * 10)]


def ahead_of_the_clock(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("delta", AHEAD, ids=str)
def test_a_demo_in_the_future_without_dry_run_exits_2_and_writes_nothing(run_cli: Cli, tmp_path: Path,
                                                                         delta: timedelta) -> None:
    before = files_under(tmp_path)
    run = run_cli("--demo", "--now", ahead_of_the_clock(delta))
    assert run.code == 2
    line = one_line(run.err, "error: ")
    assert "--now" in line and "--dry-run" in line
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("delta", AHEAD[1:4], ids=str)
def test_a_campaign_in_the_future_without_dry_run_sends_nothing_to_firebase(
        db: FakeRealtimeDatabase, run_cli: Cli, tmp_path: Path, delta: timedelta) -> None:
    source = hostile_world(tmp_path / "world", {})
    before = files_under(tmp_path)
    run = run_cli("--source", str(source), "--now", ahead_of_the_clock(delta), "--llm", "off", env=rest_env(db))
    assert run.code == 2
    assert "--dry-run" in one_line(run.err, "error: ")
    assert db.requests == [] and files_under(tmp_path) == before


@pytest.mark.parametrize("delta", AHEAD[:3], ids=str)
def test_a_dry_run_may_rehearse_in_the_future(run_cli: Cli, tmp_path: Path, delta: timedelta) -> None:
    before = files_under(tmp_path)
    run = run_cli("--demo", "--dry-run", "--now", ahead_of_the_clock(delta))
    assert run.code == 0, run.err
    assert not (run.root / MIRROR).exists()
    assert_stays_in_out(tmp_path, before, run)


@pytest.mark.parametrize("delta", [timedelta(hours=1), timedelta(hours=23, minutes=50), timedelta(days=-400)],
                         ids=str)
def test_a_now_within_a_day_of_the_clock_or_in_the_past_may_write(run_cli: Cli, tmp_path: Path,
                                                                  delta: timedelta) -> None:
    before = files_under(tmp_path)
    run = run_cli("--demo", "--now", ahead_of_the_clock(delta))
    assert run.code == 0, run.err
    assert (run.root / MIRROR / BASE / "messages.json").is_file()
    assert_stays_in_out(tmp_path, before, run)


# =============================================================================================
# Writes answered 200 with something else than what was sent: not written, exit 3
# =============================================================================================

NOT_AN_ECHO = {
    "captive portal page": (200, CAPTIVE_PORTAL_PAGE, "text/html; charset=utf-8"),
    "proxy error page as 200": (200, "<html><body>Bad gateway</body></html>", "text/html"),
    "html served as json": (200, "<html></html>", "application/json"),
    "a different json value": (200, {"ok": True}, "application/json; charset=utf-8"),
    "json null": (200, "null", "application/json"),
    "an empty 200": (200, b"", "application/json"),
    "a 204 we never asked for": (204, None, "application/json"),
}


@pytest.mark.parametrize(("status", "body", "content_type"), NOT_AN_ECHO.values(), ids=NOT_AN_ECHO.keys())
def test_writes_answered_without_the_data_are_not_written_and_the_run_exits_3(
        db: FakeRealtimeDatabase, run_cli: Cli, tmp_path: Path, status: int, body: Any,
        content_type: str) -> None:
    db.answer_writes_with(status, body, content_type)
    source = hostile_world(tmp_path / "world", {})
    before = files_under(tmp_path)
    run = campaign(run_cli, source, rest_env(db))
    assert run.code == 3, run.err
    assert "Firebase writes failed" in one_line(run.err, "error: ")
    firebase = run.report()["firebase"]
    assert firebase["written"] == []
    assert {"users", "events"} <= set(firebase["not_written"])
    for name in ("matches", "messages"):
        assert sum(item.startswith(f"{name} (") for item in firebase["not_written"]) == 10, name
    assert db.get_rendered("") is None  # nothing reached the data
    assert_stays_in_out(tmp_path, before, run)


@pytest.mark.parametrize("path", ["users", "events", "matches", "messages"])
def test_one_path_behind_a_portal_is_listed_as_not_written_and_the_rest_is_written(
        db: FakeRealtimeDatabase, run_cli: Cli, tmp_path: Path, path: str) -> None:
    prefix = f"{BASE}/{path}"
    target = prefix if path in ("users", "events") else f"{prefix}/{path}/0"
    db.answer_writes_with(path=target)
    run = campaign(run_cli, hostile_world(tmp_path / "world", {}), rest_env(db))
    assert run.code == 3
    firebase = run.report()["firebase"]
    listed = (path, "matches") if path == "messages" else (path,)  # a match goes only with its message
    assert firebase["not_written"] and all(item.startswith(listed) for item in firebase["not_written"])
    assert not set(listed) & set(firebase["written"])
    assert f"campaigns/{run.report()['campaign_id']}/users" in firebase["written"]
    assert "Not written" in run.report_path(".md").read_text(encoding="utf-8")


def test_the_report_lists_what_the_portal_swallowed_in_markdown(db: FakeRealtimeDatabase, run_cli: Cli,
                                                                  tmp_path: Path) -> None:
    db.answer_writes_with()
    run = campaign(run_cli, hostile_world(tmp_path / "world", {}), rest_env(db))
    markdown = run.report_path(".md").read_text(encoding="utf-8")
    assert "- Written: 0 paths" in markdown and "- Not written: users" in markdown
    assert "<html" not in markdown  # the page itself is never quoted


def transport(db: FakeRealtimeDatabase) -> RestTransport:
    return RestTransport(db.url, BASE, auth_token=TOKEN, backoff=0.01)


@pytest.mark.parametrize(("status", "body", "content_type"), NOT_AN_ECHO.values(), ids=NOT_AN_ECHO.keys())
def test_rest_put_and_patch_refuse_an_answer_that_is_not_the_data_sent(
        db: FakeRealtimeDatabase, status: int, body: Any, content_type: str) -> None:
    db.answer_writes_with(status, body, content_type)
    rest = transport(db)
    with pytest.raises(FirebaseError, match="not counted as written"):
        rest.put("users", {"users": [{"id": "u1"}], "count": 1})
    with pytest.raises(FirebaseError, match="not counted as written"):
        rest.put("matches/matches/0", {"user_id": "u1"}, if_match="null_etag")
    with pytest.raises(FirebaseError, match="not counted as written"):
        rest.patch("matches", {"count": 1, "updatedAt": "2026-03-01T12:00:00.000Z"})


@pytest.mark.parametrize("value", [
    {"count": 1}, {"users": [{"id": "u1", "tags": ["a", None, "b"]}], "count": 1}, {"ratio": 1.0, "n": 2},
    {"empty": {}, "nothing": None, "kept": 0}, "a string", 12345678901234567890,
])
def test_rest_put_accepts_the_databases_echo_of_what_was_sent(db: FakeRealtimeDatabase, value: Any) -> None:
    assert transport(db).put("x", value).ok
    transport(db).patch("y", {"count": 2, "updatedAt": "now"})
    assert [r.status for r in db.requests] == [200, 200]
    assert all("print" not in r.query for r in db.requests)


def test_the_fake_answers_writes_with_html_stores_nothing_and_still_answers_reads(db: FakeRealtimeDatabase) -> None:
    db.set(f"{BASE}/users", {"count": 1})
    db.answer_writes_with(count=1)
    rest = transport(db)
    with pytest.raises(FirebaseError):
        rest.put("users", {"count": 2})
    assert db.requests[-1].status == 200
    assert rest.get("users")[0] == {"count": 1}
    rest.put("users", {"count": 3})  # count=1: the next write reaches the database again
    assert db.get_rendered(f"{BASE}/users") == {"count": 3}


# =============================================================================================
# Empty input: reported, exit 3
# =============================================================================================

EMPTY_TEXTS = {"an empty array": "[]", "an empty array with spaces": "[ \n ]", "an empty file": "",
               "whitespace": "  \n\t \n", "blank lines": "\n\n\n"}


def source_with(folder: Path, **texts: str) -> Path:
    """The ten-member world with ``users.json`` and/or ``events.json`` replaced by ``texts``."""
    hostile_world(folder, {})
    for name, text in texts.items():
        (folder / f"{name}.json").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("text", EMPTY_TEXTS.values(), ids=EMPTY_TEXTS.keys())
@pytest.mark.parametrize("which", ["users", "events"])
def test_an_empty_collection_file_is_reported_as_empty_input_and_exits_3(
        run_cli: Cli, tmp_path: Path, which: str, text: str) -> None:
    source = source_with(tmp_path / "world", **{which: text})
    before = files_under(tmp_path)
    run = campaign(run_cli, source)
    assert run.code == 3, run.err
    assert "empty input" in one_line(run.err, "warning: ") and which in run.err
    assert f"WARNING - Empty input: no {which} in {source / f'{which}.json'}" in run.out
    assert run.report()["empty_input"] == [which]
    assert "**Empty input:**" in run.report_path(".md").read_text(encoding="utf-8")
    assert_stays_in_out(tmp_path, before, run)


def test_both_files_empty_name_both_collections(run_cli: Cli, tmp_path: Path) -> None:
    run = campaign(run_cli, source_with(tmp_path / "world", users="[]", events=""))
    assert run.code == 3
    assert run.report()["empty_input"] == ["users", "events"]
    assert run.out.count("WARNING - Empty input") == 2
    assert "users and no events" in one_line(run.err, "warning: ")


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--quiet"]], ids=["write", "dry-run", "quiet"])
def test_empty_input_exits_3_in_every_mode_and_shows_on_the_console(run_cli: Cli, tmp_path: Path,
                                                                    extra: list[str]) -> None:
    run = campaign(run_cli, source_with(tmp_path / "world", users=""), None, *extra)
    assert run.code == 3
    assert "Empty input: no users" in run.out
    assert "empty input: users" in run.out.splitlines()[-1]  # the summary line says it too


def test_empty_input_against_the_database_writes_no_users_and_exits_3(db: FakeRealtimeDatabase, run_cli: Cli,
                                                                      tmp_path: Path) -> None:
    source = source_with(tmp_path / "world", users="[]")
    before = files_under(tmp_path)
    run = campaign(run_cli, source, rest_env(db))
    assert run.code == 3
    assert run.report()["empty_input"] == ["users"]
    assert db.get_rendered(f"{BASE}/users") is None
    assert_stays_in_out(tmp_path, before, run)


def test_a_run_with_input_reports_no_empty_input(run_cli: Cli, tmp_path: Path) -> None:
    run = campaign(run_cli, source_with(tmp_path / "world"))
    assert run.code == 0
    assert run.report()["empty_input"] == []
    assert "Empty input" not in run.out + run.err


MONGO_ENV = {"MONGO_URI": "mongodb://127.0.0.1:1/x", "MONGO_DB_NAME": "testdb"}


@pytest.mark.parametrize(("users", "events", "empty"), [
    (False, True, ["users"]), (True, False, ["events"]), (False, False, ["users", "events"])],
    ids=["no users", "no events", "nothing"])
def test_an_empty_mongodb_collection_is_reported_as_empty_input(run_cli: Cli, tmp_path: Path,
                                                                users: bool, events: bool, empty: list[str]) -> None:
    user_docs, event_docs = world_docs(3)
    client = mongomock.MongoClient()
    if users:
        client["testdb"]["user"].insert_many(user_docs)
    if events:
        client["testdb"]["event"].insert_many(event_docs)
    before = files_under(tmp_path)
    run = run_cli("--source", "mongo", "--now", FIREBASE_NOW_ISO, "--llm", "off", env=MONGO_ENV,
                  mongo_client=client)
    assert run.code == 3, run.err
    assert run.report()["empty_input"] == empty
    for name in empty:
        assert f"Empty input: no {name} in MongoDB collection '{name[:-1]}'" in run.out
    assert_stays_in_out(tmp_path, before, run)
