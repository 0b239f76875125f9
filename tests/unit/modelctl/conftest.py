"""Fixtures for the modelctl tests: a fake daemon per test."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.modelctl.fakes import FakeDaemon, serve


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    """A fake daemon on a temp Unix socket and on 127.0.0.1, stopped after the test."""
    daemon = FakeDaemon()
    with tempfile.TemporaryDirectory(prefix="modelctl-") as tmp:
        servers = serve(daemon, Path(tmp))
        try:
            yield daemon
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()


@pytest.fixture
def sock_args(fake: FakeDaemon) -> list[str]:
    """Global options that point the CLI at the fake daemon's socket."""
    return ["--socket", str(fake.socket_path)]
