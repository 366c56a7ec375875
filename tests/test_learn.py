"""Issue 22, learning from the results: message-tone A/B, measure's breakdowns and charts, fitted weights.

All people here are fictional (ids only)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
from bson import ObjectId

import return_to_table as rtt

# =============================================================================================
# Message tones
# =============================================================================================

TONED = ("warm", "brief", "social")
FACTS = rtt.MessageFacts(first_name="Maya", event_id="6600000000000000000000f1", event_name="Jazz Brunch",
                         interests=("music",), when="Sat 7:30pm", spots_left=3, going=5, neighbourhood="soho")
# Each tone's own wording, as a reader would tell it apart from today's.
MARKS = {"warm": "we've missed you", "brief": "Maya, welcome back!", "social": "Join 5 others"}


def chi_square(table: list[list[int]]) -> float:
    """Pearson's chi-square statistic of a contingency table."""
    rows, cols = [sum(r) for r in table], [sum(c) for c in zip(*table, strict=True)]
    total = sum(rows)
    return sum((table[i][j] - rows[i] * cols[j] / total) ** 2 / (rows[i] * cols[j] / total)
               for i in range(len(rows)) for j in range(len(cols)))


def test_tone_assignment_is_stable_even_and_independent_of_the_holdout() -> None:
    ids = [str(ObjectId(f"{i:024x}")) for i in range(10_000)]
    variants = ("standard", *TONED)
    tones = [rtt.member_tone(rtt.CAMPAIGN_NAME, i, variants) for i in ids]
    assert tones == [rtt.member_tone(rtt.CAMPAIGN_NAME, i, variants) for i in ids]  # run after run
    counts = Counter(tones)
    assert sum((counts[t] - 2500) ** 2 / 2500 for t in variants) < 11.345  # even shares: 3 df, 1% critical value
    held = [rtt.in_holdout(rtt.CAMPAIGN_NAME, i, 0.2) for i in ids]
    table = [[sum(1 for t, h in zip(tones, held, strict=True) if t == tone and h == flag) for flag in (True, False)]
             for tone in variants]
    assert chi_square(table) < 11.345  # tone x holdout independence: 3 degrees of freedom, 1% critical value
    # the same hash with the holdout's salt would correlate completely: the test can fail
    own = [rtt.holdout_share(rtt.CAMPAIGN_NAME, i) for i in ids]
    same_salt = [variants[min(3, int(s * 4))] for s in own]
    leaked = [[sum(1 for t, h in zip(same_salt, held, strict=True) if t == tone and h == flag)
               for flag in (True, False)] for tone in variants]
    assert chi_square(leaked) > 1000


@pytest.mark.parametrize("tone", TONED)
def test_each_tone_has_its_own_wording_within_the_whole_sms_contract(tone: str) -> None:
    facts = replace(FACTS, tone=tone)
    text = rtt.write_template_sms(facts)
    assert text is not None and rtt.validate_sms(text, facts) == []
    assert MARKS[tone] in text
    assert rtt.write_template_sms(FACTS) != text  # not today's wording


names = ["Jazz Brunch", "Ramen Supper Club at the Old Firehouse on Main Street", "Zoë's Tango Connections",
         "Pottery & Pasta"]


@pytest.mark.parametrize(("tone", "name", "going", "spots", "company", "dressed"),
                         list(itertools.product(TONED, names, (0, 1, 12), (None, 1, 4), (0, 2), (False, True))))
def test_a_tone_writes_whenever_todays_wording_can_and_keeps_the_contract(
        tone: str, name: str, going: int, spots: int | None, company: int, dressed: bool) -> None:
    facts = replace(FACTS, event_name=name, going=going, spots_left=spots, company=company,
                    sender="Cuculi" if dressed else None, opt_out_text="Reply STOP to opt out" if dressed else None)
    standard = rtt.write_template_sms(facts)
    toned = rtt.write_template_sms(replace(facts, tone=tone))
    assert (toned is None) == (standard is None)
    if toned is not None:
        assert rtt.validate_sms(toned, replace(facts, tone=tone)) == []


def test_claude_is_told_the_tone_and_todays_prompt_is_unchanged() -> None:
    user = {"homeNeighborhood": "soho", "days_inactive": 45}
    assert "tone:" not in rtt.facts_prompt(FACTS, user)
    assert "tone: social" in rtt.facts_prompt(replace(FACTS, tone="social"), user)


def test_unknown_tone_is_exit_2_one_line(run_cli) -> None:
    run = run_cli("--demo", "--variants", "warm,shouty")
    assert run.code == 2
    assert run.err.count("\n") == 1 and "shouty" in run.err and "warm" in run.err


def test_variants_are_stored_on_messages_and_holdout_by_the_members_stable_hash(run_cli) -> None:
    run = run_cli("--demo", "--variants", "warm,brief,social", "--holdout", "0.3", "--limit", "20", "--dry-run")
    assert run.code in (0, 3), run.err
    messages = run.messages
    assert messages
    variants = ("warm", "brief", "social")
    for m in messages:
        assert m["variant"] == rtt.member_tone(rtt.CAMPAIGN_NAME, m["user_id"], variants)
    assert len({m["variant"] for m in messages}) > 1
    holdout = run.load("data/processed/holdout.json")
    assert holdout and all(h["variant"] == rtt.member_tone(rtt.CAMPAIGN_NAME, h["user_id"], variants)
                           for h in holdout)
    assert all(h["deciding_signal"] in rtt.DECIDING_SIGNALS for h in holdout)


def test_default_is_one_variant_todays_wording(run_cli) -> None:
    run = run_cli("--demo", "--limit", "5", "--dry-run")
    assert run.messages and {m["variant"] for m in run.messages} == {"standard"}
    assert all(m["deciding_signal"] in rtt.DECIDING_SIGNALS for m in run.matches)
