"""Pure builders of what `modelctl` shows: daemon documents in, rich renderables out.

Nothing here touches a stream or asks whether one is a terminal (that is `render`'s job),
so every view is tested by rendering it into a string.
"""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from modelctl.schema import Instance, ModelInfo, Outcome, Status, Vram

BAR_WIDTH = 40  # cells in the VRAM bar: fine-grained enough, fits an 80-column terminal
NO_VALUE = "-"  # what a column shows for an unknown figure

# Colour of each instance/model state; unknown states are shown unstyled.
STATE_STYLES: dict[str, str] = {
    "ready": "green",
    "loading": "yellow",
    "unloading": "yellow",
    "unloaded": "dim",
    "error": "bold red",
}


def fmt_bytes(size: int | None) -> str:
    """A file size in the largest unit that keeps it at or above 1 (1000-based, like ls -h --si)."""
    if size is None:
        return NO_VALUE
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def fmt_mb(mb: int | None) -> str:
    return NO_VALUE if mb is None else f"{mb} MB"


def fmt_ms(ms: float) -> str:
    """A duration given in ms: milliseconds under a second, else seconds."""
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def fmt_ago(timestamp: float | None, now: float) -> str:
    """How long ago a Unix timestamp was, in the largest whole unit."""
    if timestamp is None:
        return "never"
    seconds = max(0.0, now - timestamp)
    for limit, unit, size in ((60, "s", 1), (3600, "m", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds // 86400)}d ago"


def state_text(state: str, error: str | None = None) -> Text:
    """A state, coloured; an error state carries its reason."""
    text = Text.assemble((state, STATE_STYLES.get(state, "")))
    if error:
        text.append(f" ({error})", style="dim")
    return text


def _table(*headers: str) -> Table:
    """A borderless table with bold headers: readable in a terminal and greppable in a pipe."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, no_wrap=header in ("ID", "MODEL"))
    return table


def models_table(models: list[ModelInfo]) -> RenderableType:
    """The `modelctl models` table: id, size, estimated and measured VRAM, state."""
    if not models:
        return Text("no models in the models dir", style="dim")
    table = _table("ID", "SIZE", "EST VRAM", "VRAM", "STATE")
    for column in table.columns[1:4]:
        column.justify = "right"
    for m in models:
        table.add_row(
            m.id,
            fmt_bytes(m.size_bytes),
            fmt_mb(m.est_vram_mb),
            fmt_mb(m.vram_mb),
            state_text(m.state, m.error),
        )
    return table


def vram_bar(vram: Vram, width: int = BAR_WIDTH) -> Text:
    """`[used|free|margin]` of the budget as a bar of cells, then the figures."""
    budget, margin, used = vram.budget_mb, vram.margin_mb or 0, vram.used_mb or 0
    text = Text.assemble(("VRAM ", "bold"))
    if not budget or budget <= 0:
        text.append(f"{used} MB used, no budget known", style="dim")
        return text
    cell = budget / width
    used_cells = min(width, round(used / cell))
    margin_cells = min(width - used_cells, round(margin / cell))
    free_cells = width - used_cells - margin_cells
    fill = used / max(1, budget - margin)
    used_style = "red" if fill > 0.9 else "yellow" if fill > 0.7 else "green"
    text.append("█" * used_cells, style=used_style)
    text.append("░" * free_cells, style="dim")
    text.append("▒" * margin_cells, style="dim red")
    text.append(f" {used} / {budget} MB used")
    available = vram.available_mb if vram.available_mb is not None else budget - margin - used
    details = f"margin {margin} MB · {available} MB available"
    if vram.source:
        details += f" · budget from {vram.source}"
    text.append(f"\n     {details}", style="dim")
    return text


def _counters_line(status: Status) -> Text:
    limit = f" of {status.max_inflight}" if status.max_inflight > 0 else ""
    text = Text(f"in flight {status.inflight}{limit}")
    rejected = ", ".join(f"{k} {v}" for k, v in status.rejected.items() if v)
    text.append(f" · rejected {rejected or 0} · cancelled {status.cancelled}", style="dim")
    return text


def _instance_vram(inst: Instance) -> str:
    if inst.vram_mb is not None:
        return fmt_mb(inst.vram_mb)
    return f"~{inst.est_vram_mb} MB" if inst.est_vram_mb is not None else NO_VALUE


def instances_table(instances: tuple[Instance, ...], now: float) -> RenderableType:
    """One row per instance: state, last used, VRAM, in flight, queue depth."""
    if not instances:
        return Text("no instances loaded", style="dim")
    table = _table("MODEL", "STATE", "LAST USED", "VRAM", "IN FLIGHT", "QUEUE")
    for column in table.columns[3:]:
        column.justify = "right"
    for inst in instances:
        model = Text(inst.model_id)
        if inst.pinned:
            model.append(" (pinned)", style="dim")
        table.add_row(
            model,
            state_text(inst.state, inst.error),
            fmt_ago(inst.last_used, now),
            _instance_vram(inst),
            str(inst.inflight),
            str(inst.queue_depth),
        )
    return table


def status_view(status: Status, now: float) -> RenderableType:
    """The `modelctl status` screen: VRAM bar, counters, instances."""
    return Group(
        vram_bar(status.vram),
        _counters_line(status),
        Text(""),
        instances_table(status.instances, now),
    )


def outcome_line(outcome: Outcome) -> Text:
    """The dim line after a generation: tokens, tokens/s, time to first token."""
    parts: list[str] = []
    if outcome.completion_tokens is not None:
        n = outcome.completion_tokens
        parts.append(f"{n} token" if n == 1 else f"{n} tokens")
    rate = outcome.tokens_per_second()
    if rate is not None:
        parts.append(f"{rate:.1f} tokens/s")
    if outcome.ttft_ms is not None:
        parts.append(f"first token {fmt_ms(outcome.ttft_ms)}")
    if outcome.load_ms:
        parts.append(f"load {fmt_ms(outcome.load_ms)}")
    if outcome.queue_ms and outcome.queue_ms >= 1:
        parts.append(f"queued {fmt_ms(outcome.queue_ms)}")
    if outcome.finish_reason == "length":
        parts.append("stopped at max tokens")
    if outcome.model:
        parts.append(outcome.model)
    return Text(" · ".join(parts), style="dim")


def waiting_text(model: str | None, elapsed_s: float) -> Text:
    """The spinner's caption while a request waits for its turn or its model's load."""
    what = model or "the default model"
    return Text.assemble(f"waiting for {what} ", (f"{elapsed_s:.1f}s", "dim"))


def health_line(endpoint: str, ready: bool | None) -> Text:
    """`modelctl health`'s line: liveness and readiness together."""
    text = Text.assemble(("modeld ", "bold"))
    text.append("live", style="green")
    if ready:
        text.append(", ready", style="green")
    elif ready is None:
        text.append(", readiness unknown", style="yellow")
    else:
        text.append(", not ready (no model ready yet)", style="yellow")
    text.append(f"  at {endpoint}", style="dim")
    return text
