"""The worker process end to end: real llama.cpp on a tiny random GGUF, over the JSON-lines pipe."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import modeld
from modeld.devtools.tiny_gguf import write_tiny_llama

REPO_ROOT = Path(modeld.__file__).resolve().parent.parent  # so `-m modeld.worker` resolves
TIMEOUT_S = 20.0  # generous for a loaded CI box; a healthy worker answers in milliseconds
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
LOAD = {"op": "load", "n_ctx": 2048, "n_gpu_layers": 0, "threads": 2, "flash_attn": "auto"}


class Worker:
    """A `python -m modeld.worker` child with a line reader that never blocks the test."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modeld.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=REPO_ROOT,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any] | None:
        line = self.lines.get(timeout=TIMEOUT_S)
        if line is None:
            return None
        msg = json.loads(line)  # every stdout line must be protocol JSON
        assert isinstance(msg, dict)
        return msg

    def expect(self, ev: str) -> dict[str, Any]:
        msg = self.recv()
        assert msg is not None and msg["ev"] == ev, msg
        return msg

    def load(self, path: Path, **overrides: Any) -> dict[str, Any]:
        self.expect("hello")
        self.send({**LOAD, "n_batch": 512, "path": str(path), **overrides})
        return self.expect("loaded")

    def generate(self, rid: int, prompt: str = "hello world", **params: Any) -> dict[str, Any]:
        msg = {
            "op": "generate",
            "id": rid,
            "prompt": prompt,
            "max_tokens": 32,
            "temperature": 0.0,
            "top_p": 1.0,
            "top_k": 0,
            "seed": None,
            "stop": [],
        }
        msg.update(params)
        self.send(msg)
        return msg

    def collect(self, rid: int) -> tuple[str, list[dict[str, Any]]]:
        """Read one generation's events to its end: (joined text, all its events)."""
        events: list[dict[str, Any]] = []
        texts: list[str] = []
        while True:
            msg = self.recv()
            assert msg is not None, "worker exited mid-generation"
            assert msg["id"] == rid, msg
            events.append(msg)
            if msg["ev"] == "tokens":
                assert msg["texts"] and all(msg["texts"])
                texts.extend(msg["texts"])
            if msg["ev"] in ("done", "error"):
                return "".join(texts), events

    def wait(self) -> int:
        return self.proc.wait(timeout=TIMEOUT_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    return write_tiny_llama(path, seed=1, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def loaded(model_path: Path) -> Iterator[tuple[Worker, dict[str, Any]]]:
    worker = Worker()
    info = worker.load(model_path)
    yield worker, info
    worker.close()


@pytest.fixture
def worker(loaded: tuple[Worker, dict[str, Any]]) -> Worker:
    return loaded[0]


def test_loaded_reports_model_and_memory(loaded: tuple[Worker, dict[str, Any]]) -> None:
    _, info = loaded
    assert info["n_ctx"] == 2048
    assert info["n_ctx_train"] == 4096
    assert info["n_vocab"] > 256
    assert info["model_bytes"] > 0
    assert info["ctx_bytes"] > 0
    assert info["rss_mb"] > 0
    assert info["load_ms"] >= 0 and info["warmup_ms"] >= 0
    assert info["chat_template"] == TEMPLATE
    assert (info["bos"], info["eos"]) == ("<s>", "</s>")


def test_greedy_is_deterministic_and_reports_usage(worker: Worker) -> None:
    worker.generate(1, max_tokens=40)
    text1, events1 = worker.collect(1)
    worker.generate(2, max_tokens=40)
    text2, events2 = worker.collect(2)
    assert text1 and text1 == text2
    start, done = events1[0], events1[-1]
    assert start["ev"] == "start" and start["prompt_tokens"] > 1
    assert done["ev"] == "done"
    assert done["finish_reason"] == "length"
    assert done["prompt_tokens"] == start["prompt_tokens"]
    assert done["completion_tokens"] == 40
    assert done["ttft_ms"] >= 0 and done["gen_ms"] >= 0
    # Tokens are batched: far fewer messages than tokens (the first one goes out alone).
    assert len([e for e in events2 if e["ev"] == "tokens"]) <= 40


def test_max_tokens_is_respected(worker: Worker) -> None:
    worker.generate(3, max_tokens=5)
    _, events = worker.collect(3)
    assert events[-1]["completion_tokens"] == 5
    assert events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("seed", [1234, 0xFFFFFFFF])  # the latter is llama.cpp's "random"
def test_seeded_sampling_repeats(worker: Worker, seed: int) -> None:
    params: dict[str, Any] = {
        "temperature": 1.5,
        "top_p": 1.0,
        "top_k": 0,
        "seed": seed,
        "max_tokens": 24,
    }
    texts = []
    for rid in range(3):
        worker.generate(100 + rid, **params)
        texts.append(worker.collect(100 + rid)[0])
    assert texts[0] == texts[1] == texts[2]


def test_stop_string_ends_before_it(worker: Worker) -> None:
    worker.generate(6, max_tokens=60)
    full, _ = worker.collect(6)
    stop = full[20:24]
    cut = full.index(stop)
    worker.generate(7, max_tokens=60, stop=[stop, "\x00never"])
    text, events = worker.collect(7)
    assert text == full[:cut]
    assert events[-1]["finish_reason"] == "stop"


def test_cancel_mid_generation(worker: Worker) -> None:
    worker.generate(8, max_tokens=100_000)
    assert worker.expect("start")["id"] == 8
    first = worker.expect("tokens")
    assert first["id"] == 8
    worker.send({"op": "cancel", "id": 8})
    _, events = worker.collect(8)
    done = events[-1]
    assert done["ev"] == "done" and done["finish_reason"] == "cancelled"
    assert done["completion_tokens"] < 2048 - done["prompt_tokens"]
    # The worker is fine afterwards, and a late cancel for a finished id is ignored.
    worker.send({"op": "cancel", "id": 8})
    worker.generate(9, max_tokens=3)
    _, events = worker.collect(9)
    assert events[-1]["finish_reason"] == "length"


def test_prompt_too_long(worker: Worker) -> None:
    worker.generate(10, prompt="hello " * 3000)
    _, events = worker.collect(10)
    assert len(events) == 1
    err = events[0]
    assert err["ev"] == "error" and err["code"] == "prompt_too_long"
    assert re.fullmatch(r"prompt is \d+ tokens, the context holds 2048", err["message"])


def test_max_tokens_capped_by_context(worker: Worker) -> None:
    worker.generate(11, prompt="hello " * 500, max_tokens=100_000)
    _, events = worker.collect(11)
    done = events[-1]
    assert done["finish_reason"] == "length"
    assert done["prompt_tokens"] + done["completion_tokens"] == 2048


def test_empty_prompt_gets_bos(worker: Worker) -> None:
    worker.generate(12, prompt="", max_tokens=2)
    _, events = worker.collect(12)
    assert events[0]["prompt_tokens"] == 1
    assert events[-1]["completion_tokens"] == 2


def test_invalid_request_and_busy(worker: Worker) -> None:
    worker.generate(13, temperature=-1)
    _, events = worker.collect(13)
    assert events[0]["code"] == "invalid_request"
    worker.generate(14, max_tokens=100_000)
    worker.generate(15, max_tokens=1)
    while (msg := worker.recv()) is not None and msg["id"] == 14:  # 14 may race ahead
        assert msg["ev"] in ("start", "tokens")
    assert msg is not None and msg["id"] == 15
    assert msg["ev"] == "error" and msg["code"] == "busy"
    worker.send({"op": "cancel", "id": 14})
    while (msg := worker.recv()) is not None and msg["ev"] not in ("done", "error"):
        assert msg["id"] == 14
    assert msg is not None and msg["id"] == 14 and msg["finish_reason"] == "cancelled"


@pytest.mark.parametrize(
    ("handoff", "says"),
    [
        ({"prefix": 1, "suffix": "", "timeout_s": 1}, "prefix and suffix"),
        ({"prefix": "", "suffix": "", "timeout_s": 0}, "timeout_s"),
        ("not an object", "handoff must be an object"),
        ({"prefix": "", "suffix": "", "timeout_s": 1}, "client's socket"),  # no fd came
    ],
)
def test_a_bad_handoff_is_an_invalid_request_and_the_worker_serves_on(
    worker: Worker, handoff: object, says: str
) -> None:
    worker.generate(20, max_tokens=2, handoff=handoff)
    _, events = worker.collect(20)
    assert events == [events[0]] and events[0]["code"] == "invalid_request", events
    assert says in events[0]["message"]
    worker.generate(21, max_tokens=2)
    assert worker.collect(21)[1][-1]["ev"] == "done"


def test_shutdown_during_generation_exits_zero(model_path: Path) -> None:
    worker = Worker()
    try:
        worker.load(model_path)
        worker.generate(1, max_tokens=100_000)
        worker.expect("start")
        worker.send({"op": "shutdown"})
        assert worker.wait() == 0
    finally:
        worker.close()


def test_eof_exits_zero(model_path: Path) -> None:
    worker = Worker()
    try:
        worker.load(model_path)
        assert worker.proc.stdin is not None
        worker.proc.stdin.close()
        assert worker.wait() == 0
    finally:
        worker.close()


def test_debug_logs_never_reach_the_protocol(model_path: Path) -> None:
    worker = Worker(env={"MODELD_WORKER_DEBUG": "1"})
    try:
        worker.load(model_path)  # recv() asserts each stdout line is JSON
        worker.generate(1, max_tokens=3)
        worker.collect(1)
        worker.send({"op": "shutdown"})
        assert worker.wait() == 0
        assert worker.recv() is None
        assert b"llama" in worker.stderr
    finally:
        worker.close()


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage" * 10, b"not a model"])
def test_garbage_file_fails_to_load(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secret-dir" / "broken.gguf"
    path.parent.mkdir()
    path.write_bytes(content)
    worker = Worker()
    try:
        worker.expect("hello")
        worker.send({**LOAD, "n_batch": 512, "path": str(path)})
        msg = worker.recv()
        if msg is not None:  # a GGML abort may kill it outright; that is fine too
            assert msg["ev"] == "load_failed"
            assert "secret-dir" not in msg["message"]
        assert worker.wait() != 0
    finally:
        worker.close()


def test_missing_file_fails_to_load(tmp_path: Path) -> None:
    worker = Worker()
    try:
        worker.expect("hello")
        worker.send({**LOAD, "n_batch": 512, "path": str(tmp_path / "nope.gguf")})
        msg = worker.expect("load_failed")
        assert "nope" not in msg["message"]
        assert worker.wait() != 0
    finally:
        worker.close()


def _token_events(worker: Worker, rid: int) -> list[list[str]]:
    worker.generate(rid, max_tokens=24)
    _, events = worker.collect(rid)
    assert events[-1]["ev"] == "done" and events[-1]["completion_tokens"] == 24
    return [e["texts"] for e in events if e["ev"] == "tokens"]


def test_stream_interval_zero_sends_every_text_at_once(model_path: Path) -> None:
    worker = Worker()
    try:
        worker.load(model_path, stream_interval_ms=0)
        batches = _token_events(worker, 1)
        assert len(batches) > 1 and all(len(texts) == 1 for texts in batches)
    finally:
        worker.close()


def test_stream_interval_holds_later_texts_for_the_next_write(model_path: Path) -> None:
    # The tiny model makes 24 tokens in a few ms: the first text goes out at once, the rest
    # wait out the (long) interval and leave with `done`.
    worker = Worker()
    try:
        worker.load(model_path, stream_interval_ms=1000)
        batches = _token_events(worker, 1)
        assert len(batches) == 2 and len(batches[0]) == 1 and len(batches[1]) > 1
    finally:
        worker.close()


@pytest.mark.parametrize("value", [-1, 1001, "10", True])
def test_bad_stream_interval_fails_the_load(model_path: Path, value: object) -> None:
    worker = Worker()
    try:
        worker.expect("hello")
        worker.send({**LOAD, "n_batch": 512, "path": str(model_path), "stream_interval_ms": value})
        msg = worker.expect("load_failed")
        assert "stream_interval_ms" in msg["message"]
        assert worker.wait() != 0
    finally:
        worker.close()


# ---- in process: the abort callback during a single big prompt chunk --------------------


def test_abort_callback_stops_a_single_prompt_chunk(model_path: Path) -> None:
    from modeld.worker import engine as eng
    from modeld.worker import llama_log

    class FlipAfter(eng.CancelFlag):
        """Not cancelled for the first `n` reads, cancelled after."""

        __slots__ = ("n", "reads")

        def __init__(self, n: int) -> None:
            self.n, self.reads = n, 0

        @property
        def cancelled(self) -> bool:
            self.reads += 1
            return self.reads > self.n

        @cancelled.setter
        def cancelled(self, value: bool) -> None:
            self.n = -1 if value else self.reads

    class Events:
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def send(self, *events: dict[str, Any]) -> None:
            self.events.extend(events)

    llama_log.init_backend(debug=False)
    spec = eng.LoadSpec(str(model_path), 2048, 0, 2, "auto", 2048)
    engine, _ = eng.Engine.load(spec)
    try:
        req = eng.GenerateSpec(1, "hello " * 1000, 8, 0.0, 1.0, 0, None, ())
        # The chunk loop's check reads False once; the next read comes from the abort
        # callback inside llama_decode, then generate reads it once more to report it.
        flag, sink = FlipAfter(1), Events()
        engine.generate(req, flag, sink)
        assert flag.reads >= 3
        assert [e["ev"] for e in sink.events] == ["start", "done"]
        assert sink.events[-1]["finish_reason"] == "cancelled"
        assert sink.events[-1]["completion_tokens"] == 0
        # The KV cache was cleared: the same request now runs as on a fresh context.
        fresh, again = Events(), Events()
        engine.generate(req, eng.CancelFlag(), fresh)
        engine.generate(req, eng.CancelFlag(), again)
        assert fresh.events[-1]["finish_reason"] == "length"
        texts = ["".join(t for e in s.events for t in e.get("texts", ())) for s in (fresh, again)]
        assert texts[0] and texts[0] == texts[1]
    finally:
        engine.close()


def test_threads_op_changes_the_decode_threads_from_the_next_token(model_path: Path) -> None:
    worker = Worker()
    try:
        assert worker.load(model_path, threads=2)["threads"] == 2
        worker.generate(1)
        assert worker.collect(1)[1][-1]["threads"] == 2
        worker.send({"op": "threads", "n": 1})
        worker.generate(2)
        assert worker.collect(2)[1][-1]["threads"] == 1
        for bad in (0, -1, "2", True, 10**6):  # ignored, with a line on stderr
            worker.send({"op": "threads", "n": bad})
        worker.generate(3)
        assert worker.collect(3)[1][-1]["threads"] == 1
    finally:
        worker.close()


def test_a_prompt_under_way_goes_on_with_fewer_threads_when_its_share_drops(
    model_path: Path,
) -> None:
    """Another model starting to generate lowers this worker's threads mid-prompt: the
    prompt's decode stops at once and goes on with the new count from the micro-batches
    it finished (finishing with the old count would run more threads than cores), and
    the output is what it would have been."""
    worker = Worker(env={"MODELD_WORKER_DEBUG": "1"})  # llama.cpp's log on stderr
    # About 6,000 tokens, one chunk of several micro-batches: its decode outlasts the
    # round trip below by far, even on a busy machine.
    prompt = "hello world " * 3000
    try:
        worker.load(model_path, threads=2, n_ctx=8192, n_batch=8192)
        worker.send({"op": "threads", "n": 1})
        worker.generate(1, prompt=prompt, max_tokens=16)
        want, _ = worker.collect(1)
        worker.send({"op": "threads", "n": 2})
        worker.generate(2, prompt=prompt, max_tokens=16)
        assert worker.expect("start")["id"] == 2  # the prompt's decode begins now
        worker.send({"op": "threads", "n": 1})
        got, events = worker.collect(2)
        assert events[-1]["ev"] == "done" and events[-1]["threads"] == 1, events[-1]
        assert got == want and want
        deadline = time.monotonic() + TIMEOUT_S
        while b"failed to decode, ret = 2" not in worker.stderr:  # the decode was stopped
            assert time.monotonic() < deadline, worker.stderr[-2000:]
            time.sleep(0.05)
    finally:
        worker.close()
