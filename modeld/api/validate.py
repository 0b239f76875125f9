"""Type and range checks for request fields; every failure is a 400 naming the field."""

from __future__ import annotations

import math
from typing import Any

from modeld.errors import InvalidRequest

MAX_SEED = 2**32 - 1  # llama.cpp seeds are uint32
MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 512  # length of one stop string
MAX_TOKENS_CEILING = 1 << 20  # anything above any context is refused outright
MAX_TEMPERATURE = 100.0  # /infer's ceiling: far past useful, so only typos are refused
MAX_TOP_K = 1 << 20  # larger than any vocabulary


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def string(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required", param=name)
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", param=name)
    return valid_text(value, name)


def valid_text(value: str, name: str) -> str:
    """Refuse strings that cannot be UTF-8 (lone surrogates from `\\ud800` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{name}' is not valid Unicode text", param=name) from None
    return value


def boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false", param=name)
    return value


def integer(
    body: dict[str, Any], name: str, default: int | None, *, lo: int, hi: int
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer", param=name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def number(
    body: dict[str, Any],
    name: str,
    default: float,
    *,
    lo: float,
    hi: float,
    lo_open: bool = False,
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number", param=name)
    value = float(value)
    low_ok = value > lo if lo_open else value >= lo
    if not math.isfinite(value) or not low_ok or value > hi:
        bracket = "(" if lo_open else "["
        raise InvalidRequest(
            f"'{name}' must be in {bracket}{lo:g}, {hi:g}], got {value:g}", param=name
        )
    return value


def stop_list(body: dict[str, Any], name: str = "stop") -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest(f"'{name}' must be a string or a list of strings", param=name)
    if len(value) > MAX_STOPS:
        raise InvalidRequest(f"'{name}' has {len(value)} entries, at most {MAX_STOPS}", param=name)
    for s in value:
        valid_text(s, name)
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(
                f"each '{name}' string must be 1 to {MAX_STOP_CHARS} characters", param=name
            )
    return tuple(value)


def prompt_text(value: str, name: str = "prompt") -> str:
    valid_text(value, name)
    if "\0" in value:
        raise InvalidRequest(f"'{name}' must not contain NUL characters", param=name)
    return value
