"""HTTP hardening against the real daemon: every limit, bad framing, request validation, Host.

Each limit runs with a small value (half a second, a kilobyte) so a test that waits for one
takes about that long. Requests go over raw sockets, on the Unix socket and on TCP, because
the point is what the daemon does with bytes no well-behaved client library would send.
The raw-socket helpers are in tests/helpers/raw.py.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ModelStore
from tests.helpers.daemon import Daemon
from tests.helpers.raw import (
    HOST,
    RawResponse,
    check_error,
    daemon_alive,
    exchange,
    open_socket,
    parse_responses,
    post,
    read_to_close,
    vm_rss_kb,
)
from tests.integration.conftest import (
    RawInfer,
    log_events,
    log_records,
    log_tail,
    running,
    stream_to_end,
    wait_for,
)

MODELS = {"tiny.gguf": "tiny"}
HEAD_TIMEOUT_S = 0.5  # --head-timeout-s: a trickled head is refused after this
BODY_TIMEOUT_S = 0.8  # --body-timeout-s: a trickled body is refused after this
KEEPALIVE_S = 0.3  # --keepalive-timeout-s: an idle keep-alive connection closes after this
SEND_TIMEOUT_S = 1.0  # --send-timeout-s: a client that reads nothing is dropped after this
MAX_HEAD = 1024  # --max-head-bytes (the smallest the CLI allows)
MAX_BODY = 4096  # --max-body-bytes
N_CTX = 4096  # --n-ctx: room for a stream long enough to fill the Unix socket's buffers
LIMIT_ARGS = (
    "--head-timeout-s",
    str(HEAD_TIMEOUT_S),
    "--body-timeout-s",
    str(BODY_TIMEOUT_S),
    "--keepalive-timeout-s",
    str(KEEPALIVE_S),
    "--send-timeout-s",
    str(SEND_TIMEOUT_S),
    "--max-head-bytes",
    str(MAX_HEAD),
    "--max-body-bytes",
    str(MAX_BODY),
    "--n-ctx",
    str(N_CTX),
)
SLACK_S = 2.0  # a timeout may fire this much late on a loaded 2-core machine
TRICKLE_S = 0.1  # pause between trickled bytes: far shorter than any deadline
RSS_SLACK_KB = 16 * 1024  # a stalled stream may cost buffers, not a copy of the stream
SSE_EMPTY_TOKEN = b'event: token\ndata: {"type":"token","text":""}\n\n'  # the least a token costs


# ---- the daemon --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("hardening-http"), MODELS)
    with running(models, *LIMIT_ARGS, "--no-spare-worker") as d:
        yield d
        daemon_alive(d)


# ---- size limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["in_pieces", "in_one_write"])
def test_head_over_the_limit_is_431_and_close(daemon: Daemon, via: str, how: str) -> None:
    head = b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Pad: " + b"a" * (2 * MAX_HEAD) + b"\r\n"
    if how == "in_pieces":  # the head never ends: the limit must stop the buffering
        responses, closed = exchange(daemon, via, head)
    else:  # the whole head arrives at once, already complete: still over the limit
        responses, closed = exchange(daemon, via, head + b"\r\n")
    assert [r.status for r in responses] == [431], responses
    check_error(responses[0], 431, "headers_too_large")
    assert responses[0].closes and closed


def test_a_head_just_under_the_limit_is_served(daemon: Daemon, via: str) -> None:
    head = b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n"
    pad = MAX_HEAD - len(head) - len(b"X-Pad: \r\n\r\n") - 16
    responses, closed = exchange(daemon, via, head + b"X-Pad: " + b"a" * pad + b"\r\n\r\n")
    assert [r.status for r in responses] == [200] and closed


def test_body_over_the_limit_is_413_before_it_is_sent(daemon: Daemon, via: str) -> None:
    head = b"POST /infer HTTP/1.1\r\n" + HOST + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    with open_socket(daemon, via) as sock:
        sock.sendall(head)  # and not one byte of the body
        raw, closed = read_to_close(sock)  # a 413 now, not a 408 once the body is late
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [413], raw
    check_error(responses[0], 413, "payload_too_large")
    assert responses[0].closes and closed


def test_a_refusal_before_the_handler_is_in_openais_shape_under_v1(
    daemon: Daemon, via: str
) -> None:
    head = (
        b"POST /v1/completions HTTP/1.1\r\n"
        + HOST
        + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    )
    responses, _ = exchange(daemon, via, head)
    assert [r.status for r in responses] == [413]
    error = json.loads(responses[0].body)["error"]
    assert error["code"] == "payload_too_large" and error["type"] == "invalid_request_error"
    assert error["message"] and "param" in error


def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body(
    daemon: Daemon, via: str
) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1, "stream": False})
    head = (
        b"POST /infer HTTP/1.1\r\n"
        + HOST
        + b"Expect: 100-continue\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    with open_socket(daemon, via) as sock:
        sock.sendall(head)
        assert select.select([sock], [], [], 2.0)[0], "no 100 Continue"
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(body.encode())
        raw, _ = read_to_close(sock)
    responses = parse_responses((interim.partition(b"\r\n\r\n")[2]) + raw)
    assert [r.status for r in responses] == [200], raw


def test_chunked_body_over_the_limit_is_413_while_reading(daemon: Daemon, via: str) -> None:
    piece = b"400\r\n" + b"x" * 0x400 + b"\r\n"  # 1 KiB chunks
    with open_socket(daemon, via) as sock:
        sock.sendall(b"POST /infer HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        while sent <= MAX_BODY:
            assert not select.select([sock], [], [], 0.02)[0], "answered before the limit"
            sock.sendall(piece)
            sent += 0x400
        raw, closed = read_to_close(sock)  # no terminating 0-chunk was ever sent
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [413], raw
    check_error(responses[0], 413, "payload_too_large")
    assert responses[0].closes and closed


# ---- deadlines ---------------------------------------------------------------------------------


def trickle(sock: socket.socket, data: bytes, limit_s: float) -> tuple[bytes, bool, float]:
    """Send data a byte at a time until the daemon answers; (answer, closed, seconds taken)."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([sock], [], [], TRICKLE_S)[0]:
            break
        assert time.monotonic() - started < limit_s + SLACK_S, "the daemon waited for ever"
    raw, closed = read_to_close(sock)
    return raw, closed, time.monotonic() - started


