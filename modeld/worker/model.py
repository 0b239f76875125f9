"""A model loaded in a worker process: the `LoadedModel` the manager sees.

Each generation gets an id and a channel of the worker's events (`WorkerProcess` routes
them); leaving `generate` before the end cancels it, and the worker must confirm, or it
is killed. A handed-off generation writes its text onto the client's socket itself
(`modeld.worker.output`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from modeld.errors import ModeldError, WorkerCrashed
from modeld.manager.backend import (
    Failed,
    Finished,
    GenEvent,
    GenParams,
    Handoff,
    LoadedInfo,
)
from modeld.worker.client import WorkerProcess

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 5.0  # a cancelled generation must end within this, or the worker is killed


class WorkerGeneration:
    """Events of one generation on a worker."""

    def __init__(self, worker: WorkerProcess, rid: int, handed_off: bool) -> None:
        self._channel = worker.open_stream(rid, handed_off=handed_off)
        self.ending: Finished | Failed | None = None

    @property
    def ended(self) -> bool:
        return self.ending is not None

    async def next(self) -> GenEvent:
        try:
            event = await self._channel.get()
        except anyio.EndOfStream:
            event = Failed(WorkerCrashed("worker ended the stream without finishing"))
        if isinstance(event, Finished | Failed):
            self.ending = event
        return event


class WorkerModel:
    """A model loaded in a worker: the LoadedModel the manager sees."""

    def __init__(self, worker: WorkerProcess, info: LoadedInfo) -> None:
        self.worker = worker
        self.info = info
        self._ids = itertools.count(1)

    @asynccontextmanager
    async def generate(
        self, params: GenParams, *, handoff: Handoff | None = None
    ) -> AsyncIterator[WorkerGeneration]:
        rid = next(self._ids)
        gen = WorkerGeneration(self.worker, rid, handoff is not None)
        try:
            await self._send_generate(rid, params, handoff)
            yield gen
        finally:
            if not gen.ended:
                await self._cancel(rid, gen)
            self.worker.close_stream(rid)

    async def _send_generate(self, rid: int, params: GenParams, handoff: Handoff | None) -> None:
        message = {
            "op": "generate",
            "id": rid,
            "prompt": params.prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
            "stop": list(params.stop),
            **({} if params.messages is None else {"messages": list(params.messages)}),
        }
        if handoff is None:
            await self.worker.send_quietly(message)
            return
        fields = dataclasses.asdict(handoff)
        fd = fields.pop("fd")
        fields["preamble"] = handoff.preamble.decode("latin-1")  # JSON has no bytes
        await self.worker.send_quietly({**message, "handoff": fields}, fd)

    async def _cancel(self, rid: int, gen: WorkerGeneration) -> None:
        """Stop a generation nobody reads any more; the worker must confirm it."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CANCEL_GRACE_S):
                if not await self.worker.send_quietly({"op": "cancel", "id": rid}):
                    return
                while not gen.ended:
                    await gen.next()
                return
            log.warning("worker %d ignored a cancel; killing it", self.worker.pid)
            await self.worker.kill()

    async def set_threads(self, n: int) -> None:
        await self.worker.send_quietly({"op": "threads", "n": n})

    async def close(self, error: ModeldError) -> None:
        await self.worker.close(error)
