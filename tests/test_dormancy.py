"""Step 1: dates, participants, engagement, eligibility, the reactivation score and the ranking."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId

from return_to_table import (
    Activity,
    DataIssues,
    calculate_reactivation_score,
    derive_engagement,
    event_member_ids,
    find_dormant_users,
    index_member_activity,
    to_utc,
)

MEMBER = ObjectId("6500000000000000000000a1")
OTHER = ObjectId("6500000000000000000000a2")

FULL_PROFILE = {  # interests first, so that any prefix of it is a personalisable profile
    "interests": ["music", "food"], "firstName": "Maya", "email": "maya.rivera@example.com",
    "homeNeighborhood": "soho", "lastName": "Rivera", "phone": "+12125550101", "gender": "female",
    "occupation": "Chef",
}


def profile(filled: int) -> dict[str, Any]:
    """The first ``filled`` of the plan's eight profile fields."""
    return dict(list(FULL_PROFILE.items())[:filled])


def member(member_id: str, **fields: Any) -> dict[str, Any]:
    """A member with the full profile unless fields say otherwise (a field set to ... is removed)."""
    doc = {"_id": member_id, **FULL_PROFILE, **fields}
    return {k: v for k, v in doc.items() if v is not ...}


def event(event_id: str, start: Any, *participants: Any, **fields: Any) -> dict[str, Any]:
    return {"_id": event_id, "startDate": start, "participants": list(participants), **fields}


def eligible_ids(users: list[dict[str, Any]], activity: dict[str, Activity], now: datetime) -> list[str]:
    return [u["_id"] for u in find_dormant_users(users, activity, now).eligible]


# --- the reactivation score, against the plan's numbers --------------------------------------


@pytest.mark.parametrize(("filled", "points"), [(4, 20), (5, 25), (6, 30), (7, 35), (8, 40)])
def test_completeness_scores_five_points_per_filled_field(filled, points):
    assert calculate_reactivation_score(profile(filled)) == points


def test_empty_profile_fields_do_not_count_towards_completeness():
    user = {**profile(4), "lastName": "", "phone": None, "gender": [], "occupation": ""}
    assert calculate_reactivation_score(user) == 20


@pytest.mark.parametrize(("event_count", "points"), [
    (0, 0), (1, 10), (4, 10), (5, 15), (9, 15), (10, 20), (14, 20), (15, 25), (19, 25), (20, 30), (57, 30),
])
def test_history_score_by_event_count_bucket(event_count, points):
    assert calculate_reactivation_score({"eventCount": event_count}) == points


@pytest.mark.parametrize(("days", "points"), [
    (31, 10.0), (45, 14.75), (60, 19.83), (75, 24.92), (90, 30.0),
])
def test_dormancy_score_is_linear_from_10_at_31_days_to_30_at_90(days, points):
    assert calculate_reactivation_score({"days_inactive": days}) == pytest.approx(points, abs=0.005)


@pytest.mark.parametrize("days", [0, 30, 91, 365])
def test_dormancy_score_is_zero_outside_the_dormant_window(days):
    assert calculate_reactivation_score({"days_inactive": days}) == 0


def test_total_score_adds_completeness_dormancy_and_history():
    user = {**FULL_PROFILE, "days_inactive": 60, "eventCount": 13}
    assert calculate_reactivation_score(user) == pytest.approx(40 + 10 + 29 / 59 * 20 + 20)


# --- engagement --------------------------------------------------------------------------------


@pytest.mark.parametrize(("days", "status"), [
    (0, "active"), (30, "active"), (31, "dormant"), (90, "dormant"), (91, "churned"), (400, "churned"),
])
def test_engagement_status_at_the_plan_boundaries(now, days, status):
    assert derive_engagement(now - timedelta(days=days), now) == (days, status)


def test_days_inactive_counts_whole_days_only(now):
    assert derive_engagement(now - timedelta(days=30, hours=23), now) == (30, "active")


def test_member_without_events_is_new(now):
    assert derive_engagement(None, now) == (None, "new")


def test_future_last_event_means_active_with_negative_days(now):
    assert derive_engagement(now + timedelta(days=5), now) == (-5, "active")


def test_engagement_edges_through_the_activity_index(now):
    users = [member(f"{i:024x}") for i in range(1, 8)]
    events = [
        event("e30", now - timedelta(days=30), users[0]["_id"]),
        event("e31", now - timedelta(days=31), users[1]["_id"]),
        event("e90", now - timedelta(days=90), users[2]["_id"]),
        event("e91", now - timedelta(days=91), users[3]["_id"]),
        # users[4] has no events at all: new
        event("old", now - timedelta(days=60), users[5]["_id"]),
        event("rsvp", now + timedelta(days=7), users[5]["_id"]),  # an upcoming RSVP makes them active
        event("e45", now - timedelta(days=45), ownerId=users[6]["_id"]),  # hosted, not joined
    ]
    census = find_dormant_users(users, index_member_activity(events, DataIssues()), now)

    assert census.status_counts == {"active": 2, "churned": 1, "dormant": 3, "new": 1}
    assert census.dormant_total == 3
    by_id = {u["_id"]: u for u in census.eligible}
    assert set(by_id) == {users[1]["_id"], users[2]["_id"], users[6]["_id"]}
    assert by_id[users[1]["_id"]]["days_inactive"] == 31
    assert by_id[users[2]["_id"]]["days_inactive"] == 90


