"""Starting the real daemon misconfigured: loud when it must stop, loud when it goes on.

A models dir that cannot be listed stops the start with one line on stderr and exit 1; a
model named by an option but missing is an ERROR in the log and the daemon serves on (the
file may be copied in later); listeners others can reach are a WARNING; a start that fails
half-way leaves no socket file behind.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ModelStore, link
from tests.helpers.daemon import Daemon
from tests.integration.conftest import BASE_ARGS, log_events, log_records, running, stream_to_end

SHORT = {"max_tokens": 4, "temperature": 0.0}


def failed_start(daemon: Daemon) -> str:
    """Start a daemon that must refuse to start; its whole output."""
    with pytest.raises(RuntimeError):
        daemon.start()
    assert daemon.proc is not None and daemon.proc.returncode == 1, daemon.log()
    daemon.stop()
    output = daemon.log()
    assert "Traceback" not in output, output
    return output


def records(daemon: Daemon, level: str) -> list[dict[str, Any]]:
    return log_records(daemon, "level", level)


def why_not_started(daemon: Daemon) -> str:
    """The reason of a failed start: the last line, one JSON record (--log-format json)."""
    failed = log_events(daemon, "startup_failed")
    assert len(failed) == 1 and failed[0]["level"] == "error", daemon.log()
    assert daemon.log().strip().splitlines()[-1].startswith("{"), daemon.log()
    return str(failed[0]["msg"]).removeprefix("cannot start: ")


# ---- the models dir --------------------------------------------------------------------------


def test_a_missing_models_dir_stops_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    daemon = Daemon(missing, *BASE_ARGS, "--log-format", "text")
    output = failed_start(daemon)
    assert output.strip().splitlines() == [  # one line for a person at a terminal
        f"modeld: models dir {missing} does not exist; create it or give another --models-dir"
    ]
    assert not Path(daemon.socket_path).exists()
    as_json = Daemon(missing, *BASE_ARGS)  # and one JSON record for the journal
    failed_start(as_json)
    assert why_not_started(as_json) == (
        f"models dir {missing} does not exist; create it or give another --models-dir"
    )


def test_a_models_dir_that_is_a_file_stops_the_start(tmp_path: Path) -> None:
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a directory")
    daemon = Daemon(a_file, *BASE_ARGS)
    failed_start(daemon)
    assert why_not_started(daemon) == f"models dir {a_file} is not a directory"


# ---- models named by options -------------------------------------------------------------------


def test_missing_named_models_are_errors_and_the_daemon_serves_on(
    model_store: ModelStore, tmp_path: Path
) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    args = ("--default-model", "later", "--preload", "ghost.gguf", "--pin", "phantom")
    with running(models, *args) as daemon:
        missing = {r["option"]: r for r in log_events(daemon, "missing_model")}
        assert set(missing) == {"--default-model", "--preload", "--pin"}, daemon.log()
        for option, name in [
            ("--default-model", "later"),
            ("--preload", "ghost.gguf"),
            ("--pin", "phantom"),
        ]:
            rec = missing[option]
            assert rec["level"] == "error" and rec["model"] == name, rec
            assert rec["models_dir"] == str(models), rec
            assert repr(name) in rec["msg"] and str(models) in rec["msg"], rec
            assert "available: tiny.gguf" in rec["msg"], rec
        assert not [r for r in records(daemon, "warning") if "preload" in r["msg"]]
        client = daemon.client()
        assert client.get("/healthz").status == 200
        assert client.get("/readyz").status == 503  # the default model is not there
        # The file appears: a request with no model finds it, and the daemon is ready.
        link(model_store.get("tiny"), models / "later.gguf")
        done = stream_to_end(client, {"prompt": "hi", **SHORT})[-1]
        assert done["model"] == "later.gguf"
        assert client.get("/readyz").status == 200


def test_models_that_are_there_raise_no_error(model_store: ModelStore, tmp_path: Path) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    args = ("--default-model", "tiny", "--pin", "tiny.gguf")
    with running(models, *args, wait_ready=True) as daemon:
        assert not log_events(daemon, "missing_model"), daemon.log()
        assert not records(daemon, "error"), daemon.log()


# ---- listeners others can reach ----------------------------------------------------------------


def exposed(daemon: Daemon) -> list[dict[str, Any]]:
    return log_events(daemon, "exposed")


def test_a_tcp_listener_on_every_address_is_a_warning(
    model_store: ModelStore, tmp_path: Path
) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    daemon = Daemon(models, *BASE_ARGS, "--no-spare-worker")
    daemon.args += ["--listen", f"0.0.0.0:{daemon.port}"]  # the last --listen wins
    with daemon:
        assert daemon.client("tcp").get("/healthz").status == 200
        warnings = exposed(daemon)
    assert len(warnings) == 1, daemon.log()
    rec = warnings[0]
    assert rec["level"] == "warning" and rec["listener"] == f"tcp:0.0.0.0:{daemon.port}"
    assert "reachable from other machines" in rec["msg"]
    assert "without authentication" in rec["msg"]


@pytest.mark.parametrize("mode", ["0666", "0777", "0602"])
def test_a_socket_everyone_may_write_to_is_a_warning(
    model_store: ModelStore, tmp_path: Path, mode: str
) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    with running(models, "--socket-mode", mode, "--no-spare-worker") as daemon:
        assert os.stat(daemon.socket_path).st_mode & 0o777 == int(mode, 8)
        warnings = exposed(daemon)
    assert len(warnings) == 1, daemon.log()
    rec = warnings[0]
    assert rec["level"] == "warning" and rec["listener"] == f"unix:{daemon.socket_path}"
    assert f"--socket-mode {mode}" in rec["msg"] and "every local user" in rec["msg"]


@pytest.mark.parametrize("mode", ["0600", "0660", "0664"])
def test_private_listeners_raise_no_warning(
    model_store: ModelStore, tmp_path: Path, mode: str
) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    with running(models, "--socket-mode", mode, "--no-spare-worker") as daemon:
        assert not exposed(daemon), daemon.log()
        assert not records(daemon, "warning"), daemon.log()


# ---- a start that fails half-way ---------------------------------------------------------------


def test_a_taken_port_fails_the_start_and_leaves_no_socket_file(
    model_store: ModelStore, tmp_path: Path
) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    daemon = Daemon(models, *BASE_ARGS)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", daemon.port))
        taken.listen()
        failed_start(daemon)
    assert why_not_started(daemon) == (
        f"cannot listen on 127.0.0.1:{daemon.port}: Address already in use"
    )
    assert not Path(daemon.socket_path).exists(), "the Unix socket file was left behind"
