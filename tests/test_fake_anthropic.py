"""Drive tests/fake_anthropic.py with the real ``anthropic`` SDK."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import anthropic
import pytest
from anthropic.types import Message, RedactedThinkingBlock, TextBlock, ThinkingBlock
from fake_anthropic import (
    FakeMessagesAPI,
    RecordedRequest,
    Reply,
    error_reply,
    json_reply,
    max_tokens_reply,
    refusal_reply,
    text_reply,
)

MODEL = "claude-sonnet-5-5"
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as server:
        yield server


@pytest.fixture
def client(fake: FakeMessagesAPI) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=fake.base_url, api_key="test-key", max_retries=2, timeout=5.0
    ) as c:
        yield c


def _create(client: anthropic.Anthropic, **kw: object) -> Message:
    params: dict[str, object] = {
        "model": MODEL,
        "max_tokens": 256,
        "messages": USER,
        **kw,
    }
    return client.messages.create(**params)  # type: ignore[arg-type]


def test_json_reply_parses_into_message_with_text_block(fake, client):
    fake.queue(json_reply({"name": "Ada", "score": 3}))
    msg = _create(client)
    assert isinstance(msg, Message)
    assert msg.id.startswith("msg_")
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.model == MODEL  # echoed from the request
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    [block] = msg.content
    assert isinstance(block, TextBlock)
    assert json.loads(block.text) == {"name": "Ada", "score": 3}
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    assert msg.usage.cache_creation_input_tokens == 0
    assert msg.usage.cache_read_input_tokens == 0


def test_usage_override(fake, client):
    fake.queue(
        text_reply(
            "hi",
            usage={
                "input_tokens": 7,
                "output_tokens": 3,
                "cache_read_input_tokens": 1000,
            },
        )
    )
    usage = _create(client).usage
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens) == (
        7,
        3,
        1000,
    )


def test_thinking_block_comes_before_text(fake, client):
    fake.queue(
        text_reply("answer", thinking="let me think", redacted_thinking="opaque==")
    )
    msg = _create(client, thinking={"type": "adaptive"})
    assert [b.type for b in msg.content] == ["thinking", "redacted_thinking", "text"]
    thinking, redacted, text = msg.content
    assert (
        isinstance(thinking, ThinkingBlock)
        and thinking.thinking == "let me think"
        and thinking.signature
    )
    assert isinstance(redacted, RedactedThinkingBlock) and redacted.data == "opaque=="
    assert isinstance(text, TextBlock) and text.text == "answer"
    assert fake.last_request.body["thinking"] == {"type": "adaptive"}


def test_529_then_success_is_retried_transparently(fake, client):
    fake.queue(error_reply(529, "overloaded_error"), json_reply({"ok": True}))
    msg = _create(client)
    assert json.loads(msg.content[0].text) == {"ok": True}
    assert len(fake.requests) == 2
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == ["0", "1"]
    # No retry-after header: SDK default backoff (0.5s * jitter in [0.75, 1]).
    gap = fake.requests[1].time - fake.requests[0].time
    assert 0.3 <= gap < 2.0


def test_529_exhausts_retries_and_raises_overloaded(fake, client):
    overloaded = error_reply(529, "overloaded_error", headers={"retry-after-ms": "1"})
    fake.queue(overloaded, overloaded, overloaded)
    with pytest.raises(anthropic.OverloadedError) as exc:
        _create(client)
    assert len(fake.requests) == 3  # 1 + max_retries=2
    assert exc.value.status_code == 529
    assert exc.value.type == "overloaded_error"
    assert exc.value.request_id and exc.value.request_id.startswith("req_")


def test_429_honours_retry_after_ms(fake, client):
    fake.queue(
        error_reply(429, "rate_limit_error", headers={"retry-after-ms": "10"}),
        text_reply("done"),
    )
    assert _create(client).content[0].text == "done"
    assert len(fake.requests) == 2
    gap = fake.requests[1].time - fake.requests[0].time
    assert 0.01 <= gap < 0.3  # ~10ms, well under the 0.375s minimum default backoff


def test_x_should_retry_false_disables_retry(fake, client):
    fake.queue(
        error_reply(529, "overloaded_error", headers={"x-should-retry": "false"}),
        text_reply("unused"),
    )
    with pytest.raises(anthropic.OverloadedError):
        _create(client)
    assert len(fake.requests) == 1
    assert fake.pending == 1


def test_400_raises_bad_request_without_retry(fake, client):
    fake.queue(
        error_reply(400, "invalid_request_error", "max_tokens: too large"),
        text_reply("unused"),
    )
    with pytest.raises(anthropic.BadRequestError) as exc:
        _create(client)
    assert len(fake.requests) == 1
    assert exc.value.type == "invalid_request_error"
    assert exc.value.api_message == "max_tokens: too large"
    assert exc.value.body["type"] == "error"


def test_refusal_reply(fake, client):
    fake.queue(
        refusal_reply(),
        refusal_reply("Partial ans", category="cyber", explanation="declined"),
    )
    msg = _create(client)
    assert msg.stop_reason == "refusal"
    assert msg.content == []
    assert msg.stop_details is not None and msg.stop_details.type == "refusal"
    assert msg.stop_details.category is None
    msg = _create(client)
    assert msg.stop_reason == "refusal"
    assert msg.content[0].text == "Partial ans"
    assert (
        msg.stop_details.category == "cyber"
        and msg.stop_details.explanation == "declined"
    )


def test_max_tokens_reply(fake, client):
    fake.queue(max_tokens_reply('{"name": "Ad'))
    msg = _create(client)
    assert msg.stop_reason == "max_tokens"
    assert msg.content[0].text == '{"name": "Ad'


def test_request_body_is_recorded(fake, client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    fake.queue(json_reply({"name": "x"}))
    _create(
        client,
        system=[
            {
                "type": "text",
                "text": "You are a parser.",
                "cache_control": {"type": "ephemeral"},
            }
        ],
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Parse: bob@example.com"}],
            }
        ],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    [req] = fake.requests
    assert isinstance(req, RecordedRequest)
    assert req.method == "POST" and req.path == "/v1/messages"
    assert req.body["model"] == MODEL
    assert req.body["max_tokens"] == 256
    assert req.body["system"][0]["text"] == "You are a parser."
    assert req.body["messages"][0]["content"][0]["text"] == "Parse: bob@example.com"
    assert req.body["output_config"] == {
        "format": {"type": "json_schema", "schema": schema}
    }
    assert "You are a parser." in req.all_text()
    assert "bob@example.com" in req.all_text()
    assert req.headers["content-type"] == "application/json"
    assert "anthropic-version" in req.headers
    assert "test-key" in req.headers.get("authorization", "") + req.headers.get(
        "x-api-key", ""
    )


def test_all_text_covers_string_system_and_plain_messages(fake, client):
    fake.queue(text_reply("ok"))
    _create(
        client,
        system="sys prompt",
        messages=[{"role": "user", "content": "plain user text"}],
    )
    text = fake.last_request.all_text()
    assert "sys prompt" in text and "plain user text" in text
    assert "@" not in text


def test_default_responder_and_callable_in_queue(fake, client):
    fake.default = lambda req: text_reply("echo:" + req.body["messages"][-1]["content"])
    fake.queue(lambda req: text_reply("first"))
    assert _create(client).content[0].text == "first"
    assert _create(client).content[0].text == "echo:Hello"
    assert len(fake.requests) == 2


def test_empty_queue_without_default_is_500_not_retried(fake, client):
    with pytest.raises(anthropic.InternalServerError):
        _create(client)
    assert len(fake.requests) == 1


def test_unknown_path_is_404(fake, client):
    with pytest.raises(anthropic.NotFoundError):
        client.models.list()
    assert fake.requests[0].method == "GET"


def test_latency_does_not_serialize_concurrent_requests():
    latency, n = 0.3, 6
    results: list[object] = []

    def call(client: anthropic.Anthropic) -> None:
        try:
            results.append(_create(client))
        except anthropic.APIError as e:  # surfaced by the assertion below
            results.append(e)

    with (
        FakeMessagesAPI(
            default=lambda req: json_reply({"ok": True}), latency=latency
        ) as fake,
        anthropic.Anthropic(
            base_url=fake.base_url, api_key="test-key", max_retries=0, timeout=5.0
        ) as client,
    ):
        threads = [threading.Thread(target=call, args=(client,)) for _ in range(n)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        elapsed = time.monotonic() - start
    assert len(results) == n and all(isinstance(r, Message) for r in results), results
    assert len(fake.requests) == n
    assert latency <= elapsed < n * latency / 2  # the calls overlapped: far from n latencies in a row


def test_per_reply_delay(fake, client):
    fake.queue(
        text_reply("slow", delay=0.2), Reply(200, text_reply("raw").body, delay=0.0)
    )
    start = time.monotonic()
    assert _create(client).content[0].text == "slow"
    assert time.monotonic() - start >= 0.2
    assert _create(client).content[0].text == "raw"  # bare Reply gets default headers