def test_trickled_headers_are_408_and_close(daemon: Daemon, via: str) -> None:
    """Slowloris: every byte comes quickly, but the head as a whole is late."""
    head = b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Slow: " + b"z" * 200 + b"\r\n\r\n"
    with open_socket(daemon, via) as sock:
        raw, closed, took = trickle(sock, head, HEAD_TIMEOUT_S)
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [408], raw
    check_error(responses[0], 408, "request_timeout")
    assert responses[0].closes and closed
    assert HEAD_TIMEOUT_S * 0.8 <= took <= HEAD_TIMEOUT_S + SLACK_S, took


def test_a_slow_body_is_408_and_close(daemon: Daemon, via: str) -> None:
    body = json.dumps({"model": "tiny", "prompt": "x" * 300}).encode()
    with open_socket(daemon, via) as sock:
        head = b"POST /infer HTTP/1.1\r\n" + HOST + f"Content-Length: {len(body)}\r\n\r\n".encode()
        sock.sendall(head)
        raw, closed, took = trickle(sock, body, BODY_TIMEOUT_S)
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [408], raw
    check_error(responses[0], 408, "request_timeout")
    assert responses[0].closes and closed
    assert BODY_TIMEOUT_S * 0.8 <= took <= BODY_TIMEOUT_S + SLACK_S, took


def test_an_idle_keep_alive_connection_is_closed(daemon: Daemon, via: str) -> None:
    with open_socket(daemon, via) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
        data = b""
        while not data.endswith(b'{"status": "ok"}'):
            chunk = sock.recv(4096)
            assert chunk, f"closed before the whole response: {data!r}"
            data += chunk
        started = time.monotonic()
        rest, closed = read_to_close(sock)
        took = time.monotonic() - started
    assert [r.status for r in parse_responses(data)] == [200]
    assert rest == b"" and closed, rest
    assert KEEPALIVE_S * 0.8 <= took <= KEEPALIVE_S + SLACK_S, took


