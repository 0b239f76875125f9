"""Run the real modeld as a subprocess on a temp Unix socket and a free TCP port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.client import Client

START_TIMEOUT_S = 60.0  # the daemon starts in about a second; CI machines are slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(
        self,
        models_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.preexec = preexec  # run in the child before exec (e.g. to lower a limit)
        self.args = list(args)
        self.tmp = Path(tempfile.mkdtemp(prefix="modeld-", dir="/tmp"))
        self.socket_path = str(self.tmp / "d.sock")
        self.port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.tmp / "daemon.log"

    def start(self, wait_ready: bool = False) -> Daemon:
        cmd = [
            sys.executable,
            "-m",
            "modeld",
            "--models-dir",
            str(self.models_dir),
            "--socket",
            self.socket_path,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-format",
            "json",
            *self.args,
        ]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=self.preexec,  # tests only: a setrlimit before exec
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"modeld exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = self.client().get("/readyz" if wait_ready else "/healthz").status
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"modeld did not start:\n{self.log()}")

    def client(self, via: str = "unix", timeout: float = 60.0) -> Client:
        return Client(self.socket_path, self.port, via=via, timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        return self.client().get("/status").json()  # type: ignore[no-any-return]

    def instance(self, model_id: str) -> dict[str, Any] | None:
        for inst in self.status()["instances"]:
            if inst["model_id"] == model_id:
                return inst  # type: ignore[no-any-return]
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
