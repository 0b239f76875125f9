"""A scripted fake backend for manager tests: sizes, a gate to hold loads, failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from modeld.errors import ModeldError, ModelLoadFailed
from modeld.manager.backend import (
    ExitCallback,
    Finished,
    GenEvent,
    GenParams,
    Handoff,
    LoadedInfo,
    Started,
    Tokens,
)
from modeld.registry import ModelSpec


def spec(model_id: str, mb: int = 100) -> ModelSpec:
    return ModelSpec(model_id, Path("/models") / model_id, mb * 1024 * 1024, mb)


class FakeGeneration:
    def __init__(self, backend: FakeBackend, n_tokens: int) -> None:
        self.backend = backend
        self.n_tokens = n_tokens
        self.sent = 0
        self.started = False
        self.ending: Finished | None = None

    @property
    def ended(self) -> bool:
        return self.ending is not None

    async def next(self) -> GenEvent:
        if not self.started:
            self.started = True
            return Started(3)
        if self.sent < self.n_tokens:
            await anyio.sleep(self.backend.token_delay_s)
            self.sent += 1
            return Tokens((f"t{self.sent}",))
        self.ending = Finished("length", 3, self.sent)
        return self.ending


class FakeModel:
    def __init__(self, backend: FakeBackend, model_id: str, on_exit: ExitCallback) -> None:
        self.backend = backend
        self.model_id = model_id
        self.on_exit = on_exit
        self.info = LoadedInfo(
            vram_mb=backend.sizes.get(model_id, 100), n_ctx=2048, threads=backend.threads
        )

    @asynccontextmanager
    async def generate(
        self, params: GenParams, *, handoff: Handoff | None = None
    ) -> AsyncIterator[FakeGeneration]:
        gen = FakeGeneration(self.backend, params.max_tokens)
        self.backend.generations.append(self.model_id)
        try:
            yield gen
        finally:
            if not gen.ended:
                self.backend.cancelled.append(self.model_id)

    async def set_threads(self, n: int) -> None:
        self.backend.threads_set.append((self.model_id, n))

    async def close(self, error: ModeldError) -> None:
        self.backend.closed.append(self.model_id)
        await anyio.sleep(self.backend.unload_s)
        if self.backend.close_raises:
            raise RuntimeError("close blew up")


class FakeBackend:
    """Loads take `load_s` (or wait on `gate`); `fail_next` loads fail; sizes in MB."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes = dict(sizes or {})
        self.loads: list[str] = []
        self.closed: list[str] = []
        self.cancelled: list[str] = []
        self.generations: list[str] = []
        self.gate: anyio.Event | None = None
        self.fail_next = 0
        self.close_raises = False  # a buggy backend: close() raises after closing
        self.load_s = 0.5
        self.unload_s = 0.1
        self.token_delay_s = 0.01
        self.threads = 0  # threads a loaded model says it uses alone (0: unknown)
        self.threads_set: list[tuple[str, int]] = []  # set_threads calls, in order

    async def load(self, spec_path: str, model_id: str, on_exit: ExitCallback) -> FakeModel:
        self.loads.append(model_id)
        if self.gate is not None:
            await self.gate.wait()
        await anyio.sleep(self.load_s)
        if self.fail_next:
            self.fail_next -= 1
            raise ModelLoadFailed("bad magic")
        return FakeModel(self, model_id, on_exit)

    async def aclose(self) -> None:
        return None
