"""Step 6: the SMS contract (``validate_sms``) and the template writer (``write_template_sms``)."""

from __future__ import annotations

import dataclasses
import json
import re
import string
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from builders import NOW
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from return_to_table import (
    GSM7_LIMIT,
    INTEREST_SYNONYMS,
    OPTIONAL_FACTS,
    UCS2_LIMIT,
    MessageFacts,
    SmsSize,
    build_match,
    facts_prompt,
    greeting_name,
    interest_label,
    local_when,
    message_facts,
    optional_facts_said,
    shortened_names,
    sms_size,
    template_notes,
    validate_sms,
    without_sender_parts,
    write_template_sms,
)

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
PHONE = re.compile(r"\+?1?[\s().-]*555[\s().-]*555[\s().-]*\d{4}")

NEW_YORK = ZoneInfo("America/New_York")
EVENT_ID = "6600000000000000000000f1"
LINK = f"https://cuculi.net/events/{EVENT_ID}"
FACTS = MessageFacts(first_name="Maya", event_id=EVENT_ID, event_name="Jazz Brunch", interests=("music",),
                     when="Sat 11am", spots_left=4, going=6, neighbourhood="hells-kitchen")
GOOD = f"Hi Maya! Welcome back. Jazz Brunch is one for music fans: Sat 11am. 6 going, 4 spots left. RSVP: {LINK}"


def padded(text: str, units: int) -> str:
    """``text`` with spaces added before the link until it is ``units`` long in its encoding."""
    missing = units - sms_size(text).units
    assert missing >= 0
    return text.replace(" " + LINK, " " * (missing + 1) + LINK)


def problems_of(text: str, facts: MessageFacts = FACTS) -> str:
    return " | ".join(validate_sms(text, facts))


# --- the validator ------------------------------------------------------------------------------------


def test_well_formed_message_passes():
    assert validate_sms(GOOD, FACTS) == []


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_message_is_rejected(text):
    assert validate_sms(text, FACTS) == ["message is empty"]


def test_message_must_end_with_the_event_link():
    assert "must end with exactly " + LINK in problems_of(GOOD + " See you there.")


def test_link_first_is_rejected():
    text = LINK + " " + GOOD.removesuffix(" RSVP: " + LINK)
    assert "must end with exactly" in problems_of(text)


def test_link_to_another_event_is_rejected():
    assert "must end with exactly" in problems_of(GOOD.replace(EVENT_ID, "6600000000000000000000f2"))


@pytest.mark.parametrize("extra", ["menu at https://example.com/menu", "menu at www.example.com",
                                   "see https://cuculi.net/events/6600000000000000000000f2"])
def test_second_link_is_rejected(extra):
    assert "exactly one link" in problems_of(GOOD.replace("RSVP:", f"{extra}. RSVP:"))


def test_160_gsm7_characters_fit_and_161_do_not():
    assert validate_sms(padded(GOOD, GSM7_LIMIT), FACTS) == []
    assert sms_size(padded(GOOD, GSM7_LIMIT)) == SmsSize("GSM-7", 160, 1)
    assert "161 GSM-7 characters; at most 160 allowed" in problems_of(padded(GOOD, GSM7_LIMIT + 1))


def test_gsm7_accented_letters_stay_gsm7():
    assert sms_size("Hi Renée, José, Jürgen, Søren! Ça va?").encoding == "GSM-7"


def test_name_outside_gsm7_makes_the_limit_134_ucs2_units():
    facts = dataclasses.replace(FACTS, first_name="Zoë")
    text = f"Hi Zoë! Welcome back. Jazz Brunch for music fans: Sat 11am. 6 going, 4 spots left. {LINK}"
    assert sms_size(text).encoding == "UCS-2"
    assert validate_sms(padded(text, UCS2_LIMIT), facts) == []
    assert "135 UCS-2 characters; at most 134 allowed" in problems_of(padded(text, UCS2_LIMIT + 1), facts)


def test_emoji_counts_two_ucs2_units():
    assert sms_size("Hi 😀").units == 5


@pytest.mark.parametrize("characters", ["€", "[]", "{}", "~^|\\"])
def test_gsm7_extension_characters_count_double(characters):
    assert sms_size(characters) == SmsSize("GSM-7", 2 * len(characters), 1)


def test_extension_characters_count_double_against_the_limit():
    text = GOOD.replace("for music fans", "for [music] fans")
    assert validate_sms(padded(text, GSM7_LIMIT), FACTS) == []
    assert len(padded(text, GSM7_LIMIT)) == GSM7_LIMIT - 2
    assert "161 GSM-7 characters" in problems_of(padded(text, GSM7_LIMIT + 1))


