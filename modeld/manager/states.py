"""Instance states and the only transitions allowed between them.

Everything that changes an instance's state goes through `transition()`; an illegal
transition is a bug in modeld, never a client error, so it raises `IllegalTransition`.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    ERROR = "error"


# The whole state machine. A worker that dies while ready goes READY -> UNLOADING ->
# UNLOADED like any other unload, so that the memory is released before it is reused.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNLOADED: frozenset({State.LOADING}),
    State.LOADING: frozenset({State.READY, State.ERROR}),
    State.READY: frozenset({State.UNLOADING}),
    State.UNLOADING: frozenset({State.UNLOADED}),
    State.ERROR: frozenset({State.LOADING, State.UNLOADED}),
}

# States in which an instance holds (or is about to hold) memory.
RESIDENT: frozenset[State] = frozenset({State.LOADING, State.READY, State.UNLOADING})


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in modeld."""


def transition(old: State, new: State) -> State:
    """Return `new` when `old -> new` is allowed, else raise IllegalTransition."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"illegal instance transition {old} -> {new}")
    return new
