"""Issue 20: ``--limit`` is per campaign day (a rerun tops up), and no event is offered to more members than
it can seat (``--invites-per-spot``, ``--max-invites-per-event``), whichever matcher picks.

The runs go through the one CLI harness (``run_cli``) into the local mirror, which keeps the real
database's semantics; all people here are fictional (``@example.com``, phones in 555-01xx).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import NOW, NOW_ISO, CliRun

import return_to_table as rtt

MEMBERS = 12
TOMORROW_ISO = "2026-01-16T12:00:00Z"
LATE_SAME_DAY_ISO = "2026-01-16T03:00:00Z"  # 22:00 on the 15th in New York: still NOW's campaign day


def iso(moment: Any) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def event(eid: str, name: str, *, capacity: int | None, going: int, days: float = 5,
          hood: str = "chelsea") -> dict[str, Any]:
    doc = {"_id": eid, "name": name, "categories": ["WINE"], "features": ["wine-tasting"], "neighborhood": hood,
           "participants": [f"guest-{eid}-{k}" for k in range(going)], "ownerId": "host-1",
           "startDate": iso(NOW + timedelta(days=days, hours=11)), "type": "public", "active": True,
           "eventStatus": "approved"}
    if capacity is not None:
        doc["maxParticipants"] = capacity
    return doc


SMALL = event("ev-small", "Wine Social", capacity=10, going=8, days=3)  # 2 spots left, 80% full: everyone's pick
WIDE = event("ev-wide", "Wine Bar Crawl", capacity=None, going=0, days=6, hood="harlem")  # capacity unknown
LARGE = event("ev-large", "Wine Dinner", capacity=40, going=4, days=8, hood="harlem")  # 36 spots left


def world(folder: Path, events: list[dict[str, Any]], members: int = MEMBERS) -> Path:
    """``members`` dormant wine lovers (distinct numbers), ranked by how long they have been away."""
    users, past = [], []
    for i in range(members):
        uid = f"m{i:02d}"
        users.append({"_id": uid, "firstName": "Robin", "lastName": "Testwell", "email": f"{uid}@example.com",
                      "phone": f"+121255501{i:02d}", "gender": "female", "interests": ["wine"],
                      "occupation": "Teacher", "homeNeighborhood": "chelsea"})
        past.append({"_id": f"past-{uid}", "name": "Neighbourhood Supper", "categories": ["DINNER"],
                     "participants": [uid], "ownerId": uid, "maxParticipants": 8,
                     "startDate": iso(NOW - timedelta(days=40 + 3 * i)), "type": "public", "active": True,
                     "eventStatus": "approved"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.json").write_text(json.dumps(users), encoding="utf-8")
    (folder / "events.json").write_text(json.dumps(past + events), encoding="utf-8")
    return folder


@pytest.fixture
def plenty(tmp_path: Path) -> Path:
    """Events with room for everyone: only the daily limit bounds the runs."""
    return world(tmp_path / "plenty", [LARGE])


@dataclass
class Ran:
    """One run, read as soon as it ended (the next run in the same --out rewrites data/processed/)."""

    run: CliRun
    report: dict[str, Any]
    held: list[str]  # the members held out

    @property
    def out(self) -> str:
        return self.run.out

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.report["messages"]


def campaign(run_cli: Any, folder: Path, out: Path, *flags: str, now: str = NOW_ISO,
             env: dict[str, str] | None = None) -> Ran:
    run = run_cli("--source", str(folder), "--now", now, *flags, root=out, env=env)
    assert run.code == 0, run.err
    newest = max((out / "reports").glob("return_to_table_report_*.json"), key=lambda p: p.stat().st_mtime_ns)
    report = json.loads(newest.read_text(encoding="utf-8"))
    held = [] if "--dry-run" in flags else [h["user_id"] for h in run.load("data/processed/holdout.json")]
    return Ran(run, report, held)


def mirror(out: Path, name: str) -> list[dict[str, Any]]:
    path = out / "data" / "firebase" / "Leo" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))[name] if path.exists() else []


def archived(out: Path) -> list[str]:
    folder = out / "data" / "firebase" / "Leo" / "campaigns"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def drafted(ran: Ran) -> list[str]:
    return [m["user_id"] for m in ran.messages]


# --------------------------------------------------------------------------------------------
# Volume is per campaign day
# --------------------------------------------------------------------------------------------


def test_a_rerun_after_a_partial_run_tops_up_to_the_days_limit_and_a_third_drafts_nothing(run_cli, plenty, tmp_path):
    whole = campaign(run_cli, plenty, tmp_path / "whole", "--limit", "5")  # one uninterrupted run, for reference
    out = tmp_path / "out"
    first = campaign(run_cli, plenty, out, "--limit", "2")  # a run stopped after two (Ctrl-C, exit 3)
    second = campaign(run_cli, plenty, out, "--limit", "5")
    assert len(drafted(first)) == 2 and len(drafted(second)) == 3  # the top-up: only the rest of the day's 5
    assert not set(drafted(first)) & set(drafted(second))  # nobody drafted twice in a day
    assert sorted(drafted(first) + drafted(second)) == sorted(drafted(whole))  # the same day as one run
    assert second.report["daily_limit"] == {
        "day": "2026-01-15", "limit": 5, "drafted_before": 2, "held_out_before": 0, "remaining": 3,
        "drafted_this_run": 3, "held_out_this_run": 0, "already_drafted": False}
    campaigns = archived(out)
    third = campaign(run_cli, plenty, out, "--limit", "5")
    assert drafted(third) == [] and len(mirror(out, "messages")) == 5
    assert rtt.LIMIT_ALREADY_DRAFTED in third.out and third.run.code == 0
    assert third.report["daily_limit"]["already_drafted"] is True
    assert archived(out) == campaigns  # a run that drafts nothing archives no empty campaign


def test_over_rest_the_day_is_counted_and_an_empty_run_leaves_no_archive(run_cli, plenty, tmp_path):
    from fake_rtdb import FakeRealtimeDatabase
    from test_firebase import TOKEN, rest_env

    with FakeRealtimeDatabase(auth_token=TOKEN) as db:
        first = campaign(run_cli, plenty, tmp_path / "a", "--limit", "3", "--llm", "off", env=rest_env(db))
        archives = set(db.get_rendered("Leo/campaigns"))
        second = campaign(run_cli, plenty, tmp_path / "b", "--limit", "3", "--llm", "off", env=rest_env(db))
        assert len(drafted(first)) == 3 and drafted(second) == []  # another --out, the same dashboard
        assert set(db.get_rendered("Leo/campaigns")) == archives == {first.report["campaign_id"]}
        assert len(db.get_rendered("Leo/messages")["messages"]) == 3


def test_the_campaign_day_is_the_date_of_now_in_campaign_timezone(run_cli, plenty, tmp_path):
    out = tmp_path / "out"
    campaign(run_cli, plenty, out, "--limit", "3")
    late = campaign(run_cli, plenty, out, "--limit", "3", now=LATE_SAME_DAY_ISO)  # 22:00 in New York
    assert drafted(late) == []
    tokyo, env = tmp_path / "tokyo", {"CAMPAIGN_TIMEZONE": "Asia/Tokyo"}  # 21:00 on the 15th, then noon on the 16th
    campaign(run_cli, plenty, tokyo, "--limit", "3", env=env)
    assert len(drafted(campaign(run_cli, plenty, tokyo, "--limit", "3", now=LATE_SAME_DAY_ISO, env=env))) == 3
    next_day = campaign(run_cli, plenty, out, "--limit", "3", now=TOMORROW_ISO)
    assert len(drafted(next_day)) == 3  # a new campaign day, a new limit
    assert next_day.report["daily_limit"]["drafted_before"] == 0


def test_the_day_counts_only_this_tools_messages(run_cli, plenty, tmp_path):
    out = tmp_path / "out"
    other_tool = {"user_id": "x-1", "event_id": "ev-x", "status": "pending", "generated_at": NOW_ISO,
                  "message_text": "Hi! From another tool."}
    ours = {**other_tool, "user_id": "x-2", "generator": "template"}
    seed(out, "messages", [other_tool, ours])
    run = campaign(run_cli, plenty, out, "--limit", "3")
    assert len(drafted(run)) == 2 and run.report["daily_limit"]["drafted_before"] == 1


def test_holdout_records_count_the_same_way(run_cli, tmp_path):
    folder = world(tmp_path / "w", [LARGE], members=40)
    whole = campaign(run_cli, folder, tmp_path / "whole", "--limit", "12", "--holdout", "0.3")
    out = tmp_path / "out"
    first = campaign(run_cli, folder, out, "--limit", "4", "--holdout", "0.3")
    second = campaign(run_cli, folder, out, "--limit", "12", "--holdout", "0.3")
    held = first.held + second.held
    assert held and len(set(held)) == len(held)  # nobody held out twice in a day
    assert sorted(held) == sorted(whole.held)
    assert second.report["daily_limit"]["held_out_before"] == len(first.held)
    third = campaign(run_cli, folder, out, "--limit", "12", "--holdout", "0.3")
    assert third.held == [] and drafted(third) == []


def test_a_dry_run_counts_the_day_and_writes_nothing(run_cli, plenty, tmp_path):
    out = tmp_path / "out"
    campaign(run_cli, plenty, out, "--limit", "2")
    before = {p: p.read_bytes() for p in (out / "data" / "firebase").rglob("*.json")}
    rehearsal = campaign(run_cli, plenty, out, "--limit", "5", "--dry-run")
    assert len(drafted(rehearsal)) == 3
    assert rehearsal.report["daily_limit"]["drafted_before"] == 2
    done = campaign(run_cli, plenty, out, "--limit", "2", "--dry-run")
    assert drafted(done) == [] and rtt.LIMIT_ALREADY_DRAFTED in done.out
    assert {p: p.read_bytes() for p in (out / "data" / "firebase").rglob("*.json")} == before


def test_limit_help_and_readme_say_per_campaign_day():
    readme = (Path(rtt.__file__).parent / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `--limit N`"))
    help_text = " ".join(rtt.build_parser().format_help().split())
    assert "per campaign day" in row and "per campaign day" in help_text
    assert "contract change" in readme.lower()


# --------------------------------------------------------------------------------------------
# Seats
# --------------------------------------------------------------------------------------------


def seed(out: Path, name: str, items: list[dict[str, Any]]) -> None:
    """Items already in the dashboard's list (the local mirror, as an earlier run left it)."""
    transport = rtt.LocalMirrorTransport(out / "data" / "firebase", "Leo")
    transport.put(name, rtt.listing(name, items, NOW_ISO))
    transport.flush()


