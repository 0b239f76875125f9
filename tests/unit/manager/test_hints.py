"""Retry hints from recent generation times, the queue ahead and the running request."""

from __future__ import annotations

from modeld.manager.hints import DEFAULT_GEN_MS, RetryHints
from modeld.manager.instance import Instance
from tests.unit.manager.fakes import spec


def running_since(started: float, model: str = "a") -> Instance:
    inst = Instance(spec(model, 100))
    inst.inflight, inst.turn_started = 1, started
    return inst


def test_before_any_generation_the_default_per_request() -> None:
    hints = RetryHints()
    idle = Instance(spec("a", 100))
    assert hints.queued(idle, 0, now=0.0) == DEFAULT_GEN_MS
    assert hints.queued(idle, 3, now=0.0) == 3 * DEFAULT_GEN_MS
    assert hints.first_free([idle], now=0.0) == DEFAULT_GEN_MS


def test_averages_follow_recent_generations() -> None:
    hints = RetryHints()
    inst = Instance(spec("a", 100))
    hints.record(inst, 1000.0)
    assert inst.gen_ms == hints.gen_ms == 1000.0
    hints.record(inst, 2000.0)
    assert inst.gen_ms == 1300.0  # the newest counts for 0.3


def test_what_is_left_of_the_running_request_then_each_one_ahead() -> None:
    hints = RetryHints()
    inst = running_since(10.0)
    hints.record(inst, 1000.0)
    assert abs(hints.queued(inst, 2, now=10.4) - (600 + 2 * 1000)) <= 1
    # Past the average it is a long one: at least half its age is still to come.
    assert hints.queued(inst, 0, now=16.0) == 3000


def test_overloaded_waits_for_the_first_running_one_to_end() -> None:
    hints = RetryHints()
    a, b = running_since(0.0, "a"), running_since(0.5, "b")
    hints.record(a, 1000.0)
    hints.record(b, 1000.0)
    assert hints.first_free([a, b], now=0.6) == 400  # a has 400 ms left, b 900
