"""The sans-IO HTTP core: bytes in, requests and failures out, no sockets."""

from __future__ import annotations

import json

import pytest

from modeld.errors import InvalidRequest
from modeld.http.protocol import CLOSED, NEED_DATA, Failure, Limits, Request, ServerConnection

SMALL = Limits(max_head_bytes=1024, max_body_bytes=100)


def feed(conn: ServerConnection, data: bytes) -> object:
    conn.receive(data)
    return conn.next()


def test_a_simple_get_in_pieces() -> None:
    conn = ServerConnection(SMALL)
    assert feed(conn, b"GET /hea") is NEED_DATA
    req = feed(conn, b"lthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(req, Request)
    assert (req.method, req.path, req.query, req.header("HOST")) == ("GET", "/healthz", "x=1", "a")


def test_body_with_content_length_and_chunked() -> None:
    conn = ServerConnection(SMALL)
    req = feed(conn, b"POST /infer HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
    assert isinstance(req, Request) and req.body == b"{}"
    conn2 = ServerConnection(SMALL)
    raw = (
        b"POST /infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    req2 = feed(conn2, raw)
    assert isinstance(req2, Request) and req2.body == b"{}"


def test_a_request_is_timed_from_its_head_not_its_last_body_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 250.0])
    monkeypatch.setattr("modeld.http.protocol.time.monotonic", lambda: next(clock))
    conn = ServerConnection(SMALL)
    head = b"POST /infer HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
    assert feed(conn, head) is NEED_DATA  # the head is parsed at t=100
    req = feed(conn, b"{}")  # the body completes later
    assert isinstance(req, Request) and req.received_at == 100.0


def test_keep_alive_and_pipelining() -> None:
    conn = ServerConnection(SMALL)
    first = feed(conn, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(first, Request) and first.path == "/a"
    out = conn.full_response(200, [], b"ok")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"ok")
    assert conn.next_cycle()
    second = conn.next()
    assert isinstance(second, Request) and second.path == "/b"


def test_head_too_large_is_431() -> None:
    conn = ServerConnection(SMALL)
    out = feed(conn, b"GET / HTTP/1.1\r\nX: " + b"a" * 2000)
    assert isinstance(out, Failure) and out.error.http_status == 431


def test_body_too_large_is_413_from_content_length_before_reading() -> None:
    conn = ServerConnection(SMALL)
    out = feed(conn, b"POST /infer HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n")
    assert isinstance(out, Failure) and out.error.http_status == 413


def test_chunked_body_too_large_is_413_while_reading() -> None:
    conn = ServerConnection(SMALL)
    feed(conn, b"POST /infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    out = feed(conn, b"40\r\n" + b"x" * 64 + b"\r\n40\r\n" + b"x" * 64 + b"\r\n")
    assert isinstance(out, Failure) and out.error.http_status == 413


def test_smuggling_both_lengths_is_400() -> None:
    conn = ServerConnection(SMALL)
    raw = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    out = feed(conn, raw)
    assert isinstance(out, Failure) and out.error.http_status == 400
    response = conn.error_response(out.error, close=True)
    assert b"Connection: close" in response
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "bad_request"


def test_garbage_is_400_and_unknown_coding_is_501() -> None:
    out = feed(ServerConnection(SMALL), b"\x00\xff garbage\r\n\r\n")
    assert isinstance(out, Failure) and out.error.http_status == 400
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"
    out = feed(ServerConnection(SMALL), raw)
    assert isinstance(out, Failure) and out.error.http_status == 501


def test_clean_close_between_requests() -> None:
    conn = ServerConnection(SMALL)
    assert feed(conn, b"") is CLOSED


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"NaN", b'{"a": Infinity}', b"\xff\xfe", b"[" * 100_000],
)
def test_request_json_errors_are_clear_400s(body: bytes) -> None:
    req = Request("POST", "/infer", "/infer", "", (), body)
    with pytest.raises(InvalidRequest):
        req.json()


def test_head_too_large_is_431_even_when_it_arrives_whole() -> None:
    conn = ServerConnection(SMALL)
    out = feed(conn, b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
    assert isinstance(out, Failure) and out.error.http_status == 431


# ---- messages a client reads -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HELLO\r\n\r\n", "malformed request: illegal request line 'HELLO'"),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
            "malformed request: illegal header line 'no colon here'",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "unsupported request: only Transfer-Encoding: chunked is supported",
        ),
    ],
)
def test_protocol_errors_read_as_words_not_python_reprs(raw: bytes, expected: str) -> None:
    out = feed(ServerConnection(SMALL), raw)
    assert isinstance(out, Failure)
    assert out.error.message == expected


def test_quoted_request_bytes_are_cut_short() -> None:
    out = feed(ServerConnection(SMALL), b"HELLO" + b"x" * 500 + b"\r\n\r\n")
    assert isinstance(out, Failure)
    message = out.error.message
    assert "bytearray" not in message and "b'" not in message, message
    assert message.endswith("…'") and len(message) < 100, message


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"{", "at line 1 column 2"),
        (b'{"model": "tiny",\n "prompt": }', "at line 2 column 12"),
    ],
)
def test_json_errors_say_where_in_lines_and_columns(body: bytes, where: str) -> None:
    req = Request("POST", "/infer", "/infer", "", (), body)
    with pytest.raises(InvalidRequest) as info:
        req.json()
    assert info.value.message.startswith("the request body is not valid JSON: ")
    assert info.value.message.endswith(where), info.value.message


