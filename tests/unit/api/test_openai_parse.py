"""The OpenAI-compatible layer without a daemon: parsing, error shape, response objects."""

from __future__ import annotations

import json
from typing import Any, cast

import anyio
import pytest

from modeld.api.openai import DONE, Envelope, OpenAISink
from modeld.api.openai_request import parse_chat, parse_completion
from modeld.chat_template import ChatMessage, ChatTemplateError
from modeld.errors import (
    InvalidRequest,
    ModeldError,
    ModelNotFound,
    QueueFull,
    ShuttingDown,
    WorkerCrashed,
)
from modeld.http.server import Responder
from modeld.manager.backend import Finished, Started

USER_HI = [{"role": "user", "content": "hi"}]


def test_completion_defaults() -> None:
    req = parse_completion({"model": "m", "prompt": "hello"})
    assert req.model == "m" and req.messages is None
    assert req.params.prompt == "hello" and req.params.max_tokens == 16
    assert req.params.stop == () and req.params.seed is None
    assert req.stream is False and req.include_usage is False


def test_completion_fields() -> None:
    req = parse_completion(
        {
            "model": "m",
            "prompt": ["hello"],
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "user": {"not": "checked"},
            "logit_bias": {"1": 2},
            "frequency_penalty": 0.5,
        }
    )
    p = req.params
    assert (p.prompt, p.max_tokens, p.temperature, p.top_p, p.seed) == ("hello", 7, 0.0, 0.5, 3)
    assert p.stop == ("\n",) and req.stream and req.include_usage


def test_max_completion_tokens_wins() -> None:
    req = parse_completion(
        {"model": "m", "prompt": "x", "max_tokens": 5, "max_completion_tokens": 9}
    )
    assert req.params.max_tokens == 9


def test_stop_list() -> None:
    req = parse_completion({"model": "m", "prompt": "x", "stop": ["a", "b"]})
    assert req.params.stop == ("a", "b")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": 3, "prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "m", "prompt": "a\0b"}, "prompt"),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "n": "1"}, "n"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": "9"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": -0.1}, "top_p"),
        ({"model": "m", "prompt": "x", "seed": 1.5}, "seed"),
        ({"model": "m", "prompt": "x", "seed": 2**63}, "seed"),
        ({"model": "m", "prompt": "x", "stop": 5}, "stop"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "stream_options": True}, "stream_options"),
        (
            {"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
        (
            {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
    ],
)
def test_completion_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion(body)
    assert info.value.param == param and info.value.http_status == 400


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest):
        parse_completion(["prompt"])
    with pytest.raises(InvalidRequest):
        parse_chat("hi")


def test_chat_defaults_run_to_the_context() -> None:
    req = parse_chat({"model": "m", "messages": USER_HI})
    assert req.messages == (ChatMessage("user", "hi"),)
    assert req.params.prompt == "" and req.params.max_tokens >= 1 << 20
    assert not req.stream


def test_chat_message_forms() -> None:
    req = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "user", "content": "c", "name": "ann", "extra": 1},
            ],
        }
    )
    assert req.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "a\nb"),
        ChatMessage("assistant", ""),
        ChatMessage("user", "c", "ann"),
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (None, "messages"),
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "x\0"}], "messages[0]"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content"),
        ([*USER_HI, {"role": "user", "content": "x", "name": 1}], "messages[1].name"),
    ],
)
def test_chat_errors_name_the_field(messages: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat({"model": "m", "messages": messages})
    assert info.value.param == param


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidRequest("bad", param="n"), "invalid_request_error"),
        (ModelNotFound("no model 'x'", param="model"), "not_found_error"),
        (QueueFull("full", retry_after_ms=1500), "rate_limit_error"),
        (ChatTemplateError("unsafe"), "server_error"),
        (ShuttingDown("bye"), "server_error"),
    ],
)
def test_error_shape(error: ModeldError, kind: str) -> None:
    body = error.to_openai()
    expected = {"message": error.message, "type": kind, "param": error.param, "code": error.code}
    assert body == {"error": {**error.extra, **expected}}


def test_retry_after_header_of_a_full_queue() -> None:
    assert QueueFull("full", retry_after_ms=1500).headers() == [("Retry-After", "2")]


