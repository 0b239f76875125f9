"""The one place that knows about the terminal: streams, TTY-ness, rich consoles, spinners.

Commands never look at `sys.stdout` or `isatty()`; they get an `Environment` (from the click
context) and call the helpers here. Tests build an `Environment` over string buffers, say
which of them are terminals, and swap the clock and `sleep`. Data goes to stdout,
diagnostics to stderr; decorations (spinner, stats line, colours) appear only when stdout
is a terminal.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from modelctl.client import ClientError, DaemonError, Unreachable
from modelctl.schema import Outcome
from modelctl.views import outcome_line, waiting_text

PIPE_WIDTH = 1000  # console width when not a terminal: wide enough that tables never wrap
SPINNER = "dots"  # rich spinner name: compact, and readable on any UTF-8 terminal
SPINNER_FPS = 12.5  # spinner redraws per second: smooth without busy-looping
START_HINT = (
    "start it with `modeld`, or `systemctl --user start modeld.socket`; or point "
    "--socket/--url (MODELCTL_SOCKET/MODELCTL_URL) at the daemon that runs"
)  # what to do when the daemon is unreachable
ERROR_HINTS = {
    "no_default_model": "name one with -m MODEL (`modelctl models` lists them)",
}  # what to do about a daemon error, by its code


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Console(Console):
    """A rich Console that leaves a closed pipe to the `modelctl` group, which exits 141
    quietly; rich's own handling would exit 1 behind its back."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


@dataclass
class Environment:
    """The process's streams and whether each is a terminal, plus clocks tests can replace."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    stdin_isatty: bool = False
    stdout_isatty: bool = False
    stderr_isatty: bool = False
    width: int | None = None  # force a console width (tests); None asks the terminal
    sleep: Callable[[float], None] = field(default=time.sleep)
    clock: Callable[[], float] = field(default=time.monotonic)  # for elapsed times
    wall_clock: Callable[[], float] = field(default=time.time)  # for "last used 5s ago"

    @classmethod
    def from_system(cls) -> Environment:
        """The real streams, as they are when the command runs."""
        return cls(
            stdin=sys.stdin,
            stdout=sys.stdout,
            stderr=sys.stderr,
            stdin_isatty=_isatty(sys.stdin),
            stdout_isatty=_isatty(sys.stdout),
            stderr_isatty=_isatty(sys.stderr),
        )

    @property
    def interactive(self) -> bool:
        """Whether a person watches stdout: spinner, stats line and live redraws are on."""
        return self.stdout_isatty

    @cached_property
    def out(self) -> Console:
        return self._console(self.stdout, self.stdout_isatty)

    @cached_property
    def err(self) -> Console:
        return self._console(self.stderr, self.stderr_isatty)

    def _console(self, stream: TextIO, tty: bool) -> Console:
        width = self.width if self.width is not None else (None if tty else PIPE_WIDTH)
        return _Console(
            file=stream,
            force_terminal=tty,
            force_interactive=tty,
            width=width,
            highlight=False,
            markup=False,
            emoji=False,
            soft_wrap=False,
        )


def show(env: Environment, renderable: RenderableType) -> None:
    """Print a view on stdout; in a pipe as plain lines without trailing blanks."""
    if env.interactive:
        env.out.print(renderable)
        return
    with env.out.capture() as captured:
        env.out.print(renderable)
    write_data(env, "".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def write_data(env: Environment, text: str) -> None:
    """Write data to stdout as is and flush it, so a pipe sees it at once."""
    env.stdout.write(text)
    env.stdout.flush()


def notice(env: Environment, message: str) -> None:
    """A diagnostic line on stderr."""
    env.err.print(Text(message, style="yellow"))


def print_error(env: Environment, error: ClientError) -> None:
    """`error: <message>` on stderr, the daemon's code in dim, and a hint when useful.

    Each is one line, which the terminal wraps (as git's messages): no break is put inside
    the message, or between it and its code."""
    line = Text.assemble(("error: ", "bold red"), str(error))
    if isinstance(error, DaemonError):
        line.append(f" ({error.code})", style="dim")
    env.err.print(line, soft_wrap=True)
    hint = START_HINT if isinstance(error, Unreachable) else None
    if isinstance(error, DaemonError):
        hint = ERROR_HINTS.get(error.code)
    if hint:
        env.err.print(Text(f"hint: {hint}", style="dim"), soft_wrap=True)


def waiting(
    env: Environment, model: str | None, whole: bool = False
) -> AbstractContextManager[object]:
    """A spinner with elapsed time on stderr while a request waits; nothing when piped.

    It waits for the first token, or with `whole` for the whole answer."""
    if not (env.interactive and env.stderr_isatty):
        return nullcontext()
    spinner = Spinner(SPINNER, style="cyan")
    start = env.clock()

    def frame() -> RenderableType:
        spinner.update(text=waiting_text(model, env.clock() - start, whole))
        return spinner

    return Live(
        console=env.err,
        get_renderable=frame,
        refresh_per_second=SPINNER_FPS,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )


class TextStream:
    """Writes generated text to stdout as it arrives, then ends it with a newline."""

    def __init__(self, env: Environment) -> None:
        self._env = env
        self._wrote = False
        self._at_line_start = True

    @property
    def started(self) -> bool:
        return self._wrote

    def write(self, text: str) -> None:
        if not text:
            return
        write_data(self._env, text)
        self._wrote = True
        self._at_line_start = text.endswith("\n")

    def finish(self) -> None:
        """The answer is complete: end it with a newline unless it ends with one already,
        so an empty answer is one empty line, in a pipe as on a terminal."""
        if not self._wrote or not self._at_line_start:
            write_data(self._env, "\n")
            self._wrote = self._at_line_start = True

    def end_line(self) -> None:
        """The answer broke off: end a started line, so a message after it has its own."""
        if self._wrote and not self._at_line_start:
            write_data(self._env, "\n")
            self._at_line_start = True


def stats(env: Environment, outcome: Outcome) -> None:
    """The dim stats line after a generation: shown to a person at a terminal only."""
    if env.interactive:
        env.err.print(outcome_line(outcome, width=env.err.width))


def interrupted(env: Environment, stream: TextStream | None) -> None:
    """After Ctrl-C: end the terminal line on stderr; stdout gets nothing more."""
    if env.stderr_isatty and stream is not None and stream.started:
        env.stderr.write("\n")
        env.stderr.flush()


@contextmanager
def live_view(env: Environment) -> Iterator[Callable[[RenderableType], None]]:
    """Redraw a view in place on a terminal; in a pipe, print each snapshot in turn."""
    if not env.interactive:

        def print_snapshot(renderable: RenderableType) -> None:
            show(env, renderable)
            write_data(env, "\n")

        yield print_snapshot
        return
    with Live(
        console=env.out, auto_refresh=False, redirect_stdout=False, redirect_stderr=False
    ) as live:

        def redraw(renderable: RenderableType) -> None:
            live.update(renderable, refresh=True)

        yield redraw
