"""`POST /infer`: parse and check the request, wait for a turn, stream the generation.

The status line is decided when generation starts (the worker's `Started` event):
everything that fails before it is a plain error response with its own status; after it,
the stream ends with an `error` event instead of `done`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio

from modeld.api import validate as v
from modeld.errors import ModeldError, NoDefaultModel
from modeld.http.protocol import Request
from modeld.http.server import ClientGone, Responder
from modeld.manager.backend import Failed, Finished, GenParams, Started, Tokens
from modeld.manager.manager import Manager
from modeld.registry import ModelSpec, Registry

log = logging.getLogger("modeld.request")

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


@dataclass(frozen=True)
class InferRequest:
    model: str | None
    params: GenParams
    stream: bool


def parse_infer(body: Any) -> InferRequest:
    """Check every field of an /infer body; a 400 names the first bad one."""
    body = v.require_object(body)
    prompt = v.prompt_text(v.string(body, "prompt", required=True) or "")
    params = GenParams(
        prompt=prompt,
        max_tokens=v.integer(body, "max_tokens", 128, lo=1, hi=v.MAX_TOKENS_CEILING) or 128,
        temperature=v.number(body, "temperature", 0.8, lo=0.0, hi=100.0),
        top_p=v.number(body, "top_p", 0.95, lo=0.0, hi=1.0, lo_open=True),
        top_k=v.integer(body, "top_k", 40, lo=0, hi=1 << 20) or 0,
        seed=v.integer(body, "seed", None, lo=0, hi=v.MAX_SEED),
        stop=v.stop_list(body),
    )
    return InferRequest(v.string(body, "model"), params, v.boolean(body, "stream", True))


def resolve_model(registry: Registry, name: str | None, default: str | None) -> ModelSpec:
    if name is None:
        if default is None:
            raise NoDefaultModel(
                "no 'model' given and modeld has no --default-model", param="model"
            )
        name = default
    return registry.resolve(name)


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
        self.tokens = 0

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
                    "outcome": self.how,
                }
            },
        )


class Framer:
    """Turns events into ndjson lines or SSE messages."""

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.content_type = SSE if sse else NDJSON

    def event(self, obj: dict[str, Any]) -> bytes:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        if self.sse:
            return f"event: {obj['type']}\ndata: {data}\n\n".encode()
        return (data + "\n").encode()

    def tokens(self, texts: tuple[str, ...]) -> bytes:
        return b"".join(self.event({"type": "token", "text": t}) for t in texts)


async def handle_infer(
    request: Request,
    res: Responder,
    registry: Registry,
    manager: Manager,
    default_model: str | None,
) -> None:
    outcome = Outcome(request)
    try:
        parsed = parse_infer(request.json())
        spec = resolve_model(registry, parsed.model, default_model)
        outcome.model = spec.id
        sse = SSE in (request.header("accept") or "")
        await _generate(request, res, manager, spec, parsed, Framer(sse), outcome)
    except ModeldError as exc:
        outcome.how = exc.code
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
        status = res.status or (499 if res.client_gone else 0)
        with anyio.CancelScope(shield=True):
            outcome.log(status)


async def _generate(
    request: Request,
    res: Responder,
    manager: Manager,
    spec: ModelSpec,
    parsed: InferRequest,
    framer: Framer,
    outcome: Outcome,
) -> None:
    async with manager.acquire(spec) as lease:
        outcome.queue_ms, outcome.load_ms = round(lease.queue_ms, 2), round(lease.load_ms, 2)
        async with lease.generate(parsed.params) as gen:
            first = await gen.next()
            if isinstance(first, Failed):
                raise first.error
            assert isinstance(first, Started)
            if parsed.stream:
                await res.start(
                    200, [("Content-Type", framer.content_type), ("Cache-Control", "no-cache")]
                )
            texts: list[str] = []
            while True:
                event = await gen.next()
                if isinstance(event, Tokens):
                    if outcome.ttft_ms is None:
                        outcome.ttft_ms = _ms(time.monotonic() - request.received_at)
                    outcome.tokens += len(event.texts)
                    if parsed.stream:
                        await res.send(framer.tokens(event.texts))
                    else:
                        texts.extend(event.texts)
                elif isinstance(event, Finished):
                    await _finish(request, res, spec, parsed, framer, outcome, event, texts)
                    return
                else:
                    assert isinstance(event, Failed)
                    outcome.how = event.error.code
                    if not parsed.stream:
                        raise event.error
                    await res.send(framer.event({"type": "error", **event.error.to_json()}))
                    await res.end()
                    return


async def _finish(
    request: Request,
    res: Responder,
    spec: ModelSpec,
    parsed: InferRequest,
    framer: Framer,
    outcome: Outcome,
    event: Finished,
    texts: list[str],
) -> None:
    outcome.tokens = event.completion_tokens
    outcome.how = event.finish_reason
    timings = {
        "queue_ms": outcome.queue_ms,
        "load_ms": outcome.load_ms,
        "ttft_ms": outcome.ttft_ms
        if outcome.ttft_ms is not None
        else _ms(time.monotonic() - request.received_at),
        "total_ms": _ms(time.monotonic() - request.received_at),
    }
    usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
    if parsed.stream:
        done = {
            "type": "done",
            "model": spec.id,
            "finish_reason": event.finish_reason,
            "usage": usage,
            "timings": timings,
        }
        await res.send(framer.event(done))
        await res.end()
        return
    body = {
        "model": spec.id,
        "text": "".join(texts),
        "finish_reason": event.finish_reason,
        "usage": usage,
        "timings": timings,
    }
    await res.respond(
        200, [("Content-Type", "application/json")], json.dumps(body, ensure_ascii=False).encode()
    )
