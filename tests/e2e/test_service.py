"""modeld as systemd runs it: socket activation, sd_notify, signals, restarts, JSON logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from modeld.devtools.tiny_gguf import write_tiny_llama
from tests.helpers.client import Client
from tests.helpers.daemon import Daemon, free_port

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("service-models")
    write_tiny_llama(path / "tiny-a.gguf", seed=1)
    return path


def _wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_socket_activation_serves_both_inherited_sockets(models_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="modeld-sa-", dir="/tmp"))
    sock_path = str(tmp / "a.sock")
    port = free_port()
    assert SOCKET_ACTIVATE is not None
    cmd: list[str] = [
        SOCKET_ACTIVATE,
        "-l",
        sock_path,
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=unix:tcp",
        sys.executable,
        "-m",
        "modeld",
        "--models-dir",
        str(models_dir),
        "--socket",
        str(tmp / "unused.sock"),
        "--listen",
        "127.0.0.1:1",
        "--log-format",
        "json",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: os.path.exists(sock_path), what="the activation socket")
        unix, tcp = Client(sock_path, port, "unix"), Client(sock_path, port, "tcp")
        assert unix.get("/healthz").json() == {"status": "ok"}  # this connection starts modeld
        assert tcp.get("/healthz").status == 200
        events = tcp.infer(model="tiny-a", prompt="hi", max_tokens=4).events()
        assert events[-1]["type"] == "done"
        assert unix.infer(model="tiny-a", prompt="hi", max_tokens=4).events()[-1]["type"] == "done"
        # It served on the inherited sockets, not on the ones in its options.
        assert not (tmp / "unused.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_sd_notify_ready_then_stopping(models_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="modeld-n-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.settimeout(30)
    daemon = Daemon(models_dir, env={"NOTIFY_SOCKET": str(tmp / "notify")})
    daemon.start()
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert daemon.client().get("/healthz").status == 200
        daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        while not any("STOPPING=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)
        assert daemon.proc.wait(20) == 0  # type: ignore[union-attr]
    finally:
        daemon.stop()  # a second SIGTERM would mean "exit at once": only if still running


def test_ready_comes_before_any_request_is_served_even_with_preloads(models_dir: Path) -> None:
    """A request sent while the preload runs waits in the listen queue; by the time its
    answer arrives, READY=1 (after EXTEND_TIMEOUT_USEC while preloading) was already sent."""
    tmp = Path(tempfile.mkdtemp(prefix="modeld-p-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    sock_path = str(tmp / "d.sock")
    cmd = [sys.executable, "-m", "modeld", "--models-dir", str(models_dir), "--socket"]
    cmd += [sock_path, "--listen", "none", "--preload", "tiny-a", "--log-format", "json"]
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify")}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(30)
        _wait_for(lambda: _connects(client, sock_path), what="the socket to be bound")
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200 ")
        messages = []
        while True:  # everything sent before the answer is already queued here
            try:
                messages.append(notify.recv(4096, socket.MSG_DONTWAIT).decode())
            except BlockingIOError:
                break
        ready = [i for i, m in enumerate(messages) if "READY=1" in m]
        extend = [i for i, m in enumerate(messages) if "EXTEND_TIMEOUT_USEC=" in m]
        assert ready and extend and extend[0] < ready[0], messages
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def _connects(sock: socket.socket, path: str) -> bool:
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    return True


def test_restart_on_a_held_socket_refuses_no_connection(models_dir: Path) -> None:
    """The test holds the listening socket, as systemd does, and restarts modeld on it."""
    tmp = Path(tempfile.mkdtemp(prefix="modeld-r-", dir="/tmp"))
    path = str(tmp / "held.sock")
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.bind(path)
    held.listen(512)
    fd = held.fileno()

    def start() -> subprocess.Popen[bytes]:
        script = (
            f'exec 3<&{fd}; LISTEN_FDS=1 LISTEN_FDNAMES=modeld LISTEN_PID=$$ exec "$0" -m modeld '
            f'--models-dir "$1" --listen none --socket "$2" --log-format json'
        )
        return subprocess.Popen(
            ["bash", "-c", script, sys.executable, str(models_dir), str(tmp / "x.sock")],
            pass_fds=(fd,),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "log", "ab"),
        )

    client = Client(path, 0, "unix", timeout=30)
    results: list[int] = []
    stop = threading.Event()

    def fire() -> None:
        while not stop.is_set() and len(results) < 2000:
            try:
                results.append(client.get("/healthz").status)
            except OSError as exc:
                results.append(-1)
                print("request failed:", exc)

    first = start()
    try:
        _wait_for(lambda: client.get("/healthz").status == 200, what="first daemon")
        thread = threading.Thread(target=fire)
        thread.start()
        time.sleep(0.5)
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
        second = start()
        time.sleep(1.5)
        stop.set()
        thread.join(30)
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    finally:
        stop.set()
        for p in (first,):
            if p.poll() is None:
                p.kill()
    assert results, "no requests were sent"
    log = (tmp / "log").read_text()
    assert set(results) == {200}, f"{results.count(-1)} of {len(results)} failed:\n{log[-3000:]}"


def test_sigterm_during_a_stream_ends_it_and_leaves_no_worker(models_dir: Path) -> None:
    daemon = Daemon(models_dir, "--shutdown-grace-s", "0.5", "--n-ctx", "8192").start()
    pid = daemon.proc.pid  # type: ignore[union-attr]
    events = []
    stream = daemon.client().stream({"model": "tiny-a", "prompt": "x", "max_tokens": 8000})
    for event in stream:
        events.append(event)
        if len(events) == 5:
            workers = _children(pid)
            assert workers, "no worker process"
            started = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert events[-1]["type"] in ("error", "done")
    if events[-1]["type"] == "error":
        assert events[-1]["error"]["code"] == "shutting_down"
    assert daemon.proc.wait(20) == 0  # type: ignore[union-attr]
    assert time.monotonic() - started < 0.5 + 5
    for worker in workers:
        _wait_for(lambda w=worker: not Path(f"/proc/{w}").exists(), 5, f"worker {worker} to exit")
    daemon.stop()


def test_log_lines_are_json_with_request_fields(models_dir: Path) -> None:
    daemon = Daemon(models_dir).start()
    try:
        daemon.client().infer(model="tiny-a", prompt="secret prompt text", max_tokens=3)
    finally:
        daemon.stop()
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    requests = [r for r in lines if r.get("event") == "request" and r.get("path") == "/infer"]
    assert requests, daemon.log()
    fields = {"model", "status", "queue_ms", "load_ms", "ttft_ms", "tokens", "total_ms", "outcome"}
    assert fields <= requests[0].keys()
    assert any(r.get("event") == "load" and "vram_mb" in r for r in lines)
    assert "secret prompt text" not in daemon.log()


def test_second_daemon_on_the_same_socket_exits_with_a_clear_message(models_dir: Path) -> None:
    daemon = Daemon(models_dir).start()
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "modeld",
                "--models-dir",
                str(models_dir),
                "--socket",
                daemon.socket_path,
                "--listen",
                "none",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode != 0
        assert "already serving" in out.stderr
        assert daemon.client().get("/healthz").status == 200
        assert oct(os.stat(daemon.socket_path).st_mode & 0o777) == "0o600"
    finally:
        daemon.stop()


def test_stale_socket_file_is_replaced(models_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="modeld-s-", dir="/tmp"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp / "d.sock"))
    stale.close()  # the file stays, nobody listens: a daemon that died
    daemon = Daemon(models_dir)
    daemon.socket_path = str(tmp / "d.sock")
    daemon.start()
    try:
        assert daemon.client().get("/healthz").status == 200
    finally:
        daemon.stop()
