"""llama.cpp's log callback and backend start-up, for the worker process.

llama.cpp writes its logs through one process-wide callback. Ours keeps the worker quiet
(errors only, to stderr, which the daemon keeps for its debug log) unless
`MODELD_WORKER_DEBUG=1`, and can capture what a call logs: a context's buffer sizes are
only reported that way. The errors of a call that may fail on purpose (a prompt decode
stopped to go on with fewer threads) can be held back and dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp.llama_cpp as llama

__all__ = ["Held", "captured", "held", "init_backend"]

LOG_ERROR_LEVEL = 4  # GGML_LOG_LEVEL_ERROR: the only llama.cpp logs kept when not debugging
LOG_CONT_LEVEL = 5  # GGML_LOG_LEVEL_CONT: continuation of the previous message


class _LlamaLog:
    """Routes llama.cpp/ggml logs: to stderr when debugging, else only errors; can capture."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.capture: list[bytes] | None = None
        self.held: list[bytes] | None = None  # errors kept back (see `held`)
        self._last_level = 0
        self.callback = llama.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes | None, _user: int | None) -> None:
        if text is None:
            return
        if level != LOG_CONT_LEVEL:
            self._last_level = level
        if self.capture is not None:
            self.capture.append(text)
        if self.debug:
            os.write(2, text)
        elif self._last_level >= LOG_ERROR_LEVEL:
            if self.held is not None:
                self.held.append(text)
            else:
                os.write(2, text)


_log: _LlamaLog | None = None  # kept alive for as long as llama.cpp may call it


def init_backend(*, debug: bool) -> None:
    """Install the log callback and initialise llama.cpp's backends (once, before hello)."""
    global _log
    _log = _LlamaLog(debug)
    llama.llama_log_set(_log.callback, None)
    llama.llama_backend_init()


@contextmanager
def captured() -> Iterator[list[bytes]]:
    """The log lines llama.cpp writes inside the block (none before `init_backend`)."""
    lines: list[bytes] = []
    log = _log
    if log is not None:
        log.capture = lines
    try:
        yield lines
    finally:
        if log is not None:
            log.capture = None


class Held:
    """Errors kept back by `held`: written when the block ends, unless dropped."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.dropped = False

    def drop(self) -> None:
        """The call failed as expected: its errors are not worth a line."""
        self.dropped = True


@contextmanager
def held() -> Iterator[Held]:
    """Keep back the errors llama.cpp logs inside the block (when not debugging), for a
    call that may fail on purpose; they are written at its end unless `drop`ped."""
    kept = Held()
    log = _log
    if log is not None:
        log.held = kept.lines
    try:
        yield kept
    finally:
        if log is not None:
            log.held = None
        if not kept.dropped:
            for text in kept.lines:
                os.write(2, text)