@pytest.mark.parametrize(("broken", "problem"), [
    (GOOD.replace("Hi Maya!", "Hi there!"), "must greet the member by first name (Maya)"),
    (GOOD.replace("Hi Maya! ", "").replace("RSVP:", "Maya, RSVP:"), "must greet the member by first name"),
    (GOOD.replace("Welcome back.", "We miss you."), 'must say "welcome back"'),
    (GOOD.replace("Jazz Brunch", "This brunch"), "must name the event (Jazz Brunch)"),
    (GOOD.replace("is one for music fans", "is a good one"), "must mention an interest the event matches (music)"),
    (GOOD.replace("Sat 11am", "this weekend"), "must give the local day and time as 'Sat 11am'"),
    (GOOD.replace("Sat 11am", "Sat 16:00 UTC"), "must give the local day and time as 'Sat 11am'"),
    (GOOD.replace(", 4 spots left", ""), "must say 4 spots left"),
    (GOOD.replace("6 going, ", ""), "must say 6 people are going"),
], ids=["no-name", "name-not-at-the-start", "no-welcome-back", "no-event-name", "no-interest", "no-time",
        "raw-utc-time", "no-spots", "no-social-proof"])
def test_message_missing_a_required_element_is_rejected(broken, problem):
    assert problem in problems_of(broken)


def test_spots_and_social_proof_are_only_required_when_known():
    facts = dataclasses.replace(FACTS, spots_left=None, going=0)
    assert validate_sms(GOOD.replace(" 6 going, 4 spots left.", ""), facts) == []


def test_all_caps_word_is_rejected():
    assert "no ALL-CAPS words (HURRY)" in problems_of(GOOD.replace("Welcome back.", "Welcome back. HURRY."))


@pytest.mark.parametrize("acronym", ["RSVP", "NYC"])
def test_acronyms_are_not_shouting(acronym):
    assert validate_sms(GOOD.replace("fans:", f"fans in {acronym}:"), FACTS) == []


@pytest.mark.parametrize("word", ["NOW", "WOW", "FREE"])
def test_short_capitalised_words_that_are_not_acronyms_are_shouting(word):
    assert f"no ALL-CAPS words ({word})" in problems_of(GOOD.replace("Welcome back.", f"Welcome back. {word}."))


def test_capitals_in_the_event_name_or_first_name_are_not_shouting():
    facts = dataclasses.replace(FACTS, first_name="MAYA", event_name="JAZZ BRUNCH")
    assert validate_sms(GOOD.replace("Maya", "MAYA").replace("Jazz Brunch", "JAZZ BRUNCH"), facts) == []


def test_one_question_mark_is_fine_and_two_are_rejected():
    assert validate_sms(GOOD.replace("Welcome back.", "Welcome back. Ready?"), FACTS) == []
    assert "at most one question mark" in problems_of(GOOD.replace("Welcome back.", "Welcome back? Ready?"))


def test_double_exclamation_mark_is_rejected():
    assert 'no "!!"' in problems_of(GOOD.replace("Hi Maya!", "Hi Maya!!"))


@pytest.mark.parametrize("claim", ["Only 2 seats left.", "20% off tonight.", "Starts at 9pm."])
def test_number_not_among_the_facts_is_rejected(claim):
    assert "numbers not among the facts" in problems_of(GOOD.replace("Welcome back.", f"Welcome back. {claim}"))


def test_numbers_in_the_event_name_are_facts():
    facts = dataclasses.replace(FACTS, event_name="2000s Karaoke for 12")
    assert validate_sms(GOOD.replace("Jazz Brunch", "2000s Karaoke for 12"), facts) == []


def test_digits_inside_a_matched_interest_are_facts():
    # The interest "80s-music" reads "80s music" in a message; its 80 is not an invented number.
    facts = dataclasses.replace(FACTS, interests=("80s-music",))
    assert validate_sms(GOOD.replace("for music fans", "for 80s music fans"), facts) == []


# --- message facts -------------------------------------------------------------------------------------


def test_local_time_is_day_and_clock_in_the_campaign_zone():
    assert local_when(datetime(2026, 1, 18, 0, 30, tzinfo=UTC), NEW_YORK, NOW) == "Sat 7:30pm"


@pytest.mark.parametrize(("start", "when"), [
    (datetime(2026, 1, 17, 5, 0, tzinfo=UTC), "Sat 12am"),
    (datetime(2026, 1, 17, 17, 0, tzinfo=UTC), "Sat 12pm"),
    (datetime(2026, 1, 17, 14, 45, tzinfo=UTC), "Sat 9:45am"),
])
def test_local_time_reads_midnight_noon_and_minutes_naturally(start, when):
    assert local_when(start, NEW_YORK, NOW) == when


def test_local_time_a_week_or_more_away_carries_the_date():
    assert local_when(datetime(2026, 1, 22, 0, 0, tzinfo=UTC), NEW_YORK, NOW) == "Wed Jan 21, 7pm"


@pytest.mark.parametrize(("raw", "name"), [
    ("Maya", "Maya"), ("Zoë", "Zoë"), ("  Mary Ann ", "Mary"), ("Łukasz", "Łukasz"),
    ("Alexandrina-Konstantina-Maria", "Alexandrina"), ("Jae-won", "Jae-won"),
    (None, None), ("", None), ("   ", None), (42, None), ("😀", None), ("Bartholomewbartholomew", None),
])
def test_greeting_name_is_the_first_word_of_the_first_name_unchanged(raw, name):
    assert greeting_name(raw) == name


