"""The admission/eviction planner: a pure function, tested synchronously."""

from __future__ import annotations

from modeld.manager.planner import Budget, InstanceView, Load, TooLarge, Wait, plan, used_mb
from modeld.manager.states import State

BUDGET = Budget(budget_mb=1000, margin_mb=100)  # 900 usable


def inst(
    mid: str,
    mb: int,
    *,
    state: State = State.READY,
    used: float = 0.0,
    busy: bool = False,
    pinned: bool = False,
) -> InstanceView:
    return InstanceView(mid, state, mb, used, busy, pinned)


def test_fits_without_eviction() -> None:
    assert plan([inst("a", 300)], BUDGET, "b", 500) == Load()


def test_margin_is_kept_free() -> None:
    # 300 + 600 = 900 fits exactly in 1000 - 100; 601 does not.
    assert plan([inst("a", 300)], BUDGET, "b", 600) == Load()
    assert plan([inst("a", 300, busy=True)], BUDGET, "b", 601) == Wait(
        "the instances that could make room are busy, loading or pinned"
    )


def test_evicts_least_recently_used_first() -> None:
    views = [inst("a", 400, used=5.0), inst("b", 400, used=1.0), inst("c", 100, used=3.0)]
    assert plan(views, BUDGET, "d", 400) == Load(("b",))


def test_evicts_only_as_many_as_needed_in_lru_order() -> None:
    views = [inst("a", 300, used=1.0), inst("b", 300, used=2.0), inst("c", 300, used=3.0)]
    assert plan(views, BUDGET, "d", 500) == Load(("a", "b"))


def test_busy_instances_are_never_evicted() -> None:
    views = [inst("a", 450, used=1.0, busy=True), inst("b", 450, used=2.0)]
    assert plan(views, BUDGET, "c", 400) == Load(("b",))
    views = [inst("a", 450, busy=True), inst("b", 450, busy=True)]
    assert isinstance(plan(views, BUDGET, "c", 400), Wait)


def test_loading_and_pinned_instances_are_never_evicted() -> None:
    views = [inst("a", 450, state=State.LOADING), inst("b", 400, pinned=True)]
    assert isinstance(plan(views, BUDGET, "c", 100), Wait)


def test_a_model_that_cannot_fit_beside_the_pinned_ones_is_refused_at_once() -> None:
    views = [inst("a", 600, pinned=True), inst("b", 100, used=1.0)]
    assert plan(views, BUDGET, "c", 301) == TooLarge(301, 300, 1000, 100)
    assert plan(views, BUDGET, "c", 300) == Load(("b",))


def test_too_large_is_rejected_with_the_numbers() -> None:
    decision = plan([], BUDGET, "huge", 901)
    assert decision == TooLarge(901, 900, 1000, 100)


def test_unloading_memory_counts_until_freed_and_is_not_evicted_twice() -> None:
    views = [inst("a", 600, state=State.UNLOADING), inst("b", 300, used=1.0)]
    # 600 is being freed: enough for the request, so wait instead of evicting b too.
    assert plan(views, BUDGET, "c", 500) == Wait("waiting for an unload to finish")
    assert used_mb(views) == 900


def test_error_and_unloaded_instances_hold_no_memory() -> None:
    views = [inst("a", 800, state=State.ERROR), inst("b", 800, state=State.UNLOADED)]
    assert plan(views, BUDGET, "c", 900) == Load()


def test_the_requested_models_own_entry_is_ignored() -> None:
    views = [inst("c", 500, state=State.UNLOADED), inst("a", 500, used=1.0)]
    assert plan(views, BUDGET, "c", 500) == Load(("a",))


def test_busy_instances_queued_after_a_cold_request_are_drained_for_it() -> None:
    from modeld.manager.planner import to_drain

    a = InstanceView("a", State.READY, 800, 1.0, busy=True, queued_since=5.0)
    # b arrived at 3.0, before a's oldest waiter: a must stop taking turns and go.
    assert to_drain([a], BUDGET, "b", 400, since=3.0) == ("a",)
    # b arrived after a's oldest waiter: a serves its queue first.
    assert to_drain([a], BUDGET, "b", 400, since=7.0) == ()
    pinned = InstanceView("a", State.READY, 800, 1.0, busy=True, pinned=True)
    assert to_drain([pinned], BUDGET, "b", 50, since=3.0) == ()
