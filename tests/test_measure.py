"""``measure``: did the campaigns bring anyone back, treated against the holdout.

The statistics are checked against published worked examples; the subcommand against constructed
worlds whose truth is known: archives written straight into the local mirror (or the fake Realtime
Database), the shapes of the common brief, and events in a ``--source`` folder. All people here are
fictional (ids only).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mongomock
import pytest
from bson import ObjectId
from builders import NOW, NOW_ISO, CliRun, write_folder
from conftest import ISOLATED_VARIABLES
from fake_rtdb import FakeRealtimeDatabase
from hypothesis import given, settings
from hypothesis import strategies as st

import return_to_table as rtt

BASE = rtt.DEFAULT_BASE_PATH
TOKEN = "measure-test-token"
AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AS_OF_ISO = "2026-03-01T12:00:00Z"
FIRST_RUN = datetime(2026, 1, 10, 11, 0, tzinfo=UTC)  # the first archived campaign's --now
SECOND_RUN = datetime(2026, 1, 11, 11, 0, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return rtt.iso_utc(moment) or ""


# =============================================================================================
# The statistics against published worked examples
# =============================================================================================

# Newcombe RG (1998a), "Two-sided confidence intervals for the single proportion: comparison of seven
# methods", Statistics in Medicine 17:857-872, Table I, method 3 (Wilson's score interval, no continuity
# correction): 81/263, 15/148, 0/20 and 1/29.
WILSON_EXAMPLES = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)),
                   ((0, 20), (0.0, 0.1611)), ((1, 29), (0.0061, 0.1718))]

# Newcombe RG (1998b), "Interval estimation for the difference between independent proportions: comparison
# of eleven methods", Statistics in Medicine 17:873-890, Table II, method 10 (the hybrid score interval
# without continuity correction), examples (a), (b) and (d)-(h).
NEWCOMBE_EXAMPLES = [
    ("a", (56, 70, 48, 80), 0.2000, (0.0524, 0.3339)),
    ("b", (9, 10, 3, 10), 0.6000, (0.1705, 0.8090)),
    ("d", (5, 56, 0, 29), 0.0893, (-0.0381, 0.1926)),
    ("e", (0, 10, 0, 20), 0.0, (-0.1611, 0.2775)),
    ("f", (0, 10, 0, 10), 0.0, (-0.2775, 0.2775)),
    ("g", (10, 10, 0, 20), 1.0, (0.6791, 1.0000)),
    ("h", (10, 10, 0, 10), 1.0, (0.6075, 1.0000)),
]


@pytest.mark.parametrize(("counts", "expected"), WILSON_EXAMPLES)
def test_wilson_interval_matches_newcombe_1998a_table_1(counts: tuple[int, int], expected: tuple[float, float]) -> None:
    low, high = rtt.wilson_interval(*counts)
    assert (round(low, 4), round(high, 4)) == expected


@pytest.mark.parametrize(("example", "counts", "difference", "expected"), NEWCOMBE_EXAMPLES,
                         ids=[e[0] for e in NEWCOMBE_EXAMPLES])
def test_newcombe_method_10_matches_newcombe_1998b_table_2(example: str, counts: tuple[int, int, int, int],
                                                           difference: float, expected: tuple[float, float]) -> None:
    x1, n1, x2, n2 = counts
    low, high = rtt.newcombe_interval(*counts)
    assert round(x1 / n1 - x2 / n2, 4) == difference
    assert (round(low, 4), round(high, 4)) == expected


def test_z_test_matches_the_openstax_hives_example() -> None:
    """Illowsky & Dean, Collaborative Statistics (OpenStax CNX m17043), "Comparing two independent population
    proportions", example: 20 of 200 (medication A) against 12 of 200 (medication B): p-value 0.1404."""
    z, p_value = rtt.two_proportion_z_test(20, 200, 12, 200)
    assert round(p_value, 4) == 0.1404
    assert round(z, 2) == 1.47


def test_z_test_squared_is_pearsons_chi_square_and_symmetric() -> None:
    """For a 2x2 table the pooled z-test is Pearson's chi-square without continuity correction: z**2 == X2."""
    x1, n1, x2, n2 = 56, 70, 48, 80
    table = [[x1, n1 - x1], [x2, n2 - x2]]
    total = n1 + n2
    columns = [x1 + x2, total - x1 - x2]
    chi_square = sum((table[r][c] - [n1, n2][r] * columns[c] / total) ** 2 / ([n1, n2][r] * columns[c] / total)
                     for r in range(2) for c in range(2))
    z, p_value = rtt.two_proportion_z_test(x1, n1, x2, n2)
    assert z ** 2 == pytest.approx(chi_square)
    assert rtt.two_proportion_z_test(x2, n2, x1, n1) == pytest.approx((-z, p_value))


def test_z_test_with_identical_all_or_nothing_groups_finds_no_difference() -> None:
    assert rtt.two_proportion_z_test(0, 10, 0, 30) == (0.0, 1.0)
    assert rtt.two_proportion_z_test(10, 10, 30, 30) == (0.0, 1.0)


def test_lift_reports_points_relative_lift_and_none_without_a_closed_holdout() -> None:
    found = rtt.lift(rtt.Tally(size=100, came_back=30), rtt.Tally(size=100, came_back=20))
    assert found is not None
    assert found.difference_pp == pytest.approx(10.0)
    assert found.relative == pytest.approx(0.5)
    assert (found.low_pp, found.high_pp) == pytest.approx([100 * v for v in rtt.newcombe_interval(30, 100, 20, 100)])
    assert rtt.lift(rtt.Tally(size=100, came_back=30), rtt.Tally(open=40)) is None
    no_base = rtt.lift(rtt.Tally(size=10, came_back=3), rtt.Tally(size=10, came_back=0))
    assert no_base is not None and no_base.relative is None


# =============================================================================================
# Constructed worlds: the archive in the local mirror, the events in a --source folder
# =============================================================================================