def test_message_facts_come_from_the_match_in_the_campaign_zone():
    user = {"_id": "m1", "firstName": "Zoë", "lastName": "Okafor"}
    event = {"_id": EVENT_ID, "name": "  Jazz   Brunch ", "startDate": "2026-01-17T16:00:00.000Z",
             "remaining_spots": 4, "participantCount": 6, "neighborhood": "west-village"}
    match = build_match(user, event, reasoning="", confidence=80, interests=["music"], matcher="rules", now=NOW)
    assert message_facts(match, NEW_YORK, NOW) == MessageFacts(
        first_name="Zoë", event_id=EVENT_ID, event_name="Jazz Brunch", interests=("music",), when="Sat 11am",
        spots_left=4, going=6, neighbourhood="west-village")


# --- the template writer ----------------------------------------------------------------------------------


def test_template_writes_a_valid_single_segment_message():
    text = write_template_sms(FACTS)
    assert validate_sms(text, FACTS) == []
    assert text.startswith("Hi Maya! ")
    assert text.endswith(" " + LINK)
    assert sms_size(text) == SmsSize("GSM-7", len(text), 1)


def test_template_keeps_accents_and_respects_the_ucs2_limit():
    facts = dataclasses.replace(FACTS, first_name="Zoë")
    text = write_template_sms(facts)
    assert text.startswith("Hi Zoë! ")
    assert validate_sms(text, facts) == []
    assert sms_size(text).encoding == "UCS-2" and sms_size(text).units <= UCS2_LIMIT


def test_template_without_a_name_greets_everyone():
    facts = dataclasses.replace(FACTS, first_name=None)
    text = write_template_sms(facts)
    assert text.startswith("Hi there! ") and validate_sms(text, facts) == []


def test_template_leaves_out_unknown_spots_and_empty_social_proof():
    facts = dataclasses.replace(FACTS, spots_left=None, going=0)
    text = write_template_sms(facts)
    assert validate_sms(text, facts) == []
    assert not re.search(r"\d+ (going|spots?|left)", text)


def test_template_shortens_a_long_event_name_at_a_word_boundary():
    name = "Natural Wine Tasting: Orange, Pét-Nat & Skin-Contact Pours from Finger Lakes Producers"
    facts = dataclasses.replace(FACTS, event_name=name, when="Sat 7:30pm")
    text = write_template_sms(facts)
    assert validate_sms(text, facts) == []
    assert name not in text
    words = name.split()
    assert any(re.search(re.escape(" ".join(words[:n])) + r"(?![\w-])", text) for n in range(2, len(words)))


def test_template_shortens_a_long_event_name_for_a_twenty_letter_name():
    # A one-segment GSM-7 text exists ("Natural Wine Tasting..." with three dots is 159 characters);
    # the writer must find a wording, not give up.
    facts = MessageFacts(first_name="Alexandrinakonstanti", event_id="ab" * 12,
                         event_name="Natural Wine Tasting with Orange Pours from Finger Lakes Producers Tonight",
                         interests=("photography",), when="Wed Feb 14, 10:30am", spots_left=12, going=18,
                         neighbourhood="hells-kitchen")
    text = write_template_sms(facts)
    assert validate_sms(text, facts) == []


def test_template_falls_back_to_a_shorter_matched_interest():
    # From the Montana data: the first matched interest is a 41-character tag, the second is short.
    facts = MessageFacts(first_name="Logan", event_id="6b00000e000000000dce477d",
                         event_name="Head to the Union Club and Dance to Cash for Junkers tonight!",
                         interests=("swing-dance-lindy-blues-balboa-charleston", "swingdancing"),
                         when="Fri 11:30pm", spots_left=None, going=1, neighbourhood="missoula")
    text = write_template_sms(facts)
    assert validate_sms(text, facts) == []


# --- the template writer under hypothesis -------------------------------------------------------------------

HEX_IDS = st.text("0123456789abcdef", min_size=24, max_size=24)
INTERESTS = sorted(INTEREST_SYNONYMS)
NEIGHBOURHOODS = ["hells-kitchen", "west-village", "lower-east-side", "williamsburg", "long-island-city"]
NAME_LETTERS = string.ascii_letters + "éèàùìòçñüöäåøæßÉÑÜÖÄÅØÆ" + "ëïâêîôûłśźżćńóąęőűšžčřýãõŁŚŻ"
REALISTIC_NAMES = st.text(NAME_LETTERS, min_size=1, max_size=20)
EVENT_WORDS = st.text(string.ascii_letters + string.digits + "éü", min_size=1, max_size=10)
REALISTIC_EVENT_NAMES = st.lists(EVENT_WORDS, min_size=1, max_size=14).map(" ".join).filter(lambda n: len(n) <= 80)
STARTS = st.integers(1, 30 * 48).map(lambda k: NOW + timedelta(minutes=30 * k))
REALISTIC_WHENS = STARTS.map(lambda start: local_when(start, NEW_YORK, NOW))


