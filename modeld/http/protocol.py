"""Sans-IO HTTP/1.1 for the server side: bytes in, requests out; responses out as bytes.

Nothing here touches a socket or a clock, so every limit and error mapping is tested by
feeding bytes and reading bytes. `modeld.http.server` is the thin shell doing the I/O.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11

from modeld.errors import (
    BadRequest,
    HeadersTooLarge,
    InvalidRequest,
    ModeldError,
    NotImplementedByServer,
    PayloadTooLarge,
    VersionNotSupported,
)

SERVER_HEADER = ("Server", "modeld")
# h11 quotes the offending bytes as a Python repr (`bytearray(b'HELLO')`); clients get
# just the quoted text, cut to QUOTED_CHARS: enough to recognise, never a whole header.
BYTES_LITERAL = r"""b('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""  # a bytes repr, either quote
BYTES_REPR = re.compile(rf"bytearray\({BYTES_LITERAL}\)|\b{BYTES_LITERAL}")
QUOTED_CHARS = 40


@dataclass(frozen=True)
class Limits:
    """Limits of the HTTP layer; every one is a CLI option."""

    max_head_bytes: int = 16 * 1024  # request line + headers; larger is abuse, not an API call
    max_body_bytes: int = 1024 * 1024  # prompts are text: 1 MiB is ~250k tokens
    head_timeout_s: float = 10.0  # a client trickling its headers is dropped (slowloris)
    body_timeout_s: float = 60.0  # a whole body must arrive within this
    keepalive_timeout_s: float = 5.0  # idle keep-alive connections are closed after this
    send_timeout_s: float = 30.0  # a client that reads nothing this long is dropped
    max_connections: int = 1024  # open connections past this get 503 and are closed


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)  # head parsed; for timings
    authority: str | None = None  # host[:port] of an absolute-form target, which wins over Host

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        """The body as JSON; a clear 400 when it is not."""
        if not self.body:
            raise InvalidRequest("the request body must be a JSON object")
        try:
            return json.loads(self.body, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise InvalidRequest("the request body is not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"the request body is not valid JSON: {exc.msg} "
                f"at line {exc.lineno} column {exc.colno}"
            ) from None
        except RecursionError:
            raise InvalidRequest("the request body is nested too deeply") from None
        except ValueError:  # an integer literal with thousands of digits
            raise InvalidRequest("the request body holds a number too large to read") from None


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"the request body is not valid JSON: {name} is not a number")


def protocol_message(exc: h11.ProtocolError) -> str:
    """h11's complaint in plain words: quoted bytes without Python's repr around them."""

    def quote(match: re.Match[str]) -> str:
        text = (match[1] or match[2])[1:-1]
        if len(text) > QUOTED_CHARS:
            text = text[:QUOTED_CHARS] + "…"
        return f"'{text}'"

    text = BYTES_REPR.sub(quote, str(exc)).replace(": '", " '")
    return text[:1].lower() + text[1:]


class NeedData:
    """More bytes are needed before a request is complete."""


class Closed:
    """The client closed the connection cleanly between requests."""


@dataclass(frozen=True)
class Failure:
    """The bytes received are not an acceptable request; answer `error` and close."""

    error: ModeldError


NEED_DATA = NeedData()
CLOSED = Closed()

Outcome = Request | NeedData | Closed | Failure


def split_target(target: str) -> tuple[str, str, str | None]:
    """(path, query, authority) of a request target: origin-form (`/models?x`, authority
    None) or the absolute-form a server must also accept (`http://host/models?x`, RFC
    9112 §3.2.2), cut by hand: no URL parser gets to raise on a malformed authority."""
    authority = None
    if target[:8].lower().startswith(("http://", "https://")):
        rest = target.partition("//")[2]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, target = rest[:cut], rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
    path, _, query = target.partition("?")
    return path, query, authority


