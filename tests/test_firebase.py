"""Firebase writes that lose nothing, and no member messaged twice.

Driven end to end: the CLI runs in-process (``builders.run_main``) on a small hand-made
``--source`` folder against ``tests/fake_rtdb.FakeRealtimeDatabase`` on 127.0.0.1, which keeps the
real Realtime Database's wire semantics (arrays as numeric keys, ETags, ``if-match``, 412,
``print=silent``, auth). The transports and ``DashboardList`` are also tested directly.

All members and contact details below are fictional (``@example.com``, ``+1555`` numbers).
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import CliRun, run_main
from fake_rtdb import NULL_ETAG, FakeRealtimeDatabase, RecordedRequest
from loopback import LoopbackHandler, LoopbackServer

import return_to_table as rtt
from return_to_table import (
    DashboardList,
    FirebaseError,
    LocalMirrorTransport,
    RestTransport,
    check_key,
    check_keys,
    firebase_ready,
    rtdb_normalize,
    rtdb_render,
)

FIREBASE_NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # this module's as-of instant (a Sunday)
FIREBASE_NOW_ISO = "2026-03-01T12:00:00Z"  # FIREBASE_NOW as --now takes it
FIREBASE_NOW_STAMP = "2026-03-01T12:00:00.000Z"  # FIREBASE_NOW as the CLI writes it back (updatedAt, matched_at)
TOKEN = "test-secret"
WRONG_TOKEN = "wrong-secret-4711"
BASE = "Leo"
DASHBOARD_LISTS = ("users", "events", "matches", "messages")
ARCHIVE_PARTS = ("metadata", "users", "events", "matches", "messages")

# =============================================================================================
# A small fictional world: 31-90 days dormant members and a few matching future events
# =============================================================================================

FIRST_NAMES = ("Ava", "Ben", "Cleo", "Dev", "Eli", "Faye", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Milo", "Nora")
INTERESTS = (["music", "jazz"], ["wine", "cooking"], ["books", "food"])
HOODS = ("chelsea", "west-village", "williamsburg", "harlem")
# (id, name, categories, features, neighbourhood, days from now, capacity, going)
FUTURE_EVENTS = (
    ("ev-jazz", "Jazz Night", ["MUSIC"], ["live-music"], "chelsea", 5, 12, 6),
    ("ev-wine", "Wine Social", ["WINE"], ["wine-tasting"], "west-village", 8, 10, 5),
    ("ev-books", "Book Club Dinner", ["BOOKS", "DINNER"], ["book-club"], "williamsburg", 10, 10, 4),
)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def world_docs(members: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    users: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for i in range(members):
        uid = f"u{i:02d}"
        first = FIRST_NAMES[i]
        users.append({
            "_id": uid, "firstName": first, "lastName": "Testwell",
            "email": f"{first.lower()}.testwell{i}@example.com", "phone": f"+12125550{100 + i % 100:03d}",
            "gender": "female" if i % 2 else "male", "interests": INTERESTS[i % 3],
            "occupation": "Teacher", "homeNeighborhood": HOODS[i % 4],
        })
        events.append({  # the member's last table, 35 + 3i days ago: dormant
            "_id": f"past-{i:02d}", "name": "Neighbourhood Supper", "categories": ["DINNER"],
            "participants": [uid], "ownerId": uid, "maxParticipants": 8,
            "startDate": iso(FIREBASE_NOW - timedelta(days=35 + 3 * i)),
            "type": "public", "active": True, "eventStatus": "approved",
        })
    for eid, name, categories, features, hood, days, capacity, going in FUTURE_EVENTS:
        events.append({
            "_id": eid, "name": name, "description": "A friendly table for twelve.",
            "venueName": "The Test Kitchen", "neighborhood": hood, "categories": categories, "features": features,
            "participants": [f"guest-{eid}-{k}" for k in range(going)], "ownerId": "host-1",
            "maxParticipants": capacity, "startDate": iso(FIREBASE_NOW + timedelta(days=days, hours=11, minutes=30)),
            "type": "public", "active": True, "eventStatus": "approved",
        })
    events.append({  # private: never offered
        "_id": "ev-private", "name": "Private Jazz", "categories": ["MUSIC"], "features": ["jazz"],
        "neighborhood": "chelsea", "participants": [], "ownerId": "host-1", "maxParticipants": 6,
        "startDate": iso(FIREBASE_NOW + timedelta(days=3)), "type": "private", "active": True, "eventStatus": "approved",
    })
    return users, events


def write_world(folder: Path, members: int = 10, *, extra: dict[str, Any] | None = None) -> Path:
    users, events = world_docs(members)
    for user in users:
        user.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.json").write_text(json.dumps(users, indent=1), encoding="utf-8")
    (folder / "events.json").write_text(json.dumps(events, indent=1), encoding="utf-8")
    return folder


def ranked_ids(members: int) -> list[str]:
    """The eligible members in the CLI's rank order (step 1's pure functions)."""
    users, events = world_docs(members)
    activity = rtt.index_member_activity(events, rtt.DataIssues())
    return [u["_id"] for u in rtt.find_dormant_users(users, activity, FIREBASE_NOW).eligible]


# =============================================================================================
# Running the CLI
# =============================================================================================


def rest_env(db: FakeRealtimeDatabase, token: str = TOKEN) -> dict[str, str]:
    return {"FIREBASE_DATABASE_URL": db.url, "FIREBASE_AUTH_TOKEN": token}


def rest_transport(url: str, token: str = TOKEN, **options: Any) -> RestTransport:
    """A ``RestTransport`` on ``BASE`` with a short backoff (``options``: timeout, retries)."""
    return RestTransport(url, BASE, auth_token=token, backoff=0.01, **options)


Cli = Callable[..., CliRun]


@pytest.fixture
def firebase_world(tmp_path: Path) -> Path:
    """Ten dormant members and their events, as a ``--source`` folder."""
    return write_world(tmp_path / "world", 10)


@pytest.fixture
def cli(run_cli: Callable[..., CliRun], tmp_path: Path, firebase_world: Path) -> Cli:
    """``cli(env, *args, source=firebase_world)`` runs the CLI once (``--llm off``), each run in its own --out."""
    counter = itertools.count(1)

    def run(env: dict[str, str], *args: str, source: Path | None = None) -> CliRun:
        return run_cli("--source", str(source or firebase_world), "--now", FIREBASE_NOW_ISO, "--llm", "off", *args,
                       env=env, root=tmp_path / f"out{next(counter)}")

    return run


@pytest.fixture
def db() -> Iterator[FakeRealtimeDatabase]:
    with FakeRealtimeDatabase(auth_token=TOKEN) as server:
        yield server


def items_of(db: FakeRealtimeDatabase, name: str, base: str = BASE) -> list[dict[str, Any]]:
    value = db.get_rendered(f"{base}/{name}")
    assert isinstance(value, dict), f"{base}/{name} is {value!r}"
    items = value[name]
    assert isinstance(items, list), f"{base}/{name}/{name} is not an array: {items!r}"
    assert value["count"] == len(items)
    return items


def keys_of(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(i["user_id"], i["event_id"]) for i in items]


def old_match(uid: str = "u-old", eid: str = "ev-old") -> dict[str, Any]:
    return {"user_id": uid, "event_id": eid, "user_name": "Olga Earlier", "event_name": "Old Dinner",
            "confidence_percentage": 81, "reasoning": "Earlier campaign.", "matched_at": "2026-01-10T12:00:00.000Z"}


def old_message(uid: str = "u-old", eid: str = "ev-old", *, status: str = "pending",
                generated_at: str = "2026-01-10T12:00:00.000Z") -> dict[str, Any]:
    return {"user_id": uid, "event_id": eid, "user_name": "Olga Earlier", "user_email": "olga@example.com",
            "user_phone": "+12125550199", "event_name": "Old Dinner", "status": status,
            "message_text": "Hi Olga! Welcome back.", "generated_at": generated_at}


def requests_to(db: FakeRealtimeDatabase, method: str, prefix: str) -> list[RecordedRequest]:
    return [r for r in db.requests if r.method == method and r.path.startswith(prefix)]


def reviewer_approves(db: FakeRealtimeDatabase, status_path: str,
                      when: Callable[[RecordedRequest], bool]) -> list[str]:
    """A reviewer who sets ``status_path`` to "approved" on the first request ``when`` accepts, before it is
    processed; returns the paths of the requests it acted on (one at most)."""
    fired: list[str] = []

    def reviewer(request: RecordedRequest) -> None:
        if not fired and when(request):
            fired.append(request.path)
            db.set(status_path, "approved")

    db.on_request(reviewer)
    return fired


# =============================================================================================
# First run on an empty database, and the dashboard's schema
# =============================================================================================


DatabaseAndRun = tuple[FakeRealtimeDatabase, CliRun]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseAndRun]:
    """One run of ten members on an empty database: the database and the run."""
    base = tmp_path_factory.mktemp("first_run")
    source = write_world(base / "world", 10)
    with FakeRealtimeDatabase(auth_token=TOKEN) as db:
        yield db, run_main(["--source", str(source), "--now", FIREBASE_NOW_ISO, "--llm", "off"], base / "out",
                           rest_env(db))


def test_first_run_on_an_empty_database_exits_zero_and_matches_every_member(first_run: DatabaseAndRun) -> None:
    _, run = first_run
    assert run.code == 0
    assert run.report()["summary"]["total_matches_created"] == 10
    assert run.report()["summary"]["total_messages_generated"] == 10
    assert run.report()["firebase"]["not_written"] == []


@pytest.mark.parametrize("name", DASHBOARD_LISTS)
def test_first_run_writes_each_dashboard_list_as_an_array_with_count_and_updated_at(
        first_run: DatabaseAndRun, name: str) -> None:
    db, _ = first_run
    value = db.get_rendered(f"{BASE}/{name}")
    assert set(value) == {name, "count", "updatedAt"}
    assert isinstance(value[name], list) and value[name]
    assert all(isinstance(item, dict) for item in value[name])
    assert value["count"] == len(value[name])
    assert value["updatedAt"] == FIREBASE_NOW_STAMP


def test_first_run_archives_the_campaign_under_its_id(first_run: DatabaseAndRun) -> None:
    db, run = first_run
    cid = run.report()["campaign_id"]
    archive = db.get_rendered(f"{BASE}/campaigns/{cid}")
    assert set(archive) == set(ARCHIVE_PARTS)
    assert archive["metadata"]["id"] == cid
    assert archive["metadata"]["stats"]["matches_created"] == 10
    for part in ("users", "events", "matches", "messages"):
        assert isinstance(archive[part][part], list)
        assert archive[part]["count"] == len(archive[part][part])
    assert keys_of(archive["matches"]["matches"]) == keys_of(items_of(db, "matches"))
    assert keys_of(archive["messages"]["messages"]) == keys_of(items_of(db, "messages"))


def test_first_run_touches_nothing_but_the_dashboard_and_the_archive(first_run: DatabaseAndRun) -> None:
    db, _ = first_run
    assert set(db.get_rendered(BASE)) == {*DASHBOARD_LISTS, "campaigns"}
    assert set(db.get_rendered("")) == {BASE}


def test_dashboard_users_have_the_fields_the_dashboard_reads(first_run: DatabaseAndRun) -> None:
    db, _ = first_run
    users = items_of(db, "users")
    assert sorted(u["id"] for u in users) == sorted(ranked_ids(10))
    for user in users:
        assert user["id"] == user["_id"]
        assert user["eventCount"] == user["event_count"] == 1
        assert isinstance(user["reactivation_score"], (int, float)) and user["reactivation_score"] > 0
        assert user["summary"].startswith(user["name"])
        assert user["name"] == f"{user['firstName']} Testwell"


def test_dashboard_events_are_the_matched_events_each_once_with_their_fields(first_run: DatabaseAndRun) -> None:
    db, _ = first_run
    events = items_of(db, "events")
    matched = {m["event_id"] for m in items_of(db, "matches")}
    assert sorted(e["id"] for e in events) == sorted(matched)  # only matched events, each once
    assert "ev-private" not in matched
    for event in events:
        assert event["id"] == event["_id"]
        assert event["maxParticipants"] == event["capacity"] > 0
        assert event["participantCount"] == len(event["participants"])
        assert event["participationPercentage"] == pytest.approx(
            100 * event["participantCount"] / event["maxParticipants"])
        assert event["summary"].startswith(f"Event: {event['name']}")


def test_dashboard_matches_have_the_fields_the_dashboard_reads(first_run: DatabaseAndRun) -> None:
    db, _ = first_run
    matches = items_of(db, "matches")
    assert sorted(m["user_id"] for m in matches) == sorted(ranked_ids(10))
    for match in matches:
        for name in ("user_name", "event_name", "user_id", "event_id", "reasoning", "matched_at"):
            assert isinstance(match[name], str) and match[name], name
        assert 70 <= match["confidence_percentage"] <= 100
        assert match["match_purpose"] == match["strategy"] == "reactivate_dormant_user"
        assert match["matched_at"] == FIREBASE_NOW_STAMP
        assert match["user"]["_id"] == match["user_id"] and match["user"]["email"].endswith("@example.com")
        assert match["event"]["_id"] == match["event_id"] and match["event"]["name"] == match["event_name"]


def test_dashboard_messages_have_the_fields_the_dashboard_reads_and_wait_for_review(first_run: DatabaseAndRun) -> None:
    db, _ = first_run
    messages = items_of(db, "messages")
    matches = {m["user_id"]: m for m in items_of(db, "matches")}
    assert sorted(matches) == sorted(m["user_id"] for m in messages)
    for msg in messages:
        assert msg["status"] == "pending"
        assert msg["generated_at"] == FIREBASE_NOW_STAMP
        assert msg["user_email"].endswith("@example.com") and msg["user_phone"].startswith("+1212555")
        assert msg["user_name"] == matches[msg["user_id"]]["user_name"]
        assert msg["event_id"] == matches[msg["user_id"]]["event_id"]
        assert msg["event_name"] == matches[msg["user_id"]]["event_name"]
        assert msg["message_text"].endswith(f"https://cuculi.net/events/{msg['event_id']}")
        assert msg["character_count"] == len(msg["message_text"])
        assert isinstance(msg["personalization_notes"], str) and msg["personalization_notes"]
        assert msg["similarity_score"] == msg["confidence_percentage"] == matches[msg["user_id"]][
            "confidence_percentage"]
        assert msg["reasoning"] == matches[msg["user_id"]]["reasoning"]


# =============================================================================================
# Appends, healing, concurrent reviewers
# =============================================================================================


def test_append_keeps_the_earlier_items_of_both_lists(db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.set(f"{BASE}/matches", rtt.listing("matches", [old_match()], "2026-01-10T12:00:00.000Z"))
    db.set(f"{BASE}/messages", rtt.listing("messages", [old_message()], "2026-01-10T12:00:00.000Z"))
    run = cli(rest_env(db))
    assert run.code == 0
    matches, messages = items_of(db, "matches"), items_of(db, "messages")
    assert matches[0] == old_match() and messages[0] == old_message()
    assert len(matches) == len(messages) == 11
    assert sorted(m["user_id"] for m in matches[1:]) == sorted(ranked_ids(10))


def test_sparse_list_rendered_as_an_object_is_healed_into_a_clean_array(db: FakeRealtimeDatabase, cli: Cli) -> None:
    olds = [old_match(f"u-old{k}") for k in range(3)]
    db.set(f"{BASE}/matches", {"matches": {"0": olds[0], "5": olds[1], "9": olds[2]}, "count": 10,
                               "updatedAt": "2026-01-10T12:00:00.000Z"})
    assert isinstance(db.get_rendered(f"{BASE}/matches/matches"), dict)  # precondition: the fake's rendering
    run = cli(rest_env(db))
    assert run.code == 0
    matches = items_of(db, "matches")  # an array, count == len
    assert matches[:3] == olds
    assert len(matches) == 13 and None not in matches


def test_list_with_a_null_hole_is_healed_and_recounted(db: FakeRealtimeDatabase, cli: Cli) -> None:
    first, second = old_message("u-old1"), old_message("u-old2")
    db.set(f"{BASE}/messages", {"messages": [first, None, second], "count": 3, "updatedAt": "2026-01-10"})
    assert db.get_rendered(f"{BASE}/messages/messages") == [first, None, second]  # precondition
    run = cli(rest_env(db))
    assert run.code == 0
    messages = items_of(db, "messages")
    assert messages[:2] == [first, second]
    assert len(messages) == 12 and db.get_rendered(f"{BASE}/messages/count") == 12


def test_reviewer_approving_between_our_read_and_our_append_keeps_the_approval(
        db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.set(f"{BASE}/messages", rtt.listing("messages", [old_message()], "2026-01-10T12:00:00.000Z"))
    fired = reviewer_approves(db, f"{BASE}/messages/messages/0/status", lambda r: r.method == "PUT"
                              and r.path.startswith(f"/{BASE}/messages/") and "if-match" in r.headers)
    run = cli(rest_env(db))
    assert run.code == 0 and fired
    messages = items_of(db, "messages")
    assert messages[0] == {**old_message(), "status": "approved"}
    assert sorted(m["user_id"] for m in messages[1:]) == sorted(ranked_ids(10))


def test_reviewer_approving_during_our_heal_survives_the_412_and_merge(db: FakeRealtimeDatabase, cli: Cli) -> None:
    first, second = old_message("u-old1"), old_message("u-old2")
    db.set(f"{BASE}/messages", {"messages": {"0": first, "7": second}, "count": 2, "updatedAt": "2026-01-10"})
    fired = reviewer_approves(db, f"{BASE}/messages/messages/0/status", lambda r: r.method == "PUT"
                              and r.path == f"/{BASE}/messages.json" and "if-match" in r.headers)
    run = cli(rest_env(db))
    assert run.code == 0 and fired
    assert any(r.status == 412 for r in db.requests if r.path == f"/{BASE}/messages.json")
    messages = items_of(db, "messages")
    assert messages[:2] == [{**first, "status": "approved"}, second]
    assert sorted(m["user_id"] for m in messages[2:]) == sorted(ranked_ids(10))


def test_wire_rules_no_if_match_with_print_silent_no_post_no_400(db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.set(f"{BASE}/matches", {"matches": {"0": old_match("u-a"), "6": old_match("u-b")}, "count": 2})
    db.set(f"{BASE}/messages", {"messages": [old_message("u-a"), None, old_message("u-b")], "count": 3})
    db.set(f"{BASE}/messages/messages/5", old_message("u-c"))
    run = cli(rest_env(db))
    assert run.code == 0
    assert db.requests
    for request in db.requests:
        assert request.method != "POST", request.path
        if "if-match" in request.headers:
            assert request.method == "PUT"
            assert request.query.get("print") != "silent", request.path
        if request.method == "GET":
            assert request.headers.get("x-firebase-etag") == "true"
        assert request.status is not None and request.status < 400 or request.status == 412, request


def test_nothing_else_under_the_base_path_or_outside_it_is_touched(db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.set(f"{BASE}/settings", {"theme": "dark", "reviewers": ["ana", "raj"]})
    db.set(f"{BASE}/campaigns/older-campaign/metadata", {"id": "older-campaign"})
    db.set("Other/users", {"users": [{"id": "x"}], "count": 1})
    run = cli(rest_env(db))
    assert run.code == 0
    assert db.get_rendered(f"{BASE}/settings") == {"theme": "dark", "reviewers": ["ana", "raj"]}
    assert db.get_rendered(f"{BASE}/campaigns/older-campaign") == {"metadata": {"id": "older-campaign"}}
    assert db.get_rendered("Other") == {"users": {"users": [{"id": "x"}], "count": 1}}
    allowed = {*DASHBOARD_LISTS, "campaigns", "holdout"}  # holdout: read by the cooldown
    for request in db.requests:
        segments = urllib.parse.unquote(request.path.removesuffix(".json")).strip("/").split("/")
        assert segments[0] == BASE and len(segments) > 1 and segments[1] in allowed, request.path


def test_firebase_base_path_from_the_environment_is_used(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli({**rest_env(db), "FIREBASE_BASE_PATH": "/Staging/"})
    assert run.code == 0
    assert set(db.get_rendered("")) == {"Staging"}
    assert len(items_of(db, "matches", base="Staging")) == 10


def test_a_member_that_crashes_is_skipped_as_failed_and_the_others_are_saved(
        db: FakeRealtimeDatabase, firebase_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = rtt.write_template_sms
    calls: list[Any] = []

    def crashing(facts: Any) -> str:
        calls.append(facts)
        if len(calls) == 4:
            raise RuntimeError("simulated crash while writing the 4th message")
        return real(facts)

    monkeypatch.setattr(rtt, "write_template_sms", crashing)
    out = tmp_path / "out"
    run = run_main(["--source", str(firebase_world), "--now", FIREBASE_NOW_ISO, "--llm", "off"], out, rest_env(db))
    assert run.code == rtt.ExitCode.ATTENTION and "Traceback" not in run.err
    ranked = ranked_ids(10)
    others = ranked[:3] + ranked[4:]
    assert [m["user_id"] for m in items_of(db, "matches")] == others
    assert [m["user_id"] for m in items_of(db, "messages")] == others
    assert [m["user_id"] for m in run.messages] == others
    [failed] = run.report()["skipped"]
    assert failed["user_id"] == ranked[3] and failed["reason"].startswith("failed: RuntimeError")
    assert run.report()["summary"]["users_failed"] == 1
    assert "simulated crash" in run.all_text()  # the traceback is in the log file, not on the console


# =============================================================================================
# Failures: retries, 401, what is reported
# =============================================================================================


def test_503_on_a_write_then_success_exits_zero_with_complete_data(db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.fail_next(503, method="PUT")
    run = cli(rest_env(db))
    assert run.code == 0
    assert [r.status for r in db.requests if r.method == "PUT"][:2] == [503, 200]
    assert sorted(m["user_id"] for m in items_of(db, "matches")) == sorted(ranked_ids(10))
    assert sorted(m["user_id"] for m in items_of(db, "messages")) == sorted(ranked_ids(10))
    assert len(items_of(db, "users")) == 10 and run.report()["firebase"]["not_written"] == []


def test_503_on_the_first_request_then_success_exits_zero(db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.fail_next(503)
    run = cli(rest_env(db))
    assert run.code == 0
    assert db.requests[0].status == 503
    assert len(items_of(db, "messages")) == 10


def test_500_on_a_read_is_retried(db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.fail_next(500, method="GET")
    run = cli(rest_env(db))
    assert run.code == 0
    gets = [r for r in db.requests if r.method == "GET"]
    assert gets[0].status == 500 and gets[1].status == 200 and gets[0].path == gets[1].path
    assert len(items_of(db, "matches")) == 10


def assert_every_list_reported_unwritten(not_written: list[str]) -> None:
    """users and events, and each of the ten matches and ten messages."""
    assert {"users", "events"} <= set(not_written)
    assert sum(p.startswith("matches") for p in not_written) == 10
    assert sum(p.startswith("messages") for p in not_written) == 10


def test_401_wrong_token_exits_non_zero(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli(rest_env(db, WRONG_TOKEN))
    assert run.code == rtt.ExitCode.ATTENTION
    assert db.data is None


def test_401_wrong_token_prints_one_line_about_credentials_on_stderr(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli(rest_env(db, WRONG_TOKEN))
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert "401" in lines[0] and "FIREBASE_AUTH_TOKEN" in lines[0]
    assert "Traceback" not in run.err


def test_401_wrong_token_still_leaves_complete_local_files(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli(rest_env(db, WRONG_TOKEN))
    assert run.code == rtt.ExitCode.ATTENTION
    processed = run.root / "data" / "processed"
    assert (processed / "matches.json").is_file(), "no local matches after a 401"
    assert sorted(m["user_id"] for m in run.matches) == sorted(ranked_ids(10))
    assert sorted(m["user_id"] for m in run.messages) == sorted(ranked_ids(10))


def test_401_wrong_token_report_lists_what_was_not_written(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli(rest_env(db, WRONG_TOKEN))
    assert run.code == rtt.ExitCode.ATTENTION
    assert list((run.root / "reports").glob("*.json")), "no report after a 401"
    not_written = run.report()["firebase"]["not_written"]
    assert_every_list_reported_unwritten(not_written)
    assert {p.rsplit("/", 1)[-1] for p in not_written if p.startswith("campaigns/")} == set(ARCHIVE_PARTS)


def test_401_on_writes_only_keeps_local_files_and_reports_every_unwritten_path(
        db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.fail_next(401, count=1000, method="PUT", body={"error": "Permission denied"})
    db.fail_next(401, count=1000, method="PATCH", body={"error": "Permission denied"})
    run = cli(rest_env(db))
    assert run.code == rtt.ExitCode.ATTENTION
    assert db.data is None
    assert len(run.matches) == len(run.messages) == 10
    assert_every_list_reported_unwritten(run.report()["firebase"]["not_written"])
    assert "FIREBASE_AUTH_TOKEN" in run.out + run.err
    assert "Traceback" not in run.err


def seed_lists(db: FakeRealtimeDatabase) -> None:
    """A dashboard with one earlier match and its message."""
    db.set(f"{BASE}/matches", {"matches": [old_match()], "count": 1, "updatedAt": "2026-01-10T12:00:00.000Z"})
    db.set(f"{BASE}/messages", {"messages": [old_message()], "count": 1, "updatedAt": "2026-01-10T12:00:00.000Z"})


def listed_unwritten(run: CliRun, key: str) -> set[tuple[str, ...]]:
    """The ``(user_id, event_id)`` of each ``key`` item the report lists as not written."""
    return {tuple(p.removeprefix(f"{key} (").removesuffix(")").split(", "))
            for p in run.report()["firebase"]["not_written"] if p.startswith(f"{key} (")}


def test_a_count_update_that_keeps_failing_takes_the_item_back_so_count_and_items_agree(
        db: FakeRealtimeDatabase, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt.time, "sleep", lambda seconds: None)  # no real backoff in this test
    seed_lists(db)
    db.fail_next(503, count=100, method="PATCH", path=f"{BASE}/matches")
    run = cli(rest_env(db))
    assert run.code == rtt.ExitCode.ATTENTION
    in_firebase = set(keys_of(items_of(db, "matches")))  # items_of: count == number of items
    assert in_firebase == {("u-old", "ev-old")}  # the item written before its count was taken back
    listed = listed_unwritten(run, "matches")
    assert len(listed) == 10 and not listed & in_firebase, f"reported as not written but present: {listed & in_firebase}"
    assert "matches count" not in run.report()["firebase"]["not_written"]


@pytest.mark.parametrize("key", ["matches", "messages"])
def test_a_connection_dropped_on_the_count_update_leaves_count_equal_to_items(
        db: FakeRealtimeDatabase, cli: Cli, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setattr(rtt.time, "sleep", lambda seconds: None)
    seed_lists(db)
    db.fail_next(0, count=4, method="PATCH", path=f"{BASE}/{key}")  # every try of the first count update dropped
    run = cli(rest_env(db))
    assert run.code == rtt.ExitCode.ATTENTION and "Traceback" not in run.err
    for name in ("matches", "messages"):
        assert items_of(db, name)[0]["user_id"] == "u-old"  # items_of asserts count == number of items
    assert not listed_unwritten(run, key) & set(keys_of(items_of(db, key)))
    assert set(keys_of(items_of(db, "matches"))) <= set(keys_of(items_of(db, "messages")))


def test_an_item_that_cannot_be_taken_back_has_its_count_healed_by_the_end_of_the_run(
        db: FakeRealtimeDatabase, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt.time, "sleep", lambda seconds: None)
    seed_lists(db)
    db.fail_next(0, count=4, method="PATCH", path=f"{BASE}/matches")  # the first count update: dropped 4 times
    armed: list[bool] = []

    @db.on_request
    def drop_the_take_back(request: RecordedRequest) -> None:  # and the connection is gone for the take-back too
        if request.method == "PATCH" and request.path.startswith(f"/{BASE}/matches") and not armed:
            armed.append(True)
            db.fail_next(0, count=4, method="PUT", path=f"{BASE}/matches/matches/1")

    run = cli(rest_env(db))
    assert run.code == rtt.ExitCode.ATTENTION
    old, kept = items_of(db, "matches")  # the item stayed, and the count was healed to 2
    assert old["user_id"] == "u-old"
    assert (kept["user_id"], kept["event_id"]) not in listed_unwritten(run, "matches")
    assert "matches count" not in run.report()["firebase"]["not_written"]


def test_a_match_whose_message_could_not_be_written_is_not_written_and_listed_so(
        db: FakeRealtimeDatabase, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt.time, "sleep", lambda seconds: None)
    seed_lists(db)
    db.fail_next(0, count=4, method="PUT", path=f"{BASE}/messages/messages/4")  # the fourth new message: dropped
    run = cli(rest_env(db))
    assert run.code == rtt.ExitCode.ATTENTION
    messages, matches = keys_of(items_of(db, "messages"))[1:], keys_of(items_of(db, "matches"))[1:]
    assert len(messages) == 3 and set(matches) <= set(messages)  # no match without its message
    unwritten = listed_unwritten(run, "matches")
    assert len(unwritten) == 7 and not unwritten & set(matches)
    assert {*matches, *unwritten} == set(keys_of(run.matches))  # every match: written, or listed as not written


def test_token_never_appears_in_logs_reports_or_console(db: FakeRealtimeDatabase, cli: Cli) -> None:
    db.fail_next(503, method="PUT")
    run = cli(rest_env(db), "--verbose")
    assert run.code == 0
    assert any(r.query.get("auth") == TOKEN for r in db.requests)  # it was sent, as auth=
    assert list((run.root / "logs").glob("*.log"))
    assert TOKEN not in run.all_text()


def test_wrong_token_never_appears_in_logs_reports_or_console(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli(rest_env(db, WRONG_TOKEN), "--verbose")
    assert run.code == rtt.ExitCode.ATTENTION
    assert WRONG_TOKEN not in run.all_text()


def test_unauthenticated_run_works_with_a_warning(cli: Cli) -> None:
    with FakeRealtimeDatabase() as open_db:
        run = cli({"FIREBASE_DATABASE_URL": open_db.url})
        assert run.code == 0
        assert "unauthenticated" in run.out.lower()
        assert len(items_of(open_db, "matches")) == 10


# =============================================================================================
# Re-eligibility: reruns and the cooldown
# =============================================================================================


def test_rerun_of_the_same_campaign_adds_no_match_or_message(db: FakeRealtimeDatabase, cli: Cli) -> None:
    assert cli(rest_env(db)).code == 0
    matches, messages = items_of(db, "matches"), items_of(db, "messages")
    second = cli(rest_env(db))
    assert second.code == rtt.ExitCode.OK and second.err == ""  # the day's --limit was drafted: nothing to look at
    assert second.report()["no_message"]["reason"] == rtt.IdleReason.DAY_LIMIT_DRAFTED.value
    assert second.report()["summary"]["total_messages_generated"] == 0
    assert second.report()["summary"]["users_left_out_by_cooldown"] == 10
    assert items_of(db, "matches") == matches
    assert items_of(db, "messages") == messages


def test_rerun_without_cooldown_adds_no_duplicates(db: FakeRealtimeDatabase, cli: Cli) -> None:
    assert cli(rest_env(db)).code == 0
    matches, messages = items_of(db, "matches"), items_of(db, "messages")
    puts_before = len(db.requests)
    tomorrow = iso(FIREBASE_NOW + timedelta(days=1))  # (the same day, --limit is already drafted: issue 20)
    second = cli(rest_env(db), "--cooldown-days", "0", "--now", tomorrow)
    assert second.code == 0
    assert second.report()["summary"]["total_messages_generated"] == 10  # drafted again locally ...
    assert items_of(db, "matches") == matches  # ... but not appended twice
    assert items_of(db, "messages") == messages
    assert len(set(keys_of(messages))) == len(messages) == 10
    assert not [r for r in db.requests[puts_before:] if r.method == "PUT" and "/matches/matches/" in r.path]


def test_run_that_selects_no_one_leaves_users_and_events_as_they_were(db: FakeRealtimeDatabase, cli: Cli) -> None:
    assert cli(rest_env(db)).code == 0
    users, events = db.get_rendered(f"{BASE}/users"), db.get_rendered(f"{BASE}/events")
    later = iso(FIREBASE_NOW + timedelta(days=1))
    second = cli(rest_env(db), "--now", later)
    assert second.code == rtt.ExitCode.ATTENTION  # nobody selected: a day without a message
    assert second.report()["statistics"]["users_processed"] == 0
    assert db.get_rendered(f"{BASE}/users") == users
    assert db.get_rendered(f"{BASE}/events") == events


def test_cooldown_leaves_out_last_runs_members_and_takes_the_next_ranked(
        db: FakeRealtimeDatabase, cli: Cli, tmp_path: Path) -> None:
    eight = write_world(tmp_path / "world8", 8)
    ranked = ranked_ids(8)
    first = cli(rest_env(db), "--limit", "3", source=eight)
    assert first.code == 0
    assert [m["user_id"] for m in first.report()["matches"]] == ranked[:3]
    second = cli(rest_env(db), "--limit", "3", "--now", iso(FIREBASE_NOW + timedelta(days=1)), source=eight)
    assert second.code == 0
    assert second.report()["summary"]["users_left_out_by_cooldown"] == 3
    assert [m["user_id"] for m in second.report()["matches"]] == ranked[3:6]
    assert [m["user_id"] for m in items_of(db, "messages")] == ranked[:6]


def test_users_and_events_are_replaced_by_the_next_run(db: FakeRealtimeDatabase, cli: Cli, tmp_path: Path) -> None:
    eight = write_world(tmp_path / "world8", 8)
    ranked = ranked_ids(8)
    assert cli(rest_env(db), "--limit", "3", source=eight).code == 0
    second = cli(rest_env(db), "--limit", "3", "--now", iso(FIREBASE_NOW + timedelta(days=1)), source=eight)
    assert second.code == 0
    assert [u["id"] for u in items_of(db, "users")] == ranked[3:6]
    assert sorted(e["id"] for e in items_of(db, "events")) == sorted({m["event_id"] for m in second.report()["matches"]})


def test_cooldown_counts_a_message_generated_after_now_whatever_its_status(
        db: FakeRealtimeDatabase, cli: Cli) -> None:
    ranked = ranked_ids(10)
    future = iso(FIREBASE_NOW + timedelta(days=3))
    db.set(f"{BASE}/messages", rtt.listing("messages", [
        old_message(ranked[0], "ev-jazz", status="rejected", generated_at=future),
        old_message(ranked[2], "ev-wine", status="sent", generated_at=iso(FIREBASE_NOW - timedelta(days=2))),
    ], future))
    run = cli(rest_env(db), "--limit", "3")
    assert run.code == 0
    assert run.report()["summary"]["users_left_out_by_cooldown"] == 2
    assert [m["user_id"] for m in run.report()["matches"]] == [ranked[1], ranked[3], ranked[4]]


def test_cooldown_window_starts_exactly_cooldown_days_before_now(db: FakeRealtimeDatabase, cli: Cli) -> None:
    ranked = ranked_ids(10)
    db.set(f"{BASE}/messages", rtt.listing("messages", [
        old_message(ranked[0], generated_at=iso(FIREBASE_NOW - timedelta(days=30))),  # on the edge: counts
        old_message(ranked[1], generated_at=iso(FIREBASE_NOW - timedelta(days=30, seconds=1))),  # just outside
    ], FIREBASE_NOW_STAMP))
    run = cli(rest_env(db), "--limit", "2")
    assert run.code == 0
    assert run.report()["summary"]["users_left_out_by_cooldown"] == 1
    assert [m["user_id"] for m in run.report()["matches"]] == [ranked[1], ranked[2]]


def test_cooldown_days_option_sets_the_window(db: FakeRealtimeDatabase, cli: Cli) -> None:
    ranked = ranked_ids(10)
    db.set(f"{BASE}/messages", rtt.listing("messages", [
        old_message(ranked[0], generated_at=iso(FIREBASE_NOW - timedelta(days=8))),
    ], FIREBASE_NOW_STAMP))
    run = cli(rest_env(db), "--limit", "1", "--cooldown-days", "7")
    assert run.code == 0
    assert run.report()["summary"]["users_left_out_by_cooldown"] == 0
    assert [m["user_id"] for m in run.report()["matches"]] == [ranked[0]]


# =============================================================================================
# --dry-run
# =============================================================================================


def test_dry_run_sends_no_write_to_firebase(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli(rest_env(db), "--dry-run")
    assert run.code == 0
    assert {r.method for r in db.requests} <= {"GET"}
    assert db.data is None
    assert not (run.root / "data" / "firebase").exists()
    assert len(run.messages) == 10


def test_dry_run_with_the_local_mirror_writes_no_mirror(cli: Cli) -> None:
    run = cli({}, "--dry-run")
    assert run.code == 0
    assert not (run.root / "data" / "firebase").exists()


def test_dry_run_still_applies_the_cooldown(db: FakeRealtimeDatabase, cli: Cli) -> None:
    ranked = ranked_ids(10)
    db.set(f"{BASE}/messages", rtt.listing("messages", [old_message(ranked[0], generated_at=FIREBASE_NOW_STAMP)], FIREBASE_NOW_STAMP))
    run = cli(rest_env(db), "--dry-run", "--limit", "1")
    assert run.code == 0
    assert run.report()["summary"]["users_left_out_by_cooldown"] == 1
    assert [m["user_id"] for m in run.report()["matches"]] == [ranked[1]]


# =============================================================================================
# Keys: validated before sending, documents sanitised
# =============================================================================================

BAD_KEYS = ["a.b", "a$b", "a#b", "a[b", "a]b", "a/b", "a\x00b", "tab\there", "new\nline", "a\x1fb", "del\x7f", "",
            "x" * 769, "é" * 385]
GOOD_KEYS = ["_id", "user-1", "ev_jazz", "Zoë", "a b", "x" * 768, "é" * 384, "-Nabc123", "0"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_check_key_refuses_forbidden_keys(key: str) -> None:
    with pytest.raises(FirebaseError):
        check_key(key, "test")


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_check_key_accepts_allowed_keys(key: str) -> None:
    check_key(key, "test")


def test_check_keys_finds_a_bad_key_deep_in_lists_and_objects() -> None:
    with pytest.raises(FirebaseError):
        check_keys({"users": [{"ok": 1}, {"nested": {"bad.key": 1}}]}, "users")
    check_keys({"users": [{"ok": 1}, {"nested": {"fine_key": [1, 2]}}]}, "users")


def test_rest_transport_refuses_bad_keys_and_paths_before_sending(db: FakeRealtimeDatabase) -> None:
    transport = rest_transport(db.url)
    with pytest.raises(FirebaseError):
        transport.put("users", {"users": [{"links": {"example.com": 1}}]})
    with pytest.raises(FirebaseError):
        transport.put("matches/matches/0", {"$bad": 1}, if_match=NULL_ETAG)
    with pytest.raises(FirebaseError):
        transport.patch("matches", {"count": 1, "bad#key": 2})
    with pytest.raises(FirebaseError):
        transport.get("campaigns/bad.id")
    with pytest.raises(FirebaseError):
        transport.put("campaigns/a[1]/metadata", {"id": "x"})
    assert db.requests == []


def test_local_mirror_refuses_bad_keys_before_writing(tmp_path: Path) -> None:
    mirror = LocalMirrorTransport(tmp_path, BASE)
    with pytest.raises(FirebaseError):
        mirror.put("users", {"users": [{"a/b": 1}]})
    with pytest.raises(FirebaseError):
        mirror.patch("users", {"count\x00": 1})
    assert not any(tmp_path.rglob("*.json"))


def test_firebase_ready_sanitises_document_keys() -> None:
    doc = {"a.b": {"c$d": [{"e#f": 1, "[g]": 2}]}, "h/i": "x", "ctl\x01": 3, "": 4, "ok": [{"fine": None}]}
    ready = firebase_ready(doc)
    assert ready == {"a_b": {"c_d": [{"e_f": 1, "_g_": 2}]}, "h_i": "x", "ctl_": 3, "_": 4, "ok": [{"fine": None}]}
    check_keys(ready, "doc")


def test_documents_with_forbidden_keys_are_written_sanitised(db: FakeRealtimeDatabase, cli: Cli,
                                                              tmp_path: Path) -> None:
    dotted = write_world(tmp_path / "dotted", 10, extra={"prefs.v2": True, "links": {"example.com": "home"}})
    run = cli(rest_env(db), source=dotted)
    assert run.code == 0
    assert run.report()["firebase"]["not_written"] == []
    user = items_of(db, "users")[0]
    assert user["prefs_v2"] is True and user["links"] == {"example_com": "home"}
    assert items_of(db, "matches")[0]["user"]["links"] == {"example_com": "home"}
    assert all(r.status is not None and r.status != 400 for r in db.requests)


# =============================================================================================
# Array rules: our normalise/render against the fake's
# =============================================================================================

ARRAY_CASES = {
    "dense list": [1, 2, 3],
    "list with one hole": ["a", None, "c"],
    "too sparse list": ["a", None, None, None, "e"],
    "sparse object 0,5,9": {"0": "a", "5": "b", "9": "c"},
    "object 0,1,3": {"0": "a", "1": "b", "3": "d"},
    "object 1 only": {"1": "x"},
    "object 2 only": {"2": "x"},
    "leading zero key": {"01": "x", "1": "y"},
    "negative key": {"-1": "x", "0": "y"},
    "mixed keys": {"0": "a", "b": "c"},
    "nested arrays and empties": {"list": [{"k": []}, {}, {"v": [None, 2]}], "empty": {}, "n": None,
                                  "f": 1.5, "b": False, "s": ""},
    "deep numeric": {"0": {"1": {"2": "deep"}}},
    "list of lists": [[1], [], [None, None, 3]],
    "all nulls": [None, None],
    "empty object": {},
    "scalar": 7,
    "arabic-indic digit key": {"\u0661": "x"},
    "superscript two key": {"\u00b2": "x"},
}


@pytest.mark.parametrize("value", list(ARRAY_CASES.values()), ids=list(ARRAY_CASES))
def test_rtdb_normalize_and_render_agree_with_the_fake(value: Any) -> None:
    fake = FakeRealtimeDatabase()  # not started: set/get_rendered/data work in memory
    fake.set("t", value)
    stored = (fake.data or {}).get("t")
    assert rtdb_normalize(value) == stored
    assert rtdb_render(rtdb_normalize(value)) == fake.get_rendered("t")


def test_listing_entries_puts_keys_that_are_not_array_indices_after_the_indices() -> None:
    a, b, c, d = old_match("a"), old_match("b"), old_match("c"), old_match("d")
    pushed = {"-Nz1": c, "1": b, "\u00b2": d, "0": a}  # a push id and a non-ASCII digit are not indices
    assert rtt.listing_entries({"m": pushed}, "m") == [a, b, c, d]


def test_listing_entries_reads_both_shapes_in_index_order() -> None:
    a, b, c = old_match("a"), old_match("b"), old_match("c")
    assert rtt.listing_entries({"m": {"10": c, "2": b, "0": a}}, "m") == [a, b, c]
    assert rtt.listing_entries({"m": [a, None, b]}, "m") == [a, b]
    assert rtt.listing_entries(None, "m") == [] and rtt.listing_entries({"count": 0}, "m") == []


# =============================================================================================
# The local mirror behaves like the database
# =============================================================================================

A, B, C, D, E = (old_match(f"u-{x}", f"ev-{x}") for x in "abcde")


def exercise(transport: Any, delete: Callable[[str], None]) -> list[Any]:
    """One sequence of puts, patches and dashboard-list operations; what a reader observes.

    ``delete(path)`` removes a location (another client's delete, e.g. a reviewer's).
    """
    seen: list[Any] = [transport.get("matches")[0]]
    transport.put("matches", {"matches": {"0": A, "5": B, "9": C}, "count": 3, "updatedAt": "T0"})
    seen.append(transport.get("matches")[0])
    dashboard = DashboardList(transport, "matches", "T1").open()  # heal
    seen += [dashboard.size, dashboard.items, transport.get("matches")[0]]
    seen += [dashboard.add(D), dashboard.add(D), transport.get("matches")[0]]  # append, then merge-key refusal
    taken = transport.put("matches/matches/0", E, if_match=NULL_ETAG)  # slot in use
    seen += [taken.ok, taken.value]
    free = transport.put("matches/matches/9", E, if_match=NULL_ETAG)  # empty slot: written
    seen += [free.ok, transport.get("matches/matches")[0]]
    delete("matches/matches/9")
    value, etag = transport.get("matches")
    transport.put("matches/count", 99)
    stale = transport.put("matches", value, if_match=etag)  # stale ETag: refused with the current value
    seen += [stale.ok, stale.value]
    transport.patch("matches", {"count": 4, "updatedAt": "T2"})
    delete("matches/matches/1")  # a reviewer deletes an item: a hole
    seen.append(transport.get("matches")[0])
    again = DashboardList(transport, "matches", "T3").open()
    seen += [again.size, transport.get("matches")[0]]
    transport.put("users", {"users": [{"id": "u1"}, {"id": "u2"}], "count": 2, "updatedAt": "T1"})
    transport.put("campaigns/c1/metadata", {"id": "c1", "stats": {"errors": [], "users_processed": 2}})
    transport.put("campaigns/c1/matches", {"matches": [A, B], "count": 2})
    transport.put("campaigns/c2", {"metadata": {"id": "c2"}, "users": {"users": [{"id": "u1"}], "count": 1}})
    seen += [transport.get("campaigns")[0], transport.get("campaigns/c1/matches/matches")[0],
             transport.get("campaigns/c2/users/users/0")[0]]
    delete("campaigns/c2")
    seen += [transport.get("campaigns")[0], transport.get("")[0]]
    return seen


def test_local_mirror_gives_the_same_results_as_the_fake(db: FakeRealtimeDatabase, tmp_path: Path) -> None:
    remote = exercise(rest_transport(db.url),
                      lambda path: db.set(f"{BASE}/{path}", None))
    mirror = LocalMirrorTransport(tmp_path, BASE)
    local = exercise(mirror, lambda path: mirror._store(rtt.check_path(path), None))
    for step, (r, loc) in enumerate(zip(remote, local, strict=True)):
        assert loc == r, f"step {step}: mirror {loc!r} != database {r!r}"


@pytest.mark.parametrize("kind", ["rest", "mirror"])
def test_put_of_null_deletes_on_both_transports(kind: str, db: FakeRealtimeDatabase, tmp_path: Path) -> None:
    transport: Any = (rest_transport(db.url) if kind == "rest"
                      else LocalMirrorTransport(tmp_path, BASE))
    transport.put("matches", {"matches": [A, B], "count": 2})
    transport.put("matches/matches/1", None)
    assert transport.get("matches")[0] == {"matches": [A], "count": 2}


def test_local_mirror_splits_files_and_keeps_arrays_as_arrays(tmp_path: Path) -> None:
    mirror = LocalMirrorTransport(tmp_path, BASE)
    dashboard = DashboardList(mirror, "matches", FIREBASE_NOW_STAMP).open()
    for item in (A, B, C):
        assert dashboard.add(item)
    mirror.put("campaigns/c1/messages", {"messages": [A], "count": 1})
    mirror.flush()
    on_disk = json.loads((tmp_path / BASE / "matches.json").read_text(encoding="utf-8"))
    assert on_disk == {"matches": [A, B, C], "count": 3, "updatedAt": FIREBASE_NOW_STAMP}
    assert (tmp_path / BASE / "campaigns" / "c1" / "messages.json").is_file()


def test_demo_uses_the_local_mirror_and_its_merge_logic(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["--demo", "--now", FIREBASE_NOW_ISO]
    assert run_main(args, out).code == 0
    mirror = out / "data" / "firebase" / BASE
    first = json.loads((mirror / "messages.json").read_text(encoding="utf-8"))
    assert first["count"] == len(first["messages"]) > 0
    assert run_main([*args, "--cooldown-days", "0"], out).code == 0
    second = json.loads((mirror / "messages.json").read_text(encoding="utf-8"))
    assert keys_of(second["messages"]) == keys_of(first["messages"])


# =============================================================================================
# DashboardList directly
# =============================================================================================


@pytest.fixture
def transport(db: FakeRealtimeDatabase) -> RestTransport:
    return rest_transport(db.url)


def test_dashboard_list_appends_item_by_item_at_the_next_index(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/matches", rtt.listing("matches", [A, B], "T0"))
    dashboard = DashboardList(transport, "matches", "T1").open()
    assert dashboard.add(C) and dashboard.add(D)
    puts = [r for r in db.requests if r.method == "PUT"]
    assert [r.path for r in puts] == [f"/{BASE}/matches/matches/2.json", f"/{BASE}/matches/matches/3.json"]
    assert [r.json() for r in puts] == [C, D]
    assert all(r.headers["if-match"] == NULL_ETAG for r in puts)
    assert db.get_rendered(f"{BASE}/matches") == {"matches": [A, B, C, D], "count": 4, "updatedAt": "T1"}


def test_dashboard_list_does_not_add_an_item_with_a_known_merge_key(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/matches", rtt.listing("matches", [A], "T0"))
    dashboard = DashboardList(transport, "matches", "T1").open()
    assert not dashboard.add({**A, "reasoning": "a different text, same member and event"})
    assert [r.method for r in db.requests] == ["GET"]


def test_dashboard_list_two_writers_both_land_without_loss_or_duplicate(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    first = DashboardList(transport, "matches", "T1").open()
    second = DashboardList(rest_transport(db.url),
                           "matches", "T2").open()
    assert first.add(A)
    assert second.add(B)  # its slot 0 is taken: 412, re-read, slot 1
    assert not second.add(A)  # the other writer's item is known after the re-read
    assert first.add(C) is True
    assert keys_of(items_of(db, "matches")) == keys_of([A, B, C])


def test_dashboard_list_heal_merges_with_the_412_answer_without_rereading(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/matches", {"matches": {"0": A, "4": B}, "count": 2, "updatedAt": "T0"})
    reviewer_approves(db, f"{BASE}/matches/matches/4/status", lambda r: r.method == "PUT")
    dashboard = DashboardList(transport, "matches", "T1").open()
    assert [(r.method, r.status) for r in db.requests] == [("GET", 200), ("PUT", 412), ("PUT", 200)]
    assert dashboard.items == [A, {**B, "status": "approved"}]
    assert db.get_rendered(f"{BASE}/matches/matches") == [A, {**B, "status": "approved"}]


def test_dashboard_list_gives_up_after_a_bounded_number_of_conflicts(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/matches", {"matches": {"0": A, "4": B}, "count": 2})
    bumps = itertools.count()

    def busy_reviewer(request: RecordedRequest) -> None:
        if request.method == "PUT":
            db.set(f"{BASE}/matches/updatedAt", f"edit {next(bumps)}")

    db.on_request(busy_reviewer)
    with pytest.raises(FirebaseError):
        DashboardList(transport, "matches", "T1").open()
    puts = [r for r in db.requests if r.method == "PUT"]
    assert 1 <= len(puts) <= DashboardList.MAX_TRIES and all(r.status == 412 for r in puts)


def test_dashboard_list_append_whose_answer_was_lost_is_not_duplicated(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/matches", rtt.listing("matches", [A], "T0"))
    dashboard = DashboardList(transport, "matches", "T1").open()
    db.fail_next(503, method="PUT", path=f"{BASE}/matches/matches/1")

    def applied_then_lost(request: RecordedRequest) -> None:  # the write lands, its answer is a 503
        if request.method == "PUT" and request.path == f"/{BASE}/matches/matches/1.json" and request.status is None \
                and not db.get_rendered(f"{BASE}/matches/matches/1"):
            db.set(f"{BASE}/matches/matches/1", request.json())

    db.on_request(applied_then_lost)
    dashboard.add(B)
    assert dashboard.add(C)
    value = db.get_rendered(f"{BASE}/matches")
    assert keys_of(value["matches"]) == keys_of([A, B, C]) and value["count"] == 3


# =============================================================================================
# RestTransport directly: retries, errors, auth, timeouts
# =============================================================================================


def test_rest_get_is_retried_after_a_500(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/users", {"count": 1})
    db.fail_next(500, method="GET")
    value, etag = transport.get("users")
    assert value == {"count": 1} and etag == db.etag(f"{BASE}/users")
    assert [r.status for r in db.requests] == [500, 200]


def test_rest_put_is_retried_after_a_503(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.fail_next(503, method="PUT")
    transport.put("users", {"count": 2})
    assert [r.status for r in db.requests] == [503, 200]  # no print=silent: the answer echoes what was written
    assert db.get_rendered(f"{BASE}/users") == {"count": 2}


def test_rest_dropped_connection_is_retried(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.fail_next(0, method="PATCH")
    transport.patch("users", {"count": 3})
    assert [r.method for r in db.requests] == ["PATCH", "PATCH"]
    assert db.get_rendered(f"{BASE}/users/count") == 3


def test_rest_gives_up_after_its_retries(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.fail_next(503, count=100)
    with pytest.raises(FirebaseError, match="503"):
        transport.get("users")
    assert len(db.requests) == transport.retries + 1


def test_rest_401_is_not_retried_and_names_the_credentials_not_the_token(db: FakeRealtimeDatabase) -> None:
    transport = rest_transport(db.url, WRONG_TOKEN)
    with pytest.raises(FirebaseError) as caught:
        transport.put("users", {"count": 1})
    assert "401" in str(caught.value) and "FIREBASE_AUTH_TOKEN" in str(caught.value)
    assert WRONG_TOKEN not in str(caught.value)
    assert len(db.requests) == 1


def test_rest_404_says_database_not_found(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.fail_next(404, body={"error": "Firebase error. Please ensure that you spelled the name correctly"})
    with pytest.raises(FirebaseError, match="database not found"):
        transport.get("users")


def test_rest_400_carries_the_servers_error_text(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.fail_next(400, body={"error": "Invalid data; couldn't parse key beginning at 1:2."})
    with pytest.raises(FirebaseError, match="couldn't parse key beginning at 1:2"):
        transport.put("users", {"count": 1})
    assert len(db.requests) == 1


def test_rest_sends_the_token_as_auth_and_every_put_without_print_silent(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    transport.put("users", {"count": 1})
    _, etag = transport.get("users")
    assert transport.put("users", {"count": 2}, if_match=etag).ok
    assert not transport.put("users", {"count": 3}, if_match=etag).ok
    assert all(r.query.get("auth") == TOKEN for r in db.requests)
    assert [(r.method, r.query.get("print"), r.headers.get("if-match")) for r in db.requests] == [
        ("PUT", None, None), ("GET", None, None), ("PUT", None, etag), ("PUT", None, etag)]


def test_rest_412_answers_the_current_value_and_etag(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/users", {"count": 5})
    result = transport.put("users", {"count": 6}, if_match=NULL_ETAG)
    assert not result.ok and result.value == {"count": 5} and result.etag == db.etag(f"{BASE}/users")


def test_rest_call_times_out_against_a_server_that_never_answers() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog, nothing is ever read or answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        transport = rest_transport(url, timeout=0.2, retries=1)
        with pytest.raises(FirebaseError, match="no answer in time"):
            transport.get("users")
        with pytest.raises(FirebaseError, match="not sent"):  # after one timeout, nothing more is tried
            transport.put("users", {"count": 1})


def test_rest_unreachable_database_fails_cleanly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    transport = rest_transport(f"http://127.0.0.1:{port}", retries=1)
    with pytest.raises(FirebaseError, match="cannot reach") as caught:
        transport.put("users", {"count": 1})
    assert TOKEN not in str(caught.value)


# =============================================================================================
# Bytes sent: appends send each item once
# =============================================================================================


def body_bytes(requests: list[RecordedRequest]) -> int:
    return sum(len(r.body) for r in requests)


def test_appends_send_each_item_once_for_a_ten_member_campaign(db: FakeRealtimeDatabase, cli: Cli) -> None:
    run = cli(rest_env(db))
    assert run.code == 0
    total = run.report()["firebase"]["bytes_sent"]
    assert total == body_bytes(db.requests) > 0
    figures = {"total": total}
    for name in DASHBOARD_LISTS:
        figures[name] = body_bytes([r for r in db.requests if r.method in ("PUT", "PATCH")
                                    and r.path.startswith((f"/{BASE}/{name}.json", f"/{BASE}/{name}/"))])
    figures["campaigns"] = body_bytes(requests_to(db, "PUT", f"/{BASE}/campaigns/"))
    assert sum(v for k, v in figures.items() if k != "total") == total
    print(f"\nbytes sent, 10-member campaign: {figures}")
    for name in ("matches", "messages"):
        items = items_of(db, name)
        final = len(json.dumps(items, ensure_ascii=False).encode("utf-8"))
        item_puts = [r for r in db.requests if r.method == "PUT" and r.path.startswith(f"/{BASE}/{name}/{name}/")]
        assert len(item_puts) == len(items) == 10  # one PUT per item, nothing re-sent
        assert not requests_to(db, "PUT", f"/{BASE}/{name}.json")  # the whole list is never PUT on a clean list
        assert 0.95 * final <= body_bytes(item_puts) <= 1.05 * final  # each item once, not N²
        patches = requests_to(db, "PATCH", f"/{BASE}/{name}.json")
        assert body_bytes(patches) <= 100 * len(patches)  # count/updatedAt only


# =============================================================================================
# Service account (google-auth): OAuth2 bearer token from a local token endpoint
# =============================================================================================

SA_TOKEN = "ya29.test"


class _TokenHandler(LoopbackHandler):
    def do_POST(self) -> None:
        endpoint: TokenEndpoint = self.server.fake
        length = int(self.headers.get("content-length") or 0)
        endpoint.grants.append(self.rfile.read(length).decode())
        status = endpoint.status
        answer = ({"access_token": SA_TOKEN, "expires_in": 3600, "token_type": "Bearer"} if status == 200
                  else {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TokenEndpoint(LoopbackServer):
    """A local OAuth2 token endpoint: records each grant, answers ``SA_TOKEN`` (or a refusal if ``status`` != 200)."""

    handler = _TokenHandler
    poll_interval = 0.01

    def __init__(self) -> None:
        super().__init__()
        self.grants: list[str] = []
        self.status = 200


@pytest.fixture
def token_server() -> Iterator[TokenEndpoint]:
    with TokenEndpoint() as server:
        yield server


@pytest.fixture
def service_account_file(tmp_path: Path, token_server: TokenEndpoint) -> Path:
    pytest.importorskip("google.oauth2.service_account")
    crypto = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    key = crypto.generate_private_key(public_exponent=65537, key_size=2048)  # made now, never stored in the repo
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "rtt-test", "private_key_id": "test-key-1",
        "private_key": pem, "client_email": "rtt-test@rtt-test.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"{token_server.url}/token",
    }), encoding="utf-8")
    return path


def test_service_account_token_is_sent_as_a_bearer_token(
        cli: Cli, service_account_file: Path, token_server: TokenEndpoint) -> None:
    with FakeRealtimeDatabase(auth_token=SA_TOKEN) as sa_db:
        run = cli({"FIREBASE_DATABASE_URL": sa_db.url, "GOOGLE_APPLICATION_CREDENTIALS": str(service_account_file)})
        assert run.code == 0
        assert len(items_of(sa_db, "messages")) == 10
        assert sa_db.requests
        for request in sa_db.requests:
            assert request.headers.get("authorization") == f"Bearer {SA_TOKEN}"
            assert "auth" not in request.query and "access_token" not in request.query
    assert len(token_server.grants) == 1  # fetched once, reused while valid
    text = run.all_text()
    assert SA_TOKEN not in text and "PRIVATE KEY" not in text


def test_service_account_asks_for_the_firebase_scopes(
        cli: Cli, service_account_file: Path, token_server: TokenEndpoint) -> None:
    with FakeRealtimeDatabase(auth_token=SA_TOKEN) as sa_db:
        assert cli({"FIREBASE_DATABASE_URL": sa_db.url,
                    "GOOGLE_APPLICATION_CREDENTIALS": str(service_account_file)}).code == 0
    grant = urllib.parse.parse_qs(token_server.grants[0])
    assert grant["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    claims_part = grant["assertion"][0].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=" * (-len(claims_part) % 4)))
    assert set(claims["scope"].split()) == {"https://www.googleapis.com/auth/userinfo.email",
                                            "https://www.googleapis.com/auth/firebase.database"}


def test_service_account_token_refusal_exits_non_zero_without_leaking_the_key(
        db: FakeRealtimeDatabase, cli: Cli, service_account_file: Path, token_server: TokenEndpoint) -> None:
    token_server.status = 400
    run = cli({"FIREBASE_DATABASE_URL": db.url, "GOOGLE_APPLICATION_CREDENTIALS": str(service_account_file)})
    assert run.code == rtt.ExitCode.ATTENTION  # done, Firebase writes listed
    assert db.data is None
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "token" in lines[0].lower(), run.err
    assert len(run.messages) == 10
    assert "PRIVATE KEY" not in run.all_text()


def test_unreadable_service_account_file_is_a_usage_error(db: FakeRealtimeDatabase, cli: Cli, tmp_path: Path) -> None:
    pytest.importorskip("google.oauth2.service_account")
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "service_account", "private_key": "not a key"}', encoding="utf-8")
    run = cli({"FIREBASE_DATABASE_URL": db.url, "GOOGLE_APPLICATION_CREDENTIALS": str(broken)})
    assert run.code == 2
    assert "GOOGLE_APPLICATION_CREDENTIALS" in run.err and "Traceback" not in run.err
    assert db.requests == []


def test_a_bare_array_at_the_list_path_is_wrapped_not_wiped(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    approved = {**A, "status": "approved"}
    db.set(f"{BASE}/messages", [approved, B])
    dashboard = DashboardList(transport, "messages", "T1").open()
    assert dashboard.add(C)
    assert db.get_rendered(f"{BASE}/messages") == {"messages": [approved, B, C], "count": 3, "updatedAt": "T1"}


def test_entries_that_are_not_records_survive_healing(db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    db.set(f"{BASE}/matches", {"matches": {"0": A, "1": "a note", "5": B}, "count": 3, "owner": "dashboard"})
    DashboardList(transport, "matches", "T1").open()
    assert db.get_rendered(f"{BASE}/matches") == {"matches": [A, "a note", B], "count": 3, "owner": "dashboard"}


@pytest.mark.parametrize("foreign", ["a string", 42, {"matches": "not a list"}])
def test_a_location_holding_something_else_is_left_untouched(
        db: FakeRealtimeDatabase, transport: RestTransport, foreign: Any) -> None:
    db.set(f"{BASE}/matches", foreign)
    with pytest.raises(FirebaseError, match="left untouched"):
        DashboardList(transport, "matches", "T1").open()
    assert db.get_rendered(f"{BASE}/matches") == foreign
    assert [r.method for r in db.requests] == ["GET"]


def test_our_own_write_whose_answer_was_lost_counts_as_added(
        db: FakeRealtimeDatabase, transport: RestTransport) -> None:
    dashboard = DashboardList(transport, "matches", "T1").open()
    db.set(f"{BASE}/matches/matches/0", A)  # the first PUT landed; its answer never came back
    assert dashboard.add(A)
    assert db.get_rendered(f"{BASE}/matches") == {"matches": [A], "count": 1, "updatedAt": "T1"}


def test_a_server_with_its_own_etag_for_empty_locations_still_gets_the_append(
        db: FakeRealtimeDatabase, transport: RestTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    import fake_rtdb

    monkeypatch.setattr(fake_rtdb, "NULL_ETAG", "empty-0")  # a server that does not say null_etag
    dashboard = DashboardList(transport, "matches", "T1").open()
    assert dashboard.add(A)
    assert db.get_rendered(f"{BASE}/matches") == {"matches": [A], "count": 1, "updatedAt": "T1"}


class _HtmlHandler(LoopbackHandler):
    """A web server that is not a Realtime Database: every request gets a 200 HTML page."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b"<html><body>Welcome</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_PATCH = _answer


