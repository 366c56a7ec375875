"""Benchmark the Claude path (issue #3) against the plan, on a generated world, with a fake API.

Run from the repository root:  python bench/bench_llm.py

1. Matching prompt size: our per-member prompt (system + user, as recorded by the fake
   Messages API) against the plan's baseline prompt, which puts every future event into
   ``json.dumps(event_data, default=str, indent=2)`` (plan, "Individual Prompt Structure").
2. LLM phase wall time (report field ``steps_5_6_seconds``) for the members at a fixed fake
   latency per call, ``--concurrency 6`` against ``--concurrency 1``: against a steady API, and
   against one that fails now and then (issue 21: a 529 every 7th request, a 429 every 11th, retried
   by the SDK after its own backoff), where "stop after four failures in a row" bounds the calls in
   flight.

Nothing leaves 127.0.0.1: the real ``anthropic`` SDK talks to ``tests/fake_anthropic.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_anthropic import FakeMessagesAPI, RecordedRequest, Reply, error_reply, json_reply

import return_to_table as rtt

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)
NOW_ISO = "2026-03-10T15:00:00Z"

# (name, categories, features): fictional event kinds, tagged as the app tags them.
KINDS = [
    ("Karaoke Night", ["MUSIC", "BAR"], ["karaoke", "groups"]),
    ("Ramen Supper Club", ["DINNER"], ["supper-club", "family-style"]),
    ("Sunrise Hike and Brunch", ["OUTDOOR", "BRUNCH"], ["hike", "coffee"]),
    ("Natural Wine Tasting", ["WINE"], ["wine-tasting", "groups"]),
    ("Stand-up and Dinner", ["COMEDY", "DINNER"], ["stand-up"]),
    ("Jazz Brunch", ["MUSIC", "BRUNCH"], ["jazz", "live-music"]),
    ("Board Game Night", ["GAMES", "BAR"], ["board-games", "trivia"]),
    ("Rooftop DJ Night", ["MUSIC", "BAR"], ["dj", "dancing", "rooftop", "cocktails"]),
    ("Book Club Dinner", ["BOOKS", "DINNER"], ["book-club", "family-style"]),
    ("Gallery Walk and Drinks", ["ART", "BAR"], ["gallery", "cocktails"]),
    ("Run Club and Coffee", ["FITNESS", "SPORTS"], ["run-club", "coffee"]),
    ("Pottery and Pasta", ["ART", "COOKING", "DINNER"], ["pottery", "cooking-class"]),
    ("Startup Founders Dinner", ["TECH", "NETWORKING", "DINNER"], ["startup-pitch", "speed-friending"]),
    ("Film Night and Tacos", ["FILM", "DINNER"], ["film-screening"]),
    ("Yoga and Juice", ["FITNESS"], ["yoga"]),
    ("Cocktail Masterclass", ["BAR"], ["cocktails", "groups"]),
    ("Salsa Night and Tapas", ["MUSIC", "DINNER"], ["dancing", "live-music"]),
]
ADJECTIVES = ["Cozy", "Late", "Sunday", "Midweek", "Harbor", "Corner", "Garden", "Neighborhood", "Friday", "Loft"]
HOODS = ["west-village", "east-village", "soho", "tribeca", "chelsea", "lower-east-side", "upper-west-side",
         "upper-east-side", "harlem", "gramercy", "murray-hill", "williamsburg", "greenpoint", "bushwick",
         "park-slope", "fort-greene", "astoria", "long-island-city", "hells-kitchen", "flatiron"]
INTERESTS = ["music", "food", "wine", "cocktails", "reading", "outdoor", "hiking", "fitness", "yoga", "art",
             "comedy", "film", "tech", "startups", "cooking", "coffee", "brunch", "dancing", "games", "jazz",
             "travel", "fashion"]
FIRST = ["Aaliyah", "Mateo", "Priya", "Jamal", "Sofia", "Wei", "Fatima", "Diego", "Hannah", "Kwame", "Yuki",
         "Isabella", "Omar", "Grace", "Dmitri", "Amara", "Luis", "Mei", "Noah", "Ananya", "Tariq", "Camila",
         "Ethan", "Nia", "Rafael"]
OCCUPATIONS = ["Architect", "Editor", "Nurse", "Chef", "Teacher", "Lawyer", "Data Analyst", "Barista"]


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def generate_world(n_members: int = 25, n_future: int = 200, seed: int = 3) -> tuple[list[dict], list[dict]]:
    """Fictional members (31-90 days dormant) and ~n_future open public future events."""
    rng = random.Random(seed)
    users: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    host = "u-host"
    users.append({"_id": host, "firstName": "Avery", "lastName": "Host", "email": "avery.host@example.com",
                  "phone": "+15555550000", "interests": ["food"], "occupation": "Host", "homeNeighborhood": "soho"})
    for i in range(n_members):
        uid = f"u-{i:03d}"
        interests = rng.sample(INTERESTS, rng.randint(2, 6))
        users.append({"_id": uid, "firstName": FIRST[i % len(FIRST)], "lastName": f"Testperson{i}",
                      "email": f"member{i}@example.com", "phone": f"+1212555{100 + i % 100:04d}",  # textable, fictional
                      "gender": rng.choice(["female", "male", "non-binary"]), "interests": interests,
                      "occupation": rng.choice(OCCUPATIONS), "homeNeighborhood": rng.choice(HOODS)})
        for k in range(rng.randint(1, 4)):  # past tables; the latest 31-90 days ago
            days = rng.randint(35, 88) if k == 0 else rng.randint(95, 300)
            kind = rng.choice(KINDS)
            events.append({"_id": f"ev-past-{i}-{k}", "name": kind[0], "categories": kind[1], "features": kind[2],
                           "neighborhood": rng.choice(HOODS), "startDate": iso(NOW - timedelta(days=days)),
                           "participants": [uid, host], "maxParticipants": 10, "type": "public", "active": True,
                           "eventStatus": "approved", "ownerId": host})
    for j in range(n_future):
        kind = KINDS[j % len(KINDS)]
        capacity = rng.randint(6, 20)
        going = rng.randint(0, capacity - 1)
        start = (NOW + timedelta(days=rng.randint(1, 30))).replace(hour=rng.choice([15, 23]),
                                                                 minute=rng.choice([0, 30]))
        events.append({
            "_id": f"ev-{j:04d}", "name": f"{rng.choice(ADJECTIVES)} {kind[0]}",
            "description": f"{kind[0]} with new friends, hosted by a long-time member.",
            "venueName": f"Venue {j % 37}", "neighborhood": rng.choice(HOODS), "categories": kind[1],
            "features": kind[2], "participants": [f"u-guest-{j}-{g}" for g in range(going)],
            "maxParticipants": capacity, "startDate": iso(start), "type": "public", "active": True,
            "eventStatus": "approved", "ownerId": host})
    return users, events


# --- the fake model ------------------------------------------------------------------------------


def _prompt(request: RecordedRequest) -> str:
    return request.body["messages"][0]["content"]


def responder(request: RecordedRequest) -> Reply:
    """Answers like a good model: the first offered event; an SMS built from the facts."""
    prompt = _prompt(request)
    if "<events>" in prompt:
        line = prompt.split("<events>\n", 1)[1].split("\n", 1)[0]
        event_id = re.match(r"- id=(\S+) \| name=", line).group(1)
        name, _ = json.JSONDecoder().raw_decode(line, line.index("name=") + 5)
        return json_reply({"event_id": event_id, "event_name": name, "confidence_percentage": 85,
                           "reasoning": "Shared interests, close by, well attended and soon.",
                           "match_purpose": "reactivate_dormant_user"})
    facts = dict(line.split(": ", 1) for line in prompt.split("<facts>\n", 1)[1].split("\n</facts>")[0].split("\n"))
    proof = [f"{facts['going']} going"] if facts["going"] != "0" else []
    if facts["spots_left"].isdigit():
        proof.append(f"{facts['spots_left']} spots left")
    text = (f"Hi {facts['first_name']}! Welcome back. {json.loads(facts['event_name'])} for "
            f"{facts['matched_interests'].split(', ')[0]} fans, {facts['day_time']}. {', '.join(proof)}. "
            f"{facts['link']}")
    return json_reply({"message_text": text, "personalization_notes": "bench", "character_count": len(text)})


class Flaky:
    """An API that fails now and then, by arrival order: every ``every_529``-th request a 529 (overloaded),
    every ``every_429``-th a 429 (rate limited), both without retry-after, so the SDK backs off on its own
    (about 0.4-0.5 s before a first retry); every other request is answered by ``responder``."""

    def __init__(self, every_529: int = 7, every_429: int = 11) -> None:
        self.every_529, self.every_429 = every_529, every_429
        self.seen = 0
        self.lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> Reply:
        with self.lock:
            self.seen += 1
            n = self.seen
        if n % self.every_529 == 0:
            return error_reply(529, "overloaded_error")
        if n % self.every_429 == 0:
            return error_reply(429, "rate_limit_error")
        return responder(request)


# --- the plan's baseline prompt ------------------------------------------------------------------

PLAN_PROMPT = """You are an expert user reactivation specialist focused on re-engaging dormant users.