def test_a_connection_that_never_sends_is_closed(daemon: Daemon, via: str) -> None:
    with open_socket(daemon, via) as sock:
        started = time.monotonic()
        raw, closed = read_to_close(sock)
        took = time.monotonic() - started
    assert closed and took <= HEAD_TIMEOUT_S + SLACK_S, took
    assert [r.status for r in parse_responses(raw)] in ([], [408]), raw


# ---- framing -----------------------------------------------------------------------------------


def test_content_length_with_transfer_encoding_is_400_and_close(daemon: Daemon, via: str) -> None:
    """Request smuggling: a request that two parsers could frame differently is refused."""
    raw = (
        b"POST /infer HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"
    )
    responses, closed = exchange(daemon, via, raw)
    assert [r.status for r in responses] == [400], responses  # the smuggled GET is never served
    check_error(responses[0], 400, "bad_request")
    assert responses[0].closes and closed


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"identity", b"x-nonsense"])
def test_unsupported_transfer_coding_is_501(daemon: Daemon, via: str, coding: bytes) -> None:
    raw = b"POST /infer HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: " + coding + b"\r\n\r\n"
    responses, closed = exchange(daemon, via, raw + b"0\r\n\r\n")
    assert [r.status for r in responses] == [501], responses
    check_error(responses[0], 501, "not_implemented")
    assert responses[0].closes and closed


GARBAGE: dict[str, bytes] = {
    "nul bytes": b"\x00" * 64,
    "binary": bytes(range(256)),
    "tls client hello": bytes.fromhex("16030100f5010000f10303") + os.urandom(32),
    "http/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "ssh banner": b"SSH-2.0-OpenSSH_9.6\r\n",
    "bare newlines": b"\n\n\n\n",
    "no version": b"GET /healthz\r\n\r\n",
    "space in target": b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n",
    "non-ascii target": b"GET /\xff\xfe HTTP/1.1\r\n" + HOST + b"\r\n",
    "header without colon": b"GET /healthz HTTP/1.1\r\n" + HOST + b"NoColonHere\r\n\r\n",
    "space before colon": b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-A : b\r\n\r\n",
    "nul in a header": b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-A: b\x00c\r\n\r\n",
    "negative length": b"POST /infer HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n",
    "huge length": b"POST /infer HTTP/1.1\r\n"
    + HOST
    + b"Content-Length: "
    + b"9" * 40
    + b"\r\n\r\n",
    "two lengths": b"POST /infer HTTP/1.1\r\n"
    + HOST
    + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "bad chunk size": b"POST /infer HTTP/1.1\r\n"
    + HOST
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "http/1.1 without host": b"GET /healthz HTTP/1.1\r\n\r\n",
    "lone CR": b"GET /healthz HTTP/1.1\r" + HOST + b"\r\n",
}


