"""Matching that learns from each member's own history (issue 11): each signal alone on hand-built
histories, the plan's order when history is neutral, confidence in the ranking's order, no co-attendee
ever identified, and the centroid table (``NEIGHBOURHOODS_CSV``, no placing by prefix).

All people and places here are fictional (``@example.com`` emails, ``+1 212 555-01xx`` phones).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from bson import ObjectId
from builders import NOW, NOW_ISO, days_ago, filler_ids, run_main, write_folder
from fake_anthropic import FakeMessagesAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from test_claude import smart

import return_to_table as rtt

NEW_YORK = ZoneInfo("America/New_York")
BASE = {"type": "public", "active": True, "eventStatus": "approved"}
LENA = ObjectId("6900000000000000000000a1")
HOST = ObjectId("6900000000000000000000b1")
STRANGER = ObjectId("6900000000000000000000b2")
FRIENDS = [ObjectId(f"69000000000000000000{0xc1 + i:04x}") for i in range(3)]


def lena(home: str = "chelsea", interests: tuple[str, ...] = ("wine",)) -> dict[str, Any]:
    return {"_id": LENA, "firstName": "Lena", "lastName": "Example", "email": "lena@example.com",
            "phone": "+12125550111", "gender": "female", "interests": list(interests), "homeNeighborhood": home}


def event(oid: ObjectId | str, name: str, start: datetime, owner: ObjectId, participants: list[ObjectId], *,
          hood: str = "chelsea", tags: tuple[str, ...] = ("WINE",), **more: Any) -> dict[str, Any]:
    return {**BASE, "_id": oid, "name": name, "categories": list(tags), "features": [], "neighborhood": hood,
            "startDate": start, "ownerId": owner, "participants": participants, **more}


def eid(n: int) -> ObjectId:
    return ObjectId(f"{0x6a000000000000000000 + n:024x}")


def thursday(weeks_ago: int) -> datetime:
    """A Thursday 6pm in New York (23:00 UTC), ``weeks_ago`` weeks before NOW (itself a Thursday)."""
    return days_ago(7 * weeks_ago, hour=23)


def member_and_candidates(users: list[dict[str, Any]], events: list[dict[str, Any]], hoods: rtt.NeighbourhoodMap,
                          who: ObjectId = LENA) -> tuple[rtt.DormantMember, list[rtt.Candidate]]:
    """Steps 1, 2 and 5 as the campaign runs them: the member's record (with its history) and candidates."""
    activity = rtt.index_member_activity(events, rtt.DataIssues())
    census = rtt.find_dormant_users(users, activity, NOW, zone="America/New_York")
    [user] = [u for u in census.eligible if u["_id"] == str(who)]
    return user, rtt.score_candidates(user, rtt.find_future_events(events, NOW), hoods, NOW)


def ids(candidates: list[rtt.Candidate]) -> list[str]:
    return [c.event["_id"] for c in candidates]


# --- each signal alone ----------------------------------------------------------------------


def test_a_member_loyal_to_one_host_beats_a_closer_strangers_event(hoods):
    past = [event(eid(i), f"Cellar Night {i}", days_ago(40 + 14 * i), HOST, [LENA], hood="west-village")
            for i in range(4)]
    near = event(eid(10), "Wine on the Block", days_ago(-3), STRANGER, [], hood="chelsea")  # her own street
    loyal = event(eid(11), "Cellar Night 5", days_ago(-10), HOST, [], hood="west-village")
    user, candidates = member_and_candidates([lena()], [*past, near, loyal], hoods)
    assert user["event_history"]["hosts"] == {str(HOST): 4}
    assert ids(candidates) == [str(eid(11)), str(eid(10))]
    assert candidates[0].confidence >= candidates[1].confidence
    match = rtt.rules_match(user, candidates, 70, NEW_YORK, NOW)
    assert match is not None and "came to 4 of this host's events" in match["reasoning"]


def test_without_that_history_the_closer_event_wins(hoods):
    # The control for the test above: the same member and events, the history left out.
    past = [event(eid(i), f"Cellar Night {i}", days_ago(40 + 14 * i), HOST, [LENA], hood="west-village")
            for i in range(4)]
    events = [*past, event(eid(10), "Wine on the Block", days_ago(-3), STRANGER, [], hood="chelsea"),
              event(eid(11), "Cellar Night 5", days_ago(-10), HOST, [], hood="west-village")]
    user, _ = member_and_candidates([lena()], events, hoods)
    plain = {k: v for k, v in user.items() if k != "event_history"}
    assert ids(rtt.score_candidates(plain, rtt.find_future_events(events, NOW), hoods, NOW))[0] == str(eid(10))


