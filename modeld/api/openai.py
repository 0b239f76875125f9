"""OpenAI-compatible `/v1/models`, `/v1/completions`, `/v1/chat/completions` on /infer's path.

Theory of operation: a handler parses the body into an `OpenAIRequest` (pure; a 400 in
OpenAI's error shape names the first bad field), resolves the model in the registry, and
hands `run_generation` (modeld.api.generation) a sink that writes OpenAI's objects: SSE chunks
ending in `data: [DONE]` when streaming, one JSON object with `usage` when not. Queueing,
loading, eviction, 429s, disconnect cancellation and the request log all happen there,
exactly as for `/infer`. A chat goes to the model's worker as messages; the worker renders
them with the model's template under a deadline (`modeld.worker.chat`), so a pathological
template costs that worker, never the event loop. Errors before the response starts are
`{"error": {"message", "type", "param", "code"}}` with modeld's code and HTTP status.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from modeld.api.app import App, AppState
from modeld.api.generation import Outcome, ResponderSink, run_generation, track_request
from modeld.api.infer import SSE, resolve_model
from modeld.api.openai_request import OpenAIRequest, parse_chat, parse_completion
from modeld.chat_template import ChatTemplateError, template_stops
from modeld.errors import ModeldError, ModelNotFound
from modeld.http.protocol import Request
from modeld.http.server import Responder
from modeld.manager.backend import Finished, GenParams, LoadedInfo, encode_string
from modeld.registry import ModelSpec

log = logging.getLogger("modeld.api")

MODELS_PATH = "/v1/models/"  # + a model id: one model
DONE = b"data: [DONE]\n\n"  # the SSE line that ends every OpenAI stream
# modeld's finish reasons that OpenAI has too; anything else (a cancelled run nobody
# reads) is reported as "stop".
FINISH_REASONS = frozenset({"stop", "length"})


# ---- the answer's shape (pure) --------------------------------------------------------


def sse(obj: dict[str, Any]) -> bytes:
    """One SSE message as OpenAI sends it: a `data:` line, no event name."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(event: Finished) -> dict[str, int]:
    total = event.prompt_tokens + event.completion_tokens
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": total,
    }


def finish_reason(event: Finished) -> str:
    return event.finish_reason if event.finish_reason in FINISH_REASONS else "stop"


class Envelope:
    """Builds the objects of one response: chat or text completion, chunks or whole."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, text: str | None, reason: str | None = None, role: bool = False) -> bytes:
        """One stream chunk carrying `text` (None: no content), or the final `reason`."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=reason)
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        obj = self._object(kind, [choice])
        if self.include_usage:
            obj["usage"] = None
        return sse(obj)

    def text_frame(self) -> tuple[str, str]:
        """(prefix, suffix) with `prefix + JSON string of text + suffix == chunk(text)`."""
        marker = "\x00" + uuid.uuid4().hex  # cannot occur in the rest of the chunk
        prefix, _, suffix = self.chunk(marker).decode().partition(encode_string(marker))
        return prefix, suffix

    def usage_chunk(self, event: Finished) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._object(kind, []), "usage": usage(event)})

    def whole(self, text: str, event: Finished) -> dict[str, Any]:
        """The non-streaming response object."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish_reason(event))
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._object(kind, [choice]), "usage": usage(event)}


class OpenAISink(ResponderSink):
    """Writes one generation's events as OpenAI objects (a `GenerationSink`)."""

    def __init__(self, res: Responder, envelope: Envelope, stream: bool) -> None:
        super().__init__(res, stream)
        self.envelope = envelope

    def text_frame(self) -> tuple[str, str, bool]:
        return (*self.envelope.text_frame(), True)  # one chunk per write, texts joined

    def stream_head(self) -> tuple[list[tuple[str, str]], bytes]:
        role = self.envelope.chunk("", role=True) if self.envelope.chat else b""
        return [("Content-Type", SSE), ("Cache-Control", "no-cache")], role

    async def finished(self, event: Finished) -> None:
        if not self.stream:
            body = self.envelope.whole("".join(self.texts), event)
            await _respond_json(self.res, 200, body)
            return
        out = self.envelope.chunk(None, finish_reason(event))
        if self.envelope.include_usage:
            out += self.envelope.usage_chunk(event)
        await self.res.send(out + DONE)
        await self.res.end()

    async def failed(self, error: ModeldError) -> None:
        if not self.stream:
            raise error
        await self.res.send(sse(error.to_openai()))
        await self.res.end()


