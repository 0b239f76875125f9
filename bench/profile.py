"""Profile the modeld DAEMON process with py-spy while the tiny model streams flat out.

The tiny model makes tokens cheap, so whatever the daemon spends per token shows. py-spy
samples the daemon (not its workers) and writes raw collapsed stacks; `summarize` turns
them into self and inclusive shares per function and per package, for the report.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.clients import Sample, modeld_stream
from bench.phases import TINY, Context, prompt_for
from bench.systems import Modeld

SAMPLE_RATE_HZ = 200  # py-spy's default is 100; twice that resolves the per-token work better
PROFILE_TOKENS = 1024  # per request: long streams, so request set-up is a small share
TOP_N = 25  # functions listed in the summary


def _frames(stack: str) -> list[str]:
    """The Python frames of one raw stack line (process and thread entries dropped)."""
    return [
        f
        for f in stack.split(";")
        if not f.startswith("process ") and not f.startswith("thread ") and f
    ]


def _package(frame: str) -> str:
    """A frame's package label, e.g. 'modeld/http' or 'anyio' or 'stdlib:json'."""
    loc = frame.rsplit(" (", 1)[-1].rstrip(")").rsplit(":", 1)[0]
    parts = loc.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "modeld" in parts:
        i = parts.index("modeld")
        return "/".join(parts[i : i + 2]).removesuffix(".py")
    return "stdlib:" + parts[-1].removesuffix(".py")


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
            incl_fn[f] += n
        for p in {_package(f) for f in frames}:
            incl_pkg[p] += n

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100.0 * v / total, 1)) for name, v in c.most_common(k)]

    return {
        "samples": total,
        "self_by_function_pct": pct(self_fn, TOP_N),
        "inclusive_by_function_pct": pct(incl_fn, TOP_N),
        "self_by_package_pct": pct(self_pkg, 15),
        "inclusive_by_package_pct": pct(incl_pkg, 15),
    }


def _py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


def run(ctx: Context, seconds: float, out: Path) -> dict[str, Any]:
    """Stream the tiny model through a fresh daemon while py-spy records the daemon."""
    spy = _py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    raw_path = out / "profile-daemon.txt"
    stop = threading.Event()
    samples: list[Sample] = []
    with Modeld(ctx.tmp, ctx.models_dir, "--preload", TINY, tag="modeld-profile") as md:
        md.start_healthy()
        md.wait_ready([TINY])

        def load() -> None:
            i = 0
            while not stop.is_set():
                samples.append(modeld_stream(md.endpoint, TINY, prompt_for(i), PROFILE_TOKENS))
                i += 1

        th = threading.Thread(target=load, daemon=True)
        th.start()
        time.sleep(0.5)
        cmd = [spy, "record", "-p", str(md.pid), "-d", str(int(seconds))]
        cmd += ["-r", str(SAMPLE_RATE_HZ), "-f", "raw", "-o", str(raw_path)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        stop.set()
        th.join(30)
    if proc.returncode != 0 or not raw_path.is_file():
        raise RuntimeError(f"py-spy failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    summary = summarize(raw_path.read_text())
    summary["requests"] = len(samples)
    if samples:
        rates = sorted(s.decode_tok_s for s in samples)
        summary["tiny_tok_s_while_profiled_median"] = round(rates[len(rates) // 2], 1)
    summary["raw_stacks"] = raw_path.name
    return summary
