"""Steps 2-5: future events and their metrics, the summaries, and the rules matcher."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from builders import NOW
from hypothesis import given, settings
from hypothesis import strategies as st

from return_to_table import (
    CENTROIDS_CSV,
    Activity,
    CandidateIndex,
    NeighbourhoodMap,
    event_metrics,
    event_summary,
    event_tags,
    find_dormant_users,
    find_future_events,
    indefinite_article,
    interest_alignment,
    iso_utc,
    matched_interests,
    rules_match,
    score_candidates,
    user_summary,
)

# --- step 2: event metrics ---------------------------------------------------------------------------


def test_known_capacity_gives_percentage_and_spots_left():
    assert event_metrics({"participants": ["a", "b", "c", "d", "e", "f"], "maxParticipants": 8}) == {
        "participantCount": 6, "participationPercentage": 75.0, "remaining_spots": 2}


@pytest.mark.parametrize("capacity", [None, 0, -5, True, False, "10", float("nan")],
                         ids=["null", "zero", "negative", "true", "false", "string", "nan"])
def test_unknown_capacity_gives_zero_percent_and_unknown_spots(capacity):
    assert event_metrics({"participants": ["a", "b", "c"], "maxParticipants": capacity}) == {
        "participantCount": 3, "participationPercentage": 0.0, "remaining_spots": None}


def test_missing_capacity_gives_zero_percent_and_unknown_spots():
    assert event_metrics({"participants": ["a"]}) == {
        "participantCount": 1, "participationPercentage": 0.0, "remaining_spots": None}


def test_full_event_has_no_spots_left():
    assert event_metrics({"participants": ["a", "b", "c", "d"], "maxParticipants": 4}) == {
        "participantCount": 4, "participationPercentage": 100.0, "remaining_spots": 0}


def test_overbooked_event_has_no_spots_left_and_more_than_100_percent():
    metrics = event_metrics({"participants": list("abcdef"), "maxParticipants": 4})
    assert metrics == {"participantCount": 6, "participationPercentage": 150.0, "remaining_spots": 0}


@pytest.mark.parametrize("participants", [None, "abc", {"a": 1}])
def test_participants_that_are_not_a_list_count_as_nobody(participants):
    assert event_metrics({"participants": participants, "maxParticipants": 10})["participantCount"] == 0


# --- step 2: which events are open --------------------------------------------------------------------


def raw_event(event_id: str, now: datetime, **fields: Any) -> dict[str, Any]:
    """A future public approved event two days out, with fields overridden (``...`` removes one)."""
    doc = {"_id": event_id, "name": "Jazz Brunch", "startDate": now + timedelta(days=2), "type": "public",
           "active": True, "eventStatus": "approved", "participants": ["p1"], "maxParticipants": 10, **fields}
    return {k: v for k, v in doc.items() if v is not ...}


def future_ids(events: list[dict[str, Any]], now: datetime) -> list[str]:
    return [e["_id"] for e in find_future_events(events, now)]


@pytest.mark.parametrize("fields", [
    {},
    {"eventStatus": ...},
    {"startDate": "2026-01-17T16:00:00.000Z"},
    {"startDate": "2026-01-15T08:00:00-05:00"},
    {"startDate": "2026-01-15T12:30:00"},
    {"startDate": 1768665600000},
    {"startDate": datetime(2026, 1, 17, 16, 0)},
    {"startDate": {"$date": "2026-01-17T16:00:00Z"}},
], ids=["approved", "no-status-field", "iso-string", "offset-string", "naive-string-utc", "epoch-ms",
        "naive-datetime", "ejson-date"])
def test_future_public_active_approved_event_is_open(now, fields):
    assert future_ids([raw_event("e1", now, **fields)], now) == ["e1"]


@pytest.mark.parametrize("fields", [
    {"startDate": datetime(2026, 1, 10, 18, 0)},
    {"startDate": "2026-01-15T12:00:00Z"},
    {"startDate": "2026-01-15T11:30:00"},
    {"startDate": "TBD"},
    {"startDate": None},
    {"startDate": ...},
    {"type": "private"},
    {"type": ...},
    {"active": False},
    {"active": "true"},
    {"active": 1},
    {"active": ...},
    {"eventStatus": "pending"},
    {"eventStatus": "cancelled"},
], ids=["past", "exactly-now", "naive-string-is-utc-so-past", "tbd", "null-date", "no-date", "private",
        "no-type", "inactive", "active-string-true", "active-one", "no-active", "pending", "cancelled"])
def test_event_that_is_not_future_public_active_and_approved_is_left_out(now, fields):
    assert future_ids([raw_event("e1", now, **fields)], now) == []


def test_future_events_carry_metrics_normalised_dates_string_ids_and_a_summary(now):
    from bson import ObjectId

    oid = ObjectId("6600000000000000000000f1")
    raw = raw_event(oid, now, startDate=1768665600000, participants=["a", "b", "c"], maxParticipants=4,
                    ownerId=ObjectId("6500000000000000000000a1"))
    [event] = find_future_events([raw], now)
    assert event["_id"] == str(oid)
    assert event["ownerId"] == "6500000000000000000000a1"
    assert event["startDate"] == "2026-01-17T16:00:00.000Z"
    assert (event["participantCount"], event["participationPercentage"], event["remaining_spots"]) == (3, 75.0, 1)
    assert event["summary"].startswith("Event: Jazz Brunch")


def test_future_events_sorted_by_participation_then_start_then_id(now):
    soon, later = now + timedelta(days=1), now + timedelta(days=3)
    events = [
        raw_event("low", now, participants=["a"], maxParticipants=10, startDate=soon),
        raw_event("unknown-capacity", now, maxParticipants=..., startDate=soon),
        raw_event("high-b-later", now, participants=list("abcdefgh"), maxParticipants=10, startDate=later),
        raw_event("high-c", now, participants=list("abcdefgh"), maxParticipants=10, startDate=soon),
        raw_event("high-a", now, participants=list("abcdefgh"), maxParticipants=10, startDate=soon),
        raw_event("over", now, participants=list("abcdef"), maxParticipants=4, startDate=later),
    ]
    assert future_ids(events, now) == ["over", "high-a", "high-c", "high-b-later", "low", "unknown-capacity"]


# --- steps 3-4: summaries --------------------------------------------------------------------------------


def test_user_summary_follows_the_plans_example_word_for_word():
    user = {"firstName": "Jordan", "lastName": "Lee", "occupation": "AI Specialist", "homeNeighborhood": "hells-kitchen",
            "eventCount": 13, "last_event_date": "2024-10-15T00:00:00Z", "days_inactive": 65,
            "interests": ["travel", "reading", "music", "fashion", "clubbing", "finance", "outdoor"],
            "engagement_status": "dormant"}
    assert user_summary(user) == (
        "Jordan Lee is an AI Specialist from hells-kitchen who has attended 13 events. "
        "Last attended: 2024-10-15 (65 days ago). "
        "Interests: travel, reading, music, fashion, clubbing, finance, outdoor. Engagement: dormant.")


@pytest.mark.parametrize(("phrase", "article"), [
    ("AI Specialist", "an"), ("UX Designer", "a"), ("MBA Candidate", "an"), ("HR Manager", "an"),
    ("UI Engineer", "a"), ("FBI Agent", "an"), ("Architect", "an"), ("Editor", "an"), ("Urban Planner", "an"),
    ("University Lecturer", "a"), ("European Historian", "a"), ("Hour Tracker", "an"), ("Honest Broker", "an"),
    ("Hotel Manager", "a"), ("Chef", "a"), ("Software Engineer", "a"), ("Illustrator", "an"), ("Nurse", "a"),
    ("X-ray Technician", "an"), ("8th Grade Teacher", "an"), ("11th Grade Teacher", "an"),
    ("18th-century Historian", "an"), ("1st Grade Teacher", "a"), ("3D Artist", "a"),
])
def test_indefinite_article_follows_the_sound(phrase, article):
    assert indefinite_article(phrase) == article


@pytest.mark.parametrize("occupation", ["UX Designer", "Engineer"])
def test_user_summary_uses_the_right_article(occupation):
    article = "a" if occupation == "UX Designer" else "an"
    assert f"Sam Cole is {article} {occupation} " in user_summary(
        {"firstName": "Sam", "lastName": "Cole", "occupation": occupation, "eventCount": 2})


def test_user_summary_leaves_out_what_is_missing():
    summary = user_summary({"firstName": "Maya", "lastName": None, "occupation": None, "homeNeighborhood": "",
                            "eventCount": 1, "interests": None, "last_event_date": None, "days_inactive": None})
    assert summary == "Maya is a member who has attended 1 event."
    assert "None" not in summary


def test_event_summary_follows_the_plans_format():
    event = {"name": "Jazz Brunch", "venueName": "The Velvet Note", "neighborhood": "west-village",
             "categories": ["MUSIC", "BRUNCH"], "features": ["jazz"], "maxParticipants": 10, "participantCount": 4,
             "participationPercentage": 40.0, "startDate": "2026-01-17T16:00:00.000Z",
             "description": "A live trio plays while we linger over eggs."}
    assert event_summary(event) == (
        "Event: Jazz Brunch at The Velvet Note in west-village. Categories: MUSIC, BRUNCH. Features: jazz. "
        "Capacity: 10, Participants: 4 (40.0% full). Date: 2026-01-17 16:00 UTC. "
        "A live trio plays while we linger over eggs.")


def test_event_summary_leaves_out_what_is_missing():
    summary = event_summary({"name": "Jazz Brunch", "venueName": None, "neighborhood": None, "categories": None,
                             "features": [], "maxParticipants": None, "participantCount": 3, "startDate": None,
                             "description": None})
    assert summary == "Event: Jazz Brunch. Participants: 3."
    assert "None" not in summary


# --- step 5: interests and neighbourhoods -------------------------------------------------------------------


@pytest.mark.parametrize(("interest", "event", "tag"), [
    ("music", {"features": ["karaoke"]}, "karaoke"),
    ("music", {"categories": ["MUSIC"]}, "MUSIC"),
    ("music", {"features": ["Live Music"]}, "Live Music"),
    ("clubbing", {"categories": ["BAR"]}, "BAR"),
    ("clubbing", {"features": ["dancing"]}, "dancing"),
    ("food", {"categories": ["DINNER"]}, "DINNER"),
    ("food", {"categories": ["BRUNCH"]}, "BRUNCH"),
    ("Wine", {"features": ["wine-tasting"]}, "wine-tasting"),
])
def test_interest_matches_event_categories_and_features_through_synonyms(interest, event, tag):
    assert matched_interests([interest], event_tags(event)) == [(interest, tag)]


def test_interest_without_a_synonym_in_the_event_does_not_match():
    assert matched_interests(["music", "hiking"], event_tags({"categories": ["WINE"], "features": ["groups"]})) == []


_SPELLINGS = ["MUSIC", "karaoke", "Live Music", "live_music", "DJ", "BAR", "dancing", "DINNER", "brunch", "WINE",
              "wine-tasting", "groups", "Jazz", "hiking"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["music", "Clubbing", "food", "wine", "hiking", "Live Music", "dj"]), max_size=4),
       st.lists(st.tuples(st.lists(st.sampled_from(_SPELLINGS), max_size=5),
                          st.lists(st.sampled_from(_SPELLINGS), max_size=3)), min_size=1, max_size=4))
def test_the_index_interest_tier_is_the_scorers_on_every_event(interests, tagged):
    events = [{"_id": str(n), "categories": c, "features": f} for n, (c, f) in enumerate(tagged)]
    index = CandidateIndex(events, NeighbourhoodMap({}), NOW)  # (an event without a tag is not indexed)
    assert index.interest_tiers(interests).tolist() == [interest_alignment(matched_interests(interests, tags))
                                                        for tags in map(event_tags, events) if tags]


@pytest.mark.parametrize(("name", "slug"), [
    ("hells-kitchen", "hells-kitchen"),
    ("Hell's Kitchen", "hells-kitchen"),
    ("soho", "soho-little-italy-hudson-square"),
    ("midtown-east", "east-midtown-turtle-bay"),
])
def test_neighbourhood_resolves_by_exact_slug_prefix_or_alias(hoods, name, slug):
    assert hoods.locate(name) == hoods.centroids[slug]


@pytest.mark.parametrize("name", ["jersey-city", "", None, "atlantis"])
def test_unknown_neighbourhood_has_no_location(hoods, name):
    assert hoods.locate(name) is None
    assert hoods.distance_km("hells-kitchen", name) is None


def test_centroid_file_ships_with_the_script():
    assert CENTROIDS_CSV.is_file()


# --- step 5: the rules matcher's priorities -----------------------------------------------------------------

MEMBER = {"_id": "m1", "firstName": "Maya", "lastName": "Rivera", "interests": ["music", "wine"],
          "homeNeighborhood": "hells-kitchen", "days_inactive": 50, "eventCount": 3}


def open_event(now: datetime, event_id: str, *, tags: list[str], hood: str | None, going: int = 6,
               capacity: int | None = 10, days: float = 10.0) -> dict[str, Any]:
    """A raw open future event; ``going`` of ``capacity`` seats taken, ``days`` from now."""
    doc = {"_id": event_id, "name": f"Event {event_id}", "categories": tags, "features": [], "neighborhood": hood,
           "participants": [f"p{i}" for i in range(going)], "maxParticipants": capacity,
           "startDate": now + timedelta(days=days), "type": "public", "active": True}
    return {k: v for k, v in doc.items() if v is not None}


def ranked(now, hoods, *raws, user=MEMBER) -> list[str]:
    return [c.event["_id"] for c in score_candidates(user, find_future_events(list(raws), now), hoods, now)]


def best(now, hoods, zone, *raws, user=MEMBER, min_confidence=70.0):
    candidates = score_candidates(user, find_future_events(list(raws), now), hoods, now)
    return rules_match(user, candidates, min_confidence, zone, now)


def test_event_without_a_shared_interest_is_never_matched(now, hoods, zone):
    perfect_otherwise = open_event(now, "games", tags=["GAMES"], hood="hells-kitchen", going=9, days=1)
    assert ranked(now, hoods, perfect_otherwise) == []
    assert best(now, hoods, zone, perfect_otherwise) is None


def test_more_shared_interests_beat_location_participation_and_timing(now, hoods):
    both_far = open_event(now, "both-far", tags=["MUSIC", "WINE"], hood="tottenville", going=1, days=25)
    one_here = open_event(now, "one-here", tags=["MUSIC"], hood="hells-kitchen", going=9, days=1)
    assert ranked(now, hoods, one_here, both_far) == ["both-far", "one-here"]


def test_same_neighbourhood_beats_nearby_beats_across_town(now, hoods):
    events = [open_event(now, hood, tags=["MUSIC"], hood=hood)
              for hood in ("tottenville", "williamsburg", "hells-kitchen", "midtown")]
    assert ranked(now, hoods, *events) == ["hells-kitchen", "midtown", "williamsburg", "tottenville"]


@pytest.mark.parametrize(("near", "far"), [("hells-kitchen", "tottenville"), ("midtown", "williamsburg")])
def test_proximity_beats_participation_and_timing(now, hoods, near, far):
    near_quiet_later = open_event(now, "near", tags=["MUSIC"], hood=near, going=1, days=20)
    far_busy_sooner = open_event(now, "far", tags=["MUSIC"], hood=far, going=9, days=1)
    assert ranked(now, hoods, far_busy_sooner, near_quiet_later) == ["near", "far"]


@pytest.mark.parametrize("going", [5, 8, 9], ids=["50pct", "80pct", "90pct"])
def test_well_attended_event_beats_a_sooner_nearly_empty_one(now, hoods, going):
    filled_later = open_event(now, "filled", tags=["MUSIC"], hood="hells-kitchen", going=going, days=12)
    empty_sooner = open_event(now, "empty", tags=["MUSIC"], hood="hells-kitchen", going=2, days=1)
    assert ranked(now, hoods, empty_sooner, filled_later) == ["filled", "empty"]


def test_sooner_start_wins_when_everything_else_is_equal(now, hoods):
    later = open_event(now, "later", tags=["MUSIC"], hood="hells-kitchen", days=9)
    sooner = open_event(now, "sooner", tags=["MUSIC"], hood="hells-kitchen", days=2)
    assert ranked(now, hoods, later, sooner) == ["sooner", "later"]


@pytest.mark.parametrize("going", [4, 6], ids=["full", "overbooked"])
def test_event_without_spots_left_is_never_matched(now, hoods, zone, going):
    no_room = open_event(now, "no-room", tags=["MUSIC", "WINE"], hood="hells-kitchen", going=going, capacity=4,
                         days=1)
    open_far = open_event(now, "open", tags=["MUSIC"], hood="tottenville", going=1, days=20)
    assert ranked(now, hoods, no_room, open_far) == ["open"]
    assert best(now, hoods, zone, no_room) is None
    assert best(now, hoods, zone, no_room, open_far)["event_id"] == "open"


def test_event_with_unknown_capacity_can_be_matched(now, hoods, zone):
    unknown = open_event(now, "unknown", tags=["MUSIC"], hood="hells-kitchen", capacity=None)
    assert best(now, hoods, zone, unknown)["event_id"] == "unknown"


@pytest.mark.parametrize("hood", ["tottenville", "jersey-city", None], ids=["across-town", "outside-nyc", "none"])
def test_one_shared_interest_with_open_spots_reaches_70_even_far_away(now, hoods, zone, hood):
    [candidate] = score_candidates(
        MEMBER, find_future_events([open_event(now, "far", tags=["MUSIC"], hood=hood, going=0, days=25)], now),
        hoods, now)
    assert 70 <= candidate.confidence <= 100
    assert best(now, hoods, zone, open_event(now, "far", tags=["MUSIC"], hood=hood, going=0, days=25)) is not None


def test_confidence_of_the_best_possible_event_stays_within_100(now, hoods):
    keen = {**MEMBER, "interests": ["music", "wine", "food", "jazz"]}
    ideal = open_event(now, "ideal", tags=["MUSIC", "WINE", "DINNER", "JAZZ"], hood="hells-kitchen", going=9, days=1)
    [candidate] = score_candidates(keen, find_future_events([ideal], now), hoods, now)
    assert 90 <= candidate.confidence <= 100


def test_min_confidence_above_the_best_candidate_gives_no_match(now, hoods, zone):
    far = open_event(now, "far", tags=["MUSIC"], hood="tottenville", going=1, days=25)
    [candidate] = score_candidates(MEMBER, find_future_events([far], now), hoods, now)
    assert best(now, hoods, zone, far, min_confidence=candidate.confidence + 1) is None
    assert best(now, hoods, zone, far, min_confidence=candidate.confidence)["event_id"] == "far"


def test_member_with_an_event_above_min_confidence_gets_a_match(now, hoods, zone):
    # "Users with no event above --min-confidence get no match": the converse must hold too.
    both_far = open_event(now, "both-far", tags=["MUSIC", "WINE"], hood="tottenville", going=1, days=25)
    one_here = open_event(now, "one-here", tags=["MUSIC"], hood="hells-kitchen", going=9, days=1)
    events = find_future_events([both_far, one_here], now)
    confidences = {c.event["_id"]: c.confidence for c in score_candidates(MEMBER, events, hoods, now)}
    threshold = max(confidences.values())
    assert best(now, hoods, zone, both_far, one_here, min_confidence=threshold) is not None


def test_confidence_never_ranks_a_lower_priority_event_above_the_chosen_one(now, hoods):
    both_far = open_event(now, "both-far", tags=["MUSIC", "WINE"], hood="tottenville", going=1, days=25)
    one_here = open_event(now, "one-here", tags=["MUSIC"], hood="hells-kitchen", going=9, days=1)
    candidates = score_candidates(MEMBER, find_future_events([both_far, one_here], now), hoods, now)
    assert [c.event["_id"] for c in candidates] == ["both-far", "one-here"]
    assert candidates[0].confidence >= candidates[1].confidence


def test_match_record_has_the_plans_fields_and_says_why(now, hoods, zone):
    here = open_event(now, "jazz", tags=["MUSIC", "BRUNCH"], hood="hells-kitchen", going=6, days=3)
    match = best(now, hoods, zone, here)
    assert {k: match[k] for k in ("user_name", "user_id", "event_name", "event_id", "match_purpose", "strategy",
                                  "matched_at", "matcher", "matched_interests")} == {
        "user_name": "Maya Rivera", "user_id": "m1", "event_name": "Event jazz", "event_id": "jazz",
        "match_purpose": "reactivate_dormant_user", "strategy": "reactivate_dormant_user",
        "matched_at": iso_utc(now), "matcher": "rules", "matched_interests": ["music"]}
    assert isinstance(match["confidence_percentage"], int) and 70 <= match["confidence_percentage"] <= 100
    assert "music" in match["reasoning"] and "hells-kitchen" in match["reasoning"]
    assert match["user"] == MEMBER
    assert match["event"]["_id"] == "jazz" and match["event"]["remaining_spots"] == 4


def test_several_members_may_get_the_same_event(now, hoods, zone):
    other = {**MEMBER, "_id": "m2", "firstName": "Omar", "homeNeighborhood": "chelsea"}
    only = open_event(now, "only", tags=["MUSIC"], hood="hells-kitchen")
    assert best(now, hoods, zone, only)["event_id"] == best(now, hoods, zone, only, user=other)["event_id"]


def test_eligible_member_from_step_1_gets_matched_in_step_5(now, hoods, zone):
    raw_user = {**MEMBER, "email": "maya.rivera@example.com", "phone": "+12125550101"}
    del raw_user["days_inactive"], raw_user["eventCount"]
    [user] = find_dormant_users([raw_user], {"m1": Activity(3, now - timedelta(days=45))}, now).eligible
    match = best(now, hoods, zone, open_event(now, "jazz", tags=["MUSIC"], hood="midtown"), user=user)
    assert match["user_id"] == "m1" and match["user"]["days_inactive"] == 45


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(st.tuples(
        st.lists(st.sampled_from(["MUSIC", "WINE", "DINNER", "GAMES", "JAZZ", "BAR"]), min_size=1, max_size=3,
                 unique=True),
        st.sampled_from(["hells-kitchen", "midtown", "chelsea", "williamsburg", "tottenville", "jersey-city", None]),
        st.integers(0, 10),
        st.sampled_from([10, None]),
        st.floats(0.05, 40),
    ), min_size=1, max_size=8),
    threshold=st.integers(0, 100),
)
def test_confidence_follows_the_ranking_and_decides_the_threshold(hoods, specs, threshold):
    raws = [open_event(NOW, f"e{i}", tags=tags, hood=hood, going=going, capacity=capacity, days=days)
            for i, (tags, hood, going, capacity, days) in enumerate(specs)]
    candidates = score_candidates(MEMBER, find_future_events(raws, NOW), hoods, NOW)
    confidences = [c.confidence for c in candidates]
    assert confidences == sorted(confidences, reverse=True)
    assert all(70 <= c <= 100 for c in confidences)
    assert all(c.event["remaining_spots"] != 0 for c in candidates)
    match = rules_match(MEMBER, candidates, threshold, ZoneInfo("America/New_York"), NOW)
    assert (match is not None) == any(c >= threshold for c in confidences)
    if match is not None:
        assert match["event_id"] == candidates[0].event["_id"]


def test_two_interests_hitting_one_tag_count_once_and_proximity_decides(now, hoods):
    outdoorsy = {**MEMBER, "interests": ["hiking", "outdoor", "music"], "homeNeighborhood": "west-village"}
    far_outdoor = open_event(now, "far-outdoor", tags=["OUTDOOR"], hood="astoria", going=1, days=25)
    music_here = open_event(now, "music-here", tags=["MUSIC"], hood="west-village", going=8, days=2)
    assert ranked(now, hoods, far_outdoor, music_here, user=outdoorsy) == ["music-here", "far-outdoor"]


def test_an_aliased_neighbourhood_is_the_members_own(now, hoods):
    member = {**MEMBER, "homeNeighborhood": "midtown-east"}
    [candidate] = score_candidates(member, find_future_events(
        [open_event(now, "e", tags=["MUSIC"], hood="east-midtown-turtle-bay")], now), hoods, now)
    assert candidate.same_neighbourhood
