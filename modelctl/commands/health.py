"""`modelctl health`: liveness (`/healthz`) and readiness (`/readyz`) in one line."""

from __future__ import annotations

import json

import click

from modelctl import render
from modelctl.client import DaemonError
from modelctl.context import App, pass_app
from modelctl.exitcodes import ExitCode
from modelctl.views import health_line

NOT_READY_STATUS = 503  # /readyz's answer while no instance is ready


def probe_ready(app: App) -> bool:
    """Ask `/readyz`; 200 is ready, 503 is not, anything else is an error."""
    with app.client().request("GET", "/readyz") as response:
        body = response.read()
    if response.status == NOT_READY_STATUS:
        return False
    if response.status >= 400:
        raise DaemonError.from_response(response.status, response.headers, body)
    try:
        return bool(json.loads(body).get("ready", True))
    except (ValueError, AttributeError):
        return True  # a 200 is the readiness signal; the body only repeats it


@click.command()
@click.option("--json", "as_json", is_flag=True, help='Print {"live": ..., "ready": ...}.')
@pass_app
@click.pass_context
def health(ctx: click.Context, app: App, as_json: bool) -> None:
    """Say whether the daemon is live and ready; exit 0 only when it is ready."""
    app.fetch("/healthz")  # raises (exit 5) when nothing answers
    ready = probe_ready(app)
    if as_json:
        render.write_data(app.env, json.dumps({"live": True, "ready": ready}) + "\n")
    else:
        render.show(app.env, health_line(app.endpoint.describe(), ready))
    ctx.exit(ExitCode.OK if ready else ExitCode.ERROR)
