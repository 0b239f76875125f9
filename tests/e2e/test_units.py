"""The deploy/ units pass `systemd-analyze verify`; listen_fds() works under systemd's tools."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
SYSTEM_BINARY = "/usr/local/bin/modeld"  # the ExecStart path of deploy/modeld.service
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found (Debian/Ubuntu: apt-get install systemd)",
)


def fake_bindir(tmp_path: Path) -> Path:
    """A bin dir whose `modeld` exists and is executable, as verify insists."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    binary = bindir / "modeld"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return bindir


def verify(unit_dir: Path, user: bool, env: dict[str, str] | None = None) -> str:
    """Run systemd-analyze verify on both units; return what it said about them."""
    assert SYSTEMD_ANALYZE is not None
    args = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", "--man=no"]
    args += [str(unit_dir / "modeld.socket"), str(unit_dir / "modeld.service")]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=60, check=False, env=env, cwd=unit_dir
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Bad keys and values are only warnings (rc stays 0): any line about our units fails.
    return "\n".join(
        line for line in output.splitlines() if "modeld." in line or str(unit_dir) in line
    )


@needs_analyze
def test_system_units_verify(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path)
    units = tmp_path / "system"
    units.mkdir()
    service = (DEPLOY / "modeld.service").read_text()
    assert SYSTEM_BINARY in service
    (units / "modeld.service").write_text(service.replace(SYSTEM_BINARY, str(bindir / "modeld")))
    shutil.copy(DEPLOY / "modeld.socket", units / "modeld.socket")
    assert verify(units, user=False) == ""


@needs_analyze
def test_user_units_verify(tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path)
    units = tmp_path / "user"
    units.mkdir()
    service = (DEPLOY / "user" / "modeld.service").read_text()
    assert "@BINDIR@/modeld" in service
    (units / "modeld.service").write_text(service.replace("@BINDIR@", str(bindir)))
    shutil.copy(DEPLOY / "user" / "modeld.socket", units / "modeld.socket")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}  # the user manager needs one
    assert verify(units, user=True, env=env) == ""


def test_user_socket_path_matches_the_client_default() -> None:
    """modelctl finds the daemon at platformdirs' user runtime dir: %t/modeld/modeld.sock."""
    socket_unit = (DEPLOY / "user" / "modeld.socket").read_text()
    assert "ListenStream=%t/modeld/modeld.sock" in socket_unit
    service = (DEPLOY / "user" / "modeld.service").read_text()
    assert "--socket %t/modeld/modeld.sock" in service


# Started by systemd-socket-activate on the first connection: adopts the listeners the
# way modeld does, answers that connection with what it saw, and exits.
ACTIVATED_CHILD = """
import json, os, socket
from modeld.service.systemd import listen_fds

got = listen_fds()
seen = {"sockets": [[inh.name, inh.family] for inh in got],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
unix = next(inh.sock for inh in got if inh.family == socket.AF_UNIX)
conn, _ = unix.accept()
conn.sendall(json.dumps(seen).encode())
conn.close()
"""


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not found (Debian/Ubuntu: apt-get install systemd)",
)
def test_listen_fds_under_systemd_socket_activate(tmp_path: Path) -> None:
    """listen_fds() understands what systemd's own implementation of the protocol passes."""
    sock_path = tmp_path / "modeld.sock"
    args = ["systemd-socket-activate", f"--listen={sock_path}"]
    args += [f"--listen=127.0.0.1:{free_tcp_port()}", "--fdname=modeld"]
    args += [f"--setenv=PYTHONPATH={REPO_ROOT}", sys.executable, "-c", ACTIVATED_CHILD]
    with subprocess.Popen(args, stderr=subprocess.PIPE, text=True) as activator:
        try:
            deadline = time.monotonic() + 10
            while not sock_path.exists():
                assert activator.poll() is None, activator.communicate()[1]
                assert time.monotonic() < deadline, "socket never appeared"
                time.sleep(0.02)
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(20)
                client.connect(str(sock_path))
                answer = b"".join(iter(lambda: client.recv(4096), b""))
            assert activator.wait(timeout=20) == 0
        finally:
            if activator.poll() is None:
                activator.kill()
    seen = json.loads(answer)
    assert seen == {
        "sockets": [["modeld", socket.AF_UNIX], ["modeld", socket.AF_INET]],
        "env_left": [],
    }
