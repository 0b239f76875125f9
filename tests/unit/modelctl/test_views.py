"""The pure views: formatting helpers, the models table, the status screen, the stats line."""

from __future__ import annotations

import io

import pytest
from rich.console import Console, RenderableType

from modelctl.schema import ModelInfo, Outcome, Status, Vram, parse_models
from modelctl.views import (
    fmt_ago,
    fmt_bytes,
    models_table,
    outcome_line,
    status_view,
    vram_bar,
)
from tests.unit.modelctl.fakes import MODELS, STATUS


def render(renderable: RenderableType, width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False, highlight=False).print(renderable)
    return out.getvalue()


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "-"), (999, "999 B"), (98_000_000, "98.0 MB"), (1_500_000_000, "1.5 GB")],
)
def test_fmt_bytes(size: int | None, text: str) -> None:
    assert fmt_bytes(size) == text


@pytest.mark.parametrize(
    ("ago", "text"), [(None, "never"), (5.5, "5s ago"), (125, "2m ago"), (7300, "2h ago")]
)
def test_fmt_ago(ago: float | None, text: str) -> None:
    now = 1_000_000.0
    assert fmt_ago(None if ago is None else now - ago, now) == text


def test_models_table_rows() -> None:
    lines = render(models_table(parse_models(MODELS))).splitlines()
    header = lines[0].split()
    assert header == ["ID", "SIZE", "EST", "VRAM", "VRAM", "STATE"]
    row = next(line for line in lines if line.startswith("smollm2.gguf")).split()
    assert row == ["smollm2.gguf", "98.0", "MB", "612", "MB", "-", "unloaded"]
    broken = next(line for line in lines if line.startswith("broken.gguf"))
    assert "2050 MB" in broken
    assert "error (bad magic)" in broken


def test_models_table_empty() -> None:
    assert "no models" in render(models_table([]))


def test_models_parsing_tolerates_missing_fields() -> None:
    (model,) = parse_models({"models": [{"id": "x.gguf"}]})
    assert model == ModelInfo("x.gguf", None, None, None, "?", None)
    assert parse_models({"oops": 1}) == []


def test_vram_bar_proportions() -> None:
    bar = vram_bar(Vram(1000, 100, 500, 400, "nvml"), width=10).plain
    assert bar.startswith("VRAM █████░░░░▒ 500 / 1000 MB used")
    assert "\n     margin 100 MB · 400 MB available · budget from nvml" in bar


def test_vram_bar_without_budget() -> None:
    assert "no budget" in vram_bar(Vram(None, None, 10, None, None)).plain


def test_status_view() -> None:
    text = render(status_view(Status.from_json(STATUS), now=1764355260.0))
    assert "612 / 24000 MB used" in text
    assert "in flight 1 · rejected queue_full 2 · cancelled 3" in text
    row = next(line for line in text.splitlines() if line.startswith("smollm2.gguf"))
    assert row.split() == [
        "smollm2.gguf",
        "(pinned)",
        "ready",
        "59s",
        "ago",
        "598",
        "MB",
        "1",
        "4",
    ]


def test_status_view_without_instances() -> None:
    text = render(status_view(Status.from_json({"vram": {}, "instances": []}), now=0))
    assert "no instances loaded" in text


def test_outcome_line() -> None:
    outcome = Outcome.from_json(
        {
            "model": "m.gguf",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 3, "completion_tokens": 11},
            "timings": {"queue_ms": 0.0, "load_ms": 1500.0, "ttft_ms": 1600.0, "total_ms": 2100.0},
        }
    )
    assert outcome.tokens_per_second() == pytest.approx(20.0)
    assert outcome_line(outcome).plain == (
        "11 tokens · 20.0 tokens/s · first token 1.6 s · load 1.5 s · m.gguf"
    )


def test_outcome_line_single_token_has_no_rate() -> None:
    outcome = Outcome.from_json({"usage": {"completion_tokens": 1}, "timings": {"ttft_ms": 5}})
    assert outcome_line(outcome).plain == "1 token · first token 5 ms"
