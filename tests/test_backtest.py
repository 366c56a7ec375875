"""``backtest``: the rules matcher replayed on history, without leaks, against baselines on the same candidates.

Worlds are hand-built so the truth is known; the real Montana sample ships in ``samples/meetup_montana``.
All people and places here are fictional (``@example.com`` emails, ``+1 212 555-01xx`` phones).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from builders import CliRun, write_folder

import return_to_table as rtt

SAMPLE = Path(rtt.__file__).resolve().parent / "samples" / "meetup_montana"
D = datetime(2025, 6, 1, tzinfo=UTC)  # the as-of date of the hand-built worlds
D_FLAG = "2025-06-01"
BASE = {"type": "public", "active": True, "eventStatus": "approved"}

LOYAL = ObjectId("6700000000000000000000a1")  # always goes to HOST's dinners
HOST = ObjectId("6700000000000000000000b1")
STRANGER = ObjectId("6700000000000000000000b2")  # hosts in the member's own neighbourhood
FAR_HOST_DINNER = ObjectId("6700000000000000000000e9")
NEAR_STRANGER_DINNER = ObjectId("6700000000000000000000e8")


def at(days: float) -> datetime:
    """``days`` after D (negative: before), naive UTC as pymongo returns dates."""
    return (D + timedelta(days=days)).replace(tzinfo=None)


def member(oid: ObjectId, first: str, interests: list[str], home: str = "chelsea") -> dict[str, Any]:
    return {"_id": oid, "firstName": first, "lastName": "Example", "email": f"{first.lower()}@example.com",
            "phone": "+12125550100", "interests": interests, "homeNeighborhood": home}


def event(oid: ObjectId, name: str, start: datetime, owner: ObjectId, participants: list[ObjectId], *,
          tags: list[str], hood: str = "chelsea", **more: Any) -> dict[str, Any]:
    return {**BASE, "_id": oid, "name": name, "categories": tags, "features": [], "neighborhood": hood,
            "startDate": start, "ownerId": owner, "participants": participants, **more}


def oid(n: int) -> ObjectId:
    return ObjectId(f"{0x68000000000000000000 + n:024x}")


def loyal_world() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A member who went to HOST's wine dinners five times (in the West Village), away 40 days at D,
    who comes back to HOST's next one, not to the stranger's sooner dinner on their own street."""
    users = [member(LOYAL, "Lena", ["wine"], home="chelsea")]  # the hosts need not be members here
    past = [event(oid(i), f"Wine Night {i}", at(-100 + 15 * i), HOST, [LOYAL], tags=["WINE"], hood="west-village")
            for i in range(5)]  # the last one 40 days before D
    future = [
        event(NEAR_STRANGER_DINNER, "Wine on the Block", at(3), STRANGER, [], tags=["WINE"], hood="chelsea"),
        event(FAR_HOST_DINNER, "Wine Night 5", at(10), HOST, [LOYAL], tags=["WINE"], hood="west-village"),
    ]
    return users, past + future


def run_backtest_cli(run_cli: Any, folder: Path, *args: str, **kwargs: Any) -> CliRun:
    return run_cli("backtest", "--source", str(folder), *args, **kwargs)


def backtest_report(run: CliRun) -> dict[str, Any]:
    assert run.code == 0, run.err
    (path,) = sorted((run.root / "reports").glob("return_to_table_backtest_*.json"))
    return json.loads(path.read_text(encoding="utf-8"))


# --- known truth ------------------------------------------------------------------------------


def test_a_member_loyal_to_one_host_is_a_hit_for_the_matcher_and_the_host_baseline(run_cli, tmp_path):
    # Since issue 11 the rules read the member's history: five of HOST's dinners beat a stranger's on
    # their own street (before, the rules missed here and only host_next hit).
    folder = write_folder(tmp_path / "loyal", *loyal_world())
    report = backtest_report(run_backtest_cli(run_cli, folder, "--from", D_FLAG, "--to", D_FLAG))
    (row,) = report["dates"]
    assert (row["eligible"], row["returned"], row["with_candidates"]) == (1, 1, 1)
    assert row["hit_at_1"] == {"rules": 1.0, "rules_allocated": 1.0, "random": 0.5, "soonest": 0.0, "soonest_nearby": 0.0,
                               "host_next": 1.0}
    assert row["oracle"] == 1.0
    assert report["pooled"]["lead"]["over"] == "host_next"
    assert report["pooled"]["lead"]["points"] == 0.0


