"""`modeld`'s command line: every option also comes from `MODELD_<FLAG>`, as the README says.

The first tests read click's own resolution of the environment; the last starts the real
daemon configured by the environment alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from modeld.cli import command
from tests.conftest import ModelStore
from tests.helpers.client import Client
from tests.helpers.daemon import START_TIMEOUT_S

ENV_PREFIX = "MODELD_"


def options() -> list[click.Option]:
    """The options a user sets (not --help and --version)."""
    return [p for p in command.params if isinstance(p, click.Option) and p.expose_value]


def env_name(option: click.Option) -> str:
    """What the README promises: the flag's name, upper case, dashes as underscores."""
    flag = next(o for o in option.opts if o.startswith("--"))
    return ENV_PREFIX + flag[2:].upper().replace("-", "_")


def answers(client: Client) -> bool:
    try:
        return client.get("/healthz").status == 200
    except OSError:
        return False


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("option", options(), ids=lambda o: o.opts[0])
def test_every_option_is_read_from_the_variable_named_after_its_flag(
    option: click.Option, clean_env: pytest.MonkeyPatch
) -> None:
    ctx = click.Context(command, **command.context_settings)
    clean_env.setenv(env_name(option), "from-env")
    assert option.resolve_envvar_value(ctx) == "from-env", env_name(option)


def test_the_environment_configures_listeners_and_repeatable_options(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("MODELD_SOCKET", str(tmp_path / "env.sock"))
    clean_env.setenv("MODELD_LISTEN", "none")
    clean_env.setenv("MODELD_PRELOAD", "a.gguf b.gguf")  # repeatable: space-separated
    clean_env.setenv("MODELD_SOCKET_MODE", "0660")
    ctx = command.make_context("modeld", [])
    assert ctx.params["socket"] == tmp_path / "env.sock"
    assert ctx.params["listen"] is None
    assert ctx.params["preload"] == ("a.gguf", "b.gguf")
    assert ctx.params["socket_mode"] == 0o660


def test_max_wait_ms_help_says_it_bounds_the_wait_for_room_too() -> None:
    option = next(o for o in options() if o.name == "max_wait_ms")
    assert option.help is not None and "room to load" in option.help


def test_the_daemon_listens_where_modeld_socket_says(
    model_store: ModelStore, tmp_path: Path
) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    sock = tmp_path / "from-env.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        MODELD_MODELS_DIR=str(models),
        MODELD_SOCKET=str(sock),
        MODELD_LISTEN="none",
        MODELD_SPARE_WORKER="false",
        MODELD_LOG_FORMAT="json",
    )
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modeld"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(Client(str(sock), 0)):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        resp = Client(str(sock), 0).get("/models")
        assert resp.status == 200, resp.body
        assert [m["id"] for m in resp.json()["models"]] == ["tiny.gguf"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    assert code == 0, log_path.read_text()
    assert not sock.exists()  # removed at exit
