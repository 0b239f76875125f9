"""Chat messages to one prompt, with the model's own Jinja chat template, sandboxed.

A template comes from a GGUF file, so it is data, not code: it is compiled in Jinja's
`ImmutableSandboxedEnvironment` (no dunder attributes, no mutating lists or dicts, ranges
capped) with only the helpers Hugging Face templates expect (`raise_exception`,
`strftime_now`, `tojson`, `bos_token`, `eos_token`, `add_generation_prompt`). Whatever
goes wrong while compiling or rendering becomes a `ModeldError` with a clear message,
never a traceback. A model without a template gets `FALLBACK_TEMPLATE`, a plain ChatML.
Pure: no I/O, no event loop. The model's worker process renders (`modeld.worker.chat`), so
a template that runs away costs the worker, which can be stopped, never the daemon.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # Jinja is imported where templates are compiled: the worker, not the daemon
    import jinja2
    import jinja2.sandbox

from modeld.errors import InvalidRequest, ModeldError, TemplateError

# ChatML, documented in docs/api.md: what a model without `tokenizer.chat_template` gets.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# End-of-turn texts of common template families; one a template writes becomes a stop
# string (unless it is the EOS, which ends generation anyway), so a model that emits it
# as plain text still stops at the end of its turn.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
MAX_RENDERED_CHARS = 8 * 1024 * 1024  # 8x the largest request body; beyond that, a runaway
TEMPLATE_CACHE_SIZE = 32  # compiled templates kept; one per distinct model is plenty


ChatTemplateError = TemplateError  # the name this module's callers use


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, already checked."""

    role: str
    content: str
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        out = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation, ready for `GenParams`."""

    prompt: str
    stop: tuple[str, ...]  # end-of-turn markers the template implies
    fallback: bool  # the model had no template and FALLBACK_TEMPLATE was used


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by a template: it refuses these messages."""


def _raise_exception(message: object) -> NoReturn:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: object) -> str:
    if not isinstance(fmt, str):
        raise TypeError("strftime_now() takes a format string")
    return datetime.datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    """Hugging Face's `tojson`: plain JSON, no HTML escaping (Jinja's own one escapes)."""
    return json.dumps(
        value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
    )


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The one sandbox every template is compiled in, with Hugging Face's settings."""
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.sandbox

    class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        """Jinja's immutable sandbox, but an unsafe attribute fails at once.

        Jinja's own one returns an undefined value that only fails when used, so
        `{{ ''.__class__ }}` would quietly print nothing; a template that tries must stop.
        """

        def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

    env = Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
        autoescape=False,
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


@functools.lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template once per distinct source text."""
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the model's chat template does not compile: {exc.message} (line {exc.lineno})"
        ) from None
    except Exception as exc:  # e.g. RecursionError on absurd nesting
        raise ChatTemplateError(
            f"the model's chat template does not compile: {type(exc).__name__}: {exc}"
        ) from None


def end_of_turn_stops(source: str, eos: str) -> tuple[str, ...]:
    """The end-of-turn markers `source` writes that are not the EOS itself."""
    return tuple(m for m in END_OF_TURN_MARKERS if m in source and m != eos)


def template_stops(template: str | None, eos: str) -> tuple[str, ...]:
    """The end-of-turn stops a chat with `template` (or the fallback, for none) implies."""
    return end_of_turn_stops(str(template) if template else FALLBACK_TEMPLATE, eos)


def render_chat(
    template: str | None,
    messages: Sequence[ChatMessage],
    *,
    bos: str = "",
    eos: str = "",
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Render `messages` with `template` (or the ChatML fallback when it is None or empty).

    A leading BOS text is dropped: the worker's tokenizer adds BOS itself when the model
    wants one, and a second one degrades the answer.
    """
    fallback = not template
    source = FALLBACK_TEMPLATE if fallback else str(template)
    compiled = compile_template(source)
    context = {
        "messages": [m.for_template() for m in messages],
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos,
        "eos_token": eos,
        "tools": None,
        "documents": None,
    }
    prompt = _render(compiled, context)
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
    return ChatPrompt(prompt, end_of_turn_stops(source, eos), fallback)


def _render(compiled: jinja2.Template, context: dict[str, Any]) -> str:
    """Render with an output cap; every failure becomes a ModeldError."""
    import jinja2.exceptions

    parts: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise ChatTemplateError(
                    f"the model's chat template produced more than {MAX_RENDERED_CHARS} characters"
                )
            parts.append(piece)
    except _TemplateRaised as exc:
        raise InvalidRequest(
            f"the model's chat template refused the messages: {exc}", param="messages"
        ) from None
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(
            f"the model's chat template tried an unsafe operation and was stopped: {exc}"
        ) from None
    except ModeldError:
        raise
    except Exception as exc:  # a template is data: none of its failures may escape raw
        raise ChatTemplateError(
            f"the model's chat template failed: {type(exc).__name__}: {exc}"
        ) from None
    return "".join(parts)