def per_event(run: Ran) -> Counter[str]:
    return Counter(m["event_id"] for m in run.messages)


def test_an_event_with_two_spots_gets_two_invitations_and_the_others_their_next_best(run_cli, tmp_path):
    folder = world(tmp_path / "w", [SMALL, LARGE])
    run = campaign(run_cli, folder, tmp_path / "out", "--limit", "8")
    assert per_event(run) == {"ev-small": 2, "ev-large": 6}
    assert run.report["seats_exhausted"] == {"ev-small": 6}
    for message in run.run.messages[2:]:
        assert "first choice, Wine Social, already has as many open invitations as it can seat" in message["reasoning"]
    assert "Seats exhausted (members whose first choice had no seat left, by event): Wine Social (6)." in run.run.report_path(".md").read_text(encoding="utf-8")


def test_open_invitations_in_the_dashboard_hold_seats_across_days(run_cli, tmp_path):
    folder = world(tmp_path / "w", [SMALL, LARGE])
    out = tmp_path / "out"
    yesterday = iso(NOW - timedelta(days=1))
    earlier = {"event_id": "ev-small", "generator": "template", "generated_at": yesterday}
    seed(out, "messages", [{**earlier, "user_id": "x-1", "status": "pending"},
                           {**earlier, "user_id": "x-2", "status": "rejected"},  # no longer an invitation
                           {**earlier, "user_id": "x-3", "status": "sent"}])
    run = campaign(run_cli, folder, out, "--limit", "4")
    assert per_event(run) == {"ev-small": 1, "ev-large": 3}
    later = campaign(run_cli, folder, out, "--limit", "4", now=TOMORROW_ISO)  # the pending ones still hold
    assert per_event(later) == {"ev-large": 4}
    assert later.report["seats_exhausted"] == {"ev-small": 4}


