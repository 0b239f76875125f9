"""Queues and backpressure with the real daemon: 429s with a retry hint, waits that expire,
clients that leave while queued or while streaming, and the global in-flight cap.

A "slow stream" is a tiny model asked for 4000 tokens in a 4096 context: several seconds
of tokens (about 1000 tokens/s on 2 cores), so it holds its instance busy until the test
hangs up, which also cancels it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ModelStore
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

MODELS = {"q.gguf": "tiny", "other.gguf": "tiny2"}
N_CTX = ("--n-ctx", "4096")
HOLD = {"model": "q", "prompt": "hello", "max_tokens": 4000, "temperature": 0.0}
SHORT = {"max_tokens": 4, "temperature": 0.0}
AT_ONCE_S = 0.5  # a 429 that is "at once": no waiting, just a loaded machine's latency
FREED_WITHIN_S = 1.0  # "a fraction of a second": hang-up to the next request's start
MAX_WAIT_MS = 300


def start_daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory, *args: str
) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("queues"), MODELS)
    with running(models, *N_CTX, *args) as daemon:
        stream_to_end(daemon.client(), {"model": "q", "prompt": "warm", **SHORT})  # loaded
        yield daemon


@pytest.fixture(scope="module")
def depth2(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from start_daemon(model_store, tmp_path_factory, "--max-queue-depth", "2")


@pytest.fixture(scope="module")
def short_wait(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    yield from start_daemon(model_store, tmp_path_factory, "--max-wait-ms", str(MAX_WAIT_MS))


@pytest.fixture(scope="module")
def one_inflight(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    yield from start_daemon(model_store, tmp_path_factory, "--max-inflight", "1")


def held(daemon: Daemon, via: str = "unix", **headers: str) -> RawInfer:
    """A slow stream on q whose first bytes have arrived (so it is surely running)."""
    stream = RawInfer(daemon.client(via), HOLD, headers)
    assert stream.status == 200, log_tail(daemon)
    assert stream.response().readline().strip()
    return stream


def wall(record: dict[str, Any]) -> float:
    """A log record's time stamp as Unix seconds."""
    return datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00")).timestamp()


def queue_depth(daemon: Daemon, model_id: str = "q.gguf") -> int:
    return int(instance(daemon, model_id).get("queue_depth", 0))