class HtmlSite(LoopbackServer):
    handler = _HtmlHandler


def test_a_url_that_is_not_a_realtime_database_fails_cleanly_with_a_report(cli: Cli) -> None:
    with HtmlSite() as site:
        run = cli({"FIREBASE_DATABASE_URL": site.url, "FIREBASE_AUTH_TOKEN": TOKEN})
    assert run.code == rtt.ExitCode.ATTENTION  # done, Firebase writes listed
    assert run.err.startswith("error: ") and run.err.count("\n") == 1 and "not JSON" in run.err
    assert "Traceback" not in run.err
    assert len(run.messages) == 10 and run.report()["firebase"]["not_written"]


def test_items_written_before_a_mid_run_failure_are_reported_as_written(
        db: FakeRealtimeDatabase, cli: Cli) -> None:
    puts = itertools.count()

    @db.on_request
    def fail_after_three_items(request: RecordedRequest) -> None:
        if request.method == "PUT" and "/matches/matches/" in request.path and next(puts) == 3:
            db.fail_next(400, body={"error": "quota"})

    run = cli(rest_env(db))
    assert run.code == rtt.ExitCode.ATTENTION  # done, Firebase writes listed
    assert "matches (3 items before the failure)" in run.report()["firebase"]["written"]
    assert len(items_of(db, "matches")) == 3
