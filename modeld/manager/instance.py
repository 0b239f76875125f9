"""The manager's mutable records: an instance, a waiting request, a granted turn.

Also what the planner sees of them (`planner_views()`), so that the manager and the
lifecycle count memory the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import anyio

from modeld.errors import ModeldError
from modeld.manager.backend import Generation, GenParams, Handoff, LoadedModel
from modeld.manager.planner import InstanceView
from modeld.manager.states import State, transition
from modeld.registry import ModelSpec


@dataclass(eq=False)
class Waiter:
    """One request waiting for its turn on an instance."""

    enqueued_at: float
    event: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False
    error: ModeldError | None = None
    load_ms: float = 0.0


@dataclass(eq=False)
class Instance:
    spec: ModelSpec
    pinned: bool = False
    state: State = State.UNLOADED
    handle: LoadedModel | None = None
    queue: deque[Waiter] = field(default_factory=deque)
    inflight: int = 0
    last_used: float = 0.0  # monotonic, for LRU
    last_used_wall: float | None = None
    vram_mb: int | None = None  # measured after a load
    loads: int = 0
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    gen_ms: float | None = None  # running average of generation times
    turn_started: float = 0.0  # when the running request got its turn
    threads: int | None = None  # decode threads its worker is to use (None: its own choice)
    threads_pushing: bool = False  # a task is telling the worker `threads`
    load_done: anyio.Event | None = None  # set when the load under way ends
    # The file changed or went away while loaded: unload once idle, then use `next_spec`.
    stale: str | None = None
    next_spec: ModelSpec | None = None

    @property
    def model_id(self) -> str:
        return self.spec.id

    @property
    def effective_mb(self) -> int:
        return self.vram_mb if self.vram_mb is not None else self.spec.est_vram_mb

    def move(self, new: State) -> None:
        self.state = transition(self.state, new)

    def fail_waiters(self, error: ModeldError) -> None:
        """End every queued request with `error`."""
        while self.queue:
            waiter = self.queue.popleft()
            waiter.error = error
            waiter.event.set()
        if self.load_done is not None:  # waiters parked on a load in progress must see it
            self.load_done.set()
            self.load_done = anyio.Event()  # later waiters wait for the load itself


@dataclass
class Lease:
    """The right to run one generation on a ready instance."""

    instance: Instance
    model: LoadedModel  # taken when the turn was granted: an unload later cannot pull it away
    queue_ms: float
    load_ms: float
    generated: bool = False  # a generation ran: its time feeds the retry estimates

    def generate(
        self, params: GenParams, *, handoff: Handoff | None = None
    ) -> AbstractAsyncContextManager[Generation]:
        self.generated = True
        return self.model.generate(params, handoff=handoff)


def planner_views(
    instances: Iterable[Instance], held: Container[str] = frozenset()
) -> list[InstanceView]:
    """What the planner sees of `instances`; a `held` one's queue does not make it busy."""
    return [
        InstanceView(
            model_id=i.model_id,
            state=i.state,
            vram_mb=i.effective_mb,
            last_used=i.last_used,
            busy=i.inflight > 0 or (bool(i.queue) and i.model_id not in held),
            pinned=i.pinned,
            queued_since=i.queue[0].enqueued_at if i.queue else None,
        )
        for i in instances
    ]
