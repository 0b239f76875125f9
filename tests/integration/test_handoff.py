"""Streams are written by the model's worker itself (the handoff).

The worker gets a copy of the client socket and writes the token events onto it; with
`--no-stream-handoff` the daemon forwards every write instead. A client must not be able
to tell the two apart, over either listener: the same bytes, the same framing (HTTP/1.1
chunks, or raw to the close for HTTP/1.0), the same endings, keep-alive and errors.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ModelStore
from tests.helpers.daemon import Daemon
from tests.helpers.raw import open_socket, parse_responses, post, read_to_close
from tests.integration.conftest import (
    RawInfer,
    assert_one_done,
    instance,
    log_events,
    log_tail,
    running,
    wait_for,
)

MODELS = {"tiny.gguf": "tiny"}
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 48}
# (path, body, extra headers): every kind of stream the daemon writes.
STREAMS: list[tuple[str, dict[str, Any], str]] = [
    ("/infer", {"model": "tiny", "prompt": "once upon", **GREEDY}, ""),
    ("/infer", {"model": "tiny", "prompt": "once upon", **GREEDY}, "Accept: text/event-stream\r\n"),
    ("/v1/completions", {"model": "tiny", "prompt": "once upon", "stream": True, **GREEDY}, ""),
    (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            **GREEDY,
        },
        "",
    ),
    # stop strings cut inside the worker: the text must end at the same place
    ("/infer", {"model": "tiny", "prompt": "once upon", "stop": ["about"], **GREEDY}, ""),
]
IDS = ["ndjson", "sse", "v1-completions", "v1-chat", "stop"]


@pytest.fixture(scope="module")
def daemon(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("handoff"), MODELS)
    with running(models) as d:
        yield d


@pytest.fixture(scope="module")
def forwarding(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("forwarding"), MODELS)
    with running(models, "--no-stream-handoff") as d:
        yield d


def generations(daemon: Daemon) -> list[dict[str, Any]]:
    """The request log lines of the generating endpoints."""
    return [r for r in log_events(daemon, "request") if "tokens" in r]


def new_lines(daemon: Daemon, before: int, n: int) -> list[dict[str, Any]]:
    """The n generation log lines after the first `before` (each comes just after its
    response, so it may still be on its way)."""
    wait_for(lambda: len(generations(daemon)) >= before + n, f"{n} request lines")
    lines = generations(daemon)[before:]
    assert len(lines) == n, lines
    return lines


def exchange_raw(
    daemon: Daemon, via: str, path: str, body: dict[str, Any], extra: str, version: str
) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/{version}\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
    head += f"Connection: close\r\n{extra}\r\n"
    with open_socket(daemon, via) as sock:
        sock.sendall(head.encode() + data)
        raw, closed = read_to_close(sock)
    assert closed
    return raw


def body_of(raw: bytes, version: str) -> bytes:
    """The response body, unframed, with what differs between two runs made equal."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw[:300]
    if version == "1.1":
        assert b"transfer-encoding: chunked" in head.lower()
        (resp,) = parse_responses(raw)
        body = resp.body
    else:  # HTTP/1.0: no chunks, the body ends when the connection does
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
        body = rest
    body = re.sub(rb'"timings":\{[^}]*\}', b"{}", body)
    body = re.sub(rb"(chat)?cmpl-[0-9a-f]+", b"ID", body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


def openai_text(body: bytes) -> tuple[str, list[dict[str, Any]]]:
    """An OpenAI stream's text, and its chunks without it: one chunk per write, so how
    the text is split depends on timing, not on who wrote it."""
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    text, rest = "", []
    for message in body.split(b"\n\n")[:-2]:
        assert message.startswith(b"data: "), message
        chunk = json.loads(message[6:])
        for choice in chunk["choices"]:
            piece = choice.pop("text") if "text" in choice else choice["delta"].pop("content", "")
            text += piece
        if chunk["choices"] and not any(
            chunk["choices"][0].get(k) for k in ("delta", "finish_reason")
        ):
            continue  # a text chunk: only its text counts
        rest.append(chunk)
    return text, rest


@pytest.mark.parametrize("version", ["1.1", "1.0"])
@pytest.mark.parametrize(("path", "body", "extra"), STREAMS, ids=IDS)
def test_a_handed_off_stream_is_byte_for_byte_the_forwarded_one(
    daemon: Daemon,
    forwarding: Daemon,
    path: str,
    body: dict[str, Any],
    extra: str,
    version: str,
) -> None:
    before = len(generations(daemon)), len(generations(forwarding))
    bodies = [
        body_of(exchange_raw(d, via, path, body, extra, version), version)
        for d, via in ((forwarding, "unix"), (daemon, "unix"), (daemon, "tcp"))
    ]
    forwarded, *handed = bodies
    for got in handed:
        if path.startswith("/v1/"):
            assert openai_text(got) == openai_text(forwarded)
        else:
            assert got == forwarded
    (forwarded_log,) = new_lines(forwarding, before[1], 1)
    assert forwarded_log["handoff"] is False, forwarded_log
    for rec in (forwarded_log, *new_lines(daemon, before[0], 2)):
        assert rec["handoff"] is (rec is not forwarded_log), rec
        assert rec["tokens"] > 0 and rec["ttft_ms"] is not None and rec["decode_ms"] is not None


def test_a_long_fast_stream_arrives_whole_and_the_connection_is_kept(
    daemon: Daemon, via: str
) -> None:
    """Thousands of tokens in many worker writes, then a second request on the same
    connection: the framing held and the daemon took the connection back."""
    before = len(generations(daemon))
    conn = daemon.client(via).connection()
    try:
        for max_tokens in (1500, 5):
            body = {"model": "tiny", "prompt": "hi", "temperature": 0, "max_tokens": max_tokens}
            conn.request("POST", "/infer", body=json.dumps(body).encode())
            resp = conn.getresponse()
            assert resp.status == 200
            events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
            done = assert_one_done(events)
            assert done["usage"]["completion_tokens"] == len(events) - 1 == max_tokens
            assert not resp.will_close
    finally:
        conn.close()
    assert [r["handoff"] for r in new_lines(daemon, before, 2)] == [True, True]


def test_a_non_streamed_answer_is_not_handed_off(daemon: Daemon) -> None:
    before = len(generations(daemon))
    resp = daemon.client("unix").infer(model="tiny", prompt="hi", max_tokens=4, stream=False)
    assert resp.status == 200 and resp.json()["usage"]["completion_tokens"] == 4
    (rec,) = new_lines(daemon, before, 1)
    assert rec["handoff"] is False, rec


def test_a_client_that_hangs_up_cancels_the_worker_which_serves_on(
    daemon: Daemon, via: str
) -> None:
    client = daemon.client(via)
    client.infer(model="tiny", prompt="hi", max_tokens=2, stream=False)  # loaded
    loads = instance(daemon, "tiny.gguf")["loads"]
    before = len(generations(daemon))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 100_000, "temperature": 0}
    with RawInfer(client, body) as stream:
        for _ in range(50):
            event = stream.next_event()
            assert event is not None and event["type"] == "token", event
    (rec,) = new_lines(daemon, before, 1)
    assert rec["outcome"] == "client_gone" and rec["handoff"] is True, rec
    assert 50 <= rec["tokens"] < 100_000 and rec["decode_ms"] > 0, rec
    wait_for(lambda: daemon.status()["inflight"] == 0, "the generation to stop")
    resp = client.infer(model="tiny", prompt="hi", max_tokens=3, stream=False)
    assert resp.status == 200
    assert instance(daemon, "tiny.gguf")["loads"] == loads, log_tail(daemon)  # not killed