def friends_world() -> list[dict[str, Any]]:
    """Lena dined twice with three friends (two different hosts, so no host repeats). Two new tables at
    one time and place: the friends' (they and 2 others: 5 of 12 going) and a fuller one of strangers (8 of 10)."""
    hosts = [ObjectId(f"69000000000000000000{0xd1 + i:04x}") for i in range(4)]
    past = [event(eid(i), name, days_ago(50 + 7 * i, hour=23), hosts[i], [LENA, *FRIENDS])
            for i, name in enumerate(["Alpha Supper", "Beta Supper"])]
    with_friends = event(eid(20), "Gamma Supper", days_ago(-6, hour=23), hosts[2],
                         [*FRIENDS, *filler_ids(2, 0xF0)], maxParticipants=12)
    with_strangers = event(eid(21), "Delta Supper", days_ago(-6, hour=23), hosts[3], filler_ids(8, 0xE0),
                           maxParticipants=10)
    return [*past, with_friends, with_strangers]


def test_co_attendees_going_beat_a_fuller_event_of_strangers(hoods):
    user, candidates = member_and_candidates([lena()], friends_world(), hoods)
    assert user["event_history"]["company_going"] == {str(eid(20)): 3}  # per event, a count: nobody named
    assert ids(candidates) == [str(eid(20)), str(eid(21))]
    assert candidates[1].fill_tier > candidates[0].fill_tier  # the plan alone would take the fuller one
    match = rtt.rules_match(user, candidates, 70, NEW_YORK, NOW)
    assert match is not None and "3 people they've sat with are going" in match["reasoning"]


def test_the_co_attendee_count_is_a_fact_the_sms_may_state(hoods):
    user, candidates = member_and_candidates([lena()], friends_world(), hoods)
    match = rtt.rules_match(user, candidates, 70, NEW_YORK, NOW)
    facts = rtt.message_facts(match, NEW_YORK, NOW)
    assert facts.company == 3
    assert (facts.going, facts.spots_left) == (5, 7)
    said = (f"Hi Lena! Welcome back. Gamma Supper for wine fans, {facts.when}. 5 going, 3 you've dined with, "
            f"7 left. {facts.link}")
    assert not rtt.validate_sms(said, facts)
    invented = said.replace("3 you've", "4 you've")
    assert any("numbers not among the facts: 4" in p for p in rtt.validate_sms(invented, facts))


def test_a_member_who_always_goes_on_thursdays_gets_the_thursday_table(hoods):
    hosts = [ObjectId(f"69000000000000000000{0xa1 + i:04x}") for i in range(6)]
    past = [event(eid(i), f"{word} Pour", thursday(6 + 2 * i), hosts[i], [LENA])
            for i, word in enumerate(["Amber", "Birch", "Cedar", "Dune"])]
    tuesday = event(eid(30), "Ember Pour", days_ago(-5, hour=23), hosts[4], [])  # sooner, a Tuesday
    thursday_next = event(eid(31), "Fjord Pour", days_ago(-7, hour=23), hosts[5], [])
    user, candidates = member_and_candidates([lena()], [*past, tuesday, thursday_next], hoods)
    assert user["event_history"]["weekdays"] == {"Thu": 4} and user["event_history"]["day_parts"] == {"evening": 4}
    assert ids(candidates) == [str(eid(31)), str(eid(30))]
    match = rtt.rules_match(user, candidates, 70, NEW_YORK, NOW)
    assert match is not None and "4 of their 4 events were on Thursdays" in match["reasoning"]


def test_an_event_six_weeks_off_ranks_below_a_comparable_nearer_one(hoods):
    past = [event(eid(i), f"Cellar Night {i}", thursday(6 + i), HOST, [LENA]) for i in range(3)]
    far = event(eid(40), "Cellar Night Far", days_ago(-7 * 7, hour=23), HOST, [])
    near = event(eid(41), "Cellar Night Near", days_ago(-7 * 2, hour=23), HOST, [])
    _, candidates = member_and_candidates([lena()], [*past, far, near], hoods)
    assert ids(candidates) == [str(eid(41)), str(eid(40))]
    assert candidates[1].history.timing < 1 == candidates[0].history.timing


# --- what stays ---------------------------------------------------------------------------------


def test_a_shared_interest_is_still_required_however_loyal_the_member(hoods):
    past = [event(eid(i), f"Cellar Night {i}", days_ago(40 + 7 * i), HOST, [LENA]) for i in range(4)]
    other_topic = event(eid(50), "Cellar Chess", days_ago(-3), HOST, [], tags=("GAMES",))
    _, candidates = member_and_candidates([lena()], [*past, other_topic], hoods)
    assert candidates == []