def test_the_request_line_of_a_refused_head_is_known_for_the_log() -> None:
    conn = ServerConnection(SMALL)
    assert conn.request_line() == (None, None)
    out = feed(conn, b"POST /infer?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n")
    assert isinstance(out, Failure) and out.error.http_status == 413
    assert conn.request_line() == ("POST", "/infer")


def test_the_request_line_is_forgotten_once_a_request_completes() -> None:
    conn = ServerConnection(SMALL)
    req = feed(conn, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(req, Request)
    assert conn.request_line() == (None, None)


def test_expect_100_continue_is_answered_once_then_the_body_is_read() -> None:
    conn = ServerConnection(SMALL)
    head = b"POST /infer HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    assert feed(conn, head) is NEED_DATA
    assert conn.continue_response().startswith(b"HTTP/1.1 100 ")
    assert conn.continue_response() == b""  # once
    req = feed(conn, b"{}")
    assert isinstance(req, Request) and req.body == b"{}"


def test_no_100_continue_when_the_body_came_anyway_or_is_too_large() -> None:
    conn = ServerConnection(SMALL)
    head = b"POST /infer HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    assert isinstance(feed(conn, head + b"{}"), Request)
    assert conn.continue_response() == b""
    big = ServerConnection(SMALL)
    head = b"POST /infer HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 101\r\n\r\n"
    failure = feed(big, head)
    assert isinstance(failure, Failure) and failure.error.http_status == 413


def test_a_head_request_gets_the_head_with_the_length_of_the_body_and_no_body() -> None:
    conn = ServerConnection(SMALL)
    req = feed(conn, b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(req, Request) and req.method == "HEAD"
    out = conn.full_response(200, [("Content-Type", "application/json")], b'{"status": "ok"}')
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 16" in head
    assert body == b""
    assert conn.next_cycle()  # and the connection goes on to the next request
    req2 = feed(conn, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(req2, Request)
    assert conn.full_response(200, [], b"{}").endswith(b"\r\n\r\n{}")


def test_a_bad_request_after_a_head_still_gets_its_error_body() -> None:
    conn = ServerConnection(SMALL)
    assert isinstance(feed(conn, b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n"), Request)
    conn.full_response(200, [], b"{}")
    assert conn.next_cycle()
    failure = feed(conn, b"GARBAGE\r\n\r\n")
    assert isinstance(failure, Failure)
    out = conn.error_response(failure.error, close=True)
    body = out.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"]["code"] == failure.error.code


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/models?x=1", "/models", "x=1"),
        (b"http://127.0.0.1:8484/healthz", "/healthz", ""),
        (b"HTTP://localhost/models?a=b", "/models", "a=b"),
        (b"http://localhost", "/", ""),
        (b"http://localhost?x", "/", "x"),
        (b"/a?b?c", "/a", "b?c"),
        (b"http://[::1/healthz", "/healthz", ""),  # a broken authority: no parser raises
        (b"http://]x/", "/", ""),
    ],
)
def test_origin_and_absolute_form_targets(target: bytes, path: str, query: str) -> None:
    conn = ServerConnection(SMALL)
    req = feed(conn, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(req, Request) and (req.path, req.query) == (path, query)
    assert req.authority is None if target.startswith(b"/") else req.authority is not None


def test_a_later_http_1_minor_version_is_served_as_1_1() -> None:
    req = feed(ServerConnection(SMALL), b"GET /healthz HTTP/1.9\r\nHost: a\r\n\r\n")
    assert isinstance(req, Request)


def test_blank_lines_between_pipelined_requests_are_skipped() -> None:
    conn = ServerConnection(SMALL)
    head = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    assert isinstance(feed(conn, b"\r\n\r\n" + head + b"\r\n" + head), Request)
    conn.full_response(200, [], b"{}")
    assert conn.next_cycle()
    req = conn.next()
    assert isinstance(req, Request) and req.path == "/healthz"


@pytest.mark.parametrize(("version", "chunked"), [(b"1.1", True), (b"1.0", False)])
def test_a_streamed_body_is_chunked_for_http_1_1_and_raw_for_1_0(
    version: bytes, chunked: bool
) -> None:
    """What a worker writing a body straight to the socket must frame it as."""
    conn = ServerConnection(SMALL)
    req = feed(conn, b"POST /infer HTTP/" + version + b"\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
    assert isinstance(req, Request)
    headers = [("Content-Type", "application/x-ndjson")]
    assert conn.preview_response(200, headers)[1] is chunked
    assert conn.preview_response(200, headers)[1] is chunked  # asking twice changes nothing
    head = conn.start_response(200, headers)
    body = conn.data(b"abc") + conn.end()
    assert body == (b"3\r\nabc\r\n0\r\n\r\n" if chunked else b"abc")
    assert (b"chunked" in head.lower()) is chunked


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /infer HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /infer HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /infer HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /infer HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v1/x?a=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        b"POST /infer HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["1.1", "1.1-close", "1.0", "1.0-keep-alive", "chunked-request", "expect"],
)
def test_a_previewed_response_is_the_one_started_later(request_head: bytes) -> None:
    """A worker writes the previewed head and first body bytes; the daemon starts the
    response afterwards and must be in step with what went out."""
    conn = ServerConnection(SMALL)
    assert isinstance(feed(conn, request_head), Request)
    headers = [("Content-Type", "text/event-stream")]
    preview, chunked = conn.preview_response(200, headers, b"role chunk")
    started = conn.start_response(200, headers) + conn.data(b"role chunk")
    assert preview == started
    assert chunked is (b"transfer-encoding: chunked" in preview.lower())
    assert conn.data(b"more") + conn.end()  # the real connection goes on as usual
