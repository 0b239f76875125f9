"""`modelctl models`: the models the daemon can serve, with size, VRAM and state."""

from __future__ import annotations

import click

from modelctl import render
from modelctl.context import App, pass_app
from modelctl.schema import parse_models
from modelctl.views import models_table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's /models answer as is.")
@pass_app
def models(app: App, as_json: bool) -> None:
    """List the models in the models dir: id, size, estimated/measured VRAM, state."""
    raw, document = app.fetch("/models")
    if as_json:
        render.write_data(app.env, raw.decode("utf-8", "replace").rstrip("\n") + "\n")
        return
    render.show(app.env, models_table(parse_models(document)))