PRIORITY: Find the SINGLE BEST event for this dormant user (31-90 days inactive) that will re-engage them \
and drive an RSVP.

USER CONTEXT:
This user has been dormant for {days_inactive} days. They have attended {event_count} events in the past.
Last event: {last_event_date}
Profile completeness: {profile_completeness}/8 fields filled
Interests: {interests}
Neighborhood: {homeNeighborhood}
Occupation: {occupation}

MATCHING CRITERIA (in order of importance):
1. Interest alignment: User interests MUST match event categories/features (this is critical)
2. Location proximity: Prefer events in or near user's neighborhood ({homeNeighborhood})
3. Event quality: Prefer events with HIGH participation (50-100% filled) to show social proof and quality
4. Reactivation potential: Events similar to their past attendance patterns
5. Event timing: Prefer events happening soon (creates urgency for reactivation)
6. Welcome back vibe: Events that feel welcoming for returning users

IMPORTANT:
- Return ONLY the SINGLE BEST match (not multiple)
- Prioritize events with higher participation (50-100% filled) over empty events
- The goal is to reactivate this user with a high-quality, engaging event
- Quality and relevance are more important than filling empty events

Return a JSON object (not array) with:
- 'event_name': The event name
- 'event_id': The event ID
- 'reasoning': Detailed explanation (3-4 sentences) focusing on:
  * Why this specific event will reactivate THIS user
  * How interests align
  * Why the event quality/participation makes it appealing
  * How location/timing work for reactivation
