"""The bench's phases: streaming + switching, cold starts, llama-server's router, control plane.

Each phase starts the servers it needs inside an ExitStack, so they stop even when the
phase fails, and returns plain JSON-able dicts for `bench.report`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.clients import (
    Inproc,
    Sample,
    lcp_server_stream,
    llama_server_stream,
    modeld_stream,
)
from bench.systems import LcpServer, LlamaServer, Modeld
from bench.workload import (
    INPROC_HIGH,
    INPROC_LOW,
    LCP_SERVER,
    LLAMA_SERVER,
    MAX_TOKENS,
    MODELS,
    PROMPT,
    SMOL,
    SMOL_B,
    TINY,
    WARM_PROMPT,
    prompt_for,
)
from modeld.worker.memory import rss_mb

TTFT_REQUESTS = 30  # back-to-back tiny requests per system for the TTFT overhead figure
SWITCH_TOKENS = 16  # switching requests are short, so a reload would show
SWITCH_REQUESTS = 8  # requests per switching sequence (same-model and alternating)
COLD_REPS = 3  # fresh starts per cold measurement


Stream = Callable[[str, str, int], Sample]  # (model, prompt, max_tokens) -> Sample


@dataclass(frozen=True)
class Context:
    """What every phase needs: where to log, the models, which optional systems exist."""

    tmp: Path
    paths: dict[str, Path]
    llama_server: Path | None
    lcp: Callable[[dict[str, Path], str], LcpServer | None]
    reps: int

    @property
    def models_dir(self) -> Path:
        return self.paths[SMOL].parent


def meta(reps: int, llama_server: Path | None, lcp_missing: str | None) -> dict[str, Any]:
    """Machine, versions and settings, so a result file explains itself."""
    import llama_cpp

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {cpu}",
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_server": str(llama_server) if llama_server else None,
        "llama_cpp_server": "available" if lcp_missing is None else None,
        "settings": {
            "sampling": "greedy (temperature 0, repeat penalty 1.0)",
            "threads": 2,
            "n_ctx": 2048,
            "flash_attn": "off",
            "max_tokens": MAX_TOKENS,
            "reps": reps,
            "prompt": PROMPT.replace("{}", "<topic>"),
        },
    }


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(samples: list[Sample]) -> dict[str, Any]:
    """Medians (and the raw values) of one system on one model."""
    return {
        "decode_tok_s": round(statistics.median(s.decode_tok_s for s in samples), 1),
        "ttft_ms": round(statistics.median(s.ttft_ms for s in samples), 2),
        "e2e_tok_s": round(statistics.median(s.e2e_tok_s for s in samples), 1),
        "total_s": round(statistics.median(s.total_s for s in samples), 3),
        "best_decode_tok_s": round(max(s.decode_tok_s for s in samples), 1),
        "best_ttft_ms": round(min(s.ttft_ms for s in samples), 2),
        "n_tokens": [s.n_tokens for s in samples],
        "all_decode_tok_s": [round(s.decode_tok_s, 1) for s in samples],
        "all_ttft_ms": [round(s.ttft_ms, 2) for s in samples],
    }


def _greedy(samples: dict[str, dict[str, list[Sample]]]) -> dict[str, dict[str, str]]:
    """For every system and model: is its text identical to the in-process low-level text?"""
    ref = samples.get(INPROC_LOW, {})
    out: dict[str, dict[str, str]] = {}
    for system, per_model in samples.items():
        if system == INPROC_LOW:
            continue
        for model, got in per_model.items():
            want = ref.get(model, [])
            same = sum(a.text == b.text for a, b in zip(got, want, strict=False))
            n = min(len(got), len(want))
            out.setdefault(system, {})[model] = (
                f"identical ({same}/{n})" if same == n and n else f"differs ({n - same}/{n})"
            )
    return out


def _rotate(names: list[str], k: int) -> list[str]:
    """names rotated by k: every system takes every position in turn."""
    k %= max(1, len(names))
    return names[k:] + names[:k]


def _stream_rounds(
    systems: dict[str, Stream], reps: int, errors: dict[str, str]
) -> dict[str, dict[str, list[Sample]]]:
    """Warm up, then `reps` rotating rounds per model; a failing system drops out."""
    samples: dict[str, dict[str, list[Sample]]] = {n: {} for n in systems}
    for model in MODELS:
        live = [n for n in systems if n not in errors]
        for name in live:
            try:
                systems[name](model, WARM_PROMPT, MAX_TOKENS)
            except Exception as exc:  # recorded; the other systems carry on
                errors[name] = f"{type(exc).__name__}: {exc}"
        for rep in range(reps):
            for name in _rotate([n for n in live if n not in errors], rep):
                try:
                    got = systems[name](model, prompt_for(rep), MAX_TOKENS)
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    continue
                samples[name].setdefault(model, []).append(got)
    return samples


def ttft_rounds(systems: dict[str, Stream], errors: dict[str, str]) -> dict[str, Any]:
    """Back-to-back 2-token requests on the tiny model: TTFT is then almost all overhead."""
    got: dict[str, list[float]] = {}
    live = [n for n in systems if n not in errors]
    for i in range(TTFT_REQUESTS):
        for name in _rotate(live, i):
            got.setdefault(name, []).append(systems[name](TINY, prompt_for(i), 2).ttft_ms)
    return {
        name: {
            "p50_ms": round(statistics.median(v), 2),
            "p90_ms": round(percentile(v, 0.9), 2),
            "min_ms": round(min(v), 2),
        }
        for name, v in got.items()
    }


def switching(fn: Stream, a: str, b: str) -> dict[str, Any]:
    """Per-request latency (send to last token) for A,A,A… and for A,B,A,B…, medians."""
    fn(a, WARM_PROMPT, SWITCH_TOKENS)
    fn(b, WARM_PROMPT, SWITCH_TOKENS)
    same = [fn(a, prompt_for(i), SWITCH_TOKENS).total_s for i in range(SWITCH_REQUESTS)]
    alt = [fn((a, b)[i % 2], prompt_for(i), SWITCH_TOKENS).total_s for i in range(SWITCH_REQUESTS)]
    same_s, alt_s = statistics.median(same), statistics.median(alt)
    return {
        "same_model_s": round(same_s, 3),
        "alternating_s": round(alt_s, 3),
        "ratio": round(alt_s / same_s, 3),
    }


def stream_and_switch(ctx: Context) -> dict[str, Any]:
    """Every system resident at once; rotating streamed requests; then A/B switching."""
    p = ctx.paths
    errors: dict[str, str] = {}
    with ExitStack() as stack:
        md = Modeld(ctx.tmp, ctx.models_dir, *preload_args(SMOL, SMOL_B, TINY), tag="modeld-stream")
        stack.callback(md.stop)
        md.start_healthy()
        systems: dict[str, Stream] = {"modeld": partial(modeld_stream, md.endpoint)}
        for kind, name in (("low", INPROC_LOW), ("high", INPROC_HIGH)):
            child = Inproc(kind, {m: p[m] for m in MODELS}, ctx.tmp / f"inproc-{kind}.log")
            stack.callback(child.close)
            systems[name] = _inproc_stream(child)
        if ctx.llama_server is not None:
            servers = {}
            for m in MODELS:
                srv = LlamaServer(ctx.tmp, ctx.llama_server, f"llama-server-{m}", "-m", str(p[m]))
                stack.callback(srv.stop)
                servers[m] = srv.start_healthy()
            systems[LLAMA_SERVER] = partial(_llama_server_by_model, servers)
        lcp = ctx.lcp({m: p[m] for m in (SMOL, SMOL_B, TINY)}, "lcp-stream")
        if lcp is not None:
            stack.callback(lcp.stop)
            lcp.start_healthy()
            systems[LCP_SERVER] = partial(lcp_server_stream, lcp.endpoint)
        md.wait_ready([SMOL, SMOL_B, TINY])
        samples = _stream_rounds(systems, ctx.reps, errors)
        ttft = ttft_rounds(systems, errors)
        switch = {"modeld": switching(systems["modeld"], SMOL, SMOL_B)}
        if lcp is not None and LCP_SERVER not in errors:
            switch[LCP_SERVER] = switching(systems[LCP_SERVER], SMOL, SMOL_B)
        rss = {"daemon_mb": round(rss_mb(md.pid), 1), "workers_mb": round(md.worker_rss_mb(), 1)}
    stream = {name: {m: _summary(s) for m, s in per.items() if s} for name, per in samples.items()}
    return {
        "stream": stream,
        "greedy_vs_inproc": _greedy(samples),
        "ttft_tiny_back_to_back": ttft,
        "switching": switch,
        "modeld_rss_3_models": rss,
        "errors": errors,
    }


def preload_args(*models: str) -> list[str]:
    return [arg for m in models for arg in ("--preload", m)]


def _inproc_stream(child: Inproc) -> Stream:
    def go(model: str, prompt: str, n: int) -> Sample:
        return child.stream(model, prompt, n)

    return go


def _llama_server_by_model(
    servers: dict[str, LlamaServer], model: str, prompt: str, n: int
) -> Sample:
    """One llama-server per model (single-model mode): route by model."""
    return llama_server_stream(servers[model].endpoint, None, prompt, n)


def cold(ctx: Context) -> dict[str, Any]:
    """Fresh start → first token of SmolLM2: modeld with and without its spare worker."""
    out: dict[str, Any] = {}
    for label, args in (
        ("modeld (spare worker)", ()),
        ("modeld (no spare)", ("--no-spare-worker",)),
    ):
        ttfts, idle, ready = [], [], []
        for i in range(COLD_REPS):
            with Modeld(ctx.tmp, ctx.models_dir, *args, tag=f"modeld-cold-{i}") as md:
                md.start_healthy()
                ready.append(md.ready_s)
                if args:
                    time.sleep(1.0)  # the daemon settles; there is no spare to wait for
                else:
                    md.wait_spare()
                idle.append((rss_mb(md.pid), md.worker_rss_mb()))
                ttfts.append(modeld_stream(md.endpoint, SMOL, prompt_for(i), 8).ttft_ms)
        out[label] = {
            "start_s": round(statistics.median(ready), 3),
            "first_token_s": round(statistics.median(ttfts) / 1000.0, 3),
            "all_s": [round(t / 1000.0, 3) for t in ttfts],
        }
        out.setdefault("idle_rss", {})[label] = {
            "daemon_mb": round(statistics.median(d for d, _ in idle), 1),
            "spare_worker_mb": round(statistics.median(w for _, w in idle), 1),
        }
    lcp_runs = []
    for i in range(COLD_REPS):
        lcp = ctx.lcp({SMOL: ctx.paths[SMOL]}, f"lcp-cold-{i}")
        if lcp is None:
            break
        with lcp:
            lcp.start_healthy()
            ttft = lcp_server_stream(lcp.endpoint, SMOL, prompt_for(i), 8).ttft_ms
            lcp_runs.append((lcp.ready_s, ttft / 1000.0))
    if lcp_runs:
        out[LCP_SERVER] = {
            "start_s": round(statistics.median(s for s, _ in lcp_runs), 3),
            "first_token_s": round(statistics.median(t for _, t in lcp_runs), 3),
            "note": "loads its first model during start, so its cold cost is start_s",
        }
    return out


def router(ctx: Context) -> dict[str, Any]:
    """llama-server's router (`--models-dir`): cold first token; switching at max 2 and max 1."""
    if ctx.llama_server is None:
        raise RuntimeError("llama-server is not built")
    binary = ctx.llama_server
    out: dict[str, Any] = {}
    ttfts, ready = [], []
    for i in range(COLD_REPS):
        args = ("--models-dir", str(ctx.models_dir), "--models-max", "2")
        with LlamaServer(ctx.tmp, binary, f"router-cold-{i}", *args) as srv:
            srv.start_healthy()
            ready.append(srv.ready_s)
            ids = _router_ids(srv)
            ttfts.append(llama_server_stream(srv.endpoint, ids[SMOL], prompt_for(i), 8).ttft_ms)
    out["cold"] = {
        "start_s": round(statistics.median(ready), 3),
        "first_token_s": round(statistics.median(ttfts) / 1000.0, 3),
        "all_s": [round(t / 1000.0, 3) for t in ttfts],
    }
    for keep in (2, 1):
        args = ("--models-dir", str(ctx.models_dir), "--models-max", str(keep))
        with LlamaServer(ctx.tmp, binary, f"router-max{keep}", *args) as srv:
            srv.start_healthy()
            fn = partial(_router_stream, srv, _router_ids(srv))
            out[f"switching_models_max_{keep}"] = switching(fn, SMOL, SMOL_B)
    return out


def _router_stream(
    srv: LlamaServer, ids: dict[str, str], model: str, prompt: str, n: int
) -> Sample:
    """One request to the router, naming the model by the router's id for it."""
    return llama_server_stream(srv.endpoint, ids[model], prompt, n)


def _router_ids(srv: LlamaServer) -> dict[str, str]:
    """Map our file names to the router's model ids (the file name, with or without .gguf)."""
    ids = srv.model_ids()
    found = {}
    for name in (SMOL, SMOL_B, TINY):
        stem = name.removesuffix(".gguf")
        match = [i for i in ids if i in (name, stem)]
        if not match:
            raise RuntimeError(f"router lists {ids}, none is {name}")
        found[name] = match[0]
    return found
