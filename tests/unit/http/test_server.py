"""The anyio shell: one connection's failure stays that connection's."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from modeld.http.protocol import Limits, Request
from modeld.http.server import ConnectionSlots, ConnInfo, Responder, serve_connection


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_handler_bug_closes_its_connection_and_nothing_else(tmp_path: Path) -> None:
    async def buggy(request: Request, res: Responder, info: ConnInfo) -> None:
        raise RuntimeError("a bug")

    slots = ConnectionSlots(8)
    listener = await anyio.create_unix_listener(tmp_path / "s.sock")
    async with listener, anyio.create_task_group() as tg:

        async def serve_one() -> None:
            stream = await listener.accept()
            await serve_connection(stream, buggy, Limits(), ConnInfo("unix", False), slots)

        tg.start_soon(serve_one)
        client = await anyio.connect_unix(tmp_path / "s.sock")
        await client.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        with anyio.fail_after(5):
            try:
                data = await client.receive()
            except anyio.EndOfStream:
                data = b""
        assert data == b""  # closed without an answer; serve_one returned, so tg exits
        await client.aclose()
    assert slots.open == 0