def test_an_event_of_unknown_capacity_gets_at_most_max_invites_per_event(run_cli, tmp_path):
    folder = world(tmp_path / "w", [WIDE])
    run = campaign(run_cli, folder, tmp_path / "out", "--limit", "8", "--max-invites-per-event", "3")
    assert per_event(run) == {"ev-wide": 3}
    reasons = run.report["skip_reasons"]
    assert reasons["seats_exhausted"] == MEMBERS - 3
    default = campaign(run_cli, folder, tmp_path / "default", "--limit", "12")
    assert per_event(default) == {"ev-wide": rtt.DEFAULT_MAX_INVITES_PER_EVENT}


def spots_claimed(text: str) -> int | None:
    found = re.search(r"(\d+) (?:spots? )?left", text)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("ratio", ["1", "1.5", "2.5"])
def test_no_message_claims_n_spots_left_to_more_than_n_times_the_ratio(run_cli, tmp_path, ratio):
    one_left = event("ev-one", "Wine Social", capacity=10, going=9, days=3)
    folder = world(tmp_path / "w", [one_left, LARGE])
    run = campaign(run_cli, folder, tmp_path / "out", "--limit", "8", "--invites-per-spot", ratio)
    to_one = [m for m in run.messages if m["event_id"] == "ev-one"]
    claims = [m for m in to_one if spots_claimed(m["message_text"]) == 1]
    assert len(to_one) == rtt.math.ceil(float(ratio))  # the cap rounds up ...
    assert len(claims) <= 1 * float(ratio) and claims  # ... the claim "1 spot left" rounds down


