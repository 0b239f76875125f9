"""The async manager: admits requests and carries out what the planner decides.

Theory of operation: every model that has been asked for gets an `Instance` with its own
FIFO queue of waiters. `acquire()` says no early when it must (`_admit`), else queues
the request and waits for its turn. Whenever anything changes (a request arrives or
leaves, a generation ends, a load or unload finishes) `_pump()` runs synchronously: it
hands the instance to the head of its queue when the instance is ready and idle, and for
models that have waiters but are not loaded it asks `planner.plan()` what to do: load,
evict these first, wait, or reject. The loads and unloads themselves, with load backoff,
idle unloads and dying workers, belong to `lifecycle.Lifecycle`: it runs them as tasks in
the manager's task group and calls `_pump()` again when they end. Nothing here blocks on
I/O. Time comes from `anyio.current_time()`, so tests run on trio's MockClock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from modeld.errors import (
    InsufficientVram,
    ModeldError,
    ModelLoadFailed,
    Overloaded,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from modeld.manager.backend import Backend, Generation
from modeld.manager.hints import RetryHints
from modeld.manager.instance import Instance, Lease, Waiter, planner_views
from modeld.manager.lifecycle import EVICTED, Lifecycle
from modeld.manager.planner import (
    Budget,
    InstanceView,
    Load,
    TooLarge,
    Wait,
    plan,
    to_drain,
    used_mb,
)
from modeld.manager.states import State
from modeld.manager.status import status_document
from modeld.manager.threads import push_threads, reshare
from modeld.registry import ModelSpec

log = logging.getLogger("modeld.manager")


@dataclass(frozen=True)
class ManagerConfig:
    budget_mb: int
    margin_mb: int = 512
    budget_source: str = "config"
    max_queue_depth: int = 32
    max_wait_ms: int = 30_000
    max_inflight: int = 0  # 0 = no global cap
    idle_unload_s: float = 0.0  # 0 = never
    pinned: frozenset[str] = frozenset()


class Manager:
    """Owns the instances; `acquire()` is the one way in for a request."""

    def __init__(self, backend: Backend, config: ManagerConfig) -> None:
        self.backend = backend
        self.config = config
        self.instances: dict[str, Instance] = {}
        self.rejected: dict[str, int] = {"queue_full": 0, "queue_timeout": 0, "overloaded": 0}
        self.cancelled = 0
        self.hints = RetryHints()
        self._held: set[str] = set()  # see _hold_for_cold
        self._pumping = False  # a _pump pass is running
        self._pump_again = False  # something changed during it: run one more
        self._lifecycle = Lifecycle(backend, self.instances, self._budget(), self._pump)

    # ---- serving ---------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; owns the load and unload tasks."""
        async with anyio.create_task_group() as tg:
            self._lifecycle.tg = tg
            task_status.started()
            if self.config.idle_unload_s > 0:
                tg.start_soon(self._lifecycle.idle_loop, self.config.idle_unload_s)
            await anyio.sleep_forever()

    async def shutdown(self) -> None:
        """Refuse new work, end everything waiting or running, unload every instance."""
        await self._lifecycle.shutdown()

    # ---- the request path ------------------------------------------------------------

    @asynccontextmanager
    async def acquire(self, spec: ModelSpec) -> AsyncIterator[Lease]:
        """Wait for a turn on `spec`'s instance (loading it if needed); yield a Lease."""
        inst = self._instance(spec)
        try:
            self._admit(inst)
        except ModeldError:
            self._forget_if_unused(inst)
            raise
        waiter = Waiter(enqueued_at=anyio.current_time())
        inst.queue.append(waiter)
        self._pump()
        try:
            await self._wait_turn(inst, waiter)
            if not waiter.granted:
                if waiter.error is not None:
                    raise waiter.error
                self.rejected["queue_timeout"] += 1
                raise QueueTimeout(
                    f"waited {self.config.max_wait_ms} ms for model {spec.id!r} without a turn",
                    retry_after_ms=self.hints.queued(
                        inst, inst.queue.index(waiter), anyio.current_time()
                    ),
                )
        except BaseException:
            self._leave_queue(inst, waiter)
            raise
        waited_ms = (anyio.current_time() - waiter.enqueued_at) * 1000
        assert inst.handle is not None  # granted means ready
        lease = Lease(
            inst, inst.handle, queue_ms=max(0.0, waited_ms - waiter.load_ms), load_ms=waiter.load_ms
        )
        started = anyio.current_time()
        try:
            yield lease
        finally:
            elapsed_ms = (anyio.current_time() - started) * 1000
            self._release(inst, elapsed_ms if lease.generated else None)

    async def _wait_turn(self, inst: Instance, waiter: Waiter) -> None:
        """Wait until granted, failed, or `max_wait_ms` spent waiting.

        Time spent loading the model itself is not waiting: a request that triggered a
        slow load is not timed out by it; waiting for a turn or for room to load is.
        """
        max_wait = self.config.max_wait_ms / 1000
        while not waiter.event.is_set():
            loaded = inst.load_done
            if inst.state is State.LOADING and loaded is not None:
                await loaded.wait()
                continue
            remaining = waiter.enqueued_at + waiter.load_ms / 1000 + max_wait - anyio.current_time()
            if remaining <= 0:
                return
            with anyio.move_on_after(remaining):
                await waiter.event.wait()

    def _admit(self, inst: Instance) -> None:
        """Say no early: shutting down, too large, overloaded, queue full, load backoff."""
        if self._lifecycle.closing:
            raise ShuttingDown("modeld is shutting down")
        need = inst.effective_mb
        budget = self._budget()
        if need > budget.usable_mb:
            raise InsufficientVram(
                f"model {inst.model_id!r} needs about {need} MB but the budget allows "
                f"{budget.usable_mb} MB ({budget.budget_mb} MB budget"
                f" - {budget.margin_mb} MB margin)",
                param="model",
            )
        cap = self.config.max_inflight
        if cap and self.inflight >= cap:
            self.rejected["overloaded"] += 1
            raise Overloaded(
                f"{self.inflight} generations running, the limit is {cap}",
                retry_after_ms=self.hints.first_free(self.instances.values(), anyio.current_time()),
            )
        idle = inst.inflight == 0 and not inst.queue  # this request would not wait behind others
        # With nothing running (the model loading or waiting for room), the head of the
        # queue is the request that runs first, not one waiting behind another.
        waiting = len(inst.queue) - (1 if inst.queue and inst.inflight == 0 else 0)
        if waiting >= self.config.max_queue_depth and not idle:
            self.rejected["queue_full"] += 1
            raise QueueFull(
                _queue_full_message(inst.model_id, waiting, self.config.max_queue_depth),
                retry_after_ms=self.hints.queued(inst, len(inst.queue), anyio.current_time()),
            )
        if inst.state is State.ERROR and anyio.current_time() < inst.retry_at:
            wait_s = inst.retry_at - anyio.current_time()
            raise ModelLoadFailed(
                f"model {inst.model_id!r} failed to load: {inst.error}; "
                f"next retry in {wait_s:.1f} s"
            )

    def _leave_queue(self, inst: Instance, waiter: Waiter) -> None:
        if waiter.granted:
            self._release(inst, None)
            return
        try:
            inst.queue.remove(waiter)
        except ValueError:
            pass
        self._forget_if_unused(inst)
        self._pump()

    def _release(self, inst: Instance, gen_ms: float | None) -> None:
        inst.inflight -= 1
        inst.last_used = anyio.current_time()
        inst.last_used_wall = time.time()
        if gen_ms is not None:
            self.hints.record(inst, gen_ms)
        self._pump()

    # ---- the scheduler ---------------------------------------------------------------

    def _pump(self) -> None:
        """Grant turns and start loads/unloads; synchronous, idempotent.

        A call made while a pass runs (a load failing at once calls back) only asks for
        one more pass, so passes never nest.
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again and not self._lifecycle.closing:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        for inst in list(self.instances.values()):
            if inst.stale and inst.state is State.READY and inst.inflight == 0:
                self._lifecycle.start_unload(inst, inst.stale)
        order = sorted(
            (i for i in self.instances.values() if i.queue),
            key=lambda i: i.queue[0].enqueued_at,
        )
        cap = self.config.max_inflight
        self._held = self._hold_for_cold(order)
        for inst in order:
            if inst.model_id in self._held:
                continue
            if inst.state is State.READY and inst.inflight == 0:
                if cap and self.inflight >= cap:
                    continue
                waiter = inst.queue.popleft()
                waiter.granted = True
                inst.inflight += 1
                inst.turn_started = anyio.current_time()
                waiter.event.set()
        for inst in order:
            if inst.queue and inst.state in (State.UNLOADED, State.ERROR):
                self._plan_load(inst)
        self._share_threads()

    def _share_threads(self) -> None:
        """Each running generation gets its share of the cores (see manager.threads)."""
        for inst in reshare(self.instances.values()):
            inst.threads_pushing = True
            self._lifecycle.spawn(push_threads, inst)

    def _hold_for_cold(self, order: list[Instance]) -> set[str]:
        """Instances an older cold request needs evicted (see planner.to_drain)."""
        held: set[str] = set()
        for cold in order:
            if cold.state in (State.UNLOADED, State.ERROR) and not cold.spec.invalid:
                since = cold.queue[0].enqueued_at
                views, budget = self._views(), self._budget()
                held.update(to_drain(views, budget, cold.model_id, cold.effective_mb, since))
        return held

    def _plan_load(self, inst: Instance) -> None:
        if inst.spec.invalid is not None:
            inst.move(State.LOADING)
            self._lifecycle.load_failed(inst, inst.spec.invalid)
            return
        if inst.state is State.ERROR and anyio.current_time() < inst.retry_at:
            inst.fail_waiters(
                ModelLoadFailed(f"model {inst.model_id!r} failed to load: {inst.error}")
            )
            return
        decision = plan(self._views(), self._budget(), inst.model_id, inst.effective_mb)
        if isinstance(decision, TooLarge):
            inst.fail_waiters(
                InsufficientVram(
                    f"model {inst.model_id!r} needs about {decision.need_mb} MB but the budget "
                    f"allows {decision.usable_mb} MB"
                    + (
                        " beside the pinned models"
                        if decision.usable_mb < self._budget().usable_mb
                        else ""
                    ),
                    param="model",
                ),
            )
        elif isinstance(decision, Load) and not decision.evict:
            self._lifecycle.start_load(inst)
        elif isinstance(decision, Load):
            for model_id in decision.evict:
                log.info("evicting %s to make room for %s", model_id, inst.model_id)
                self._lifecycle.start_unload(self.instances[model_id], EVICTED)
        else:
            assert isinstance(decision, Wait)

    # ---- views -----------------------------------------------------------------------

    def _instance(self, spec: ModelSpec) -> Instance:
        inst = self.instances.get(spec.id)
        if inst is None:
            inst = Instance(spec, pinned=spec.id in self.config.pinned)
            self.instances[spec.id] = inst
        else:
            self._follow_file(inst, spec)
        return inst

    def reconcile(self, specs: Mapping[str, ModelSpec]) -> None:
        """After a rescan: instances whose file changed or went away are unloaded.

        An idle one at once; a busy one when its running request ends (requests queued
        for it then get the new file). Unloaded ones simply use the new file next time.
        """
        for inst in list(self.instances.values()):
            self._follow_file(inst, specs.get(inst.model_id))
        self._pump()

    def _follow_file(self, inst: Instance, spec: ModelSpec | None) -> None:
        if inst.state in (State.UNLOADED, State.ERROR):  # nothing loaded: nothing stale
            inst.stale, inst.next_spec = None, None
            if spec is not None and spec != inst.spec:
                inst.spec = spec  # use what is on disk now
                inst.retry_at = 0.0
        elif spec == inst.spec:  # unchanged, or changed back to what is loaded
            inst.stale, inst.next_spec = None, None
        else:  # loading, loaded or unloading another file than the one on disk
            inst.stale = "file removed" if spec is None else "file changed"
            inst.next_spec = spec

    def _forget_if_unused(self, inst: Instance) -> None:
        """Drop an instance that was never loaded and has nobody: /status lists no ghosts."""
        unused = inst.loads == 0 and not inst.queue and not inst.inflight
        if inst.state is State.UNLOADED and unused:
            del self.instances[inst.model_id]

    def _views(self) -> list[InstanceView]:
        return planner_views(self.instances.values(), self._held)

    def _budget(self) -> Budget:
        return Budget(self.config.budget_mb, self.config.margin_mb)

    @property
    def inflight(self) -> int:
        return sum(i.inflight for i in self.instances.values())

    @property
    def used_mb(self) -> int:
        return used_mb(self._views())

    def preload(self, specs: Iterable[ModelSpec]) -> None:
        """Load these models in the background, as if a request had asked for each."""
        for spec in specs:
            self._lifecycle.spawn(self.preload_one, spec)

    async def preload_one(self, spec: ModelSpec) -> None:
        """Load `spec` as a request would, without generating."""
        try:
            async with self.acquire(spec):
                pass
        except ShuttingDown:
            log.info("preload of %s stopped: modeld is shutting down", spec.id)
        except ModeldError as exc:
            log.warning("preload of %s failed: %s", spec.id, exc.message)

    def note_cancelled(self) -> None:
        """A client went away before its request ended."""
        self.cancelled += 1

    def is_ready(self, model_id: str | None = None) -> bool:
        if model_id is not None:
            inst = self.instances.get(model_id)
            return inst is not None and inst.state is State.READY
        return any(i.state is State.READY for i in self.instances.values())

    def status(self) -> dict[str, Any]:
        """The `/status` document (see docs/api.md)."""
        return status_document(self)


__all__ = ["Generation", "Lease", "Manager", "ManagerConfig"]


def _queue_full_message(model_id: str, queued: int, depth: int) -> str:
    if depth == 0:
        return f"model {model_id!r} is busy and queueing is off (--max-queue-depth 0)"
    plural = "" if queued == 1 else "s"
    return f"{queued} request{plural} already queued for model {model_id!r} (the limit is {depth})"