# ---- shutdown while a worker writes --------------------------------------------------------

LONG_CTX = "16384"  # a tiny model's greedy stream of ~16k tokens outlasts the grace below
GRACE_S = "0.5"


def test_a_stream_cut_by_shutdown_ends_with_its_error_event(
    model_store: ModelStore, tmp_path: Path
) -> None:
    models = model_store.models_dir(tmp_path / "models", MODELS)
    with running(models, "--n-ctx", LONG_CTX, "--shutdown-grace-s", GRACE_S) as d:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 100_000, "temperature": 0}
        with RawInfer(d.client("unix"), body) as stream:
            for _ in range(20):
                event = stream.next_event()
                assert event is not None and event["type"] == "token", event
            assert d.proc is not None
            d.proc.send_signal(signal.SIGTERM)
            events = stream.events()  # the body must end properly (http.client checks)
        *tokens, last = events
        assert all(e["type"] == "token" for e in tokens)
        assert last["type"] == "error" and last["error"]["code"] == "shutting_down", last
        assert d.proc.wait(10) == 0


def test_a_stream_nobody_reads_is_cut_off_at_shutdown(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """The worker is blocked writing to a full socket: it lets go at the shutdown; the
    stream gets its ending, or, if the worker stopped halfway through an event, none."""
    models = model_store.models_dir(tmp_path / "models", MODELS)
    with running(models, "--n-ctx", LONG_CTX, "--shutdown-grace-s", GRACE_S) as d:
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 100_000}).encode()
        with open_socket(d, "unix") as sock:
            sock.sendall(post("/infer", body, b"Accept: text/event-stream\r\n"))
            wait_for(lambda: d.status()["inflight"] == 1, "the stream to run")
            time.sleep(0.5)  # the socket's buffers fill up
            assert d.proc is not None
            stopped_at = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(10) == 0
            assert time.monotonic() - stopped_at < 5.0
            raw, closed = read_to_close(sock)
        assert closed and raw.startswith(b"HTTP/1.1 200 ")
        assert b'"type":"done"' not in raw
        if raw.endswith(b"\r\n0\r\n\r\n"):  # the worker stopped between two events
            (resp,) = parse_responses(raw)
            assert resp.body.endswith(b'shutting down"}}\n\n'), resp.body[-300:]
        else:  # or halfway through one: cut off, no ending after half an event
            assert b"shutting_down" not in raw[-2000:]


def test_pipelined_streams_are_answered_in_order(daemon: Daemon, via: str) -> None:
    """Two streamed requests sent back to back on one connection: the second waits, in
    the daemon's buffer, until the worker has let go of the first."""
    bodies = [
        json.dumps({"model": "tiny", "prompt": p, "max_tokens": 200, "temperature": 0}).encode()
        for p in ("first", "second")
    ]
    with open_socket(daemon, via) as sock:
        sock.sendall(
            post("/infer", bodies[0]) + post("/infer", bodies[1], b"Connection: close\r\n")
        )
        raw, closed = read_to_close(sock)
    assert closed
    first, second = parse_responses(raw)
    for resp in (first, second):
        assert resp.status == 200
        events = [json.loads(line) for line in resp.body.splitlines()]
        assert assert_one_done(events)["usage"]["completion_tokens"] == 200
