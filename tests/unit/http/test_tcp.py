"""TCP connections on plain sockets: the stream semantics the server relies on."""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import pytest

from modeld.http.tcp import TCPListener, TCPStream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def connected() -> tuple[TCPStream, socket.socket, TCPListener]:
    """(our stream, the peer's blocking socket, the listener)."""
    listener = TCPListener(listening())
    host, port = listener.extra(anyio.abc.SocketAttribute.raw_socket).getsockname()
    peer = socket.create_connection((host, port))
    stream = await listener.accept()
    return stream, peer, listener


async def test_bytes_both_ways_and_the_end_of_the_stream() -> None:
    stream, peer, listener = await connected()
    async with listener, stream:
        assert stream.extra(anyio.abc.SocketAttribute.raw_socket).getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY
        )
        peer.sendall(b"ping")
        assert await stream.receive() == b"ping"
        await stream.send(b"pong")
        assert peer.recv(10) == b"pong"
        await stream.send_eof()
        assert peer.recv(10) == b""  # the peer sees our half-close
        peer.close()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()


async def test_a_send_waits_while_the_peer_does_not_read() -> None:
    stream, peer, listener = await connected()
    big = b"x" * 8_000_000  # far more than the two sockets buffer
    got = bytearray()

    def drain() -> None:
        while len(got) < len(big):
            got.extend(peer.recv(1 << 20))

    async with listener, stream, anyio.create_task_group() as tg:
        tg.start_soon(stream.send, big)
        await anyio.sleep(0.1)  # the send is blocked on a full buffer now
        await anyio.to_thread.run_sync(drain)
    assert bytes(got) == big
    peer.close()


async def test_a_reset_is_a_broken_stream_and_a_closed_one_says_so() -> None:
    stream, peer, listener = await connected()
    async with listener:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # RST
        await anyio.sleep(0.05)
        with pytest.raises(anyio.BrokenResourceError):
            await stream.receive()
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"late")


async def test_closing_wakes_a_task_waiting_on_it() -> None:
    stream, peer, listener = await connected()
    caught: list[BaseException] = []

    async def reader() -> None:
        try:
            await stream.receive()
        except anyio.ClosedResourceError as exc:
            caught.append(exc)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        await stream.aclose()
    assert caught
    peer.close()


async def test_a_closed_listener_stops_a_waiting_accept() -> None:
    listener = TCPListener(listening())
    caught: list[BaseException] = []

    async def accept() -> None:
        try:
            await listener.accept()
        except anyio.ClosedResourceError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(accept)
        await anyio.wait_all_tasks_blocked()
        await listener.aclose()
    assert caught
