"""Hand-built test data and helpers shared by the test modules (fixtures live in conftest.py).

All people and places here are fictional (``@example.com`` emails, ``+1 212 555-01xx`` phones, the range set aside for fiction).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bson import ObjectId, json_util

import return_to_table as rtt

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)  # a Thursday
NOW_ISO = "2026-01-15T12:00:00Z"  # NOW as an ISO string, as --now takes it
PROCESSED = ("dormant_users", "future_events", "matches", "messages")  # data/processed/<name>.json

# Members of the small world.
MAYA = ObjectId("6500000000000000000000a1")  # dormant 45 days, 3 events, full profile
ZOE = ObjectId("6500000000000000000000a2")  # dormant 60 days, 1 event, full profile, non-GSM name
OMAR = ObjectId("6500000000000000000000a3")  # active (10 days)
GRACE = ObjectId("6500000000000000000000a4")  # churned (120 days)
NOAH = ObjectId("6500000000000000000000a5")  # new: no events
IVY = ObjectId("6500000000000000000000a6")  # dormant but only 3 profile fields
# Events of the small world.
JAZZ_BRUNCH = ObjectId("6600000000000000000000f1")
WINE_TASTING = ObjectId("6600000000000000000000f2")
PRIVATE_SUPPER = ObjectId("6600000000000000000000f3")
FULL_KARAOKE = ObjectId("6600000000000000000000f4")


def days_ago(days: float, hour: int | None = None) -> datetime:
    """``days`` before NOW (negative: after), optionally at ``hour`` UTC; naive, as pymongo returns dates."""
    moment = NOW - timedelta(days=days)
    if hour is not None:
        moment = moment.replace(hour=hour, minute=0, second=0, microsecond=0)
    return moment.replace(tzinfo=None)


def filler_ids(n: int, start: int = 0xB0) -> list[ObjectId]:
    """Participants who are not in the users collection (members of other campaigns)."""
    return [ObjectId(f"{start + i:024x}") for i in range(n)]


def small_world() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Six members and eight events, shaped like pymongo's output (ObjectIds, naive UTC datetimes)."""
    users = [
        {"_id": MAYA, "firstName": "Maya", "lastName": "Rivera", "email": "maya.rivera@example.com",
         "phone": "+12125550101", "gender": "female", "interests": ["music", "food"],
         "occupation": "AI Specialist", "homeNeighborhood": "hells-kitchen", "createdAt": days_ago(400)},
        {"_id": ZOE, "firstName": "Zoë", "lastName": "Okafor", "email": "zoe.okafor@example.com",
         "phone": "+12125550102", "gender": "female", "interests": ["wine"], "occupation": "UX Designer",
         "homeNeighborhood": "west-village"},
        {"_id": OMAR, "firstName": "Omar", "lastName": "Haddad", "email": "omar.haddad@example.com",
         "phone": "+12125550103", "gender": "male", "interests": ["music"], "occupation": "Chef",
         "homeNeighborhood": "chelsea"},
        {"_id": GRACE, "firstName": "Grace", "lastName": "Kim", "email": "grace.kim@example.com",
         "phone": "+12125550104", "interests": ["art"], "homeNeighborhood": "soho"},
        {"_id": NOAH, "firstName": "Noah", "lastName": "Park", "email": "noah.park@example.com",
         "interests": ["games"]},
        {"_id": IVY, "firstName": "Ivy", "email": "ivy@example.com", "interests": ["art"]},
    ]
    base = {"type": "public", "active": True, "eventStatus": "approved"}
    events = [
        {**base, "_id": ObjectId("6600000000000000000000e1"), "name": "Ramen Supper Club",
         "categories": ["DINNER"], "features": ["supper-club"], "neighborhood": "chelsea",
         "startDate": days_ago(60), "ownerId": OMAR, "participants": [MAYA, ZOE, IVY], "maxParticipants": 8},
        {**base, "_id": ObjectId("6600000000000000000000e2"), "name": "Karaoke Night",
         "categories": ["MUSIC", "BAR"], "features": ["karaoke"], "neighborhood": "hells-kitchen",
         "startDate": days_ago(45), "ownerId": MAYA, "participants": [MAYA, {"_id": str(OMAR)}],
         "maxParticipants": 10},
        {**base, "_id": ObjectId("6600000000000000000000e3"), "name": "Board Game Night",
         "categories": ["GAMES"], "features": ["board-games"], "neighborhood": "chelsea",
         "startDate": days_ago(10), "ownerId": OMAR, "participants": [OMAR], "maxParticipants": 6},
        {**base, "_id": ObjectId("6600000000000000000000e4"), "name": "Gallery Walk & Drinks",
         "categories": ["ART", "BAR"], "features": ["gallery"], "neighborhood": "soho",
         "startDate": days_ago(120), "ownerId": GRACE, "participants": [{"userId": str(GRACE)}, MAYA],
         "maxParticipants": 12},
        {**base, "_id": JAZZ_BRUNCH, "name": "Jazz Brunch", "venueName": "The Velvet Note",
         "categories": ["MUSIC", "BRUNCH"], "features": ["jazz", "live-music"], "neighborhood": "hells-kitchen",
         "startDate": days_ago(-3, 16), "ownerId": OMAR, "participants": [OMAR, *filler_ids(5)],
         "maxParticipants": 10, "description": "A live trio plays while we linger over eggs."},
        {**base, "_id": WINE_TASTING, "name": "Natural Wine Tasting", "venueName": "Fig & Thistle",
         "categories": ["WINE"], "features": ["wine-tasting"], "neighborhood": "west-village",
         "startDate": days_ago(-5, 23), "ownerId": OMAR, "participants": filler_ids(5, 0xC0),
         "maxParticipants": 8},
        {**base, "_id": PRIVATE_SUPPER, "name": "Private Supper", "type": "private",
         "categories": ["DINNER", "WINE", "MUSIC"], "neighborhood": "hells-kitchen",
         "startDate": days_ago(-2, 23), "ownerId": OMAR, "participants": [OMAR], "maxParticipants": 6},
        {**base, "_id": FULL_KARAOKE, "name": "Karaoke Night", "categories": ["MUSIC", "BAR"],
         "features": ["karaoke"], "neighborhood": "hells-kitchen", "startDate": days_ago(-2, 23),
         "ownerId": OMAR, "participants": filler_ids(4, 0xD0), "maxParticipants": 4},
    ]
    return users, events


