"""The exit codes of `modelctl`, documented in docs/modelctl.md; scripts branch on them."""

from __future__ import annotations

from enum import IntEnum

from modelctl.client import ClientError, DaemonError, Unreachable


class ExitCode(IntEnum):
    """Why `modelctl` exited."""

    OK = 0
    ERROR = 1  # any failure without a code of its own (bad answer, load failed, not ready)
    USAGE = 2  # bad arguments, caught by modelctl or refused by the daemon; click's own code
    MODEL_NOT_FOUND = 3  # the daemon has no such model (404 model_not_found)
    BUSY = 4  # 429: queue full, queue wait timed out or too many generations in flight
    UNREACHABLE = 5  # nothing answers on the socket or URL
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
    BROKEN_PIPE = 141  # the reader went away (`| head`): 128 + SIGPIPE, as for git or cat


# Daemon error codes (docs/api.md) that have an exit code of their own; the rest are ERROR.
_BY_ERROR_CODE: dict[str, ExitCode] = {
    "invalid_request": ExitCode.USAGE,  # 400: a value the daemon refuses (`--temperature 150`)
    "no_default_model": ExitCode.USAGE,  # 400: no `-m`, and the daemon has no default model
    "model_not_found": ExitCode.MODEL_NOT_FOUND,
    "queue_full": ExitCode.BUSY,
    "queue_timeout": ExitCode.BUSY,
    "overloaded": ExitCode.BUSY,
}


def for_error_code(code: str) -> ExitCode:
    """The exit code for an error object's `code` from the daemon."""
    return _BY_ERROR_CODE.get(code, ExitCode.ERROR)


def exit_code_for(error: ClientError) -> ExitCode:
    """The exit code of any client failure."""
    if isinstance(error, Unreachable):
        return ExitCode.UNREACHABLE
    if isinstance(error, DaemonError):
        return for_error_code(error.code)
    return ExitCode.ERROR
