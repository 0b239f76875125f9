"""A small synchronous HTTP/1.1 client for modeld, on h11 over a Unix or TCP socket.

Each request opens its own connection and asks the daemon to close it afterwards: the CLI
makes a handful of requests per run, so keep-alive would buy nothing but stale-connection
handling. Closing the connection mid-stream is how a generation is cancelled (the daemon
cancels on disconnect). Failures are raised as the typed errors below, never as raw
`OSError`s or h11 exceptions.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import h11

import modeld

CONNECT_TIMEOUT_S = 5.0  # a local daemon accepts at once; this long means it is absent or wedged
READ_TIMEOUT_S = 30.0  # control endpoints answer in milliseconds; generations use no timeout
RECV_SIZE = 65536  # bytes per read; ndjson events are far smaller
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed answer larger than this is not from modeld
USER_AGENT = f"modelctl/{modeld.__version__}"  # lets daemon logs tell CLI requests apart
UNIX_HOST = "localhost"  # Host header over the Unix socket: a loopback name, as the daemon wants
DEFAULT_HTTP_PORT = 80  # a URL without a port means port 80, as everywhere else


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a Unix socket path, or a TCP host and port."""

    socket_path: Path | None = None
    host: str = UNIX_HOST
    port: int | None = None

    @classmethod
    def unix(cls, path: str | Path) -> Endpoint:
        return cls(socket_path=Path(path))

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Parse `http://HOST[:PORT]`; raise ValueError for anything else."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"{url!r}: only http:// URLs are supported")
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host in the URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{url!r}: give only http://HOST:PORT, without a path")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r}: bad port") from exc
        return cls(host=parts.hostname, port=port if port is not None else DEFAULT_HTTP_PORT)

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None

    def describe(self) -> str:
        """Say where this is, for messages: `unix socket /path` or `http://host:port`."""
        if self.socket_path is not None:
            return f"unix socket {self.socket_path}"
        return f"http://{self._netloc()}"

    def host_header(self) -> str:
        return UNIX_HOST if self.socket_path is not None else self._netloc()

    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ClientError(Exception):
    """Base of every failure the client reports."""


