"""The open-files limit and accept() failures: pure decisions, no sockets."""

from __future__ import annotations

import errno
import resource

import anyio
import pytest

from modeld import listeners
from modeld.listeners import fit_connections_to_fd_limit, transient_accept_error


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


def test_a_broken_listener_does_not_pass() -> None:
    assert not transient_accept_error(_broken(errno.EBADF))
    assert not transient_accept_error(anyio.BrokenResourceError())