def write_folder(folder: Path, users: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]],
                 form: str = "relaxed") -> Path:
    """Write ``users.json`` and ``events.json`` as ``mongoexport`` would: a JSON array or JSON Lines."""
    folder.mkdir(parents=True, exist_ok=True)
    options = json_util.CANONICAL_JSON_OPTIONS if form == "canonical" else json_util.RELAXED_JSON_OPTIONS
    for name, docs in (("users.json", users), ("events.json", events)):
        if form == "lines":
            text = "\n".join(json_util.dumps(doc, json_options=options) for doc in docs) + "\n"
        else:
            text = json_util.dumps(list(docs), json_options=options)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@dataclass
class CliRun:
    """One in-process run of ``return_to_table.main``: exit code, console output and the ``--out`` root."""

    code: int
    out: str
    err: str
    root: Path
    dry_run: bool = False  # a rehearsal keeps data/raw and data/processed under data/dry-run/

    def load(self, relative: str) -> Any:
        """A JSON file the run wrote, by its path under the ``--out`` root (``data/...``: the run's own data
        folder, ``data/dry-run/...`` for a dry run, except the mirror ``data/firebase``)."""
        return json.loads(self.path(relative).read_text(encoding="utf-8"))

    def path(self, relative: str) -> Path:
        """``relative`` under the ``--out`` root, ``data/`` read as the run's own data folder."""
        if self.dry_run and relative.startswith("data/") and not relative.startswith("data/firebase"):
            relative = "data/" + rtt.DRY_RUN_NAME + relative.removeprefix("data")
        return self.root / relative

    @property
    def matches(self) -> list[dict[str, Any]]:
        return self.load("data/processed/matches.json")

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.load("data/processed/messages.json")

    @property
    def ranked(self) -> list[str]:
        """The eligible members' ids in rank order (``data/processed/dormant_users.json``)."""
        return [user["_id"] for user in self.load("data/processed/dormant_users.json")]

    def report_path(self, suffix: str = ".json") -> Path:
        found = sorted(p for p in (self.root / "reports").glob(f"return_to_table_report_*{suffix}")
                       if p.name.endswith(f"_{rtt.DRY_RUN_NAME}{suffix}") == self.dry_run)
        assert len(found) == 1, found
        return found[0]

    def report(self) -> dict[str, Any]:
        return json.loads(self.report_path().read_text(encoding="utf-8"))

    def assert_complete(self) -> None:
        """The run left its one report and every processed file (whatever its exit code)."""
        self.report_path()
        for name in PROCESSED:
            assert self.path(f"data/processed/{name}.json").is_file(), name

    def all_text(self) -> str:
        """Console output and every file the run left under the ``--out`` root (logs, reports, data)."""
        texts = [self.out, self.err]
        texts += [p.read_text(encoding="utf-8", errors="replace") for p in self.root.rglob("*") if p.is_file()]
        return "\n".join(texts)


# What every harness run's environment holds unless the test says otherwise: the compliance decision a
# live run needs (SMS_OPT_OUT_TEXT=none: the sending system adds the opt-out), so messages read as drafted.
# A test of the refusal passes {"SMS_OPT_OUT_TEXT": ""} (empty is unset).
HARNESS_ENV = {"SMS_OPT_OUT_TEXT": "none"}


def run_main(argv: Sequence[str], root: Path, env: dict[str, str] | None = None, *, complete: bool = False,
             real_environment: bool = False, **kwargs: Any) -> CliRun:
    """Call the CLI in-process with ``--out root``, its stdout and stderr captured.

    The environment is ``env`` over ``HARNESS_ENV``; ``real_environment=True`` passes none instead, so the CLI
    reads the process environment and ``.env`` as the script does.  ``complete=True`` asserts the run left its
    report and processed files.  Other keywords go to ``main`` (e.g. ``mongo_client``).
    """
    assert not (real_environment and env is not None), "env and real_environment exclude each other"
    environment = None if real_environment else {**HARNESS_ENV, **(env or {})}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rtt.main([*argv, "--out", str(root)], env=environment, **kwargs)
    run = CliRun(code, out.getvalue(), err.getvalue(), root, dry_run="--dry-run" in argv)
    if complete:
        run.assert_complete()
    return run


def leaves(value: Any) -> list[Any]:
    """The scalar values of a document, in no particular order (what must survive renaming or re-encoding)."""
    if isinstance(value, dict):
        return [leaf for child in value.values() for leaf in leaves(child)]
    if isinstance(value, list):
        return [leaf for child in value for leaf in leaves(child)]
    return [value]