class ServerConnection:
    """One HTTP/1.1 connection, server side, no I/O."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._h11 = self._new_h11()
        self._head: h11.Request | None = None
        self._head_at = 0.0  # when the head was parsed: timings include the upload
        self._seen: h11.Request | None = None  # that head, even one refused: for the log
        self._head_only = False  # answering HEAD: the response's head, never its body
        self._between = True  # no byte of the next request yet: blank lines are skipped
        self._body: list[bytes] = []
        self._body_size = 0
        self._answering: h11.Request | None = None  # the head of the request being answered

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)

    @property
    def request_begun(self) -> bool:
        """True once a byte of the next request (not a blank line) has arrived."""
        return not self._between

    @property
    def in_head(self) -> bool:
        """True until a request's head has been parsed."""
        return self._head is None

    def receive(self, data: bytes) -> None:
        """Feed bytes from the client; b'' means the client closed its side.

        Blank lines before a request line are skipped (RFC 9112 §2.2: a client may send a
        CRLF after a body), which h11 would refuse.
        """
        if data and self._between:
            data = data.lstrip(b"\r\n")
            if not data:
                return
            self._between = False
        self._h11.receive_data(data)

    def request_line(self) -> tuple[str | None, str | None]:
        """Method and path of the request being received, once its head has been parsed."""
        head = self._seen
        if head is None:
            return None, None
        target = head.target.decode("ascii", "replace")
        return head.method.decode("ascii", "replace"), split_target(target)[0]

    def next(self) -> Outcome:
        """Advance as far as the bytes received allow."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                return Failure(self._protocol_error(exc))
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.ConnectionClosed):
                return CLOSED
            if isinstance(event, h11.Request):
                self._seen = event
                self._head_only = event.method == b"HEAD"
                problem = self._check_head(event)
                if problem is not None:
                    return Failure(problem)
                self._head, self._head_at = event, time.monotonic()
            elif isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._body_size > self.limits.max_body_bytes:
                    return Failure(self._too_large())
                self._body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return self._complete()
            elif event is h11.PAUSED:
                return NEED_DATA

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> ModeldError:
        if exc.error_status_hint == 431:
            return HeadersTooLarge(f"request head over {self.limits.max_head_bytes} bytes")
        if exc.error_status_hint == 501:
            return NotImplementedByServer(f"unsupported request: {protocol_message(exc)}")
        return BadRequest(f"malformed request: {protocol_message(exc)}")

    def _check_head(self, head: h11.Request) -> ModeldError | None:
        # h11 bounds only an *incomplete* head; one that arrives whole in a single read
        # is parsed whatever its size, so measure it here as well.
        size = len(head.method) + len(head.target) + 12
        size += sum(len(name) + len(value) + 4 for name, value in head.headers)
        if size > self.limits.max_head_bytes:
            return HeadersTooLarge(f"request head over {self.limits.max_head_bytes} bytes")
        if not head.http_version.startswith(b"1."):  # a later 1.x is served as 1.1 (RFC 9112)
            version = head.http_version.decode("ascii", "replace")
            return VersionNotSupported(f"HTTP/{version} is not supported; modeld speaks HTTP/1.1")
        names = [name for name, _ in head.headers]
        if b"content-length" in names and b"transfer-encoding" in names:
            return BadRequest("both Content-Length and Transfer-Encoding")
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self.limits.max_body_bytes:
                return self._too_large()
        return None

    def _too_large(self) -> ModeldError:
        return PayloadTooLarge(f"request body over {self.limits.max_body_bytes} bytes")

    def _complete(self) -> Request:
        head = self._head
        assert head is not None
        target = head.target.decode("ascii", "replace")
        path, query, authority = split_target(target)
        request = Request(
            method=head.method.decode("ascii", "replace"),
            target=target,
            path=path,
            query=query,
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers),
            body=b"".join(self._body),
            received_at=self._head_at,
            authority=authority,
        )
        self._answering = head  # for `preview_response`
        self._head, self._body, self._body_size = None, [], 0
        self._seen = None
        return request

    # ---- responses -------------------------------------------------------------------

    def continue_response(self) -> bytes:
        """`100 Continue` when the client holds its body back until it gets one, else b''.

        A head whose declared body is over the limit never gets here: it is a 413 at once.
        """
        if not self._h11.they_are_waiting_for_100_continue:
            return b""
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def start_response(
        self, status: int, headers: list[tuple[str, str]], *, close: bool = False
    ) -> bytes:
        return self._h11.send(self._response(status, headers, close)) or b""

    def _response(self, status: int, headers: list[tuple[str, str]], close: bool) -> h11.Response:
        all_headers = [SERVER_HEADER, *headers]
        if close or self._h11.their_state is h11.ERROR or self._head is not None:
            all_headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=status, headers=all_headers, reason=reason)

    def preview_response(
        self, status: int, headers: list[tuple[str, str]], body: bytes = b""
    ) -> tuple[bytes, bool]:
        """What `start_response(status, headers)` and then `data(body)` will produce, and
        whether the body goes out in chunks, without starting the response: so another
        process can write them first (`Responder.prepare_hand_off`). A fresh h11 connection is
        fed the request's head again (its body does not change the answer's head)."""
        head = self._answering
        assert head is not None, "no request is being answered"
        version = head.http_version.decode("ascii")
        lines = [b"%s %s HTTP/%s" % (head.method, head.target, version.encode())]
        lines += [
            name + b": " + value
            for name, value in head.headers
            if name not in (b"content-length", b"transfer-encoding", b"expect")
        ]
        scratch = self._new_h11()
        scratch.receive_data(b"\r\n".join(lines) + b"\r\n\r\n")
        while not isinstance(scratch.next_event(), h11.EndOfMessage):
            pass
        out = scratch.send(self._response(status, headers, False)) or b""
        if body:
            out += scratch.send(h11.Data(data=body)) or b""
        return out, scratch.send(h11.Data(data=b"x")) != b"x"

    def data(self, data: bytes) -> bytes:
        if not data or self._head_only:  # HEAD: the Content-Length says what GET would send
            return b""
        return self._h11.send(h11.Data(data=data)) or b""

    def end(self) -> bytes:
        return self._h11.send(h11.EndOfMessage()) or b""

    @property
    def head_only(self) -> bool:
        """Answering HEAD: no body bytes go out."""
        return self._head_only

    def full_response(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, close: bool = False
    ) -> bytes:
        headers = [*headers, ("Content-Length", str(len(body)))]
        head = self.start_response(status, headers, close=close)
        return head + self.data(body) + self.end()

    def error_response(
        self, error: ModeldError, *, close: bool = False, body: dict[str, Any] | None = None
    ) -> bytes:
        """The error as a JSON response: modeld's shape unless `body` gives another."""
        data = json.dumps(error.to_json() if body is None else body).encode()
        headers = [("Content-Type", "application/json"), *error.headers()]
        return self.full_response(error.http_status, headers, data, close=close)

    @property
    def can_respond(self) -> bool:
        return self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    def next_cycle(self) -> bool:
        """Get ready for the next request on this connection; False when it must close."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            # A fresh h11 connection, fed what the client has already sent, rather than
            # start_next_cycle(): so blank lines before a pipelined request are skipped too.
            pending, closed = self._h11.trailing_data
            self._h11 = self._new_h11()
            self._answering = None
            self._head_only = False  # a refusal before the next head must carry its body
            self._between = True
            if pending:
                self.receive(bytes(pending))
            if closed:
                self._h11.receive_data(b"")
            return True
        return False