def valid_template_or_none(facts: MessageFacts) -> str | None:
    """The template's text for ``facts``, checked against the contract, budget and link-last rule."""
    text = write_template_sms(facts)
    if text is not None:
        assert validate_sms(text, facts) == []
        size = sms_size(text)
        assert size.units <= size.limit
        assert text.endswith(facts.link)
    return text


@settings(max_examples=250, deadline=None)
@given(
    first=st.one_of(st.none(), st.text(max_size=40), REALISTIC_NAMES,
                    st.sampled_from(["Zoë", "😀", "Zoë😀", "Łukasz", "Alexandrina-Konstantina-Maria", "x" * 60])),
    event_name=st.one_of(st.text(max_size=200), REALISTIC_EVENT_NAMES,
                         st.text(string.ascii_letters + " ", min_size=100, max_size=300)),
    interests=st.lists(st.one_of(st.sampled_from(INTERESTS), st.text(max_size=30)), max_size=3).map(tuple),
    when=st.one_of(REALISTIC_WHENS, st.text(max_size=25)),
    spots=st.one_of(st.none(), st.integers(0, 500)),
    going=st.integers(0, 500),
    hood=st.one_of(st.none(), st.sampled_from(NEIGHBOURHOODS), st.text(max_size=30)),
    event_id=HEX_IDS,
)
def test_template_returns_a_valid_message_or_none(first, event_name, interests, when, spots, going,
                                                                  hood, event_id):
    facts = MessageFacts(greeting_name(first), event_id, event_name, interests, when, spots, going, hood)
    text = valid_template_or_none(facts)
    if text is None:
        return
    if facts.first_name:
        assert text.startswith((f"Hi {facts.first_name}!", f"{facts.first_name}, welcome back!"))


def tightest_wordings(facts: MessageFacts) -> list[str]:
    """The template's own tightest shape, cutting the event name with a GSM-7 "..." where needed.

    When one of these passes the contract, a message for these facts exists within one segment
    (GSM-7) or 134 UCS-2 units, so the writer has no excuse to give up.
    """
    interest = interest_label(facts.interests[0])
    proof = ", ".join(p for p in (f"{facts.going} going" if facts.going else "",
                                  "" if facts.spots_left is None else f"{facts.spots_left} left") if p)
    texts = []
    for cut in shortened_names(facts.event_name):
        text = (f"Hi {facts.first_name}! Welcome back. {cut.replace('…', '...')} ({interest}) {facts.when}, "
                f"{proof}. {facts.link}")
        texts.append(re.sub(r"\s+", " ", text.replace(", . ", ". ")))
    return texts


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    first=REALISTIC_NAMES,
    event_name=REALISTIC_EVENT_NAMES,
    interests=st.lists(st.sampled_from(INTERESTS), min_size=1, max_size=3, unique=True).map(tuple),
    when=REALISTIC_WHENS,
    spots=st.one_of(st.none(), st.integers(1, 30)),
    going=st.integers(0, 40),
    hood=st.one_of(st.none(), st.sampled_from(NEIGHBOURHOODS)),
    event_id=HEX_IDS,
)
@example(first="Alexandrinakonstanti", event_name="Natural Wine Tasting with Orange Pours from Finger Lakes Producers",
         interests=("photography",), when="Wed Feb 14, 10:30am", spots=12, going=18, hood="hells-kitchen",
         event_id="ab" * 12)
@example(first="Zoë", event_name="Natural Wine Tasting", interests=("wine",), when="Sat 7:30pm", spots=3, going=9,
         hood="west-village", event_id="65e0" + "0" * 20)
def test_template_always_writes_realistic_messages_and_never_strips_accents(first, event_name, interests, when,
                                                                           spots, going, hood, event_id):
    facts = MessageFacts(greeting_name(first), event_id, event_name, interests, when, spots, going, hood)
    assert facts.first_name == first
    assume(any(validate_sms(text, facts) == [] for text in tightest_wordings(facts)))
    text = write_template_sms(facts)
    assert validate_sms(text, facts) == []
    assert text.startswith((f"Hi {first}! ", f"{first}, welcome back! "))
    assert sms_size(text).units <= sms_size(text).limit


@pytest.mark.parametrize("extra", ["Pay at evil.com/pay.", "Write to host@example.com.", "See bit.ly/x."])
def test_bare_domains_and_email_addresses_count_as_links(extra):
    assert "exactly one link" in problems_of(GOOD.replace("Welcome back.", f"Welcome back. {extra}"))


def test_the_greeting_needs_the_whole_first_name():
    facts = dataclasses.replace(FACTS, first_name="Ed")
    text = GOOD.replace("Hi Maya!", "Hey! We missed you.")
    assert "must greet the member by first name (Ed)" in problems_of(text, facts)


def test_an_interest_must_be_a_whole_word_not_part_of_one():
    facts = dataclasses.replace(FACTS, interests=("art",))
    assert "must mention an interest" in problems_of(GOOD.replace("music fans", "fans, it starts"), facts)


