"""The events a worker writes to end a generation.

Shared by the engine (which runs generations) and the worker's main loop (which answers
the requests it cannot start); both write the same shapes, see `modeld.worker.main`.
"""

from __future__ import annotations

from typing import Any


def done_event(
    rid: int, reason: str, n_prompt: int, n_gen: int, ttft_ms: float, gen_ms: float
) -> dict[str, Any]:
    """A `done` event: ttft_ms from receiving the request to the first text, gen_ms after it."""
    return {
        "ev": "done",
        "id": rid,
        "finish_reason": reason,
        "prompt_tokens": n_prompt,
        "completion_tokens": n_gen,
        "ttft_ms": round(ttft_ms, 3),
        "gen_ms": round(gen_ms, 3),
    }


def error_event(rid: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """An `error` event ending a generate (`param`: the request field at fault)."""
    event: dict[str, Any] = {"ev": "error", "id": rid, "code": code, "message": message}
    if param is not None:
        event["param"] = param
    return event