def test_members_who_did_not_come_back_within_the_window_are_not_scored(run_cli, tmp_path):
    users, events = loyal_world()
    for e in events:
        if e["_id"] == FAR_HOST_DINNER:
            e["startDate"] = at(45)  # after the 30-day window
    folder = write_folder(tmp_path / "late", users, events)
    run = run_backtest_cli(run_cli, folder, "--from", D_FLAG, "--to", D_FLAG)
    assert run.code == 3 and "nobody came back" in run.err
    (path,) = sorted((run.root / "reports").glob("return_to_table_backtest_*.json"))
    row = json.loads(path.read_text(encoding="utf-8"))["dates"][0]
    assert (row["eligible"], row["returned"], row["hit_at_1"]["rules"]) == (1, 0, None)


def test_the_backtests_pick_is_the_campaigns_pick_on_the_same_world(run_cli, tmp_path):
    users, events = loyal_world()
    folder = write_folder(tmp_path / "loyal", users, events)
    picks: dict[str, str] = {}

    def spy(user: Any, candidates: Any) -> Any:
        chosen = rtt.rules_pick(user, candidates)
        picks[user["_id"]] = chosen.event["_id"]
        return chosen

    screened = rtt.read_screened(rtt.FolderSource(folder))
    history = rtt.build_history(screened.users, screened.events, screened.issues)
    rtt.run_backtest(history, [D], 30, rtt.NeighbourhoodMap.from_csv(rtt.CENTROIDS_CSV), pick=spy)
    for e in events:  # the campaign at D, on the world as D knew it
        if e["startDate"] > at(0):
            e["participants"] = []
    as_known = write_folder(tmp_path / "as-known", users, events)
    campaign = run_cli("--source", str(as_known), "--now", "2025-06-01T00:00:00Z", "--dry-run",
                       "--min-confidence", "0", "--limit", "1000", "--cooldown-days", "0", root=tmp_path / "campaign")
    assert campaign.code == 0, campaign.err
    # One call path: both read the member's history (issue 11), so both take HOST's next dinner.
    assert picks == {m["user_id"]: m["event_id"] for m in campaign.matches} == {str(LOYAL): str(FAR_HOST_DINNER)}


def test_favourite_hosts_rank_by_count_then_recency_then_id():
    joined = [(D, "b"), (D + timedelta(1), "a"), (D + timedelta(2), "c"), (D + timedelta(3), "c"),
              (D + timedelta(4), "b"), (D + timedelta(5), "a"), (D + timedelta(6), "a")]  # the last two after D + 4
    history = rtt.History([], [], [], [], {}, {"m": joined, "n": [(D, "y"), (D, "x")]})
    assert history.favourite_hosts("m", D + timedelta(4)) == ["b", "c", "a"]  # b and c twice: b more recently
    assert history.favourite_hosts("n", D) == ["x", "y"]
    assert history.favourite_hosts("nobody", D) == []


# --- no leaks ----------------------------------------------------------------------------------


