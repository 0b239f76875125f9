"""Chat prompts, rendered in the worker with the model's own template.

A chat template comes from the model file: data, and possibly hostile. Rendering it here,
in the model's own process, means a template that loops forever is stopped by a timer
(SIGALRM, on the main thread, where the render runs) and one that eats memory takes only
this worker down, as a model that crashes llama.cpp would; the daemon never runs it.
Jinja is imported on the first chat, so workers that only ever complete never pay for it.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

TEMPLATE_TIMEOUT_S = 5.0  # a chat template renders in well under a millisecond
MESSAGE_KEYS = ("role", "content", "name")


@dataclass(frozen=True)
class ChatTemplate:
    """The loaded model's template (None: the ChatML fallback) and its BOS/EOS texts."""

    source: str | None
    bos: str = ""
    eos: str = ""


class _Overtime(BaseException):
    """Raised by the timer inside the render; a BaseException, so no `except Exception`
    in Jinja or in the template code path swallows it."""


def parse_messages(value: Any) -> tuple[dict[str, str], ...]:
    """Validate the generate op's `messages` (ValueError says what is wrong)."""
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in MESSAGE_KEYS[:2]):
            raise ValueError("each message must have string role and content")
        if "name" in m and not isinstance(m["name"], str):
            raise ValueError("a message name must be a string")
        out.append({k: m[k] for k in MESSAGE_KEYS if k in m})
    return tuple(out)


def render(
    template: ChatTemplate,
    messages: Sequence[dict[str, str]],
    timeout_s: float = TEMPLATE_TIMEOUT_S,
) -> str:
    """The prompt for `messages`; a ModeldError (template_error, or invalid_request when
    the template refuses the messages) when it cannot be rendered in time."""
    from modeld.chat_template import ChatMessage, ChatTemplateError, render_chat

    chat = [ChatMessage(m["role"], m["content"], m.get("name")) for m in messages]
    armed = True

    def overtime(_signum: int, _frame: FrameType | None) -> None:
        if armed:  # a signal that lands after the render has finished is ignored
            raise _Overtime

    previous = signal.signal(signal.SIGALRM, overtime)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return render_chat(template.source, chat, bos=template.bos, eos=template.eos).prompt
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Overtime:
        raise ChatTemplateError(
            f"the model's chat template took longer than {timeout_s:g} s and was stopped"
        ) from None
    finally:
        signal.signal(signal.SIGALRM, previous)
