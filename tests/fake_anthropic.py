"""A local, scriptable fake of the Anthropic Messages API (``POST /v1/messages``).

Why this exists: the CLI talks to Claude through the official ``anthropic`` SDK,
and the behaviour we care about in tests (retries on 429/529, honouring
``retry-after-ms``, refusals, ``max_tokens`` truncation, thinking blocks, what
was actually sent over the wire, concurrency) lives partly *inside* the SDK.
Mocking SDK methods would skip all of that.  Instead this module runs a real
HTTP server on 127.0.0.1 that speaks the Messages API wire format, so the real
SDK (pointed at it with ``base_url=``) does its own parsing, error mapping and
retrying, while tests script the replies and inspect every recorded request.

The server side uses only the standard library.  Usage::

    with FakeMessagesAPI() as fake:
        fake.queue(error_reply(529, "overloaded_error"), json_reply({"ok": True}))
        client = anthropic.Anthropic(base_url=fake.base_url, api_key="test-key")
        msg = client.messages.create(model="m", max_tokens=100, messages=[...])
        assert len(fake.requests) == 2

Replies are answered in FIFO order from :meth:`FakeMessagesAPI.queue`; when the
queue is empty the ``default`` responder (``request -> Reply``) answers; with
neither, a 500 carrying ``x-should-retry: false`` is returned so that a
mis-scripted test fails fast instead of being retried by the SDK.
"""

from __future__ import annotations

import copy
import json
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loopback import LoopbackHandler, LoopbackServer

__all__ = [
    "FakeMessagesAPI",
    "RecordedRequest",
    "Reply",
    "Responder",
    "error_reply",
    "json_reply",
    "max_tokens_reply",
    "refusal_reply",
    "text_reply",
]

_ALNUM = string.ascii_letters + string.digits

_DEFAULT_ERROR_MESSAGES = {
    "invalid_request_error": "Invalid request.",
    "authentication_error": "invalid x-api-key",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit.",
    "api_error": "Internal server error",
    "overloaded_error": "Overloaded",
}


def _rand_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


def _request_id() -> str:
    return _rand_id("req_011C", 20)


@dataclass
class Reply:
    """One scripted HTTP answer.

    ``body`` is a JSON-serialisable object (sent as JSON) or ``bytes`` (sent
    as-is).  A Message body whose ``model`` is ``None`` gets the request's
    ``model`` filled in when sent.  ``delay`` is slept (on top of the server's
    ``latency``) before this reply is written.
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class RecordedRequest:
    """What the fake received.  ``headers`` keys are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON (usually a dict), or None if absent / not JSON
    raw: bytes
    time: float  # time.monotonic() when the request arrived

    def all_text(self) -> str:
        """Every string value in ``system`` and ``messages``, newline-joined.

        Walks nested content blocks, so tests can assert that something (e.g.
        an e-mail address) appears nowhere in the prompt that was sent.
        For the whole request (tools, metadata, ...) search ``raw`` instead.
        """
        if not isinstance(self.body, dict):
            return ""
        parts: list[str] = []
        for key in ("system", "messages"):
            parts.extend(_strings(self.body.get(key)))
        return "\n".join(parts)


Responder = Callable[[RecordedRequest], Reply]


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)


# --------------------------------------------------------------------------
# Reply builders
# --------------------------------------------------------------------------


def _json_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json", "request-id": _request_id()}
    if extra:
        headers.update({k.lower(): str(v) for k, v in extra.items()})
    return headers


