"""The seam between the manager and whatever runs models: a Protocol, and the messages.

The real backend runs each model in a worker process (`modeld.worker.client`); unit
tests plug in a scripted fake. A generation is read as a stream of small frozen events.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from modeld.errors import ModeldError

encode_string = json.encoder.encode_basestring  # a JSON string literal, in C


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters of one generation, already validated."""

    prompt: str
    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # A chat: the worker renders these with the model's template into the prompt.
    messages: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True)
class Started:
    """The prompt was accepted and is being processed: the status line can go out."""

    prompt_tokens: int


@dataclass(frozen=True)
class Tokens:
    """One batch of generated text pieces, in order."""

    texts: tuple[str, ...]


LostReason = Literal["gone", "stalled", "torn"]  # why a client could not be written to


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    decode_ms: float = 0.0  # first token to last, timed in the worker
    # A handed-off generation (see `Handoff`) whose client could not be written to:
    # gone, stalled or torn (cut halfway through a write). The response cannot be ended.
    lost: LostReason | None = None
    first_at: float | None = None  # when the first token was made (time.monotonic)


@dataclass(frozen=True)
class Failed:
    error: ModeldError


GenEvent = Started | Tokens | Finished | Failed


@dataclass(frozen=True)
class Handoff:
    """Where a handed-off generation writes its response: the client's socket, framed.

    Once the prompt is accepted the worker writes `preamble` (the response's head and
    first body bytes, exactly as the daemon will start it), then says `Started`. Each
    text event on the wire is `prefix` + the text as a JSON string + `suffix` (with
    `join`, one event per write carrying the texts joined); `chunked` wraps each write in
    an HTTP/1.1 chunk. `fd` stays the caller's: the worker gets a copy.
    """

    fd: int
    prefix: str
    suffix: str
    join: bool
    chunked: bool
    timeout_s: float  # a write the client does not take this long: it is lost
    preamble: bytes = b""


def text_events(prefix: str, suffix: str, join: bool, texts: Sequence[str]) -> bytes:
    """The body bytes of a batch of texts framed as a `Handoff` says (before any HTTP
    chunking): the daemon forwarding them and a worker writing them make the same bytes."""
    if join:
        return (prefix + encode_string("".join(texts)) + suffix).encode()
    return "".join([prefix + encode_string(t) + suffix for t in texts]).encode()


class Generation(Protocol):
    """One running generation; `next()` returns events until Finished or Failed."""

    @property
    def ending(self) -> Finished | Failed | None:
        """The event that ended it, also when nobody read it (a cancelled generation,
        once its `generate` context has exited)."""
        ...

    async def next(self) -> GenEvent: ...


@dataclass(frozen=True)
class LoadedInfo:
    """What a load measured about the instance."""

    vram_mb: int  # memory the instance really takes (NVML on a GPU; see Engine.load on a CPU)
    n_ctx: int
    n_ctx_train: int = 0
    load_ms: float = 0.0
    chat_template: str | None = None
    threads: int = 0  # decode threads when it generates alone (0: unknown, never changed)
    extra: dict[str, object] = field(default_factory=dict)


class LoadedModel(Protocol):
    """A model resident in memory, ready to generate one request at a time."""

    info: LoadedInfo

    def generate(
        self, params: GenParams, *, handoff: Handoff | None = None
    ) -> AbstractAsyncContextManager[Generation]:
        """Start a generation; leaving the context cancels it if it has not ended.

        With `handoff`, the response goes onto that socket (no `Tokens` events).
        """
        ...

    async def set_threads(self, n: int) -> None:
        """Decode with n threads from the next token on (the share of the cores it gets)."""
        ...

    async def close(self, error: ModeldError) -> None:
        """Unload: end a running generation with `error`, stop and reap the worker."""
        ...


ExitCallback = Callable[[str], None]


class Backend(Protocol):
    async def load(self, spec_path: str, model_id: str, on_exit: ExitCallback) -> LoadedModel:
        """Load a model; raise ModelLoadFailed with a reason free of paths when it fails.

        `on_exit(reason)` is called if the model's worker later dies on its own.
        """
        ...

    async def aclose(self) -> None:
        """Release anything the backend holds (spare workers)."""
        ...
