"""The `load` and `generate` ops of the worker protocol, checked into specs.

Each function raises ValueError saying what is wrong; the worker answers with it (a
bad `generate` is an `invalid_request` event, a bad `load` a `load_failed`).
"""

from __future__ import annotations

import os
from typing import Any

from modeld.worker.chat import parse_messages
from modeld.worker.engine import FLASH_ATTN, STREAM_INTERVAL_S, GenerateSpec, LoadSpec

__all__ = ["parse_generate", "parse_load", "physical_cores"]


def _int(obj: dict[str, Any], key: str, *, low: int | None = None) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer")
    if low is not None and value < low:
        raise ValueError(f"{key} must be >= {low}")
    return value


def _float(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{key} must be a number")
    return float(value)


def physical_cores() -> int:
    """Cores this process may run on, counting hyperthread siblings once (as llama.cpp does).

    Two threads on one core's siblings slow llama.cpp's matrix work down, not up.
    """
    allowed = os.sched_getaffinity(0)
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            blocks = f.read().split("\n\n")
    except OSError:
        return len(allowed)
    for block in blocks:
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines())
        )
        cpu = fields.get("processor")
        if cpu is not None and cpu.isdigit() and int(cpu) in allowed:
            cores.add((fields.get("physical id", "0"), fields.get("core id", cpu)))
    return len(cores) or len(allowed)


def parse_load(obj: dict[str, Any]) -> LoadSpec:
    """Validate a `load` op (ValueError says what is wrong)."""

    path = obj.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty string")
    flash = obj.get("flash_attn", "auto")
    if flash not in FLASH_ATTN:
        raise ValueError("flash_attn must be on, off or auto")
    return LoadSpec(
        path=path,
        n_ctx=_int(obj, "n_ctx", low=0),
        n_gpu_layers=_int(obj, "n_gpu_layers"),
        threads=_int(obj, "threads", low=0) or physical_cores(),
        flash_attn=flash,
        n_batch=_int(obj, "n_batch", low=1),
        stream_interval_s=_stream_interval_s(obj),
    )


def _stream_interval_s(obj: dict[str, Any]) -> float:
    """`stream_interval_ms` (optional) in seconds."""
    if "stream_interval_ms" not in obj:
        return STREAM_INTERVAL_S
    value = _float(obj, "stream_interval_ms")
    if not 0.0 <= value <= 1000.0:
        raise ValueError("stream_interval_ms must be in [0, 1000]")
    return value / 1000.0


def parse_generate(obj: dict[str, Any]) -> GenerateSpec:
    """Validate a `generate` op (ValueError says what is wrong)."""

    messages = parse_messages(obj["messages"]) if "messages" in obj else None
    prompt = obj.get("prompt", "" if messages is not None else None)
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    stop = obj.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a list of strings")
    seed = obj.get("seed")
    if seed is not None:
        seed = _int(obj, "seed", low=0)
    temperature, top_p = _float(obj, "temperature"), _float(obj, "top_p")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    return GenerateSpec(
        id=_int(obj, "id"),
        prompt=prompt,
        max_tokens=_int(obj, "max_tokens", low=1),
        temperature=temperature,
        top_p=top_p,
        top_k=_int(obj, "top_k", low=0),
        seed=seed,
        stop=tuple(stop),
        messages=messages,
    )
