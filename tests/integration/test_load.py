"""A bounded load test on loopback: many clients at once on two models with depth 32.

Every request must end in a full stream (a `done` event) or a 429, none may hang, the
queues must drain to 0, and after SIGTERM no worker may be left running.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ModelStore
from tests.helpers.client import Client
from tests.integration.conftest import alive, log_tail, running, wait_for, worker_pids

CLIENTS = 500  # concurrent clients, all released at once
DEPTH = 32  # --max-queue-depth per model
REQUEST_TIMEOUT_S = 30.0  # a request taking longer than this counts as hung
JOIN_S = 60.0  # the whole burst must be over by then
BODY = {"prompt": "hi", "max_tokens": 8, "temperature": 0.0}


@dataclass(frozen=True)
class Outcome:
    kind: str  # "done", a 429 code, or what went wrong
    seconds: float


def one_request(client: Client, model: str, gate: threading.Barrier) -> Outcome:
    """Send one streaming /infer and classify how it ended."""
    conn = client.connection()
    body = json.dumps({"model": model, **BODY}).encode()
    gate.wait()
    started = time.monotonic()
    try:
        conn.request("POST", "/infer", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.monotonic() - started
        if resp.status == 429:
            return Outcome(json.loads(data)["error"]["code"], elapsed)
        if resp.status != 200:
            return Outcome(f"status {resp.status}: {data[:200]!r}", elapsed)
        events = [json.loads(line) for line in data.splitlines() if line.strip()]
        kinds = [e["type"] for e in events]
        if kinds[-1:] != ["done"] or kinds.count("done") != 1 or "error" in kinds:
            return Outcome(f"bad stream: {kinds[-3:]}", elapsed)
        return Outcome("done", elapsed)
    except Exception as exc:  # a timeout or a reset: reported, never hidden
        return Outcome(f"{type(exc).__name__}: {exc}", time.monotonic() - started)
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_burst_of_clients_ends_in_streams_or_429s(model_store: ModelStore, tmp_path: Path) -> None:
    models = model_store.models_dir(tmp_path / "models", {"a.gguf": "tiny", "b.gguf": "tiny2"})
    with running(
        models, "--max-queue-depth", str(DEPTH), "--preload", "a", "--preload", "b", wait_ready=True
    ) as daemon:
        wait_for(
            lambda: all(i["state"] == "ready" for i in daemon.status()["instances"]),
            "both models preloaded",
        )
        gate = threading.Barrier(CLIENTS)
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def run(i: int) -> None:
            client = daemon.client("unix" if i % 2 else "tcp", timeout=REQUEST_TIMEOUT_S)
            outcome = one_request(client, "a" if i % 4 < 2 else "b", gate)
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        deadline = started + JOIN_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        wall = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), "clients still waiting: hung requests"

        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.kind] = counts.get(o.kind, 0) + 1
        rejected = [o.seconds * 1000 for o in outcomes if o.kind.startswith("queue_")]
        served = [o.seconds * 1000 for o in outcomes if o.kind == "done"]
        print(f"{CLIENTS} clients in {wall:.2f} s: {counts}")
        if rejected:
            print(
                f"429 latency p50 {percentile(rejected, 0.5):.1f} ms, "
                f"p99 {percentile(rejected, 0.99):.1f} ms"
            )
        print(
            f"stream latency p50 {percentile(served, 0.5):.1f} ms, "
            f"p99 {percentile(served, 0.99):.1f} ms"
        )
        assert len(outcomes) == CLIENTS
        assert set(counts) <= {"done", "queue_full"}, counts
        assert counts.get("done", 0) >= 2 * (DEPTH + 1), counts  # both queues ran full

        status = wait_for(
            lambda: (
                (s := daemon.status())["inflight"] == 0
                and all(i["queue_depth"] == 0 for i in s["instances"])
                and s
            ),
            "the queues to drain",
            timeout=10.0,
        )
        assert status["rejected"]["queue_full"] == counts.get("queue_full", 0)
        assert daemon.client().get("/healthz").status == 200

        workers = worker_pids(daemon)
        assert len(workers) >= 2, workers  # one per model (and maybe a spare)
        assert daemon.stop() == 0, log_tail(daemon)
        wait_for(lambda: not any(alive(p) for p in workers), "every worker to exit", timeout=5.0)
