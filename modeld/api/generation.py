"""The one request path every generating endpoint shares (`/infer` and the OpenAI ones).

`track_request` keeps a request's `Outcome` (its log line and the `/status` counters);
`run_generation` takes a turn from the manager (loading the model if needed), runs one
generation and hands its events to a `GenerationSink`. The status line is decided when
generation starts (the worker's `Started` event): everything that fails before it is a
plain error response with its own status; after it, the stream ends with an error event.
`ResponderSink` is what the endpoints' sinks share, the handoff of a stream included (the
worker writes the response itself: see `modeld.worker.output`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import NoReturn, Protocol

import anyio

from modeld.errors import ModeldError, PromptTooLong
from modeld.http.protocol import Request
from modeld.http.server import ClientGone, Responder
from modeld.manager.backend import (
    Failed,
    Finished,
    Generation,
    GenParams,
    Handoff,
    LoadedInfo,
    LostReason,
    Started,
    Tokens,
    text_events,
)
from modeld.manager.manager import Manager
from modeld.registry import ModelSpec

log = logging.getLogger("modeld.request")


def named_model(request: Request) -> str | None:
    """The `model` a request body names, if it is a JSON object with a string there."""
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Outcome:
    """What happened to one request, for its log line."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.model: str | None = None
        self.how = "ok"
        self.queue_ms = 0.0
        self.load_ms = 0.0
        self.ttft_ms: float | None = None
        self.decode_ms: float | None = None  # the worker's figure, when it finished
        self.first_token_at: float | None = None  # monotonic, when tokens reached the daemon
        self.last_token_at: float | None = None
        self.tokens = 0
        self.handoff: bool | None = None  # whether the worker wrote the text to the client
        self.ended = False  # the worker's figures of the end are in (`finished`)

    def tokens_arrived(self, count: int) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self.ttft_ms = _ms(now - self.request.received_at)
        self.last_token_at = now
        self.tokens += count

    def finished(self, event: Finished) -> None:
        """The worker's figures of a generation that ended. A handed-off one's text went
        straight to the client, so when its tokens came is the worker's to say."""
        if self.ended:
            return
        self.ended = True
        self.tokens = event.completion_tokens
        if event.finish_reason != "cancelled":
            self.decode_ms = round(event.decode_ms, 2)
        if self.first_token_at is None and event.first_at is not None:
            self.first_token_at = event.first_at
            self.last_token_at = event.first_at + event.decode_ms / 1000
            self.ttft_ms = _ms(event.first_at - self.request.received_at)

    def decode_time_ms(self) -> float | None:
        """First to last token: the worker's figure for a finished generation, else (cut
        short by a hang-up, an unload, a shutdown) as the daemon saw the tokens arrive;
        None when no token was made."""
        if self.decode_ms is not None:
            return self.decode_ms
        if self.first_token_at is None or self.last_token_at is None:
            return None
        return _ms(self.last_token_at - self.first_token_at)

    def timings(self) -> dict[str, float]:
        """The `timings` object of a finished request."""
        total_ms = _ms(time.monotonic() - self.request.received_at)
        timings = {
            "queue_ms": self.queue_ms,
            "load_ms": self.load_ms,
            "ttft_ms": self.ttft_ms if self.ttft_ms is not None else total_ms,
            "total_ms": total_ms,
        }
        if self.decode_ms is not None:
            timings["decode_ms"] = self.decode_ms
        return timings

    def log(self, status: int) -> None:
        total_ms = _ms(time.monotonic() - self.request.received_at)
        log.info(
            "%s %s %s %s",
            self.request.method,
            self.request.path,
            status,
            self.how,
            extra={
                "fields": {
                    "event": "request",
                    "method": self.request.method,
                    "path": self.request.path,
                    "model": self.model,
                    "status": status,
                    "queue_ms": self.queue_ms,
                    "load_ms": self.load_ms,
                    "ttft_ms": self.ttft_ms,
                    "tokens": self.tokens,
                    "total_ms": total_ms,
                    "decode_ms": self.decode_time_ms(),
                    "handoff": self.handoff,
                    "outcome": self.how,
                }
            },
        )


@asynccontextmanager
async def track_request(
    request: Request, res: Responder, manager: Manager
) -> AsyncIterator[Outcome]:
    """Yield the request's Outcome; count a client that left and log one line at the end."""
    outcome = Outcome(request)
    error_status = 0
    try:
        yield outcome
    except ModeldError as exc:
        outcome.how = exc.code
        error_status = exc.http_status
        if outcome.model is None:  # refused before the model was resolved
            outcome.model = named_model(request)
        raise
    except anyio.get_cancelled_exc_class():
        if res.client_gone:
            outcome.how = "client_gone"
            manager.note_cancelled()
        raise
    except ClientGone:
        outcome.how = "client_gone"
        manager.note_cancelled()
        raise
    finally:
        status = res.status or error_status or (499 if res.client_gone else 0)
        with anyio.CancelScope(shield=True):
            outcome.log(status)


