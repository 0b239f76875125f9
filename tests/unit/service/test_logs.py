"""Log formatting: JSON lines with structured fields, text one-liners, redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from modeld.service import logs


class TtyStream(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the root logger and the quieted loggers as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in logs.NOISY_LOGGERS}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_carry_core_keys_and_fields() -> None:
    out = io.StringIO()
    logs.setup_logging("info", "json", stream=out)
    logger = logging.getLogger("modeld.test")
    logger.info("request", extra={"fields": {"model": "a.gguf", "status": 200, "ttft_ms": 12.5}})
    logs.log_event(logger, "load", model="b.gguf", vram_mib=812, outcome="ok")
    logger.debug("hidden at info")
    first, second = (json.loads(line) for line in lines(out))
    assert first["level"] == "info"
    assert first["logger"] == "modeld.test"
    assert first["msg"] == "request"
    assert (first["model"], first["status"], first["ttft_ms"]) == ("a.gguf", 200, 12.5)
    assert first["ts"].endswith("Z")
    assert len(first["ts"]) == len("2025-01-31T12:00:00.123Z")
    assert second["msg"] == "load"
    assert (second["model"], second["vram_mib"], second["outcome"]) == ("b.gguf", 812, "ok")


def test_json_fields_never_override_core_keys_and_stay_valid() -> None:
    out = io.StringIO()
    logs.setup_logging("info", "json", stream=out)
    spoof = {"msg": "spoof", "level": "spoof", "logger": "spoof", "ratio": float("nan")}
    logging.getLogger("x").warning("evt", extra={"fields": spoof})
    (line,) = lines(out)
    record = json.loads(line)
    assert (record["msg"], record["level"], record["logger"]) == ("evt", "warning", "x")
    assert record["ratio"] is None


def test_json_includes_exceptions() -> None:
    out = io.StringIO()
    logs.setup_logging("info", "json", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    (line,) = lines(out)
    record = json.loads(line)
    assert record["level"] == "error"
    assert "RuntimeError: boom" in record["exc"]


def test_text_mode_is_a_one_liner_with_key_values() -> None:
    out = io.StringIO()
    logs.setup_logging("debug", "text", stream=out)
    logs.log_event(
        logging.getLogger("modeld.http"), "request", model="a.gguf", status=200, why="a b"
    )
    (line,) = lines(out)
    assert "INFO" in line
    assert "modeld.http: request" in line
    assert line.endswith('model=a.gguf status=200 why="a b"')


def test_auto_picks_text_on_a_tty_and_json_otherwise() -> None:
    tty, pipe = TtyStream(), io.StringIO()
    assert logs.resolve_format("auto", tty) == "text"
    assert logs.resolve_format("auto", pipe) == "json"
    logs.setup_logging("info", "auto", stream=pipe)
    logging.getLogger("x").info("hi")
    assert json.loads(lines(pipe)[0])["msg"] == "hi"


def test_prompt_text_is_redacted_above_debug() -> None:
    out = io.StringIO()
    logs.setup_logging("debug", "json", stream=out)
    logger = logging.getLogger("x")
    logs.log_event(logger, "request", prompt="secret words", model="m")
    logs.log_event(logger, "request", level=logging.DEBUG, prompt="secret words")
    info, debug = (json.loads(line) for line in lines(out))
    assert info["prompt"] == "<redacted 12>"
    assert info["model"] == "m"
    assert debug["prompt"] == "secret words"


def test_setup_is_idempotent_and_quiets_noisy_loggers() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.setup_logging("info", "json", stream=first)
    logs.setup_logging("info", "json", stream=second)
    logging.getLogger("x").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1
    assert logging.getLogger("httpx").level == logging.WARNING
    logging.getLogger("httpx").info("chatter")
    assert len(lines(second)) == 1


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
def test_bad_level_or_format_is_a_value_error(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        logs.setup_logging(level, fmt, stream=io.StringIO())
