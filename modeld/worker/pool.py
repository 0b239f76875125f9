"""The real Backend: each model in its own worker process, one spare kept warm."""

from __future__ import annotations

import logging
from types import TracebackType

import anyio
import anyio.abc

from modeld.errors import ModeldError, ModelLoadFailed
from modeld.manager.backend import ExitCallback, LoadedInfo
from modeld.vram import process_vram_mb
from modeld.worker.client import WorkerProcess, WorkerSettings
from modeld.worker.model import WorkerModel

log = logging.getLogger(__name__)

# After a load the spare is replaced only this much later. Starting a worker costs about
# 0.3 s of CPU (an interpreter and `import llama_cpp`); done at once, it competed with
# the load and the first request's prompt on a 2-core machine and made the cold first
# token ~100 ms slower (measured: 220-250 ms at once, 140-150 ms with the delay).
SPARE_REFILL_DELAY_S = 1.0


class ProcessBackend:
    """Loads each model into its own worker process; keeps one spare worker warm.

    The spare has already paid for the interpreter and `import llama_cpp`, so a cold
    request only pays for the model load itself. A load that finds no spare starts a
    worker of its own; the spare is replaced `refill_delay_s` after a load ends.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        spare: bool = True,
        refill_delay_s: float = SPARE_REFILL_DELAY_S,
    ) -> None:
        self.settings = settings
        self._want_spare = spare
        self._refill_delay_s = refill_delay_s
        self._spare: WorkerProcess | None = None
        self._workers: set[WorkerProcess] = set()  # every worker started, until it exits
        self._spare_lock = anyio.Lock()
        self._closing = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> ProcessBackend:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self._want_spare:
            self._tg.start_soon(self._refill_spare)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        assert self._tg is not None
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Stop the spare and any worker still alive, so the backend can always exit."""
        self._want_spare = False
        self._closing.set()
        spare, self._spare = self._spare, None
        if spare is not None:
            await spare.close(ModelLoadFailed("shutting down"))
        for worker in list(self._workers):
            if worker.alive:
                await worker.close(ModelLoadFailed("shutting down"))

    async def _spawn(self) -> WorkerProcess:
        assert self._tg is not None
        worker = await WorkerProcess.spawn(self._tg)
        self._workers.add(worker)
        self._tg.start_soon(self._forget_when_gone, worker)
        return worker

    async def _forget_when_gone(self, worker: WorkerProcess) -> None:
        await worker.exited.wait()
        self._workers.discard(worker)

    async def _refill_spare(self, delay_s: float = 0.0) -> None:
        with anyio.move_on_after(delay_s):
            await self._closing.wait()  # shutdown does not wait out the delay
        async with self._spare_lock:
            if (self._spare is not None and self._spare.alive) or not self._want_spare:
                return
            assert self._tg is not None
            try:
                spare = await self._spawn()
            except ModeldError as exc:
                log.warning("could not start a spare worker: %s", exc.message)
                return
            if not self._want_spare:
                await spare.close(ModelLoadFailed("shutting down"))
                return
            self._spare = spare

    async def _take_worker(self) -> WorkerProcess:
        assert self._tg is not None
        if self._spare is None and self._spare_lock.locked():
            async with self._spare_lock:
                pass  # a spare is starting: wait for it rather than start a second worker
        spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            return spare
        return await self._spawn()

    async def load(self, spec_path: str, model_id: str, on_exit: ExitCallback) -> WorkerModel:
        worker = await self._take_worker()
        try:
            msg = await worker.load(spec_path, self.settings)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await worker.kill()
            raise
        finally:
            if self._want_spare and self._tg is not None:
                self._tg.start_soon(self._refill_spare, self._refill_delay_s)
        vram = None
        if self.settings.gpu:
            vram = process_vram_mb(worker.pid)
        if vram is None:
            vram = round(float(msg.get("mem_mb", 0.0)))
        info = LoadedInfo(
            vram_mb=vram,
            n_ctx=int(msg.get("n_ctx", self.settings.n_ctx)),
            n_ctx_train=int(msg.get("n_ctx_train", 0)),
            load_ms=float(msg.get("load_ms", 0.0)) + float(msg.get("warmup_ms", 0.0)),
            chat_template=msg.get("chat_template"),
            threads=int(msg.get("threads", 0)),
            extra={k: msg[k] for k in ("model_bytes", "ctx_bytes", "bos", "eos") if k in msg},
        )
        worker.on_exit = on_exit
        log.debug("worker %d loaded %s", worker.pid, model_id)
        return WorkerModel(worker, info)
