"""A local fake of the Firebase Realtime Database REST API (``/<path>.json``).

Why this exists: the CLI writes to the Realtime Database over plain HTTPS with
``httpx2``.  What matters in tests is the wire behaviour of the real service:
how arrays come back, that ``null`` deletes, ETag / ``if-match`` conditional
writes and their 412 answers, ``print=silent``, auth failures, key validation.
This module runs a real HTTP server on 127.0.0.1 that reproduces those rules,
so a client pointed at :attr:`FakeRealtimeDatabase.url` is exercised end to end.

Usage::

    with FakeRealtimeDatabase(auth_token="tok") as db:
        db.set("campaigns/c1", {"name": "x"})
        r = httpx2.get(f"{db.url}/campaigns/c1.json", params={"auth": "tok"},
                       headers={"X-Firebase-ETag": "true"})
        assert r.json() == {"name": "x"} and r.headers["etag"] == db.etag("campaigns/c1")

Semantics reproduced (source in brackets; "assumed" where no public source was found):

* Values are stored as a tree of dicts with string keys; leaves are str, int,
  float, bool.  ``null`` and empty objects/arrays are never stored: writing
  ``null`` deletes, and a parent left empty disappears.  [REST docs]
* Arrays are stored as objects keyed "0", "1", ...; ``null`` elements are
  dropped.  On read, an object whose keys are all canonical non-negative
  integers (no leading zeros) is rendered as a JSON array when
  ``max_key < 2 * number_of_keys`` ("more than half of the keys between 0 and
  the maximum key have non-empty values"); missing indices become ``null``.
  [firebase.blog 2014 "Best Practices: Arrays in Firebase"; same test in the
  Firebase iOS SDK ``valForExport`` and firebase-functions ``DataSnapshot``]
* Keys must be non-empty, at most 768 UTF-8 bytes, and contain none of
  ``. $ # [ ] /`` nor ASCII control characters 0-31 and 127.  [RTDB limits
  page]  A bad key in a body answers 400 ``Invalid data; couldn't parse key
  beginning at L:C. ...`` [message seen from the real service in
  max-barry/google-drive-cms#9]; a bad URL path answers 400 ``Invalid path:
  Invalid token in path`` [bugthesystem/FireSharp#153].  The ``.sv``,
  ``.value`` and ``.priority`` keys are accepted; ``{".sv": "timestamp"}`` and
  ``{".sv": {"increment": n}}`` are resolved, priorities are dropped.
* ``print=silent`` answers 204 with no body.  [REST docs]
* ETags: a GET with ``X-Firebase-ETag: true`` gets an ``ETag`` header; it is
  base64(sha1(canonical JSON)) of the rendered value (the real value is also a
  28-char base64 SHA-1 [firebase.blog 2017 "Introducing Conditional REST
  Requests"], but its exact input is not public, so only the shape matches).
  An empty location's ETag is ``null_etag`` [used as ``if-match`` for
  create-if-absent by several public clients].  PUT/DELETE with ``if-match``
  write only when it equals the current ETag (200 with the new ``ETag``),
  otherwise 412 whose body is the current value and whose ``ETag`` is the
  current one [firebase.blog 2017; firebase-admin-python
  ``set_if_unchanged``].  ``if-match`` together with ``print=silent`` answers
  400 [a public client's changelog: "Fixed HTTP 400 ... by removing
  print=silent from conditional Firebase PUT requests"].  ``if-match`` on
  PATCH/POST answers 400 [firebase-admin-python#77: the backend does not
  support it; the message text is assumed].
* Auth (only when ``auth_token`` is given): ``?auth=``, ``?access_token=`` or
  ``Authorization: Bearer``.  No credential: 401 ``Permission denied``; a bad
  ``auth=``: 401 ``Could not parse auth token.`` [both seen from the real
  service in public issue threads]; a bad access token: 401 ``Unauthorized
  request.`` [assumed].
* Error bodies look like the real ones, ``{\\n  "error" : "..."\\n}\\n``
  (a real 401 is 36 bytes long, which this format matches).
* Query parameters other than the known ones answer 400 [assumed];
  ``orderBy``/``limitTo*``/``startAt``/``endAt``/``equalTo``/``format``/
  ``download``/``callback`` are real but not implemented here: 501.
* Also assumed: the wording of the invalid-JSON, ``if-match``, depth (paths
  under 32 levels [limits page]) and PATCH-overlap errors; 404 for URLs not
  ending in ``.json``; 400 for ``shallow=true`` with ``X-Firebase-ETag``
  (firebase-admin-python refuses that pair client-side); numbers are kept as
  sent (``1.0`` stays a float).

Not the database itself: ``answer_writes_with(200, "<html>...")`` plays a proxy or captive
portal in front of it, answering writes with a fixed reply and storing nothing.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from loopback import LoopbackHandler, LoopbackServer

__all__ = ["CAPTIVE_PORTAL_PAGE", "NULL_ETAG", "FakeRealtimeDatabase", "RecordedRequest", "push_id"]

NULL_ETAG = "null_etag"
"""The ETag of a location that holds no data (and the ``if-match`` for "only if empty")."""

MAX_KEY_BYTES = 768
MAX_DEPTH = 32

_FORBIDDEN_KEY_CHARS = frozenset(".$#[]/") | {chr(c) for c in range(32)} | {chr(127)}
_FORBIDDEN_PATH_CHARS = _FORBIDDEN_KEY_CHARS - {"/"}
_SPECIAL_KEYS = frozenset({".sv", ".value", ".priority"})
_ARRAY_KEY = re.compile(r"(0|[1-9][0-9]{0,9})")
_INT32_MAX = 2**31 - 1

_KNOWN_PARAMS = frozenset(
    {
        "auth",
        "access_token",
        "print",
        "shallow",
        "timeout",
        "writeSizeLimit",
        "ns",
        "x-http-method-override",
    }
)
_UNIMPLEMENTED_PARAMS = frozenset(
    {
        "orderBy",
        "limitToFirst",
        "limitToLast",
        "startAt",
        "startAfter",
        "endAt",
        "endBefore",
        "equalTo",
        "format",
        "download",
        "callback",
    }
)

MSG_PERMISSION_DENIED = "Permission denied"
MSG_BAD_AUTH = "Could not parse auth token."
MSG_BAD_ACCESS_TOKEN = "Unauthorized request."
MSG_BAD_PATH = "Invalid path: Invalid token in path"
MSG_BAD_JSON = "Invalid data; couldn't parse JSON object, array, or value."
MSG_IF_MATCH_METHOD = "if-match header is only supported for PUT and DELETE requests."
MSG_IF_MATCH_SILENT = "print=silent can't be used with the if-match header."
MSG_PATCH_NOT_OBJECT = "Invalid data; PATCH requires a JSON object."

Value = dict[str, Any] | str | int | float | bool | None

# ---------------------------------------------------------------------------
# push ids (same alphabet and layout as the Firebase SDKs: 8 time chars + 12 random)
# ---------------------------------------------------------------------------

_PUSH_CHARS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_push_lock = threading.Lock()
_last_push_ms = -1
_last_rand: list[int] = []


def push_id(now_ms: int | None = None) -> str:
    """Return a 20-char push id; ids sort in creation order, even within one ms."""
    global _last_push_ms, _last_rand
    with _push_lock:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if now <= _last_push_ms:  # same (or earlier) ms: bump the random part
            now = _last_push_ms
            rand = list(_last_rand)
            i = 11
            while i >= 0 and rand[i] == 63:
                rand[i] = 0
                i -= 1
            if i < 0:  # 64**12 ids in one ms: move to the next ms
                now += 1
                rand = [secrets.randbelow(64) for _ in range(12)]
            else:
                rand[i] += 1
        else:
            rand = [secrets.randbelow(64) for _ in range(12)]
        _last_push_ms, _last_rand = now, rand
    stamp = []
    for _ in range(8):
        stamp.append(_PUSH_CHARS[now % 64])
        now //= 64
    return "".join(reversed(stamp)) + "".join(_PUSH_CHARS[r] for r in rand)


# ---------------------------------------------------------------------------
# errors, keys, paths
# ---------------------------------------------------------------------------


class _RtdbError(Exception):
    """An error answer: ``status`` with body ``{"error": message}``."""

    def __init__(self, status: int, message: str, *, bad_key: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.bad_key = bad_key  # the HTTP layer rewrites it with the key's position


def _key_problem(key: str) -> str | None:
    if key == "":
        return "empty"
    if any(ch in _FORBIDDEN_KEY_CHARS for ch in key):
        return "forbidden character"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    return None


def _check_key(key: str) -> None:
    problem = _key_problem(key)
    if problem:
        raise _RtdbError(400, f"Invalid key {key!r}: {problem}", bad_key=True)


def _patch_key_segments(key: str) -> list[str]:
    """Split a PATCH body key ("a/b") into segments; leading/trailing '/' allowed."""
    segs = key.split("/")
    while segs and segs[0] == "":
        segs.pop(0)
    while segs and segs[-1] == "":
        segs.pop()
    if not segs:
        raise _RtdbError(400, f"Invalid key {key!r}: empty", bad_key=True)
    for seg in segs:
        _check_key(seg)
    return segs


def _path_segments(path: str) -> list[str]:
    """Segments of a database path such as ``"a/b"``, ``"/a/b"`` (no ``.json``)."""
    segs = [s for s in path.split("/") if s != ""]
    for seg in segs:
        if any(ch in _FORBIDDEN_PATH_CHARS for ch in seg) or len(seg.encode()) > MAX_KEY_BYTES:
            raise _RtdbError(400, MSG_BAD_PATH)
    return segs


def _url_segments(url_path: str) -> list[str]:
    """Segments of a request URL path such as ``/a/b%20c.json``."""
    if not url_path.endswith(".json"):
        raise _RtdbError(404, "Not found: the REST API needs URLs ending in .json")
    return _path_segments(urllib.parse.unquote(url_path[: -len(".json")]))


def _key_positions(text: str) -> Iterator[tuple[str, int, int]]:
    """Yield ``(key, depth, offset)`` for every object key of valid JSON ``text``."""
    stack: list[str] = []
    expect_key = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "{":
            stack.append("o")
            expect_key = True
        elif ch == "[":
            stack.append("a")
            expect_key = False
        elif ch in "}]":
            stack.pop()
            expect_key = False
        elif ch == ",":
            expect_key = bool(stack) and stack[-1] == "o"
        elif ch == ":":
            expect_key = False
        elif ch == '"':
            s, end = json.decoder.scanstring(text, i + 1)
            if expect_key:
                yield s, len(stack), i
                expect_key = False
            i = end
            continue
        i += 1


def _bad_key_message(text: str, *, patch: bool) -> str:
    """The real service's message for the first invalid key, with its line:column."""
    for key, depth, offset in _key_positions(text):
        if key in _SPECIAL_KEYS:
            continue
        try:
            if patch and depth == 1:
                _patch_key_segments(key)
            else:
                _check_key(key)
        except _RtdbError:
            line = text.count("\n", 0, offset) + 1
            col = offset - (text.rfind("\n", 0, offset) + 1) + 1
            return (
                f"Invalid data; couldn't parse key beginning at {line}:{col}. "
                "Key value can't be empty or contain $ # [ ] / or ."
            )
    return "Invalid data; couldn't parse key."


