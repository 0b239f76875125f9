"""The `modelctl` click group: global options, the commands, and the one place where
failures become an `error:` line and an exit code (modelctl.exitcodes)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import click

import modeld
from modelctl import render
from modelctl.client import ClientError
from modelctl.commands.health import health
from modelctl.commands.infer import infer
from modelctl.commands.models import models
from modelctl.commands.status import status
from modelctl.context import App, endpoint_from_context
from modelctl.exitcodes import ExitCode, exit_code_for
from modelctl.render import Environment
from modeld.paths import default_socket_path

PROG_NAME = "modelctl"  # the name in usage lines and completion scripts
COMPLETE_VAR = "_MODELCTL_COMPLETE"  # env var the completion scripts set to ask for candidates
SOCKET_ENV = "MODELCTL_SOCKET"  # env var standing for --socket
URL_ENV = "MODELCTL_URL"  # env var standing for --url


def _environment(ctx: click.Context) -> Environment:
    obj = ctx.obj
    if isinstance(obj, App):
        return obj.env
    if isinstance(obj, Environment):
        return obj
    return Environment.from_system()


def _silence_stdout(env: Environment) -> None:
    """After the reader of stdout went away, point it at /dev/null so exit does not fail."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, env.stdout.fileno())
        os.close(devnull)


def _reader_gone(ctx: click.Context) -> click.exceptions.Exit:
    """`| head` stopped reading: no traceback, no message, exit 141 as SIGPIPE would."""
    _silence_stdout(_environment(ctx))
    return click.exceptions.Exit(ExitCode.BROKEN_PIPE)


class ModelctlGroup(click.Group):
    """A group that maps client errors, Ctrl-C and a closed pipe to exit codes."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:  # `modelctl --help` and `--version` print here
            return super().parse_args(ctx, args)
        except BrokenPipeError:
            raise _reader_gone(ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as error:
            with contextlib.suppress(BrokenPipeError):  # stderr gone too: the code still tells
                render.print_error(_environment(ctx), error)
            raise click.exceptions.Exit(exit_code_for(error)) from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None
        except BrokenPipeError:
            raise _reader_gone(ctx) from None


@click.group(cls=ModelctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    envvar=SOCKET_ENV,
    help=f"The daemon's Unix socket [env {SOCKET_ENV}; default: {default_socket_path()}].",
)
@click.option(
    "--url",
    metavar="http://HOST:PORT",
    envvar=URL_ENV,
    help=f"Reach the daemon over TCP instead [env {URL_ENV}].",
)
@click.version_option(modeld.__version__, prog_name=PROG_NAME)
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, url: str | None) -> None:
    """Talk to modeld, the local LLM daemon: list models, run prompts, watch its state."""
    env = _environment(ctx)
    try:
        endpoint = endpoint_from_context(ctx)
    except ValueError as exc:
        raise click.UsageError(str(exc), ctx) from exc
    ctx.obj = App(env=env, endpoint=endpoint)


cli.add_command(infer)
cli.add_command(models)
cli.add_command(status)
cli.add_command(health)


def main() -> None:
    """The `modelctl` console script."""
    cli.main(prog_name=PROG_NAME, complete_var=COMPLETE_VAR)
