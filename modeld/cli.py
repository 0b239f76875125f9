"""`modeld [OPTIONS]`: parse options (each also from `MODELD_<NAME>`) and run the daemon."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anyio
import click

from modeld import __version__
from modeld.config import DEFAULT_LISTEN, Config, parse_listen
from modeld.http.protocol import Limits
from modeld.paths import default_socket_path
from modeld.worker import STREAM_INTERVAL_MS

log = logging.getLogger("modeld")


def _listen(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int] | None:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _mode(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"expected an octal mode like 0600, got {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"expected an octal mode like 0600, got {value!r}")
    return mode


def _socket(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    if value is None:
        return default_socket_path()
    if value.strip().lower() in ("", "none", "off"):
        return None
    return Path(value).expanduser().absolute()


@click.command(
    context_settings={
        "auto_envvar_prefix": "MODELD",
        "show_default": True,
        "help_option_names": ["-h", "--help"],
    }
)
@click.option(
    "--models-dir",
    type=click.Path(path_type=Path),  # checked by the daemon: one line naming the path
    default=Path("~/models/llm"),
    help="Directory scanned for *.gguf models; it must exist.",
)
@click.option("--default-model", default=None, help="Model used when a request names none.")
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    callback=_listen,
    help="TCP HOST:PORT to serve on ('none' to turn TCP off); there is no authentication, "
    "so a non-loopback address lets other machines in.",
)
@click.option(
    "--socket",
    default=None,
    callback=_socket,
    help="Unix socket path ('none' to turn it off)  [default: $XDG_RUNTIME_DIR/modeld/modeld.sock]",
)
@click.option(
    "--socket-mode", default="0600", callback=_mode, help="Permissions of the Unix socket."
)
@click.option(
    "--vram-budget-mb",
    type=click.IntRange(min=1),
    default=None,
    help="Memory for all instances [default: GPU total via NVML, else system RAM].",
)
@click.option(
    "--vram-margin-mb", type=click.IntRange(min=0), default=512, help="Memory always kept free."
)
@click.option(
    "--n-ctx", type=click.IntRange(min=16), default=2048, help="Context length per instance."
)
@click.option("--n-gpu-layers", type=int, default=-1, help="Layers offloaded to the GPU (-1: all).")
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    help="Threads per worker (0: one per physical core).",
)
@click.option(
    "--flash-attn",
    type=click.Choice(["on", "off", "auto"]),
    default="auto",
    help="Flash attention in llama.cpp.",
)
@click.option(
    "--n-batch", type=click.IntRange(min=1), default=512, help="Prompt tokens per decode call."
)
@click.option(
    "--stream-interval-ms",
    type=click.IntRange(min=0, max=1000),
    default=STREAM_INTERVAL_MS,
    help="Tokens made within this long of the last write are sent with the next (0: each at once).",
)
@click.option(
    "--stream-handoff/--no-stream-handoff",
    default=True,
    help="A model's worker writes a stream onto the client's socket itself (off: the "
    "daemon forwards every write, which costs it CPU).",
)
@click.option(
    "--max-queue-depth",
    type=click.IntRange(min=0),
    default=32,
    help="Requests that may wait per model before 429 queue_full.",
)
@click.option(
    "--max-wait-ms",
    type=click.IntRange(min=1),
    default=30_000,
    help="Longest wait for a turn or for room to load before 429 queue_timeout.",
)
@click.option(
    "--max-inflight",
    type=click.IntRange(min=0),
    default=0,
    help="Generations running at once across all models (0: no limit).",
)
@click.option("--preload", multiple=True, help="Model to load at start (repeatable).")
@click.option("--pin", multiple=True, help="Model never evicted (repeatable).")
@click.option(
    "--idle-unload-s",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Unload an instance idle this long (0: never).",
)
@click.option(
    "--load-timeout-s",
    type=click.FloatRange(min=1),
    default=120.0,
    help="A load taking longer fails and its worker is killed.",
)
@click.option(
    "--shutdown-grace-s",
    type=click.FloatRange(min=0),
    default=5.0,
    help="Time running requests get to finish at SIGTERM.",
)
@click.option(
    "--follow-symlinks/--no-follow-symlinks",
    default=False,
    help="Serve symlinks that lead outside the models dir.",
)
@click.option(
    "--spare-worker/--no-spare-worker",
    default=True,
    help="Keep a pre-started worker so a cold load skips interpreter start-up.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=Limits.max_connections,
    help="Open connections past this get 503.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=Limits.max_body_bytes,
    help="Largest request body (413 past it).",
)
@click.option(
    "--max-head-bytes",
    type=click.IntRange(min=1024),
    default=Limits.max_head_bytes,
    help="Largest request line + headers (431 past it).",
)
@click.option(
    "--head-timeout-s",
    type=click.FloatRange(min=0.1),
    default=Limits.head_timeout_s,
    help="Request headers must arrive within this (408).",
)
@click.option(
    "--body-timeout-s",
    type=click.FloatRange(min=0.1),
    default=Limits.body_timeout_s,
    help="A request body must arrive within this (408).",
)
@click.option(
    "--keepalive-timeout-s",
    type=click.FloatRange(min=0.1),
    default=Limits.keepalive_timeout_s,
    help="Idle keep-alive connections close after this.",
)
@click.option(
    "--send-timeout-s",
    type=click.FloatRange(min=0.1),
    default=Limits.send_timeout_s,
    help="A client that reads nothing this long is dropped and its generation cancelled.",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    help="auto: text on a terminal, JSON lines otherwise.",
)
@click.version_option(__version__, prog_name="modeld")
def command(**opts: object) -> None:
    """Serve llama.cpp models from a directory within a memory budget.

    Every option can also be set in the environment as MODELD_<OPTION>: MODELD_SOCKET
    for --socket, MODELD_MAX_WAIT_MS for --max-wait-ms, and so on.
    """
    from modeld.daemon import Daemon, StartupError
    from modeld.service.logs import resolve_format, setup_logging

    limit_keys = (
        "max_connections",
        "max_body_bytes",
        "max_head_bytes",
        "head_timeout_s",
        "body_timeout_s",
        "keepalive_timeout_s",
        "send_timeout_s",
    )
    limits = Limits(**{k: opts.pop(k) for k in limit_keys})  # type: ignore[arg-type]
    opts["socket_path"] = opts.pop("socket")  # the option is --socket, so MODELD_SOCKET
    setup_logging(str(opts["log_level"]), str(opts["log_format"]))
    cfg = Config(limits=limits, **opts)  # type: ignore[arg-type]
    try:
        code = anyio.run(Daemon(cfg).run)
    except StartupError as exc:
        if resolve_format(str(opts["log_format"]), sys.stderr) == "json":  # one more log line
            fields = {"event": "startup_failed"}
            logging.getLogger("modeld").error("cannot start: %s", exc, extra={"fields": fields})
        else:
            click.echo(f"modeld: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    command()