def check_429(status: int, headers: Mapping[str, str | None], body: Any, code: str) -> int:
    """A 429 with `code`, a retry_after_ms and a Retry-After header that agree; returns ms."""
    assert status == 429, (status, body)
    err = body["error"]
    assert err["code"] == code, err
    retry_ms = err["retry_after_ms"]
    assert isinstance(retry_ms, int) and retry_ms >= 1, err
    retry_after = headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit(), headers
    assert int(retry_after) == max(1, -(-retry_ms // 1000)), (retry_after, retry_ms)
    return int(retry_ms)


def test_full_queue_answers_429_at_once_and_other_models_are_served(depth2: Daemon) -> None:
    client = depth2.client()
    rejected = depth2.status()["rejected"]["queue_full"]
    with held(depth2) as hold:
        # Two different lengths, so the log tells which of the two ran first.
        first = RawInfer(client, {"model": "q", "prompt": "hi", "max_tokens": 3})
        wait_for(lambda: queue_depth(depth2) == 1, "the first request queued")
        second = RawInfer(client, {"model": "q", "prompt": "hi", "max_tokens": 5})
        with first, second:
            wait_for(lambda: queue_depth(depth2) == 2, "two requests queued")
            started = time.monotonic()
            resp = client.infer(model="q", prompt="hi", **SHORT)
            elapsed = time.monotonic() - started
            retry_ms = check_429(resp.status, resp.headers, resp.json(), "queue_full")
            print(f"queue_full in {elapsed * 1000:.1f} ms, retry_after_ms {retry_ms}")
            assert elapsed < AT_ONCE_S
            assert depth2.status()["rejected"]["queue_full"] == rejected + 1
            # Another model has a queue of its own: served while q is busy and full.
            started = time.monotonic()
            done = stream_to_end(client, {"model": "other", "prompt": "hi", **SHORT})[-1]
            print(f"other model served in {time.monotonic() - started:.3f} s meanwhile")
            assert done["model"] == "other.gguf"
            assert queue_depth(depth2) == 2
            hold.close()
            # The two queued requests now run to full streams, in their order.
            assert first.status == 200 and second.status == 200
            assert first.events()[-1]["type"] == second.events()[-1]["type"] == "done"
    assert queue_depth(depth2) == 0
    finished = [
        e["tokens"]
        for e in log_events(depth2, "request")
        if e.get("model") == "q.gguf" and e.get("outcome") == "length"
    ]
    assert finished[-2:] == [3, 5], finished


def test_client_gone_while_queued_leaves_the_queue(depth2: Daemon) -> None:
    cancelled = depth2.status()["cancelled"]
    with held(depth2):
        waiting = RawInfer(depth2.client(), {"model": "q", "prompt": "hi", **SHORT})
        wait_for(lambda: queue_depth(depth2) == 1, "the request to be queued")
        waiting.close()
        gone = time.monotonic()
        wait_for(lambda: queue_depth(depth2) == 0, "the queue to empty", timeout=5.0)
        print(f"left the queue {(time.monotonic() - gone) * 1000:.1f} ms after hanging up")
        assert depth2.status()["cancelled"] == cancelled + 1
        assert instance(depth2, "q.gguf")["inflight"] == 1  # the stream itself goes on


@pytest.mark.parametrize("sse", [False, True], ids=["ndjson", "sse"])
def test_client_gone_mid_stream_frees_the_instance(depth2: Daemon, via: str, sse: bool) -> None:
    headers = {"Accept": "text/event-stream"} if sse else {}
    hold = held(depth2, via, **headers)
    read = 0
    until = time.monotonic() + 0.2
    while time.monotonic() < until:  # read for a while: the stream really runs
        read += bool(hold.response().readline().strip())
    with RawInfer(depth2.client(via), {"model": "q", "prompt": "hi", **SHORT}) as next_up:
        wait_for(lambda: queue_depth(depth2) == 1, "the next request to be queued")
        hold.close()
        gone, gone_wall = time.monotonic(), time.time()
        assert next_up.status == 200
        freed_s = time.monotonic() - gone
        assert next_up.events()[-1]["type"] == "done"
    print(
        f"{via}/{'sse' if sse else 'ndjson'}: {read} lines in 0.2 s; "
        f"instance free {freed_s * 1000:.1f} ms after the hang-up"
    )
    assert freed_s < FREED_WITHIN_S, log_tail(depth2)

    def gone_records() -> list[dict[str, Any]]:
        """Hang-ups logged since ours (earlier tests' ones were logged before we began)."""
        records = log_events(depth2, "request")
        return [
            e for e in records if e.get("outcome") == "client_gone" and wall(e) >= gone_wall - 0.05
        ]

    gone_log = wait_for(gone_records, "the hang-up in the daemon's log", timeout=5.0)
    assert len(gone_log) == 1, gone_log
    assert 0 < gone_log[0]["tokens"] < HOLD["max_tokens"], gone_log


def test_queued_request_times_out_after_max_wait(short_wait: Daemon) -> None:
    client = short_wait.client()
    rejected = short_wait.status()["rejected"]["queue_timeout"]
    with held(short_wait) as hold:
        waiting = RawInfer(client, {"model": "q", "prompt": "hi", **SHORT})
        with waiting:
            status = waiting.status
            elapsed = time.monotonic() - waiting.sent_at
            resp = waiting.response()
            headers = {"retry-after": resp.getheader("Retry-After")}
            check_429(status, headers, json.loads(resp.read()), "queue_timeout")
        print(f"queue_timeout after {elapsed * 1000:.0f} ms (--max-wait-ms {MAX_WAIT_MS})")
        assert MAX_WAIT_MS / 1000 * 0.9 <= elapsed <= MAX_WAIT_MS / 1000 + 1.0
        assert short_wait.status()["rejected"]["queue_timeout"] == rejected + 1
        assert queue_depth(short_wait) == 0
        assert hold.response().readline().strip()  # the running stream was not disturbed
    # Its log line says how long it waited, though it never got a turn.
    records = log_events(short_wait, "request")
    timed_out = [e for e in records if e.get("outcome") == "queue_timeout"]
    assert timed_out[-1]["queue_ms"] >= MAX_WAIT_MS * 0.9, timed_out[-1]


def test_max_inflight_answers_overloaded_early(one_inflight: Daemon) -> None:
    client = one_inflight.client()
    with held(one_inflight):
        for model in ("other", "q"):
            started = time.monotonic()
            resp = client.infer(model=model, prompt="hi", **SHORT)
            elapsed = time.monotonic() - started
            check_429(resp.status, resp.headers, resp.json(), "overloaded")
            assert elapsed < AT_ONCE_S, elapsed
        assert queue_depth(one_inflight) == 0  # refused before queueing
        assert one_inflight.status()["rejected"]["overloaded"] == 2
    wait_for(lambda: one_inflight.status()["inflight"] == 0, "the held stream to end")
    stream_to_end(client, {"model": "other", "prompt": "hi", **SHORT})


def test_concurrent_generations_share_the_cores(model_store: ModelStore, tmp_path: Path) -> None:
    """Two models generating at once get half the decode threads each (more threads than
    cores spin against each other in llama.cpp), and a model alone gets all of them."""
    models = model_store.models_dir(tmp_path / "models", MODELS)
    with running(models, "--threads", "2", *N_CTX, "--no-spare-worker") as daemon:
        client = daemon.client()
        for model in ("q", "other"):
            stream_to_end(client, {"model": model, "prompt": "hi", **SHORT})

        def threads() -> dict[str, int]:
            return {i["model_id"]: i["threads"] for i in daemon.status()["instances"]}

        assert threads() == {"q.gguf": 2, "other.gguf": 2}
        with held(daemon) as q:
            other = {**HOLD, "model": "other"}
            with RawInfer(client, other) as hold_other:
                assert hold_other.status == 200 and hold_other.response().readline().strip()
                wait_for(lambda: threads() == {"q.gguf": 1, "other.gguf": 1}, "shares of 1")
            # q alone gets both threads back; the idle one too, for its next turn.
            wait_for(lambda: threads() == {"q.gguf": 2, "other.gguf": 2}, "all threads back")
            assert q.response().readline().strip()  # still streaming