@pytest.mark.parametrize("claim", ["twenty percent off", "a dozen friends", "only $25", "50% off"])
def test_number_words_prices_and_percentages_are_not_facts(claim):
    assert validate_sms(GOOD.replace("Welcome back.", f"Welcome back, {claim}."), FACTS) != []


@pytest.mark.parametrize("raw", ["jane.doe@example.com", "Zoë🎉", "R2D2"])
def test_greeting_name_refuses_emails_emoji_and_digits(raw):
    assert greeting_name(raw) is None


def test_next_week_across_the_spring_change_carries_the_date():
    now = datetime(2026, 3, 8, 4, 50, tzinfo=UTC)  # Sat Mar 7, 11:50pm EST
    start = datetime(2026, 3, 14, 4, 20, tzinfo=UTC)  # Sat Mar 14, 12:20am EDT: under six days away
    assert local_when(start, NEW_YORK, now) == "Sat Mar 14, 12:20am"


def test_an_acronym_with_a_possessive_in_the_event_name_is_not_shouting():
    facts = dataclasses.replace(FACTS, event_name="RMSP's Winter Seminar")
    text = GOOD.replace("Jazz Brunch", "RMSP's Winter Seminar")
    assert validate_sms(text, facts) == []


def test_template_fits_a_non_gsm_name_with_a_date_and_full_facts():
    facts = MessageFacts("Zoë", "6600000000000000000000f1", "Tango Connections", ("dancing",),
                         "Wed Dec 2, 6am", 3, 7, "flatiron")
    text = write_template_sms(facts)
    assert validate_sms(text, facts) == [] and sms_size(text).encoding == "UCS-2"


# --- the sender and the opt-out text (SMS_SENDER, SMS_OPT_OUT_TEXT) ----------------------------------------

SENDER, OPT_OUT = "Cuculi", "Reply STOP to opt out"
DRESSED = dataclasses.replace(FACTS, sender=SENDER, opt_out_text=OPT_OUT)
DRESSED_GOOD = (f"Cuculi: Hi Maya! Welcome back. Jazz Brunch (music) Sat 11am. 6 going, 4 spots left. "
                f"Reply STOP to opt out. {LINK}")
FULL = ("going", "spots", "interest")


def said_in(text: str, facts: MessageFacts) -> dict[str, bool]:
    body, _ = without_sender_parts(text.removesuffix(facts.link), facts)
    return optional_facts_said(body, facts)


def left_out(text: str, facts: MessageFacts) -> tuple[str, ...]:
    """The optional facts these facts hold that ``text`` does not say, in ``OPTIONAL_FACTS`` order."""
    said = said_in(text, facts)
    return tuple(name for name in OPTIONAL_FACTS if said.get(name) is False)


def test_a_message_with_the_sender_first_and_the_opt_out_text_before_the_link_passes():
    assert OPTIONAL_FACTS == FULL
    assert validate_sms(DRESSED_GOOD, DRESSED) == []


def test_unset_sender_and_opt_out_text_change_nothing():
    assert not FACTS.dressed and FACTS.sender is None and FACTS.opt_out_text is None
    assert write_template_sms(FACTS) == ("Hi Maya! Welcome back. Jazz Brunch is one for music fans: Sat 11am. "
                                         f"6 going, 4 spots left. Tap to RSVP: {LINK}")
    assert "sender" not in facts_prompt(FACTS, {}) and "length_budget" not in facts_prompt(FACTS, {})


@pytest.mark.parametrize(("text", "problem"), [
    (GOOD, "must name the sender (Cuculi) near the start"),
    (DRESSED_GOOD.replace("Cuculi: ", ""), "must name the sender (Cuculi) near the start"),
    (DRESSED_GOOD.replace("Cuculi: ", "cuculi: "), "must name the sender (Cuculi)"),
    (DRESSED_GOOD.replace("Cuculi: Hi Maya! Welcome back.", "Hi Maya! Welcome back. Great to see you again, from Cuculi."),
     "must name the sender (Cuculi) near the start"),
    (GOOD, "must put the opt-out text (Reply STOP to opt out) just before the link"),
    (DRESSED_GOOD.replace("Reply STOP to opt out. ", ""), "must put the opt-out text"),
    (DRESSED_GOOD.replace("Reply STOP to opt out. ", "Reply STOP to opt out. RSVP: "), "must put the opt-out text"),
    (DRESSED_GOOD.replace("Reply STOP to opt out", "Reply stop to opt out"), "must put the opt-out text"),
], ids=["undressed", "no-sender", "sender-case", "sender-late", "undressed-opt-out", "no-opt-out",
        "opt-out-not-last", "opt-out-changed"])
def test_the_validator_requires_the_sender_and_the_opt_out_text_when_set(text, problem):
    assert problem in problems_of(text, DRESSED)


