"""`modelctl status`: the VRAM budget and the instances, once or live with `--watch`."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.text import Text

from modelctl import render
from modelctl.client import ClientError
from modelctl.context import App, pass_app
from modelctl.schema import Status
from modelctl.views import status_view

DEFAULT_INTERVAL_S = 1.0  # --watch refresh: live enough, and a negligible load on the daemon
MIN_INTERVAL_S = 0.1  # below this a refresh costs more than it shows


def _view(app: App, document: Any) -> RenderableType:
    return status_view(Status.from_json(document), app.env.wall_clock())


def _watch_header(app: App, interval: float, problem: ClientError | None) -> Text:
    clock = time.strftime("%H:%M:%S", time.localtime(app.env.wall_clock()))
    header = Text(f"modeld status · every {interval:g}s · {clock} · Ctrl-C to stop", style="dim")
    if problem is not None:
        header.append(f"\n{problem}", style="red")
    return header


def watch(app: App, interval: float, as_json: bool) -> None:
    """Redraw until Ctrl-C; when the daemon stops answering, say so and keep trying."""
    env = app.env
    _, document = app.fetch("/status")  # a daemon absent from the start is an error (exit 5)
    problem: ClientError | None = None
    with render.live_view(env) as draw:
        while True:
            if problem is not None and as_json:
                render.print_error(env, problem)
            elif problem is not None:
                draw(_watch_header(app, interval, problem))
            elif as_json:
                render.write_data(env, json.dumps(document, separators=(",", ":")) + "\n")
            else:
                draw(Group(_watch_header(app, interval, None), _view(app, document)))
            env.sleep(interval)
            try:
                _, document = app.fetch("/status")
                problem = None
            except ClientError as exc:
                problem = exc


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's /status answer.")
@click.option("-w", "--watch", "watching", is_flag=True, help="Refresh live until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=MIN_INTERVAL_S),
    default=DEFAULT_INTERVAL_S,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@pass_app
def status(app: App, as_json: bool, watching: bool, interval: float) -> None:
    """Show the VRAM budget (used, margin, free) and each instance's state and load."""
    if watching:
        try:
            watch(app, interval, as_json)
        except KeyboardInterrupt:
            return  # Ctrl-C is how a watch ends: exit 0
        return
    raw, document = app.fetch("/status")
    if as_json:
        render.write_data(app.env, raw.decode("utf-8", "replace").rstrip("\n") + "\n")
        return
    render.show(app.env, _view(app, document))
