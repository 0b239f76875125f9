"""Where a generation's text goes: token events on the protocol pipe, or the client itself.

Theory of operation: by default text leaves as `tokens` events on the protocol pipe and
the daemon frames and forwards them, which costs the daemon an event-loop wake-up per
write. A streamed response skips that hop: its `generate` op carries a copy of the client
socket's fd (SCM_RIGHTS), the response's first bytes (the head the daemon will start,
and for a chat the role chunk) and how to frame each text (the JSON text between a
prefix and a suffix; HTTP chunked or raw). Once the prompt is accepted the worker writes
those first bytes, then says `start`, and from then on writes the text events onto the
client's socket itself; it tells the daemon only how the generation ended, and the
daemon writes the last event and the end of the body. Bytes reach the client in order:
the daemon writes nothing between the `generate` op and the worker's last word, and
nothing at all when the worker refuses the prompt before `start` (then it answers with
an error status of its own).

The client socket is non-blocking (its open file is shared with the daemon, so the worker
never changes that). A write that cannot finish waits in slices, checking the generation's
cancel flag, for at most the daemon's send timeout; then the client counts as lost:
`gone` (it closed), `stalled` (it stopped reading) or `torn` (cancelled halfway through a
write, so the response can only be cut off).
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from modeld.manager.backend import LostReason, text_events

if TYPE_CHECKING:
    from modeld.worker.engine import CancelFlag

__all__ = ["ClientLost", "HandoffOut", "Out", "OutFormat", "PipeOut", "parse_handoff"]

WAIT_SLICE_S = 0.05  # a blocked write looks at the cancel flag this often


class Send(Protocol):
    """The protocol channel: events written together, in one go."""

    def __call__(self, *events: dict[str, Any]) -> None: ...


class Out(Protocol):
    """Where a generation's text goes (the engine's decode loop writes to it)."""

    lost: LostReason | None  # the client cannot be written to any more

    def begin(self) -> None:
        """The prompt is accepted: what must reach the client before any text."""

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
    """How text becomes bytes on the client's socket (the `handoff` of a `generate` op)."""

    prefix: str  # each event: prefix + JSON string of the text + suffix
    suffix: str
    join: bool  # one event per write with the texts joined, else one event per text
    chunked: bool  # HTTP/1.1 chunked framing around each write, else raw bytes
    timeout_s: float  # the daemon's send timeout
    preamble: bytes = b""  # written once, before any text: the response's head

    def frame(self, texts: list[str]) -> bytes:
        body = text_events(self.prefix, self.suffix, self.join, texts)
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(body), body)
        return body


def parse_handoff(obj: object) -> OutFormat:
    """Validate a `generate` op's `handoff` (ValueError says what is wrong)."""
    if not isinstance(obj, dict):
        raise ValueError("handoff must be an object")
    prefix, suffix, preamble = obj.get("prefix"), obj.get("suffix"), obj.get("preamble", "")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError("prefix and suffix must be strings")
    if not isinstance(preamble, str):
        raise ValueError("preamble must be a string")
    timeout = obj.get("timeout_s")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError("timeout_s must be a positive number")
    join, chunked = obj.get("join") is True, obj.get("chunked") is True
    try:
        head = preamble.encode("latin-1")  # bytes, sent as the latin-1 text of each byte
    except UnicodeEncodeError:
        raise ValueError("preamble must be latin-1 text") from None
    return OutFormat(prefix, suffix, join, chunked, float(timeout), head)


class PipeOut:
    """Text as `tokens` events on the protocol pipe (the daemon forwards them)."""

    lost: LostReason | None = None  # the daemon finds out itself

    def __init__(self, send: Send, rid: int) -> None:
        self._send = send
        self._rid = rid

    def begin(self) -> None:
        """Nothing: the daemon writes the head."""

    def write(self, texts: list[str]) -> None:
        self._send({"ev": "tokens", "id": self._rid, "texts": texts})

    def finish(self, texts: list[str], last: dict[str, Any]) -> None:
        """The last text and the ending event, in one write."""
        events = [{"ev": "tokens", "id": self._rid, "texts": texts}] if texts else []
        self._send(*events, last)


class HandoffOut:
    """Text written onto the client's socket (a copy of its fd, which this owns)."""

    def __init__(self, send: Send, fd: int, fmt: OutFormat, cancel: CancelFlag) -> None:
        self._send = send
        self._fd: int | None = fd
        self._format = fmt
        self._cancel = cancel
        self.lost: LostReason | None = None  # why the client can no longer be written to

    def begin(self) -> None:
        """Write the response's first bytes; a client lost meanwhile is recorded (and one
        cancelled before they went cannot be given an ending either)."""
        try:
            if not self._write_all(self._format.preamble):
                self.lost = "torn"
        except ClientLost:
            pass  # recorded in self.lost

    def write(self, texts: list[str]) -> None:
        if self.lost is not None:
            raise ClientLost(self.lost)
        self._write_all(self._format.frame(texts))

    def finish(self, texts: list[str], last: dict[str, Any]) -> None:
        """The last text, then the socket let go, then (on the pipe) the ending event."""
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
        """Let go of the socket (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _write_all(self, data: bytes) -> bool:
        """All of data onto the socket, waiting while the client's buffer is full; False
        when cancelled before any of it went (nothing written: the framing stays whole)."""
        fd = self._fd
        if fd is None:
            self._lose("gone")
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
            if self._cancel.cancelled:
                if len(view) < len(data):
                    self._lose("torn")
                return False
            now = time.monotonic()
            deadline = deadline or now + self._format.timeout_s
            if now >= deadline:
                self._lose("stalled")
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(WAIT_SLICE_S * 1000)
        return True

    def _lose(self, reason: LostReason) -> NoReturn:
        self.lost = reason
        raise ClientLost(reason)
