"""Where a generation's text goes: token events on the protocol pipe, or the client itself.

Theory of operation: by default text leaves as `tokens` events on the protocol pipe and
the daemon frames and forwards them, which costs the daemon an event-loop wake-up per
write. A streamed response skips that hop: the `generate` op says `handoff`, and
once the daemon has written the response head it sends an `out` op carrying a copy of
the client socket's fd (SCM_RIGHTS) and how to frame each text (the JSON text goes between a
prefix and a suffix; HTTP chunked or raw). The worker then writes text events straight
onto the client's socket and tells the daemon only how the generation ended; the daemon
writes the last event and the end of the body itself.

Until the `out` op arrives, a handed-off generation waits with its first text, so bytes
reach the client in order: the head first (the daemon's), then the worker's events, then
the daemon's ending. The daemon may also answer "no socket" (`sock: false`), and the text
goes to the pipe after all.

The client socket is non-blocking (its open file is shared with the daemon, so the worker
never changes that). A write that cannot finish waits in slices, checking the generation's
cancel flag, for at most the daemon's send timeout; then the client counts as lost:
`gone` (it closed), `stalled` (it stopped reading) or `torn` (cancelled halfway through a
write, so the response can only be cut off).
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from modeld.manager.backend import LostReason

if TYPE_CHECKING:
    from modeld.worker.engine import CancelFlag

__all__ = ["ClientLost", "HandoffOut", "Out", "OutFormat", "PipeOut", "parse_out"]

WAIT_SLICE_S = 0.05  # a blocked write looks at the cancel flag this often
DECISION_TIMEOUT_S = 30.0  # an `out` op later than this: the daemon is stuck; use the pipe
encode_string = json.encoder.encode_basestring  # JSON string literal, in C


class Send(Protocol):
    """The protocol channel: events written together, in one go."""

    def __call__(self, *events: dict[str, Any]) -> None: ...


class Out(Protocol):
    """Where a generation's text goes (the engine's decode loop writes to it)."""

    ready: bool  # text may be written now (read at every token: a plain attribute)

    def wait_ready(self) -> None:
        """Block until text may be written (or the generation is cancelled)."""

    def write(self, texts: list[str]) -> None:
        """Write texts now; ClientLost when the client cannot take them."""

    def finish(self, texts: list[str], last: dict[str, Any]) -> None:
        """The last texts, then `last` (done or error) on the protocol channel."""


class ClientLost(Exception):
    """Writing to the client failed; `reason` is gone, stalled or torn."""

    def __init__(self, reason: LostReason) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class OutFormat:
    """How text becomes bytes on the client's socket (the `out` op's fields)."""

    prefix: str  # each event: prefix + JSON string of the text + suffix
    suffix: str
    join: bool  # one event per write with the texts joined, else one event per text
    chunked: bool  # HTTP/1.1 chunked framing around each write, else raw bytes
    timeout_s: float  # the daemon's send timeout

    def frame(self, texts: list[str]) -> bytes:
        if self.join:
            body = (self.prefix + encode_string("".join(texts)) + self.suffix).encode()
        else:
            prefix, suffix = self.prefix, self.suffix
            body = "".join([prefix + encode_string(t) + suffix for t in texts]).encode()
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(body), body)
        return body


def parse_out(obj: dict[str, Any]) -> OutFormat:
    """Validate an `out` op's format fields (ValueError says what is wrong)."""
    prefix, suffix = obj.get("prefix"), obj.get("suffix")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError("prefix and suffix must be strings")
    timeout = obj.get("timeout_s")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError("timeout_s must be a positive number")
    return OutFormat(prefix, suffix, obj.get("join") is True, obj.get("chunked") is True, timeout)


class PipeOut:
    """Text as `tokens` events on the protocol pipe (the daemon forwards them)."""

    ready = True  # text may be written now

    def __init__(self, send: Send, rid: int) -> None:
        self._send = send
        self._rid = rid

    def wait_ready(self) -> None:
        """Always ready."""

    def write(self, texts: list[str]) -> None:
        self._send({"ev": "tokens", "id": self._rid, "texts": texts})

    def finish(self, texts: list[str], last: dict[str, Any]) -> None:
        """The last text and the ending event, in one write."""
        events = [{"ev": "tokens", "id": self._rid, "texts": texts}] if texts else []
        self._send(*events, last)


class HandoffOut:
    """Text held until the daemon's `out` op; then on the client's socket, or the pipe."""

    def __init__(self, send: Send, rid: int, cancel: CancelFlag) -> None:
        self._pipe = PipeOut(send, rid)
        self._send = send
        self._cancel = cancel
        self._lock = threading.Lock()  # decide (reader thread) against close (decode thread)
        self._decided = threading.Event()
        self._fd: int | None = None
        self._format: OutFormat | None = None
        self.ready = False  # set once the `out` op has come (read every token: a plain bool)
        self.lost: LostReason | None = None  # why the client can no longer be written to

    # -- the reader thread --

    def decide(self, target: tuple[int, OutFormat] | None) -> None:
        """The `out` op: write to the fd (which this now owns) framed so, or with None, to
        the pipe."""
        with self._lock:
            if self._decided.is_set():  # too late: the generation is over
                if target is not None:
                    os.close(target[0])
                return
            if target is not None:
                self._fd, self._format = target
            self.ready = True
            self._decided.set()

    def abandon(self) -> None:
        """Cancelled: a generation waiting for its `out` op stops waiting."""
        self._decided.set()

    # -- the decode thread --

    def wait_ready(self) -> None:
        """Wait for the `out` op (or a cancel). Generating on meanwhile would only take
        the CPU the daemon needs to send it; a slow model's prompt outlasts the wait."""
        if not self._decided.wait(DECISION_TIMEOUT_S):
            with self._lock:  # the daemon is stuck: the pipe is always there
                self.ready = True
                self._decided.set()

    def write(self, texts: list[str]) -> None:
        """Write the texts now (only once `ready`); ClientLost if the client cannot take them."""
        if self._format is None:
            self._pipe.write(texts)
        else:
            self._write_all(self._format.frame(texts))

    def finish(self, texts: list[str], last: dict[str, Any]) -> None:
        """The last text, then the socket let go, then (on the pipe) the ending event."""
        self.wait_ready()
        if self._format is None:
            self.close()
            self._pipe.finish(texts, last)
            return
        try:
            if texts and self.lost is None:
                self._write_all(self._format.frame(texts))
        except ClientLost:
            pass  # recorded in self.lost
        finally:
            self.close()
        if self.lost is not None:
            last["lost"] = self.lost
        self._send(last)

    def close(self) -> None:
        """Let go of the socket; an `out` op still to come is let go of when it comes."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._decided.set()
        if fd is not None:
            os.close(fd)

    def _write_all(self, data: bytes) -> None:
        """All of data onto the socket, waiting while the client's buffer is full.

        Cancelled before any of it went: nothing is written (the framing stays whole).
        """
        fd = self._fd
        assert fd is not None and self._format is not None
        view = memoryview(data)
        deadline = 0.0
        while view:
            try:
                view = view[os.write(fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError:
                self._lose("gone")
            begun = len(view) < len(data)
            if self._cancel.cancelled:
                if begun:
                    self._lose("torn")
                return
            now = time.monotonic()
            deadline = deadline or now + self._format.timeout_s
            if now >= deadline:
                self._lose("stalled")
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(WAIT_SLICE_S * 1000)

    def _lose(self, reason: LostReason) -> NoReturn:
        self.lost = reason
        raise ClientLost(reason)