class GenerationSink(Protocol):
    """Where one generation's events go once the worker has accepted the prompt."""

    @property
    def wants_handoff(self) -> bool:
        """Whether the worker should write the text straight to the client (`handoff`)."""
        ...

    async def started(self, event: Started) -> None:
        """The status line can go out now."""
        ...

    @property
    def handed_off(self) -> bool:
        """Whether `hand_off_target` gave a target (the worker writes the response)."""
        ...

    def hand_off_target(self) -> Handoff | None:
        """When `wants_handoff`, before the generation starts: where and how the worker
        writes the response (its head included); None when it cannot (the daemon then
        writes it, with the text from `tokens`)."""
        ...

    async def tokens(self, texts: tuple[str, ...]) -> None: ...

    def lost(self, reason: LostReason) -> NoReturn:
        """The worker could not write to the client (`Finished.lost`): raise ClientGone."""
        ...

    async def finished(self, event: Finished) -> None: ...

    async def failed(self, error: ModeldError) -> None:
        """The generation failed after `started`; raise to turn it into an error response."""
        ...


ParamsFor = Callable[[LoadedInfo], Awaitable[GenParams]]


async def run_generation(
    manager: Manager,
    spec: ModelSpec,
    params: GenParams | ParamsFor,
    sink: GenerationSink,
    outcome: Outcome,
) -> None:
    """Take a turn on `spec` (loading it if needed), run one generation, feed `sink`.

    `params` may be a function of the loaded model's facts (a chat prompt needs the
    model's template). Anything raised before `sink.started` is a plain error response.
    """
    prompt_field = "prompt" if isinstance(params, GenParams) else "messages"
    waiting_since = time.monotonic()
    granted = False
    try:
        async with manager.acquire(spec) as lease:
            granted = True
            outcome.queue_ms, outcome.load_ms = round(lease.queue_ms, 2), round(lease.load_ms, 2)
            if not isinstance(params, GenParams):
                params = await params(lease.model.info)
            gen: Generation | None = None
            try:
                handoff = sink.hand_off_target() if sink.wants_handoff else None
                async with lease.generate(params, handoff=handoff) as gen:
                    await _relay(gen, sink, outcome, prompt_field)
            finally:  # cancelled (the client left): what the worker made still counts
                if gen is not None and isinstance(gen.ending, Finished):
                    outcome.finished(gen.ending)
    finally:
        if not granted:  # refused, timed out or gone while queued: how long it waited
            outcome.queue_ms = round((time.monotonic() - waiting_since) * 1000, 2)


async def _relay(
    gen: Generation, sink: GenerationSink, outcome: Outcome, prompt_field: str
) -> None:
    """The generation's events to the sink, until it ends; its figures to the outcome."""
    first = await gen.next()
    if isinstance(first, Failed):
        raise _naming(first.error, prompt_field)
    assert isinstance(first, Started)
    await sink.started(first)
    outcome.handoff = sink.handed_off
    while True:
        event = await gen.next()
        if isinstance(event, Tokens):
            outcome.tokens_arrived(len(event.texts))
            await sink.tokens(event.texts)
        elif isinstance(event, Finished):
            outcome.finished(event)
            outcome.how = event.finish_reason
            if event.lost is not None:
                sink.lost(event.lost)
            await sink.finished(event)
            return
        else:
            assert isinstance(event, Failed)
            outcome.how = event.error.code
            await sink.failed(event.error)
            return


def _naming(error: ModeldError, prompt_field: str) -> ModeldError:
    """A prompt the daemon built from chat `messages` is too long because of them."""
    if isinstance(error, PromptTooLong) and error.param != prompt_field:
        return PromptTooLong(error.message, param=prompt_field)
    return error


class ResponderSink:
    """What the generating endpoints' sinks share: the Responder, streaming or not, the
    texts of an answer that is not streamed, and the handoff of a stream (the worker
    writes the head that `stream_head` describes, then the text events)."""

    def __init__(self, res: Responder, stream: bool) -> None:
        self.res = res
        self.stream = stream
        self.texts: list[str] = []
        self.handed_off = False

    @property
    def wants_handoff(self) -> bool:
        return self.stream and self.res.can_hand_off

    def stream_head(self) -> tuple[list[tuple[str, str]], bytes]:
        """A stream's headers, and the body bytes that go before any text (may be b'')."""
        raise NotImplementedError

    def text_frame(self) -> tuple[str, str, bool]:
        """One text event on the wire: (prefix, suffix, join), see `Handoff`."""
        raise NotImplementedError

    @functools.cached_property
    def _frame(self) -> tuple[str, str, bool]:
        return self.text_frame()  # worked out once: it is needed for every write

    async def tokens(self, texts: tuple[str, ...]) -> None:
        """Text the daemon forwards (a stream not handed off), or keeps for the answer."""
        if self.stream:
            await self.res.send(text_events(*self._frame, texts))
        else:
            self.texts.extend(texts)

    def hand_off_target(self) -> Handoff | None:
        headers, first = self.stream_head()
        got = self.res.prepare_hand_off(200, headers, first)
        if got is None:
            return None
        fd, preamble, chunked = got
        prefix, suffix, join = self._frame
        self.handed_off = True
        return Handoff(fd, prefix, suffix, join, chunked, self.res.send_timeout_s, preamble)

    async def started(self, event: Started) -> None:
        """Start a stream's response (a handed-off one's head is out already)."""
        if not self.stream:
            return
        headers, first = self.stream_head()
        if self.handed_off:
            self.res.started_elsewhere(200, headers, first)
            return
        await self.res.start(200, headers)
        if first:
            await self.res.send(first)

    def lost(self, reason: LostReason) -> NoReturn:
        self.res.lost(reason)
