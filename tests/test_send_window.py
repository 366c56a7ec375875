"""When a message may go out: ``send_window`` (quiet hours in the member's zone, the minimum lead before the
event, daylight-saving changes) and how the campaign uses it (candidates without a window are not offered)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from builders import MAYA, NOW, NOW_ISO, OMAR, small_world, write_folder
from hypothesis import given, settings
from hypothesis import strategies as st
from test_claude import claude_cli, event_doc, offered, prompt_of, smart, writing_requests
from test_claude import is_matching as is_matching_request
from test_claude import write_world as write_claude_world

import return_to_table as rtt
from return_to_table import DEFAULT_QUIET, QuietHours, SendWindow, send_window

NEW_YORK = ZoneInfo("America/New_York")
LOS_ANGELES = ZoneInfo("America/Los_Angeles")
LEAD = timedelta(hours=3)


def local(zone: ZoneInfo, *args: int) -> datetime:
    """A wall-clock moment in ``zone`` as an aware UTC instant (fold 0 where the wall time repeats)."""
    return datetime(*args, tzinfo=zone).astimezone(UTC)


def window(start: datetime, now: datetime, zone: ZoneInfo = NEW_YORK, quiet: QuietHours = DEFAULT_QUIET,
           lead: timedelta = LEAD) -> SendWindow | None:
    return send_window(start, now, zone, quiet, lead)


# --- the pure function: quiet hours 21:00-08:00 local, three hours' lead -----------------------------------

TUESDAY_7PM = local(NEW_YORK, 2026, 1, 20, 19, 0)  # an evening event five days after NOW


@pytest.mark.parametrize(("now", "first"), [
    (local(NEW_YORK, 2026, 1, 15, 7, 0), local(NEW_YORK, 2026, 1, 15, 8, 0)),  # 7am: quiet, wait for 8am
    (local(NEW_YORK, 2026, 1, 15, 12, 0), local(NEW_YORK, 2026, 1, 15, 12, 0)),  # noon: now
    (local(NEW_YORK, 2026, 1, 15, 20, 59), local(NEW_YORK, 2026, 1, 15, 20, 59)),  # 8:59pm: still now
    (local(NEW_YORK, 2026, 1, 15, 23, 0), local(NEW_YORK, 2026, 1, 16, 8, 0)),  # 11pm: tomorrow at 8am
], ids=["7am", "noon", "8:59pm", "11pm"])
def test_send_after_is_the_first_allowed_local_moment_at_or_after_now(now, first):
    assert window(TUESDAY_7PM, now) == SendWindow(first, local(NEW_YORK, 2026, 1, 20, 16, 0))


def test_nine_pm_itself_is_quiet_and_send_before_is_exclusive():
    just_before = local(NEW_YORK, 2026, 1, 15, 20, 59, 59) + timedelta(microseconds=999999)
    assert window(TUESDAY_7PM, just_before).send_after == just_before
    assert window(TUESDAY_7PM, local(NEW_YORK, 2026, 1, 15, 21, 0)).send_after == local(NEW_YORK, 2026, 1, 16, 8, 0)
    # Lead time ends at 9:30pm, in quiet hours: the window closes when they begin, 9pm, itself not allowed.
    late = local(NEW_YORK, 2026, 1, 16, 0, 30)
    assert window(late, local(NEW_YORK, 2026, 1, 15, 12, 0)).send_before == local(NEW_YORK, 2026, 1, 15, 21, 0)


def test_the_window_ends_at_start_minus_the_lead_when_that_is_in_allowed_hours():
    assert window(TUESDAY_7PM, NOW).send_before == TUESDAY_7PM - LEAD


def test_an_event_two_hours_away_has_no_window():
    now = local(NEW_YORK, 2026, 1, 15, 12, 0)
    assert window(now + timedelta(hours=2), now) is None
    assert window(now + LEAD, now) is None  # exactly the lead away: no moment is more than the lead before it


def test_a_lead_that_ends_exactly_when_quiet_hours_end_leaves_nothing_that_morning():
    now = local(NEW_YORK, 2026, 1, 15, 6, 0)
    assert window(local(NEW_YORK, 2026, 1, 15, 11, 0), now) is None  # 11am - 3h = 8am: [8am, 8am) is empty
    assert window(local(NEW_YORK, 2026, 1, 15, 11, 1), now) == SendWindow(
        local(NEW_YORK, 2026, 1, 15, 8, 0), local(NEW_YORK, 2026, 1, 15, 8, 1))


def test_an_event_at_7am_can_only_be_announced_the_evening_before():
    seven_am = local(NEW_YORK, 2026, 1, 16, 7, 0)
    assert window(seven_am, local(NEW_YORK, 2026, 1, 15, 20, 0)) == SendWindow(
        local(NEW_YORK, 2026, 1, 15, 20, 0), local(NEW_YORK, 2026, 1, 15, 21, 0))
    assert window(seven_am, local(NEW_YORK, 2026, 1, 15, 22, 0)) is None  # after 9pm: nothing left


def test_a_member_in_los_angeles_is_texted_on_pacific_time():
    now = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)  # 7am in New York, 4am in Los Angeles
    start = datetime(2026, 1, 16, 6, 0, tzinfo=UTC)  # 1am in New York, 10pm in Los Angeles
    assert window(start, now, NEW_YORK) == SendWindow(datetime(2026, 1, 15, 13, 0, tzinfo=UTC),
                                                      datetime(2026, 1, 16, 2, 0, tzinfo=UTC))  # 8am-9pm EST
    assert window(start, now, LOS_ANGELES) == SendWindow(datetime(2026, 1, 15, 16, 0, tzinfo=UTC),
                                                         datetime(2026, 1, 16, 3, 0, tzinfo=UTC))  # 8am-7pm PST


def test_spring_forward_8am_is_on_daylight_time():
    now = local(NEW_YORK, 2026, 3, 7, 22, 0)  # Saturday 10pm EST; clocks go forward at 2am
    start = local(NEW_YORK, 2026, 3, 8, 14, 0)  # Sunday 2pm EDT
    assert window(start, now) == SendWindow(datetime(2026, 3, 8, 12, 0, tzinfo=UTC),  # 8am EDT, not 8am EST
                                            datetime(2026, 3, 8, 15, 0, tzinfo=UTC))  # 11am EDT


def test_fall_back_8am_is_on_standard_time():
    now = local(NEW_YORK, 2026, 10, 31, 23, 0)  # Saturday 11pm EDT; clocks go back at 2am
    start = local(NEW_YORK, 2026, 11, 1, 12, 0)  # Sunday noon EST
    assert window(start, now) == SendWindow(datetime(2026, 11, 1, 13, 0, tzinfo=UTC),  # 8am EST
                                            datetime(2026, 11, 1, 14, 0, tzinfo=UTC))  # 9am EST


def test_a_window_spanning_the_spring_change_ends_on_daylight_time():
    now = local(NEW_YORK, 2026, 3, 6, 12, 0)  # Friday noon EST
    start = local(NEW_YORK, 2026, 3, 9, 23, 30)  # Monday 11:30pm EDT: the lead ends at 8:30pm
    assert window(start, now) == SendWindow(now, datetime(2026, 3, 10, 0, 30, tzinfo=UTC))


def test_quiet_hours_ending_at_a_wall_time_the_clocks_skip_end_when_the_clocks_jump():
    quiet = QuietHours(time(21, 0), time(2, 30))  # 2:30am does not exist on 8 March 2026 in New York
    now = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)  # 1am EST
    assert window(datetime(2026, 3, 9, 0, 0, tzinfo=UTC), now, quiet=quiet).send_after == \
        datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 3am EDT, the instant the clocks jump past 2:30


def test_quiet_hours_ending_at_a_wall_time_that_repeats_allow_both_of_its_occurrences():
    quiet = QuietHours(time(21, 0), time(1, 30))  # 1:30am happens twice on 1 November 2026 in New York
    now = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)  # midnight EDT
    # 1:30-2:00am EDT is allowed; at 2am EDT the clocks go back to 1am EST, quiet again until 1:30am EST.
    assert window(datetime(2026, 11, 1, 9, 15, tzinfo=UTC), now, quiet=quiet) == SendWindow(
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC), datetime(2026, 11, 1, 6, 0, tzinfo=UTC))
    assert window(datetime(2026, 11, 1, 11, 0, tzinfo=UTC), now, quiet=quiet) == SendWindow(
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC), datetime(2026, 11, 1, 8, 0, tzinfo=UTC))


def test_quiet_hours_that_do_not_wrap_midnight():
    quiet = QuietHours(time(1, 0), time(7, 0))  # allowed from 7am to 1am
    start = local(NEW_YORK, 2026, 1, 20, 19, 0)
    assert window(start, local(NEW_YORK, 2026, 1, 16, 0, 30), quiet=quiet).send_after == \
        local(NEW_YORK, 2026, 1, 16, 0, 30)
    assert window(start, local(NEW_YORK, 2026, 1, 16, 2, 0), quiet=quiet).send_after == \
        local(NEW_YORK, 2026, 1, 16, 7, 0)


def test_naive_arithmetic_never_leaks_the_zone_of_the_inputs():
    # The same instants given in another zone give the same window.
    now, start = local(NEW_YORK, 2026, 1, 15, 12, 0), TUESDAY_7PM
    assert window(start.astimezone(LOS_ANGELES), now.astimezone(NEW_YORK)) == window(start, now)


def test_an_event_at_the_end_of_datetimes_range_has_no_window_rather_than_an_error():
    assert window(datetime.max.replace(tzinfo=UTC) - timedelta(hours=1), NOW) is None


# --- the pure function against a minute-by-minute scan, in zones with odd changes -----------------------------

# (zone, a UTC day its clocks change in 2026): an hour either way, half an hour on Lord Howe Island, at
# midnight in Santiago; Kolkata never changes.
CHANGES = [("America/New_York", 3, 8), ("America/New_York", 11, 1), ("America/Los_Angeles", 3, 8),
           ("America/Los_Angeles", 11, 1), ("Europe/London", 3, 29), ("Europe/London", 10, 25),
           ("Australia/Lord_Howe", 4, 4), ("Australia/Lord_Howe", 10, 3), ("America/Santiago", 4, 5),
           ("America/Santiago", 9, 6), ("Asia/Kolkata", 6, 1)]
WALL_TIMES = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45]))


def allowed(moment: datetime, zone: ZoneInfo, quiet: QuietHours) -> bool:
    wall = moment.astimezone(zone).time()
    if quiet.start > quiet.end:
        return quiet.end <= wall < quiet.start
    return not quiet.start <= wall < quiet.end


@settings(max_examples=300, deadline=None)
@given(change=st.sampled_from(CHANGES), now_minutes=st.integers(-36 * 60, 24 * 60),
       lead_minutes=st.integers(0, 6 * 60), span_minutes=st.integers(1, 2 * 1440),
       quiet=st.tuples(WALL_TIMES, WALL_TIMES).filter(lambda q: q[0] != q[1]).map(lambda q: QuietHours(*q)))
def test_send_window_agrees_with_a_minute_by_minute_scan(change, now_minutes, lead_minutes, span_minutes, quiet):
    zone, month, day = change
    tz = ZoneInfo(zone)
    now = datetime(2026, month, day, tzinfo=UTC) + timedelta(minutes=now_minutes)
    lead = timedelta(minutes=lead_minutes)
    start = now + lead + timedelta(minutes=span_minutes)
    minutes = [now + timedelta(minutes=k) for k in range(span_minutes)]  # every whole minute before start - lead
    ok = [m for m in minutes if allowed(m, tz, quiet)]
    got = send_window(start, now, tz, quiet, lead)
    if not ok:
        assert got is None
    else:
        assert got == SendWindow(ok[0], ok[-1] + timedelta(minutes=1))


# --- the campaign: messages carry the window; candidates without one are never offered -----------------------

BASE_EVENT = {"type": "public", "active": True, "eventStatus": "approved", "ownerId": OMAR, "maxParticipants": 10}


def music_event(n: int, start: datetime, hood: str = "hells-kitchen", going: int = 4) -> dict[str, Any]:
    """A public music event Maya (music, food; Hell's Kitchen) fits; ``start`` aware, stored naive UTC."""
    return {**BASE_EVENT, "_id": f"66000000000000000000{n:04x}", "name": f"Jazz Night {chr(64 + n)}",
            "categories": ["MUSIC"], "features": ["jazz"], "neighborhood": hood,
            "startDate": start.astimezone(UTC).replace(tzinfo=None), "participants": [f"guest-{n}-{k}" for k in range(going)]}


def maya_world(tmp_path: Path, *future: dict[str, Any]) -> Path:
    """The small world's members and past tables, with only ``future`` to offer."""
    users, events = small_world()
    past = [e for e in events if e["startDate"] < NOW.replace(tzinfo=None)]
    return write_folder(tmp_path / "export", users, [*past, *future])


def campaign(run_cli: Any, folder: Path, *flags: str, now: str = NOW_ISO, env: dict[str, str] | None = None) -> Any:
    """One rules-and-template dry run, into its own ``--out`` (each run leaves its own report)."""
    root = folder.parent / f"out-{len(list(folder.parent.glob('out-*')))}"
    run = run_cli("--source", str(folder), "--now", now, "--dry-run", "--llm", "off", *flags, env=env, root=root,
                  complete=True)
    # a day without a message: 3
    assert run.code == (rtt.ExitCode.OK if run.messages else rtt.ExitCode.ATTENTION), run.err
    return run


def maya_message(run: Any) -> dict[str, Any] | None:
    return next((m for m in run.messages if m["user_id"] == str(MAYA)), None)


def maya_skip(run: Any) -> dict[str, Any] | None:
    return next((s for s in run.report()["skipped"] if s["user_id"] == str(MAYA)), None)


def test_every_message_carries_its_send_window_and_the_recipients_zone(run_cli, world_folder):
    run = campaign(run_cli, world_folder)
    message = maya_message(run)  # Jazz Brunch, Sunday 11am EST; the run is at 7am EST on Thursday
    assert message["send_after"] == "2026-01-15T13:00:00.000Z"  # 8am EST today
    assert message["send_before"] == "2026-01-18T02:00:00.000Z"  # 9pm EST Saturday: Sunday 8am leaves no moment
    assert message["recipient_timezone"] == "America/New_York"
    assert all({"send_after", "send_before", "recipient_timezone"} <= set(m) for m in run.messages)


def test_quiet_hours_come_from_the_environment(run_cli, world_folder):
    run = campaign(run_cli, world_folder, env={"QUIET_HOURS": "20:00-10:00"})
    assert maya_message(run)["send_after"] == "2026-01-15T15:00:00.000Z"  # 10am EST
    assert maya_message(run)["send_before"] == "2026-01-18T01:00:00.000Z"  # 8pm EST Saturday


def test_an_event_two_hours_away_is_not_offered_and_the_member_is_skipped(run_cli, tmp_path):
    folder = maya_world(tmp_path, music_event(1, NOW + timedelta(hours=2)))
    run = campaign(run_cli, folder)
    assert maya_message(run) is None
    assert maya_skip(run)["code"] == "no_event_in_send_window"
    assert str(MAYA) not in {m["user_id"] for m in run.matches}


def test_min_lead_hours_is_the_lead_the_window_keeps(run_cli, tmp_path):
    folder = maya_world(tmp_path, music_event(1, NOW + timedelta(hours=2)))  # 9am EST; the run is at 7am EST
    assert maya_skip(campaign(run_cli, folder, "--min-lead-hours", "1"))["code"] == "no_event_in_send_window"
    message = maya_message(campaign(run_cli, folder, "--min-lead-hours", "0.5"))
    assert (message["send_after"], message["send_before"]) == ("2026-01-15T13:00:00.000Z", "2026-01-15T13:30:00.000Z")


def test_the_next_candidate_is_used_when_the_best_one_has_no_window(run_cli, tmp_path):
    best = music_event(1, NOW + timedelta(hours=2), going=8)  # her own neighbourhood, busier, sooner
    next_best = music_event(2, NOW + timedelta(days=2), hood="chelsea", going=2)
    folder = maya_world(tmp_path, best, next_best)
    assert maya_message(campaign(run_cli, folder, "--min-lead-hours", "0"))["event_id"] == best["_id"]
    run = campaign(run_cli, folder)
    assert maya_message(run)["event_id"] == next_best["_id"]
    assert [m["event_id"] for m in run.matches if m["user_id"] == str(MAYA)] == [next_best["_id"]]


def test_a_member_whose_only_event_is_at_7am_is_skipped_after_9pm_and_texted_before(run_cli, tmp_path):
    folder = maya_world(tmp_path, music_event(1, local(NEW_YORK, 2026, 1, 16, 7, 0)))
    late = campaign(run_cli, folder, now="2026-01-16T03:00:00Z")  # 10pm EST the evening before
    assert maya_skip(late)["code"] == "no_event_in_send_window"
    early = maya_message(campaign(run_cli, folder, now="2026-01-16T01:00:00Z"))  # 8pm EST
    assert (early["send_after"], early["send_before"]) == ("2026-01-16T01:00:00.000Z", "2026-01-16T02:00:00.000Z")


def test_the_window_is_judged_in_the_recipients_own_zone(run_cli, world_folder, monkeypatch):
    monkeypatch.setattr(rtt.MemberWalk, "recipient_zone", lambda self, user: LOS_ANGELES)
    message = maya_message(campaign(run_cli, world_folder))
    assert message["recipient_timezone"] == "America/Los_Angeles"
    assert message["send_after"] == "2026-01-15T16:00:00.000Z"  # 8am PST
    assert message["send_before"] == "2026-01-18T05:00:00.000Z"  # 9pm PST Saturday
    assert "Sun 11am" in message["message_text"]  # the event's own time stays in the campaign's zone


# --- the Claude path: an event without a window is never offered ---------------------------------------------


def soon_wine(hours: float) -> dict[str, Any]:
    """An event Priya (wine; West Village) would love, ``hours`` after the Claude world's now (11am EDT)."""
    event = event_doc("ev-soon", "Natural Wine Social", ["WINE"], ["wine-tasting"], "west-village", 0, 15, 10, 9)
    event["startDate"] = (datetime(2026, 3, 10, 15, 0, tzinfo=UTC) + timedelta(hours=hours)).strftime(
        "%Y-%m-%dT%H:%M:%S.000Z")
    return event


@pytest.mark.parametrize(("lead", "seen"), [("0", True), ("3", False)])
def test_claude_is_never_offered_an_event_without_a_send_window(tmp_path, lead, seen):
    from fake_anthropic import FakeMessagesAPI

    folder = write_claude_world(tmp_path / "export", [soon_wine(2)])
    with FakeMessagesAPI(default=smart) as fake:
        run = claude_cli(fake, folder, tmp_path / "out", "--min-lead-hours", lead)
        offers = [event_id for r in fake.requests if is_matching_request(r) for event_id, _ in offered(r)]
        writes = [prompt_of(r) for r in writing_requests(fake)]
    assert ("ev-soon" in offers) is seen
    assert ("ev-soon" in {m["event_id"] for m in run.messages}) is seen
    assert any("ev-soon" in text for text in writes) is seen
