"""`POST /infer`: parse and check the request, then the shared request path
(`modeld.api.generation`) with a sink that writes ndjson or SSE events, or one JSON object.

Also resolving a request's model in the registry (a 404 lists what there is), which the
OpenAI-compatible endpoints share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from modeld.api import validate as v
from modeld.api.generation import Outcome, ResponderSink, run_generation, track_request
from modeld.errors import ModeldError, ModelNotFound, NoDefaultModel
from modeld.http.protocol import Request
from modeld.http.server import Responder
from modeld.manager.backend import Finished, GenParams
from modeld.manager.manager import Manager
from modeld.registry import ModelSpec, Registry

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# One token event: the text, JSON-encoded in C, goes between them (see `text_events`).
NDJSON_TOKEN = ('{"type":"token","text":', "}\n")
SSE_TOKEN = ('event: token\ndata: {"type":"token","text":', "}\n\n")
AVAILABLE_SHOWN = 10  # model ids a 404 lists; a big models dir is summed up, not dumped


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
        temperature=v.number(body, "temperature", 0.8, lo=0.0, hi=v.MAX_TEMPERATURE),
        top_p=v.number(body, "top_p", 0.95, lo=0.0, hi=1.0, lo_open=True),
        top_k=v.integer(body, "top_k", 40, lo=0, hi=v.MAX_TOP_K) or 0,
        seed=v.integer(body, "seed", None, lo=0, hi=v.MAX_SEED),
        stop=v.stop_list(body),
    )
    return InferRequest(v.string(body, "model"), params, v.boolean(body, "stream", True))


async def resolve_model(registry: Registry, name: str | None, default: str | None) -> ModelSpec:
    if name is None:
        if default is None:
            raise NoDefaultModel(
                "no 'model' given and modeld has no --default-model", param="model"
            )
        name = default
    try:
        return await registry.resolve(name)
    except ModelNotFound as exc:
        available = describe_available(registry)
        hint = f"available: {available}" if available else "it holds no models"
        raise ModelNotFound(f"{exc.message}; {hint}", param="model") from None


def describe_available(registry: Registry) -> str:
    """The servable model ids, for messages: at most AVAILABLE_SHOWN, then how many in all."""
    ids = sorted(spec.id for spec in registry.models() if spec.invalid is None)
    if len(ids) <= AVAILABLE_SHOWN:
        return ", ".join(ids)
    return ", ".join(ids[:AVAILABLE_SHOWN]) + f", … ({len(ids)} in all)"


class Framer:
    """Turns events into ndjson lines or SSE messages."""

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.content_type = SSE if sse else NDJSON
        self.token_frame = SSE_TOKEN if sse else NDJSON_TOKEN  # (prefix, suffix) of a text

    def event(self, obj: dict[str, Any]) -> bytes:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        if self.sse:
            return f"event: {obj['type']}\ndata: {data}\n\n".encode()
        return (data + "\n").encode()


class InferSink(ResponderSink):
    """/infer's answer: ndjson or SSE events when streaming, one JSON object when not."""

    def __init__(
        self, res: Responder, spec: ModelSpec, stream: bool, framer: Framer, outcome: Outcome
    ) -> None:
        super().__init__(res, stream)
        self.spec = spec
        self.framer = framer
        self.outcome = outcome

    def text_frame(self) -> tuple[str, str, bool]:
        return (*self.framer.token_frame, False)

    def stream_head(self) -> tuple[list[tuple[str, str]], bytes]:
        return [("Content-Type", self.framer.content_type), ("Cache-Control", "no-cache")], b""

    async def finished(self, event: Finished) -> None:
        usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
        timings = self.outcome.timings()
        if self.stream:
            done = {
                "type": "done",
                "model": self.spec.id,
                "finish_reason": event.finish_reason,
                "usage": usage,
                "timings": timings,
            }
            await self.res.send(self.framer.event(done))
            await self.res.end()
            return
        body = {
            "model": self.spec.id,
            "text": "".join(self.texts),
            "finish_reason": event.finish_reason,
            "usage": usage,
            "timings": timings,
        }
        await self.res.respond(
            200,
            [("Content-Type", "application/json")],
            json.dumps(body, ensure_ascii=False).encode(),
        )

    async def failed(self, error: ModeldError) -> None:
        if not self.stream:
            raise error
        await self.res.send(self.framer.event({"type": "error", **error.to_json()}))
        await self.res.end()


async def handle_infer(
    request: Request,
    res: Responder,
    registry: Registry,
    manager: Manager,
    default_model: str | None,
) -> None:
    async with track_request(request, res, manager) as outcome:
        parsed = parse_infer(request.json())
        spec = await resolve_model(registry, parsed.model, default_model)
        outcome.model = spec.id
        framer = Framer(SSE in (request.header("accept") or ""))
        sink = InferSink(res, spec, parsed.stream, framer, outcome)
        await run_generation(manager, spec, parsed.params, sink, outcome)
