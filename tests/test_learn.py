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
    if toned is not None and standard is not None:
        assert rtt.validate_sms(toned, replace(facts, tone=tone)) == []
        assert rtt.facts_said(facts, toned) >= rtt.facts_said(facts, standard)  # a tone never costs a fact


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
    preview = run.report()["preview"]
    assert [row["variant"] for row in preview] == [m["variant"] for m in messages]  # shown in the preview


def test_default_is_one_variant_todays_wording(run_cli) -> None:
    run = run_cli("--demo", "--limit", "5", "--dry-run")
    assert run.messages and all("variant" not in m for m in run.messages)  # a default run's records as before
    assert all(m["deciding_signal"] in rtt.DECIDING_SIGNALS for m in run.matches)


# =============================================================================================
# measure: breakdowns, the tone A/B, week by week
# =============================================================================================

CAMPAIGN = "return-to-table-20260110-110000"


def test_holm_matches_the_worked_example() -> None:
    # Holm (1979)'s procedure on the four p-values of the Holm-Bonferroni worked example (0.01, 0.04, 0.03,
    # 0.005 at alpha 0.05: H1 and H4 rejected, H2 and H3 not): adjusted 0.03, 0.06, 0.06, 0.02.
    adjusted = rtt.holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [p < 0.05 for p in adjusted] == [True, False, False, True]
    assert rtt.holm_adjust([0.2, 0.9]) == pytest.approx([0.4, 0.9])
    assert rtt.holm_adjust([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # at most 1, kept non-decreasing
    assert rtt.holm_adjust([]) == []


def test_members_per_arm_is_fleiss_normal_approximation() -> None:
    # 50% against 20%, two-sided 5%, 80% power: ((1.96 sqrt(2 .35 .65) + 0.8416 sqrt(.25 + .16)) / .3)^2 = 38.5
    assert rtt.members_per_arm(0.5, 0.2, 0.05) == 39
    assert rtt.members_per_arm(0.3, 0.3, 0.05) is None
    assert rtt.members_per_arm(0.22, 0.20, 0.05) > 5000  # a small difference needs many members


def planted_world():
    """One campaign: 50 members messaged in the warm tone come back at 50%, 50 in the brief tone at 20%; the
    100 held out at 20% (10 of each tone's 50). Ten of the brief ones were decided by company: too few."""
    from test_measure import FIRST_RUN, World, held, member, message

    world = World()
    treated = [member(1, i) for i in range(100)]
    holdout = [member(1, 100 + i) for i in range(100)]
    warm, brief = treated[:50], treated[50:]
    suggested = world.event(FIRST_RUN + rtt.timedelta(days=3), [*warm[:25], *brief[:10]])
    world.event(FIRST_RUN + rtt.timedelta(days=5), holdout[:20])
    world.event(FIRST_RUN - rtt.timedelta(days=2), [*treated, *holdout])
    tone = {p: "warm" if p in warm else "brief" for p in treated} | {p: ("warm", "brief")[i % 2]
                                                                     for i, p in enumerate(holdout)}
    world.campaign(CAMPAIGN, FIRST_RUN, messages=[
        message(p, suggested, FIRST_RUN, variant=tone[p], generator="template",
                confidence_percentage=95 if p in warm else 75) for p in treated],
        holdout=[{**held(p, suggested, FIRST_RUN, CAMPAIGN, i + 1), "variant": tone[p], "days_inactive": 40,
                  "deciding_signal": "host", "same_neighbourhood": True, "confidence_percentage": 95}
                 for i, p in enumerate(holdout)])
    matches = [{"user_id": str(p), "matcher": "rules", "reasoning": "",
                "user": {"days_inactive": 40 if p in warm else 70},
                "deciding_signal": "host" if p in warm else "company" if p in brief[:10] else "place",
                "same_neighbourhood": p in warm} for p in treated]
    world.archives[CAMPAIGN]["matches"] = {"matches": matches, "count": len(matches), "updatedAt": "x"}
    return world


@pytest.fixture
def planted(run_cli, tmp_path):
    from test_measure import AS_OF_ISO

    planted_world().write(tmp_path / "out", tmp_path / "events")
    run = run_cli("measure", "--source", str(tmp_path / "events"), "--now", AS_OF_ISO)
    assert run.code == 0, run.err
    (report,) = [rtt.json.loads(p.read_text()) for p in (tmp_path / "out" / "reports").glob("*measure*.json")]
    return run, report


def dimension(report, name):
    (entry,) = [b for b in report["breakdowns"] if b["dimension"] == name]
    return {row["segment"]: row for row in entry["segments"]}


def test_a_segment_planted_to_return_at_50_percent_shows_50_percent(planted) -> None:
    _, report = planted
    variant = dimension(report, "variant")
    assert (variant["warm"]["n"], variant["warm"]["returns"], variant["warm"]["rate"]) == (50, 25, 0.5)
    assert (variant["brief"]["n"], variant["brief"]["returns"], variant["brief"]["rate"]) == (50, 10, 0.2)
    assert variant["warm"]["holdout"] == {"n": 50, "returns": 10, "rate": 0.2}  # the same segment's holdout
    assert variant["warm"]["lift"]["difference_pp"] == 30.0
    assert variant["warm"]["interval_95"][0] < 0.5 < variant["warm"]["interval_95"][1]
    days = dimension(report, "days_inactive")
    assert days["31-45"]["rate"] == 0.5 and days["61-90"]["rate"] == 0.2
    assert days["61-90"]["lift"] is None  # no holdout member in that band
    assert dimension(report, "confidence")["90-100"]["rate"] == 0.5
    writer = dimension(report, "writer")["template"]
    assert writer["rate"] == 0.35 and writer["holdout"]["rate"] == 0.2  # the whole holdout
    signal = dimension(report, "deciding_signal")
    assert signal["host"]["rate"] == 0.5 and signal["place"]["rate"] == 0.0
    assert signal["company"]["too_few"] and signal["company"]["rate"] is None and signal["company"]["n"] == 10
    assert dimension(report, "same_neighbourhood")["yes"]["rate"] == 0.5
    (event,) = dimension(report, "event").values()
    assert (event["n"], event["returns"], event["rate"]) == (100, 35, 0.35)
    assert {b["dimension"] for b in report["breakdowns"]} == {*rtt.BREAKDOWNS, "event"}


def test_the_tone_ab_names_a_winner_only_when_significant_after_holm(planted) -> None:
    run, report = planted
    variants = report["variants"]
    (pair,) = variants["pairs"]
    assert {pair["a"], pair["b"]} == {"brief", "warm"} and pair["p_holm"] < 0.05
    assert variants["winner"] == "warm" and "warm wins" in run.out
    assert {a["variant"]: a["lift"]["difference_pp"] for a in variants["arms"]} == {"warm": 30.0, "brief": 0.0}


def test_no_winner_says_how_many_more_members_each_arm_needs() -> None:
    from test_measure import FIRST_RUN

    def followed(tone: str, back: bool) -> rtt.Followed:
        o = rtt.Observation("m", "treated", "pending", FIRST_RUN, None, (("variant", tone),))
        return rtt.Followed(o, False, back, back)

    people = [followed("warm", i < 12) for i in range(40)] + [followed("brief", i < 10) for i in range(40)]
    found = rtt.variant_comparison(people)
    assert found["winner"] is None
    need = rtt.members_per_arm(0.3, 0.25, 0.05)
    assert found["more_members_needed"] == {"brief": need - 40, "warm": need - 40}
    assert f"about {need} members" in found["verdict"]


def test_weekly_rates_and_the_markdown_show_too_few(planted) -> None:
    run, report = planted
    (week,) = report["weekly"]
    assert week["week"] == "2026-01-05" and week["treated"]["rate"] == 0.35 and week["holdout"]["rate"] == 0.2
    markdown = next((run.root / "reports").glob("*measure*.md")).read_text()
    assert "too few" in markdown and "## Message tones (A/B)" in markdown and "Holm" in markdown


# =============================================================================================
# Charts and the self-contained HTML report
# =============================================================================================


class Page(__import__("html.parser").parser.HTMLParser):
    """The tags an HTML report holds: images' sources, and anything that would reach the network."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.remote: list[str] = []
        self.tags: Counter[str] = Counter()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("data:"):
                self.remote.append(value)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")


def test_the_html_report_is_self_contained_with_its_three_charts(planted) -> None:
    import base64

    run, report = planted
    reports = run.root / "reports"
    (html_path,) = reports.glob("return_to_table_measure_*.html")
    page = Page()
    page.feed(html_path.read_text(encoding="utf-8"))
    assert len(page.images) == 3 and page.remote == []  # opens with no network
    assert page.tags["script"] == 0 and page.tags["link"] == 0
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    for name in rtt.CHARTS:  # and each beside the Markdown report, named in the JSON
        png = reports / report["charts"][name]
        assert png.read_bytes().startswith(b"\x89PNG") and png.name.endswith(f"_{name}.png")
    assert "warm wins" in html_path.read_text(encoding="utf-8")


def test_the_funnel_comes_from_the_campaigns_reports_when_they_have_one(run_cli, tmp_path) -> None:
    from test_measure import AS_OF_ISO

    planted_world().write(tmp_path / "out", tmp_path / "events")
    reports = tmp_path / "out" / "reports"
    reports.mkdir(parents=True)
    stages = [{"stage": "eligible", "count": 400}, {"stage": "drafted", "count": 100}, {"stage": "x", "count": -1}]
    (reports / f"return_to_table_report_{CAMPAIGN}.json").write_text(
        rtt.json.dumps({"campaign_id": CAMPAIGN, "funnel": stages}))
    (reports / "return_to_table_report_other.json").write_text(
        rtt.json.dumps({"campaign_id": "another", "funnel": [{"stage": "eligible", "count": 9}]}))
    run = run_cli("measure", "--source", str(tmp_path / "events"), "--now", AS_OF_ISO)
    assert run.code == 0, run.err
    (path,) = reports.glob("return_to_table_measure_*.json")
    funnel = rtt.json.loads(path.read_text())["funnel"]
    assert funnel == [{"stage": "eligible", "count": 400}, {"stage": "drafted", "count": 100},
                      {"stage": "came back (closed windows)", "count": 35}]


def test_the_campaign_does_not_import_matplotlib_at_start_up() -> None:
    import subprocess
    import sys

    code = "import sys, return_to_table; print('matplotlib' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=rtt.SCRIPT_DIR)
    assert found.stdout.strip() == "False"


# =============================================================================================
# Weights: MATCH_WEIGHTS and backtest --fit
# =============================================================================================

MONTANA = rtt.SCRIPT_DIR / "samples" / "meetup_montana"
FLAT = {name: 0.0 for name in rtt.HISTORY_WEIGHTS}  # history ignored: the plan's order alone


@pytest.fixture(scope="module")
def montana_backtest():
    """A short backtest of the Montana sample (five as-of dates, 62 trials; each trial keeps its candidates)."""
    screened = rtt.read_screened(rtt.FolderSource(MONTANA))
    history = rtt.build_history(screened.users, screened.events, rtt.DataIssues())
    hoods = rtt.NeighbourhoodMap.from_csv(rtt.CENTROIDS_CSV)
    days = rtt.as_of_dates(rtt.datetime(2015, 6, 1, tzinfo=rtt.UTC), rtt.datetime(2015, 7, 27, tzinfo=rtt.UTC), 14)
    dated = rtt.run_backtest(history, days, 30, hoods)
    return history, days, dated


def test_refitting_ranks_exactly_as_the_scorer_does(montana_backtest) -> None:
    _, _, dated = montana_backtest
    data = rtt.FitData.of(dated)
    trials = [t for _, _, ts in dated for t in ts]
    assert len(trials) > 50
    assert list(data.hits_with(rtt.BUILT_IN_WEIGHTS)) == [t.hits["rules"] for t in trials]


def test_the_backtest_scores_with_the_weights_it_is_given(montana_backtest) -> None:
    history, days, dated = montana_backtest
    hoods = rtt.NeighbourhoodMap.from_csv(rtt.CENTROIDS_CSV)
    other = rtt.MatchWeights({**rtt.BUILT_IN_WEIGHTS, **FLAT, "PLAN_WEIGHT": 3.0, "FAR_HALVING_DAYS": 7.0})
    replayed = rtt.run_backtest(history, days[:3], 30, hoods, weights=other)  # (the first three dates: 36 trials)
    hits = [t.hits["rules"] for _, _, ts in replayed for t in ts]
    data = rtt.FitData.of(replayed)
    assert list(data.hits_with(other.values)) == hits
    assert hits != [t.hits["rules"] for _, _, ts in dated[:3] for t in ts]  # other picks than the built-in weights'


def test_the_fit_is_deterministic_for_a_seed(montana_backtest) -> None:
    _, days, dated = montana_backtest
    current = rtt.MatchWeights({**rtt.BUILT_IN_WEIGHTS, **FLAT})
    first = rtt.fit_weights(dated, 30, days[3], current, 200, 7)
    again = rtt.fit_weights(dated, 30, days[3], current, 200, 7)
    assert first == again
    assert first["fitted_dates"] == [rtt.iso_utc(d) for d in days[:4]]
    assert first["evaluated_dates"] == [rtt.iso_utc(d) for d in days[4:]]


def test_the_fit_keeps_only_moves_that_win_the_minimum_gain(montana_backtest, monkeypatch) -> None:
    _, days, dated = montana_backtest
    data = rtt.FitData.of(dated)
    import numpy as np

    fitted = np.array([d <= days[3] for d in data.days_of], dtype=bool)
    start = {**rtt.BUILT_IN_WEIGHTS, **FLAT}
    before = data.hits_with(start)[fitted].mean()
    weights = rtt.coordinate_search(data, fitted, start, 7)
    assert weights != start and data.hits_with(weights)[fitted].mean() >= before + rtt.FIT_MIN_GAIN - 1e-12
    monkeypatch.setattr(rtt, "FIT_MIN_GAIN", 1.0)  # no move can win 100 points: the current weights are kept
    assert rtt.coordinate_search(data, fitted, start, 7) == start


def backtest_fit(run_cli, *extra: str, env: dict[str, str] | None = None):
    """Five as-of dates of the Montana sample: three fitted, two evaluated (from flat history weights the fit
    still wins there: hit@1 0.46 against 0.35)."""
    return run_cli("backtest", "--source", str(MONTANA), "--from", "2015-06-01", "--to", "2015-07-27", "--fit",
                   "--resamples", "200", *extra, env=env)


def test_fit_refuses_to_write_weights_that_do_not_beat_the_current_ones(run_cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rtt, "coordinate_search", lambda data, fitted, start, seed: dict(start))
    run = backtest_fit(run_cli)
    assert run.code == 0, run.err
    assert not (tmp_path / "out" / rtt.WEIGHTS_FILE).exists()
    assert "do not beat the current ones" in run.out and "nothing written" in run.out
    (path,) = (tmp_path / "out" / "reports").glob("return_to_table_backtest_*.json")
    fit = rtt.json.loads(path.read_text())["fit"]
    assert fit["beats_current"] is False and fit["written"] is None
    assert fit["held_out"]["hit_at_1"]["fitted"]["rate"] == fit["held_out"]["hit_at_1"]["current"]["rate"]


def test_fit_writes_weights_that_beat_the_current_ones_and_the_campaign_reads_them(run_cli, tmp_path) -> None:
    flat = tmp_path / "flat.json"
    flat.write_text(rtt.json.dumps(FLAT))
    run = backtest_fit(run_cli, env={"MATCH_WEIGHTS": str(flat)})
    assert run.code == 0, run.err
    written = tmp_path / "out" / rtt.WEIGHTS_FILE
    document = rtt.json.loads(written.read_text())
    hits = document["hit_at_1"]
    assert hits["fitted"]["rate"] > hits["current"]["rate"]
    assert document["fitted_dates"][-1] < document["evaluated_dates"][0]
    assert f"sha256 {rtt.hashlib.sha256(flat.read_bytes()).hexdigest()}" in run.out
    loaded = rtt.load_match_weights({"MATCH_WEIGHTS": str(written)})
    assert loaded.values == document["weights"]
    campaign = run_cli("--demo", "--dry-run", "--limit", "3", env={"MATCH_WEIGHTS": str(written)}, root=tmp_path / "c")
    assert campaign.code == 0, campaign.err
    assert campaign.report()["match_weights"] == loaded.label
    assert rtt.current_weights() == rtt.BUILT_IN_WEIGHTS  # restored after the run


def test_the_campaign_scores_with_the_weights_file(run_cli, tmp_path) -> None:
    heavy = tmp_path / "plan.json"
    heavy.write_text(rtt.json.dumps({"PLAN_WEIGHT": 50}))  # the plan's tiers worth far more: higher confidence
    args = ("--demo", "--dry-run", "--limit", "5")
    built_in = run_cli(*args, root=tmp_path / "a")
    weighted = run_cli(*args, env={"MATCH_WEIGHTS": str(heavy)}, root=tmp_path / "b")
    assert built_in.code == weighted.code == 0, weighted.err
    before = {m["user_id"]: m["confidence_percentage"] for m in built_in.matches}
    after = {m["user_id"]: m["confidence_percentage"] for m in weighted.matches}
    assert before.keys() == after.keys() and all(after[k] >= before[k] for k in before) and after != before


BAD_WEIGHTS = {
    "not JSON": "{W_HOST: 1",
    "not an object": "[1, 2]",
    "unknown name": '{"W_HOSTS": 1}',
    "out of range": '{"W_HOST": 1000}',
    "negative": '{"PLAN_WEIGHT": -1}',
    "half-life zero": '{"FAR_HALVING_DAYS": 0}',
    "NaN": '{"W_HOST": NaN}',
    "a boolean": '{"W_HOST": true}',
    "a string": '{"W_HOST": "3"}',
}


@pytest.mark.parametrize("text", BAD_WEIGHTS.values(), ids=BAD_WEIGHTS.keys())
@pytest.mark.parametrize("command", ["campaign", "backtest"])
def test_a_malformed_or_out_of_range_weights_file_is_exit_2_one_line(run_cli, tmp_path, text: str,
                                                                     command: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(text)
    argv = (["--demo", "--dry-run"] if command == "campaign" else
            ["backtest", "--source", str(MONTANA), "--from", "2015-06-01", "--to", "2015-07-01"])
    run = run_cli(*argv, env={"MATCH_WEIGHTS": str(path)})
    assert run.code == 2
    assert run.err.count("\n") == 1 and run.err.startswith("error: MATCH_WEIGHTS=")
    assert not (tmp_path / "out" / "reports").exists() or not any((tmp_path / "out" / "reports").iterdir())


def test_a_missing_weights_file_is_exit_2(run_cli, tmp_path) -> None:
    run = run_cli("--demo", "--dry-run", env={"MATCH_WEIGHTS": str(tmp_path / "none.json")})
    assert run.code == 2 and "cannot read the file" in run.err


# =============================================================================================
# RANK_BY: who to reach first
# =============================================================================================


def test_by_history_orders_by_the_best_total_and_keeps_the_score_order_in_ties() -> None:
    assert rtt.by_history(["a", "b", "c", "d"], [0.5, 2.0, 0.5, -1.0]) == ["b", "a", "c", "d"]
    assert rtt.best_total([]) == -1.0


def test_rank_by_history_reaches_other_members_first_and_the_report_says_so(run_cli, tmp_path) -> None:
    score = run_cli("--demo", "--dry-run", "--limit", "5", root=tmp_path / "score")
    history = run_cli("--demo", "--dry-run", "--limit", "5", env={"RANK_BY": "history"}, root=tmp_path / "history")
    assert score.code == history.code == 0, history.err
    assert score.report()["rank_by"] == "score" and history.report()["rank_by"] == "history"
    assert [m["user_id"] for m in score.messages] != [m["user_id"] for m in history.messages]
    confidence = [m["confidence_percentage"] for m in history.matches]
    assert confidence[0] == max(confidence)  # the strongest history first


def test_a_bad_rank_by_is_exit_2(run_cli) -> None:
    run = run_cli("--demo", "--dry-run", env={"RANK_BY": "loudest"})
    assert run.code == 2 and "RANK_BY" in run.err and run.err.count("\n") == 1


def test_backtest_compares_the_orderings_among_the_top_limit(run_cli, tmp_path) -> None:
    run = run_cli("backtest", "--source", str(MONTANA), "--from", "2015-06-01", "--to", "2015-07-13",
                  "--limit", "5", "--resamples", "100")
    assert run.code == 0, run.err
    (path,) = (tmp_path / "out" / "reports").glob("return_to_table_backtest_*.json")
    orderings = rtt.json.loads(path.read_text())["orderings"]
    assert orderings["limit"] == 5 and len(orderings["dates"]) == 4
    for name in rtt.RANK_ORDERS:
        pooled = orderings["pooled"][name]
        assert pooled["member_dates"] == sum(d[name]["members"] for d in orderings["dates"]) <= 20
        assert pooled["hits"] <= pooled["came_back"] <= pooled["member_dates"]
    assert "RANK_BY=score: hit" in run.out and "RANK_BY=history: hit" in run.out


def test_a_campaign_report_that_links_to_dev_zero_is_passed_over(run_cli, tmp_path) -> None:
    from test_measure import AS_OF_ISO

    planted_world().write(tmp_path / "out", tmp_path / "events")
    reports = tmp_path / "out" / "reports"
    reports.mkdir(parents=True)
    (reports / f"return_to_table_report_{CAMPAIGN}.json").symlink_to("/dev/zero")
    run = run_cli("measure", "--source", str(tmp_path / "events"), "--now", AS_OF_ISO)
    assert run.code == 0, run.err
    (path,) = reports.glob("return_to_table_measure_*.json")
    assert rtt.json.loads(path.read_text())["funnel"][0] == {"stage": "drafted", "count": 100}  # from the archive