# ---------------------------------------------------------------------------
# the tree: normalising writes, rendering reads
# ---------------------------------------------------------------------------


def _get(node: Value, segs: list[str]) -> Value:
    for seg in segs:
        if not isinstance(node, dict) or seg not in node:
            return None
        node = node[seg]
    return node


def _set(node: Value, segs: list[str], value: Value) -> Value:
    """Return ``node`` with ``value`` at ``segs`` (None deletes; empty parents vanish)."""
    if not segs:
        return value
    base = dict(node) if isinstance(node, dict) else {}
    child = _set(base.get(segs[0]), segs[1:], value)
    if child is None:
        base.pop(segs[0], None)
    else:
        base[segs[0]] = child
    return base or None


def _depth(value: Value) -> int:
    if isinstance(value, dict):
        return 1 + max(_depth(v) for v in value.values())
    return 0


def _normalize(value: Any, loc: list[str], current: Callable[[list[str]], Value]) -> Value:
    """Turn request JSON into stored form (arrays -> dicts, nulls and empties dropped).

    ``loc`` is where ``value`` will be written; ``current(segs)`` reads the tree
    as it is before the write (for ``.sv`` increments).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, list):
        items: Iterator[tuple[str, Any]] = ((str(i), v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        if ".sv" in value:
            return _server_value(value[".sv"], loc, current)
        if ".value" in value:
            return _normalize(value[".value"], loc, current)
        items = ((k, v) for k, v in value.items() if k != ".priority")
    else:
        raise _RtdbError(400, MSG_BAD_JSON)
    out: dict[str, Any] = {}
    for key, child in items:
        _check_key(key)
        norm = _normalize(child, [*loc, key], current)
        if norm is not None:
            out[key] = norm
    return out or None


def _server_value(spec: Any, loc: list[str], current: Callable[[list[str]], Value]) -> Value:
    if spec == "timestamp":
        return int(time.time() * 1000)
    if isinstance(spec, dict) and set(spec) == {"increment"}:
        delta = spec["increment"]
        old = current(loc)
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            return old + delta
        return delta
    raise _RtdbError(400, "Invalid data; unknown server value (.sv).")


def _render(node: Value) -> Any:
    """What a GET returns for a stored node (integer-keyed dicts may become arrays)."""
    if not isinstance(node, dict):
        return node
    rendered = {k: _render(v) for k, v in node.items()}
    max_key = -1
    for key in node:
        if not _ARRAY_KEY.fullmatch(key) or int(key) > _INT32_MAX:
            return rendered
        max_key = max(max_key, int(key))
    if max_key < 2 * len(node):
        return [rendered.get(str(i)) for i in range(max_key + 1)]
    return rendered


def etag_of(node: Value) -> str:
    """The ETag of a stored node: ``null_etag`` when empty, else base64(sha1(JSON))."""
    if node is None:
        return NULL_ETAG
    canon = json.dumps(_render(node), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(hashlib.sha1(canon.encode("utf-8")).digest()).decode()


def _dumps(value: Any, *, pretty: bool = False) -> bytes:
    if pretty:
        text = json.dumps(value, indent=2, separators=(",", " : "), ensure_ascii=False)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _error_payload(message: str) -> bytes:
    return ('{\n  "error" : ' + json.dumps(message, ensure_ascii=False) + "\n}\n").encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_body(raw: bytes) -> tuple[Any, str]:
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant), text
    except ValueError:
        raise _RtdbError(400, MSG_BAD_JSON) from None


# ---------------------------------------------------------------------------
# recorded requests and scripted failures
# ---------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request as received; ``status`` is filled in once it is answered."""

    method: str
    path: str  # URL path as sent, e.g. "/campaigns/c1.json"
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int | None = None

    def json(self) -> Any:
        """The body parsed as JSON (``None`` when empty)."""
        return json.loads(self.body) if self.body else None