@pytest.mark.parametrize("payload", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_gets_a_4xx_and_close(daemon: Daemon, via: str, payload: bytes) -> None:
    responses, closed = exchange(daemon, via, payload)
    assert closed, "the daemon kept a garbage connection open"
    assert responses, "closed without an answer"
    # 4xx, or 505 for a request line naming another HTTP version (the HTTP/2 preface)
    statuses = [r.status for r in responses]
    assert all(400 <= s < 500 or s == 505 for s in statuses), [
        (r.status, r.body) for r in responses
    ]
    last = responses[-1]
    assert last.closes, last
    assert set(last.json()) == {"error"}, last.body
    assert "bytearray" not in last.json()["error"]["message"], last.body  # no Python reprs
    daemon_alive(daemon)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/9.9", b"HTTP/0.9", b"HTTP/3.1"])
def test_another_http_version_is_505_and_close(daemon: Daemon, via: str, version: bytes) -> None:
    responses, closed = exchange(daemon, via, b"GET /healthz " + version + b"\r\n" + HOST + b"\r\n")
    assert closed and [r.status for r in responses] == [505], responses
    check_error(responses[0], 505, "http_version_not_supported")


def test_blank_lines_before_a_request_line_are_skipped(daemon: Daemon, via: str) -> None:
    get = b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"
    body = b'{"model": "tiny", "prompt": "hi", "max_tokens": 1, "stream": false}'
    post = b"POST /infer HTTP/1.1\r\n" + HOST + f"Content-Length: {len(body)}\r\n\r\n".encode()
    # A leading CRLF, and the CRLF some clients add after a body, before pipelined requests.
    last = b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
    payload = b"\r\n" + get + post + body + b"\r\n" + get + b"\n" + last
    responses, closed = exchange(daemon, via, payload)
    assert closed and [r.status for r in responses] == [200, 200, 200, 200], responses


def test_a_partial_request_pipelined_behind_a_whole_one_gets_its_408(
    daemon: Daemon, via: str
) -> None:
    """Part of a second request came with the first: it is held to the head deadline and
    answered 408, not dropped in silence when the keep-alive timeout ends."""
    get = b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"
    responses, closed = exchange(daemon, via, get + b"GET /status HTTP/1.1\r\nHo")
    assert closed and [r.status for r in responses] == [200, 408], responses


def test_a_malformed_request_line_is_quoted_plainly(daemon: Daemon, via: str) -> None:
    responses, _ = exchange(daemon, via, b"HELLO\r\n\r\n")
    err = check_error(responses[0], 400, "bad_request")
    assert err["message"] == "malformed request: illegal request line 'HELLO'", err


def test_a_json_error_says_its_line_and_column(daemon: Daemon, via: str) -> None:
    raw = b'{"model": "tiny",\n "prompt": }'
    resp = daemon.client(via).request("POST", "/infer", raw=raw)
    assert resp.status == 400, resp.body
    message = resp.json()["error"]["message"]
    assert message == "the request body is not valid JSON: Expecting value at line 2 column 12"


# ---- every response is logged -------------------------------------------------------------------


def logged_after(daemon: Daemon, before: int, **fields: Any) -> dict[str, Any]:
    """The one request log line past the first `before` ones whose fields match."""

    def matching() -> list[dict[str, Any]]:
        records = log_events(daemon, "request")[before:]
        return [r for r in records if all(r.get(k) == v for k, v in fields.items())]

    found = wait_for(matching, f"a request log line with {fields}", timeout=5.0)
    assert len(found) == 1, found
    return found[0]


def request_lines(daemon: Daemon) -> int:
    return len(log_events(daemon, "request"))


def test_a_refused_request_is_logged(daemon: Daemon, via: str) -> None:
    before = request_lines(daemon)
    responses, _ = exchange(daemon, via, b"HELLO\r\n\r\n")
    assert [r.status for r in responses] == [400]
    rec = logged_after(daemon, before, status=400, outcome="bad_request")
    assert rec["method"] is None and rec["path"] is None and rec["total_ms"] >= 0


def test_a_body_over_the_limit_is_logged_with_its_request_line(daemon: Daemon, via: str) -> None:
    before = request_lines(daemon)
    head = b"POST /infer HTTP/1.1\r\n" + HOST + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    responses, _ = exchange(daemon, via, head)
    assert [r.status for r in responses] == [413]
    rec = logged_after(daemon, before, status=413, outcome="payload_too_large")
    assert (rec["method"], rec["path"]) == ("POST", "/infer")


def test_a_wrong_method_on_a_generating_endpoint_is_logged(daemon: Daemon, via: str) -> None:
    before = request_lines(daemon)
    assert daemon.client(via).get("/infer").status == 405
    rec = logged_after(daemon, before, status=405, path="/infer")
    assert rec["method"] == "GET" and rec["outcome"] == "method_not_allowed"


def test_a_late_body_is_logged_as_408(daemon: Daemon, via: str) -> None:
    before = request_lines(daemon)
    with open_socket(daemon, via) as sock:
        sock.sendall(b"POST /infer HTTP/1.1\r\n" + HOST + b"Content-Length: 10\r\n\r\n{")
        raw, _ = read_to_close(sock)
    assert [r.status for r in parse_responses(raw)] == [408], raw
    rec = logged_after(daemon, before, status=408, outcome="request_timeout")
    assert (rec["method"], rec["path"]) == ("POST", "/infer")
    assert rec["total_ms"] >= BODY_TIMEOUT_S * 1000 * 0.8, rec


def test_a_late_head_is_logged_as_408(daemon: Daemon, via: str) -> None:
    before = request_lines(daemon)
    with open_socket(daemon, via) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        raw, _ = read_to_close(sock)
    assert [r.status for r in parse_responses(raw)] == [408], raw
    rec = logged_after(daemon, before, status=408, outcome="request_timeout")
    assert rec["method"] is None and rec["total_ms"] >= HEAD_TIMEOUT_S * 1000 * 0.8, rec


# ---- a client that stops reading -------------------------------------------------------------


def test_a_slow_reader_is_dropped_and_its_generation_cancelled(daemon: Daemon) -> None:
    """A stream nobody reads stalls in bounded buffers, then is cut after --send-timeout-s.

    Over the Unix socket, the kernel buffers about 200 KB: the ~200 KB SSE stream of 4000
    tokens overruns them. (Loopback TCP autotunes its buffers up to 4 MB, more than any
    stream a tiny context can produce, so this case is only made over the Unix socket.)
    """
    client = daemon.client()
    max_tokens = N_CTX - 16
    body: dict[str, Any] = {
        "model": "tiny",
        "prompt": "hi",
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    sse = {"Accept": "text/event-stream"}  # SSE: the most bytes per token
    warm = client.request("POST", "/infer", {**body, "max_tokens": 64}, headers=sse)
    assert warm.status == 200 and b'"type":"done"' in warm.body  # the model is loaded
    cancelled = daemon.status()["cancelled"]
    assert daemon.proc is not None
    pid = daemon.proc.pid
    base = vm_rss_kb(pid)
    data = json.dumps(body).encode()
    with open_socket(daemon, "unix") as sock:
        sock.sendall(post("/infer", data, b"Accept: text/event-stream\r\n"))
        started = time.monotonic()
        peak = base

        def dropped() -> bool:
            nonlocal peak
            peak = max(peak, vm_rss_kb(pid))
            status = daemon.status()
            return bool(status["inflight"] == 0 and status["cancelled"] == cancelled + 1)

        wait_for(dropped, "the slow reader to be dropped", timeout=10 * SEND_TIMEOUT_S)
        took = time.monotonic() - started
        raw, closed = read_to_close(sock)
    assert took >= SEND_TIMEOUT_S * 0.8, took
    assert peak - base < RSS_SLACK_KB, f"RSS grew from {base} to {peak} KiB"
    assert closed and raw.startswith(b"HTTP/1.1 200 ")
    assert b'"type":"done"' not in raw, raw[-300:]
    assert len(raw) < max_tokens * len(SSE_EMPTY_TOKEN), len(raw)  # far from all of it
    gone = [e for e in log_events(daemon, "request") if e.get("outcome") == "client_gone"]
    assert gone, log_tail(daemon)
    assert gone[-1]["tokens"] < max_tokens, gone[-1]  # the generation was stopped
    assert "dropping a client that stopped reading" in daemon.log(), log_tail(daemon)
    stream_to_end(client, {"model": "tiny", "prompt": "hi", "max_tokens": 8})


def test_a_hang_up_mid_stream_logs_the_time_spent_decoding(daemon: Daemon, via: str) -> None:
    before = request_lines(daemon)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": N_CTX - 64, "temperature": 0.0}
    with RawInfer(daemon.client(via), body) as stream:
        assert stream.status == 200
        for _ in range(20):  # tokens flow; thousands more are to come when we hang up
            event = stream.next_event()
            assert event is not None and event["type"] == "token", event
    rec = logged_after(daemon, before, outcome="client_gone")
    assert rec["tokens"] > 0, rec
    assert rec["decode_ms"] is not None and rec["decode_ms"] > 0, rec  # not a false 0


# ---- request validation ------------------------------------------------------------------------

# (field, the value as raw JSON, expected code); every one must be a 400 naming the field.
BAD_FIELDS: list[tuple[str, str, str]] = [
    ("model", "7", "invalid_request"),
    ("model", "[]", "invalid_request"),
    ("model", '{"id": "tiny"}', "invalid_request"),
    ("model", "true", "invalid_request"),
    ("model", "null", "no_default_model"),
    ("model", '"\\ud800"', "invalid_request"),
    ("prompt", "null", "invalid_request"),
    ("prompt", "5", "invalid_request"),
    ("prompt", '["a"]', "invalid_request"),
    ("prompt", "false", "invalid_request"),
    ("prompt", '"a\\u0000b"', "invalid_request"),
    ("prompt", '"\\ud800"', "invalid_request"),  # a lone surrogate: not encodable text
    ("stream", '"yes"', "invalid_request"),
    ("stream", "1", "invalid_request"),
    ("stream", "[]", "invalid_request"),
    ("max_tokens", "0", "invalid_request"),
    ("max_tokens", "-1", "invalid_request"),
    ("max_tokens", "1.5", "invalid_request"),
    ("max_tokens", '"5"', "invalid_request"),
    ("max_tokens", "true", "invalid_request"),
    ("max_tokens", "1e300", "invalid_request"),
    ("max_tokens", "99999999999999999999999", "invalid_request"),
    ("temperature", "-0.1", "invalid_request"),
    ("temperature", '"hot"', "invalid_request"),
    ("temperature", "true", "invalid_request"),
    ("temperature", "1e400", "invalid_request"),
    ("temperature", "[0.5]", "invalid_request"),
    ("top_p", "0", "invalid_request"),
    ("top_p", "-0.5", "invalid_request"),
    ("top_p", "1.0001", "invalid_request"),
    ("top_p", '"0.5"', "invalid_request"),
    ("top_k", "-1", "invalid_request"),
    ("top_k", "1.5", "invalid_request"),
    ("top_k", '"x"', "invalid_request"),
    ("top_k", "false", "invalid_request"),
    ("seed", "-1", "invalid_request"),
    ("seed", "4294967296", "invalid_request"),
    ("seed", "0.5", "invalid_request"),
    ("seed", '"x"', "invalid_request"),
    ("stop", "1", "invalid_request"),
    ("stop", "[1]", "invalid_request"),
    ("stop", "[null]", "invalid_request"),
    ("stop", '[""]', "invalid_request"),
    ("stop", '[["a"]]', "invalid_request"),
    ("stop", json.dumps(["x" * 513]), "invalid_request"),
    ("stop", json.dumps(["a"] * 17), "invalid_request"),
    ("stop", '{"a": 1}', "invalid_request"),
    ("stop", '["\\ud800"]', "invalid_request"),
]


def body_with(field: str, raw_value: str) -> bytes:
    """A valid /infer body with field set to the raw JSON text raw_value."""
    base = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": False}
    base.pop(field, None)
    return json.dumps(base)[:-1].encode() + f', "{field}": {raw_value}}}'.encode()


@pytest.mark.parametrize(
    ("field", "value", "code"), BAD_FIELDS, ids=[f"{f}={v[:20]}" for f, v, _ in BAD_FIELDS]
)
def test_every_infer_field_is_checked_with_a_400_naming_it(
    daemon: Daemon, via: str, field: str, value: str, code: str
) -> None:
    resp = daemon.client(via).request("POST", "/infer", raw=body_with(field, value))
    assert resp.status == 400, (resp.status, resp.body)
    err = resp.json()["error"]
    assert err["code"] == code, err
    assert err.get("param") == field, err
    assert field in err["message"], err


def test_a_missing_prompt_is_a_400_naming_it(daemon: Daemon, via: str) -> None:
    resp = daemon.client(via).request("POST", "/infer", raw=b'{"model": "tiny"}')
    assert resp.status == 400
    assert resp.json()["error"]["param"] == "prompt"


def test_values_at_the_edges_of_their_ranges_are_accepted(daemon: Daemon, via: str) -> None:
    edges: list[dict[str, Any]] = [
        {"max_tokens": 1, "temperature": 0, "top_p": 1, "top_k": 0, "seed": 0},
        {"temperature": 100, "top_p": 1e-9, "top_k": 1 << 20, "seed": 2**32 - 1},
        {"stop": ["s" * 512], "max_tokens": 3.0},
        {"stop": [f"stop{i}" for i in range(16)]},
    ]
    for extra in edges:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": False, **extra}
        resp = daemon.client(via).infer(**body)
        assert resp.status == 200, (extra, resp.body)


@pytest.fixture(scope="module")
def small_ctx(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("small-ctx"), MODELS)
    with running(models, "--n-ctx", "64", "--no-spare-worker") as d:
        yield d


def test_huge_integers_in_the_body_are_a_400_not_a_500(small_ctx: Daemon, via: str) -> None:
    """Python refuses to parse integers of over 4300 digits: that is the client's error.

    (On the daemon with the default 1 MiB body limit: the body is over 4 KiB.)
    """
    raw = body_with("max_tokens", "1" * 5000)
    resp = small_ctx.client(via).request("POST", "/infer", raw=raw)
    assert resp.status == 400, (resp.status, resp.body)
    assert resp.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("stream", [True, False])
def test_a_prompt_longer_than_the_context_is_400_before_any_token(
    small_ctx: Daemon, via: str, stream: bool
) -> None:
    prompt = "hello world " * 600  # about 1200 tokens of the tiny vocabulary
    resp = small_ctx.client(via).infer(model="tiny", prompt=prompt, stream=stream)
    assert resp.status == 400, (resp.status, resp.body[:300])
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["code"] == "prompt_too_long", err
    assert err.get("param") == "prompt", err
    numbers = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert len(numbers) >= 2, err  # the prompt's token count and the context's size
    count, limit = max(numbers), min(numbers)
    assert count >= 1000 and 64 <= limit < count, err


def test_a_chat_too_long_for_the_context_is_400_naming_messages(small_ctx: Daemon) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello world " * 600}]}
    resp = small_ctx.client().request("POST", "/v1/chat/completions", body)
    assert resp.status == 400, (resp.status, resp.body[:300])
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == ("prompt_too_long", "messages"), err


def test_max_tokens_is_capped_by_the_context(small_ctx: Daemon, via: str) -> None:
    resp = small_ctx.client(via).infer(model="tiny", prompt="hi", max_tokens=100_000, stream=False)
    assert resp.status == 200, resp.body
    usage = resp.json()["usage"]
    assert 0 < usage["completion_tokens"] < 1024, usage  # ended by the context, not the ask


# ---- the Host header on loopback TCP ----------------------------------------------------------

FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8484",
    "127.0.0.1.nip.io",
    "localhost.evil.example",
    "192.168.1.10",
    "10.0.0.1:80",
    "0.0.0.0",
    "[::ffff:8.8.8.8]:80",
    "[2001:db8::1]",
    "",
]
LOOPBACK_HOSTS = [
    "localhost",
    "LOCALHOST:8484",
    "127.0.0.1",
    "127.0.0.1:8484",
    "127.1.2.3",
    "[::1]",
    "[::1]:8484",
    "app.localhost",
]


def get_with_host(daemon: Daemon, via: str, host: str | None) -> RawResponse:
    head = b"GET /healthz HTTP/1.1\r\nConnection: close\r\n"
    if host is not None:
        head += f"Host: {host}\r\n".encode()
    responses, _ = exchange(daemon, via, head + b"\r\n")
    assert len(responses) == 1, responses
    return responses[0]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_tcp_with_a_foreign_host_header_is_403(daemon: Daemon, host: str) -> None:
    """DNS rebinding: a web page's request to 127.0.0.1 carries its own site's Host."""
    check_error(get_with_host(daemon, "tcp", host), 403, "forbidden")


def test_tcp_without_a_host_header_is_refused(daemon: Daemon) -> None:
    responses, _ = exchange(daemon, "tcp", b"GET /healthz HTTP/1.0\r\n\r\n")
    assert [r.status for r in responses] == [403], responses


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_tcp_with_a_loopback_host_header_is_served(daemon: Daemon, host: str) -> None:
    assert get_with_host(daemon, "tcp", host).status == 200


def test_the_unix_socket_does_not_check_host(daemon: Daemon) -> None:
    assert get_with_host(daemon, "unix", "evil.example").status == 200
    responses, _ = exchange(daemon, "unix", b"GET /healthz HTTP/1.0\r\n\r\n")
    assert [r.status for r in responses] == [200], responses


# ---- the connection cap ------------------------------------------------------------------------

MAX_CONNECTIONS = 4  # --max-connections of the cap test's daemon


def test_connections_past_the_cap_get_503_and_close(
    model_store: ModelStore, tmp_path: Path
) -> None:
    models = model_store.models_dir(tmp_path / "models", MODELS)
    args = ("--max-connections", str(MAX_CONNECTIONS), "--keepalive-timeout-s", "30")
    with running(models, *args, "--no-spare-worker") as daemon:
        held = []
        for i in range(MAX_CONNECTIONS):  # on both listeners: the cap is for the daemon
            sock = open_socket(daemon, ("unix", "tcp")[i % 2])
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 "), "a held connection failed"
            held.append(sock)  # served and kept alive: it certainly counts
        try:
            before = request_lines(daemon)
            for via in ("unix", "tcp") * 10:
                responses, closed = exchange(
                    daemon, via, b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"
                )
                assert [r.status for r in responses] == [503], responses
                check_error(responses[0], 503, "too_many_connections")
                assert responses[0].closes and closed

            # A flood of refusals is logged as a line a second, each saying how many went
            # unlogged since the last: every refusal is a line or counted in one.
            def refusals() -> list[dict[str, Any]]:
                records = log_events(daemon, "request")[before:]
                return [r for r in records if r.get("outcome") == "too_many_connections"]

            flood = wait_for(refusals, "the flood's log line", timeout=5.0)
            assert flood[0]["unlogged"] == 0 and len(flood) <= 3, flood
            time.sleep(1.1)
            before = request_lines(daemon)
            responses, _ = exchange(daemon, "unix", b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
            assert [r.status for r in responses] == [503], responses
            later = logged_after(daemon, before, status=503, outcome="too_many_connections")
            assert sum(1 + r["unlogged"] for r in flood) + later["unlogged"] == 20
        finally:
            held.pop().close()
        wait_for(
            lambda: get_with_host(daemon, "tcp", "localhost").status == 200,
            "a slot to free up after a close",
        )
        for sock in held:
            sock.close()
        wait_for(lambda: daemon.client().get("/healthz").status == 200, "the daemon to serve")


FD_LIMIT = 64  # RLIMIT_NOFILE (soft and hard) of the low-limit daemon


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_an_open_files_limit_under_the_cap_gives_503s_and_every_listener_lives_on(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """The default cap (1024) is above this limit: the daemon lowers its cap to fit and
    says so, and a flood of connections never leaves a listener dead (EMFILE used to end
    the Unix socket's accept loop for good)."""
    models = model_store.models_dir(tmp_path / "models", MODELS)
    with running(models, "--no-spare-worker", preexec=_low_fd_limit) as daemon:
        warned = log_records(daemon, "level", "warning")
        assert any("open-files limit" in r["msg"] for r in warned), warned
        held = []
        try:
            for i in range(FD_LIMIT + 16):
                held.append(open_socket(daemon, ("unix", "tcp")[i % 2]))
            time.sleep(0.5)  # every one accepted or refused by now
        finally:
            for sock in held:
                sock.close()
        for via in ("unix", "tcp"):

            def serves(via: str = via) -> bool:
                return get_with_host(daemon, via, "localhost").status == 200

            assert wait_for(serves, f"{via} to serve again")


def test_an_absolute_form_target_is_checked_by_its_own_authority(daemon: Daemon) -> None:
    """Its authority, not the Host header, names the server (RFC 9112 §3.2.2)."""
    port = daemon.port
    ok = f"GET http://127.0.0.1:{port}/healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    evil = f"GET http://evil.example/healthz HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"
    broken = "GET http://[::1/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    statuses = []
    for raw in (ok, evil, broken):
        responses, _ = exchange(daemon, "tcp", raw.encode())
        statuses.append([r.status for r in responses])
    assert statuses == [[200], [403], [403]], statuses
    assert "Traceback" not in daemon.log() and "error serving" not in daemon.log()


def test_a_blank_line_on_an_idle_connection_keeps_it_idle(daemon: Daemon, via: str) -> None:
    """A CRLF between requests is no request: the connection closes quietly when the
    keep-alive timeout ends, with no 408 for a request that never began."""
    with open_socket(daemon, via) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 "), first
        sock.sendall(b"\r\n")
        raw, closed = read_to_close(sock)
    assert closed and raw == b"", raw
