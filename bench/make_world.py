"""Generate a world of any size in the demo world's shape, messy forms included, as mongoexport files.

Run by hand: ``python bench/make_world.py OUT_DIR --members 100000 [--events N] [--lines] [--canonical]``.
It writes ``OUT_DIR/users.json`` and ``OUT_DIR/events.json`` (a JSON array, or JSON Lines with
``--lines``; relaxed Extended JSON, or canonical with ``--canonical``) and prints the ``--now`` to
run with. Deterministic for a given seed; streamed to disk, so 1M members need little memory.

``--mixed`` (issue 21) is another shape: participants and owners half ``{"$oid"}``, half bare strings;
dates ``{"$date"}``, ISO with an offset and microseconds, or epoch milliseconds; non-ASCII first names;
14 places, 11 categories and 8 features.

Messy forms (issue 2): ``_id`` as a string or ``{"$oid"}``; dates as ISO with ``Z``, an offset or no
zone, epoch milliseconds, ``{"$date": ...}`` (ISO or ``$numberLong``), ``"TBD"`` and null;
participants as id strings, ``{"$oid"}``, ``{"_id"}``, ``{"userId"}``, ``{"id"}``, repeated, and odd
entries (null, a number, an object without an id); members without interests or profile fields.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
INTERESTS = ["music", "clubbing", "food", "wine", "cocktails", "travel", "reading", "fashion", "finance",
             "outdoor", "hiking", "fitness", "yoga", "art", "comedy", "theater", "film", "tech", "startups",
             "photography", "cooking", "coffee", "brunch", "dancing", "games", "sports", "networking", "jazz"]
HOODS = ["hells-kitchen", "west-village", "east-village", "midtown-east", "soho", "tribeca", "chelsea",
         "lower-east-side", "upper-west-side", "upper-east-side", "harlem", "financial-district", "gramercy",
         "murray-hill", "flatiron", "chinatown", "williamsburg", "greenpoint", "bushwick", "park-slope", "dumbo",
         "fort-greene", "crown-heights", "astoria", "long-island-city", "jersey-city"]
TEMPLATES = [  # name, categories, features
    ("Karaoke Night", "MUSIC BAR", "karaoke groups"), ("Ramen Supper Club", "DINNER", "supper-club family-style"),
    ("Sunrise Hike & Brunch", "OUTDOOR BRUNCH", "hike coffee"), ("Natural Wine Tasting", "WINE", "wine-tasting"),
    ("Stand-up & Dinner", "COMEDY DINNER", "stand-up"), ("Jazz Brunch", "MUSIC BRUNCH", "jazz live-music"),
    ("Board Game Night", "GAMES BAR", "board-games trivia"), ("Rooftop DJ Night", "MUSIC BAR", "dj dancing rooftop"),
    ("Book Club Dinner", "BOOKS DINNER", "book-club"), ("Gallery Walk & Drinks", "ART BAR", "gallery cocktails"),
    ("Run Club & Coffee", "FITNESS SPORTS", "run-club coffee"), ("Pottery & Pasta", "ART COOKING", "pottery"),
    ("Startup Founders Dinner", "TECH NETWORKING", "startup-pitch"), ("Film Night & Tacos", "FILM DINNER", "film"),
    ("Yoga & Juice", "FITNESS", "yoga"), ("Cocktail Masterclass", "BAR", "cocktails"),
    ("Broadway Preview & Dinner", "THEATER DINNER", "groups"), ("Salsa Night & Tapas", "MUSIC DINNER", "dancing"),
]
FIRSTS = ["Aaliyah", "Mateo", "Priya", "Jamal", "Sofia", "Wei", "Zoë", "Łukasz", "Siobhán", "Diego", "Hannah"]
MIXED_FIRSTS = ["José", "Zoë", "Łukasz", "Siobhán", "Søren", "Chloé", "Björn", "Ngọc", "Renée", "Ayşe", "Miłosz"]
MIXED_CATEGORIES = ["MUSIC", "BAR", "DINNER", "OUTDOOR", "BRUNCH", "WINE", "COMEDY", "GAMES", "ART", "FITNESS", "TECH"]
MIXED_FEATURES = ["karaoke", "jazz", "dj", "hike", "wine-tasting", "board-games", "yoga", "stand-up"]
LASTS = ["Rivera", "Chen", "Patel", "Johnson", "Okafor", "Kim", "O'Brien", "Nguyen", "Rossi"]


def member_id(i: int) -> str:
    return f"64d0{i:020x}"


def nyc_zone_areas() -> list[int]:
    """US area codes whose 555 numbers phonenumbers calls valid and places in New York's zone (172)."""
    import phonenumbers
    import phonenumbers.timezone

    def fits(area: int) -> bool:
        number = phonenumbers.parse(f"+1{area}5550100")
        return (phonenumbers.is_valid_number(number)
                and phonenumbers.timezone.time_zones_for_number(number) == ("America/New_York",))
    return [area for area in range(201, 990) if fits(area)]