class Unreachable(ClientError):
    """Nothing answers at the endpoint (no socket file, connection refused, timeout)."""

    def __init__(self, endpoint: Endpoint, reason: str) -> None:
        super().__init__(f"cannot reach modeld at {endpoint.describe()}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class ProtocolError(ClientError):
    """The daemon's answer was not what the API promises (bad HTTP, bad JSON, cut short)."""


class DaemonTimeout(ClientError):
    """The daemon accepted the connection but did not answer in time."""


class DaemonError(ClientError):
    """An error object from the daemon: a 4xx/5xx answer or an `error` event mid-stream."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # None for an error event inside a stream
        self.param = param
        self.retry_after_s = retry_after_s  # the 429 retry hint, when there is one

    @classmethod
    def from_object(cls, obj: Any, *, status: int | None = None) -> DaemonError:
        """Build from `{"error": {...}}` (or its inner object); tolerate malformed ones."""
        inner = obj.get("error", obj) if isinstance(obj, dict) else None
        if not isinstance(inner, dict):
            return cls(f"http_{status}", f"unexpected error answer: {obj!r}"[:200], status=status)
        retry_ms = inner.get("retry_after_ms")
        param = inner.get("param")
        return cls(
            str(inner.get("code") or f"http_{status}"),
            str(inner.get("message") or "(no message)"),
            status=status,
            param=param if isinstance(param, str) else None,
            retry_after_s=retry_ms / 1000 if isinstance(retry_ms, int | float) else None,
        )

    @classmethod
    def from_response(cls, status: int, headers: Mapping[str, str], body: bytes) -> DaemonError:
        """Build from a whole 4xx/5xx answer; `Retry-After` wins over `retry_after_ms`."""
        try:
            error = cls.from_object(json.loads(body), status=status)
        except ValueError:
            text = body.decode("utf-8", "replace").strip()[:200] or "(empty body)"
            error = cls(f"http_{status}", f"HTTP {status}: {text}", status=status)
        retry_after = _parse_retry_after(headers.get("retry-after"))
        if retry_after is not None:
            error.retry_after_s = retry_after
        return error


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header in its delay-seconds form; None otherwise."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class Response:
    """An answer whose body is read as it arrives; closing it closes the connection."""

    def __init__(self, sock: socket.socket, conn: h11.Connection, head: h11.Response) -> None:
        self._sock = sock
        self._conn = conn
        self.status: int = head.status_code
        self.reason = head.reason.decode("latin-1")
        self.headers: dict[str, str] = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in head.headers
        }
        self._finished = False

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; mid-stream this cancels the generation on the daemon."""
        self._finished = True
        self._sock.close()

    def iter_chunks(self) -> Iterator[bytes]:
        """Yield the body's bytes as they arrive, until the end of the message."""
        while not self._finished:
            event = _next_event(self._sock, self._conn)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._finished = True
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolError("the daemon closed the connection before the answer ended")

    def iter_lines(self) -> Iterator[bytes]:
        """Yield each non-empty line of the body, without its line ending."""
        pending = b""
        for chunk in self.iter_chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.rstrip(b"\r"):
                    yield line.rstrip(b"\r")
        if pending.strip():
            yield pending

    def read(self) -> bytes:
        """The rest of the body, whole."""
        parts: list[bytes] = []
        size = 0
        for chunk in self.iter_chunks():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ProtocolError(f"answer larger than {MAX_BODY_BYTES} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def json(self) -> Any:
        """The rest of the body, parsed as JSON."""
        body = self.read()
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"the daemon's answer is not JSON: {body[:80]!r}") from exc

    def raise_for_error(self) -> None:
        """Raise the daemon's error as a DaemonError when the status is 4xx/5xx."""
        if self.status >= 400:
            raise DaemonError.from_response(self.status, self.headers, self.read())


def _next_event(sock: socket.socket, conn: h11.Connection) -> Any:
    """The next h11 event of the answer, reading from the socket as needed."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(f"bad HTTP from the daemon: {exc}") from exc
        if event is not h11.NEED_DATA:
            return event
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError as exc:
            raise DaemonTimeout(
                "the daemon did not answer in time (it answers nothing while it loads its"
                " --preload models; see `journalctl -u modeld` or its log)"
            ) from exc
        except OSError as exc:
            raise ProtocolError(f"connection to the daemon lost: {exc.strerror or exc}") from exc
        conn.receive_data(data)


class Client:
    """Sends requests to one endpoint; every method raises ClientError subclasses only."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float | None = READ_TIMEOUT_S,
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout  # per read; None waits as long as the daemon takes

    def request(
        self,
        method: str,
        target: str,
        *,
        json_body: Any = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Response:
        """Send one request and return its answer once the status line and headers arrive."""
        body = None if json_body is None else json.dumps(json_body).encode()
        sock = self._connect()
        try:
            conn = h11.Connection(h11.CLIENT)
            _send_request(sock, conn, self._head(method, target, body, headers), body)
            while True:
                event = _next_event(sock, conn)
                if isinstance(event, h11.Response):
                    return Response(sock, conn, event)
                if isinstance(event, h11.ConnectionClosed):
                    raise ProtocolError("the daemon closed the connection without answering")
        except BaseException:
            sock.close()
            raise

    def get_json(self, target: str) -> Any:
        """GET a JSON document; raise DaemonError for an error answer."""
        with self.request("GET", target) as response:
            response.raise_for_error()
            return response.json()

    def _head(
        self, method: str, target: str, body: bytes | None, extra: Sequence[tuple[str, str]]
    ) -> h11.Request:
        headers = [
            ("Host", self.endpoint.host_header()),
            ("User-Agent", USER_AGENT),
            ("Connection", "close"),
            *extra,
        ]
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        return h11.Request(method=method, target=target, headers=headers)

    def _connect(self) -> socket.socket:
        endpoint = self.endpoint
        try:
            if endpoint.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.connect_timeout)
                    sock.connect(str(endpoint.socket_path))
                except BaseException:
                    sock.close()
                    raise
            else:
                address = (endpoint.host, endpoint.port or DEFAULT_HTTP_PORT)
                sock = socket.create_connection(address, timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise Unreachable(endpoint, "timed out connecting") from exc
        except FileNotFoundError as exc:
            raise Unreachable(endpoint, "no such socket file") from exc
        except ConnectionRefusedError as exc:
            raise Unreachable(endpoint, "connection refused (nothing listens there)") from exc
        except OSError as exc:
            raise Unreachable(endpoint, exc.strerror or str(exc)) from exc
        sock.settimeout(self.read_timeout)
        return sock


def _send_request(
    sock: socket.socket, conn: h11.Connection, head: h11.Request, body: bytes | None
) -> None:
    """Send head and body; a daemon that answers early and hangs up is read, not an error."""
    data = conn.send(head)
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    try:
        sock.sendall(data)
    except TimeoutError as exc:
        raise DaemonTimeout("the daemon did not take the request in time") from exc
    except (BrokenPipeError, ConnectionResetError):
        pass  # it may have answered already (413, 431): reading the answer tells
    except OSError as exc:
        raise ProtocolError(f"connection to the daemon lost: {exc.strerror or exc}") from exc
