"""Parsing and checking of OpenAI-style request bodies (pure: no I/O, no daemon state).

Wrong types or ranges are 400s naming the field, which `openai.py` sends in OpenAI's
error shape; unknown fields are ignored, as OpenAI's own API does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modeld.api import validate as v
from modeld.chat_template import ChatMessage
from modeld.errors import InvalidRequest
from modeld.manager.backend import GenParams

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = v.MAX_TOKENS_CEILING  # OpenAI's chat default: until the context is full
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]
MAX_MESSAGES = 4096  # messages per chat request; the 1 MiB body limit bites first anyway
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name; templates know "system"


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked completions or chat request; `params.prompt` is empty for chat."""

    model: str
    params: GenParams
    stream: bool
    include_usage: bool
    messages: tuple[ChatMessage, ...] | None = None


def _common(body: dict[str, Any], prompt: str, default_max_tokens: int) -> tuple[str, GenParams]:
    """The fields both endpoints share; returns the model id and the sampling params."""
    model = v.string(body, "model", required=True) or ""
    n = v.integer(body, "n", 1, lo=0, hi=v.MAX_TOKENS_CEILING)
    if n != 1:
        raise InvalidRequest("only 'n': 1 is supported", param="n")
    max_tokens = v.integer(body, "max_tokens", None, lo=1, hi=v.MAX_TOKENS_CEILING)
    max_completion = v.integer(body, "max_completion_tokens", None, lo=1, hi=v.MAX_TOKENS_CEILING)
    top_p = v.number(body, "top_p", 0.95, lo=0.0, hi=1.0)
    top_k = v.integer(body, "top_k", 40, lo=0, hi=1 << 20) or 0
    if top_p == 0.0:  # OpenAI allows 0: only the most likely token is left
        top_p, top_k = 1.0, 1
    params = GenParams(
        prompt=prompt,
        max_tokens=max_completion or max_tokens or default_max_tokens,
        temperature=v.number(body, "temperature", 0.8, lo=0.0, hi=MAX_TEMPERATURE),
        top_p=top_p,
        top_k=top_k,
        seed=_seed(body),
        stop=v.stop_list(body),
    )
    return model, params


def _seed(body: dict[str, Any]) -> int | None:
    """OpenAI takes any 64-bit seed: a negative one means random (as -1 does in llama.cpp),
    a larger one is folded into llama.cpp's 32 bits."""
    seed = v.integer(body, "seed", None, lo=-(2**63), hi=2**63 - 1)
    if seed is None or seed < 0:
        return None
    return seed % (v.MAX_SEED + 1)


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """`stream` and `stream_options.include_usage`."""
    stream = v.boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    if not stream:  # as OpenAI answers
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise InvalidRequest(
            "'stream_options.include_usage' must be true or false",
            param="stream_options.include_usage",
        )
    return stream, bool(include)


def parse_completion(body: Any) -> OpenAIRequest:
    """Check a /v1/completions body; `prompt` is a string or a list of one string."""
    body = v.require_object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest(
            "'prompt' must be a string (or a list of exactly one string)", param="prompt"
        )
    model, params = _common(body, v.prompt_text(prompt), COMPLETION_MAX_TOKENS)
    stream, include_usage = _stream_flags(body)
    return OpenAIRequest(model, params, stream, include_usage)


def parse_chat(body: Any) -> OpenAIRequest:
    """Check a /v1/chat/completions body."""
    body = v.require_object(body)
    model, params = _common(body, "", CHAT_MAX_TOKENS)
    messages = parse_messages(body.get("messages"))
    stream, include_usage = _stream_flags(body)
    return OpenAIRequest(model, params, stream, include_usage, messages)


def parse_messages(value: Any) -> tuple[ChatMessage, ...]:
    """A non-empty list of `{role, content}` objects; content may be text parts."""
    if value is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    if len(value) > MAX_MESSAGES:
        raise InvalidRequest(f"'messages' has more than {MAX_MESSAGES} entries", param="messages")
    return tuple(_message(item, i) for i, item in enumerate(value))


def _message(item: Any, i: int) -> ChatMessage:
    where = f"messages[{i}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"'{where}' must be an object", param=where)
    role = item.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"'{where}.role' must be a non-empty string", param=f"{where}.role")
    content = _content(item.get("content"), role, f"{where}.content")
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest(f"'{where}.name' must be a string", param=f"{where}.name")
    return ChatMessage(ROLE_ALIASES.get(role, role), v.prompt_text(content, where), name)


def _content(value: Any, role: str, where: str) -> str:
    """A string, or a list of `{"type": "text", "text": ...}` parts joined by newlines."""
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""  # an assistant turn that only called tools
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(f"'{where}' supports only text parts", param=where)
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"'{where}' text parts need a string 'text'", param=where)
            texts.append(text)
        return "\n".join(texts)
    raise InvalidRequest(f"'{where}' must be a string or a list of text parts", param=where)
