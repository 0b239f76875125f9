"""Fuzz the request path of ONE real daemon with hypothesis: raw bytes and JSON bodies.

Raw bytes (pieces of real requests mixed with random bytes, sent in pieces split at random
points) go to both listeners: the answer is a 4xx (or a real answer, for the odd valid
request; or 501 for a transfer coding other than chunked) and a close, never another 5xx,
never a traceback, never a dead daemon. JSON bodies
with wrong types, huge numbers, unicode and NULs get a 400 (or a 200/404 when they
happen to be valid), never a 500. The daemon runs with a 64-token context so that any
generation a fuzzed request starts is over in milliseconds.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import ModelStore
from tests.helpers.daemon import Daemon
from tests.helpers.raw import (
    daemon_alive,
    open_socket,
    parse_responses,
    read_to_close,
)
from tests.integration.conftest import log_tail, running, stream_to_end

RAW_SETTINGS = settings(
    max_examples=150,  # about 8 s: a few examples wait out the 0.3 s head deadline
    deadline=None,  # each example talks to a real daemon: timing varies
    database=None,  # no .hypothesis/ directory in the tree
    suppress_health_check=[HealthCheck.too_slow],
)
JSON_SETTINGS = settings(RAW_SETTINGS, max_examples=300)  # about 3 s: each is one request
DAEMON_ARGS = (
    "--n-ctx",
    "64",
    "--head-timeout-s",
    "0.3",  # an unfinished request that is not half-closed costs this
    "--body-timeout-s",
    "0.3",
    "--keepalive-timeout-s",
    "0.1",
    "--max-head-bytes",
    "2048",
    "--no-spare-worker",
)
PIECE_PAUSE_S = 0.001  # between pieces, so the daemon may read a split request in parts
READ_TIMEOUT_S = 5.0  # every answer, timeout included, comes well within this
# Failures of the bytes themselves: each ends its connection.
CLOSING_CODES = {
    "bad_request",
    "request_timeout",
    "payload_too_large",
    "headers_too_large",
    "not_implemented",
    "http_version_not_supported",
}

# Pieces of real requests, to get past the request line more often than random bytes do.
FRAGMENTS = [
    b"GET /healthz HTTP/1.1\r\n",
    b"GET /status HTTP/1.1\r\n",
    b"GET /models HTTP/1.0\r\n",
    b"POST /infer HTTP/1.1\r\n",
    b"POST /v1/completions HTTP/1.1\r\n",
    b"DELETE /models HTTP/1.1\r\n",
    b"HEAD /healthz HTTP/1.1\r\n",
    b"HEAD /infer HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n",
    b"Host: localhost\r\n",
    b"Host: evil.example\r\n",
    b"Content-Length: 2\r\n",
    b"Content-Length: 99999999\r\n",
    b"Content-Length: -5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Connection: close\r\n",
    b"Expect: 100-continue\r\n",
    b"Content-Type: application/json\r\n",
    b"\r\n",
    b"\r\n\r\n",
    b"{}",
    b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}',
    b"5\r\nhello\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b"\x00",
    b" ",
    b":",
    b"\xff\xfe",
]
payloads = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=48)), min_size=1, max_size=8
).map(b"".join)


@pytest.fixture(scope="module")
def fuzz_daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("fuzz"), {"tiny.gguf": "tiny"})
    with running(models, *DAEMON_ARGS) as daemon:
        stream_to_end(daemon.client(), {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        yield daemon


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """data split at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@RAW_SETTINGS
@given(
    via=st.sampled_from(["unix", "tcp"]),
    payload=payloads,
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=4),
    half_close=st.sampled_from([True, True, True, False]),
)
@example(
    via="tcp",
    payload=b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    cuts=[5],
    half_close=False,
)
@example(via="unix", payload=b"\x16\x03\x01\x00\xf5\x01", cuts=[], half_close=False)
@example(  # a HEAD answer has a Content-Length and no body; it once took the daemon down
    via="unix",
    payload=b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    cuts=[],
    half_close=True,
)
@example(  # and a bad request after one on the same connection lost its error body
    via="tcp",
    payload=b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGARBAGE\r\n\r\n",
    cuts=[],
    half_close=True,
)
def test_raw_bytes_get_a_4xx_and_a_close(
    fuzz_daemon: Daemon, via: str, payload: bytes, cuts: list[int], half_close: bool
) -> None:
    with open_socket(fuzz_daemon, via) as sock:
        if via == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in pieces(payload, cuts):
                sock.sendall(piece)
                time.sleep(PIECE_PAUSE_S)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # answered and closed before the rest was sent (EPIPE, ECONNRESET, ENOTCONN)
        raw, closed = read_to_close(sock, READ_TIMEOUT_S)
    assert closed, f"still open after {READ_TIMEOUT_S} s: {raw[:300]!r}"
    assert b"Traceback" not in raw and b'File "' not in raw, raw[:2000]
    responses = parse_responses(raw, head=b"HEAD " in payload)
    for i, resp in enumerate(responses):
        # 501: a transfer coding; 505: a request line naming another HTTP version
        assert resp.status < 500 or resp.status in (501, 505), (resp.status, resp.body)
        if resp.status >= 400 and resp.headers.get("content-type") == "application/json":
            code = resp.json()["error"]["code"]
            if code in CLOSING_CODES:
                assert i == len(responses) - 1 and resp.closes, responses
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None


