"""llama-cpp-python called in-process, run as a child of the bench: `python -m bench.inproc`.

Two loops, each a baseline for modeld:

* ``low``: modeld's own `Engine` (llama_decode + the C sampler chain through the low-level
  ctypes API), called directly: the ceiling, with no daemon, no worker pipe and no HTTP.
* ``high``: `Llama.create_completion(stream=True)`, the high-level API most code uses.

The child loads every model named on its command line, then answers one JSON line on its
stdout for each JSON request line on stdin, so the bench can interleave its repetitions
with the servers'. It runs in its own process so its threads and memory leave with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

# Like modeld's worker: results go to a private copy of stdout, stray C output to stderr.
_OUT_FD = os.dup(1)
os.dup2(2, 1)


def _engine_kind(paths: dict[str, str], threads: int, n_ctx: int) -> Any:
    """A runner for the low-level loop (modeld's Engine)."""
    from modeld.worker.engine import CancelFlag, Engine, GenerateSpec, LoadSpec
    from modeld.worker.llama_log import init_backend

    init_backend(debug=False)
    engines = {}
    for name, path in paths.items():
        spec = LoadSpec(path, n_ctx, 0, threads, "off", 512)
        engines[name] = Engine.load(spec)[0]

    class Sink:
        """Records when each batch of texts arrives."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.texts: list[str] = []
            self.done: dict[str, Any] = {}

        def send(self, *events: dict[str, Any]) -> None:
            t = time.perf_counter()
            for ev in events:
                if ev["ev"] == "tokens":
                    self.times.append(t)
                    self.texts.extend(ev["texts"])
                elif ev["ev"] in ("done", "error"):
                    self.done = ev

    def run(req: dict[str, Any]) -> dict[str, Any]:
        sink = Sink()
        gen = GenerateSpec(0, req["prompt"], req["max_tokens"], 0.0, 1.0, 0, None, ())
        t0 = time.perf_counter()
        engines[req["model"]].generate(gen, CancelFlag(), sink)
        if sink.done.get("ev") != "done" or not sink.times:
            return {"error": str(sink.done)}
        return {
            "t_send": t0,
            "t_first": sink.times[0],
            "t_last": sink.times[-1],
            "n_tokens": sink.done["completion_tokens"],
            "prompt_tokens": sink.done["prompt_tokens"],
            "text": "".join(sink.texts),
        }

    return run


def _llama_kind(paths: dict[str, str], threads: int, n_ctx: int) -> Any:
    """A runner for the high-level streaming API."""
    from llama_cpp import Llama

    llms = {
        name: Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            flash_attn=False,
            verbose=False,
        )
        for name, path in paths.items()
    }

    def run(req: dict[str, Any]) -> dict[str, Any]:
        llm = llms[req["model"]]
        # No prefix reuse from the previous request: every system decodes the whole prompt.
        llm.reset()  # type: ignore[no-untyped-call]
        times: list[float] = []
        texts: list[str] = []
        t0 = time.perf_counter()
        chunks = llm.create_completion(
            req["prompt"],
            max_tokens=req["max_tokens"],
            temperature=0.0,
            repeat_penalty=1.0,
            stream=True,
        )
        for chunk in chunks:
            text = chunk["choices"][0]["text"]  # type: ignore[index]
            if text:
                times.append(time.perf_counter())
                texts.append(text)
        if not times:
            return {"error": "no tokens"}
        return {
            "t_send": t0,
            "t_first": times[0],
            "t_last": times[-1],
            "n_tokens": len(times),
            "text": "".join(texts),
        }

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Load the models, say ready, then answer requests until stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    ap.add_argument("kind", choices=["low", "high"])
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args(argv)
    paths = dict(m.split("=", 1) for m in args.model)
    t0 = time.perf_counter()
    make = _engine_kind if args.kind == "low" else _llama_kind
    run = make(paths, args.threads, args.n_ctx)
    out = os.fdopen(_OUT_FD, "w", buffering=1)
    out.write(json.dumps({"ready": True, "load_s": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        if line.strip():
            try:
                result = run(json.loads(line))
            except Exception as exc:  # reported to the bench, which records it and goes on
                result = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