def test_a_full_event_is_never_a_candidate_even_with_friends_going(hoods):
    events = friends_world()
    events[2]["maxParticipants"] = 3  # the friends fill it
    _, candidates = member_and_candidates([lena()], events, hoods)
    assert ids(candidates) == [str(eid(21))]


def test_a_one_event_member_gets_the_plans_order(hoods):
    past = [event(eid(1), "Only Night", days_ago(45, hour=23), HOST, [LENA], hood="west-village")]
    future = [event(eid(60 + i), f"Table {i}", days_ago(-d, hour=h), o, [], hood=hood, tags=tags)
              for i, (d, h, o, hood, tags) in enumerate([
                  (2, 23, STRANGER, "tottenville", ("WINE", "DINNER")), (9, 15, HOST, "west-village", ("WINE",)),
                  (4, 23, STRANGER, "chelsea", ("WINE",)), (20, 1, HOST, "astoria", ("WINE", "DINNER"))])]
    user, candidates = member_and_candidates([lena(interests=("wine", "food"))], [*past, *future], hoods)
    assert user["event_history"]["events"] == 1
    assert all(c.history.points == 0 for c in candidates)
    assert ids(candidates) == ids(sorted(candidates, key=lambda c: c.plan_key))


SPEC = st.tuples(st.integers(0, 3), st.sampled_from(["chelsea", "west-village", "astoria", "nowhere-town"]),
                 st.integers(0, 6), st.sampled_from([1, 15, 23]))  # host, place, weekday offset, UTC hour


@settings(max_examples=80, deadline=None)
@given(past=st.lists(SPEC, min_size=1, max_size=8), future=st.lists(
    st.tuples(SPEC, st.floats(0.1, 80), st.integers(0, 3), st.sampled_from([4, None])), min_size=1, max_size=8))
def test_confidence_follows_the_ranking_whatever_the_history(hoods, past, future):
    hosts = [ObjectId(f"69000000000000000000{0xf1 + i:04x}") for i in range(4)]
    events = [event(eid(i), f"Night {i}", days_ago(35 + 7 * i + w, hour=h), hosts[o], [LENA, FRIENDS[i % 3]],
                    hood=hood) for i, (o, hood, w, h) in enumerate(past)]
    events += [event(eid(100 + i), f"Table {i}", days_ago(-d, hour=h), hosts[o], FRIENDS[:n], hood=hood,
                     maxParticipants=cap) for i, ((o, hood, _, h), d, n, cap) in enumerate(future)]
    _, candidates = member_and_candidates([lena()], events, hoods)
    confidences = [c.confidence for c in candidates]
    assert confidences == sorted(confidences, reverse=True)
    assert all(70 <= c <= 100 for c in confidences)
    assert [c.rank_key for c in candidates] == sorted(c.rank_key for c in candidates)


def test_each_events_features_are_computed_once_for_all_members(hoods, monkeypatch):
    events = rtt.find_future_events(friends_world(), NOW)
    calls: list[Any] = []
    real = rtt.event_tags
    monkeypatch.setattr(rtt, "event_tags", lambda e: calls.append(e) or real(e))
    for n in range(5):
        rtt.score_candidates({**lena(), "_id": f"m{n}"}, events, hoods, NOW)
    assert len(calls) == len(events)


# --- nobody is identified -----------------------------------------------------------------------


