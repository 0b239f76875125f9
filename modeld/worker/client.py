"""The daemon's side of a worker process: spawn it, load a model, stream generations.

Theory of operation: each worker is `python -m modeld.worker`, speaking JSON lines (see
`modeld.worker.main`) over its stdin and stdout. Its stdin is one end of a Unix socket
pair, so a `generate` op can carry a client socket's fd to it (the worker then writes
that response itself, see `modeld.worker.output`). One reader task per worker turns what
the worker writes into events: control messages (hello, loaded, load_failed) go to one
queue, generation events to the stream of the request they belong to. Token messages
that arrive together are merged into one batch, so a fast model costs one HTTP write per
read, not one per token. When the worker exits, every open stream ends with an error
and the manager is told, so the daemon never waits on a dead process. A model loaded in
a worker, and its generations, are `modeld.worker.model`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, get_args

import anyio
import anyio.abc

from modeld.errors import (
    GenerationFailed,
    InvalidRequest,
    ModeldError,
    ModelLoadFailed,
    PromptTooLong,
    TemplateError,
    WorkerCrashed,
)
from modeld.manager.backend import (
    ExitCallback,
    Failed,
    Finished,
    GenEvent,
    LostReason,
    Started,
    Tokens,
)
from modeld.worker import STREAM_INTERVAL_MS
from modeld.worker.channel import Channel

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16  # bytes per read from a worker: many token messages at once
SPAWN_TIMEOUT_S = 60.0  # interpreter start + `import llama_cpp`; generous for a busy machine

CLOSE_GRACE_S = 3.0  # time a worker gets to exit after `shutdown` before SIGKILL
GEN_BUFFER = 64  # event batches buffered per stream; a slow client back-pressures the worker
STDERR_TAIL = 40  # lines of worker stderr kept for the log when it dies
# Worker env: never let workers see systemd's variables meant for the daemon.
SCRUBBED_ENV = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)

ERROR_CODES: dict[str, type[ModeldError]] = {
    "prompt_too_long": PromptTooLong,
    "invalid_request": InvalidRequest,
    "template_error": TemplateError,
}
# The request field each worker error code is about (the `param` of the error object).
ERROR_PARAMS: dict[str, str] = {
    "prompt_too_long": "prompt",
}


@dataclass(frozen=True)
class WorkerSettings:
    """How workers load models; the same for every instance."""

    n_ctx: int = 2048
    n_gpu_layers: int = -1
    threads: int = 0  # 0: the worker picks (one per physical core)
    flash_attn: str = "auto"
    n_batch: int = 512
    stream_interval_ms: int = STREAM_INTERVAL_MS
    load_timeout_s: float = 120.0
    gpu: bool = False  # measure memory with NVML instead of RSS


def exit_reason(returncode: int | None) -> str:
    """Say how a process ended, in words fit for a client (no paths)."""
    if returncode is None:
        return "worker did not exit"
    if returncode < 0:
        try:
            return f"worker killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"worker killed by signal {-returncode}"
    return f"worker exited with status {returncode}"


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class WorkerProcess:
    """One `python -m modeld.worker` process and its message plumbing."""

    def __init__(self, proc: anyio.abc.Process, ops: anyio.abc.UNIXSocketStream) -> None:
        self.proc = proc
        self._ops = ops  # the worker's stdin
        self.pid = proc.pid
        self.exited = anyio.Event()
        self.exit_reason = ""
        self.on_exit: ExitCallback | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._control_send, self._control_recv = anyio.create_memory_object_stream[dict[str, Any]](
            16
        )
        self._active: dict[int, Channel[GenEvent]] = {}
        self._handed_off: set[int] = set()  # streams whose worker writes to the client
        self._send_lock = anyio.Lock()
        self._closing_error: ModeldError | None = None

    @classmethod
    async def spawn(cls, tg: anyio.abc.TaskGroup) -> WorkerProcess:
        """Start a worker and wait until it has imported llama.cpp and said hello."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await anyio.open_process(
                [sys.executable, "-m", "modeld.worker"],
                stdin=theirs.fileno(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_worker_env(),
                start_new_session=True,  # a Ctrl-C at the terminal is the daemon's to handle
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = cls(proc, await anyio.abc.UNIXSocketStream.from_socket(ours))
        tg.start_soon(worker._read_stdout)
        tg.start_soon(worker._read_stderr)
        try:
            with anyio.move_on_after(SPAWN_TIMEOUT_S):
                msg = await worker.control()
                if msg is not None and msg.get("ev") == "hello":
                    return worker
        except BaseException:  # cancelled while it starts: never leave it running
            await worker.kill()
            raise
        await worker.kill()
        raise ModelLoadFailed(f"worker did not start: {worker.exit_reason or 'timeout'}")

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    async def send(self, message: dict[str, Any], fd: int | None = None) -> None:
        """One op; `fd` goes with it (SCM_RIGHTS), for the worker to keep a copy of."""
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._send_lock:
            if fd is None:
                await self._ops.send(data)
            else:
                await self._ops.send_fds(data, [fd])

    async def send_quietly(self, message: dict[str, Any], fd: int | None = None) -> bool:
        """`send`, but False instead of an error when the worker has gone (its reader
        then ends every stream with the worker's exit reason)."""
        try:
            await self.send(message, fd)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    async def control(self) -> dict[str, Any] | None:
        """Next control message, or None once the worker has gone."""
        try:
            return await self._control_recv.receive()
        except anyio.EndOfStream:
            return None

    async def load(self, path: str, settings: WorkerSettings) -> dict[str, Any]:
        """Ask the worker to load `path`; return its `loaded` message."""
        await self.send(
            {
                "op": "load",
                "path": path,
                "n_ctx": settings.n_ctx,
                "n_gpu_layers": settings.n_gpu_layers,
                "threads": settings.threads,
                "flash_attn": settings.flash_attn,
                "n_batch": settings.n_batch,
                "stream_interval_ms": settings.stream_interval_ms,
            }
        )
        msg: dict[str, Any] | None = None
        with anyio.move_on_after(settings.load_timeout_s):
            msg = await self.control()
        if msg is None:
            if self.alive:
                await self.kill()
                raise ModelLoadFailed(f"load did not finish within {settings.load_timeout_s:g} s")
            raise ModelLoadFailed(self.exit_reason)
        if msg.get("ev") == "loaded":
            return msg
        reason = str(msg.get("message") or "the worker could not load the model")
        await self.kill()
        raise ModelLoadFailed(reason)

    def open_stream(self, rid: int, *, handed_off: bool = False) -> Channel[GenEvent]:
        """The events of generation `rid`; `handed_off`: the worker writes its response
        onto the client's socket itself, so it ends only when the worker says so."""
        channel: Channel[GenEvent] = Channel(GEN_BUFFER)
        if not self.alive:
            channel.close()
        else:
            self._active[rid] = channel
            if handed_off:
                self._handed_off.add(rid)
        return channel

    def close_stream(self, rid: int) -> None:
        self._handed_off.discard(rid)
        channel = self._active.pop(rid, None)
        if channel is not None:
            channel.close()

    async def kill(self) -> None:
        """SIGKILL the worker and wait until it is reaped."""
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        with anyio.CancelScope(shield=True):
            await self._ops.aclose()
            await self.exited.wait()

    async def close(self, error: ModeldError) -> None:
        """Stop the worker: ask nicely, then kill; streams still open end with `error`."""
        self._closing_error = error
        # End open streams now: a reader blocked on a client that stopped reading must not
        # hold the worker's exit (and the daemon's shutdown) until that client times out.
        # A stream the worker writes itself ends when the worker lets go of the socket.
        for rid, channel in list(self._active.items()):
            if rid not in self._handed_off:
                channel.put_nowait(Failed(error), force=True)
                self.close_stream(rid)
        with anyio.CancelScope(shield=True):
            if self.alive:
                await self.send_quietly({"op": "shutdown"})
                with anyio.move_on_after(CLOSE_GRACE_S):
                    await self.exited.wait()
            await self.kill()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        buf = b""
        try:
            async for chunk in self.proc.stderr:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    text = line.decode("utf-8", "replace").rstrip()
                    if text:
                        self.stderr_tail.append(text)
                        log.debug("worker %d: %s", self.pid, text)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        try:
            while True:
                try:
                    chunk = await self.proc.stdout.receive(READ_CHUNK)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                await self._dispatch(lines)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_eof()

    async def _dispatch(self, lines: list[bytes]) -> None:
        pending_id: int | None = None
        pending: list[str] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("worker %d wrote a line that is not JSON", self.pid)
                continue
            ev = msg.get("ev")
            if ev == "tokens":
                rid = msg["id"]
                if pending_id is not None and pending_id != rid:
                    await self._deliver(pending_id, Tokens(tuple(pending)))
                    pending = []
                pending_id = rid
                pending.extend(msg["texts"])
                continue
            if pending_id is not None:
                await self._deliver(pending_id, Tokens(tuple(pending)))
                pending_id, pending = None, []
            if ev in ("start", "done", "error"):
                event = self._event(msg)
                if ev == "error" and msg.get("code") == "cancelled" and self._closing_error:
                    event = Failed(self._closing_error)  # stopped by an unload before it began
                await self._deliver(msg["id"], event)
            else:
                await self._control_send.send(msg)
        if pending_id is not None:
            await self._deliver(pending_id, Tokens(tuple(pending)))

    @staticmethod
    def _event(msg: dict[str, Any]) -> GenEvent:
        ev = msg["ev"]
        if ev == "start":
            return Started(int(msg["prompt_tokens"]))
        if ev == "done":
            lost, first_at = msg.get("lost"), msg.get("first_at")
            return Finished(
                str(msg["finish_reason"]),
                int(msg["prompt_tokens"]),
                int(msg["completion_tokens"]),
                float(msg.get("gen_ms", 0.0)),
                lost=lost if lost in get_args(LostReason) else None,
                first_at=float(first_at) if isinstance(first_at, int | float) else None,
            )
        code = str(msg.get("code"))
        cls = ERROR_CODES.get(code, GenerationFailed)
        message = str(msg.get("message", "generation failed"))
        param = msg.get("param")
        return Failed(
            cls(message, param=param if isinstance(param, str) else ERROR_PARAMS.get(code))
        )

    async def _deliver(self, rid: int, event: GenEvent) -> None:
        stream = self._active.get(rid)
        if stream is None:
            return  # a request that has already gone away
        closing = self._closing_error
        if (
            closing is not None
            and isinstance(event, Finished)
            and event.finish_reason == "cancelled"
            and event.lost is None
        ):
            event = Failed(closing)  # stopped by an unload, not by its client: say why
        if not await stream.put(event):
            self._active.pop(rid, None)
            return
        if isinstance(event, Finished | Failed):
            self.close_stream(rid)

    async def _on_eof(self) -> None:
        await self.proc.wait()
        self.exit_reason = exit_reason(self.proc.returncode)
        deliberate = self._closing_error is not None
        error = self._closing_error or WorkerCrashed(self.exit_reason)
        for rid, stream in list(self._active.items()):
            stream.put_nowait(Failed(error), force=True)  # the last word, even when full
            self.close_stream(rid)
        self._control_send.close()
        self.exited.set()
        await self._ops.aclose()
        if not deliberate:
            tail = " | ".join(list(self.stderr_tail)[-3:])
            log.warning("worker %d ended: %s; last stderr: %s", self.pid, self.exit_reason, tail)
            if self.on_exit is not None:
                self.on_exit(self.exit_reason)
