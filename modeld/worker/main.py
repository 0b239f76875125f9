"""The worker process: JSON lines on stdin, events on a private copy of stdout.

Theory of operation: `__main__` first moves the protocol to a private fd and points fd 1
at stderr, so nothing printed by C or Python can corrupt it; only then is this module (and
llama.cpp with it) imported. `main` initialises the backend and says `hello` (the daemon
keeps a spare worker waiting there). A reader thread parses stdin: `cancel` and `shutdown`
take effect at once by setting the running request's flag, `threads` (the daemon's share
of the cores while other models generate too) before the next decode; `load` and
`generate` are
queued for the main thread, which runs them one at a time. A second `generate` while one
is queued or running is answered `busy`. EOF on stdin acts as `shutdown`; during a load,
both exit at once.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import queue
import socket
import stat
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from modeld.errors import ModeldError
from modeld.worker.chat import ChatTemplate, render
from modeld.worker.engine import CancelFlag, Engine, GenerateSpec, LoadError, LoadSpec
from modeld.worker.events import error_event
from modeld.worker.llama_log import init_backend
from modeld.worker.ops import parse_generate, parse_load
from modeld.worker.output import HandoffOut, parse_handoff

__all__ = ["Channel", "main"]

READ_CHUNK = 1 << 16  # bytes per read of stdin; requests are small
MAX_FDS = 8  # fds one read of stdin can carry (the daemon sends one per `generate`)
SIZEOF_INT = array.array("i").itemsize  # an fd in SCM_RIGHTS data
EXIT_LOAD_FAILED = 1  # exit status after `load_failed`
EXIT_PIPE_GONE = 3  # exit status when the protocol pipe is closed (the daemon is gone)
_SHUTDOWN = object()  # queue item: leave the main loop
MAX_THREADS = 4096  # a `threads` op above this is a bug in the daemon


class Channel:
    """The protocol fd: one os.write per batch of events, under a lock (two threads write)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def send(self, *events: dict[str, Any]) -> None:
        """Write the events as JSON lines in one go; exit if the daemon has gone away."""
        data = "".join([self._encode(e) + "\n" for e in events]).encode("utf-8", "replace")
        with self._lock:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                os._exit(EXIT_PIPE_GONE)


# ---- the worker ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Current:
    """The generate queued or running: its id, cancel flag and (handed off) text output."""

    rid: int
    flag: CancelFlag
    out: HandoffOut | None


