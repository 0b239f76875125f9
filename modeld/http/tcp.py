"""TCP connections as plain non-blocking sockets, like anyio's Unix socket streams.

anyio's TCP streams on asyncio sit behind a transport, which keeps its own write buffer:
the daemon could never be sure that every byte it wrote had reached the kernel, so it
could neither write straight into the socket nor let a worker write a response body onto
it (see `modeld.worker.output`). These classes accept and serve TCP connections on the
socket itself, waiting with `anyio.wait_readable`/`wait_writable`, so a TCP connection
behaves as a Unix one does: a `send` that returns has handed all its bytes to the kernel.
"""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import anyio.lowlevel

__all__ = ["TCPListener", "TCPStream"]

RECEIVE_LIMIT = 65536  # largest read anyio's own streams allow by default


class TCPStream(anyio.abc.SocketStream):
    """One accepted TCP connection (non-blocking, TCP_NODELAY)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # some systems refuse it on a connection already reset
            pass
        self._sock = sock
        self._closed = False

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    async def receive(self, max_bytes: int = RECEIVE_LIMIT) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be a positive integer")
        # A turn for the other tasks (and deadlines) even when data keeps coming.
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                self._check_open()
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise self._error() from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(item)
        while view:
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                self._check_open()
                await anyio.wait_writable(self._sock)
            except OSError as exc:
                raise self._error() from exc

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._error() from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)  # a task waiting on it gets ClosedResourceError
            self._sock.close()
        await anyio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    def _error(self) -> Exception:
        return anyio.ClosedResourceError() if self._closed else anyio.BrokenResourceError()


class TCPListener(anyio.abc.SocketListener):
    """Accepts on a listening TCP socket (which it owns), yielding `TCPStream`s."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock

    async def accept(self) -> TCPStream:
        """The next connection; OSError (EMFILE, ...) as accept() raises it."""
        await anyio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                client, _addr = self._sock.accept()
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            return TCPStream(client)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
        await anyio.lowlevel.checkpoint()
