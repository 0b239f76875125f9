"""Start and stop the systems under test, each as a child process the bench owns.

Every server listens on a Unix socket or a loopback TCP port, logs to a file in the run's
temp dir, and is stopped (SIGTERM, then SIGKILL) when its `with` block ends, so a failed
or interrupted bench leaves nothing running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from bench.wire import Endpoint, WireError, get_json
from modeld.worker.memory import rss_mb

START_TIMEOUT_S = 120.0  # a server loading SmolLM2 on a busy 2-core machine takes seconds
STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL
POLL_S = 0.02  # readiness poll interval: short, as cold-start times are measured with it


class StartError(RuntimeError):
    """A system did not come up; the message has the tail of its log."""


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """Direct child pids of a process (Linux /proc)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _stat_cpu_s(pid: int | str) -> float:
    """utime + stime + cutime + cstime of a process, in seconds (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and all its live descendants, reaped ones included."""
    return _stat_cpu_s(pid) + sum(tree_cpu_s(c) for c in children(pid))


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def has_mapped(pid: int, needle: str) -> bool:
    """True when the process maps a file whose path contains needle (e.g. libllama)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(needle in line for line in f)
    except OSError:
        return False


class Proc:
    """A child process with a log file, a readiness check and a guaranteed stop."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_s = 0.0  # seconds from spawn to ready

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: Callable[[], bool], timeout: float = START_TIMEOUT_S) -> Proc:
        """Spawn and poll `ready` until it holds; StartError if the process dies or stalls."""
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = self.started_at + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if ready():
                    self.ready_s = time.perf_counter() - self.started_at
                    return self
            except (OSError, WireError):
                pass
            time.sleep(POLL_S)
        self.stop()
        raise StartError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        """The last lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _status_ok(endpoint: Endpoint, path: str) -> bool:
    return get_json(endpoint, path)[0] == 200


# ---- modeld ----------------------------------------------------------------------------


class Modeld(Proc):
    """The daemon on a Unix socket (TCP off), same threads/context/flash-attn as the rest."""

    def __init__(self, tmp: Path, models_dir: Path, *args: str, tag: str = "modeld") -> None:
        sock = tmp / f"{tag}.sock"
        sock.unlink(missing_ok=True)
        self.endpoint = Endpoint(unix=str(sock))
        cmd = [sys.executable, "-m", "modeld", "--models-dir", str(models_dir)]
        cmd += ["--socket", str(sock), "--listen", "none", "--threads", "2", "--n-ctx", "2048"]
        cmd += ["--flash-attn", "off", "--log-level", "warning", "--log-format", "json", *args]
        super().__init__(tag, cmd, tmp / f"{tag}.log")

    def start_healthy(self, timeout: float = START_TIMEOUT_S) -> Modeld:
        """Start and wait for /healthz."""
        self.start(lambda: _status_ok(self.endpoint, "/healthz"), timeout)
        return self

    def wait_ready(self, model_ids: Sequence[str], timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every named instance is ready (after --preload)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            status, body = get_json(self.endpoint, "/status")
            if status == 200 and body:
                states = {i["model_id"]: i["state"] for i in body.get("instances", [])}
                if all(states.get(m) == "ready" for m in model_ids):
                    return
            time.sleep(POLL_S)
        raise StartError(f"modeld: {list(model_ids)} not ready in {timeout:.0f} s:\n{self.tail()}")

    def wait_spare(self, timeout: float = 30.0) -> bool:
        """Wait until a spare worker has imported llama.cpp (libllama mapped); False if none."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if any(has_mapped(c, "libllama") for c in children(self.pid)):
                time.sleep(0.3)  # then backend init and its `hello`: well under this
                return True
            time.sleep(POLL_S)
        return False

    def worker_rss_mb(self) -> float:
        """RSS of all worker processes together."""
        return sum(rss_mb(c) for c in children(self.pid))


# ---- llama.cpp's C++ server --------------------------------------------------------------


def llama_server_args(threads: int, n_ctx: int) -> list[str]:
    """The settings every llama-server run shares with the other systems."""
    return ["-t", str(threads), "-tb", str(threads), "-c", str(n_ctx), "-np", "1", "-fa", "off"]


class LlamaServer(Proc):
    """llama-server on a loopback port: one model (`-m`), or router mode (`--models-dir`)."""

    def __init__(self, tmp: Path, binary: Path, tag: str, *args: str) -> None:
        self.endpoint = Endpoint(port=free_port())
        cmd = [str(binary), "--host", "127.0.0.1", "--port", str(self.endpoint.port)]
        cmd += [*llama_server_args(2, 2048), "--no-webui", *args]
        super().__init__(tag, cmd, tmp / f"{tag}.log")

    def start_healthy(self, timeout: float = START_TIMEOUT_S) -> LlamaServer:
        """Start and wait for /health (200 once the model is loaded, or the router is up)."""
        self.start(lambda: _status_ok(self.endpoint, "/health"), timeout)
        return self

    def model_ids(self) -> list[str]:
        """Model ids the server lists (router mode names each file)."""
        _, body = get_json(self.endpoint, "/v1/models")
        return [m["id"] for m in (body or {}).get("data", [])]


# ---- llama-cpp-python's FastAPI server ---------------------------------------------------


def lcp_server_available(python: str, pythonpath: str | None) -> str | None:
    """None when `llama_cpp.server` imports with that interpreter, else why not."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    try:
        proc = subprocess.run(
            [python, "-c", "import llama_cpp.server.app"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {proc.returncode}"
    return None


class LcpServer(Proc):
    """`python -m llama_cpp.server` with a config file naming every model (one loaded at once)."""

    def __init__(
        self,
        tmp: Path,
        models: dict[str, Path],
        tag: str = "llama_cpp.server",
        python: str = sys.executable,
        pythonpath: str | None = None,
    ) -> None:
        self.endpoint = Endpoint(port=free_port())
        cfg: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.endpoint.port,
            "models": [
                {
                    "model": str(path),
                    "model_alias": alias,
                    "n_ctx": 2048,
                    "n_threads": 2,
                    "n_threads_batch": 2,
                    "n_batch": 512,
                    "flash_attn": False,
                    "verbose": False,
                }
                for alias, path in models.items()
            ],
        }
        cfg_path = tmp / f"{tag}.json"
        cfg_path.write_text(json.dumps(cfg))
        env = {"PYTHONPATH": pythonpath} if pythonpath else None
        cmd = [python, "-m", "llama_cpp.server", "--config_file", str(cfg_path)]
        super().__init__(tag, cmd, tmp / f"{tag}.log", env)

    def start_healthy(self, timeout: float = START_TIMEOUT_S) -> LcpServer:
        """Start and wait for /v1/models."""
        self.start(lambda: _status_ok(self.endpoint, "/v1/models"), timeout)
        return self