@dataclass
class _Failure:
    status: int
    count: int
    method: str | None
    segs: list[str] | None
    body: bytes | None
    used: int = field(default=0)

    def matches(self, method: str, segs: list[str] | None) -> bool:
        return (self.method is None or self.method == method) and (self.segs is None or self.segs == segs)


def _body_bytes(body: Any) -> bytes | None:
    """A scripted answer's body: None stays None, bytes as is, text as UTF-8, anything else as JSON."""
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return _dumps(body)


def _user_path_segments(path: str) -> list[str]:
    path = path.split("?", 1)[0].removesuffix(".json")
    return [s for s in urllib.parse.unquote(path).split("/") if s]


# ---------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    body: bytes | None = None  # None: no body (204)
    etag: str | None = None
    drop: bool = False  # close the connection without answering
    content_type: str = "application/json; charset=utf-8"


@dataclass
class _WriteAnswer:
    """A fixed answer to writes, from something in front of the database (``answer_writes_with``)."""

    status: int
    body: bytes | None
    content_type: str
    segs: list[str] | None
    count: int | None  # None: every matching write
    used: int = field(default=0)


WRITE_METHODS = frozenset({"PUT", "PATCH", "POST", "DELETE"})
CAPTIVE_PORTAL_PAGE = (
    "<!DOCTYPE html><html><head><title>Sign in to the network</title></head>"
    "<body><h1>Welcome</h1><p>Accept the terms to continue.</p></body></html>"
)


