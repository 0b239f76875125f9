"""Where a worker's text goes: the pipe, or (handed off) the client's socket itself."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from modeld.worker.engine import CancelFlag
from modeld.worker.output import ClientLost, HandoffOut, OutFormat, PipeOut, parse_handoff

NDJSON = OutFormat('{"type":"token","text":', "}\n", join=False, chunked=True, timeout_s=5.0)


class Events:
    """A stand-in for the protocol channel: what was sent, call by call."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], ...]] = []

    def send(self, *events: dict[str, Any]) -> None:
        self.calls.append(events)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client end, daemon end) of a connection; the daemon's end is non-blocking, as in
    the daemon, and its fd is what a worker gets a copy of."""
    client, daemon = socket.socketpair()
    daemon.setblocking(False)
    yield client, daemon
    client.close()
    daemon.close()


def handed(
    pair: tuple[socket.socket, socket.socket], fmt: OutFormat, flag: CancelFlag
) -> tuple[HandoffOut, Events]:
    events = Events()
    return HandoffOut(events.send, pair[1].dup().detach(), fmt, flag), events


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(2.0)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def read_all_nonblocking(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


# ---- framing -------------------------------------------------------------------------------


def test_each_text_is_its_own_event_in_one_chunk() -> None:
    got = NDJSON.frame(["a", 'b"\n', "é"])
    body = '{"type":"token","text":"a"}\n{"type":"token","text":"b\\"\\n"}\n'
    body += '{"type":"token","text":"é"}\n'
    assert got == b"%x\r\n" % len(body.encode()) + body.encode() + b"\r\n"


def test_joined_texts_are_one_event_and_raw_framing_has_no_chunk_sizes() -> None:
    fmt = OutFormat("data: {", "}\n\n", join=True, chunked=False, timeout_s=1.0)
    assert fmt.frame(["a", "b"]) == b'data: {"ab"}\n\n'


@pytest.mark.parametrize(
    "obj",
    [
        {"prefix": 1, "suffix": "", "timeout_s": 1},
        {"prefix": "", "suffix": None, "timeout_s": 1},
        {"prefix": "", "suffix": "", "timeout_s": 0},
        {"prefix": "", "suffix": "", "timeout_s": True},
        {"prefix": "", "suffix": ""},
        {"prefix": "", "suffix": "", "timeout_s": 1, "preamble": 5},
        {"prefix": "", "suffix": "", "timeout_s": 1, "preamble": "\u0100"},
        "not an object",
    ],
)
def test_a_bad_handoff_is_refused(obj: Any) -> None:
    with pytest.raises(ValueError):
        parse_handoff(obj)


def test_a_handoff_is_read() -> None:
    obj = {"prefix": "p", "suffix": "s", "join": True, "chunked": True, "timeout_s": 2}
    got = parse_handoff({**obj, "preamble": "HTTP/1.1 200 OK\r\n\r\n\xe9"})
    assert got == OutFormat("p", "s", True, True, 2.0, b"HTTP/1.1 200 OK\r\n\r\n\xe9")


# ---- the pipe --------------------------------------------------------------------------------


def test_the_pipe_gets_token_events_and_the_last_text_with_the_ending() -> None:
    events = Events()
    out = PipeOut(events.send, 3)
    out.write(["a", "b"])
    out.finish(["c"], {"ev": "done", "id": 3})
    assert events.calls == [
        ({"ev": "tokens", "id": 3, "texts": ["a", "b"]},),
        ({"ev": "tokens", "id": 3, "texts": ["c"]}, {"ev": "done", "id": 3}),
    ]


# ---- the client's socket ---------------------------------------------------------------------


def test_text_goes_onto_the_socket_and_only_the_ending_to_the_pipe(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    fmt = OutFormat(NDJSON.prefix, NDJSON.suffix, False, True, 5.0, b"HEAD\r\n\r\n")
    out, events = handed(pair, fmt, CancelFlag())
    out.begin()
    out.write(["a"])
    out.finish(["b"], {"ev": "done", "id": 7})
    assert events.calls == [({"ev": "done", "id": 7},)]
    assert read_all_nonblocking(pair[0]) == b"HEAD\r\n\r\n" + fmt.frame(["a"]) + fmt.frame(["b"])


def test_the_worker_lets_go_of_the_socket_when_it_finishes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    out, _ = handed(pair, NDJSON, CancelFlag())
    out.finish([], {"ev": "done", "id": 7})
    pair[1].close()  # the daemon's copy too: now the client must see the end
    assert read_all(pair[0]) == b""


def test_a_client_that_is_gone_is_lost(pair: tuple[socket.socket, socket.socket]) -> None:
    out, events = handed(pair, NDJSON, CancelFlag())
    pair[0].close()
    with pytest.raises(ClientLost) as exc:
        out.write(["a"])
    assert exc.value.reason == "gone"
    out.finish(["b"], {"ev": "done", "id": 7})
    assert events.calls == [({"ev": "done", "id": 7, "lost": "gone"},)]


def fill(sock: socket.socket) -> None:
    """Fill the socket's buffers: nothing more can be written until the peer reads."""
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass


def test_a_client_that_stops_reading_is_lost_after_the_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    fill(pair[1])
    fmt = OutFormat("", "", join=False, chunked=False, timeout_s=0.3)
    out, events = handed(pair, fmt, CancelFlag())
    began = time.monotonic()
    with pytest.raises(ClientLost) as exc:
        out.write(["a"])
    assert exc.value.reason == "stalled"
    assert time.monotonic() - began >= 0.25
    out.finish([], {"ev": "done", "id": 7})
    assert events.calls[-1][-1]["lost"] == "stalled"


def test_cancel_before_a_blocked_write_starts_drops_it_and_keeps_the_framing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    fill(pair[1])
    flag = CancelFlag()
    out, events = handed(pair, NDJSON, flag)
    threading.Timer(0.1, setattr, (flag, "cancelled", True)).start()
    out.write(["a"])  # returns once cancelled, nothing of it written
    out.finish(["b"], {"ev": "done", "id": 7})
    assert events.calls == [({"ev": "done", "id": 7},)]  # not lost: the daemon may end it


def test_cancel_halfway_through_a_write_tears_the_response(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    flag = CancelFlag()
    out, events = handed(pair, NDJSON, flag)
    threading.Timer(0.2, setattr, (flag, "cancelled", True)).start()
    with pytest.raises(ClientLost) as exc:
        out.write(["x" * 4_000_000])  # far more than the socket buffers hold
    assert exc.value.reason == "torn"
    out.finish([], {"ev": "done", "id": 7})
    assert events.calls == [({"ev": "done", "id": 7, "lost": "torn"},)]


def test_frames_are_valid_json_events() -> None:
    frame = NDJSON.frame(["\x00", "\u2028", "\\"])
    size, _, rest = frame.partition(b"\r\n")
    body = rest[: int(size, 16)]
    assert [json.loads(line)["text"] for line in body.splitlines()] == ["\x00", "\u2028", "\\"]


def test_a_head_that_never_went_out_means_the_response_cannot_be_ended(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Cancelled while the client's buffer is full, before any byte of the head: the daemon
    must not write an ending after a head that is missing, so the stream is `torn`."""
    fill(pair[1])
    flag = CancelFlag()
    flag.cancelled = True
    fmt = OutFormat("", "", False, True, 5.0, b"HTTP/1.1 200 OK\r\n\r\n")
    out, events = handed(pair, fmt, flag)
    out.begin()
    assert out.lost == "torn"
    with pytest.raises(ClientLost):
        out.write(["a"])
    out.finish([], {"ev": "done", "id": 7})
    assert events.calls == [({"ev": "done", "id": 7, "lost": "torn"},)]