def test_no_co_attendee_is_identified_in_prompts_messages_or_logs(tmp_path):
    friends = [{"_id": f, "firstName": name, "lastName": "Quillfeather", "email": f"{name.lower()}@example.com",
                "phone": f"+1212555013{i}", "interests": ["wine"], "homeNeighborhood": "chelsea"}
               for i, (f, name) in enumerate(zip(FRIENDS, ["Zebulon", "Ximena", "Wolfgang"], strict=True))]
    folder = write_folder(tmp_path / "export", [lena(), *friends], friends_world())
    with FakeMessagesAPI(default=smart) as fake:
        env = {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_MAX_RETRIES": "2"}
        run = run_main(["--source", str(folder), "--now", NOW_ISO, "--llm", "claude", "--dry-run"],
                       tmp_path / "out", env, complete=True)
        prompts = [r.raw.decode("utf-8") for r in fake.requests]
    assert run.code == 0, run.err
    [message] = run.messages
    assert message["user_id"] == str(LENA) and message["event_id"] == str(eid(20))
    assert any("sat_with_going=3" in p for p in prompts)  # the count reached the model
    logs = [p.read_text(encoding="utf-8") for p in (run.root / "logs").rglob("*.log")]
    dormant = run.path("data/processed/dormant_users.json").read_text(encoding="utf-8")
    report = run.report_path(".md").read_text(encoding="utf-8") + run.report_path().read_text(encoding="utf-8")
    for text in [*prompts, json.dumps(run.messages), *logs, dormant, report, run.out, run.err]:
        for friend in friends:
            assert str(friend["_id"]) not in text
            assert friend["firstName"] not in text and "Quillfeather" not in text


# --- where places are ---------------------------------------------------------------------------


@pytest.mark.parametrize("town", ["hamilton", "clinton", "fort", "upper"])
def test_a_town_is_not_placed_in_nyc_by_the_start_of_a_neighbourhood_name(hoods, town):
    assert hoods.locate(town) is None


@pytest.mark.parametrize(("name", "areas"), [
    ("soho", ["soho-little-italy-hudson-square"]),
    ("harlem", ["harlem-south", "harlem-north"]),
    ("clinton-hill", ["clinton-hill"]),
    ("little-italy", ["soho-little-italy-hudson-square"]),
])
def test_a_whole_place_an_area_names_is_located(hoods, name, areas):
    lat = sum(hoods.centroids[a][0] for a in areas) / len(areas)
    assert hoods.locate(name) == pytest.approx((lat, sum(hoods.centroids[a][1] for a in areas) / len(areas)))


def write_table(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


TOWNS = "slug,name,lat,lon\nlakeside,Lakeside,45.000,-110.000\nhilltop,Hilltop,45.027,-110.000\n"


def test_neighbourhoods_csv_replaces_the_nyc_table(tmp_path):
    table = write_table(tmp_path / "towns.csv", TOWNS)
    settings_ = rtt.Settings.from_env({"NEIGHBOURHOODS_CSV": str(table)})
    assert settings_.neighbourhoods_csv == table
    assert rtt.Settings.from_env({}).neighbourhoods_csv == rtt.CENTROIDS_CSV
    towns = rtt.load_neighbourhoods(table)
    assert towns.distance_km("lakeside", "hilltop") == pytest.approx(3.0, abs=0.05)
    assert towns.locate("chelsea") is None


def campaign_world() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    past = [event(eid(i), f"Cellar Night {i}", days_ago(40 + 7 * i), HOST, [LENA], hood="lakeside")
            for i in range(2)]
    return [lena(home="lakeside")], [*past, event(eid(70), "Hilltop Pour", days_ago(-4), HOST, [], hood="hilltop"),
                                     event(eid(71), "Hamilton Pour", days_ago(-5), HOST, [], hood="hamilton")]


def test_the_campaign_locates_with_neighbourhoods_csv_and_counts_what_it_cannot(run_cli, tmp_path):
    folder = write_folder(tmp_path / "export", *campaign_world())
    table = write_table(tmp_path / "towns.csv", TOWNS)
    run = run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run", env={"NEIGHBOURHOODS_CSV": str(table)},
                  complete=True)
    assert run.code == 0, run.err
    assert run.report()["places_not_located"] == {"count": 1, "mentions": 1, "most_seen": {"hamilton": 1}}
    assert "Places not located in NEIGHBOURHOODS_CSV: 1" in run.report_path(".md").read_text(encoding="utf-8")
    with_nyc = run_cli("--source", str(folder), "--now", NOW_ISO, "--dry-run", root=tmp_path / "nyc")
    assert with_nyc.report()["places_not_located"]["count"] == 3  # lakeside, hilltop, hamilton: not NYC


@pytest.mark.parametrize(("text", "says"), [
    (None, "cannot read it"),
    ("name,latitude\nx,1\n", "no 'slug' column"),
    ("slug,lat,lon\nlakeside,north,-110\n", "not a centroid table"),
    ("slug,lat,lon\n", "no neighbourhoods in it"),
    ("slug,lat,lon\nlakeside,95,-110\n", "not a centroid table"),
])
@pytest.mark.parametrize("command", [[], ["backtest", "--from", "2025-01-01", "--to", "2025-01-01"]])
def test_a_bad_neighbourhoods_csv_is_one_line_and_exit_2(run_cli, tmp_path, text, says, command):
    table = tmp_path / "towns.csv"
    if text is not None:
        write_table(table, text)
    folder = write_folder(tmp_path / "export", *campaign_world())
    source = ["--source", str(folder)] if command else ["--source", str(folder), "--now", NOW_ISO, "--dry-run"]
    run = run_cli(*command, *source, env={"NEIGHBOURHOODS_CSV": str(table)})
    assert run.code == 2
    assert run.err.count("\n") == 1 and run.err.startswith("error: NEIGHBOURHOODS_CSV=") and says in run.err
    assert "Traceback" not in run.err