class Worker:
    """Owns the request queue, the running request's cancel flag and the engine."""

    def __init__(self, chan: Channel) -> None:
        self._chan = chan
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._current: _Current | None = None  # the generate queued or running
        self._fds: deque[int] = deque()  # received with stdin, for ops still to read
        self._engine: Engine | None = None
        self._template = ChatTemplate(None)  # the loaded model's, for chats
        self._want_threads: int | None = None  # a `threads` op that came before the engine
        self._load_requested = False
        self._loading = False  # a load is queued or running

    # -- reader thread --

    def read_forever(self, fd: int) -> None:
        """Reader thread: split stdin into lines until EOF (raw reads: no stdin lock at exit).

        A Unix socket on stdin (the daemon's choice) may carry the client socket of a
        `generate` op that hands its response off (see `modeld.worker.output`).
        """
        parts: list[bytes] = []  # the unfinished line, in pieces (a prompt may be megabytes)
        read = self._receiver(fd)
        while True:
            try:
                chunk = read()
            except OSError:
                break
            if not chunk:
                break
            while (nl := chunk.find(b"\n")) >= 0:
                parts.append(chunk[:nl])
                self.on_line(b"".join(parts))
                parts, chunk = [], chunk[nl + 1 :]
            if chunk:
                parts.append(chunk)
        self._stop_everything()

    def _receiver(self, fd: int) -> Callable[[], bytes]:
        """A function reading the next chunk of stdin, keeping any fds that come with it."""
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return lambda: os.read(fd, READ_CHUNK)
        sock = socket.socket(fileno=fd)
        ancillary = socket.CMSG_SPACE(MAX_FDS * SIZEOF_INT)

        def receive() -> bytes:
            data, anc, flags, _addr = sock.recvmsg(READ_CHUNK, ancillary, socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) - len(payload) % SIZEOF_INT
                    self._fds.extend(array.array("i", payload[:n]))
            if flags & socket.MSG_CTRUNC:  # the kernel closed fds that did not fit
                _log("fds sent with an op were lost (ancillary data truncated)")
            return data

        return receive

    def on_line(self, line: bytes) -> None:
        """Handle one input line (reader thread)."""
        if not line.strip():
            return
        try:
            obj = json.loads(line)
        except ValueError:
            _log("ignoring a line that is not JSON")
            return
        op = obj.get("op") if isinstance(obj, dict) else None
        if op == "cancel":
            self._cancel(obj.get("id"))
        elif op == "generate":
            self._enqueue_generate(obj)
        elif op == "load":
            self._enqueue_load(obj)
        elif op == "threads":
            self._set_threads(obj.get("n"))
        elif op == "shutdown":
            self._stop_everything()
        else:
            _log(f"ignoring unknown op {op!r}")

    def _set_threads(self, n: object) -> None:
        """The daemon's share of the cores for this worker's generations (reader thread)."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_THREADS:
            _log(f"ignoring threads {n!r}")
            return
        self._want_threads = n
        engine = self._engine
        if engine is not None:
            engine.want_threads = n

    def _cancel(self, rid: object) -> None:
        with self._lock:
            if self._current is not None and self._current.rid == rid:
                self._cancel_current()

    def _cancel_current(self) -> None:
        """(Under the lock.) Stop the current generation."""
        assert self._current is not None
        self._current.flag.cancelled = True

    def _stop_everything(self) -> None:
        """Shutdown or EOF: cancel the running request, then leave; a load is not waited for."""
        with self._lock:
            if self._current is not None:
                self._cancel_current()
            if self._loading:
                _log("shutdown during load: exiting now")
                os._exit(0)
        self._queue.put(_SHUTDOWN)

    def _enqueue_generate(self, obj: dict[str, Any]) -> None:

        fd = self._fds.popleft() if "handoff" in obj and self._fds else None  # this op's
        rid = obj.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            _log("ignoring a generate without an integer id")
            if fd is not None:
                os.close(fd)
            return
        try:
            spec = parse_generate(obj)
            fmt = parse_handoff(obj["handoff"]) if "handoff" in obj else None
            if fmt is not None and fd is None:
                raise ValueError("a handoff without the client's socket")
        except ValueError as exc:
            if fd is not None:
                os.close(fd)
            self._chan.send(error_event(rid, "invalid_request", str(exc)))
            return
        flag = CancelFlag()
        out = None if fd is None or fmt is None else HandoffOut(self.send, fd, fmt, flag)
        with self._lock:
            busy = self._current is not None
            if not busy:
                self._current = _Current(rid, flag, out)
        if busy:
            if out is not None:
                out.close()
            self._chan.send(error_event(rid, "busy", "another generation is running"))
            return
        self._queue.put((spec, flag, out))

    def _enqueue_load(self, obj: dict[str, Any]) -> None:
        if self._load_requested:
            _log("ignoring a second load")
            return
        self._load_requested = True
        try:
            spec = parse_load(obj)
        except ValueError as exc:
            self._queue.put(exc)
            return
        with self._lock:
            self._loading = True
        self._queue.put(spec)

    # -- main thread --

    def run(self) -> int:
        """Main thread: run queued loads and generations; return the exit status."""

        try:
            while True:
                item = self._queue.get()
                if item is _SHUTDOWN:
                    return 0
                if isinstance(item, ValueError):
                    self._chan.send({"ev": "load_failed", "message": f"bad load request: {item}"})
                    return EXIT_LOAD_FAILED
                if isinstance(item, LoadSpec):
                    if not self._load(item):
                        return EXIT_LOAD_FAILED
                elif isinstance(item, tuple):
                    self._generate(*item)
        finally:
            if self._engine is not None:
                self._engine.close()

    def _load(self, spec: LoadSpec) -> bool:

        try:
            self._engine, info = Engine.load(spec)
        except LoadError as exc:
            self._chan.send({"ev": "load_failed", "message": str(exc)})
            return False
        except Exception as exc:  # a bug: still answer, without the path
            traceback.print_exc()
            self._chan.send({"ev": "load_failed", "message": f"worker error: {type(exc).__name__}"})
            return False
        finally:
            with self._lock:
                self._loading = False
        self._template = ChatTemplate(info.get("chat_template"), info["bos"], info["eos"])
        if self._want_threads is not None:
            self._engine.want_threads = self._want_threads
        self._chan.send({"ev": "loaded", **info})
        return True

    def _generate(self, spec: GenerateSpec, flag: CancelFlag, out: HandoffOut | None) -> None:
        try:
            if self._engine is None:
                self.send(error_event(spec.id, "invalid_request", "no model is loaded"))
                return
            if spec.messages is not None:
                try:
                    spec = dataclasses.replace(spec, prompt=render(self._template, spec.messages))
                except ModeldError as exc:
                    self.send(error_event(spec.id, exc.code, exc.message, exc.param))
                    return
            self._engine.generate(spec, flag, self, out)
        except Exception as exc:  # a bug here must end the request, not the worker
            traceback.print_exc()
            with self._lock:
                unanswered = self._current is not None and self._current.flag is flag
            if unanswered:
                if out is not None:
                    out.close()  # before the end is reported
                self.send(error_event(spec.id, "generation_failed", f"worker error: {exc!r}"))
        finally:
            with self._lock:
                if self._current is not None and self._current.flag is flag:
                    self._current = None
            if out is not None:
                out.close()  # whatever ended the generation, the client's socket is let go

    def send(self, *events: dict[str, Any]) -> None:
        """The engine's sink: frees the busy slot before the final event goes out."""
        if events[-1]["ev"] in ("done", "error"):
            with self._lock:
                self._current = None
        self._chan.send(*events)


def _log(message: str) -> None:
    """One line to stderr (the daemon's debug log)."""
    sys.stderr.write(f"modeld.worker[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


def main(proto_fd: int, started: float) -> int:
    """Serve the protocol on proto_fd (stdout already points at stderr); return the exit status.

    `started` is when the import of llama.cpp began, for `import_ms`.
    """
    init_backend(debug=os.environ.get("MODELD_WORKER_DEBUG") == "1")
    chan = Channel(proto_fd)
    worker = Worker(chan)
    threading.Thread(target=worker.read_forever, args=(0,), name="stdin", daemon=True).start()
    import_ms = (time.perf_counter() - started) * 1000.0
    chan.send({"ev": "hello", "pid": os.getpid(), "import_ms": round(import_ms, 3)})
    return worker.run()
