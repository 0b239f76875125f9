"""Control-plane measurements of a running modeld: health latency under load, 429 rate.

The data plane (tokens) is measured in `bench.run`; these check that the daemon stays
responsive while it is busy: `/healthz` while generations stream and hundreds of requests
wait in queues, and how fast it turns requests away when a queue is full.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.clients import modeld_stream
from bench.phases import Context, percentile, preload_args
from bench.systems import Modeld
from bench.wire import Conn, Endpoint, WireError, encode_request, get_json
from bench.workload import SMOL, SMOL_B, prompt_for

QUEUE_SETTLE_S = 10.0  # longest wait for the waiting requests to show up in /status
HEALTH_PROBES = 500  # /healthz requests while the daemon is busy; enough for a p99
WAITING = 200  # queued requests during the health probes (the figure)
REJECT_SECONDS = 3.0  # how long the 429 hammer runs
REJECT_CLIENTS = 2  # client processes hammering /infer: one per core of the reference machine
CONCURRENT_TOKENS = 256  # per stream of the two-models-at-once measurement


@dataclass(frozen=True)
class HealthUnderLoad:
    """`/healthz` latencies (fresh connection each) with streams running and requests queued."""

    probes: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    waiting: int  # requests the daemon reported queued while probing
    streams_running: int


def _queued(ep: Endpoint) -> tuple[int, int]:
    """(requests waiting, generations running) from /status."""
    _, body = get_json(ep, "/status")
    insts = (body or {}).get("instances", [])
    return sum(i.get("queue_depth", 0) for i in insts), int((body or {}).get("inflight", 0))


def _stream_in_thread(ep: Endpoint, model: str, prompt: str, n: int) -> threading.Thread:
    """Run one long stream in a daemon thread (its failure is the bench's loss, not fatal)."""

    def go() -> None:
        try:
            modeld_stream(ep, model, prompt, n)
        except (OSError, WireError, RuntimeError):
            pass

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


def health_under_load(
    ep: Endpoint, models: tuple[str, str], prompt: str, waiting: int, probes: int
) -> HealthUnderLoad:
    """Two long streams (one per model), `waiting` queued requests, then `probes` /healthz."""
    for m in models:
        _stream_in_thread(ep, m, prompt, 1024)
    deadline = time.perf_counter() + QUEUE_SETTLE_S
    while time.perf_counter() < deadline and _queued(ep)[1] < len(models):
        time.sleep(0.02)
    parked: list[Conn] = []
    try:
        for i in range(waiting):
            conn = Conn(ep)
            body = {"model": models[i % 2], "prompt": prompt, "max_tokens": 8, "temperature": 0}
            conn.send(encode_request("POST", "/infer", body))
            parked.append(conn)
        queued, running = 0, 0
        while time.perf_counter() < deadline:
            queued, running = _queued(ep)
            if queued >= waiting:
                break
            time.sleep(0.02)
        lat: list[float] = []
        for _ in range(probes):
            t0 = time.perf_counter()
            status, _ = get_json(ep, "/healthz")
            lat.append((time.perf_counter() - t0) * 1000.0)
            if status != 200:
                raise WireError(f"/healthz answered {status}")
        queued_after, running_after = _queued(ep)
    finally:
        for conn in parked:
            conn.close()
    return HealthUnderLoad(
        probes=probes,
        p50_ms=statistics.median(lat),
        p99_ms=percentile(lat, 0.99),
        max_ms=max(lat),
        waiting=min(queued, queued_after),
        streams_running=min(running, running_after),
    )


def concurrent_streams(ep: Endpoint, models: tuple[str, str], prompt: str) -> dict[str, Any]:
    """One stream alone, then one per model at once: per-stream and total decode tok/s.

    Shows what sharing the cores between concurrent generations buys: with every worker
    on all the cores, two streams spin against each other and each gets far below half.
    """
    for model in models:  # warm: the first request after a load pays page faults
        modeld_stream(ep, model, prompt, 8)
    alone = modeld_stream(ep, models[0], prompt, CONCURRENT_TOKENS)
    got: dict[str, Any] = {}

    def one(model: str) -> None:
        got[model] = modeld_stream(ep, model, prompt, CONCURRENT_TOKENS)

    threads = [threading.Thread(target=one, args=(m,)) for m in models]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    wall = time.perf_counter() - t0
    per = [round(got[m].decode_tok_s, 1) for m in models if m in got]
    return {
        "tokens": CONCURRENT_TOKENS,
        "alone_tok_s": round(alone.decode_tok_s, 1),
        "each_tok_s": per,
        "total_tok_s": round(sum(got[m].n_tokens for m in got) / wall, 1),
    }


def _hammer(ep: Endpoint, model: str, seconds: float, out: Any) -> None:
    """Client process: POST /infer on keep-alive connections for `seconds`; count statuses."""
    req = encode_request("POST", "/infer", {"model": model, "prompt": "x", "max_tokens": 1})
    counts: dict[int, int] = {}
    conn = Conn(ep)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            conn.send(req)
            head = conn.read_head()
            conn.read_body(head)
        except (OSError, WireError):
            conn.close()
            conn = Conn(ep)
            continue
        counts[head.status] = counts.get(head.status, 0) + 1
        if head.headers.get("connection", "").lower() == "close":
            conn.close()
            conn = Conn(ep)
    conn.close()
    out.put(counts)


def rejections_per_s(
    ep: Endpoint, model: str, prompt: str, seconds: float, start_busy: Callable[[], None]
) -> dict[str, Any]:
    """With the model busy and its queue at depth 0, how many 429s per second come back."""
    start_busy()
    deadline = time.perf_counter() + QUEUE_SETTLE_S
    while time.perf_counter() < deadline and _queued(ep)[1] < 1:
        time.sleep(0.02)
    ctx = multiprocessing.get_context("fork")
    out: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(ep, model, seconds, out)) for _ in range(REJECT_CLIENTS)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    totals: dict[int, int] = {}
    for _ in procs:
        for status, n in out.get(timeout=seconds + 30).items():
            totals[status] = totals.get(status, 0) + n
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join(5)
    return {
        "seconds": round(elapsed, 2),
        "clients": REJECT_CLIENTS,
        "statuses": {str(k): v for k, v in sorted(totals.items())},
        "rejections_per_s": round(totals.get(429, 0) / elapsed, 1),
    }