def test_numbers_and_capitals_in_the_sender_and_opt_out_text_are_no_claims():
    facts = dataclasses.replace(DRESSED, sender="Cuculi 2", opt_out_text="Text STOP to 12345")
    text = f"Cuculi 2: Hi Maya! Welcome back. Jazz Brunch (music) Sat 11am. 4 spots left. Text STOP to 12345. {LINK}"
    assert validate_sms(text, facts) == []
    assert "numbers not among the facts: 2" in problems_of(text.replace("Welcome back.", "Welcome back, only 2 of us."),
                                                           facts)
    assert "no ALL-CAPS words (STOP)" in problems_of(text.replace("Welcome back.", "Welcome back. STOP by."), facts)
    assert "numbers not among the facts: 12345, 2" in problems_of(text, dataclasses.replace(FACTS, going=0))


@pytest.mark.parametrize(("kept", "problem"), [
    ("(music) Sat 11am. 4 spots left.", None),
    ("(music) Sat 11am.", None),
    ("Sat 11am.", None),
    ("(music) Sat 11am. 6 going.", "must say 4 spots left (to make room, leave out the going count first"),
    ("Sat 11am. 6 going, 4 spots left.", "must mention an interest the event matches (music) (to make room"),
    ("Sat 11am. 4 spots left.", "must mention an interest"),
], ids=["no-going", "no-going-no-spots", "none-of-them", "spots-before-going", "interest-first",
        "interest-before-spots"])
def test_optional_facts_may_give_way_only_in_order(kept, problem):
    text = f"Cuculi: Hi Maya! Welcome back. Jazz Brunch {kept} Reply STOP to opt out. {LINK}"
    found = problems_of(text, DRESSED)
    assert (found == "") if problem is None else (problem in found), found


def test_without_a_sender_or_opt_out_text_every_optional_fact_is_still_required():
    assert "must say 6 people are going" in problems_of(GOOD.replace("6 going, ", ""))
    assert "(to make room" not in problems_of(GOOD.replace("6 going, ", ""))


def test_the_template_names_the_sender_first_and_the_opt_out_text_just_before_the_link():
    text = write_template_sms(DRESSED)
    assert text.startswith("Cuculi: Hi Maya! ")
    assert text.endswith(f" Reply STOP to opt out. {LINK}")
    assert validate_sms(text, DRESSED) == [] and len(text) <= GSM7_LIMIT
    assert left_out(text, DRESSED) == ()


def test_only_a_sender_keeps_the_call_to_action_and_only_an_opt_out_text_names_no_sender():
    assert write_template_sms(dataclasses.replace(FACTS, sender=SENDER)).startswith("Cuculi: Hi Maya!")
    only_opt_out = write_template_sms(dataclasses.replace(FACTS, opt_out_text=OPT_OUT))
    assert only_opt_out.startswith("Hi Maya!") and only_opt_out.endswith(f"Reply STOP to opt out. {LINK}")


def test_the_template_drops_the_going_count_then_the_spots_before_cutting_the_name():
    # Ever longer event names: the whole name stays while the going count and then the spots give way;
    # then the name is cut, the interest kept.
    stages = []
    for n in range(30):
        name = " ".join(["Jazz", "Brunch", *["Extra"] * n])
        facts = dataclasses.replace(DRESSED, event_name=name, interests=("photography",), spots_left=12, going=18)
        text = write_template_sms(facts)
        assert text is not None and validate_sms(text, facts) == [], text
        omitted = left_out(text, facts)
        stages.append(omitted.count("interest") * 4 + (3 if name not in text else len(omitted)))
    assert stages == sorted(stages) and {0, 1, 2, 3} <= set(stages), stages


def test_the_interest_gives_way_last_when_no_cut_of_the_name_fits_beside_it():
    facts = dataclasses.replace(FACTS, sender="Cuculi Supper Society of New York",
                                opt_out_text="Reply STOP to opt out of texts")
    text = write_template_sms(facts)
    assert text == ("Cuculi Supper Society of New York: Maya, welcome back! Jazz Brunch Sat 11am. "
                    f"Reply STOP to opt out of texts. {LINK}")
    assert validate_sms(text, facts) == [] and left_out(text, facts) == FULL


def test_template_notes_say_what_was_left_out_to_fit():
    facts = dataclasses.replace(DRESSED, first_name="Alexandrinakonstanti",
                                event_name="Natural Wine Tasting with Orange Pours", when="Wed Feb 14, 10:30am")
    text = write_template_sms(facts)
    notes = template_notes(facts, text)
    assert "sender named" in notes and "opt-out text" in notes
    assert notes.endswith("left out to fit: " + ", ".join(left_out(text, facts)))
    assert "6 going" not in notes if "going" in left_out(text, facts) else "6 going" in notes


