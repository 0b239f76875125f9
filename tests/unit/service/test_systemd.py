"""systemd socket activation, sd_notify and watchdog helpers, against real sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.service import systemd

REPO_ROOT = Path(__file__).resolve().parents[3]

# Runs in a fresh interpreter: puts a TCP and a Unix listener on fds 3 and 4, sets the
# activation variables as systemd would (LISTEN_PID from argv: "self" or a number),
# calls listen_fds() and reports what it got as JSON on stdout.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys

    pid_arg, names, sock_path = sys.argv[1], sys.argv[2], sys.argv[3]
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(sock_path)
    unix.listen()
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 20) for s in (tcp, unix)]
    port = tcp.getsockname()[1]
    tcp.close()
    unix.close()
    for target, fd in zip((3, 4), high):
        os.dup2(fd, target)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid()) if pid_arg == "self" else pid_arg
    os.environ["LISTEN_FDS"] = "2"
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names

    from modeld.service.systemd import listen_fds

    got = listen_fds(unset_env=sys.argv[4] == "unset")
    report = {"env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
              "sockets": []}
    for inh in got:
        s = inh.sock
        if inh.family == socket.AF_INET:
            client = socket.create_connection(("127.0.0.1", port))
        else:
            client = socket.socket(socket.AF_UNIX)
            client.connect(sock_path)
        conn, _ = s.accept()
        conn.sendall(b"ok")
        echoed = client.recv(2)
        report["sockets"].append({
            "fd": s.fileno(), "name": inh.name, "family": inh.family, "type": int(s.type),
            "inheritable": s.get_inheritable(), "blocking": s.getblocking(),
            "echo": echoed.decode(),
        })
    print(json.dumps(report))
    """
)


def run_child(tmp_path: Path, pid: str, names: str, unset: bool = True) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for key in systemd.LISTEN_ENV:
        env.pop(key, None)
    sock_path = str(tmp_path / "l.sock")
    args = [sys.executable, "-c", CHILD, pid, names, sock_path, "unset" if unset else "keep"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_listen_fds_adopts_sockets_with_names_and_clears_env(tmp_path: Path) -> None:
    report = run_child(tmp_path, "self", "modeld:other")
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [(s["fd"], s["name"], s["family"]) for s in sockets] == [
        (3, "modeld", socket.AF_INET),
        (4, "other", socket.AF_UNIX),
    ]
    for s in sockets:
        assert s["type"] == socket.SOCK_STREAM
        assert s["inheritable"] is False
        assert s["blocking"] is True
        assert s["echo"] == "ok"
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_listen_fds_without_names_says_unknown_and_can_keep_env(tmp_path: Path) -> None:
    report = run_child(tmp_path, "self", "-", unset=False)
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [s["name"] for s in sockets] == ["unknown", "unknown"]
    env = report["env"]
    assert isinstance(env, dict)
    assert env["LISTEN_FDS"] == "2"
    assert env["LISTEN_FDNAMES"] is None


def test_listen_fds_pads_short_name_list(tmp_path: Path) -> None:
    report = run_child(tmp_path, "self", "only")
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [s["name"] for s in sockets] == ["only", "unknown"]


def test_listen_fds_for_another_pid_adopts_nothing_but_clears_env(tmp_path: Path) -> None:
    report = run_child(tmp_path, "1", "modeld:modeld")
    assert report["sockets"] == []
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_listen_fds_not_activated(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in systemd.LISTEN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert systemd.listen_fds() == []


def test_listen_fds_malformed_env_is_ignored_and_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "not-a-pid")
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd.listen_fds() == []
    assert "LISTEN_PID" not in os.environ
    assert "LISTEN_FDS" not in os.environ


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket, named in NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert systemd.notify("STATUS=hello") is True
    assert notify_socket.recv(4096) == b"STATUS=hello"


def test_notify_helpers_send_the_protocol_lines(notify_socket: socket.socket) -> None:
    assert systemd.notify_ready("2 models\nready")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2 models ready"
    assert systemd.notify_status("loading x.gguf")
    assert notify_socket.recv(4096) == b"STATUS=loading x.gguf"
    assert systemd.notify_watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd.notify_stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert systemd.notify_extend_timeout(1.5)
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"modeld-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_unset_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.notify_ready("x") is False


@pytest.mark.parametrize("address", ["/nonexistent/dir/notify.sock", "vsock:2:1234"])
def test_notify_failure_is_quiet(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),
        ("0", None, None),
        ("junk", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_interval_s() == expected
