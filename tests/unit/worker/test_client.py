"""The daemon's side of a worker: how its messages become a generation's events."""

from __future__ import annotations

from typing import Any, cast

import anyio.abc
import pytest

from modeld.errors import GenerationFailed, ModelUnloaded
from modeld.manager.backend import Failed, Finished, Started
from modeld.worker.client import WorkerProcess

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeProc:
    pid = 4242


def worker() -> WorkerProcess:
    """A WorkerProcess with no process behind it: only its message routing is used."""
    return WorkerProcess(cast(anyio.abc.Process, FakeProc()), cast(Any, None))


@pytest.mark.parametrize(
    ("closing", "error"),
    [(ModelUnloaded("model x was unloaded"), ModelUnloaded), (None, GenerationFailed)],
    ids=["unloaded", "no-unload"],
)
async def test_a_handed_off_generation_stopped_before_it_began_says_why(
    closing: ModelUnloaded | None, error: type[Exception]
) -> None:
    """The worker wrote nothing (no head): an unload's request gets the unload's error."""
    w = worker()
    stream = w.open_stream(1, handed_off=True)
    w._closing_error = closing
    await w._dispatch([b'{"ev":"error","id":1,"code":"cancelled","message":"stopped"}'])
    event = await stream.get()
    assert isinstance(event, Failed) and isinstance(event.error, error)


async def test_the_end_of_a_handed_off_stream_carries_the_workers_figures() -> None:
    w = worker()
    stream = w.open_stream(2, handed_off=True)
    lines = [
        b'{"ev":"start","id":2,"prompt_tokens":5}',
        b'{"ev":"done","id":2,"finish_reason":"cancelled","prompt_tokens":5,'
        b'"completion_tokens":9,"gen_ms":80.0,"lost":"torn","first_at":12.5}',
    ]
    await w._dispatch(lines)
    assert await stream.get() == Started(5)
    assert await stream.get() == Finished("cancelled", 5, 9, 80.0, lost="torn", first_at=12.5)


async def test_an_unknown_loss_is_not_taken_for_one() -> None:
    w = worker()
    stream = w.open_stream(3, handed_off=True)
    line = (
        b'{"ev":"done","id":3,"finish_reason":"stop","prompt_tokens":1,'
        b'"completion_tokens":1,"lost":"sideways"}'
    )
    await w._dispatch([line])
    event = await stream.get()
    assert isinstance(event, Finished) and event.lost is None
