"""The open-files limit and accept() failures: pure decisions, no sockets."""

from __future__ import annotations

import errno
import resource
import socket

import anyio
import pytest

from modeld import listeners
from modeld.http.server import ConnInfo
from modeld.http.tcp import TCPListener
from modeld.listeners import accept_forever, fit_connections_to_fd_limit, transient_accept_error
from modeld.service import systemd


class FakeLimits:
    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)
        self.set: list[tuple[int, int]] = []

    def getrlimit(self, _which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, _which: int, limits: tuple[int, int]) -> None:
        self.set.append(limits)
        self.limits = limits


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLimits:
    fake = FakeLimits(1024, 1024)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    return fake


def test_the_soft_limit_is_raised_to_the_hard_one(fake: FakeLimits) -> None:
    fake.limits = (1024, 524288)
    assert fit_connections_to_fd_limit(1024) == 1024
    assert fake.set == [(524288, 524288)]


def test_a_cap_above_the_limit_is_lowered_to_fit(fake: FakeLimits) -> None:
    assert fit_connections_to_fd_limit(1024) == 1024 - listeners.FD_RESERVE
    assert fake.set == []
    fake.limits = (64, 64)
    assert fit_connections_to_fd_limit(1024) == 32  # half kept for everything else
    assert fit_connections_to_fd_limit(10) == 10


def test_no_hard_limit(fake: FakeLimits) -> None:
    fake.limits = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert fit_connections_to_fd_limit(5000) == 5000


def _broken(code: int) -> anyio.BrokenResourceError:
    exc = anyio.BrokenResourceError()
    exc.__cause__ = OSError(code, "x")
    return exc


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ECONNABORTED])
def test_running_out_of_descriptors_passes(code: int) -> None:
    assert transient_accept_error(_broken(code))  # anyio's Unix listener wraps the OSError
    assert transient_accept_error(OSError(code, "x"))  # its TCP listener does not


@pytest.mark.parametrize("code", [errno.EPERM, errno.ETIMEDOUT, errno.EHOSTUNREACH])
def test_errors_of_one_client_pass_too(code: int) -> None:
    assert transient_accept_error(_broken(code))


def test_a_broken_listener_does_not_pass() -> None:
    assert not transient_accept_error(_broken(errno.EBADF))
    assert not transient_accept_error(anyio.BrokenResourceError())


class FakeListener:
    """accept() fails with each of `errors` in turn, then returns `stream`, then is closed."""

    def __init__(self, errors: list[BaseException], stream: object) -> None:
        self.errors = errors
        self.stream: object | None = stream

    async def accept(self) -> object:
        if self.errors:
            raise self.errors.pop(0)
        if self.stream is None:
            raise anyio.ClosedResourceError
        stream, self.stream = self.stream, None
        return stream


async def _accepted(listener: FakeListener, stopping: anyio.Event) -> list[object]:
    item = listeners.OpenListener(listener, ConnInfo("unix", False), "unix:test")  # type: ignore[arg-type]
    return [s async for s in accept_forever(item, stopping)]


@pytest.mark.anyio
async def test_out_of_descriptors_waits_and_accepts_again() -> None:
    # as anyio's Unix listener raises it
    emfile: list[BaseException] = [_broken(errno.EMFILE) for _ in range(3)]
    assert await _accepted(FakeListener(emfile, "conn"), anyio.Event()) == ["conn"]


@pytest.mark.anyio
async def test_a_broken_listener_or_shutdown_ends_the_loop() -> None:
    assert await _accepted(FakeListener([_broken(errno.EBADF)], "conn"), anyio.Event()) == []
    stopping = anyio.Event()
    stopping.set()
    assert await _accepted(FakeListener([_broken(errno.EMFILE)], "conn"), stopping) == []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- sockets passed by systemd -------------------------------------------------------------


def inherited(sock: socket.socket) -> systemd.InheritedSocket:
    return systemd.InheritedSocket(sock, "modeld.socket", sock.family)


@pytest.mark.anyio
async def test_a_listening_tcp_socket_from_systemd_is_served_on_the_plain_socket() -> None:
    sock = socket.socket(socket.AF_INET6)
    sock.bind(("::1", 0))
    sock.listen()
    item = await listeners._adopt(inherited(sock))
    try:
        assert isinstance(item.listener, TCPListener)
        assert item.info == ConnInfo("tcp", True)
        assert item.label == f"tcp:[::1]:{sock.getsockname()[1]} (systemd)"
    finally:
        await item.listener.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["datagram", "not listening"])
async def test_a_tcp_socket_from_systemd_that_cannot_accept_stops_the_start(kind: str) -> None:
    sock = socket.socket(type=socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_STREAM)
    with sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(listeners.StartupError, match="ListenStream"):
            await listeners._adopt(inherited(sock))
