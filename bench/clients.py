"""One streamed completion against each kind of system, timed the same way for all.

Every call returns a `Sample`: when the request was sent, when the first and the last
token text arrived, how many tokens were generated and the text. Time to first token is
`t_first - t_send`; decode speed is `(n_tokens - 1) / (t_last - t_first)`, so the prompt
never counts against decoding. A system that sends its first token at once and batches the
rest gains a little in that figure when the first token is late, so `e2e_tok_s`
(`n_tokens / (t_last - t_send)`, which no batching can flatter) is reported beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.wire import Conn, Endpoint, WireError, lines

READY_TIMEOUT_S = 300.0  # loading two models in a busy child process


@dataclass(frozen=True)
class Sample:
    """One timed streamed completion."""

    t_send: float
    t_first: float
    t_last: float
    n_tokens: int
    text: str
    prompt_tokens: int | None = None

    @property
    def ttft_ms(self) -> float:
        return (self.t_first - self.t_send) * 1000.0

    @property
    def total_s(self) -> float:
        return self.t_last - self.t_send

    @property
    def e2e_tok_s(self) -> float:
        """Tokens per second of the whole request, send to last token (prompt included)."""
        return self.n_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        span = self.t_last - self.t_first
        return (self.n_tokens - 1) / span if span > 0 and self.n_tokens > 1 else 0.0


class BenchError(RuntimeError):
    """A request failed (bad status, error event, too few tokens)."""


def modeld_stream(ep: Endpoint, model: str, prompt: str, max_tokens: int) -> Sample:
    """POST /infer with stream: ndjson `token` events, then `done` with the usage."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    with Conn(ep) as conn:
        t_send, head = conn.request("POST", "/infer", body)
        if head.status != 200:
            raise BenchError(f"modeld /infer {head.status}: {conn.read_body(head)[:300]!r}")
        times: list[float] = []
        texts: list[str] = []
        done: dict[str, Any] = {}
        for t, line in lines(conn.body(head)):
            if not line:
                continue
            ev = json.loads(line)
            if ev["type"] == "token":
                times.append(t)
                texts.append(ev["text"])
            elif ev["type"] == "done":
                done = ev
            else:
                raise BenchError(f"modeld error event: {ev}")
    if not times or not done:
        raise BenchError("modeld stream ended without tokens or done")
    usage = done["usage"]
    return Sample(
        t_send,
        times[0],
        times[-1],
        usage["completion_tokens"],
        "".join(texts),
        usage["prompt_tokens"],
    )


def _sse_data(pieces: Any) -> Any:
    """Yield (time, parsed JSON) for every `data:` line of an SSE body."""
    for t, line in lines(pieces):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                yield t, json.loads(payload)


def llama_server_stream(ep: Endpoint, model: str | None, prompt: str, max_tokens: int) -> Sample:
    """llama-server's native /completion with stream: one SSE event per token."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "cache_prompt": False,
        "stream": True,
    }
    if model is not None:
        body["model"] = model
    with Conn(ep) as conn:
        t_send, head = conn.request("POST", "/completion", body)
        if head.status != 200:
            raise BenchError(f"llama-server {head.status}: {conn.read_body(head)[:300]!r}")
        times: list[float] = []
        texts: list[str] = []
        final: dict[str, Any] = {}
        for t, ev in _sse_data(conn.body(head)):
            if ev.get("content"):
                times.append(t)
                texts.append(ev["content"])
            if ev.get("stop"):
                final = ev
    if not times:
        raise BenchError("llama-server stream ended without tokens")
    n = int(final.get("tokens_predicted") or len(times))
    prompt_n = final.get("timings", {}).get("prompt_n")
    return Sample(t_send, times[0], times[-1], n, "".join(texts), prompt_n)


def lcp_server_stream(ep: Endpoint, model: str, prompt: str, max_tokens: int) -> Sample:
    """llama_cpp.server's OpenAI /v1/completions with stream: one SSE chunk per token."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "stream": True,
    }
    with Conn(ep) as conn:
        t_send, head = conn.request("POST", "/v1/completions", body)
        if head.status != 200:
            raise BenchError(f"llama_cpp.server {head.status}: {conn.read_body(head)[:300]!r}")
        times: list[float] = []
        texts: list[str] = []
        for t, ev in _sse_data(conn.body(head)):
            text = ev["choices"][0].get("text") or ""
            if text:
                times.append(t)
                texts.append(text)
    if not times:
        raise BenchError("llama_cpp.server stream ended without tokens")
    return Sample(t_send, times[0], times[-1], len(times), "".join(texts))


class Inproc:
    """A `python -m bench.inproc` child holding the models; one request per call."""

    def __init__(self, kind: str, models: dict[str, Path], log_path: Path) -> None:
        cmd = [sys.executable, "-m", "bench.inproc", kind]
        cmd += [f"--model={name}={path}" for name, path in models.items()]
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self.load_s = float(self._read().get("load_s", 0.0))

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"bench.inproc exited with {self.proc.poll()}")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise BenchError(f"bench.inproc: {result['error']}")
        return result

    def stream(self, model: str, prompt: str, max_tokens: int) -> Sample:
        """Run one generation in the child and return its timings."""
        assert self.proc.stdin is not None
        req = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return Sample(
            r["t_send"], r["t_first"], r["t_last"], r["n_tokens"], r["text"], r.get("prompt_tokens")
        )

    def close(self) -> None:
        """Close stdin (the child exits) and wait; kill if it lingers."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> Inproc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BenchError",
    "Inproc",
    "Sample",
    "WireError",
    "lcp_server_stream",
    "llama_server_stream",
    "modeld_stream",
]
