"""`make bench`: modeld against the systems people would use instead, side by side, one run.

Theory of operation: every system gets the same models (SmolLM2-135M and a tiny random
llama), the same prompts, greedy sampling, 2 threads, n_ctx 2048, flash attention off and
128 tokens. The streaming phase keeps every system resident at once and rotates through
them request by request, so background load on the machine hits them alike; each
repetition uses a different prompt (the same for every system), so no prompt cache helps
anyone. Later phases measure model switching, cold starts and modeld's control plane, each
with the servers it needs. Everything runs under one time budget (phases that no longer
fit are skipped and say so), every server is a child stopped in a `finally`, and results
go to bench/results/latest.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import control, phases, report
from bench.deps import DEFAULT_CACHE, server_binary
from bench.systems import LcpServer, lcp_server_available, machine_busy_s, tree_cpu_s
from bench.workload import SMOL, SMOL_B, TINY

RESULTS_DIR = Path(__file__).parent / "results"  # latest.json / latest.md / latest.png
HARD_STOP_GRACE_S = 60.0  # past the budget by this much, SIGALRM aborts (servers still stop)


@dataclass(frozen=True)
class Options:
    """What to run and how long it may take."""

    reps: int
    budget_s: float
    cache: Path
    out: Path
    lcp_python: str
    lcp_pythonpath: str | None
    profile_s: float


class Budget:
    """Wall-clock budget; phases ask before starting whether their estimate still fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _prepare_models(work: Path, smol_src: Path) -> dict[str, Path]:
    """The run's models dir: SmolLM2 twice (hard links, else copies) and a tiny model."""
    from modeld.devtools.tiny_gguf import write_tiny_llama

    models = work / "models"
    models.mkdir(parents=True)
    paths = {SMOL: models / SMOL, SMOL_B: models / SMOL_B, TINY: models / TINY}
    for name in (SMOL, SMOL_B):
        try:
            os.link(smol_src, paths[name])
        except OSError:
            shutil.copyfile(smol_src, paths[name])
    write_tiny_llama(paths[TINY])
    return paths


def _phase(
    results: dict[str, Any], budget: Budget, name: str, need_s: float, fn: Callable[[], Any]
) -> None:
    """Run one phase if its estimate fits the budget; record its result or why it has none."""
    if budget.left() < need_s:
        results["skipped"][name] = f"out of time ({budget.left():.0f} s left, needs ~{need_s:.0f})"
        print(f"bench: skipping {name}: out of time", file=sys.stderr)
        return
    print(f"bench: {name} ({budget.left():.0f} s left)", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    busy0, ours0 = machine_busy_s(), tree_cpu_s(os.getpid())
    try:
        results[name] = fn()
    except Exception as exc:  # one failed phase must not cost the others their numbers
        results["skipped"][name] = f"failed: {type(exc).__name__}: {exc}"
        print(f"bench: {name} failed: {exc}", file=sys.stderr)
    wall = time.monotonic() - t0
    others = machine_busy_s() - busy0 - (tree_cpu_s(os.getpid()) - ours0)
    results["phase_s"][name] = round(wall, 1)
    # Noise gauge: cores' worth of CPU that processes outside the bench used meanwhile.
    results["other_load_cores"][name] = round(max(0.0, others) / wall, 2)


def run(opts: Options) -> dict[str, Any]:
    """Run every phase and return the results (also written under opts.out)."""
    from modeld.devtools.demo_model import demo_model_path

    budget = Budget(opts.budget_s)
    work = opts.cache.resolve() / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tmp = work / "logs"
    tmp.mkdir()
    paths = _prepare_models(work, demo_model_path())
    binary = server_binary(opts.cache)
    llama_server = binary if binary.is_file() else None
    lcp_missing = lcp_server_available(opts.lcp_python, opts.lcp_pythonpath)
    results: dict[str, Any] = {
        "meta": phases.meta(opts.reps, llama_server, lcp_missing),
        "skipped": {},
        "phase_s": {},
        "other_load_cores": {},
    }
    if llama_server is None:
        results["skipped"]["llama-server"] = "not built: run `make bench-deps`"
    if lcp_missing is not None:
        results["skipped"]["llama_cpp.server"] = f"not importable: {lcp_missing}"

    def lcp(models: dict[str, Path], tag: str) -> LcpServer | None:
        if lcp_missing is not None:
            return None
        return LcpServer(tmp, models, tag, opts.lcp_python, opts.lcp_pythonpath)

    ctx = phases.Context(tmp, paths, llama_server, lcp, opts.reps)
    _phase(results, budget, "stream", 120, lambda: phases.stream_and_switch(ctx))
    _phase(results, budget, "cold", 60, lambda: phases.cold(ctx))
    _phase(results, budget, "router", 40, lambda: phases.router(ctx))
    _phase(results, budget, "control", 40, lambda: control.control_plane(ctx))
    if opts.profile_s > 0:
        from bench import profile

        _phase(
            results,
            budget,
            "profile",
            opts.profile_s + 30,
            lambda: profile.run(ctx, opts.profile_s, work),
        )
    results["meta"]["wall_s"] = round(opts.budget_s - budget.left(), 1)
    results["targets"] = report.targets(results)
    report.write(results, opts.out, report.DOCS if opts.out == RESULTS_DIR else None)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the bench and print the markdown table."""
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--reps", type=int, default=9, help="measured requests per system and model")
    ap.add_argument("--budget-s", type=float, default=1200.0, help="whole-run time limit")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="bench cache dir")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results dir")
    ap.add_argument("--lcp-python", default=sys.executable, help="interpreter for llama_cpp.server")
    ap.add_argument(
        "--lcp-pythonpath",
        default=os.environ.get("BENCH_LCP_PYTHONPATH"),
        help="extra PYTHONPATH for llama_cpp.server only (its FastAPI dependencies)",
    )
    ap.add_argument(
        "--profile-s",
        type=float,
        default=0.0,
        help="also py-spy the daemon this long while the tiny model streams (0: no)",
    )
    args = ap.parse_args(argv)

    def hard_stop(_sig: int, _frame: object) -> None:
        raise TimeoutError("bench ran past its budget")

    signal.signal(signal.SIGALRM, hard_stop)
    signal.alarm(int(args.budget_s + HARD_STOP_GRACE_S))
    opts = Options(
        args.reps,
        args.budget_s,
        args.cache,
        args.out,
        args.lcp_python,
        args.lcp_pythonpath,
        args.profile_s,
    )
    results = run(opts)
    signal.alarm(0)
    print(report.markdown(results))
    print(json.dumps(results["skipped"], indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
