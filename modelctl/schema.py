"""Typed, forgiving views of the daemon's JSON documents (docs/api.md).

Parsing never fails on a missing or oddly typed field: a CLI that cannot draw one column
should still draw the rest, and `--json` is there for the exact document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Below this, the first-to-last-token window is batching noise, not a decode time.
MIN_DECODE_WINDOW_MS = 10.0
MIB = 1024 * 1024  # the daemon's memory figures are MiB (docs/vram.md)


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _float(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ModelInfo:
    """One entry of `GET /models`."""

    id: str
    size_bytes: int | None
    est_vram_mb: int | None  # the GGUF estimate (a daemon's `estimate_mb` when it sends one)
    vram_mb: int | None
    state: str
    error: str | None

    @classmethod
    def from_json(cls, value: Any) -> ModelInfo:
        obj = _obj(value)
        estimate = _int(obj, "estimate_mb") if "estimate_mb" in obj else _int(obj, "est_vram_mb")
        return cls(
            id=_str(obj, "id") or _str(obj, "name") or "?",
            size_bytes=_int(obj, "size_bytes"),
            est_vram_mb=estimate,
            vram_mb=_int(obj, "vram_mb"),
            state=_str(obj, "state") or "?",
            error=_str(obj, "error"),
        )


def parse_models(document: Any) -> list[ModelInfo]:
    """The models of a `GET /models` answer."""
    models = _obj(document).get("models")
    return [ModelInfo.from_json(m) for m in models] if isinstance(models, list) else []


@dataclass(frozen=True)
class Vram:
    """The `vram` block of `GET /status`, in MB."""

    budget_mb: int | None
    margin_mb: int | None
    used_mb: int | None
    available_mb: int | None
    source: str | None


@dataclass(frozen=True)
class Instance:
    """One entry of `instances` in `GET /status`."""

    model_id: str
    state: str
    last_used: float | None
    est_vram_mb: int | None
    vram_mb: int | None
    inflight: int
    queue_depth: int
    pinned: bool
    error: str | None

    @classmethod
    def from_json(cls, value: Any) -> Instance:
        obj = _obj(value)
        return cls(
            model_id=_str(obj, "model_id") or "?",
            state=_str(obj, "state") or "?",
            last_used=_float(obj, "last_used"),
            est_vram_mb=_int(obj, "est_vram_mb"),
            vram_mb=_int(obj, "vram_mb"),
            inflight=_int(obj, "inflight") or 0,
            queue_depth=_int(obj, "queue_depth") or 0,
            pinned=obj.get("pinned") is True,
            error=_str(obj, "error"),
        )


@dataclass(frozen=True)
class Status:
    """A `GET /status` answer."""

    vram: Vram
    inflight: int
    max_inflight: int
    rejected: dict[str, int]
    cancelled: int
    instances: tuple[Instance, ...]

    @classmethod
    def from_json(cls, value: Any) -> Status:
        obj = _obj(value)
        vram = _obj(obj.get("vram"))
        rejected = _obj(obj.get("rejected"))
        instances = obj.get("instances")
        return cls(
            vram=Vram(
                budget_mb=_int(vram, "budget_mb"),
                margin_mb=_int(vram, "margin_mb"),
                used_mb=_int(vram, "used_mb"),
                available_mb=_int(vram, "available_mb"),
                source=_str(vram, "source"),
            ),
            inflight=_int(obj, "inflight") or 0,
            max_inflight=_int(obj, "max_inflight") or 0,
            rejected={k: _int(rejected, k) or 0 for k in rejected},
            cancelled=_int(obj, "cancelled") or 0,
            instances=tuple(
                Instance.from_json(i) for i in (instances if isinstance(instances, list) else [])
            ),
        )


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: the `done` event, or a `stream: false` answer."""

    model: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    queue_ms: float | None
    load_ms: float | None
    ttft_ms: float | None
    total_ms: float | None
    decode_ms: float | None = None  # first to last token, timed in the worker, when sent

    @classmethod
    def from_json(cls, value: Any) -> Outcome:
        obj = _obj(value)
        usage = _obj(obj.get("usage"))
        timings = _obj(obj.get("timings"))
        return cls(
            model=_str(obj, "model"),
            finish_reason=_str(obj, "finish_reason"),
            prompt_tokens=_int(usage, "prompt_tokens"),
            completion_tokens=_int(usage, "completion_tokens"),
            queue_ms=_float(timings, "queue_ms"),
            load_ms=_float(timings, "load_ms"),
            ttft_ms=_float(timings, "ttft_ms"),
            total_ms=_float(timings, "total_ms"),
            decode_ms=_float(timings, "decode_ms"),
        )

    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first token; None
        below 2 tokens, where there is no "after the first" to time.

        That time is the worker's `decode_ms` when the daemon sends it, else `total_ms -
        ttft_ms`. Tokens reach the daemon in batches, so for a short answer that window can
        be a few microseconds wide; then the whole generation time is used instead.
        """
        n, ttft, total = self.completion_tokens, self.ttft_ms, self.total_ms
        if n is None or n < 2:
            return None
        if self.decode_ms is not None and self.decode_ms >= MIN_DECODE_WINDOW_MS:
            return (n - 1) / (self.decode_ms / 1000)
        if ttft is None or total is None:
            return None
        if total - ttft >= MIN_DECODE_WINDOW_MS:
            return (n - 1) / ((total - ttft) / 1000)
        generation_ms = total - (self.queue_ms or 0.0) - (self.load_ms or 0.0)
        return n / (generation_ms / 1000) if generation_ms > 0 else None
