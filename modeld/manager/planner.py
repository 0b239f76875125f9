"""Admission and eviction as a pure function: plan(instances, budget, request) -> Decision.

No I/O, no clock, no event loop: the async manager gathers a snapshot, asks `plan()`,
and carries out what it says. Memory of an instance counts from the moment its load
starts until its unload has finished (the worker is gone and its memory released).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from modeld.manager.states import RESIDENT, State


@dataclass(frozen=True)
class InstanceView:
    """What the planner needs to know of one instance."""

    model_id: str
    state: State
    vram_mb: int  # measured figure when known, else the estimate
    last_used: float  # monotonic seconds; 0 for never used
    busy: bool  # generating, or requests are queued for it
    pinned: bool = False
    queued_since: float | None = None  # when its oldest waiting request arrived


@dataclass(frozen=True)
class Budget:
    budget_mb: int
    margin_mb: int

    @property
    def usable_mb(self) -> int:
        return self.budget_mb - self.margin_mb


@dataclass(frozen=True)
class Load:
    """Room is there (after `evict` are unloaded, if any): go ahead."""

    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    """No room yet: the instances that could make room are busy or still unloading."""

    reason: str


@dataclass(frozen=True)
class TooLarge:
    """The model alone does not fit in budget - margin: it never will."""

    need_mb: int
    usable_mb: int
    budget_mb: int
    margin_mb: int


Decision = Load | Wait | TooLarge


def used_mb(instances: Sequence[InstanceView]) -> int:
    """Memory held by every instance that is loading, ready or unloading."""
    return sum(i.vram_mb for i in instances if i.state in RESIDENT)


def plan(
    instances: Sequence[InstanceView], budget: Budget, model_id: str, need_mb: int
) -> Decision:
    """Decide how to make room for `need_mb` for `model_id`.

    Evicts least-recently-used idle, unpinned, ready instances, only as many as needed.
    Memory that unloads already under way will free counts as coming, so two calls in a
    row never evict twice for the same load.
    """
    if need_mb > budget.usable_mb:
        return TooLarge(need_mb, budget.usable_mb, budget.budget_mb, budget.margin_mb)
    others = [i for i in instances if i.model_id != model_id]
    pinned = sum(i.vram_mb for i in others if i.pinned and i.state in RESIDENT)
    if need_mb > budget.usable_mb - pinned:  # pinned instances never leave: it never fits
        return TooLarge(need_mb, budget.usable_mb - pinned, budget.budget_mb, budget.margin_mb)
    free = budget.usable_mb - used_mb(others)
    if need_mb <= free:
        return Load()
    coming = sum(i.vram_mb for i in others if i.state is State.UNLOADING)
    if need_mb <= free + coming:
        return Wait("waiting for an unload to finish")
    candidates = sorted(
        (i for i in others if i.state is State.READY and not i.busy and not i.pinned),
        key=lambda i: (i.last_used, i.model_id),
    )
    evict: list[str] = []
    room = free + coming
    for cand in candidates:
        if room >= need_mb:
            break
        evict.append(cand.model_id)
        room += cand.vram_mb
    if room >= need_mb:
        return Load(tuple(evict))
    return Wait("the instances that could make room are busy, loading or pinned")


def to_drain(
    instances: Sequence[InstanceView], budget: Budget, model_id: str, need_mb: int, since: float
) -> tuple[str, ...]:
    """Busy instances a cold request that arrived at `since` needs evicted.

    They would be evictable if they stopped taking requests that came after this one;
    the manager then grants them no new turns, so a model whose queue never empties
    cannot starve a request for a model that needs its memory.
    """
    views = [
        replace(i, busy=False)
        if i.state is State.READY and (i.queued_since is None or i.queued_since > since)
        else i
        for i in instances
    ]
    decision = plan(views, budget, model_id, need_mb)
    return decision.evict if isinstance(decision, Load) else ()