def member(campaign: int, index: int) -> ObjectId:
    """A member id that says which campaign world made it."""
    return ObjectId(f"{0x70 + campaign:02x}{index:022x}")


class World:
    """Archived campaigns and the events members went to, with the truth known by construction."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.archives: dict[str, dict[str, Any]] = {}
        self.serial = 0

    def event(self, start: datetime, people: Sequence[ObjectId], *, event_id: ObjectId | None = None,
              owner: ObjectId | None = None) -> ObjectId:
        self.serial += 1
        event_id = event_id or ObjectId(f"{0xE0:02x}{self.serial:022x}")
        self.events.append({"_id": event_id, "name": f"Supper {self.serial}", "type": "public", "active": True,
                            "startDate": start.replace(tzinfo=None), "ownerId": owner or ObjectId("6f" + "0" * 22),
                            "participants": list(people), "maxParticipants": 10_000})
        return event_id

    def campaign(self, campaign_id: str, created: datetime, *, messages: Sequence[dict[str, Any]] = (),
                 holdout: Sequence[dict[str, Any]] | None = None, status: str = "completed") -> None:
        archive: dict[str, Any] = {
            "metadata": {"id": campaign_id, "name": rtt.CAMPAIGN_NAME, "created_at": iso(created), "status": status,
                         "stats": {"messages_generated": len(messages)}},
            "messages": {"messages": list(messages), "count": len(messages), "updatedAt": iso(created)}}
        if holdout is not None:
            archive["holdout"] = {"holdout": list(holdout), "count": len(holdout), "updatedAt": iso(created)}
        self.archives[campaign_id] = archive

    def arms(self, campaign_id: str, created: datetime, *, number: int, treated: int, treated_back: int,
             held_out: int, held_back: int, to_suggested: float = 0.5) -> ObjectId:
        """A campaign whose treated and holdout members come back in exactly the given numbers: a share
        ``to_suggested`` of them to the suggested event (3 days later), the others to another one (5 days
        later). Everyone was at a table before the run, and the ones who do not come back go later than the
        window (20 days): neither may count."""
        suggested = ObjectId(f"{0xE8:02x}{number:022x}")
        people = [member(number, i) for i in range(treated + held_out)]
        treated_ids, held_ids = people[:treated], people[treated:]
        back = treated_ids[:treated_back] + held_ids[:held_back]
        cut = [*treated_ids[: round(treated_back * to_suggested)], *held_ids[: round(held_back * to_suggested)]]
        self.event(created + timedelta(days=3), cut, event_id=suggested)
        self.event(created + timedelta(days=5), [p for p in back if p not in set(cut)])
        self.event(created - timedelta(days=2), people)
        self.event(created + timedelta(days=20), [p for p in people if p not in set(back)])
        self.campaign(campaign_id, created, messages=[message(p, suggested, created) for p in treated_ids],
                      holdout=[held(p, suggested, created, campaign_id, rank)
                               for rank, p in enumerate(held_ids, 1)] if held_out else None)
        return suggested

    def write(self, root: Path, events_folder: Path, base: str = BASE) -> None:
        for campaign_id, parts in self.archives.items():
            folder = root / "data" / "firebase" / base / "campaigns" / campaign_id
            folder.mkdir(parents=True, exist_ok=True)
            for part, value in parts.items():
                (folder / f"{part}.json").write_text(json.dumps(value), encoding="utf-8")
        write_folder(events_folder, [], self.events)

    def seed(self, db: FakeRealtimeDatabase, base: str = BASE) -> None:
        for campaign_id, parts in self.archives.items():
            for part, value in parts.items():
                db.set(f"{base}/campaigns/{campaign_id}/{part}", value)


def message(user: ObjectId, event_id: ObjectId, created: datetime, **fields: Any) -> dict[str, Any]:
    """An archived message as the campaign writes it (issue 9's fields), ``status`` pending by default."""
    return {"user_id": str(user), "user_name": "Member", "user_phone": "+12125550100", "event_id": str(event_id),
            "event_name": "Supper", "message_text": "Hi! Welcome back.", "status": "pending",
            "generated_at": iso(created), "send_after": iso(created), "send_before": iso(created + timedelta(days=2)),
            "recipient_timezone": "America/New_York", **fields}


def held(user: ObjectId, event_id: ObjectId, created: datetime, campaign_id: str, rank: int) -> dict[str, Any]:
    """A holdout record (the brief's HoldoutRecord)."""
    return {"user_id": str(user), "user_name": "Member", "rank": rank, "reactivation_score": 50.0,
            "event_id": str(event_id), "event_name": "Supper", "event_start": iso(created + timedelta(days=3)),
            "held_out_at": iso(created), "campaign_id": campaign_id, "holdout_fraction": 0.2}


@pytest.fixture
def measure(run_cli: Callable[..., CliRun], tmp_path: Path) -> Callable[..., CliRun]:
    """``measure(world, *args, env=...)``: the world written under a fresh --out, then ``measure`` on it."""

    def run(world: World | None, *args: str, env: dict[str, str] | None = None, root: Path | None = None,
            now: str = AS_OF_ISO) -> CliRun:
        root = root or tmp_path / "out"
        events = tmp_path / "events"
        if world is not None:
            world.write(root, events)
        return run_cli("measure", "--source", str(events), "--now", now, *args, env=env, root=root)

    return run


def report_of(run: CliRun) -> dict[str, Any]:
    found = sorted((run.root / "reports").glob("return_to_table_measure_*.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text(encoding="utf-8"))


def markdown_of(run: CliRun) -> str:
    found = sorted((run.root / "reports").glob("return_to_table_measure_*.md"))
    assert len(found) == 1, found
    return found[0].read_text(encoding="utf-8")


def group(block: dict[str, Any], name: str) -> tuple[int, int, int, int]:
    g = block["groups"][name]
    return g["size"], g["came_back"], g["came_to_suggested"], g["open"]


def lift_world() -> World:
    """Treated 30% against holdout 20%, over 500 members each."""
    world = World()
    world.arms("return-to-table-20260110-110000", FIRST_RUN, number=1, treated=500, treated_back=150,
               held_out=500, held_back=100)
    return world


def test_treated_30_against_holdout_20_gives_a_lift_whose_interval_excludes_zero(measure) -> None:
    run = measure(lift_world())
    assert run.code == 0, run.err
    report = report_of(run)
    (entry,) = report["campaigns"]
    assert group(entry, "treated") == (500, 150, 75, 0)
    assert group(entry, "holdout") == (500, 100, 50, 0)
    found = entry["lift"]["treated"]
    low, high = rtt.newcombe_interval(150, 500, 100, 500)
    assert found["difference_pp"] == 10.0
    assert found["interval_pp"] == [round(100 * low, 2), round(100 * high, 2)]
    assert found["interval_pp"][0] > 0
    assert found["relative_lift"] == 0.5
    assert found["p_value"] < 0.001
    assert entry["lift_computable"] is True and entry["note"] is None
    assert report["pooled"]["lift"]["treated"] == found
    assert "lift treated vs holdout: +10.0 pp (95% CI" in run.out
    print(run.out)  # the sample table quoted in the report back (pytest -s)


def test_equal_rates_give_an_interval_around_zero_and_a_large_p(measure) -> None:
    world = World()
    world.arms("return-to-table-20260110-110000", FIRST_RUN, number=1, treated=400, treated_back=80,
               held_out=400, held_back=80)
    run = measure(world)
    assert run.code == 0, run.err
    found = report_of(run)["pooled"]["lift"]["treated"]
    assert found["difference_pp"] == 0.0
    assert found["interval_pp"][0] < 0 < found["interval_pp"][1]
    assert found["p_value"] > 0.5


def test_a_campaign_without_holdout_says_lift_cannot_be_computed_and_gives_rates(measure) -> None:
    world = World()
    world.arms("return-to-table-20260110-110000", FIRST_RUN, number=1, treated=40, treated_back=10,
               held_out=0, held_back=0)
    run = measure(world)
    assert run.code == 0, run.err
    entry = report_of(run)["campaigns"][0]
    assert group(entry, "treated") == (40, 10, 5, 0)
    assert entry["groups"]["treated"]["rate"] == 0.25
    assert entry["lift_computable"] is False
    assert entry["lift"]["treated"] is None
    assert entry["note"] == "no holdout members: lift cannot be computed; rates only"
    assert "no holdout members: lift cannot be computed; rates only" in run.out
    assert "10/40 25.0%" in run.out and "no holdout: rates only" in run.out  # the campaign's line
    assert "no holdout members: lift cannot be computed; rates only" in markdown_of(run)


def test_open_windows_are_counted_apart_never_as_not_back(measure) -> None:
    """A run 5 days before --now: every 14-day window is open; those already back are said so."""
    world = World()
    recent = AS_OF - timedelta(days=5)
    world.arms("return-to-table-20260224-120000", recent, number=2, treated=10, treated_back=4,
               held_out=10, held_back=1)
    world.arms("return-to-table-20260110-110000", FIRST_RUN, number=1, treated=10, treated_back=3,
               held_out=10, held_back=2)
    run = measure(world)
    assert run.code == 0, run.err
    report = report_of(run)
    old, new = report["campaigns"]
    assert new["campaign_id"] == "return-to-table-20260224-120000"
    assert group(old, "treated") == (10, 3, 2, 0)
    assert group(new, "treated") == (0, 0, 0, 10)
    assert new["groups"]["treated"]["open_came_back"] == 4  # 2 days ago, and today (an RSVP: it starts at --now)
    assert new["groups"]["treated"]["rate"] is None
    assert new["note"] == "no holdout member's window has closed yet: lift cannot be computed yet; rates only"
    assert group(report["pooled"], "treated") == (10, 3, round(3 * 0.5), 10)
    assert group(report["pooled"], "holdout") == (10, 2, 1, 10)
    assert "10 (4 back)" in run.out
    assert "(10 open)" in run.out  # the recent campaign's line: no closed window, ten open in each group


def test_a_member_back_at_another_event_came_back_but_not_to_the_suggested_one(measure) -> None:
    world = World()
    maya, zoe = member(9, 1), member(9, 2)
    suggested = world.event(FIRST_RUN + timedelta(days=2), [maya])
    world.event(FIRST_RUN + timedelta(days=6), [zoe])
    world.campaign("return-to-table-20260110-110000", FIRST_RUN,
                   messages=[message(maya, suggested, FIRST_RUN), message(zoe, suggested, FIRST_RUN)])
    run = measure(world)
    assert run.code == 0, run.err
    treated = report_of(run)["campaigns"][0]["groups"]["treated"]
    assert (treated["size"], treated["came_back"], treated["came_to_suggested"]) == (2, 2, 1)
    assert treated["suggested_rate"] == 0.5


def test_an_owner_comes_back_too_and_events_outside_the_window_do_not_count(measure) -> None:
    world = World()
    host, early, late = member(9, 1), member(9, 2), member(9, 3)
    suggested = world.event(FIRST_RUN + timedelta(days=1), [], owner=host)
    world.event(FIRST_RUN - timedelta(hours=1), [early])  # before the message
    world.event(FIRST_RUN + timedelta(days=14, seconds=1), [late])  # just after the window
    world.campaign("c1", FIRST_RUN, messages=[message(p, suggested, FIRST_RUN) for p in (host, early, late)])
    run = measure(world)
    treated = report_of(run)["campaigns"][0]["groups"]["treated"]
    assert (treated["size"], treated["came_back"], treated["came_to_suggested"]) == (3, 1, 1)


def test_sent_messages_are_followed_from_sent_at_approved_ones_from_generated_at(measure) -> None:
    """``sent_at`` moves the window: Ana's event is before it (not back), Ben's within 14 days of it but not
    of generated_at (back). Statuses give the approved_or_sent and sent rows."""
    world = World()
    ana, ben, cy, dee = (member(9, i) for i in range(4))
    sent_at = FIRST_RUN + timedelta(days=4)
    suggested = world.event(FIRST_RUN + timedelta(days=2), [ana, cy])
    world.event(FIRST_RUN + timedelta(days=16), [ben])
    world.campaign("c1", FIRST_RUN, messages=[
        message(ana, suggested, FIRST_RUN, status="sent", sent_at=iso(sent_at)),
        message(ben, suggested, FIRST_RUN, status="sent", sent_at=iso(sent_at)),
        message(cy, suggested, FIRST_RUN, status="approved"),
        message(dee, suggested, FIRST_RUN, status="rejected"),
    ], holdout=[])
    run = measure(world)
    assert run.code == 0, run.err
    entry = report_of(run)["campaigns"][0]
    assert group(entry, "sent") == (2, 1, 0, 0)
    assert group(entry, "approved_or_sent") == (3, 2, 1, 0)
    assert group(entry, "treated") == (4, 2, 1, 0)
    assert entry["note"] == "no holdout members: lift cannot be computed; rates only"
    assert "not chosen at random" in run.out


def test_a_sent_message_without_a_valid_sent_at_falls_back_to_generated_at_and_is_counted(measure) -> None:
    world = World()
    ana = member(9, 1)
    suggested = world.event(FIRST_RUN + timedelta(days=2), [ana])
    world.campaign("c1", FIRST_RUN, messages=[message(ana, suggested, FIRST_RUN, status="sent", sent_at="soon")])
    run = measure(world)
    report = report_of(run)
    assert group(report["campaigns"][0], "sent") == (1, 1, 1, 0)
    assert report["data_issues"]["sent_messages_without_valid_sent_at"] == 1


def test_without_statuses_beyond_pending_there_are_no_reviewed_rows(measure) -> None:
    run = measure(lift_world())
    assert set(report_of(run)["pooled"]["groups"]) == {"treated", "holdout"}
    assert "not chosen at random" not in run.out


def test_pooled_counts_each_campaign_member_once_and_a_member_in_two_campaigns_twice(measure) -> None:
    world = World()
    ana = member(9, 1)
    first = world.event(FIRST_RUN + timedelta(days=2), [ana])
    world.campaign("c1", FIRST_RUN, messages=[message(ana, first, FIRST_RUN), message(ana, first, FIRST_RUN)],
                   holdout=[])
    world.campaign("c2", SECOND_RUN, messages=[], holdout=[held(ana, first, SECOND_RUN, "c2", 1)])
    run = measure(world)
    report = report_of(run)
    assert [group(c, "treated")[:2] for c in report["campaigns"]] == [(1, 1), (0, 0)]
    assert group(report["pooled"], "treated")[:2] == (1, 1)
    assert group(report["pooled"], "holdout")[:2] == (1, 1)
    assert report["data_issues"]["repeated_members_in_a_campaign"] == 1
    assert "each (campaign, member) counts once" in markdown_of(run)


def test_a_member_both_messaged_and_held_out_in_one_campaign_is_in_neither_group(measure) -> None:
    world = World()
    ana, ben = member(9, 1), member(9, 2)
    event = world.event(FIRST_RUN + timedelta(days=2), [ana, ben])
    world.campaign("c1", FIRST_RUN, messages=[message(ana, event, FIRST_RUN), message(ben, event, FIRST_RUN)],
                   holdout=[held(ana, event, FIRST_RUN, "c1", 1)])
    report = report_of(measure(world))
    assert group(report["pooled"], "treated")[0] == 1
    assert group(report["pooled"], "holdout")[0] == 0
    assert report["data_issues"]["members_both_messaged_and_held_out"] == 1


def two_campaigns() -> World:
    world = World()
    world.arms("return-to-table-20260110-110000", FIRST_RUN, number=1, treated=20, treated_back=6,
               held_out=5, held_back=1)
    world.arms("return-to-table-20260111-110000", SECOND_RUN, number=2, treated=30, treated_back=9,
               held_out=8, held_back=2)
    return world


@pytest.mark.parametrize(("args", "expected"), [
    ((), ["return-to-table-20260110-110000", "return-to-table-20260111-110000"]),
    (("--since", "2026-01-11"), ["return-to-table-20260111-110000"]),
    (("--until", "2026-01-10"), ["return-to-table-20260110-110000"]),
    (("--until", "2026-01-10T11:00:00Z"), ["return-to-table-20260110-110000"]),
    (("--until", "2026-01-10T10:59:59Z"), []),
    (("--campaign", "return-to-table-20260111-110000"), ["return-to-table-20260111-110000"]),
])
def test_since_until_and_campaign_choose_the_campaigns(measure, args: tuple[str, ...], expected: list[str]) -> None:
    run = measure(two_campaigns(), *args)
    report = report_of(run)
    assert [c["campaign_id"] for c in report["campaigns"]] == expected
    assert run.code == (0 if expected else 3)


def test_no_archived_campaign_is_exit_3_with_a_warning_and_a_report(measure, tmp_path: Path) -> None:
    write_folder(tmp_path / "events", [], [])
    run = measure(None)
    assert run.code == 3
    assert "warning: no archived campaign in range" in run.err
    assert report_of(run)["campaigns_measured"] == 0
    assert "No archived campaign in range." in markdown_of(run)


def test_a_source_without_events_is_empty_input_exit_3(measure, tmp_path: Path) -> None:
    world = lift_world()
    world.events = []
    run = measure(world)
    assert run.code == 3
    assert report_of(run)["empty_input"] == ["events"]
    assert "empty input: no events in" in run.err


@pytest.mark.parametrize("args", [
    ("--window-days", "0"), ("--window-days", "366"), ("--window-days", "x"), ("--since", "yesterday"),
    ("--since", "2026-02-01", "--until", "2026-01-31"), ("--campaign", "a/b"), ("--campaign", "nope"),
    ("--now", "TBD"), ("--bogus",),
])
def test_bad_usage_is_one_line_and_exit_2(measure, args: tuple[str, ...]) -> None:
    run = measure(two_campaigns(), *args)
    assert run.code == 2
    assert run.err.count("\n") == 1 and run.err.startswith("error: ")
    assert not (run.root / "reports").exists()


def test_no_source_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    run = run_cli("measure", "--now", AS_OF_ISO)
    assert run.code == 2
    assert "no data source" in run.err and "--source DIR" in run.err


def test_the_report_explains_the_proxy_and_the_method(measure) -> None:
    run = measure(lift_world())
    text = markdown_of(run)
    assert ("participant or the owner of an event starting within 14 days after their message (or their "
            "hold-out), because RSVP times are not stored.") in text
    assert "Members also join events without any message, which is what the holdout is for" in text
    assert "Newcombe's hybrid score interval" in text and "method 10" in text and "Wilson" in text
    assert "two-proportion z-test" in text
    report = report_of(run)
    assert report["method"]["interval"] == rtt.INTERVAL_METHOD
    assert report["window_days"] == 14 and report["as_of"] == "2026-03-01T12:00:00.000Z"


def test_a_longer_window_counts_later_returns(measure) -> None:
    """The members who do not come back within 14 days go 20 days later: with 21 days everyone is back."""
    report = report_of(measure(lift_world(), "--window-days", "21"))
    assert group(report["pooled"], "treated")[:2] == (500, 500)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_measure_leaves_the_local_mirror_untouched(measure, tmp_path: Path) -> None:
    root = tmp_path / "out"
    lift_world().write(root, tmp_path / "events")
    before = files_under(root / "data")
    run = measure(None, root=root)
    assert run.code == 0, run.err
    assert files_under(root / "data") == before
    assert {p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file()} == {"data", "reports"}


# =============================================================================================
# Hostile archives: count and skip, never crash
# =============================================================================================


def write_part(root: Path, campaign_id: str, part: str, text: str) -> None:
    folder = root / "data" / "firebase" / BASE / "campaigns" / campaign_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{part}.json").write_text(text, encoding="utf-8")


def test_hostile_archive_values_are_counted_and_skipped(measure, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt, "MAX_ARCHIVE_ITEMS", 12)
    root = tmp_path / "out"
    world = World()
    ana, ben = member(9, 1), member(9, 2)
    event = world.event(FIRST_RUN + timedelta(days=2), [ana, ben])
    good = message(ana, event, FIRST_RUN)
    odd_messages = [
        good, 7, "text", None, [good], {"user_id": ["list"]}, {"user_id": {"$gt": ""}, "generated_at": iso(FIRST_RUN)},
        {"user_id": "x" * 10_000, "generated_at": iso(FIRST_RUN)},
        {**message(ben, event, FIRST_RUN), "generated_at": "TBD"},
        {**message(ben, event, FIRST_RUN), "generated_at": 10 ** 30},
        {**message(ben, event, FIRST_RUN), "status": {"$ne": "x"}, "event_id": {"$oid": "zz"}},
        {**message(ben, event, FIRST_RUN), "status": "s" * 5000},  # a repeat of ben once his status is odd
        *[good] * 30,  # beyond the 12 read
    ]
    world.campaign("c-hostile", FIRST_RUN, messages=odd_messages)
    world.write(root, tmp_path / "events")
    meta = root / "data" / "firebase" / BASE / "campaigns" / "c-hostile" / "metadata.json"
    meta.write_text(json.dumps({"created_at": {"$date": "never"}, "status": ["x"]}), encoding="utf-8")
    write_part(root, "c-hostile", "holdout", json.dumps({"holdout": "everyone", "count": -1}))
    write_part(root, "c-shapes", "metadata", json.dumps("just a string"))
    write_part(root, "c-shapes", "messages", json.dumps({"messages": {"0": good, "7": {"user_id": 5}}}))
    write_part(root, "c-shapes", "holdout", json.dumps([{"user_id": str(ben), "held_out_at": "later"},
                                                        {"user_id": str(ben), "held_out_at": iso(FIRST_RUN)}]))
    write_part(root, "c-torn", "metadata", '{"created_at": "2026-01-10T11:00:00Z"')  # cut mid-write by hand
    write_part(root, "c-deep", "metadata", json.dumps({"created_at": iso(FIRST_RUN)}))
    write_part(root, "c-deep", "messages", "[" * 100_000 + "]" * 100_000)
    write_part(root, "c-empty", "metadata", json.dumps({"id": "c-empty"}))
    (root / "data" / "firebase" / BASE / "campaigns" / "bad.id").mkdir()
    (root / "data" / "firebase" / BASE / "campaigns" / "bad.id" / "metadata.json").write_text("{}", "utf-8")
    run = measure(None, root=root)
    assert run.code == 3, run.err  # two campaigns unreadable
    assert "Traceback" not in run.out + run.err
    report = report_of(run)
    assert [c["campaign_id"] for c in report["campaigns"]] == ["c-hostile", "c-shapes"]
    hostile, shapes = report["campaigns"]
    assert hostile["created_at"] == iso(FIRST_RUN)  # no usable created_at: the earliest reference time
    assert hostile["status"] == "unknown"
    assert group(hostile, "treated") == (2, 2, 1, 0)  # ana (first of many), ben (odd status, odd event id)
    assert group(shapes, "treated") == (1, 1, 1, 0)
    assert group(shapes, "holdout") == (1, 1, 0, 0)  # no event_id recorded: no suggested event
    assert sorted(e.split(":")[0] for e in report["errors"]) == ["campaign c-deep", "campaign c-torn"]
    assert report["data_issues"] == {
        "archived_campaign_ids_not_usable": 1,
        "archived_campaigns_without_valid_date": 1,  # c-empty: no date, no members
        "archived_holdout_lists_with_odd_shape": 1,
        "archived_holdout_without_valid_held_out_at": 1,
        "archived_messages_beyond_12": 29,  # the None is a hole, not an entry: the 12th read is a good one
        "archived_messages_not_objects": 3,  # 7, "text", [good]
        "archived_messages_with_odd_status": 1 + 1,
        "archived_messages_without_usable_user_id": 3 + 1,
        "archived_messages_without_valid_generated_at": 2,
        "archived_metadata_not_objects": 1,
        "repeated_members_in_a_campaign": 2,  # ben twice, ana twice within the 12
    }


def measure_as_a_script(root: Path, events: Path) -> CliRun:
    """``measure`` run as the script, with at most 1 GB of memory and 60 s (a file read without bound
    ends the test, not the machine)."""
    limit = 1 << 30
    env = {name: value for name, value in os.environ.items() if name not in ISOLATED_VARIABLES}
    done = subprocess.run(
        [sys.executable, rtt.__file__, "measure", "--source", str(events), "--now", AS_OF_ISO, "--out", str(root)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    return CliRun(done.returncode, done.stdout, done.stderr, root)


def test_measure_reads_no_link_no_device_no_fifo_and_no_oversized_file_under_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "out", tmp_path / "elsewhere"
    world = lift_world()
    world.campaign("c-zero", FIRST_RUN, messages=[message(member(9, 1), ObjectId(), FIRST_RUN)])
    world.write(root, tmp_path / "events")
    campaigns = root / "data" / "firebase" / BASE / "campaigns"
    (campaigns / "c-zero" / "messages.json").unlink()
    (campaigns / "c-zero" / "messages.json").symlink_to("/dev/zero")  # read until memory runs out, before
    write_part(root, "c-outside", "metadata", json.dumps({"created_at": iso(FIRST_RUN)}))
    outside.mkdir()
    (outside / "messages.json").write_text(json.dumps([message(member(9, 2), ObjectId(), FIRST_RUN)]), "utf-8")
    (campaigns / "c-outside" / "messages.json").symlink_to(outside / "messages.json")
    write_part(root, "c-fifo", "metadata", json.dumps({"created_at": iso(FIRST_RUN)}))
    os.mkfifo(campaigns / "c-fifo" / "messages.json")  # no writer: a blocking read would wait for ever
    (outside / "c-linked").mkdir()
    (outside / "c-linked" / "metadata.json").write_text(json.dumps({"created_at": iso(FIRST_RUN)}), "utf-8")
    (campaigns / "c-linked").symlink_to(outside / "c-linked", target_is_directory=True)
    run = measure_as_a_script(root, tmp_path / "events")
    assert run.code == rtt.ExitCode.ATTENTION, run.err
    assert "Traceback" not in run.err
    report = report_of(run)
    assert [c["campaign_id"] for c in report["campaigns"]] == ["return-to-table-20260110-110000"]  # the good one
    named = {e.split(":")[0]: e for e in report["errors"]}
    assert set(named) == {"campaign c-zero", "campaign c-outside", "campaign c-fifo"}
    assert "symbolic link" in named["campaign c-zero"] and "symbolic link" in named["campaign c-outside"]
    assert "not a regular file" in named["campaign c-fifo"]


def test_a_mirror_file_larger_than_the_bound_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtt, "MAX_READ_BYTES", 1000)
    mirror = rtt.LocalMirrorTransport(tmp_path, BASE)
    (tmp_path / BASE).mkdir()
    (tmp_path / BASE / "messages.json").write_text(json.dumps({"messages": ["x" * 2000], "count": 1}), "utf-8")
    with pytest.raises(rtt.FirebaseError, match="more than the 1000"):
        mirror.get("messages")
    assert rtt.read_regular_file(tmp_path / BASE / "none.json", tmp_path) is None


# =============================================================================================
# The REST path: the fake Realtime Database, read with GETs only
# =============================================================================================


@pytest.fixture
def db() -> Iterator[FakeRealtimeDatabase]:
    with FakeRealtimeDatabase(auth_token=TOKEN) as server:
        yield server


def rest_env(db: FakeRealtimeDatabase, token: str = TOKEN) -> dict[str, str]:
    return {"FIREBASE_DATABASE_URL": db.url, "FIREBASE_AUTH_TOKEN": token}


def test_rest_path_reads_with_gets_only_and_agrees_with_the_mirror(measure, db: FakeRealtimeDatabase,
                                                                   tmp_path: Path) -> None:
    world = two_campaigns()
    world.seed(db)
    mirror = measure(world, root=tmp_path / "mirror")
    before = db.get_rendered("")
    rest = measure(None, env=rest_env(db), root=tmp_path / "rest")
    assert rest.code == 0, rest.err
    assert db.requests and {r.method for r in db.requests} == {"GET"}
    assert any(r.query.get("shallow") == "true" for r in db.requests)
    assert db.get_rendered("") == before
    assert report_of(rest)["pooled"] == report_of(mirror)["pooled"]
    assert report_of(rest)["campaigns"] == report_of(mirror)["campaigns"]
    assert report_of(rest)["archive"].startswith("Firebase (FIREBASE_DATABASE_URL)")


def test_rest_campaign_ids_the_database_could_not_hold_are_counted(measure, db: FakeRealtimeDatabase,
                                                                   tmp_path: Path) -> None:
    world = lift_world()
    world.seed(db)
    world.write(tmp_path / "unused", tmp_path / "events")
    db.fail_next(200, path=f"{BASE}/campaigns", method="GET",
                 body={"return-to-table-20260110-110000": True, "bad.id": True})
    run = measure(None, env=rest_env(db))
    assert run.code == 0, run.err
    report = report_of(run)
    assert report["campaigns_measured"] == 1
    assert report["data_issues"]["archived_campaign_ids_not_usable"] == 1


def test_rest_archive_unreadable_is_exit_1_one_line(measure, db: FakeRealtimeDatabase, tmp_path: Path) -> None:
    lift_world().write(tmp_path / "unused", tmp_path / "events")
    run = measure(None, env=rest_env(db, token="wrong"))
    assert run.code == 1
    assert run.err.startswith("error: ") and run.err.count("\n") == 1
    assert "401" in run.err and "wrong" not in run.err


def test_rest_campaign_that_fails_is_named_and_the_rest_measured(measure, db: FakeRealtimeDatabase,
                                                                 tmp_path: Path) -> None:
    world = two_campaigns()
    world.seed(db)
    world.write(tmp_path / "unused", tmp_path / "events")
    db.fail_next(403, count=10, path=f"{BASE}/campaigns/return-to-table-20260111-110000/messages")
    run = measure(None, env=rest_env(db))
    assert run.code == 3
    report = report_of(run)
    assert [c["campaign_id"] for c in report["campaigns"]] == ["return-to-table-20260110-110000"]
    assert report["errors"][0].startswith("campaign return-to-table-20260111-110000: not read")
    assert "error: campaign return-to-table-20260111-110000" in run.err


# =============================================================================================
# MongoDB as the events' source
# =============================================================================================


def test_mongo_source_gives_the_same_measure_as_the_folder(measure, run_cli, tmp_path: Path) -> None:
    world = two_campaigns()
    folder_run = measure(world, root=tmp_path / "folder")
    client = mongomock.MongoClient()
    client["testdb"]["event"].insert_many([dict(e) for e in world.events])
    world.write(tmp_path / "mongo", tmp_path / "unused")
    mongo_run = run_cli("measure", "--source", "mongo", "--now", AS_OF_ISO, root=tmp_path / "mongo",
                        env={"MONGO_URI": "mongodb://127.0.0.1:1/x", "MONGO_DB_NAME": "testdb"},
                        mongo_client=client)
    assert mongo_run.code == 0, mongo_run.err
    assert report_of(mongo_run)["pooled"] == report_of(folder_run)["pooled"]
    assert report_of(mongo_run)["source"] == "mongo"


def test_window_end_never_overflows_the_calendar() -> None:
    late = rtt.LATEST_DATE - timedelta(days=3)
    assert rtt.window_end(late, 14) == rtt.LATEST_DATE
    assert rtt.window_end(FIRST_RUN, 14) == FIRST_RUN + timedelta(days=14)


def test_pooled_measurement_of_nothing_has_empty_groups_and_no_lift() -> None:
    pooled = rtt.Measurement.pooled([])
    assert pooled.groups == {"treated": rtt.Tally(), "holdout": rtt.Tally()}
    found = pooled.json()
    assert found["lift"] == {"treated": None} and not found["lift_computable"]
    assert found["note_code"] == "no_holdout"
    assert math.isclose(rtt.Z_95, 1.959964, abs_tol=1e-6)


# =============================================================================================
# End to end: a real campaign's archive, then joins added after it
# =============================================================================================


def test_measure_reads_the_archive_a_real_campaign_run_wrote(run_cli, tmp_path: Path, world) -> None:
    """The campaign archives its messages in the mirror; a join added after it is a member back at the
    suggested event. (No --holdout here: this branch does not write holdout records yet.)"""
    users, events = world
    folder = write_folder(tmp_path / "export", users, events)
    root = tmp_path / "out"
    campaign = run_cli("--source", str(folder), "--now", NOW_ISO, "--llm", "off", root=root)
    assert campaign.code == 0, campaign.err
    messages = campaign.messages
    assert len(messages) == 2
    first = messages[0]
    for event in events:
        if str(event["_id"]) == first["event_id"]:
            event["participants"].append(ObjectId(first["user_id"]))
    write_folder(folder, users, events)
    later = iso(NOW + timedelta(days=30))
    run = run_cli("measure", "--source", str(folder), "--now", later, root=root)
    assert run.code == 0, run.err
    (entry,) = report_of(run)["campaigns"]
    assert entry["campaign_id"] == campaign.report()["campaign_id"]
    assert entry["created_at"] == iso(NOW)
    assert group(entry, "treated") == (2, 1, 1, 0)
    assert entry["note"] == "no holdout members: lift cannot be computed; rates only"


def history_world(members: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``members`` dormant wine lovers (35-85 days away) and four open wine tables in the next two weeks."""
    users: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for i in range(members):
        uid = f"h{i:04d}"
        users.append({"_id": uid, "firstName": "Robin", "lastName": "Testwell", "email": f"{uid}@example.com",
                      "phone": f"+1{('212', '646', '917', '718')[i // 100 % 4]}55501{i % 100:02d}",  # their own
                      "gender": "female", "interests": ["wine"],
                      "occupation": "Teacher", "homeNeighborhood": "chelsea"})
        events.append({"_id": f"past-{uid}", "name": "Neighbourhood Supper", "categories": ["DINNER"],
                       "participants": [uid], "ownerId": uid, "startDate": iso(NOW - timedelta(days=35 + i % 50)),
                       "maxParticipants": 8, "type": "public", "active": True, "eventStatus": "approved"})
    for k in range(4):
        events.append({"_id": f"wine-{k}", "name": f"Wine Social {k + 1}", "categories": ["WINE"],
                       "neighborhood": "chelsea", "participants": [], "ownerId": "host-1", "maxParticipants": 500,
                       "startDate": iso(NOW + timedelta(days=4 + 3 * k, hours=11)), "type": "public",
                       "active": True, "eventStatus": "approved"})
    return users, events


def test_two_daily_runs_with_a_holdout_then_joins_are_measured_as_they_were_built(run_cli, tmp_path: Path) -> None:
    """The closing note's history: two daily campaigns with --holdout 0.2, then joins added after them:
    every second messaged member joins the suggested table, every fifth held-out member joins one."""
    users, events = history_world(400)
    folder, root = tmp_path / "export", tmp_path / "out"
    write_folder(folder, users, events)
    messaged: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for day in (0, 1):
        daily = run_cli("--source", str(folder), "--now", iso(NOW + timedelta(days=day)), "--holdout", "0.2",
                        "--limit", "100", root=root)
        assert daily.code == 0, daily.err
        messaged += daily.messages
        held += daily.load("data/processed/holdout.json")
    assert len(messaged) == 200 and len({m["user_id"] for m in messaged}) == 200  # the cooldown: no one twice
    assert len(held) >= 30 and not {h["user_id"] for h in held} & {m["user_id"] for m in messaged}
    by_id = {e["_id"]: e for e in events}
    treated_back = [m for i, m in enumerate(sorted(messaged, key=lambda m: m["user_id"])) if i % 2 == 0]
    held_back = [h for i, h in enumerate(sorted(held, key=lambda h: h["user_id"])) if i % 5 == 0]
    for joined in treated_back + held_back:
        by_id[joined["event_id"]]["participants"].append(joined["user_id"])
    write_folder(folder, users, events)
    run = run_cli("measure", "--source", str(folder), "--now", iso(NOW + timedelta(days=30)), root=root)
    assert run.code == 0, run.err
    pooled = report_of(run)["pooled"]
    assert group(pooled, "treated") == (200, 100, 100, 0)
    assert group(pooled, "holdout") == (len(held), len(held_back), len(held_back), 0)
    lift = pooled["lift"]["treated"]
    assert lift["difference_pp"] == pytest.approx(100 * (0.5 - len(held_back) / len(held)), abs=0.01)
    assert lift["interval_pp"][0] > 0 and lift["p_value"] < 0.05
    assert len(report_of(run)["campaigns"]) == 2


def test_help_is_exit_0_and_names_the_exit_codes(run_cli) -> None:
    run = run_cli("measure", "--help")
    assert run.code == 0
    assert "--window-days" in run.out and "exit codes:" in run.out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
FIELDS = ("user_id", "event_id", "status", "generated_at", "sent_at", "held_out_at")
odd_records = st.dictionaries(st.sampled_from(FIELDS), json_values | st.sampled_from(
    ["sent", "approved", "2026-01-10T11:00:00Z", "6500000000000000000000a1", "9999-12-31T23:59:59+00:00"]))
odd_lists = json_values | st.fixed_dictionaries({"messages": st.lists(odd_records | json_values, max_size=6),
                                                 "holdout": st.lists(odd_records | json_values, max_size=6)})


@settings(max_examples=300, deadline=None)
@given(metadata=json_values | st.fixed_dictionaries({"created_at": json_values, "status": json_values}),
       messages=odd_lists, holdout=odd_lists)
def test_any_archived_values_are_measured_or_counted_never_a_crash(metadata: Any, messages: Any,
                                                                   holdout: Any) -> None:
    issues = rtt.DataIssues()
    campaign = rtt.archived_campaign("c\u202e1", metadata, messages, holdout, issues)
    assert len({o.user_id for o in campaign.observations}) == len(campaign.observations)
    assert all(o.reference.tzinfo is not None for o in campaign.observations)
    events = [{"_id": "e1", "startDate": "2026-01-12T00:00:00Z", "participants": ["6500000000000000000000a1"]}]
    followed = rtt.follow_campaigns([campaign], events, AS_OF, 14, issues) if campaign.created_at else []
    measured = [(c, rtt.Measurement.of(f)) for c, f in followed]
    report = rtt.measure_report(run_date=AS_OF, now=AS_OF, window_days=14, dates=rtt.DateRange(), campaign=None,
                                source_label="test", archive="test", measured=measured,
                                issues=issues, errors=[], empty_input=[])
    json.dumps(report, allow_nan=False)
    assert "\u202e" not in rtt.measure_console(report, Path("r.md")) + rtt.measure_markdown(report)


# =============================================================================================
# Issue 20: a holdout too small to tell, and events that all start before the messages
# =============================================================================================


def test_a_holdout_too_small_to_tell_says_so_instead_of_a_bare_interval(measure) -> None:
    """Issue 20's ten days: 70 texted against 2 held out. The interval is some 100 points wide; the console
    and the report say "too small to tell" before any figure, and the JSON says why."""
    world = World()
    world.arms("return-to-table-20260110-110000", FIRST_RUN, number=1, treated=70, treated_back=7,
               held_out=2, held_back=0)
    run = measure(world)
    assert run.code == 0, run.err
    found = report_of(run)["pooled"]["lift"]["treated"]
    assert found["too_small_to_tell"] is True and found["detectable_lift_pp"] == 100.5
    assert found["interval_pp"][1] - found["interval_pp"][0] > 40  # the figures are still there
    assert "lift treated vs holdout: too small to tell (70 against 2 held out: no lift is detectable" in run.out
    assert "lift treated vs holdout: +" not in run.out
    row = next(line for line in run.out.splitlines() if line.startswith("return-to-table-20260110"))
    assert "too small to tell (+10.0, " in row
    assert "lift treated vs holdout: too small to tell" in markdown_of(run)


def test_a_large_enough_holdout_gives_its_lift_plainly(measure) -> None:
    run = measure(lift_world())  # 500 against 500: a 8.9-point lift is detectable
    found = report_of(run)["pooled"]["lift"]["treated"]
    assert found["too_small_to_tell"] is False and found["detectable_lift_pp"] == 8.9
    assert "too small to tell" not in run.out


def test_events_that_all_start_before_the_messages_mean_nobody_could_have_come_back_yet(measure) -> None:
    world = lift_world()
    world.events = [e for e in world.events if e["startDate"] < FIRST_RUN.replace(tzinfo=None)]
    assert world.events  # the export has events, only none after the messages
    run = measure(world)
    assert run.code == 3
    note = report_of(run)["events_note"]
    assert note.startswith("Nobody could have come back yet: every event in the source starts before the first "
                           "message")
    assert note in run.out and note in markdown_of(run)
    fresh = measure(lift_world(), root=run.root.parent / "fresh")  # the same campaign, events after it too
    assert fresh.code == 0 and report_of(fresh)["events_note"] is None
