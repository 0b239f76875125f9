"""The manager with the real daemon: budget and margin, LRU eviction of idle instances only,
507 for a model that can never fit, single-flight loads, and a models dir that changes.

The budget is not hard-coded: a probe daemon first loads the three padded models and
reports their estimates (/models) and measured sizes (/status); the budget is then chosen
in the middle of the range where any two fit and three do not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

import pytest

from modeld.devtools.tiny_gguf import write_tiny_llama
from tests.conftest import ModelStore, link
from tests.helpers.daemon import Daemon
from tests.integration.conftest import (
    RawInfer,
    instance,
    log_events,
    log_tail,
    running,
    stream_to_end,
    wait_for,
)

N_CTX = "4096"  # room for streams long enough to hold an instance busy for seconds
PADDED = {"a.gguf": "padded-a", "b.gguf": "padded-b", "c.gguf": "padded-c"}
MARGIN_MB = 64  # kept free on top of what the three models need
SHORT = {"max_tokens": 4, "temperature": 0.0}
HOLD = {"max_tokens": 4000, "temperature": 0.0}  # ~4 s of tokens: busy until we hang up
POLL_S = 0.02  # how often the watcher samples /status
QUEUED_GRACE_S = 0.5  # time given to a request to (wrongly) start a load before we look


@dataclass(frozen=True)
class Sizes:
    est: dict[str, int]  # est_vram_mb from /models before any load
    measured: dict[str, int]  # vram_mb from /status after a load

    def usable_range(self) -> tuple[int, int]:
        """(lowest, highest+1) budget − margin under which any two fit but not three."""
        ids = list(self.est)
        lo = max(self.measured[x] + self.est[y] for x, y in permutations(ids, 2))
        hi = min(
            self.measured[x] + self.measured[y] + self.est[z] for x, y, z in permutations(ids, 3)
        )
        return lo, hi


@pytest.fixture(scope="module")
def sizes(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Sizes:
    """Load each padded model once in a roomy daemon and read what it reports."""
    models = model_store.models_dir(tmp_path_factory.mktemp("probe"), PADDED)
    with running(models, "--n-ctx", N_CTX, "--vram-budget-mb", "100000") as probe:
        client = probe.client()
        est = {m["id"]: m["est_vram_mb"] for m in client.get("/models").json()["models"]}
        for model_id in PADDED:
            stream_to_end(client, {"model": model_id, "prompt": "hi", **SHORT})
        measured = {i["model_id"]: i["vram_mb"] for i in probe.status()["instances"]}
    print(f"estimates {est}, measured {measured}")
    return Sizes(est, measured)


@pytest.fixture(scope="module")
def budget(
    sizes: Sizes, model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    lo, hi = sizes.usable_range()
    assert lo < hi, f"no budget holds two of three models but not three: {sizes}"
    usable = (lo + hi) // 2
    print(f"two fit from {lo} MB, three from {hi} MB: budget {usable} + {MARGIN_MB} MB margin")
    models = model_store.models_dir(tmp_path_factory.mktemp("budget"), PADDED)
    args = ["--n-ctx", N_CTX, "--vram-margin-mb", str(MARGIN_MB)]
    with running(models, *args, "--vram-budget-mb", str(usable + MARGIN_MB)) as daemon:
        yield daemon


@dataclass
class Watch:
    """What a background /status watcher saw."""

    samples: int = 0
    over: list[dict[str, Any]] = field(default_factory=list)  # samples over budget − margin
    max_used: int = 0
    errors: list[str] = field(default_factory=list)


@contextmanager
def watching(daemon: Daemon) -> Iterator[Watch]:
    """Poll /status in a thread while the block runs; record any over-budget sample."""
    watch = Watch()
    stop = threading.Event()

    def run() -> None:
        client = daemon.client(timeout=10.0)
        while not stop.is_set():
            try:
                vram = client.get("/status").json()["vram"]
            except Exception as exc:  # report it, do not kill the thread silently
                watch.errors.append(repr(exc))
                return
            watch.samples += 1
            watch.max_used = max(watch.max_used, vram["used_mb"])
            if vram["used_mb"] > vram["budget_mb"] - vram["margin_mb"] or vram["available_mb"] < 0:
                watch.over.append(vram)
            stop.wait(POLL_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(10.0)
    assert not watch.errors, watch.errors
    assert watch.samples > 0
    assert not watch.over, f"used_mb over budget − margin: {watch.over[:3]}"


def states(daemon: Daemon) -> dict[str, str]:
    return {i["model_id"]: i["state"] for i in daemon.status()["instances"]}


def use(daemon: Daemon, model_id: str) -> dict[str, Any]:
    """One short request; its done event."""
    return stream_to_end(daemon.client(), {"model": model_id, "prompt": "hi", **SHORT})[-1]


def evicted(daemon: Daemon) -> list[str]:
    return [e["model"] for e in log_events(daemon, "evict")]


def test_status_reports_the_configured_budget(budget: Daemon, sizes: Sizes) -> None:
    vram = budget.status()["vram"]
    assert vram["source"] == "config"
    assert vram["margin_mb"] == MARGIN_MB
    assert vram["available_mb"] == vram["budget_mb"] - vram["margin_mb"] - vram["used_mb"]


def test_lru_idle_instance_is_evicted_and_budget_always_holds(budget: Daemon) -> None:
    with watching(budget) as watch:
        for model_id in ("a.gguf", "b.gguf"):
            assert use(budget, model_id)["timings"]["load_ms"] > 0
        assert states(budget) == {"a.gguf": "ready", "b.gguf": "ready"}
        use(budget, "c.gguf")  # no room for three: a is the least recently used
        assert states(budget) == {"a.gguf": "unloaded", "b.gguf": "ready", "c.gguf": "ready"}
        assert evicted(budget) == ["a.gguf"], log_tail(budget)
        # b used again (no load), so c is now the least recently used: a evicts c.
        assert use(budget, "b.gguf")["timings"]["load_ms"] == 0
        use(budget, "a.gguf")
        assert states(budget) == {"a.gguf": "ready", "b.gguf": "ready", "c.gguf": "unloaded"}
        assert evicted(budget) == ["a.gguf", "c.gguf"], log_tail(budget)
    loads = {i["model_id"]: i["loads"] for i in budget.status()["instances"]}
    assert loads == {"a.gguf": 2, "b.gguf": 1, "c.gguf": 1}
    models = {m["id"]: m for m in budget.client().get("/models").json()["models"]}
    assert models["c.gguf"]["vram_mb"] is None and models["a.gguf"]["vram_mb"] > 0
    print(f"/status sampled {watch.samples} times, used_mb at most {watch.max_used}")


def test_third_model_waits_while_the_other_two_stream(budget: Daemon) -> None:
    client = budget.client()
    for model_id in ("a.gguf", "b.gguf"):
        use(budget, model_id)  # whatever ran before: a and b resident, c not
    assert states(budget).get("c.gguf", "unloaded") == "unloaded"
    loads_c = instance(budget, "c.gguf").get("loads", 0)
    with (
        watching(budget),
        RawInfer(client, {"model": "a", "prompt": "x", **HOLD}) as hold_a,
        RawInfer(client, {"model": "b", "prompt": "x", **HOLD}) as hold_b,
    ):
        assert hold_a.next_event() is not None and hold_b.next_event() is not None
        with RawInfer(client, {"model": "c", "prompt": "hi", **SHORT}) as wants_c:
            wait_for(lambda: instance(budget, "c.gguf").get("queue_depth") == 1, "c queued")
            time.sleep(QUEUED_GRACE_S)
            c = instance(budget, "c.gguf")
            assert (c["state"], c["queue_depth"], c["loads"]) == ("unloaded", 1, loads_c), c
            assert states(budget) == {"a.gguf": "ready", "b.gguf": "ready", "c.gguf": "unloaded"}
            hold_a.close()  # a goes idle: c may now evict it
            hung_up = time.monotonic()
            assert wants_c.status == 200, log_tail(budget)
            done = wants_c.events()[-1]
            print(f"c started {time.monotonic() - hung_up:.3f} s after a went idle")
        assert done["type"] == "done" and done["timings"]["load_ms"] > 0
        assert done["timings"]["queue_ms"] >= QUEUED_GRACE_S * 1000
        assert states(budget) == {"a.gguf": "unloaded", "b.gguf": "ready", "c.gguf": "ready"}
        assert hold_b.next_event() is not None  # b was never disturbed


def test_model_larger_than_budget_is_507_at_once(budget: Daemon) -> None:
    client = budget.client()
    vram = budget.status()["vram"]
    usable = vram["budget_mb"] - vram["margin_mb"]
    before = states(budget)
    pad_mb, est = 8.0, 0
    while True:  # grow the file until the daemon's own estimate exceeds the budget
        write_tiny_llama(budget.models_dir / "huge.gguf", seed=99, pad_mb=pad_mb)
        entry = next(m for m in client.get("/models").json()["models"] if m["id"] == "huge.gguf")
        est = entry["est_vram_mb"]
        if est > usable:
            break
        pad_mb *= 2
    started = time.monotonic()
    resp = client.infer(model="huge", prompt="hi")
    elapsed = time.monotonic() - started
    assert resp.status == 507, resp.body
    err = resp.json()["error"]
    assert err["code"] == "insufficient_vram"
    for number in (est, usable):
        assert str(number) in err["message"], err
    assert elapsed < 1.0, elapsed
    assert instance(budget, "huge.gguf").get("loads", 0) == 0
    assert {k: v for k, v in states(budget).items() if k != "huge.gguf"} == before


# ---- a roomy daemon: single-flight and a changing models dir -----------------------------------


@pytest.fixture(scope="module")
def roomy(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = model_store.models_dir(
        tmp_path_factory.mktemp("roomy"), {"tiny.gguf": "tiny", "cold.gguf": "tiny2"}
    )
    with running(models, "--vram-budget-mb", "100000") as daemon:
        yield daemon


def test_concurrent_requests_for_a_cold_model_load_it_once(roomy: Daemon) -> None:
    n = 10
    gate = threading.Barrier(n)
    results: list[int] = []

    def one() -> None:
        client = roomy.client()
        gate.wait()
        results.append(client.infer(model="cold", prompt="hi", stream=False, **SHORT).status)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    assert results == [200] * n
    assert instance(roomy, "cold.gguf")["loads"] == 1
    loads = [e for e in log_events(roomy, "load") if e.get("model") == "cold.gguf"]
    assert len(loads) == 1, loads


def test_new_file_becomes_servable_without_restart(roomy: Daemon, model_store: ModelStore) -> None:
    client = roomy.client()
    assert client.infer(model="fresh", prompt="hi").status == 404
    link(model_store.get("tiny", seed=5), roomy.models_dir / "fresh.gguf")
    assert "fresh.gguf" in {m["id"] for m in client.get("/models").json()["models"]}
    assert (
        stream_to_end(client, {"model": "fresh", "prompt": "hi", **SHORT})[-1]["model"]
        == "fresh.gguf"
    )
    # Straight to /infer, no /models in between: the miss rescans the dir.
    link(model_store.get("tiny", seed=6), roomy.models_dir / "fresh2.gguf")
    stream_to_end(client, {"model": "fresh2.gguf", "prompt": "hi", **SHORT})


@pytest.mark.parametrize("loaded", [False, True], ids=["unloaded", "loaded"])
def test_removed_file_is_404_for_new_requests(
    roomy: Daemon, model_store: ModelStore, loaded: bool
) -> None:
    client = roomy.client()
    name = f"gone-{'loaded' if loaded else 'unloaded'}.gguf"
    path = roomy.models_dir / name
    link(model_store.get("tiny", seed=7), path)
    assert name in {m["id"] for m in client.get("/models").json()["models"]}
    if loaded:
        stream_to_end(client, {"model": name, "prompt": "hi", **SHORT})
    path.unlink()
    resp = client.infer(model=name, prompt="hi", **SHORT)
    assert resp.status == 404, (resp.status, resp.body[:300])
    assert resp.json()["error"]["code"] == "model_not_found"
    assert name not in {m["id"] for m in client.get("/models").json()["models"]}
    stream_to_end(client, {"model": "tiny", "prompt": "hi", **SHORT})
