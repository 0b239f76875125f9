"""Profile the modeld DAEMON process with py-spy while the tiny model streams flat out.

The tiny model makes tokens cheap, so whatever the daemon spends per token shows. py-spy
samples the daemon (not its workers) and writes raw collapsed stacks; `summarize` turns
them into self and inclusive shares per function and per package, for the report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.clients import Sample, modeld_stream
from bench.phases import Context
from bench.systems import Modeld, children
from bench.wire import Endpoint
from bench.workload import TINY, prompt_for

SAMPLE_RATE_HZ = 200  # py-spy's default is 100; twice that resolves the per-token work better
PROFILE_TOKENS = 1024  # per request: long streams, so request set-up is a small share
TOP_N = 25  # functions listed in the summary
UNPROFILED_S = 5.0  # CPU-per-token window before py-spy attaches (py-spy itself costs some)


def _frames(stack: str) -> list[str]:
    """The Python frames of one raw stack line (process and thread entries dropped)."""
    return [
        f
        for f in stack.split(";")
        if not f.startswith("process ") and not f.startswith("thread ") and f
    ]


def _package(frame: str) -> str:
    """A frame's package: 'modeld/http', 'anyio', 'asyncio', 'json', 'selectors', ..."""
    loc = frame.rsplit(" (", 1)[-1].rstrip(")").rsplit(":", 1)[0]
    parts = loc.replace("\\", "/").split("/")
    if "site-packages" in parts:  # an absolute path: the package follows site-packages
        parts = parts[parts.index("site-packages") + 1 :]
    if parts[0] == "modeld" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def summarize(raw: str) -> dict[str, Any]:
    """Self and inclusive sample shares per function and per package from py-spy raw output."""
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl_pkg: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if not frames:
            continue
        total += n
        self_fn[frames[-1]] += n
        self_pkg[_package(frames[-1])] += n
        for f in set(frames):
            if "modeld/" in f and "modeld/__main__" not in f and "modeld/cli" not in f:
                incl_fn[f] += n
        for p in {_package(f) for f in frames}:
            incl_pkg[p] += n

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100.0 * v / total, 1)) for name, v in c.most_common(k)]

    return {
        "samples": total,
        "self_by_function_pct": pct(self_fn, TOP_N),
        "inclusive_modeld_functions_pct": pct(incl_fn, TOP_N),
        "self_by_package_pct": pct(self_pkg, 15),
        "inclusive_by_package_pct": pct(incl_pkg, 15),
    }


def _py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


def _cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a live process has used."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class _Load:
    """Streams the tiny model back to back in a thread and counts the tokens."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._go, daemon=True)
        self.thread.start()

    def _go(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.samples.append(modeld_stream(self.endpoint, TINY, prompt_for(i), PROFILE_TOKENS))
            i += 1

    def tokens(self) -> int:
        return sum(s.n_tokens for s in list(self.samples))


def _window(md: Modeld, load: _Load, action: Callable[[], None]) -> dict[str, Any]:
    """CPU the daemon and its workers used per streamed token while action() ran."""
    pids = [md.pid, *children(md.pid)]
    before = [_cpu_s(p) for p in pids]
    n0, t0 = load.tokens(), time.perf_counter()
    action()
    n1, t1 = load.tokens(), time.perf_counter()
    after = [_cpu_s(p) for p in pids]
    tokens = max(1, n1 - n0)
    user, sys_ = (after[0][i] - before[0][i] for i in (0, 1))
    workers = sum(a[0] + a[1] - b[0] - b[1] for a, b in zip(after[1:], before[1:], strict=True))
    wall = t1 - t0
    return {
        "wall_s": round(wall, 2),
        "tokens": n1 - n0,
        "tok_s": round((n1 - n0) / wall, 1),
        "daemon_cpu_pct": round(100.0 * (user + sys_) / wall, 1),
        "daemon_user_us_per_token": round(1e6 * user / tokens, 1),
        "daemon_sys_us_per_token": round(1e6 * sys_ / tokens, 1),
        "workers_cpu_pct": round(100.0 * workers / wall, 1),
    }


def run(ctx: Context, seconds: float, out: Path) -> dict[str, Any]:
    """Stream the tiny model through a fresh daemon; measure its CPU, then py-spy it.

    The raw stacks (large, machine-specific) go to out, which should be a cache dir.
    """
    spy = _py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw_path = out / "profile-daemon.txt"
    cmd = [spy, "record", "--gil", "-d", str(int(seconds)), "-r", str(SAMPLE_RATE_HZ)]
    cmd += ["-f", "raw", "-o", str(raw_path), "-p"]
    result: dict[str, Any] = {}
    with Modeld(ctx.tmp, ctx.models_dir, "--preload", TINY, tag="modeld-profile") as md:
        md.start_healthy()
        md.wait_ready([TINY])
        load = _Load(md.endpoint)
        time.sleep(0.5)
        result["unprofiled"] = _window(md, load, lambda: time.sleep(UNPROFILED_S))
        proc: list[subprocess.CompletedProcess[str]] = []

        def record() -> None:
            proc.append(
                subprocess.run(
                    [*cmd, str(md.pid)],
                    capture_output=True,
                    text=True,
                    timeout=seconds + 60,
                    check=False,
                )
            )

        result["profiled"] = _window(md, load, record)
        load.stop.set()
        load.thread.join(30)
    if proc[0].returncode != 0 or not raw_path.is_file():
        raise RuntimeError(f"py-spy failed: {(proc[0].stderr or proc[0].stdout).strip()[-400:]}")
    result.update(summarize(raw_path.read_text()))
    result["raw_stacks"] = f"{out.name}/{raw_path.name} in the bench cache"
    result["note"] = (
        "py-spy --gil: only samples where a daemon thread held the GIL (Python work); "
        "kernel time (socket and pipe syscalls) shows in daemon_sys_us_per_token instead"
    )
    return result
