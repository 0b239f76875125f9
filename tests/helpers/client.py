"""A plain http.client-based client for tests, over a Unix socket or TCP.

Deliberately independent of modeld's own HTTP code, so tests check the wire format.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[dict[str, Any]]:
        """ndjson body as a list of objects."""
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]


class Client:
    """Talks to one daemon over `via` = 'unix' or 'tcp'."""

    def __init__(
        self, socket_path: str, port: int, via: str = "unix", timeout: float = 60.0
    ) -> None:
        self.socket_path = socket_path
        self.port = port
        self.via = via
        self.timeout = timeout

    def connection(self) -> http.client.HTTPConnection:
        if self.via == "unix":
            return UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Response:
        conn = self.connection()
        try:
            data = (
                raw
                if raw is not None
                else (json.dumps(body).encode() if body is not None else None)
            )
            hdrs = dict(headers or {})
            if data is not None:
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def infer(self, **body: Any) -> Response:
        return self.request("POST", "/infer", body)

    def stream(
        self, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield ndjson events as they arrive; closing the generator drops the connection."""
        conn = self.connection()
        try:
            conn.request(
                "POST",
                "/infer",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", **(headers or {})},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise AssertionError(f"status {resp.status}: {resp.read()!r}")
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
