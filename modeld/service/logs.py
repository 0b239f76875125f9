"""Logging setup: one JSON object per line for journald and log shippers, one-liners on a TTY.

Structured fields travel as `extra={"fields": {...}}` (or through `log_event`) and land
at the top level of the JSON line, or as `k=v` pairs in text. Prompt and completion text
must never reach the logs at info; the formatters redact the usual carriers of it anyway.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}  # the names --log-level accepts
FORMATS = ("auto", "json", "text")  # auto: json unless stderr is a terminal
NOISY_LOGGERS = (
    "asyncio",
    "httpx",
    "httpcore",
    "urllib3",
    "openai",
    "filelock",
    "markdown_it",
    "llama-cpp-python",
)  # third-party chatter that drowns the request lines at info
NOISY_LEVEL = logging.WARNING  # what those loggers may still say
SENSITIVE_FIELDS = frozenset({"prompt", "messages", "content", "completion"})  # user text
CORE_KEYS = ("ts", "level", "logger", "msg")  # fields never overwritten by extras
_HANDLER_MARK = "_modeld_handler"  # tags our root handler so setup_logging is idempotent


def utc_timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record, with user text redacted above debug."""
    fields = getattr(record, "fields", None)
    if not isinstance(fields, dict):
        return {}
    if record.levelno <= logging.DEBUG:
        return dict(fields)
    return {key: _redact(key, value) for key, value in fields.items()}


def _redact(key: str, value: Any) -> Any:
    """Replace user text by its size so request lines stay useful without leaking it."""
    if key not in SENSITIVE_FIELDS:
        return value
    size = len(value) if isinstance(value, str | list | tuple | dict) else 0
    return f"<redacted {size}>"


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: log them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            if key not in CORE_KEYS:
                line[key] = _json_safe(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """A human one-liner: time, level, logger, message, then k=v fields."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            utc_timestamp(record.created),
            f"{record.levelname:<7}",
            f"{record.name}:",
            record.getMessage(),
        ]
        parts += [f"{key}={_text_value(value)}" for key, value in record_fields(record).items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def _text_value(value: Any) -> str:
    """A field value as one shell-like token: quoted when it holds spaces or quotes."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(ch.isspace() or ch in "\"'=" for ch in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def resolve_format(fmt: str, stream: TextIO) -> str:
    """Turn "auto" into "json" or "text" by asking whether `stream` is a terminal."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def setup_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log record to stderr (or `stream`) in the chosen format; idempotent."""
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}") from None
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    use_json = resolve_format(fmt, target) == "json"
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(NOISY_LEVEL, levelno))
    logging.captureWarnings(True)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` as the message with `fields` as structured fields."""
    logger.log(level, event, extra={"fields": fields}, stacklevel=2)
