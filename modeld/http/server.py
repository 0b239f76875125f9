"""The anyio shell around `protocol.ServerConnection`: sockets in, handler calls out.

Theory of operation: each accepted connection runs `serve_connection()`, a loop of
read-a-request (under the head, body and keep-alive deadlines) and call-the-handler.
While the handler runs, a watcher task keeps reading the socket: if the client goes away,
the handler's cancel scope is cancelled, so a queued request leaves its queue and a
running generation is stopped. The handler answers through a `Responder`, whose writes
have a deadline, so a client that stops reading cannot hold a generation forever.

A streamed response may be written by another process: `Responder.prepare_hand_off`
lends the socket's fd to the model's worker with the head to write first
(`modeld.worker.output`), `started_elsewhere` keeps h11 in step once it has, and nothing
else is written until the worker reports the end; `Responder.lost` turns a client the
worker could not write to (gone, stalled, torn) into `ClientGone`, which closes the
connection.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import anyio.abc

from modeld.errors import ModeldError, RequestTimeout, TooManyConnections
from modeld.http.protocol import (
    CLOSED,
    NEED_DATA,
    Failure,
    Limits,
    Request,
    ServerConnection,
)

log = logging.getLogger("modeld.http")

RECEIVE_SIZE = 65536  # bytes per socket read
REFUSAL_LOG_S = 1.0  # connections refused over --max-connections: at most a log line this often
GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


@dataclass(frozen=True)
class ConnInfo:
    """Which listener a connection came in on."""

    kind: str  # "unix" | "tcp"
    loopback_only: bool  # a TCP listener bound to a loopback address


class Responder:
    """How a handler answers one request: `start`/`send`/`end`, or `respond` at once."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: ServerConnection,
        limits: Limits,
        *,
        handoff: bool = True,
    ) -> None:
        self._stream = stream
        # A plain non-blocking socket (Unix, or TCP: see modeld.http.tcp): what `send`
        # has written is in the kernel, so it may be written to directly, and handed off.
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._sock = raw if isinstance(raw, socket.socket) else None
        self._handoff = handoff  # whether a worker may write a response (--stream-handoff)
        self._conn = conn
        self._limits = limits
        self.started = False
        self.finished = False
        self.status = 0
        self.client_gone = False
        self._head = b""  # a response head not written yet
        self._preview = b""  # what a worker was given to write first (`prepare_hand_off`)
        self.close_after = False  # the connection must not serve another request

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        if self._sock is not None:
            # Straight into the socket buffer when it has room: a token event then costs
            # one system call and no trip through the event loop. Nothing else in the
            # daemon writes to the socket (a worker may: see `prepare_hand_off`).
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.lost("gone")
            if sent == len(data):
                return
            data = data[sent:]
        # The socket buffer is full (or the stream is no plain socket): a client that reads
        # nothing for the send timeout is dropped. Only these writes pay for a timer.
        try:
            with anyio.fail_after(self._limits.send_timeout_s):
                await self._stream.send(data)
        except TimeoutError:  # first: it is an OSError too, which GONE holds
            self.lost("stalled")
        except GONE:
            self.lost("gone")

    @property
    def send_timeout_s(self) -> float:
        return self._limits.send_timeout_s

    @property
    def can_hand_off(self) -> bool:
        """Whether another process may write this response's body onto the socket (a
        plain socket, where every write of ours reaches the kernel before `send` returns)."""
        return self._handoff and self._sock is not None and not self._conn.head_only

    def prepare_hand_off(
        self, status: int, headers: list[tuple[str, str]], body: bytes = b""
    ) -> tuple[int, bytes, bool] | None:
        """For a worker to write this response onto the socket itself: the socket's fd,
        the bytes `start(status, headers)` and `send(body)` would write first, and whether
        the body is chunked; None when it cannot. The worker writes them, then the daemon
        calls `started_elsewhere` and writes nothing until the worker has let go."""
        if not self.can_hand_off or self.started:
            return None
        assert self._sock is not None
        self._preview, chunked = self._conn.preview_response(status, headers, body)
        return self._sock.fileno(), self._preview, chunked

    def started_elsewhere(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """The worker has written what `prepare_hand_off` previewed: start the response
        on this side, in step with it."""
        self.started = True
        self.status = status
        written = self._conn.start_response(status, headers) + self._conn.data(body)
        if written != self._preview:  # a bug: the client got another head than h11 keeps
            log.error("a handed-off response's head differs from the one started")
            self.close_after = True  # the framing may not be the client's: no keep-alive

    def lost(self, reason: str) -> NoReturn:
        """The client cannot be written to: `gone`, `stalled` (it read nothing for the
        send timeout) or `torn` (a worker's write to it was cut off halfway). The
        response cannot be ended; the connection closes."""
        self.client_gone = True
        if reason == "stalled":
            log.info(
                "dropping a client that stopped reading for %.1f s", self._limits.send_timeout_s
            )
            raise ClientGone("the client stopped reading") from None
        if reason == "torn":
            raise ClientGone("the response was cut off halfway through a write") from None
        raise ClientGone("the client went away") from None

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Decide the status; the head goes out with the first body bytes, in one write."""
        self.started = True
        self.status = status
        self._head = self._conn.start_response(status, headers)

    async def send(self, data: bytes) -> None:
        head, self._head = self._head, b""
        await self._write(head + self._conn.data(data))

    async def end(self) -> None:
        self.finished = True
        head, self._head = self._head, b""
        await self._write(head + self._conn.end())

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.started = self.finished = True
        self.status = status
        await self._write(self._conn.full_response(status, headers, body))

    async def respond_error(self, error: ModeldError, body: dict[str, Any] | None = None) -> None:
        self.started = self.finished = True
        self.status = error.http_status
        await self._write(self._conn.error_response(error, body=body))


Handler = Callable[[Request, Responder, ConnInfo], Awaitable[None]]
# The error object for a request path (the app's choice of shape); None: modeld's own.
ErrorBody = Callable[[str, ModeldError], dict[str, Any]]


def log_request(
    method: str | None,
    path: str | None,
    status: int,
    since: float,
    *,
    outcome: str | None = None,
    level: int = logging.INFO,
    **extra: Any,
) -> None:
    """The request log line of a response the generating endpoints do not log themselves."""
    fields: dict[str, Any] = {
        "event": "request",
        "method": method,
        "path": path,
        "status": status,
        "total_ms": round((time.monotonic() - since) * 1000, 2),
        **extra,
    }
    if outcome is not None:
        fields["outcome"] = outcome
    tail = f" {outcome}" if outcome else ""
    log.log(level, "%s %s %s%s", method or "-", path or "-", status, tail, extra={"fields": fields})


async def _refuse(
    stream: anyio.abc.ByteStream,
    conn: ServerConnection,
    error: ModeldError,
    since: float,
    error_body: ErrorBody | None,
) -> None:
    """Answer an error the handler never saw (framing, limits, deadlines) and log it."""
    method, path = conn.request_line()
    body = error_body(path, error) if error_body is not None and path is not None else None
    await _send_quietly(stream, conn.error_response(error, close=True, body=body))
    log_request(method, path, error.http_status, since, outcome=error.code)


class ConnectionSlots:
    """Open connections: counted against `Limits.max_connections`, drained at shutdown."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.idle = 0  # keep-alive connections waiting, with nothing received, between requests
        self.draining = False  # shutting down: finish the request under way, then close
        self._refusals_logged_at = -REFUSAL_LOG_S  # a flood of refusals is one line a second
        self._refusals_unlogged = 0

    def refusal_to_log(self) -> int | None:
        """None when this refusal goes unlogged, else how many went unlogged before it."""
        now = time.monotonic()
        if now - self._refusals_logged_at < REFUSAL_LOG_S:
            self._refusals_unlogged += 1
            return None
        unlogged, self._refusals_unlogged = self._refusals_unlogged, 0
        self._refusals_logged_at = now
        return unlogged

    @property
    def busy(self) -> int:
        """Connections with a request arriving or being answered."""
        return self.open - self.idle


async def serve_connection(
    stream: anyio.abc.ByteStream,
    handler: Handler,
    limits: Limits,
    info: ConnInfo,
    slots: ConnectionSlots,
    error_body: ErrorBody | None = None,
    *,
    handoff: bool = True,
) -> None:
    """Serve requests on one connection until it closes; `error_body` shapes the errors
    answered before the handler sees a request (after its head, when the path is known);
    `handoff` lets workers write streamed responses themselves (`Responder.prepare_hand_off`)."""
    conn = ServerConnection(limits)
    slots.open += 1
    try:
        if slots.open > slots.limit:
            error = TooManyConnections(f"more than {slots.limit} open connections")
            since = time.monotonic()
            await _send_quietly(stream, conn.error_response(error, close=True))
            unlogged = slots.refusal_to_log()
            if unlogged is not None:
                log_request(None, None, 503, since, outcome=error.code, unlogged=unlogged)
            return
        first = True
        while True:
            outcome, since = await _read_request(stream, conn, limits, first, slots)
            first = False
            if outcome is None or outcome is CLOSED:
                return
            if isinstance(outcome, Failure):
                await _refuse(stream, conn, outcome.error, since, error_body)
                return
            assert isinstance(outcome, Request)
            responder = Responder(stream, conn, limits, handoff=handoff)
            await _run_handler(stream, conn, handler, outcome, responder, info)
            if responder.client_gone or responder.close_after or not responder.finished:
                return
            if not conn.next_cycle():
                return
            if slots.draining:
                return
    except GONE:
        return
    except Exception:  # a bug serving one connection ends that connection, never the daemon
        log.exception("error serving a connection; closing it")
        return
    finally:
        slots.open -= 1
        with anyio.CancelScope(shield=True):
            await stream.aclose()


async def _send_quietly(stream: anyio.abc.ByteStream, data: bytes) -> None:
    try:
        with anyio.move_on_after(1.0):
            await stream.send(data)
    except GONE:
        pass


async def _read_request(
    stream: anyio.abc.ByteStream,
    conn: ServerConnection,
    limits: Limits,
    first: bool,
    slots: ConnectionSlots,
) -> tuple[Request | Failure | object | None, float]:
    """Read until a whole request is there; None when the connection should just close.

    Also returns when the request began: its first bytes, or now for the first request.
    """
    began = time.monotonic()
    outcome = conn.next()  # a pipelined request may already be buffered
    if outcome is not NEED_DATA:
        return outcome, began
    # Between requests a keep-alive connection may idle; after that the head has its deadline
    # (at once when part of the next request came with the last one).
    if not first and not conn.request_begun:
        data: bytes | None = None
        slots.idle += 1
        try:
            with anyio.move_on_after(limits.keepalive_timeout_s):
                while not conn.request_begun:  # blank lines keep it idle
                    data = await _receive(stream)
                    conn.receive(data)
                    if not data:
                        break
        finally:
            slots.idle -= 1
        if data is None or (data and not conn.request_begun):  # idle until the deadline
            return None, began
        began = time.monotonic()
        outcome = conn.next()
        if outcome is not NEED_DATA:
            return outcome, began
    try:
        with anyio.fail_after(limits.head_timeout_s):
            while outcome is NEED_DATA and conn.in_head:
                conn.receive(await _receive(stream))
                outcome = conn.next()
        with anyio.fail_after(limits.body_timeout_s):
            if outcome is NEED_DATA and (go_on := conn.continue_response()):
                await stream.send(go_on)  # `Expect: 100-continue`: the body follows it
            while outcome is NEED_DATA:
                conn.receive(await _receive(stream))
                outcome = conn.next()
    except TimeoutError:
        what = "headers" if conn.in_head else "body"
        return Failure(RequestTimeout(f"request {what} not received in time")), began
    return outcome, began


async def _receive(stream: anyio.abc.ByteStream) -> bytes:
    try:
        return await stream.receive(RECEIVE_SIZE)
    except anyio.EndOfStream:
        return b""


async def _run_handler(
    stream: anyio.abc.ByteStream,
    conn: ServerConnection,
    handler: Handler,
    request: Request,
    responder: Responder,
    info: ConnInfo,
) -> None:
    """Call the handler while watching for the client going away."""
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            pending = 0
            while pending <= conn.limits.max_head_bytes:
                try:
                    data = await stream.receive(RECEIVE_SIZE)
                except GONE:
                    responder.client_gone = True
                    tg.cancel_scope.cancel()
                    return
                pending += len(data)
                conn.receive(data)  # a pipelined request, kept for the next cycle

        tg.start_soon(watch)
        try:
            await handler(request, responder, info)
        except ClientGone:
            pass
        finally:
            tg.cancel_scope.cancel()
