"""What every command gets from the `modelctl` group: the environment and the daemon's endpoint.

Also the model-id completer, which has to find the endpoint on its own: during shell
completion click parses the command line but runs no group callback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import click
from click.core import ParameterSource
from click.shell_completion import CompletionItem

from modelctl.client import READ_TIMEOUT_S, Client, ClientError, Endpoint, ProtocolError
from modelctl.render import Environment
from modelctl.schema import parse_models
from modeld.paths import default_socket_path

COMPLETION_TIMEOUT_S = 0.3  # a shell waits on completion: give up fast, completing nothing


@dataclass(frozen=True)
class App:
    """The state shared by all commands of one `modelctl` run."""

    env: Environment
    endpoint: Endpoint

    def client(self, read_timeout: float | None = READ_TIMEOUT_S) -> Client:
        return Client(self.endpoint, read_timeout=read_timeout)

    def fetch(self, target: str) -> tuple[bytes, Any]:
        """GET a JSON document: its raw bytes (for `--json`) and its parsed value."""
        with self.client().request("GET", target) as response:
            response.raise_for_error()
            raw = response.read()
        try:
            return raw, json.loads(raw)
        except ValueError as exc:
            raise ProtocolError(f"the daemon's answer to {target} is not JSON") from exc


pass_app = click.make_pass_decorator(App)


def endpoint_from_params(
    params: Mapping[str, Any], sources: Mapping[str, ParameterSource | None]
) -> Endpoint:
    """Pick the endpoint: `--url` when given, unless only `--socket` came from the command line.

    Raises ValueError for a bad URL or for both options on the command line.
    """
    socket_path: str | None = params.get("socket_path")
    url: str | None = params.get("url")
    if url and socket_path:
        url_cli = sources.get("url") == ParameterSource.COMMANDLINE
        socket_cli = sources.get("socket_path") == ParameterSource.COMMANDLINE
        if url_cli and socket_cli:
            raise ValueError("give --socket or --url, not both")
        if socket_cli:
            url = None
    if url:
        return Endpoint.from_url(url)
    return Endpoint.unix(socket_path or default_socket_path())


def endpoint_from_context(ctx: click.Context) -> Endpoint:
    """The endpoint named by the root context's `--socket`/`--url` (or their env vars)."""
    root = ctx.find_root()
    sources = {name: root.get_parameter_source(name) for name in ("socket_path", "url")}
    return endpoint_from_params(root.params, sources)


def complete_model_id(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Model ids from the daemon's `/models`; quietly none when it does not answer."""
    try:
        client = Client(
            endpoint_from_context(ctx),
            connect_timeout=COMPLETION_TIMEOUT_S,
            read_timeout=COMPLETION_TIMEOUT_S,
        )
        models = parse_models(client.get_json("/models"))
    except (ClientError, ValueError, OSError):
        return []
    return [CompletionItem(m.id, help=m.state) for m in models if m.id.startswith(incomplete)]