# --- every date form ------------------------------------------------------------------------------

NOON = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
NOON_MS = 1710072000000


@pytest.mark.parametrize("value", [
    NOON,
    datetime(2024, 3, 10, 8, 0, tzinfo=timezone(timedelta(hours=-4))),
    datetime(2024, 3, 10, 12, 0),
    "2024-03-10T12:00:00Z",
    "2024-03-10T12:00:00.000Z",
    "2024-03-10T07:00:00-05:00",
    "2024-03-10T13:00:00+01:00",
    "2024-03-10T12:00:00",
    NOON_MS,
    float(NOON_MS),
    {"$date": "2024-03-10T12:00:00Z"},
    {"$date": {"$numberLong": str(NOON_MS)}},
    {"$date": NOON_MS},
], ids=[
    "aware", "aware-offset", "naive-is-utc", "iso-z", "iso-z-millis", "iso-minus-5", "iso-plus-1",
    "iso-no-zone-is-utc", "epoch-ms-int", "epoch-ms-float", "ejson-relaxed", "ejson-canonical", "ejson-ms",
])
def test_to_utc_reads_every_date_form_as_aware_utc(value):
    result = to_utc(value)
    assert result == NOON
    assert result.utcoffset() == timedelta(0)


@pytest.mark.parametrize("value", [
    None, True, False, "TBD", "", "   ", "2024-13-45", "next friday", 10**20, 10**400, 1e300,
    float("nan"), float("inf"), [2024, 3, 10], {"date": "2024-03-10"}, {"$date": "TBD"},
], ids=lambda v: repr(v)[:16])
def test_to_utc_treats_anything_else_as_no_date(value):
    assert to_utc(value) is None


def test_to_utc_never_misreads_epoch_milliseconds_in_a_string_as_an_iso_date():
    # "Anything else counts as no date": a digit string is either read as epoch ms or ignored,
    # never parsed as the ISO basic date 1710-07-20.
    assert to_utc(str(NOON_MS)) in (None, NOON)


# --- every participant form ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    MEMBER, str(MEMBER), {"_id": MEMBER}, {"_id": str(MEMBER)}, {"userId": str(MEMBER)}, {"id": str(MEMBER)},
    {"userId": MEMBER}, {"$oid": str(MEMBER)},
], ids=["objectid", "id-string", "_id-objectid", "_id-string", "userId", "id", "userId-objectid", "ejson-oid"])
def test_every_participant_form_names_the_member(entry):
    issues = DataIssues()
    assert event_member_ids({"participants": [entry]}, issues) == {str(MEMBER)}
    assert issues.as_dict() == {}


@pytest.mark.parametrize("owner", [MEMBER, str(MEMBER), {"_id": MEMBER}])
def test_owner_is_a_member_of_their_event(owner):
    assert event_member_ids({"ownerId": owner, "participants": []}, DataIssues()) == {str(MEMBER)}


def test_odd_participant_entries_are_counted_in_data_issues_not_fatal():
    issues = DataIssues()
    members = event_member_ids({"ownerId": MEMBER, "participants": [None, 42, {"name": "x"}, OTHER]}, issues)
    assert members == {str(MEMBER), str(OTHER)}
    assert issues.as_dict() == {"odd_participants": 3}


@pytest.mark.parametrize("participants", [str(OTHER), {"_id": OTHER}, 7])
def test_participants_that_are_not_a_list_are_counted_and_the_owner_still_counts(participants):
    issues = DataIssues()
    assert event_member_ids({"ownerId": MEMBER, "participants": participants}, issues) == {str(MEMBER)}
    assert issues.as_dict() == {"odd_participant_lists": 1}


def test_owner_who_also_participates_counts_the_event_once(now):
    events = [event("e1", now - timedelta(days=40), MEMBER, {"_id": str(MEMBER)}, ownerId=MEMBER)]
    assert index_member_activity(events, DataIssues())[str(MEMBER)].event_count == 1


def test_duplicate_participant_counts_the_event_once(now):
    events = [event("e1", now - timedelta(days=40), OTHER, str(OTHER), {"userId": str(OTHER)}, ownerId=MEMBER)]
    activity = index_member_activity(events, DataIssues())
    assert activity[str(OTHER)].event_count == 1
    assert activity[str(MEMBER)].event_count == 1