def _data(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE byte string, [DONE] as the string."""
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ") and "\n" not in block
        payload = block.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


FIN = Finished("length", prompt_tokens=3, completion_tokens=2)
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_whole_objects() -> None:
    chat = Envelope(True, "m.gguf").whole("hi", FIN)
    assert chat["id"].startswith("chatcmpl-") and chat["object"] == "chat.completion"
    assert chat["model"] == "m.gguf" and isinstance(chat["created"], int)
    assert chat["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert chat["usage"] == USAGE
    text = Envelope(False, "m.gguf").whole("hi", Finished("cancelled", 3, 2))
    assert text["id"].startswith("cmpl-") and text["object"] == "text_completion"
    assert text["choices"] == [
        {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}
    ]


class FakeResponder:
    """Records what a sink writes."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.ended = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, headers

    async def send(self, data: bytes) -> None:
        self.body += data

    async def end(self) -> None:
        self.ended = True

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body, self.ended = status, headers, body, True


def _run(sink: OpenAISink, *, fail: ModeldError | None = None) -> None:
    async def feed() -> None:
        await sink.started(Started(prompt_tokens=3))
        await sink.tokens(("Hel", "lo"))
        await sink.tokens((" there",))
        if fail is not None:
            await sink.failed(fail)
        else:
            await sink.finished(FIN)

    anyio.run(feed)


def test_chat_stream_with_usage() -> None:
    res = FakeResponder()
    _run(OpenAISink(cast(Responder, res), Envelope(True, "m", include_usage=True), stream=True))
    assert res.status == 200 and ("Content-Type", "text/event-stream") in res.headers
    assert res.body.endswith(DONE) and res.ended
    events = _data(res.body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hello", " there"]
    assert chunks[3]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert all(c["usage"] is None for c in chunks[:4])
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == USAGE


def test_completion_stream_without_usage() -> None:
    res = FakeResponder()
    _run(OpenAISink(cast(Responder, res), Envelope(False, "m"), stream=True))
    chunks = _data(res.body)[:-1]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " there", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all("usage" not in c for c in chunks)


def test_non_streaming_answer_is_one_object() -> None:
    res = FakeResponder()
    _run(OpenAISink(cast(Responder, res), Envelope(True, "m"), stream=False))
    body = json.loads(res.body)
    assert res.status == 200 and body["choices"][0]["message"]["content"] == "Hello there"
    assert body["usage"] == USAGE


def test_a_failure_mid_stream_is_an_error_payload_without_done() -> None:
    res = FakeResponder()
    _run(
        OpenAISink(cast(Responder, res), Envelope(True, "m"), stream=True),
        fail=WorkerCrashed("the worker died"),
    )
    events = _data(res.body)
    assert "[DONE]" not in events and res.ended
    assert events[-1] == {
        "error": {
            "message": "the worker died",
            "type": "server_error",
            "param": None,
            "code": "worker_crashed",
        }
    }


def test_a_failure_before_a_non_streaming_answer_is_raised() -> None:
    res = FakeResponder()
    with pytest.raises(WorkerCrashed):
        _run(
            OpenAISink(cast(Responder, res), Envelope(True, "m"), stream=False),
            fail=WorkerCrashed("the worker died"),
        )
    assert res.status == 0


def test_top_p_zero_keeps_only_the_most_likely_token() -> None:
    params = parse_completion({"model": "m", "prompt": "x", "top_p": 0}).params
    assert (params.top_p, params.top_k) == (1.0, 1)


@pytest.mark.parametrize(
    ("seed", "want"), [(-1, None), (-(2**63), None), (7, 7), (2**32 + 5, 5), (None, None)]
)
def test_any_64_bit_seed_is_taken(seed: int | None, want: int | None) -> None:
    assert parse_completion({"model": "m", "prompt": "x", "seed": seed}).params.seed == want


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", ["", "hi", 'a "quoted"\nline', "é\u2028\x00", "\\u0000"])
def test_the_text_frame_a_worker_writes_is_the_chunk_the_daemon_would(
    chat: bool, text: str
) -> None:
    envelope = Envelope(chat, 'odd "model" %s.gguf', include_usage=True)
    prefix, suffix = envelope.text_frame()
    assert (prefix + json.dumps(text, ensure_ascii=False) + suffix).encode() == envelope.chunk(text)