- 'confidence_percentage': Number 0-100 (should be 80+ for a good match)
- 'match_purpose': "reactivate_dormant_user"

Available Events: {events_json}

Return only the JSON object, no additional text."""


def plan_event(event: dict[str, Any]) -> dict[str, Any]:
    """The plan's "Event Data Structure" for one future event."""
    return {
        "name": event.get("name"), "summary": event.get("summary"), "event_id": event["_id"],
        "neighborhood": event.get("neighborhood"), "categories": event.get("categories"),
        "features": event.get("features"), "startDate": event.get("startDate"),
        "capacity": event.get("maxParticipants"), "participants_count": event.get("participantCount"),
        "remaining_spots": event.get("remaining_spots"),
        "fill_rate_percent": round(event.get("participationPercentage", 0.0), 1),
    }


def plan_prompt(user: dict[str, Any], future: list[dict[str, Any]]) -> str:
    event_data = [plan_event(e) for e in future]
    return PLAN_PROMPT.format(
        days_inactive=user["days_inactive"], event_count=user["eventCount"],
        last_event_date=user["last_event_date"], profile_completeness=rtt.count_profile_fields(user),
        interests=", ".join(rtt.clean_interests(user.get("interests"))),
        homeNeighborhood=user.get("homeNeighborhood"), occupation=user.get("occupation"),
        events_json=json.dumps(event_data, default=str, indent=2))


# --- runs ------------------------------------------------------------------------------------------


