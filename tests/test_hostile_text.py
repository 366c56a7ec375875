"""Hostile text on its way to a phone: links, controls and Unicode tricks in event names and in
Claude's texts, implausible facts, unclean event ids, contact details in names and in prompts, and
the template writer's speed on long names.

Every person, address and number here is fictional (``example`` domains, ``555`` numbers).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
import unicodedata
from typing import Any

import pytest
from builders import JAZZ_BRUNCH, MAYA, NOW, NOW_ISO, small_world, write_folder
from fake_anthropic import FakeMessagesAPI
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_claude import MEMBERS, claude_cli, event_doc, facts_of, is_matching, prompt_of, smart, write_world
from test_cli import assert_messages_keep_the_contract
from test_sms import FACTS, GOOD, LINK

import return_to_table as rtt

# --- an oracle of our own: how a phone may read a text ---------------------------------------------

INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u200f", "\u061c",
             "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]
CONTROLS = [*(chr(c) for c in range(0x20)), "\x7f", *(chr(c) for c in range(0x80, 0xA0)), "\x1b[31m", "\x1b]8;;",
            "\u2028", "\u2029", *INVISIBLE]
DOTS = [".", "\uff0e", "\u3002", "\uff61", "\ufe52", "\u2024"]  # each reads as a dot (NFKC, or IDNA's full stops)
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def as_a_phone_reads(text: str) -> str:
    """NFKC, the ideographic full stop as a dot, nothing invisible: independent of the code under test."""
    text = unicodedata.normalize("NFKC", text).replace("\u3002", ".")
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "CM")


def full_width(text: str) -> str:
    return "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)


def math_bold(text: str) -> str:
    """Mathematical bold letters: NFKC reads them as plain ASCII."""
    return "".join(chr(0x1D41A + ord(ch) - ord("a")) if "a" <= ch <= "z" else ch for ch in text)


LABELS = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10).filter(
    lambda label: label.strip("-"))
TLDS = st.one_of(st.sampled_from(["ru", "dev", "example", "io", "co", "zip", "mov", "xyz", "рф", "укр", "xn--p1ai"]),
                 st.text("abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=8))


@st.composite
def disguised_domains(draw: Any) -> tuple[str, str]:
    """(a domain as written, its plain form): a letter-only TLD, spelled with a Unicode trick or not."""
    labels = draw(st.lists(LABELS, min_size=1, max_size=3))
    plain = ".".join([*labels, draw(TLDS)])
    trick = draw(st.sampled_from(["none", "full-width", "math-bold", "dots", "invisible"]))
    if trick == "full-width":
        return full_width(plain), plain
    if trick == "math-bold":
        return math_bold(plain), plain
    if trick == "dots":
        return plain.replace(".", draw(st.sampled_from(DOTS))), plain
    if trick == "invisible":
        at = draw(st.integers(0, len(plain)))
        return plain[:at] + draw(st.sampled_from(INVISIBLE)) + plain[at:], plain
    return plain, plain


PHONES = st.builds(lambda digits, sep: sep.join([digits[:3], digits[3:6], digits[6:]]),
                   st.text("0123456789", min_size=7, max_size=11), st.sampled_from(["", " ", "-", ".", ") "]))
EMAILS = st.builds(lambda user, host: f"{user}@{host}.example", LABELS, LABELS)
HAZARDS = st.one_of(disguised_domains().map(lambda pair: pair[0]), PHONES, EMAILS,
                    st.builds(lambda d: "https://" + d[0], disguised_domains()),
                    st.builds(lambda d: "www." + d[0], disguised_domains()))
WORDS = st.lists(st.sampled_from(["Jazz", "Brunch", "Supper", "Club", "Wine", "Night", "Tasting", "Live",
                                  "Rooftop", "Karaoke", "at", "with", "&", "-", "for", "the"]), max_size=6)


def is_clean(text: str, facts: rtt.MessageFacts) -> bool:
    """Nothing in ``text`` a phone could tap but the link, and nothing invisible (our oracle)."""
    read = as_a_phone_reads(text).replace(facts.link, " ")
    domain = re.search(r"[^\W_][\w-]*[.][^\W\d_]{2,}", read)
    phone = re.search(r"\d(?:[\s().-]{0,3}\d){6,}", read)
    return not (domain or phone or EMAIL.search(read) or "://" in read or rtt.hidden_characters(text))


# --- the property: nothing hostile survives into a valid SMS ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(before=WORDS, hazard=st.one_of(HAZARDS, st.sampled_from(CONTROLS)), after=WORDS,
       glue=st.sampled_from([" ", "", ": ", " (", " @ "]))
def test_hostile_text_in_an_event_name_never_reaches_a_valid_sms(before, hazard, after, glue):
    name = " ".join(before) + glue + hazard + " " + " ".join(after)
    facts = dataclasses.replace(FACTS, event_name=name)
    text = rtt.write_template_sms(facts)
    if text is not None:
        assert rtt.validate_sms(text, facts) == []
        assert is_clean(text, facts), text


@settings(max_examples=300, deadline=None)
@given(hazard=st.one_of(HAZARDS, st.sampled_from(CONTROLS)), at=st.integers(0, len(GOOD) - len(LINK)),
       glue=st.sampled_from([" ", "", ". ", ":", "\u00a0"]))
@example(hazard="4.ru", at=68, glue="")  # a top-level domain running into a digit: "4.ru6 going"
@example(hazard="a.ru", at=97, glue="")  # a domain glued to the link: "a.ruhttps://..." matched as one scheme
def test_hostile_text_in_a_claude_message_is_refused(hazard, at, glue):
    text = GOOD[:at] + glue + hazard + glue + GOOD[at:]
    assert rtt.validate_sms(text, FACTS) != []


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200), hazard=HAZARDS, at=st.integers(0, 200))
def test_any_text_that_passes_the_contract_is_clean(text, hazard, at):
    candidate = (text[:at] + " " + hazard + " " + text[at:] + " " + LINK).strip()
    if rtt.validate_sms(candidate, FACTS) == []:
        assert is_clean(candidate, FACTS)


# --- the contract: any top-level domain, any spelling -------------------------------------------------------


@pytest.mark.parametrize("domain", [
    "evil-login.ru", "cuculi.dev", "x.example", "pay.zip", "login.cuculi.events.example", "пример.рф",
    "evil.xn--p1ai", "ｅｖｉｌ．ｒｕ", "evil\uff0eru", "evil\u3002ru", math_bold("evil") + ".ru", "EVIL.RU",
    "a-b_c.co", "..evil.ru", "evil.ru.5",
])
def test_a_bare_domain_with_any_letter_tld_is_a_second_link(domain):
    problems = " | ".join(rtt.validate_sms(GOOD.replace("Welcome back.", f"Welcome back. See {domain} now."), FACTS))
    assert "exactly one link" in problems


@pytest.mark.parametrize("phrase", [
    "near St. Marks", "yes. Come along", "e.g. jazz", "U.S.A. style", "a.m. coffee",
    "Wine...Tasting", "good-old fans", "it's on. Come",
])
def test_ordinary_text_with_dots_still_passes(phrase):
    roomy = GOOD.replace("RSVP: ", "").replace("is one for music fans", "for music fans")
    assert rtt.validate_sms(roomy.replace("Welcome back.", f"Welcome back, {phrase}."), FACTS) == []


@pytest.mark.parametrize("glued", ["Mr.Smith", "back.See", "ok.Go"])
def test_letters_on_both_sides_of_a_dot_count_as_a_domain(glued):
    # The documented choice: a phone may link any label.label, so a missing space after a full stop fails.
    assert "exactly one link" in " | ".join(rtt.validate_sms(GOOD.replace("Welcome back.", f"Welcome {glued}."),
                                                             FACTS))


@pytest.mark.parametrize("control", ["\x00", "\x07", "\t", "\n", "\r", "\x1b[31m", "\x7f", "\x85", "\x9b",
                                     "\u200b", "\u200d", "\ufeff", "\u00ad", "\u202e", "\u2066", "\u2069",
                                     "\u2028"])
def test_control_and_invisible_characters_are_refused(control):
    problems = rtt.validate_sms(GOOD.replace("Welcome back.", f"Welcome{control} back."), FACTS)
    assert any(p.startswith("no control or invisible characters") for p in problems), problems


@pytest.mark.parametrize("number", ["555-867-5309", "+1 (555) 010-0199", "555 010 0199", "5550100199"])
def test_a_phone_number_in_a_message_is_refused(number):
    problems = rtt.validate_sms(GOOD.replace("Welcome back.", f"Welcome back, call {number}."), FACTS)
    assert "no phone numbers: only the event link may be tappable" in problems


@pytest.mark.parametrize("event_id", ["ev jazz", "ev/jazz", "../jazz", "ev?x=1", "ev#top", "ev%2F", "x" * 65])
def test_a_message_for_an_unclean_event_id_is_refused(event_id):
    facts = dataclasses.replace(FACTS, event_id=event_id)
    text = GOOD.replace(LINK, facts.link)
    assert "the event id does not make a clean link" in rtt.validate_sms(text, facts)


# --- the phone-safe name of an event -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "safe"), [
    ("Jazz Brunch at evil-login.ru", "Jazz Brunch"),
    ("Jazz Brunch @ cuculi.dev", "Jazz Brunch"),
    ("Jazz Brunch (see x.example)", "Jazz Brunch"),
    ("Jazz Brunch, tickets at ｅｖｉｌ．ｒｕ", "Jazz Brunch"),
    ("Jazz Brunch - evil\u200b.ru", "Jazz Brunch"),
    ("Jazz\u200b Brunch\u202e at www.example.org", "Jazz Brunch"),
    ("Supper Club: call 555-867-5309", "Supper Club"),
    ("Supper Club, host@example.com", "Supper Club"),
    ("  Jazz   Brunch  ", "Jazz Brunch"),
    ("St. Marks Supper", "St. Marks Supper"),
    ("Wine...Tasting at 8.30", "Wine...Tasting at 8.30"),
])
def test_a_name_is_cut_before_its_first_link_at_a_word_boundary(name, safe):
    assert rtt.phone_safe_name(name) == safe


@pytest.mark.parametrize("name", ["evil-login.ru", "www.example.org Brunch", "Visit jazzbrunch.com for the Jazz Brunch",
                                  "555 867 5309 Dinner", "host@example.com", "\u200b\u202e", "Mr.Smith's Dinner"])
def test_a_name_with_nothing_before_its_link_is_left_empty(name):
    assert rtt.phone_safe_name(name) == ""


def test_facts_and_template_use_the_phone_safe_name():
    user = {"_id": "m1", "firstName": "Maya"}
    event = {"_id": "6600000000000000000000f1", "name": "Jazz Brunch at evil-login.ru",
             "startDate": "2026-01-17T16:00:00.000Z", "remaining_spots": 4, "participantCount": 6}
    match = rtt.build_match(user, event, reasoning="", confidence=80, interests=["music"], matcher="rules", now=NOW)
    facts = rtt.message_facts(match, rtt.ZoneInfo("America/New_York"), NOW)
    assert facts.event_name == "Jazz Brunch"
    text = rtt.write_template_sms(dataclasses.replace(facts, event_name=event["name"]))
    assert "Jazz Brunch" in text and "evil" not in text


@pytest.mark.parametrize(("name", "issue"), [
    ("evil-login.ru", "events_named_only_by_links"),
    ("Visit ｗｗｗ．example．org", "events_named_only_by_links"),
])
def test_an_event_named_only_by_a_link_is_never_offered_and_counted(name, issue):
    raw = {"_id": "ev1", "name": name, "startDate": NOW.replace(day=20), "type": "public", "active": True}
    issues = rtt.DataIssues()
    assert rtt.find_future_events([raw], NOW, issues) == []
    assert issues.as_dict() == {issue: 1}


# --- end to end: a host's event with a domain in its name --------------------------------------------------------


def test_a_hosts_event_named_with_a_domain_gets_a_message_without_it(run_cli, tmp_path, world):
    users, events = world
    next(e for e in events if e["_id"] == JAZZ_BRUNCH)["name"] = "Jazz Brunch at evil-login.ru"
    run = run_cli("--source", str(write_folder(tmp_path / "export", users, events)), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    [jazz] = [m for m in run.messages if m["event_id"] == str(JAZZ_BRUNCH)]
    assert "Jazz Brunch" in jazz["message_text"] and "evil" not in jazz["message_text"].lower()
    assert_messages_keep_the_contract(run, NOW)


def test_claude_is_given_the_phone_safe_name_and_its_message_keeps_it(tmp_path):
    extra = [event_doc("ev-jazz-x", "Live Jazz Session at evil-login.ru", ["MUSIC"], ["jazz", "live-music"],
                       "williamsburg", 2, 23, 12, 9)]
    folder = write_world(tmp_path / "export", extra)
    with FakeMessagesAPI(default=smart) as fake:
        run = claude_cli(fake, folder, tmp_path / "out")
        writes = [r for r in fake.requests if not is_matching(r)]
    named = [facts_of(r)["event_name"] for r in writes]
    assert "Live Jazz Session" in named
    assert all("evil" not in name for name in named)
    for message in run.messages:
        assert "evil" not in message["message_text"].lower()


# --- contact details beyond links: IP hosts, dialer schemes, vanity numbers (one detector) ---------------------------

IP_HOSTS = ["10.0.0.1", "10.0.0.1:8080/x", "192.168.1.20/admin", "[::1]", "[::1]:80", "[2001:db8::1]:8080/x",
            "fe80::1", "2001:db8:0:0:0:0:0:1", "\uff11\uff10.0.0.1"]
SCHEMES = ["mailto:host", "tel:5550100", "TEL:+15550100", "sms:+1555", "smsto:555", "facetime:x", "callto:evil"]
VANITY = ["1-800-EVIL-NOW", "1-800-ABC-DEFG", "1 800 EVIL NOW", "+1 212 EVIL NOW", "800-Flowers", "1800flowers",
          "(212) EVIL-NOW", "212-EV1L-N0W", "1-800-evil-now", "855.GOT.JUNK"]
CONTACT_DETAILS = [*IP_HOSTS, *SCHEMES, *VANITY]
# Ordinary event names a phone does not make tappable: times, dates, ages, prices, counts, addresses.
ORDINARY_NAMES = ["Brunch 2 Go", "Wine 7:30pm", "21+ Night", "$25 Tasting", "Tickets $25-$40", "Dec 12 2026",
                  "2026-12-19 Gala", "Dinner 12.25.2026", "12/25/2026 Supper", "1990-2010 Hits", "Studio 54",
                  "1990s Disco", "10am-2pm Brunch", "Salsa 8pm-11pm", "Fri 12:00pm-3:00pm", "9-5 Happy Hour",
                  "Top 100 Wines", "B2B Mixer", "COVID-19 Fundraiser", "4th of July BBQ", "2-for-1 Tacos",
                  "Catch-22 Book Club", "Class of 2010 Reunion", "2026 NYC WINE FEST", "TOP 500 WINES OF 2026",
                  "200-Year-Old Tavern Dinner", "Dinner at 888 Broadway", "550 Madison Ave Supper", "1999 WINE NIGHT",
                  "Ages 21-35 Mixer", "Mile 26.2 Party", "Wine 3.5 ABV", "v1.2.3 launch", "Psalm [3:16] Study",
                  "Jazz :: Night", "Tel: Aviv Night", "Room 101 Dinner"]


@pytest.mark.parametrize("detail", CONTACT_DETAILS)
def test_every_kind_of_contact_detail_is_found_by_the_one_detector(detail):
    kinds = rtt.contact_kinds(rtt.phone_view(f"Jazz {detail} night"))
    assert kinds and set(kinds) <= {"ip", "scheme", "vanity", "phone"}, kinds
    assert rtt.holds_contact(f"Maya {detail}") and rtt.greeting_name(f"{detail}") is None
    assert as_a_phone_reads(detail) not in rtt.without_contacts(f"occupation: chef {detail} here")


@pytest.mark.parametrize("detail", CONTACT_DETAILS)
def test_an_event_name_is_cut_before_an_ip_host_scheme_or_vanity_number(detail):
    assert rtt.phone_safe_name(f"Jazz Brunch {detail}") == "Jazz Brunch"
    assert rtt.phone_safe_name(f"{detail} Brunch") == ""


@pytest.mark.parametrize("detail", CONTACT_DETAILS)
def test_claudes_text_holding_an_ip_host_scheme_or_vanity_number_is_refused(detail):
    problems = rtt.validate_sms(GOOD.replace("Welcome back.", f"Welcome back, {detail}."), FACTS)
    tappable = ("only the event link may be tappable", "must contain exactly one link")  # "855.GOT" reads as a domain
    assert any(fragment in p for p in problems for fragment in tappable), problems


@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_an_ordinary_event_name_is_no_contact_detail(name):
    assert rtt.contact_kinds(rtt.phone_view(name)) == []
    assert rtt.phone_safe_name(name) == name
    assert not rtt.holds_contact(name) and rtt.without_contacts(name) == name


@pytest.mark.parametrize("name", ["Jazz Brunch 10.0.0.1:8080/x", "Jazz Brunch 1-800-EVIL-NOW", "Jazz Brunch tel:5550100"])
def test_a_hosts_event_named_with_a_host_or_vanity_number_gets_a_message_without_it(run_cli, tmp_path, world, name):
    users, events = world
    next(e for e in events if e["_id"] == JAZZ_BRUNCH)["name"] = name
    run = run_cli("--source", str(write_folder(tmp_path / "export", users, events)), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    [jazz] = [m for m in run.messages if m["event_id"] == str(JAZZ_BRUNCH)]
    text = jazz["message_text"]
    assert "Jazz Brunch" in text and not any(part in text for part in ("10.0", "8080", "EVIL", "800", "tel:"))
    assert_messages_keep_the_contract(run, NOW)


@pytest.mark.parametrize("twice", ["Hi Maya! Welcome back. Hi Maya!", "Hi Maya! Welcome back. Hey Maya."])
def test_a_text_that_greets_twice_is_refused(twice):
    assert rtt.validate_sms(GOOD.replace("Hi Maya! Welcome back.", twice), FACTS) == ["greet the member once"]


@pytest.mark.parametrize("name", ["Hi-Fi Listening Party", "Say Hello Supper", "Hey Jude Night"])
def test_a_greeting_word_in_the_event_name_is_no_second_greeting(name):
    facts = dataclasses.replace(FACTS, event_name=name)
    text = rtt.write_template_sms(facts)
    assert text is not None and name in text and rtt.validate_sms(text, facts) == []


def test_the_question_marks_of_the_sender_and_opt_out_text_count_toward_the_one_allowed():
    facts = dataclasses.replace(FACTS, sender="Cuculi?", opt_out_text="Reply STOP to opt out")
    text = f"Cuculi? Hi Maya! Welcome back. Jazz Brunch (music) Sat 11am. Join us? Reply STOP to opt out. {LINK}"
    assert "at most one question mark" in rtt.validate_sms(text, facts)
    assert rtt.validate_sms(text.replace("Join us? ", ""), facts) == []


# --- implausible facts and unclean ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [10 ** 40, 10_001, 1e30, float(2 ** 63)])
def test_an_absurd_capacity_is_unknown(capacity):
    metrics = rtt.event_metrics({"participants": ["a", "b"], "maxParticipants": capacity})
    assert metrics == {"participantCount": 2, "participationPercentage": 0.0, "remaining_spots": None}


def test_the_plausible_bound_itself_is_a_capacity():
    assert rtt.event_metrics({"participants": ["a"], "maxParticipants": rtt.MAX_PLAUSIBLE_COUNT})["remaining_spots"] \
        == rtt.MAX_PLAUSIBLE_COUNT - 1


def test_more_participants_than_plausible_make_the_count_unknown():
    metrics = rtt.event_metrics({"participants": [f"p{i}" for i in range(10_001)], "maxParticipants": 20})
    assert metrics == {"participantCount": None, "participationPercentage": 0.0, "remaining_spots": None}
    event = {"name": "Jazz Brunch", **metrics}
    assert "Participants: unknown." in rtt.event_summary(event)


@pytest.mark.parametrize("capacity", [10 ** 40, 10_001])
def test_absurd_capacities_are_never_claimed_end_to_end(run_cli, tmp_path, world, capacity):
    users, events = world
    for event in events:
        event["maxParticipants"] = capacity
    run = run_cli("--source", str(write_folder(tmp_path / "export", users, events)), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    assert run.messages
    for message in run.messages:
        assert not re.search(r"\d+ (?:spots? )?left", message["message_text"]), message["message_text"]
        assert str(capacity) not in message["message_text"]
    for event in run.load("data/processed/future_events.json"):
        assert event["remaining_spots"] is None and "Capacity" not in event["summary"]


def test_a_claude_prompt_says_capacity_unknown_for_an_absurd_capacity(tmp_path):
    extra = [event_doc("ev-huge", "Wine Garden Party", ["WINE"], ["wine-tasting"], "west-village", 2, 23, 10 ** 40, 3)]
    with FakeMessagesAPI(default=smart) as fake:
        claude_cli(fake, write_world(tmp_path / "export", extra), tmp_path / "out")
        prompts = [prompt_of(r) for r in fake.requests]
    lines = [line for p in prompts for line in p.split("\n") if line.startswith("- id=ev-huge ")]
    assert lines and all("capacity unknown" in line for line in lines)
    assert str(10 ** 40) not in "".join(prompts)


UNCLEAN_IDS = ["ev jazz", "ev/jazz", "..", "../../x", "ev?x=1", "ev#top", "ev%2Fx", "ev.jazz", "évent", "x" * 65]


@pytest.mark.parametrize("event_id", UNCLEAN_IDS)
def test_an_event_with_an_unclean_id_is_never_offered(event_id):
    raw = {"_id": event_id, "name": "Jazz Brunch", "startDate": NOW.replace(day=20), "type": "public",
           "active": True}
    issues = rtt.DataIssues()
    assert rtt.find_future_events([raw], NOW, issues) == []
    assert issues.as_dict() == {"events_with_unclean_ids": 1}


def test_unclean_ids_are_never_offered_end_to_end_and_counted(tmp_path):
    extra = [event_doc(event_id, f"Wine Evening {i}", ["WINE"], ["wine-tasting"], "west-village", 2, 23, 10, 8)
             for i, event_id in enumerate(UNCLEAN_IDS)]
    with FakeMessagesAPI(default=smart) as fake:
        run = claude_cli(fake, write_world(tmp_path / "export", extra), tmp_path / "out")
        offered = [line for r in fake.requests if is_matching(r) for line in prompt_of(r).split("\n")]
    assert not any(f"id={event_id} " in line for line in offered for event_id in UNCLEAN_IDS)
    assert {m["event_id"] for m in run.matches}.isdisjoint(UNCLEAN_IDS)
    assert run.report()["data_issues"]["events_with_unclean_ids"] == len(UNCLEAN_IDS)
    assert "events with unclean ids" in run.report_path(".md").read_text(encoding="utf-8")


# --- names are text, not contact details ------------------------------------------------------------------------------

CONTACT_NAMES = ["maya.rivera@example.com", "ｍａｙａ＠ｅｘａｍｐｌｅ．ｃｏｍ", "+1 (555) 010-0101", "555.010.0101",
                 "Maya 5550100101", "Maya maya@example.org"]


@pytest.mark.parametrize("value", CONTACT_NAMES)
def test_a_first_name_holding_contact_details_is_not_greeted(value):
    assert rtt.greeting_name(value) is None


@pytest.mark.parametrize("value", CONTACT_NAMES)
def test_names_holding_contact_details_are_missing_from_summaries_and_the_dashboard(value):
    user = {"_id": "m1", "firstName": value, "lastName": "Rivera", "summary": "", "occupation": "Chef"}
    assert rtt.full_name(user) == "Rivera"
    assert rtt.user_summary(user).startswith("Rivera is a Chef")
    assert rtt.dashboard_user(user)["name"] == "Rivera"
    assert rtt.full_name({**user, "lastName": value}) == "A member"


@pytest.mark.parametrize("first", ["maya.rivera@example.com", "+1 (555) 010-0101"])
def test_a_member_named_by_contact_details_is_greeted_hi_there_and_never_printed(run_cli, tmp_path, world, first):
    users, events = world
    maya = next(u for u in users if u["_id"] == MAYA)
    maya["firstName"], maya["lastName"] = first, "555-010-0199"
    run = run_cli("--source", str(write_folder(tmp_path / "export", users, events)), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    [message] = [m for m in run.messages if m["user_id"] == str(MAYA)]
    assert message["message_text"].startswith("Hi there! ")
    assert message["user_name"] == "A member"
    logs = [p.read_text(encoding="utf-8") for p in (run.root / "logs").glob("*.log")]
    info = [line for log in logs for line in log.splitlines() if " - INFO - " in line]
    for shown in [run.out, run.err, *info]:
        assert first not in shown and "555-010-0199" not in shown
    assert f"#2 A member ({MAYA})" in run.out and "Step 5: A member -> " in run.out


def test_no_prompt_carries_an_email_or_phone_number_from_any_field(tmp_path):
    folder = write_world(tmp_path / "export")
    users = json.loads((folder / "users.json").read_text(encoding="utf-8"))
    planted = {
        "firstName": "priya.q@example.net",
        "occupation": "Architect, call 555-867-5309 or mail work@studio.example",
        "homeNeighborhood": "west-village (text +1 (555) 010-0199)",
        "interests": ["wine", "food", "ping me@example.org"],
    }
    for user in users:
        if user["_id"] in (MEMBERS[0]["_id"], MEMBERS[1]["_id"]):
            user.update(copy.deepcopy(planted))
        else:
            user["occupation"] = "Nurse ｎｕｒｓｅ＠ｅｘａｍｐｌｅ．ｃｏｍ ５５５ ８６７ ５３０９"
    (folder / "users.json").write_text(json.dumps(users), encoding="utf-8")
    with FakeMessagesAPI(default=smart) as fake:
        run = claude_cli(fake, folder, tmp_path / "out")
        requests = list(fake.requests)
    assert requests and run.messages
    for request in requests:
        sent = as_a_phone_reads(request.all_text())
        assert not EMAIL.search(sent), EMAIL.search(sent)
        digits = re.sub(r"\D", "", sent)
        for number in ("5558675309", "5550100199"):
            assert number not in digits
    matching_prompts = [prompt_of(r) for r in requests if is_matching(r)]  # members run concurrently: any order
    assert any("occupation: Architect, call or mail" in prompt for prompt in matching_prompts)


PLAIN_TEXT = st.text(st.characters(blacklist_categories=("Nd", "No", "Nl", "Cs"), blacklist_characters="@＠﹫"),
                     max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=PLAIN_TEXT, contact=st.one_of(EMAILS, PHONES, EMAILS.map(full_width), PHONES.map(full_width)),
       at=st.integers(0, 60), field=st.sampled_from(["occupation", "homeNeighborhood", "firstName"]))
def test_member_block_and_facts_prompt_blank_any_contact_detail(text, contact, at, field):
    user = {"_id": "m1", "firstName": "Maya", "interests": ["music"], "days_inactive": 40, "eventCount": 3,
            "last_event_date": "2025-12-01T00:00:00.000Z", field: text[:at] + " " + contact + " " + text[at:]}
    facts = dataclasses.replace(FACTS, first_name=rtt.greeting_name(user["firstName"]))
    for prompt in (rtt.member_block(user), rtt.facts_prompt(facts, user)):
        read = as_a_phone_reads(prompt).replace(LINK, " ")
        assert not EMAIL.search(read)
        assert as_a_phone_reads(contact) not in read


# --- the template writer is linear in the name's length ------------------------------------------------------------------


def long_name(length: int, seed: str) -> str:
    words = (f"Natural Wine Tasting with Orange Pours from Finger Lakes {seed} ") * (length // 50 + 1)
    return words[:length]


@pytest.mark.parametrize("length", [100, 1_000, 10_000])
def test_the_template_writes_for_a_long_name_in_well_under_half_a_second(length):
    facts = dataclasses.replace(FACTS, event_name=long_name(length, f"t{length}"))
    start = time.perf_counter()
    text = rtt.write_template_sms(facts)
    assert time.perf_counter() - start < 0.5
    assert text is not None and rtt.validate_sms(text, facts) == []
    assert "Natural Wine Tasting" in text


def test_a_long_name_in_a_claude_answer_is_validated_quickly():
    facts = dataclasses.replace(FACTS, event_name=long_name(10_000, "claude"))
    answer = "Hi Maya! Welcome back, " + "Natural Wine Tasting " * 300 + LINK
    start = time.perf_counter()
    assert rtt.validate_sms(answer, facts) != []
    assert time.perf_counter() - start < 0.5


def test_shortened_names_within_a_length_are_the_same_cuts():
    name = long_name(400, "cuts")
    bounded = rtt.shortened_names(name, max_len=120)
    assert bounded == [cut for cut in rtt.shortened_names(name) if len(cut) <= 120]


def test_long_names_keep_their_sms_path_for_every_member(run_cli, tmp_path):
    users, events = small_world()
    next(e for e in events if e["_id"] == JAZZ_BRUNCH)["name"] = long_name(10_000, "e2e")
    start = time.perf_counter()
    run = run_cli("--source", str(write_folder(tmp_path / "export", users, events)), "--now", NOW_ISO, "--dry-run")
    assert run.code == 0, run.err
    assert time.perf_counter() - start < 10
    assert_messages_keep_the_contract(run, NOW)


def test_phone_view_reads_every_trick_as_plain_text():
    assert rtt.phone_view("ｅｖｉｌ．ｒｕ") == rtt.phone_view("evil\u200b.ru") == rtt.phone_view("evil。ru") == "evil.ru"
    assert rtt.phone_view(math_bold("evil") + "\u202e.ru") == "evil.ru"