@pytest.mark.parametrize("first", ["Zoë", "Łukasz", "Alexandrinakonstanti", "Małgorzata"])
@pytest.mark.parametrize("sender", ["Cuculi", "Cuculi Supper Club NYC", "Cucüli"])
@pytest.mark.parametrize("event_name", ["Jazz Brunch", "Natural Wine Tasting with Orange Pours from Finger Lakes"])
@pytest.mark.parametrize("when", ["Sat 7pm", "Wed Feb 14, 10:30am"])
def test_long_and_ucs2_names_stay_within_budget_with_the_link_last(first, sender, event_name, when):
    facts = dataclasses.replace(DRESSED, first_name=first, sender=sender, event_name=event_name, when=when)
    text = write_template_sms(facts)
    if when == "Sat 7pm" and len(sender) <= len("Cuculi"):
        assert text is not None  # a short sender and a near date always leave room, even in UCS-2
    if not any(validate_sms(tight, facts) == [] for tight in tightest_dressed(facts)):
        assert text is None  # 134 UCS-2 units cannot hold it: the caller tries the next event
        return
    assert validate_sms(text, facts) == []
    size = sms_size(text)
    assert size.units <= size.limit
    assert text.startswith(sender + ": ") and text.endswith(f"Reply STOP to opt out. {LINK}")
    assert first in text  # never stripped of its letters


CARRIED = st.text(string.ascii_letters + string.digits + " '&-éüł", min_size=1, max_size=30).map(str.strip).filter(bool)


@settings(max_examples=200, deadline=None)
@given(
    first=st.one_of(st.none(), REALISTIC_NAMES, st.sampled_from(["Zoë", "Łukasz", "Alexandrinakonstanti"])),
    event_name=st.one_of(REALISTIC_EVENT_NAMES, st.text(max_size=120)),
    interests=st.lists(st.sampled_from(INTERESTS), max_size=3).map(tuple),
    when=REALISTIC_WHENS,
    spots=st.one_of(st.none(), st.integers(0, 500)),
    going=st.integers(0, 500),
    sender=st.one_of(st.none(), st.sampled_from(["Cuculi", "Cuculi 2", "Cucüli"]), CARRIED),
    opt_out=st.one_of(st.none(), st.sampled_from(["Reply STOP to opt out", "Text STOP to end"]), CARRIED),
    event_id=HEX_IDS,
)
def test_the_dressed_template_returns_a_valid_message_or_none(first, event_name, interests, when, spots, going,
                                                             sender, opt_out, event_id):
    facts = MessageFacts(greeting_name(first), event_id, event_name, interests, when, spots, going, "soho",
                         sender, opt_out)
    text = valid_template_or_none(facts)
    if text is None:
        return
    if sender:
        assert text.startswith(sender)
    if opt_out:
        assert text.removesuffix(facts.link).rstrip(" .!").endswith(opt_out.rstrip(" .!"))
    held = [name for name in OPTIONAL_FACTS if name in said_in(text, facts)]
    omitted = list(left_out(text, facts))
    assert omitted == held[: len(omitted)]  # only a leading part of the order ever gives way
    assert not omitted or facts.dressed