async def _respond_json(
    res: Responder, status: int, body: Any, headers: list[tuple[str, str]] | None = None
) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    await res.respond(status, [("Content-Type", "application/json"), *(headers or [])], data)


# ---- chat prompts ---------------------------------------------------------------------


async def chat_params(parsed: OpenAIRequest, model_id: str, info: LoadedInfo) -> GenParams:
    """The conversation for the worker to render with the model's template (see
    `modeld.worker.chat`), plus the end-of-turn stops that template implies."""
    assert parsed.messages is not None
    eos = str(info.extra.get("eos") or "")
    implied = template_stops(info.chat_template, eos)
    stop = parsed.params.stop + tuple(s for s in implied if s not in parsed.params.stop)
    messages = tuple(m.for_template() for m in parsed.messages)
    return dataclasses.replace(parsed.params, messages=messages, stop=stop)


# ---- handlers -------------------------------------------------------------------------


class OpenAIApi:
    """The three routes, over the app's registry and manager."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def models(self, request: Request, res: Responder) -> None:
        registry = self.state.registry
        await registry.refresh()
        data = [_model_object(spec) for spec in registry.models() if spec.invalid is None]
        await _respond_json(res, 200, {"object": "list", "data": data})

    async def model(self, request: Request, res: Responder) -> None:
        """`GET /v1/models/{id}`: one model as in the list, or 404 `model_not_found`."""
        name = urllib.parse.unquote(request.path.removeprefix(MODELS_PATH))
        spec = await resolve_model(self.state.registry, name, None)
        if spec.invalid is not None:
            raise ModelNotFound(
                f"model {spec.id!r} cannot be served: {spec.invalid}", param="model"
            )
        await _respond_json(res, 200, _model_object(spec))

    async def completions(self, request: Request, res: Responder) -> None:
        await self._generate(request, res, chat=False)

    async def chat_completions(self, request: Request, res: Responder) -> None:
        await self._generate(request, res, chat=True)

    async def _generate(self, request: Request, res: Responder, *, chat: bool) -> None:
        manager = self.state.manager
        async with track_request(request, res, manager) as outcome:
            try:
                await self._run(request, res, chat, outcome)
            except ChatTemplateError as exc:
                log.warning("chat template of %s failed: %s", outcome.model, exc.message)
                raise

    async def _run(self, request: Request, res: Responder, chat: bool, outcome: Outcome) -> None:
        parsed = (parse_chat if chat else parse_completion)(request.json())
        spec = await resolve_model(self.state.registry, parsed.model, None)
        outcome.model = spec.id
        envelope = Envelope(chat, spec.id, parsed.stream and parsed.include_usage)
        sink = OpenAISink(res, envelope, parsed.stream)
        if parsed.messages is None:
            await run_generation(self.state.manager, spec, parsed.params, sink, outcome)
        else:
            params = functools.partial(chat_params, parsed, spec.id)
            await run_generation(self.state.manager, spec, params, sink, outcome)


def _model_object(spec: ModelSpec) -> dict[str, Any]:
    return {"id": spec.id, "object": "model", "created": _mtime(spec.path), "owned_by": "modeld"}


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def install(app: App) -> None:
    """Register the OpenAI-compatible routes on modeld's app."""
    api = OpenAIApi(app.state)
    app.add_routes(
        {
            "/v1/models": {"GET": api.models},
            "/v1/models/*": {"GET": api.model},
            "/v1/completions": {"POST": api.completions},
            "/v1/chat/completions": {"POST": api.chat_completions},
        }
    )