def crowd_world() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two music nights at the same time and place after D. The member really went to the crowded one
    (twelve going): known at D, its crowd would win it the pick, and the member would look active."""
    fan = ObjectId("6700000000000000000000a7")
    crowd = [oid(100 + i) for i in range(11)]
    users = [member(fan, "Fay", ["music"], home="hells-kitchen")]
    events = [
        event(oid(1), "Old Jam", at(-45), HOST, [fan], tags=["MUSIC"], hood="hells-kitchen"),
        event(oid(2), "Quiet Jam", at(5), HOST, [], tags=["MUSIC"], hood="hells-kitchen"),
        event(oid(3), "Packed Jam", at(5), HOST, [fan, *crowd], tags=["MUSIC"], hood="hells-kitchen"),
    ]
    return users, events


def test_participants_of_future_events_never_reach_the_matcher(tmp_path):
    users, events = crowd_world()
    screened = rtt.read_screened(rtt.FolderSource(write_folder(tmp_path / "crowd", users, events)))
    history = rtt.build_history(screened.users, screened.events, screened.issues)
    hoods = rtt.NeighbourhoodMap.from_csv(rtt.CENTROIDS_CSV)
    seen: list[Any] = []

    def spy(user: Any, candidates: Any) -> Any:
        seen.extend(candidates)
        return rtt.rules_pick(user, candidates)

    ((_, eligible, trials),) = rtt.run_backtest(history, [D], 30, hoods, pick=spy)
    assert eligible == 1 and len(trials) == 1  # the member's future table did not make them active
    assert {c.event["_id"] for c in seen} == {str(oid(2)), str(oid(3))}
    for c in seen:
        assert c.event["participants"] == [] and c.event["participantCount"] == 0 and c.fill_tier == 0
    assert trials[0].hits["rules"] == 0.0  # the quiet night (first by id), not the one they went to
    leaked = rtt.find_future_events(history.events, D)  # what a leak would have shown the matcher
    user = history.users[0] | {"_id": str(users[0]["_id"])}
    assert rtt.rules_pick(user, rtt.score_candidates(user, leaked, hoods, D)).event["_id"] == str(oid(3))


def test_the_report_says_which_fields_may_carry_later_information(run_cli, tmp_path):
    folder = write_folder(tmp_path / "loyal", *loyal_world())
    report = backtest_report(run_backtest_cli(run_cli, folder, "--from", D_FLAG, "--to", D_FLAG))
    assert "participants" in report["no_leak_rule"] and "participationPercentage" in report["no_leak_rule"]
    assert any("interests" in line and "homeNeighborhood" in line for line in report["later_information"])
    (md,) = sorted((tmp_path / "out" / "reports").glob("return_to_table_backtest_*.md"))
    assert "What may still carry later information" in md.read_text(encoding="utf-8")


# --- the random baseline and the bootstrap ------------------------------------------------------


def test_the_random_baseline_is_the_exact_expectation_averaged_over_members(run_cli, tmp_path):
    pia, quin = ObjectId("6700000000000000000000a8"), ObjectId("6700000000000000000000a9")
    users = [member(pia, "Pia", ["music"]), member(quin, "Quin", ["wine"])]
    events = [event(oid(1), "Before", at(-50), HOST, [pia, quin], tags=["MUSIC", "WINE"])]
    events += [event(oid(10 + i), f"Music {i}", at(2 + i), HOST, [pia] if i in (1, 3) else [], tags=["MUSIC"])
               for i in range(4)]  # Pia went to 2 of her 4 candidates
    events += [event(oid(20 + i), f"Wine {i}", at(2 + i), HOST, [quin] if i == 2 else [], tags=["WINE"])
               for i in range(3)]  # Quin to 1 of 3
    events.append(event(oid(30), "Private", at(4), HOST, [pia], tags=["MUSIC"], type="private"))  # not a candidate
    report = backtest_report(run_backtest_cli(run_cli, write_folder(tmp_path / "two", users, events),
                                              "--from", D_FLAG, "--to", D_FLAG))
    (row,) = report["dates"]
    assert row["returned"] == 2 and row["candidates_mean"] == 3.5
    assert row["hit_at_1"]["random"] == round((2 / 4 + 1 / 3) / 2, 4)


def test_the_bootstrap_is_deterministic_for_a_seed_and_moves_with_it():
    rows = [(f"m{i % 37}", {"rules": float(i % 3 == 0), "soonest": float(i % 5 == 0)}) for i in range(120)]
    first = rtt.bootstrap_intervals(rows, 500, seed=7)
    assert first == rtt.bootstrap_intervals(rows, 500, seed=7)
    assert first != rtt.bootstrap_intervals(rows, 500, seed=8)
    for name in ("rules", "soonest"):
        point = sum(values[name] for _, values in rows) / len(rows)
        low, high = first[name]
        assert 0.0 <= low < point < high <= 1.0


def test_the_bootstrap_resamples_members_not_rows():
    """One member seen at 50 dates is one unit: resampled, they are in or out with all 50."""
    rows = [("loyal", {"rules": 1.0})] * 50 + [(f"m{i}", {"rules": 0.0}) for i in range(50)]
    low, high = rtt.bootstrap_intervals(rows, 400, seed=1)["rules"]
    assert low == 0.0  # resamples without the one member: as an iid row bootstrap, never near 0
    assert high > 0.6


def test_the_same_history_gives_the_same_report(run_cli, tmp_path):
    args = ("--from", "2015-09-01", "--to", "2015-11-01", "--every-days", "28", "--resamples", "300")
    first = backtest_report(run_backtest_cli(run_cli, SAMPLE, *args, root=tmp_path / "a"))
    second = backtest_report(run_backtest_cli(run_cli, SAMPLE, *args, root=tmp_path / "b"))
    for report in (first, second):
        report.pop("generated_at"), report.pop("duration_seconds")
    assert first == second
    assert first["pooled"]["interval_95"]["rules"][0] < first["pooled"]["interval_95"]["rules"][1]


# --- bad usage --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    ((), "required"),
    (("--from", D_FLAG, "--to", D_FLAG), "--source"),
    (("--source", "{folder}", "--to", D_FLAG), "--from"),
    (("--source", "{folder}", "--from", "June 1", "--to", D_FLAG), "not a date"),
    (("--source", "{folder}", "--from", "2025-06-31", "--to", "2025-07-01"), "not a date"),
    (("--source", "{folder}", "--from", "2025-07-01", "--to", D_FLAG), "after --to"),
    (("--source", "{folder}", "--from", "1900-01-01", "--to", D_FLAG), "1970-2200"),
    (("--source", "{folder}", "--from", D_FLAG, "--to", D_FLAG, "--every-days", "0"), "--every-days"),
    (("--source", "{folder}", "--from", D_FLAG, "--to", D_FLAG, "--window-days", "x"), "--window-days"),
    (("--source", "{folder}", "--from", D_FLAG, "--to", D_FLAG, "--every-days", "99999999999999999999"),
     "--every-days: must be at most"),
    (("--source", "{folder}", "--from", D_FLAG, "--to", D_FLAG, "--window-days", "99999999999"),
     "--window-days: must be at most"),
    (("--source", "{folder}", "--from", D_FLAG, "--to", D_FLAG, "--resamples", "100000000"),
     "--resamples: must be at most"),
    (("--source", "{folder}", "--from", D_FLAG, "--to", D_FLAG, "--dry-run"), "unrecognized"),  # --limit is one now
    (("--source", "{folder}", "--from", "1970-01-01", "--to", D_FLAG, "--every-days", "1"), "as-of dates"),
    (("--source", "{folder}", "--from", "{recent}", "--to", "{recent}"), "not closed"),
    (("--source", "mongo", "--from", D_FLAG, "--to", D_FLAG), "MONGO_URI"),
    (("--source", "{missing}", "--from", D_FLAG, "--to", D_FLAG), "not a readable folder"),
])
def test_bad_flags_and_dates_give_one_line_and_exit_2(run_cli, tmp_path, args, fragment):
    folder = write_folder(tmp_path / "loyal", *loyal_world())
    recent = (datetime.now(UTC) - timedelta(days=5)).strftime("%Y-%m-%d")  # its 30-day window is still open
    argv = [a.format(folder=folder, missing=tmp_path / "nowhere", recent=recent) for a in args]
    run = run_cli("backtest", *argv)
    assert run.code == 2, run.err
    assert run.err.startswith("error: ") and run.err.count("\n") == 1 and fragment in run.err, run.err
    assert not (tmp_path / "out" / "reports").exists()


def test_mongo_is_read_like_the_campaign_reads_it(run_cli):
    import mongomock

    client = mongomock.MongoClient()
    users, events = loyal_world()
    client["rtt"][rtt.USER_COLLECTION].insert_many(users)
    client["rtt"][rtt.EVENT_COLLECTION].insert_many(events)
    env = {"MONGO_URI": "mongodb://db.invalid/rtt", "MONGO_DB_NAME": "rtt"}
    report = backtest_report(run_cli("backtest", "--source", "mongo", "--from", D_FLAG, "--to", D_FLAG, env=env,
                                     mongo_client=client))
    assert report["source"] == "mongo"
    assert report["pooled"]["hit_at_1"]["host_next"] == 1.0 and report["pooled"]["returned"] == 1


def test_empty_input_is_said_and_exits_3(run_cli, tmp_path):
    folder = write_folder(tmp_path / "empty", [], [])
    run = run_backtest_cli(run_cli, folder, "--from", D_FLAG, "--to", D_FLAG)
    assert run.code == 3
    assert "empty input: no users" in run.err and "empty input: no events" in run.err


def test_help_lists_the_flags_and_exit_codes(run_cli):
    run = run_cli("backtest", "--help")
    assert run.code == 0
    for flag in ("--source", "--from", "--to", "--every-days", "--window-days", "--out", "exit codes"):
        assert flag in run.out


# --- the shipped sample -----------------------------------------------------------------------


def test_the_montana_sample_ships_with_the_repository():
    assert (SAMPLE / "users.json").is_file() and (SAMPLE / "events.json").is_file()


def test_a_year_of_montana_writes_the_report_and_nothing_else(run_cli, tmp_path):
    run = run_backtest_cli(run_cli, SAMPLE, "--from", "2015-06-01", "--to", "2016-05-01", "--every-days", "28",
                           "--window-days", "30")  # (bench/bench_backtest.py times the year at 14-day steps)
    report = backtest_report(run)
    written = sorted(p.relative_to(run.root).as_posix() for p in run.root.rglob("*") if p.is_file())
    assert [Path(p).suffix for p in written] == [".json", ".md"]
    assert all(p.startswith("reports/return_to_table_backtest_") for p in written)
    assert len(report["dates"]) == 12 and report["dates"][0]["as_of"].startswith("2015-06-01")
    pooled = report["pooled"]
    assert pooled["returned"] == sum(row["returned"] for row in report["dates"]) > 100
    for name in rtt.BACKTEST_METHODS:
        low, high = pooled["interval_95"][name]
        assert low <= pooled["hit_at_1"][name] <= high
        assert pooled["hit_at_1"][name] <= pooled["oracle"]
    assert "pooled" in run.out and "rules" in run.out and "Lead of the rules matcher" in run.out