def _usage(text: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": 25,
        "output_tokens": max(1, len(text) // 4),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }
    if overrides:
        usage.update(overrides)
    if "cache_creation" not in usage:
        created = usage.get("cache_creation_input_tokens") or 0
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": created,
            "ephemeral_1h_input_tokens": 0,
        }
    return usage


def _message(
    content: list[dict[str, Any]],
    *,
    stop_reason: str | None,
    usage: dict[str, Any],
    model: str | None,
    stop_sequence: str | None = None,
    stop_details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": _rand_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "model": model,  # None -> echo the request's model when sent
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "stop_details": stop_details,
        "usage": usage,
    }


def text_reply(
    text: str,
    *,
    stop_reason: str = "end_turn",
    usage: dict[str, Any] | None = None,
    thinking: str | None = None,
    redacted_thinking: str | None = None,
    stop_sequence: str | None = None,
    model: str | None = None,
    headers: dict[str, str] | None = None,
    delay: float = 0.0,
) -> Reply:
    """A 200 Message whose content is ``[thinking?, redacted_thinking?, text]``.

    ``usage`` entries override the defaults (input_tokens=25, output_tokens
    ~len(text)/4, cache_creation_input_tokens=0, cache_read_input_tokens=0).
    ``model=None`` echoes the request's model.
    """
    content: list[dict[str, Any]] = []
    if thinking is not None:
        content.append(
            {"type": "thinking", "thinking": thinking, "signature": _rand_id("Eq", 64)}
        )
    if redacted_thinking is not None:
        content.append({"type": "redacted_thinking", "data": redacted_thinking})
    content.append({"type": "text", "text": text})
    body = _message(
        content,
        stop_reason=stop_reason,
        usage=_usage(text + (thinking or ""), usage),
        model=model,
        stop_sequence=stop_sequence,
    )
    return Reply(200, body, _json_headers(headers), delay)


def json_reply(obj: Any, **kw: Any) -> Reply:
    """``text_reply(json.dumps(obj), **kw)`` — what structured outputs return."""
    return text_reply(json.dumps(obj), **kw)


def max_tokens_reply(partial_text: str, **kw: Any) -> Reply:
    """Output cut off at ``max_tokens``: partial text, ``stop_reason="max_tokens"``."""
    return text_reply(partial_text, stop_reason="max_tokens", **kw)


def refusal_reply(
    partial_text: str = "",
    *,
    category: str | None = None,
    explanation: str | None = None,
    usage: dict[str, Any] | None = None,
    model: str | None = None,
    headers: dict[str, str] | None = None,
    delay: float = 0.0,
) -> Reply:
    """A 200 Message with ``stop_reason="refusal"`` (not an HTTP error).

    As in the real API, content is whatever was generated before the
    classifier intervened: empty by default, or one partial text block.
    ``stop_details`` is ``{"type": "refusal", "category", "explanation"}``,
    both of which may be null.
    """
    content = [{"type": "text", "text": partial_text}] if partial_text else []
    body = _message(
        content,
        stop_reason="refusal",
        usage=_usage(partial_text, usage),
        model=model,
        stop_details={
            "type": "refusal",
            "category": category,
            "explanation": explanation,
        },
    )
    return Reply(200, body, _json_headers(headers), delay)


def error_reply(
    status: int,
    error_type: str,
    message: str | None = None,
    headers: dict[str, str] | None = None,
    *,
    delay: float = 0.0,
) -> Reply:
    """An API error: ``{"type": "error", "error": {"type", "message"}, "request_id"}``.

    Typical: ``(529, "overloaded_error")``, ``(429, "rate_limit_error",
    headers={"retry-after-ms": "10"})``, ``(500, "api_error")``,
    ``(400, "invalid_request_error")``.  Pass ``{"x-should-retry": "false"}``
    to stop the SDK from retrying a status it would otherwise retry.
    """
    hdrs = _json_headers(headers)
    body = {
        "type": "error",
        "error": {
            "type": error_type,
            "message": message or _DEFAULT_ERROR_MESSAGES.get(error_type, error_type),
        },
        "request_id": hdrs["request-id"],
    }
    return Reply(status, body, hdrs, delay)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class _Handler(LoopbackHandler):
    def _handle(self) -> None:
        arrived = time.monotonic()
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw=raw,
            time=arrived,
        )
        reply = self.server.fake._answer(request)
        self._send(reply, request)

    do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _handle

    def _send(self, reply: Reply, request: RecordedRequest) -> None:
        body = reply.body
        if (
            isinstance(body, dict)
            and body.get("type") == "message"
            and body.get("model") is None
        ):
            body = copy.deepcopy(body)
            req_model = (
                request.body.get("model") if isinstance(request.body, dict) else None
            )
            body["model"] = req_model or "claude-unknown"
        if isinstance(body, bytes):
            payload = body
        elif body is None:
            payload = b""
        else:
            payload = json.dumps(body).encode()
        headers = {k.lower(): str(v) for k, v in reply.headers.items()}
        headers.setdefault("content-type", "application/json")
        headers.setdefault("request-id", _request_id())
        self.send_response(reply.status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()


class FakeMessagesAPI(LoopbackServer):
    """Threaded loopback HTTP server imitating ``POST /v1/messages``.

    Args:
        default: responder used when the queue is empty (``request -> Reply``).
        latency: seconds slept before answering every request.  Requests are
            served on separate threads, so concurrent calls overlap.
    """

    handler = _Handler

    def __init__(
        self, default: Responder | None = None, *, latency: float = 0.0
    ) -> None:
        super().__init__()
        self.default: Responder | None = default
        self.latency = latency
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Reply | Responder] = deque()
        self._lock = threading.Lock()

    # -- lifecycle: start/stop/with/port come from LoopbackServer ------------

    @property
    def base_url(self) -> str:
        """For ``anthropic.Anthropic(base_url=fake.base_url, api_key="test-key")``."""
        return self.url

    # -- scripting ---------------------------------------------------------

    def queue(self, *replies: Reply | Responder) -> None:
        """Append replies (or ``request -> Reply`` callables), answered FIFO."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def pending(self) -> int:
        """How many queued replies have not been used yet."""
        with self._lock:
            return len(self._queue)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            return self.requests[-1]

    # -- internals ---------------------------------------------------------

    def _answer(self, request: RecordedRequest) -> Reply:
        path = request.path.split("?", 1)[0]
        with self._lock:
            self.requests.append(request)
            if request.method != "POST" or path.rstrip("/") != "/v1/messages":
                scripted: Reply | Responder | None = error_reply(
                    404, "not_found_error", f"Not found: {request.method} {path}"
                )
            elif not isinstance(request.body, dict):
                scripted = error_reply(
                    400, "invalid_request_error", "Request body must be a JSON object"
                )
            elif isinstance(request.body, dict) and request.body.get("stream"):
                scripted = error_reply(
                    400,
                    "invalid_request_error",
                    "FakeMessagesAPI does not implement streaming",
                    {"x-should-retry": "false"},
                )
            elif self._queue:
                scripted = self._queue.popleft()
            else:
                scripted = self.default
        if scripted is None:
            reply = error_reply(
                500,
                "api_error",
                "FakeMessagesAPI: no scripted reply and no default responder",
                {"x-should-retry": "false"},
            )
        elif callable(scripted):  # a Responder; Reply itself is not callable
            reply = scripted(request)
        else:
            reply = scripted
        wait = self.latency + reply.delay
        if wait > 0:
            time.sleep(wait)
        return reply