class _Handler(LoopbackHandler):
    # one buffered write per answer, sent at once: no Nagle / delayed-ACK stalls
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=split.path,
            query=dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
        )
        answer = self.server.fake._answer(request)
        if answer.drop:
            self.close_connection = True
            return
        self.send_response(answer.status)
        if answer.body is not None:
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Access-Control-Allow-Origin", "*")
        if answer.etag is not None:
            self.send_header("ETag", answer.etag)
        self.end_headers()
        if answer.body is not None:
            self.wfile.write(answer.body)
        self.wfile.flush()

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _handle


# ---------------------------------------------------------------------------
# the fake
# ---------------------------------------------------------------------------


class FakeRealtimeDatabase(LoopbackServer):
    """Threaded loopback server imitating the Realtime Database REST API.

    Args:
        auth_token: when set, every request must carry it as ``?auth=``,
            ``?access_token=`` or ``Authorization: Bearer``; otherwise 401.
    """

    handler = _Handler
    poll_interval = 0.01

    def __init__(self, auth_token: str | None = None) -> None:
        super().__init__()
        self.auth_token = auth_token
        self.requests: list[RecordedRequest] = []
        self._root: Value = None
        self._lock = threading.RLock()
        self._failures: list[_Failure] = []
        self._write_answers: list[_WriteAnswer] = []
        self._hooks: list[Callable[[RecordedRequest], None]] = []

    # -- lifecycle: start/stop/with and url (append ``/<path>.json``) come from LoopbackServer

    # -- test helpers ------------------------------------------------------

    @property
    def data(self) -> Value:
        """A deep copy of the raw stored tree (arrays appear as "0","1"... dicts; None if empty)."""
        with self._lock:
            return copy.deepcopy(self._root)

    def get_rendered(self, path: str = "") -> Any:
        """What ``GET /<path>.json`` would return (arrays rendered, None when empty)."""
        segs = self._segments_or_value_error(path)
        with self._lock:
            return _render(_get(self._root, segs))

    def etag(self, path: str = "") -> str:
        """The current ETag of ``path`` (``null_etag`` when it holds nothing)."""
        segs = self._segments_or_value_error(path)
        with self._lock:
            return etag_of(_get(self._root, segs))

    def set(self, path: str, value: Any) -> None:
        """Seed data at ``path`` with PUT's rules (None deletes); ValueError if invalid."""
        segs = self._segments_or_value_error(path)
        with self._lock:
            try:
                norm = _normalize(value, segs, lambda s: _get(self._root, s))
                self._check_depth(segs, norm)
            except _RtdbError as exc:
                raise ValueError(exc.message) from None
            self._root = _set(self._root, segs, norm)

    def fail_next(
        self,
        status: int,
        count: int = 1,
        method: str | None = None,
        path: str | None = None,
        body: Any = None,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` instead of processing.

        ``method``/``path`` (e.g. ``"PUT"``, ``"a/b"`` or ``"/a/b.json"``) narrow the
        match.  ``body``: None gives ``{"error": "<reason>"}``; bytes/str are sent
        as is; anything else as JSON.  ``status=0`` closes the connection
        without any answer (a network drop).  Failures are used in FIFO order.
        """
        payload = _body_bytes(body)
        segs = None if path is None else _user_path_segments(path)
        with self._lock:
            self._failures.append(_Failure(status, count, method.upper() if method else None, segs, payload))

    def answer_writes_with(
        self,
        status: int = 200,
        body: Any = CAPTIVE_PORTAL_PAGE,
        content_type: str = "text/html; charset=utf-8",
        *,
        path: str | None = None,
        count: int | None = None,
    ) -> None:
        """Answer writes (PUT, PATCH, POST, DELETE) with ``status`` and ``body`` and store nothing.

        This is a proxy or captive portal in front of the database: it answers, say, 200 with an
        HTML page, and the write never reaches the data.  ``body``: bytes/str are sent as is
        (``None``: no body), anything else as JSON, under ``content_type``.  ``path`` narrows it to
        writes at that path; ``count`` to the next ``count`` of them (``None``: every one).  GETs and
        scripted failures (``fail_next``, tried first) are unaffected.
        """
        payload = _body_bytes(body)
        segs = None if path is None else _user_path_segments(path)
        with self._lock:
            self._write_answers.append(_WriteAnswer(status, payload, content_type, segs, count))

    def on_request(self, callback: Callable[[RecordedRequest], None]) -> Callable[[RecordedRequest], None]:
        """Call ``callback(request)`` for every request before it is processed.

        The callback may change the data (``db.set(...)``), e.g. to imitate a
        reviewer editing a record between the client's GET and its conditional
        PUT.  Returns ``callback``, so it also works as a decorator.
        """
        with self._lock:
            self._hooks.append(callback)
        return callback

    # -- internals ---------------------------------------------------------

    @staticmethod
    def _segments_or_value_error(path: str) -> list[str]:
        try:
            return _path_segments(path)
        except _RtdbError as exc:
            raise ValueError(f"{exc.message}: {path!r}") from None

    @staticmethod
    def _check_depth(segs: list[str], norm: Value) -> None:
        if norm is not None and len(segs) + _depth(norm) >= MAX_DEPTH:
            raise _RtdbError(400, f"Invalid data; paths must be less than {MAX_DEPTH} levels deep.")

    def _answer(self, request: RecordedRequest) -> _Answer:
        with self._lock:
            self.requests.append(request)
            hooks = list(self._hooks)
        for hook in hooks:
            hook(request)
        with self._lock:
            try:
                answer = self._scripted(request) or self._intercepted(request) or self._process(request)
            except _RtdbError as exc:
                answer = _Answer(exc.status, _error_payload(exc.message))
            request.status = answer.status
            return answer

    def _scripted(self, request: RecordedRequest) -> _Answer | None:
        segs = _user_path_segments(request.path) if request.path.endswith(".json") else None
        for failure in self._failures:
            if failure.matches(request.method, segs):
                failure.used += 1
                if failure.used >= failure.count:
                    self._failures.remove(failure)
                if failure.status == 0:
                    return _Answer(0, drop=True)
                body = failure.body
                if body is None and failure.status not in (204, 304):
                    try:
                        reason = HTTPStatus(failure.status).phrase
                    except ValueError:
                        reason = "Error"
                    body = _error_payload(reason)
                return _Answer(failure.status, body)
        return None

    def _intercepted(self, request: RecordedRequest) -> _Answer | None:
        if request.method not in WRITE_METHODS:
            return None
        segs = _user_path_segments(request.path) if request.path.endswith(".json") else None
        for answer in self._write_answers:
            if answer.segs is None or answer.segs == segs:
                answer.used += 1
                if answer.count is not None and answer.used >= answer.count:
                    self._write_answers.remove(answer)
                return _Answer(answer.status, answer.body, content_type=answer.content_type)
        return None

    def _check_auth(self, request: RecordedRequest) -> None:
        if self.auth_token is None:
            return
        given = False
        if "auth" in request.query:
            given = True
            if request.query["auth"] != self.auth_token:
                raise _RtdbError(401, MSG_BAD_AUTH)
        if "access_token" in request.query:
            given = True
            if request.query["access_token"] != self.auth_token:
                raise _RtdbError(401, MSG_BAD_ACCESS_TOKEN)
        authz = request.headers.get("authorization")
        if authz is not None:
            given = True
            scheme, _, token = authz.partition(" ")
            if scheme.lower() != "bearer" or token.strip() != self.auth_token:
                raise _RtdbError(401, MSG_BAD_ACCESS_TOKEN)
        if not given:
            raise _RtdbError(401, MSG_PERMISSION_DENIED)

    def _process(self, request: RecordedRequest) -> _Answer:
        method = request.method
        if method == "POST":
            override = request.headers.get("x-http-method-override") or request.query.get("x-http-method-override")
            if override:
                method = override.upper()
        if method not in ("GET", "PUT", "PATCH", "POST", "DELETE"):
            raise _RtdbError(405, f"Method {method} is not supported.")
        segs = _url_segments(request.path)
        self._check_auth(request)

        q = request.query
        for name in q:
            if name in _UNIMPLEMENTED_PARAMS:
                raise _RtdbError(501, f"fake_rtdb does not implement the {name!r} parameter.")
            if name not in _KNOWN_PARAMS:
                raise _RtdbError(400, f"Invalid parameter: {name!r}.")
        printing = q.get("print")
        if printing not in (None, "pretty", "silent"):
            raise _RtdbError(400, "print must be 'pretty' or 'silent'.")
        silent, pretty = printing == "silent", printing == "pretty"
        shallow = q.get("shallow") == "true"
        want_etag = request.headers.get("x-firebase-etag", "").lower() == "true"
        if_match = request.headers.get("if-match")

        if if_match is not None:
            if method in ("PATCH", "POST"):
                raise _RtdbError(400, MSG_IF_MATCH_METHOD)
            if silent and method in ("PUT", "DELETE"):
                raise _RtdbError(400, MSG_IF_MATCH_SILENT)
        if shallow and want_etag:
            raise _RtdbError(400, "shallow=true can't be used with X-Firebase-ETag.")

        def reply(value: Any, *, etag: str | None = None) -> _Answer:
            if silent:
                return _Answer(204, None, etag)
            return _Answer(200, _dumps(value, pretty=pretty), etag)

        current = _get(self._root, segs)
        if method == "GET":
            if shallow and isinstance(current, dict):
                value: Any = {k: True for k in current}
            else:
                value = _render(current)
            return reply(value, etag=etag_of(current) if want_etag else None)

        if if_match is not None and if_match != etag_of(current):
            return _Answer(412, _dumps(_render(current), pretty=pretty), etag_of(current))

        if method == "DELETE":
            self._root = _set(self._root, segs, None)
            new_etag = NULL_ETAG if (want_etag or if_match is not None) else None
            return reply(None, etag=new_etag)

        body, text = _parse_body(request.body)

        def lookup(s: list[str]) -> Value:
            return _get(self._root, s)

        try:
            if method == "PUT":
                norm = _normalize(body, segs, lookup)
                self._check_depth(segs, norm)
                self._root = _set(self._root, segs, norm)
                new = _get(self._root, segs)
                etag = etag_of(new) if (want_etag or if_match is not None) else None
                return reply(_render(norm), etag=etag)

            if method == "POST":
                name = push_id()
                norm = _normalize(body, [*segs, name], lookup)
                self._check_depth([*segs, name], norm)
                self._root = _set(self._root, [*segs, name], norm)
                return reply({"name": name})

            # PATCH
            if not isinstance(body, dict):
                raise _RtdbError(400, MSG_PATCH_NOT_OBJECT)
            updates: list[tuple[list[str], Value]] = []
            for key, child in body.items():
                rel = _patch_key_segments(key)
                loc = [*segs, *rel]
                norm = _normalize(child, loc, lookup)
                self._check_depth(loc, norm)
                updates.append((loc, norm))
            paths = sorted(tuple(loc) for loc, _ in updates)
            for a, b in itertools.pairwise(paths):
                if b[: len(a)] == a:
                    raise _RtdbError(
                        400,
                        f"Invalid data; path '{'/'.join(a)}' is an ancestor of '{'/'.join(b)}' in the same update.",
                    )
            root = self._root
            for loc, norm in updates:
                root = _set(root, loc, norm)
            self._root = root
            return reply(body, etag=etag_of(_get(root, segs)) if want_etag else None)
        except _RtdbError as exc:
            if exc.bad_key:
                raise _RtdbError(400, _bad_key_message(text, patch=method == "PATCH")) from None
            raise