def tightest_dressed(facts: MessageFacts) -> list[str]:
    """The tightest message with every optional fact dropped: when it passes, the writer must find one."""
    return [f"{facts.sender}: {facts.first_name}, welcome back! {cut} {facts.when}. {facts.opt_out_text}. {facts.link}"
            for cut in shortened_names(facts.event_name)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(first=REALISTIC_NAMES, event_name=REALISTIC_EVENT_NAMES,
       interests=st.lists(st.sampled_from(INTERESTS), min_size=1, max_size=3, unique=True).map(tuple),
       when=REALISTIC_WHENS, spots=st.one_of(st.none(), st.integers(1, 30)), going=st.integers(0, 40),
       event_id=HEX_IDS)
def test_the_dressed_template_always_writes_a_message_when_one_can_fit(first, event_name, interests, when, spots,
                                                                       going, event_id):
    facts = MessageFacts(greeting_name(first), event_id, event_name, interests, when, spots, going, "soho",
                         SENDER, OPT_OUT)
    assume(any(validate_sms(text, facts) == [] for text in tightest_dressed(facts)))
    text = write_template_sms(facts)
    assert text is not None and validate_sms(text, facts) == []
    assert text.startswith((f"Cuculi: Hi {first}! ", f"Cuculi: {first}, welcome back! "))


def test_the_write_prompt_carries_the_exact_strings_the_budget_and_the_order_to_drop():
    prompt = facts_prompt(DRESSED, {"homeNeighborhood": "soho"})
    assert 'sender: "Cuculi"' in prompt and 'opt_out_text: "Reply STOP to opt out"' in prompt
    taken = len("Cuculi: . Reply STOP to opt out. ") + len(LINK)
    assert f"length_budget: 160 GSM-7 characters in all; the sender, opt-out text and link take {taken}, " \
           f"so {160 - taken} are left" in prompt
    assert "leave out the going count first, then spots_left, then the interest" in prompt
    ucs2 = facts_prompt(dataclasses.replace(DRESSED, first_name="Zoë"), {})
    assert f"length_budget: 134 UCS-2 characters in all; the sender, opt-out text and link take {taken}" in ucs2


@pytest.mark.parametrize(("env", "fragment"), [
    ({"SMS_SENDER": "cuculi.net"}, "SMS_SENDER may not hold a link"),
    ({"SMS_OPT_OUT_TEXT": "Text STOP to +1 555 555 0100"}, "SMS_OPT_OUT_TEXT may not hold a link"),
    ({"SMS_SENDER": "s" * 50, "SMS_OPT_OUT_TEXT": "o" * 50}, "leave 4 of 160 characters beside the link"),
], ids=["sender-domain", "opt-out-phone", "no-room-left"])
def test_a_sender_or_opt_out_text_that_could_never_fit_is_a_usage_error(run_cli, env, fragment):
    from test_cli import assert_one_line_error

    assert_one_line_error(run_cli("--demo", "--dry-run", env=env), fragment)


# --- the sender and opt-out text through whole runs: template and Claude ---------------------------------------

DRESS_ENV = {"SMS_SENDER": SENDER, "SMS_OPT_OUT_TEXT": OPT_OUT}


def assert_dressed_messages_keep_the_contract(run, now, generator: str) -> None:
    matches = {m["user_id"]: m for m in run.matches}
    assert run.messages
    for message in run.messages:
        facts = message_facts(matches[message["user_id"]], NEW_YORK, now, sender=SENDER, opt_out_text=OPT_OUT)
        text = message["message_text"]
        assert validate_sms(text, facts) == [], text
        assert text.startswith("Cuculi") and text.endswith(f"Reply STOP to opt out. {facts.link}")
        assert message["generator"] == generator


def test_a_template_run_carries_the_sender_and_opt_out_text_in_every_message(run_cli, world_folder):
    run = run_cli("--source", str(world_folder), "--now", "2026-01-15T12:00:00Z", "--dry-run", "--llm", "off",
                  env=DRESS_ENV, complete=True)
    assert run.code == 0, run.err
    assert_dressed_messages_keep_the_contract(run, NOW, "template")


def dressed_sms(request) -> str:
    """What a good model writes from the dressed facts: the sender first, the opt-out text before the link."""
    from test_claude import facts_of

    f = facts_of(request)
    sender, _ = json.JSONDecoder().raw_decode(f["sender"])
    opt_out, _ = json.JSONDecoder().raw_decode(f["opt_out_text"])
    interest = f["matched_interests"].split(", ")[0]
    return (f"{sender}: Hi {f['first_name']}! Welcome back. {f['event_name']} ({interest}) {f['day_time']}. "
            f"{opt_out}. {f['link']}")


def test_claude_sees_the_budget_and_the_strings_and_no_phone_number_or_email(tmp_path):
    from fake_anthropic import FakeMessagesAPI, json_reply
    from test_claude import CLAUDE_NOW, HOST, MEMBERS, claude_cli, is_matching, match_answer, prompt_of, write_world

    def answer(request):
        if is_matching(request):
            return json_reply(match_answer(request))
        return json_reply({"message_text": dressed_sms(request), "personalization_notes": "name, interest",
                           "character_count": 0})

    with FakeMessagesAPI(default=answer) as fake:
        run = claude_cli(fake, write_world(tmp_path / "export"), tmp_path / "out", env=DRESS_ENV)
        requests = list(fake.requests)
    writes = [r for r in requests if not is_matching(r)]
    assert len(writes) == len(MEMBERS)
    for request in writes:
        prompt = prompt_of(request)
        assert 'sender: "Cuculi"' in prompt and 'opt_out_text: "Reply STOP to opt out"' in prompt
        assert re.search(r"length_budget: 160 GSM-7 characters in all; .* take \d+, so \d+ are left", prompt)
    assert_dressed_messages_keep_the_contract(run, CLAUDE_NOW, "claude")
    for request in requests:  # matching and writing alike, the whole request as sent
        raw = request.raw.decode("utf-8")
        assert not EMAIL.search(raw) and not PHONE.search(raw), raw[:200]
        for member in [*MEMBERS, HOST]:
            assert member["email"] not in raw and member["phone"] not in raw and member["phone"][2:] not in raw


def test_a_claude_message_without_the_opt_out_text_is_sent_back_with_the_complaint(tmp_path):
    from fake_anthropic import FakeMessagesAPI, json_reply
    from test_claude import claude_cli, is_matching, last_user_turn, match_answer, smart, write_world

    with FakeMessagesAPI(default=smart) as fake:
        fake.queue(lambda r: json_reply(match_answer(r)),
                   lambda r: json_reply({"message_text": dressed_sms(r).replace(f"{OPT_OUT}. ", ""),
                                         "personalization_notes": "", "character_count": 0}),
                   lambda r: json_reply({"message_text": dressed_sms(r), "personalization_notes": "",
                                         "character_count": 0}))
        run = claude_cli(fake, write_world(tmp_path / "export"), tmp_path / "out", "--limit", "1", env=DRESS_ENV)
        retry = [r for r in fake.requests if not is_matching(r)][1]
    assert "must put the opt-out text (Reply STOP to opt out) just before the link" in last_user_turn(retry)
    assert run.messages[0]["generator"] == "claude"