AREAS = nyc_zone_areas()


def member_phone(i: int) -> str:
    """Each member their own number (one number gets one text), in the 555 exchange (not given to subscribers)."""
    return f"+1{AREAS[i // 10000 % len(AREAS)]}555{i % 10000:04d}"


class World:
    """One generated world: members and events written as they are made."""

    def __init__(self, members: int, events: int, *, canonical: bool, seed: int = 20240611,
                 mixed: bool = False) -> None:
        self.rng = random.Random(seed)
        self.members, self.events, self.canonical, self.mixed = members, events, canonical, mixed

    def number(self, n: float) -> object:
        """Numbers as canonical Extended JSON writes them (``$numberInt``/``$numberDouble``), or plain."""
        if not self.canonical:
            return n
        if isinstance(n, float):
            return {"$numberDouble": repr(n)}
        return {"$numberInt": str(n)} if -2**31 <= n < 2**31 else {"$numberLong": str(n)}

    def date(self, moment: datetime) -> object:
        """One instant in one of the messy shapes seen in production."""
        r = self.rng.random()
        if self.mixed:
            moment = moment.replace(microsecond=self.rng.randrange(1_000_000))
            if r < 0.34:
                return {"$date": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"}
            if r < 0.67:
                return moment.astimezone(timezone(timedelta(hours=self.rng.choice([-5, 2, 9])))).isoformat()
            return int(moment.timestamp() * 1000)
        if r < 0.55:
            return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        if r < 0.63:
            return moment.astimezone(timezone(timedelta(hours=-5))).isoformat(timespec="seconds")
        if r < 0.69:
            return moment.strftime("%Y-%m-%dT%H:%M:%S")
        millis = int(moment.timestamp() * 1000)
        if r < 0.77:
            return self.number(millis)
        if r < 0.90 and not self.canonical:
            return {"$date": moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")}
        return {"$date": {"$numberLong": str(millis)}}

    def ref(self, u: int) -> object:
        """A participant entry: mostly a plain id, sometimes wrapped."""
        r = self.rng.random()
        if self.mixed:
            return {"$oid": member_id(u)} if r < 0.5 else member_id(u)
        if r < 0.75:
            return member_id(u)
        if r < 0.82:
            return {"$oid": member_id(u)}
        return {("_id" if r < 0.88 else "userId" if r < 0.94 else "id"): member_id(u)}

    def users(self) -> Iterator[dict]:
        rng = self.rng
        for i in range(self.members):
            top = rng.choice(INTERESTS)
            doc: dict = {"_id": {"$oid": member_id(i)} if rng.random() < 0.1 else member_id(i),
                         "firstName": rng.choice(MIXED_FIRSTS if self.mixed else FIRSTS), "lastName": rng.choice(LASTS),
                         "email": f"member{i}@example.com", "phone": member_phone(i),
                         "gender": rng.choice(["female", "male", "non-binary"]),
                         "interests": [top, *rng.sample(INTERESTS, rng.randint(0, 4))],
                         "occupation": rng.choice(["Chef", "Nurse", "Editor", "Architect"]),
                         "homeNeighborhood": rng.choice(HOODS[:14] if self.mixed else HOODS),
                         "createdAt": self.date(NOW - timedelta(days=rng.randint(100, 900)))}
            r = rng.random()
            if r < 0.03:
                for name in ("lastName", "phone", "gender", "occupation", "homeNeighborhood"):
                    doc.pop(name)
            elif r < 0.05:
                doc["interests"] = rng.choice([[], None, [""], "music, food"])
            yield doc

    def events_(self) -> Iterator[dict]:
        rng = self.rng
        for e in range(self.events):
            name, categories, features = rng.choice(TEMPLATES)
            if self.mixed:
                categories = " ".join(rng.sample(MIXED_CATEGORIES, rng.randint(1, 2)))
                features = " ".join(rng.sample(MIXED_FEATURES, rng.randint(1, 2)))
            future = rng.random() < 0.08
            days = rng.uniform(0.2, 30) if future else -rng.uniform(1, 400)
            start = (NOW + timedelta(days=days)).replace(microsecond=0)
            seated = [rng.randrange(self.members) for _ in range(rng.randint(1, 9))]
            cap = max(len(seated), rng.randint(4, 20))
            doc: dict = {"_id": f"65e0{e:020x}", "name": name, "description": f"{name} with new people.",
                         "venueName": "Ember & Oak",
                         "neighborhood": rng.choice(HOODS[:14] if self.mixed else HOODS),
                         "categories": categories.split(), "features": features.split(),
                         "participants": [self.ref(u) for u in seated], "maxParticipants": self.number(cap),
                         "startDate": self.date(start),
                         "type": "private" if rng.random() < 0.1 else "public", "active": rng.random() > 0.05,
                         "eventStatus": rng.choices(["approved", "pending", "cancelled"], [90, 5, 5])[0],
                         "ownerId": self.ref(rng.randrange(self.members))}
            r = rng.random()
            if r < 0.002:
                doc["startDate"] = rng.choice(["TBD", None])
            elif r < 0.004:
                doc["participants"].append(rng.choice([None, 42, {"name": "x"}, doc["participants"][0]]))
            elif r < 0.005:
                doc["_id"] = {"$oid": f"65e0{e:020x}"}
            yield doc


def write(path: Path, docs: Iterator[dict], lines: bool) -> None:
    """Stream documents to a ``--jsonArray`` file or JSON Lines."""
    with path.open("w", encoding="utf-8") as out:
        if lines:
            for doc in docs:
                out.write(json.dumps(doc, ensure_ascii=False) + "\n")
            return
        out.write("[")
        for n, doc in enumerate(docs):
            out.write(("," if n else "") + json.dumps(doc, ensure_ascii=False))
        out.write("]\n")


def make_world(folder: Path, members: int, events: int | None = None, *, lines: bool = False,
               canonical: bool = False, seed: int = 20240611, mixed: bool = False) -> Path:
    """Write one world into ``folder`` (events default to 30% of the members)."""
    folder.mkdir(parents=True, exist_ok=True)
    world = World(members, events if events is not None else max(1, members * 3 // 10), canonical=canonical,
                  seed=seed, mixed=mixed)
    write(folder / "users.json", world.users(), lines)
    write(folder / "events.json", world.events_(), lines)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="the folder to write (--smoke: a temporary one)")
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--events", type=int)
    parser.add_argument("--lines", action="store_true", help="JSON Lines instead of a JSON array")
    parser.add_argument("--canonical", action="store_true", help="canonical Extended JSON")
    parser.add_argument("--mixed", action="store_true", help="the mixed shape (issue 21)")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI: 50 members in a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.out, args.members = Path(tempfile.mkdtemp(prefix="rtt-smoke-")), 50
    elif args.out is None:
        parser.error("the folder to write is required (or --smoke)")
    make_world(args.out, args.members, args.events, lines=args.lines, canonical=args.canonical, seed=args.seed,
               mixed=args.mixed)
    print(f"--now {NOW.strftime('%Y-%m-%dT%H:%M:%SZ')}", file=sys.stderr)
    if args.smoke:
        shutil.rmtree(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
