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


async def serve_one_request(tmp_path: Path, raw: bytes, handoff: bool) -> list[object]:
    """Serve `raw` on a Unix socket with a handler that records what `prepare_hand_off`
    gives: (a head, chunked?) or None."""
    seen: list[object] = []
    answered = anyio.Event()

    async def handler(request: Request, res: Responder, info: ConnInfo) -> None:
        seen.append(res.can_hand_off)
        got = res.prepare_hand_off(200, [("Content-Type", "text/plain")])
        seen.append(got if got is None else (got[1].startswith(b"HTTP/1.1 200 "), got[2]))
        await res.start(200, [("Content-Type", "text/plain")])
        seen.append(res.prepare_hand_off(200, []))  # once started: never
        await res.end()
        answered.set()

    listener = await anyio.create_unix_listener(tmp_path / "h.sock")
    async with listener, anyio.create_task_group() as tg:

        async def serve() -> None:
            stream = await listener.accept()
            limits, info, slots = Limits(), ConnInfo("unix", False), ConnectionSlots(8)
            await serve_connection(stream, handler, limits, info, slots, handoff=handoff)

        tg.start_soon(serve)
        client = await anyio.connect_unix(tmp_path / "h.sock")
        await client.send(raw)
        with anyio.fail_after(5):
            await answered.wait()
        await client.aclose()
    return seen


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "handoff", "want"),
    [
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            True,
            [True, (True, True), None],
        ),
        (b"POST /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n", True, [True, (True, False), None]),
        (b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n", True, [False, None, None]),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", False, [False, None, None]),
    ],
    ids=["http-1.1-chunked", "http-1.0-raw", "head-has-no-body", "turned-off"],
)
async def test_when_a_response_body_may_be_handed_off(
    tmp_path: Path, raw: bytes, handoff: bool, want: list[object]
) -> None:
    assert await serve_one_request(tmp_path, raw, handoff) == want