def control_plane(ctx: Context) -> dict[str, Any]:
    """/healthz p99 with two streams and 200 waiting; 429s per second at queue depth 0."""
    out: dict[str, Any] = {}
    args = (*preload_args(SMOL, SMOL_B), "--max-queue-depth", "128", "--shutdown-grace-s", "0")
    with Modeld(ctx.tmp, ctx.models_dir, *args, tag="modeld-health") as md:
        md.start_healthy()
        md.wait_ready([SMOL, SMOL_B])
        out["two_models_at_once"] = concurrent_streams(md.endpoint, (SMOL, SMOL_B), prompt_for(2))
        health = health_under_load(
            md.endpoint, (SMOL, SMOL_B), prompt_for(0), WAITING, HEALTH_PROBES
        )
        out["healthz_under_load"] = asdict(health)
    args = (*preload_args(SMOL), "--max-queue-depth", "0", "--shutdown-grace-s", "0")
    with Modeld(ctx.tmp, ctx.models_dir, *args, tag="modeld-429") as md:
        md.start_healthy()
        md.wait_ready([SMOL])
        ep = md.endpoint

        def busy() -> None:
            threading.Thread(
                target=lambda: _quiet(modeld_stream, ep, SMOL, prompt_for(1), 1024), daemon=True
            ).start()

        out["overload_429"] = rejections_per_s(ep, SMOL, prompt_for(1), REJECT_SECONDS, busy)
    return out


def _quiet(fn: Callable[..., Any], *args: Any) -> None:
    """Run fn, ignoring its failure (a background load generator)."""
    try:
        fn(*args)
    except Exception as exc:
        print(f"bench: background stream ended: {exc}", file=sys.stderr)