# ---- JSON bodies ---------------------------------------------------------------------------------

FIELDS = [
    "model",
    "prompt",
    "stream",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**31, max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# JSON texts json.dumps would not write (or would write differently) from Python values.
RAW_VALUES = [
    "1" * 5000,  # more digits than Python converts by default
    "-" + "9" * 4400,
    "1e400",
    "-1e400",
    "1e-400",
    "0.0000000000000000000000001",
    "-0",
    '"\\ud800"',  # a lone surrogate
    '"\\udfff\\ud800"',
    '"\\u0000"',
    '"a\\u0000b"',
    '"\\ufeff"',
    '"\U0001f600\u202e\u0301"',
    "[" * 40 + "]" * 40,
    '{"": {"": {"": null}}}',
]
raw_values = st.one_of(json_values.map(json.dumps), st.sampled_from(RAW_VALUES))
BASE = {"model": '"tiny"', "prompt": '"hi"', "max_tokens": "4", "stream": "false"}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """An /infer-like JSON text: a valid body with some fields replaced, or anything at all."""
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return draw(raw_values).encode("utf-8", "surrogatepass")
    fields = dict(BASE) if draw(st.booleans()) else {}
    keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
    fields.update(draw(st.dictionaries(keys, raw_values, max_size=4)))
    text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"
    return text.encode("utf-8", "surrogatepass")


@JSON_SETTINGS
@given(
    via=st.sampled_from(["unix", "tcp"]),
    path=st.sampled_from(["/infer", "/infer", "/v1/completions", "/v1/chat/completions"]),
    body=bodies(),
)
@example(
    via="unix",
    path="/infer",
    body=b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"1" * 5000 + b"}",
)
@example(via="tcp", path="/infer", body=b'{"model": "tiny", "prompt": "\\ud800", "stream": false}')
@example(via="unix", path="/infer", body=b'{"model": "tiny", "prompt": "a\\u0000b"}')
@example(via="tcp", path="/infer", body=b'{"model": "tiny\\u0000", "prompt": "hi"}')
@example(
    via="unix",
    path="/v1/chat/completions",
    body=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
)
def test_json_bodies_get_a_400_never_a_500(
    fuzz_daemon: Daemon, via: str, path: str, body: bytes
) -> None:
    resp = fuzz_daemon.client(via, timeout=READ_TIMEOUT_S).request("POST", path, raw=body)
    assert resp.status in (200, 400, 404), (resp.status, resp.body[:500])
    assert b"Traceback" not in resp.body
    if resp.status != 200:
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"], error
    elif path == "/infer" and resp.headers["content-type"] == "application/x-ndjson":
        assert resp.events()[-1]["type"] == "done", resp.body[-300:]
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None


def test_the_daemon_survived_the_fuzz(fuzz_daemon: Daemon) -> None:
    """Runs after the fuzz tests (file order): the daemon serves and logged no crash."""
    daemon_alive(fuzz_daemon)
    log = fuzz_daemon.log()
    assert "unhandled error" not in log, log_tail(fuzz_daemon)
    assert "error serving a connection" not in log, log_tail(fuzz_daemon)
    assert "Traceback" not in log, log_tail(fuzz_daemon)
