"""The one-producer, one-consumer channel between a worker's reader and a request."""

from __future__ import annotations

import anyio
import pytest

from modeld.worker.channel import Channel

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_items_arrive_in_order_and_close_drains() -> None:
    ch: Channel[int] = Channel(8)
    for i in range(3):
        assert await ch.put(i)
    ch.close()
    assert [await ch.get() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(anyio.EndOfStream):
        await ch.get()
    assert not await ch.put(9)


async def test_a_full_channel_holds_the_producer_until_the_consumer_reads() -> None:
    ch: Channel[int] = Channel(2)
    sent: list[int] = []

    async def produce() -> None:
        for i in range(5):
            await ch.put(i)
            sent.append(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        await anyio.wait_all_tasks_blocked()
        assert sent == [0, 1]  # the third put waits
        got = [await ch.get() for _ in range(5)]
    assert got == [0, 1, 2, 3, 4] and sent == [0, 1, 2, 3, 4]


async def test_a_waiting_consumer_wakes_on_put_and_on_close() -> None:
    ch: Channel[str] = Channel(2)
    got: list[str] = []

    async def consume() -> None:
        try:
            while True:
                got.append(await ch.get())
        except anyio.EndOfStream:
            got.append("end")

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        await ch.put("a")
        await anyio.wait_all_tasks_blocked()
        ch.close()
    assert got == ["a", "end"]


async def test_closing_releases_a_blocked_producer_and_force_adds_the_last_word() -> None:
    ch: Channel[int] = Channel(1)
    await ch.put(1)
    assert not ch.put_nowait(2)
    assert ch.put_nowait(3, force=True)
    results: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _put(ch, 4, results))
        await anyio.wait_all_tasks_blocked()
        ch.close()
    assert results == [False]
    assert [await ch.get(), await ch.get()] == [1, 3]


async def _put(ch: Channel[int], item: int, results: list[bool]) -> None:
    results.append(await ch.put(item))
