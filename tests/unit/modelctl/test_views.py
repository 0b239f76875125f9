"""The pure views: formatting helpers, the models table, the status screen, the stats line."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console, RenderableType

from modelctl.schema import ModelInfo, Outcome, Status, Vram, parse_models
from modelctl.views import (
    fmt_ago,
    fmt_bytes,
    join_wrapped,
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


def done_outcome(tokens: int, load_ms: float, ttft_ms: float, total_ms: float) -> Outcome:
    """The outcome of a request to m.gguf that stopped after `tokens` tokens."""
    return Outcome.from_json(
        {
            "model": "m.gguf",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 3, "completion_tokens": tokens},
            "timings": {
                "queue_ms": 0.0,
                "load_ms": load_ms,
                "ttft_ms": ttft_ms,
                "total_ms": total_ms,
            },
        }
    )


def test_outcome_line() -> None:
    outcome = done_outcome(11, load_ms=1500.0, ttft_ms=1600.0, total_ms=2100.0)
    assert outcome.tokens_per_second() == pytest.approx(20.0)
    assert outcome_line(outcome).plain == (
        "11 tokens · 20.0 tokens/s · first token 1.6 s · load 1.5 s · m.gguf"
    )


def test_outcome_line_single_token_has_no_rate() -> None:
    outcome = Outcome.from_json({"usage": {"completion_tokens": 1}, "timings": {"ttft_ms": 5}})
    assert outcome_line(outcome).plain == "1 token · first token 5 ms"


@pytest.mark.parametrize(
    ("usage", "timings"),
    [
        ({"completion_tokens": 1}, {"ttft_ms": 1.1, "total_ms": 1.1}),  # was "909.1 tokens/s"
        ({"completion_tokens": 1}, {"queue_ms": 0, "ttft_ms": 40.0, "total_ms": 80.0}),
        ({"completion_tokens": 0}, {"ttft_ms": 35.0, "total_ms": 35.0}),
    ],
)
def test_fewer_than_two_tokens_have_no_rate(
    usage: dict[str, int], timings: dict[str, float]
) -> None:
    outcome = Outcome.from_json({"usage": usage, "timings": timings})
    assert outcome.tokens_per_second() is None
    assert "tokens/s" not in outcome_line(outcome).plain


def test_outcome_line_without_tokens() -> None:
    outcome = done_outcome(0, load_ms=0.0, ttft_ms=35.0, total_ms=35.0)
    assert outcome_line(outcome).plain == "no tokens · done in 35 ms · m.gguf"


def test_the_rate_uses_the_workers_decode_time_when_sent() -> None:
    timings = {"ttft_ms": 100.0, "total_ms": 600.0, "decode_ms": 250.0}
    outcome = Outcome.from_json({"usage": {"completion_tokens": 11}, "timings": timings})
    assert outcome.tokens_per_second() == pytest.approx(40.0)  # 10 tokens in 0.25 s


@pytest.mark.parametrize("width", [80, 60, 40, 30])
def test_join_wrapped_breaks_only_at_separators(width: int) -> None:
    parts = ["128 tokens", "50.0 tokens/s", "first token 4.3 s", "load 1.2 s", "queued 3.0 s"]
    parts += ["stopped at max tokens", "smollm2.gguf"]
    lines = join_wrapped(parts, width).split("\n")
    assert all(len(line) <= width for line in lines)
    assert " · ".join(lines) == " · ".join(parts)  # every part whole, in order


def test_join_wrapped_without_a_width_is_one_line() -> None:
    assert join_wrapped(["a", "b"], None) == "a · b"


# ---- tables at 80 columns --------------------------------------------------------------------

LONG_REASON = (
    "model_load_failed: llama.cpp could not load /home/someone/models/"
    "qwen2.5-coder-7b-instruct-q4_k_m.gguf: unknown model architecture 'qwen3moe'"
)
UNREADABLE = {  # a file the daemon cannot serve has no estimate (est_vram_mb null)
    "models": [
        {"id": "garbage.gguf", "size_bytes": 100, "est_vram_mb": None, "state": "error",
         "vram_mb": None, "error": "bad magic (not a GGUF file)"},
        {"id": "empty.gguf", "size_bytes": 0, "est_vram_mb": None, "state": "error",
         "vram_mb": None, "error": "truncated in header"},
        {"id": "qwen2.5-coder-7b-instruct-q4_k_m.gguf", "size_bytes": 4_680_000_000,
         "est_vram_mb": 5100, "state": "error", "vram_mb": None, "error": LONG_REASON},
        {"id": "smollm2.gguf", "size_bytes": 98_000_000, "est_vram_mb": 612,
         "state": "ready", "vram_mb": 598, "error": None},
    ]
}  # fmt: skip


def rows_of(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines()[2:]}


def test_models_table_shows_no_estimate_for_unreadable_files() -> None:
    rows = rows_of(render(models_table(parse_models(UNREADABLE)), width=200))
    assert rows["garbage.gguf"].split()[:5] == ["garbage.gguf", "100", "B", "-", "-"]
    assert rows["empty.gguf"].split()[:5] == ["empty.gguf", "0", "B", "-", "-"]
    # a GGUF file whose load failed keeps its estimate
    assert "5100 MB" in rows["qwen2.5-coder-7b-instruct-q4_k_m.gguf"]


def test_models_table_fits_80_columns_one_line_a_row() -> None:
    text = render(models_table(parse_models(UNREADABLE)), width=80)
    lines = text.splitlines()
    assert len(lines) == 2 + len(UNREADABLE["models"])  # header, rule, one line per model
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split() == ["ID", "SIZE", "EST", "VRAM", "VRAM", "STATE"]
    rows = rows_of(text)
    long_row = rows["qwen2.5-coder-7b-instruct-q4_k_m.gguf"]  # the id is whole
    assert long_row.rstrip().endswith("error (mo…")  # the state whole, its reason cut
    assert rows["smollm2.gguf"].rstrip().endswith("ready")


def test_a_wide_table_is_not_cut() -> None:
    text = render(models_table(parse_models(UNREADABLE)), width=1000)
    assert LONG_REASON in text and "…" not in text


def test_status_table_fits_80_columns_one_line_a_row() -> None:
    status = json.loads(json.dumps(STATUS))
    status["instances"].append(
        {"model_id": "qwen2.5-coder-7b-instruct-q4_k_m.gguf", "state": "error",
         "last_used": None, "est_vram_mb": 5100, "vram_mb": None, "inflight": 0,
         "queue_depth": 0, "pinned": True, "error": LONG_REASON}
    )  # fmt: skip
    text = render(status_view(Status.from_json(status), now=1764355260.0), width=80)
    table = text.split("\n\n", 1)[1].splitlines()
    assert len(table) == 2 + 2  # header, rule, one line per instance
    assert all(len(line) <= 80 for line in text.splitlines())
    assert table[0].split() == ["MODEL", "STATE", "LAST", "USED", "VRAM", "IN", "FLIGHT", "QUEUE"]
    assert table[2].split()[-5:] == ["ago", "598", "MB", "1", "4"]  # smollm2: figures whole
    error_row = table[3]
    assert error_row.startswith("qwen2.5-coder")
    assert "error (" in error_row and "…" in error_row
    assert error_row.split()[-4:] == ["never", "-", "0", "0"]  # in error: holds no VRAM


@pytest.mark.parametrize("width", [60, 64, 72])
def test_status_in_a_narrow_terminal_keeps_the_figures_whole(width: int) -> None:
    """A tmux split: the bar shrinks so its line does not wrap; the model id and the state
    give way, never a figure."""
    text = render(status_view(Status.from_json(STATUS), now=1764355260.0), width=width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), text
    assert lines[0].startswith("VRAM ") and lines[0].endswith("MB used"), text
    row = text.split("\n\n", 1)[1].splitlines()[2]
    assert row.split()[-4:] == ["598", "MB", "1", "4"], text