def run(fake: FakeMessagesAPI, folder: Path, out: Path, *flags: str) -> dict[str, Any]:
    argv = ["--source", str(folder), "--now", NOW_ISO, "--out", str(out), "--llm", "claude", "--dry-run", *flags]
    env = {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_MAX_RETRIES": "2"}
    code = rtt.main(argv, env=env)
    if code != 0:
        raise SystemExit(f"run failed with exit code {code}")
    [report] = (out / "reports").glob("return_to_table_report_*.json")
    return json.loads(report.read_text(encoding="utf-8"))


def timed(folder: Path, out: Path, members: int, latency: float, flaky: bool) -> dict[str, Any]:
    """Steps 5-6 sequential and at ``--concurrency 6``, each against a fresh fake (the same failures)."""
    result: dict[str, Any] = {}
    for width in ("1", "6"):
        with FakeMessagesAPI(default=Flaky() if flaky else responder, latency=latency) as fake:
            report = run(fake, folder, out / f"{'flaky' if flaky else 'steady'}-{width}", "--limit", str(members),
                         "--concurrency", width)
            result[width] = report["steps_5_6_seconds"]
            result[f"requests_{width}"] = len(fake.requests)
            result[f"claude_{width}"] = report["summary"]["matchers"].get("claude", 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=21, help="members to run (--limit), 21")
    parser.add_argument("--latency", type=float, default=0.3, help="fake seconds per API call, 0.3")
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI: 4 members, 0.01 s per call")
    args = parser.parse_args()
    if args.smoke:
        args.members, args.latency = 4, 0.01  # 8 calls or more: the flaky API fails at least one

    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
        root = Path(tmp)
        users, events = generate_world()
        folder = root / "export"
        folder.mkdir()
        (folder / "users.json").write_text(json.dumps(users), encoding="utf-8")
        (folder / "events.json").write_text(json.dumps(events), encoding="utf-8")
        census = rtt.find_dormant_users(users, rtt.index_member_activity(events, rtt.DataIssues()), NOW)
        future = rtt.find_future_events(events, NOW)
        selected = census.eligible[: args.members]

        logging.getLogger("ReturnToTable").disabled = True  # the CLI logs to stdout; keep the table clean
        with FakeMessagesAPI(default=responder) as fake:
            report = run(fake, folder, root / "size", "--limit", str(args.members))
            matching = [r for r in fake.requests if "<events>" in _prompt(r)]
        ours = [sum(len(b["text"]) for b in r.body["system"]) + len(_prompt(r)) for r in matching]
        offered = [_prompt(r).split("<events>\n", 1)[1].split("\n</events>")[0].count("\n") + 1 for r in matching]
        base = [len(plan_prompt(u, future)) for u in selected]
        steady = timed(folder, root, args.members, args.latency, flaky=False)
        flaky = timed(folder, root, args.members, args.latency, flaky=True)

    if not ours or not base:  # a world without a contactable member measures nothing: say so, do not divide
        raise SystemExit(f"no member was matched by Claude ({report['summary']}): the world has none to text")
    avg_ours, avg_base = sum(ours) / len(ours), sum(base) / len(base)
    print(f"World: {len(census.eligible)} eligible dormant members, {len(future)} future public events; "
          f"{len(selected)} members run; matchers {report['summary']['matchers']}, "
          f"generators {report['summary']['generators']}")
    print()
    print("| matching prompt (avg per member)            | chars   | ~tokens (chars/4) | events offered |")
    print("| ------------------------------------------- | ------- | ----------------- | -------------- |")
    print(f"| plan baseline (all events, indent=2 JSON)   | {avg_base:7.0f} | {avg_base / 4:17.0f} | "
          f"{len(future):14d} |")
    print(f"| ours (system + user, top-K compact lines)   | {avg_ours:7.0f} | {avg_ours / 4:17.0f} | "
          f"{sum(offered) / len(offered):14.1f} |")
    print(f"| ratio                                       | {avg_base / avg_ours:6.1f}x | "
          f"{'':17} | {'':14} |")
    print()
    rows = [("--concurrency 1 (sequential), seconds", "{:.2f}", "1"), ("--concurrency 6, seconds", "{:.2f}", "6"),
            ("requests, sequential", "{}", "requests_1"), ("requests, --concurrency 6", "{}", "requests_6"),
            ("members Claude matched, sequential", "{}", "claude_1"),
            ("members Claude matched, --concurrency 6", "{}", "claude_6")]
    print(f"| {f'LLM phase (steps 5-6), {len(selected)} members, {args.latency:g} s/call':48} | steady API | flaky API |")
    print(f"| {'-' * 48} | ---------- | --------- |")
    for label, form, key in rows:
        print(f"| {label:48} | {form.format(steady[key]):>10} | {form.format(flaky[key]):>9} |")
    print(f"| {'speed-up':48} | {steady['1'] / steady['6']:9.1f}x | {flaky['1'] / flaky['6']:8.1f}x |")
    print(f"| {'--concurrency 6 in units of sequential':48} | {steady['6'] / steady['1']:9.2f}x | "
          f"{flaky['6'] / flaky['1']:8.2f}x |")
    print()
    print("flaky API: a 529 every 7th request and a 429 every 11th, without retry-after (the SDK's own backoff)")


if __name__ == "__main__":
    main()
