"""Retry hints: when a request turned away with a 429 could come back and be served.

Estimated from recent generation times (a running average per model and over all of
them), the requests queued ahead, and how long the running one has run so far. A hint
is a guess, never a promise; it only has to be better than a constant.
"""

from __future__ import annotations

from collections.abc import Iterable

from modeld.manager.instance import Instance

DEFAULT_GEN_MS = 2000.0  # the hint before any generation has been timed
GEN_EWMA_ALPHA = 0.3  # weight of the newest generation time in the running averages


class RetryHints:
    """The running averages, and the hints computed from them."""

    def __init__(self) -> None:
        self.gen_ms: float | None = None  # over every model

    def record(self, inst: Instance, gen_ms: float) -> None:
        """A generation on inst took gen_ms."""
        inst.gen_ms = _ewma(inst.gen_ms, gen_ms)
        self.gen_ms = _ewma(self.gen_ms, gen_ms)

    def queued(self, inst: Instance, ahead: int, now: float) -> int:
        """For a request with `ahead` requests before it on inst: what is left of the
        running one, then the average for each request ahead."""
        per = self._per_request_ms(inst)
        if not inst.inflight:
            return int(per * ahead or per)
        return int(self._remaining_ms(inst, now) + per * ahead)

    def first_free(self, instances: Iterable[Instance], now: float) -> int:
        """When the first of the running generations is likely to end (for `overloaded`)."""
        remaining = [self._remaining_ms(i, now) for i in instances if i.inflight]
        return int(min(remaining)) if remaining else int(self.gen_ms or DEFAULT_GEN_MS)

    def _per_request_ms(self, inst: Instance) -> float:
        return inst.gen_ms or self.gen_ms or DEFAULT_GEN_MS

    def _remaining_ms(self, inst: Instance, now: float) -> float:
        """What is likely left of inst's running generation: the average minus the time
        it has run; one that has outlasted the average is probably a long one, so at
        least half the time it has already run."""
        per = self._per_request_ms(inst)
        elapsed_ms = (now - inst.turn_started) * 1000
        return max(per - elapsed_ms, elapsed_ms / 2, per / 10)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + GEN_EWMA_ALPHA * (new - old)
