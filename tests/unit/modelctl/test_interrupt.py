"""Ctrl-C during a stream: a real `modelctl` process, a real SIGINT, the fake daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelctl.exitcodes import ExitCode
from tests.unit.modelctl.fakes import STREAM_FOREVER, FakeDaemon, stream_reply, token_events

REPO = Path(__file__).resolve().parents[3]  # so `python -m modelctl` imports this checkout
DEADLINE_S = 10.0  # generous for a loaded 2-core machine; a pass takes well under a second


def test_ctrl_c_mid_stream_hangs_up_and_exits_130(fake: FakeDaemon) -> None:
    fake.route(
        "POST",
        "/infer",
        stream_reply(token_events("tok "), delay_s=0.02, repeat_last=STREAM_FOREVER),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelctl", "--socket", str(fake.socket_path), "infer", "hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(4)  # the first token has reached stdout
        assert first == b"tok "
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert set((first + out).decode().split()) == {"tok"}  # only text, no trailing noise
    assert err == b""
    started = time.monotonic()
    assert fake.disconnected.wait(DEADLINE_S)
    assert time.monotonic() - started < 1.0
