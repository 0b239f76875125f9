"""The daemon: listeners, manager and backend wired together, plus signals and systemd.

Theory of operation: `run()` checks the models dir (one that cannot be listed stops the
start), scans it, reports models named by options that it lacks, opens (or inherits from
systemd) the listeners, starts the backend and the manager, accepts connections into a
task group of their own, and tells systemd it is ready once preloads are done. A start
that fails half-way closes what it opened and removes its socket file. On SIGTERM/SIGINT it
stops accepting, lets running requests finish for `--shutdown-grace-s`, then ends what is
left with a `shutting_down` event, stops every worker and returns 0. A second signal
exits at once. SIGHUP rescans the models dir. Opening, adopting and closing the listeners
(and their socket file) is `modeld.listeners`'s job.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import anyio.streams.stapled

from modeld.api.app import App, AppState, error_body
from modeld.api.infer import describe_available
from modeld.api.openai import install as install_openai
from modeld.config import Config
from modeld.gguf.estimate import estimate_vram_mb
from modeld.gguf.info import ModelInfo
from modeld.http.server import ConnectionSlots, serve_connection
from modeld.listeners import (
    OpenListener,
    StartupError,
    accept_forever,
    close_listeners,
    fit_connections_to_fd_limit,
    open_listeners,
    warn_if_exposed,
)
from modeld.manager.manager import Manager, ManagerConfig
from modeld.registry import GGUF_SUFFIX, Estimator, ModelSpec, Registry, size_only_estimate
from modeld.service import systemd
from modeld.vram import detect_budget
from modeld.worker.client import WorkerSettings
from modeld.worker.pool import ProcessBackend

__all__ = ["Daemon", "StartupError"]  # StartupError lives in listeners; the CLI catches it here

log = logging.getLogger("modeld")

DRAIN_POLL_S = 0.05  # how often shutdown checks whether running requests have finished
FLUSH_AFTER_SHUTDOWN_S = 1.0  # time connections get to write their final events
STATUS_EVERY_S = 5.0  # how often systemd's STATUS= line is refreshed
EXTEND_START_S = 30.0  # while preloading, systemd's start timeout is pushed this far ahead


# What a model named on the command line but missing from the models dir means, per option.
MISSING_CONSEQUENCE = {
    "--default-model": "; requests without 'model' get 404 and /readyz answers 503 until it "
    "appears and is loaded",
    "--preload": "; not preloaded (it loads on first use once it appears)",
    "--pin": "; pinned once it appears",
}


def _check_models_dir(path: Path) -> None:
    """Refuse to start on a models dir that cannot be listed: a typo must not look like
    an empty directory."""
    try:
        if not path.is_dir():
            if path.exists():
                raise StartupError(f"models dir {path} is not a directory")
            raise StartupError(
                f"models dir {path} does not exist; create it or give another --models-dir"
            )
        os.listdir(path)
    except OSError as exc:
        raise StartupError(f"cannot read models dir {path}: {exc.strerror}") from None


def _estimator(cfg: Config, gpu: bool) -> Estimator:
    """The registry's estimate: the GGUF formula at this daemon's settings."""

    def estimate(info: ModelInfo | None, size_bytes: int) -> int:
        if info is None:
            return size_only_estimate(info, size_bytes)
        return estimate_vram_mb(
            info,
            n_ctx=cfg.n_ctx,
            n_gpu_layers=cfg.n_gpu_layers,
            flash_attn=cfg.flash_attn != "off",
            gpu=gpu,
        )

    return estimate


class Daemon:
    """One running modeld."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        budget = detect_budget(cfg.vram_budget_mb)
        self.budget = budget
        self.registry = Registry(
            cfg.models_dir,
            estimator=_estimator(cfg, budget.gpu),
            follow_symlinks=cfg.follow_symlinks,
        )
        self.slots = ConnectionSlots(fit_connections_to_fd_limit(cfg.limits.max_connections))
        self.stopping = anyio.Event()

    async def run(self) -> int:
        cfg = self.cfg
        _check_models_dir(self.registry.models_dir)
        specs = self.registry.scan()
        log.info(
            "models dir %s: %d models; budget %d MB (%s), margin %d MB",
            self.registry.models_dir,
            len(specs),
            self.budget.budget_mb,
            self.budget.source,
            cfg.vram_margin_mb,
        )
        self._check_named_models()
        listeners = await open_listeners(cfg)
        try:
            warn_if_exposed(cfg, listeners)
            await self._run(listeners)
        finally:
            await close_listeners(listeners)
        log.info("modeld stopped")
        return 0

    async def _run(self, listeners: list[OpenListener]) -> None:
        cfg = self.cfg
        settings = WorkerSettings(
            n_ctx=cfg.n_ctx,
            n_gpu_layers=cfg.n_gpu_layers,
            threads=cfg.threads,
            flash_attn=cfg.flash_attn,
            n_batch=cfg.n_batch,
            stream_interval_ms=cfg.stream_interval_ms,
            load_timeout_s=cfg.load_timeout_s,
            gpu=self.budget.gpu,
        )
        mcfg = ManagerConfig(
            budget_mb=self.budget.budget_mb,
            margin_mb=cfg.vram_margin_mb,
            budget_source=self.budget.source,
            max_queue_depth=cfg.max_queue_depth,
            max_wait_ms=cfg.max_wait_ms,
            max_inflight=cfg.max_inflight,
            idle_unload_s=cfg.idle_unload_s,
            pinned=frozenset(self._resolve_ids(cfg.pin)),
        )
        async with ProcessBackend(settings, spare=cfg.spare_worker) as backend:
            manager = Manager(backend, mcfg)
            self.manager = manager
            self.registry.on_refresh = manager.reconcile
            app = App(AppState(self.registry, manager, self._default_id()))
            install_openai(app)
            async with anyio.create_task_group() as tg:
                await tg.start(manager.run)
                tg.start_soon(self._signals)
                tg.start_soon(self._systemd_status)
                # Preloads run beside the wait, so a SIGTERM during a slow one is obeyed.
                conn_tg_scope = await tg.start(self._serve, manager, listeners, app)
                await self.stopping.wait()
                await self._shutdown(manager, listeners, conn_tg_scope)
                tg.cancel_scope.cancel()

    def _default_id(self) -> str | None:
        if self.cfg.default_model is None:
            return None
        spec = self.registry.lookup(self.cfg.default_model)
        return spec.id if spec else self.cfg.default_model

    def _resolve_ids(self, names: Iterable[str]) -> list[str]:
        """Model ids for names given on the command line; a missing file keeps its name
        (and the name with `.gguf`), so a pin applies once the file appears."""
        out = []
        for name in names:
            spec = self.registry.lookup(name)
            if spec is not None:
                out.append(spec.id)
                continue
            out.append(name)
            if not name.endswith(GGUF_SUFFIX):
                out.append(name + GGUF_SUFFIX)
        return out

    def _check_named_models(self) -> None:
        """An ERROR for each model an option names that the models dir does not hold.

        Not fatal: the file may be copied in later (the registry rescans on a miss), and a
        daemon restarted in a loop by systemd would help nobody. Until it appears, requests
        relying on it get 404 and, for --default-model, /readyz stays 503.
        """
        cfg = self.cfg
        named = [("--default-model", cfg.default_model)] if cfg.default_model else []
        named += [("--preload", name) for name in cfg.preload]
        named += [("--pin", name) for name in cfg.pin]
        for option, name in named:
            if self.registry.lookup(name) is not None:
                continue
            available = describe_available(self.registry)
            log.error(
                "%s %r: no such model in the models dir %s (%s)%s",
                option,
                name,
                self.registry.models_dir,
                f"available: {available}" if available else "it holds no models",
                MISSING_CONSEQUENCE.get(option, ""),
                extra={
                    "fields": {
                        "event": "missing_model",
                        "option": option,
                        "model": name,
                        "models_dir": str(self.registry.models_dir),
                    }
                },
            )

    async def _preload_and_notify(self, manager: Manager) -> None:
        """Load the preloads (and the default model), then say READY=1."""
        names = list(self.cfg.preload)
        if self.cfg.default_model and self.cfg.default_model not in names:
            names.insert(0, self.cfg.default_model)
        specs: list[ModelSpec] = []
        for name in names:
            spec = self.registry.lookup(name)
            if spec is not None:  # a missing one was reported by _check_named_models
                specs.append(spec)
        if specs:
            systemd.notify_status(f"preloading {len(specs)} model(s)")
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._extend_start_timeout)
                async with anyio.create_task_group() as loads:
                    for spec in specs:
                        loads.start_soon(manager.preload_one, spec)
                tg.cancel_scope.cancel()
        if self.stopping.is_set():  # a SIGTERM came during the preloads: never READY now
            return
        systemd.notify_ready(self._summary())
        log.info("modeld ready", extra={"fields": {"event": "ready"}})

    async def _extend_start_timeout(self) -> None:
        """While preloads run, keep systemd from taking a slow start for a hung one."""
        while True:
            systemd.notify_extend_timeout(EXTEND_START_S)
            await anyio.sleep(EXTEND_START_S / 3)

    def _summary(self) -> str:
        m = self.manager
        ready = sum(1 for i in m.instances.values() if i.state == "ready")
        queued = sum(len(i.queue) for i in m.instances.values())
        return (
            f"{len(self.registry.models())} models, {ready} loaded, {m.used_mb} MB used, "
            f"{m.inflight} running, {queued} queued"
        )

    async def _systemd_status(self) -> None:
        interval = systemd.watchdog_interval_s()
        last = ""
        next_status = 0.0
        while True:
            now = anyio.current_time()
            if now >= next_status:
                summary = self._summary()
                if summary != last:
                    systemd.notify_status(summary)
                    last = summary
                next_status = now + STATUS_EVERY_S
            if interval:
                systemd.notify_watchdog()
            await anyio.sleep(min(interval or STATUS_EVERY_S, STATUS_EVERY_S))

    async def _serve(
        self,
        manager: Manager,
        listeners: list[OpenListener],
        app: App,
        *,
        task_status: anyio.abc.TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Preload, say READY=1, then accept on every listener; connections live in their
        own task group. Until then connections wait in the listen queue: no request is
        served before systemd hears the daemon is ready."""
        async with anyio.create_task_group() as conns:
            task_status.started(conns.cancel_scope)
            await self._preload_and_notify(manager)
            if self.stopping.is_set():
                return
            # The accept loops end when `_shutdown` closes their listeners: closing,
            # unlike cancelling a pending accept(), never races a connection arriving.
            async with anyio.create_task_group() as accepters:
                for item in listeners:
                    log.info("listening on %s", item.label)
                    accepters.start_soon(self._accept_loop, item, app, conns)

    async def _accept_loop(self, item: OpenListener, app: App, conns: anyio.abc.TaskGroup) -> None:
        async for stream in accept_forever(item, self.stopping):
            conns.start_soon(
                partial(serve_connection, handoff=self.cfg.stream_handoff),
                stream,
                app,
                self.cfg.limits,
                item.info,
                self.slots,
                error_body,
            )

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as rescans:  # a slow disk never delays SIGTERM
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        rescans.start_soon(self._rescan)
                        continue
                    if self.stopping.is_set():
                        log.warning("second signal: exiting at once")
                        os._exit(1)
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    self.stopping.set()

    async def _rescan(self) -> None:
        specs = await self.registry.refresh()
        log.info("SIGHUP: rescanned the models dir: %d models", len(specs))

    async def _shutdown(
        self, manager: Manager, listeners: list[OpenListener], conns: anyio.CancelScope
    ) -> None:
        systemd.notify_stopping()
        self.slots.draining = True
        await close_listeners(listeners)
        with anyio.move_on_after(self.cfg.shutdown_grace_s):
            while manager.inflight or any(i.queue for i in manager.instances.values()):
                await anyio.sleep(DRAIN_POLL_S)
        await manager.shutdown()
        # Requests already on the wire (accepted, or in a connection's buffer) are still
        # answered; idle keep-alive connections are simply closed.
        with anyio.move_on_after(FLUSH_AFTER_SHUTDOWN_S):
            while self.slots.busy:
                await anyio.sleep(DRAIN_POLL_S)
        conns.cancel()