def test_the_seat_arithmetic():
    assert rtt.invitation_cap(10, 1.1, 10) == 11  # not 12: 1.1 x 10 is 11.000000000000002 in floats
    assert rtt.invitation_cap(3, 0.5, 10) == 2 and rtt.spots_claim_bound(3, 0.5) == 1
    assert rtt.invitation_cap(None, 1.0, 7) == 7 and rtt.spots_claim_bound(None, 1.0) is None
    assert rtt.invitation_cap(0.5, 1.0, 7) == 0  # half a spot is no seat
    seats = rtt.SeatLedger(1.0, 5, {"e": 1})
    full = {"_id": "e", "remaining_spots": 2}
    assert seats.reserve("a", full) == rtt.Seat("e", 2, True)
    assert seats.reserve("b", full) is None
    seats.release("a")
    assert seats.reserve("b", full) == rtt.Seat("e", 2, True)
    assert rtt.daily_remaining(10, 12) == 0 and rtt.daily_remaining(10, -3) == 10


def test_the_campaign_day_is_local():
    start, end = rtt.campaign_day(rtt.to_utc(LATE_SAME_DAY_ISO), rtt.ZoneInfo("America/New_York"))
    assert (iso(start), iso(end)) == ("2026-01-15T05:00:00Z", "2026-01-16T05:00:00Z")


@pytest.mark.parametrize(("flag", "value"), [
    ("--invites-per-spot", "-1"), ("--invites-per-spot", "0"), ("--invites-per-spot", "nan"),
    ("--invites-per-spot", "inf"), ("--invites-per-spot", "1e300"), ("--invites-per-spot", "lots"),
    ("--max-invites-per-event", "-1"), ("--max-invites-per-event", "0"), ("--max-invites-per-event", "nan"),
    ("--max-invites-per-event", "1.5"), ("--max-invites-per-event", "10000000000000000000000"),
])
def test_bad_allocation_flags_exit_2_with_one_line(run_cli, plenty, flag, value):
    run = run_cli("--source", str(plenty), "--now", NOW_ISO, f"{flag}={value}")
    assert run.code == rtt.ExitCode.USAGE
    assert run.err.count("\n") == 1 and flag in run.err and "Traceback" not in run.err
    assert not (run.root / "reports").exists()


# --------------------------------------------------------------------------------------------
# Claude: offered only events with a seat; a pick taken meanwhile is re-picked by the rules
# --------------------------------------------------------------------------------------------


@pytest.fixture
def claude_fake() -> Any:
    from fake_anthropic import FakeMessagesAPI
    from test_claude import smart

    with FakeMessagesAPI(default=smart) as server:
        yield server


def test_claude_is_never_offered_an_event_without_a_seat(claude_fake, tmp_path):
    from test_claude import claude_cli, is_matching, offered, write_world

    run = claude_cli(claude_fake, write_world(tmp_path / "export"), tmp_path / "out", "--invites-per-spot", "0.01",
                     "--concurrency", "1")  # one invitation per event of known capacity, one member at a time
    assert run.messages and max(Counter(m["event_id"] for m in run.messages).values()) == 1
    taken: set[str] = set()
    for request in claude_fake.requests:  # no prompt offers an event an earlier member took
        if is_matching(request):
            assert not {event_id for event_id, _ in offered(request)} & taken
            taken.add(offered(request)[0][0])  # the fake answers with the first event offered


def all_at_once(members: int) -> Any:
    """``smart``, the first ``members`` matching requests each answered once all of them are in: they race
    for real, however slowly the walk starts its members (an answer at once let the first members finish
    before the last were offered anything: a loaded machine, or a history read from the engine, ran no race)."""
    from test_claude import is_matching, smart

    gate, seen = threading.Barrier(members), itertools.count()

    def answer(request: Any) -> Any:
        if is_matching(request) and next(seen) < members:
            gate.wait(timeout=30)
        return smart(request)

    return answer


def test_claude_members_racing_for_the_last_seats_are_re_picked_by_the_rules(claude_fake, tmp_path):
    from test_claude import claude_cli

    claude_fake.default = all_at_once(rtt.ClaudeAdvisor.MAX_CONSECUTIVE_FAILURES)  # (the calls on the wire at most)
    folder = world(tmp_path / "w", [SMALL, LARGE])  # six members at once all pick the two-spot event
    run = claude_cli(claude_fake, folder, tmp_path / "out", "--now", NOW_ISO, "--limit", "8", "--concurrency", "6")
    assert Counter(m["event_id"] for m in run.messages) == {"ev-small": 2, "ev-large": 6}
    reasons = [m["reasoning"] for m in run.matches if m["event_id"] == "ev-large"]
    assert any("filled up while it was chosen" in r for r in reasons)