def test_activity_counts_events_of_any_type_status_and_date_and_keeps_the_latest(now):
    events = [
        event("private", now - timedelta(days=40), MEMBER, type="private", eventStatus="cancelled"),
        event("inactive", now - timedelta(days=50), MEMBER, type="public", active=False),
        event("hosted", (now - timedelta(days=70)).isoformat(), ownerId=MEMBER),
        event("elsewhere", now - timedelta(days=5), OTHER),
    ]
    activity = index_member_activity(events, DataIssues())
    assert activity[str(MEMBER)] == Activity(3, now - timedelta(days=40))


def test_event_without_a_usable_start_date_still_counts_but_sets_no_date(now):
    issues = DataIssues()
    events = [event("tbd", "TBD", MEMBER), event("dated", now - timedelta(days=45), MEMBER)]
    activity = index_member_activity(events, issues)
    assert activity[str(MEMBER)] == Activity(2, now - timedelta(days=45))
    assert issues.as_dict() == {"events_without_valid_start_date": 1}


# --- eligibility ------------------------------------------------------------------------------------


@pytest.fixture
def dormant(now) -> dict[str, Activity]:
    return {"m1": Activity(2, now - timedelta(days=50))}


def test_dormant_member_with_events_profile_and_interests_is_eligible(now, dormant):
    assert eligible_ids([member("m1")], dormant, now) == ["m1"]


def test_exactly_four_profile_fields_is_enough(now, dormant):
    assert eligible_ids([{"_id": "m1", **profile(4)}], dormant, now) == ["m1"]


@pytest.mark.parametrize("fields", [
    {"homeNeighborhood": ..., "lastName": ..., "phone": ..., "gender": ..., "occupation": ...},
    {"interests": []},
    {"interests": [""]},
    {"interests": ["  ", 42]},
    {"interests": None},
    {"interests": "music, food"},
], ids=["three-fields", "interests-empty", "interests-blank", "interests-no-string", "interests-none",
        "interests-a-string"])
def test_member_without_enough_profile_or_usable_interests_is_not_eligible(now, dormant, fields):
    user = member("m1", **fields)
    assert eligible_ids([user], dormant, now) == []


@pytest.mark.parametrize("days", [10, 120], ids=["active", "churned"])
def test_active_and_churned_members_are_not_eligible(now, days):
    assert eligible_ids([member("m1")], {"m1": Activity(3, now - timedelta(days=days))}, now) == []


def test_member_without_events_is_not_eligible(now):
    assert eligible_ids([member("m1")], {}, now) == []


def test_eligible_member_keeps_original_fields_and_gains_the_step_1_attributes(now):
    raw = member(MEMBER, referredBy=OTHER, createdAt=datetime(2025, 1, 2, 3, 4, 5))
    census = find_dormant_users([raw], {str(MEMBER): Activity(13, now - timedelta(days=60))}, now)
    [user] = census.eligible
    assert user["_id"] == str(MEMBER)
    assert user["referredBy"] == str(OTHER)
    assert user["createdAt"] == "2025-01-02T03:04:05.000Z"
    assert user["email"] == "maya.rivera@example.com"
    assert user["interests"] == ["music", "food"]
    assert user["eventCount"] == 13
    assert user["last_event_date"] == "2025-11-16T12:00:00.000Z"
    assert user["days_inactive"] == 60
    assert user["engagement_status"] == "dormant"
    assert user["personalization_ready"] is True
    assert user["reactivation_score"] == pytest.approx(40 + 10 + 29 / 59 * 20 + 20)


# --- ranking ---------------------------------------------------------------------------------------


def test_rank_is_score_desc_then_event_count_desc_then_id_asc(now):
    sixty = now - timedelta(days=60)
    users = [
        member("m-d"),  # 40 + 19.83 + 15, 6 events
        {"_id": "m-f", **profile(5)},  # 25 + 19.83 + 15: lowest score
        member("m-b"),  # same score as m-d, 7 events: ahead of it
        member("m-c"),  # ties m-d exactly: id decides
        member("m-a"),  # 90 days: highest score
    ]
    activity = {
        "m-d": Activity(6, sixty), "m-f": Activity(6, sixty), "m-b": Activity(7, sixty),
        "m-c": Activity(6, sixty), "m-a": Activity(2, now - timedelta(days=90)),
    }
    ranked = find_dormant_users(users, activity, now).eligible
    assert [u["_id"] for u in ranked] == ["m-a", "m-b", "m-c", "m-d", "m-f"]
    scores = [u["reactivation_score"] for u in ranked]
    assert scores[1] == scores[2] == scores[3]
    assert scores[0] > scores[1] > scores[4]
