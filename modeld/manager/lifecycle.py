"""The instance lifecycle: loading, unloading, backoff, idle unloads, worker exits.

Theory of operation: the manager decides when an instance loads or is evicted; this
module carries it out, and on its own unloads instances idle past `--idle-unload-s` and
those whose worker died. `start_load()` and `start_unload()` change the state at once
(so the next plan sees it) and run the slow part as a task in the manager's task group;
each such task ends by calling `changed()` (the manager's `_pump`), so waiters get their
turn or the next decision is made. A failed load puts the instance in ERROR with a retry
time that doubles per failure. `closing` is the one shutdown flag: the manager admits
nothing once it is set, and a load that finishes after it is unloaded at once.
Time comes from `anyio.current_time()`, so tests run on trio's MockClock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from modeld.errors import ModeldError, ModelLoadFailed, ModelUnloaded, ShuttingDown
from modeld.manager.backend import Backend, LoadedModel
from modeld.manager.instance import Instance, planner_views
from modeld.manager.planner import Budget, used_mb
from modeld.manager.states import State

log = logging.getLogger("modeld.manager")

BACKOFF_BASE_S = 1.0  # first retry of a failed load after this long ...
BACKOFF_MAX_S = 60.0  # ... doubling per failure up to this
IDLE_CHECK_S = 1.0  # how often idle instances are looked at for --idle-unload-s
EVICTED = "evicted"  # the unload reason of an eviction (logged as event "evict")


class Lifecycle:
    """Loads and unloads the manager's instances; calls `changed()` when one settles."""

    def __init__(
        self,
        backend: Backend,
        instances: dict[str, Instance],
        budget: Budget,
        changed: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.instances = instances  # the manager's own dict, shared
        self.budget = budget
        self.changed = changed
        self.tg: anyio.abc.TaskGroup | None = None  # set by Manager.run()
        self.closing = False

    def spawn(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` as a task of `Manager.run()`."""
        assert self.tg is not None, "Manager.run() is not running"
        self.tg.start_soon(fn, *args)

    async def shutdown(self) -> None:
        """Refuse new work, end everything waiting or running, unload every instance."""
        self.closing = True
        for inst in self.instances.values():
            inst.fail_waiters(ShuttingDown("modeld is shutting down"))
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for inst in self.instances.values():
                    if inst.state is State.READY:
                        tg.start_soon(self._unload, inst, "shutdown")

    # ---- loading ---------------------------------------------------------------------

    def start_load(self, inst: Instance) -> None:
        """LOADING now; the load itself runs as a task."""
        inst.move(State.LOADING)
        inst.load_done = anyio.Event()
        self.spawn(self._load, inst)

    async def _load(self, inst: Instance) -> None:
        try:
            await self._do_load(inst)
        finally:
            if inst.load_done is not None:
                inst.load_done.set()
                inst.load_done = None

    async def _do_load(self, inst: Instance) -> None:
        started = anyio.current_time()
        try:
            handle = await self.backend.load(
                str(inst.spec.path), inst.model_id, lambda reason: self._on_exit(inst, reason)
            )
        except ModeldError as exc:
            self.load_failed(inst, exc.message)
            return
        except Exception as exc:  # a bug in a backend must not kill the manager
            log.exception("load of %s failed unexpectedly", inst.model_id)
            self.load_failed(inst, f"internal error: {type(exc).__name__}")
            return
        self._loaded(inst, handle, (anyio.current_time() - started) * 1000)

    def _loaded(self, inst: Instance, handle: LoadedModel, load_ms: float) -> None:
        """Make `inst` ready; the requests queued meanwhile waited for (part of) the load."""
        inst.handle = handle
        inst.threads = handle.info.threads or None
        inst.vram_mb = handle.info.vram_mb
        inst.loads += 1
        inst.failures = 0
        inst.error = None
        inst.last_used = anyio.current_time()
        inst.move(State.READY)
        now = anyio.current_time()
        for waiter in inst.queue:  # a request that came mid-load waited only part of it
            waiter.load_ms += min(load_ms, (now - waiter.enqueued_at) * 1000)
        self._log_loaded(inst, load_ms)
        if self.closing:
            self.spawn(self._unload, inst, "shutdown")
        self.changed()

    def _log_loaded(self, inst: Instance, load_ms: float) -> None:
        used = self._used_mb()
        log.info(
            "loaded %s in %.0f ms: %d MB (estimate %d MB), %d MB in use of %d MB usable",
            inst.model_id,
            load_ms,
            inst.vram_mb,
            inst.spec.est_vram_mb,
            used,
            self.budget.usable_mb,
            extra={
                "fields": {
                    "event": "load",
                    "model": inst.model_id,
                    "load_ms": round(load_ms, 1),
                    "vram_mb": inst.vram_mb,
                    "est_vram_mb": inst.spec.est_vram_mb,
                    "used_mb": used,
                }
            },
        )

    def load_failed(self, inst: Instance, reason: str) -> None:
        """ERROR with a doubling retry time; the queued requests fail with `reason`."""
        inst.failures += 1
        inst.error = reason
        if inst.stale is not None:  # the file changed during the load: next time, the new one
            inst.spec = inst.next_spec or inst.spec
            inst.stale, inst.next_spec = None, None
        backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (inst.failures - 1))
        inst.retry_at = anyio.current_time() + backoff
        inst.move(State.ERROR)
        log.warning(
            "load of %s failed: %s (retry allowed in %.0f s)",
            inst.model_id,
            reason,
            backoff,
            extra={"fields": {"event": "load_failed", "model": inst.model_id}},
        )
        inst.fail_waiters(ModelLoadFailed(f"model {inst.model_id!r} failed to load: {reason}"))
        self.changed()

    # ---- unloading -------------------------------------------------------------------

    def start_unload(self, inst: Instance, reason: str) -> None:
        """UNLOADING now; closing the worker runs as a task."""
        inst.move(State.UNLOADING)
        self.spawn(self._unload, inst, reason, True)

    async def _unload(self, inst: Instance, reason: str, moved: bool = False) -> None:
        if not moved:
            inst.move(State.UNLOADING)
        handle, inst.handle = inst.handle, None
        error: ModeldError = (
            ShuttingDown("modeld is shutting down")
            if reason == "shutdown"
            else ModelUnloaded(f"model {inst.model_id!r} was unloaded ({reason})")
        )
        freed = inst.effective_mb
        try:
            if handle is not None:
                with anyio.CancelScope(shield=True):
                    await handle.close(error)
        except Exception:  # a bug in a backend must not kill the manager
            log.exception("unload of %s failed unexpectedly", inst.model_id)
        finally:
            inst.vram_mb = None
            inst.threads = None
            inst.move(State.UNLOADED)
            if inst.stale is not None:
                inst.spec = inst.next_spec or inst.spec
                inst.stale, inst.next_spec = None, None
            log.info(
                "%s %s (%s): %d MB freed",
                "evicted" if reason == EVICTED else "unloaded",
                inst.model_id,
                reason,
                freed,
                extra={
                    "fields": {
                        "event": "evict" if reason == EVICTED else "unload",
                        "model": inst.model_id,
                        "reason": reason,
                        "vram_mb": freed,
                        "used_mb": self._used_mb(),
                    }
                },
            )
            self.changed()

    def _on_exit(self, inst: Instance, reason: str) -> None:
        """A worker died on its own: unload the instance so the next request reloads."""
        if inst.state is State.READY:
            inst.error = reason
            self.start_unload(inst, reason)

    async def idle_loop(self, idle_unload_s: float) -> None:
        """Unload ready, unpinned instances nobody has used for `idle_unload_s`."""
        while True:
            await anyio.sleep(IDLE_CHECK_S)
            now = anyio.current_time()
            for inst in list(self.instances.values()):
                if (
                    inst.state is State.READY
                    and not inst.pinned
                    and inst.inflight == 0
                    and not inst.queue
                    and now - inst.last_used >= idle_unload_s
                ):
                    self.start_unload(inst, "idle")

    def _used_mb(self) -> int:
        return used_mb(planner_views(self.instances.values()))
