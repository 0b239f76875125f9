"""Pure builders of what `modelctl` shows: daemon documents in, rich renderables out.

Nothing here touches a stream or asks whether one is a terminal (that is `render`'s job),
so every view is tested by rendering it into a string.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from modelctl.schema import Instance, ModelInfo, Outcome, Status, Vram

BAR_WIDTH = 40  # cells in the VRAM bar: fine-grained enough, fits an 80-column terminal
MIN_BAR_WIDTH = 10  # the bar shrinks to fit a narrow terminal, down to this
NO_VALUE = "-"  # what a column shows for an unknown figure
# States whose memory the budget counts (the daemon's RESIDENT): the estimate until measured.
RESERVING_STATES = frozenset({"loading", "ready", "unloading"})
COLUMN_GAP = 3  # cells between two columns of `_table`: padding, blank divider, padding
STATE_MIN_WIDTH = len("unloading")  # a squeezed STATE column still shows every state whole
NAME_MIN_WIDTH = 16  # a squeezed model id still shows enough to tell models apart
LAST_RESORT_WIDTH = 4  # how far the giving-way columns shrink in a very narrow terminal
SEPARATOR = " · "  # between the parts of the stats line; it wraps only here

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
    """A state, coloured; an error state carries its reason, cut with `…` where the
    column is too narrow (the whole reason is in `--json`)."""
    text = Text.assemble((state, STATE_STYLES.get(state, "")))
    if error:
        text.append(f" ({error})", style="dim")
    return text


def _table(*headers: str, right: tuple[str, ...] = ()) -> Table:
    """A borderless table with bold headers: readable in a terminal and greppable in a pipe.
    Cells never wrap: a row is one line (`FittedTable` cuts cells to fit instead)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        justify: JustifyMethod = "right" if header in right else "left"
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis")
    return table


class FittedTable:
    """A table that fits the width it is drawn at by cutting the cells of some columns
    with `…`, rather than wrapping every cell of every column into fragments.

    `give_way` lists (header, narrowest width): the first column shrinks first, down to
    its narrowest, then the next; in a terminal too narrow even for that they shrink
    further, down to a few cells, so the other columns (figures) are never cut.
    Everything fits in a pipe's wide console, uncut.
    """

    def __init__(self, table: Table, give_way: Sequence[tuple[str, int]]) -> None:
        self.table = table
        self.give_way = give_way

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        columns = self.table.columns
        widths = []
        for column in columns:
            column.max_width = None
            cells = [column.header, *column.cells]
            widths.append(max(Measurement.get(console, options, c).maximum for c in cells))
        excess = sum(widths) + COLUMN_GAP * (len(columns) - 1) - options.max_width
        giving = [next(i for i, c in enumerate(columns) if c.header == h) for h, _ in self.give_way]
        for floors in ([n for _, n in self.give_way], [LAST_RESORT_WIDTH] * len(giving)):
            for index, narrowest in zip(giving, floors, strict=True):
                now = columns[index].max_width or widths[index]
                cut = min(max(0, excess), max(0, now - narrowest))
                if cut:
                    columns[index].max_width = now - cut
                    excess -= cut
        for index, column in enumerate(columns):  # the others keep their width: figures stay whole
            column.min_width = None if index in giving else widths[index]
        yield self.table


def models_table(models: list[ModelInfo]) -> RenderableType:
    """The `modelctl models` table: id, size, estimated and measured VRAM, state."""
    if not models:
        return Text("no models in the models dir", style="dim")
    table = _table("ID", "SIZE", "EST VRAM", "VRAM", "STATE", right=("SIZE", "EST VRAM", "VRAM"))
    for m in models:
        table.add_row(
            m.id,
            fmt_bytes(m.size_bytes),
            fmt_mb(m.est_vram_mb),
            fmt_mb(m.vram_mb),
            state_text(m.state, m.error),
        )
    return FittedTable(table, [("STATE", STATE_MIN_WIDTH), ("ID", NAME_MIN_WIDTH)])


class FittedVramBar:
    """`vram_bar` with a bar short enough that the line fits the terminal (at least
    MIN_BAR_WIDTH cells; a terminal narrower than that wraps the figures)."""

    def __init__(self, vram: Vram) -> None:
        self.vram = vram

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        figures = len(f"VRAM  {self.vram.used_mb or 0} / {self.vram.budget_mb} MB used")
        room = options.max_width - figures
        yield vram_bar(self.vram, max(MIN_BAR_WIDTH, min(BAR_WIDTH, room)))


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
    """Measured VRAM, or `~` the estimate while a load reserves it; an instance that is
    not resident (unloaded, error) holds none, as in the budget's `used_mb`."""
    if inst.vram_mb is not None:
        return fmt_mb(inst.vram_mb)
    if inst.est_vram_mb is None or inst.state not in RESERVING_STATES:
        return NO_VALUE
    return f"~{inst.est_vram_mb} MB"


def instances_table(instances: tuple[Instance, ...], now: float) -> RenderableType:
    """One row per instance: state, last used, VRAM, in flight, queue depth."""
    if not instances:
        return Text("no instances loaded", style="dim")
    right = ("VRAM", "IN FLIGHT", "QUEUE")
    table = _table("MODEL", "STATE", "LAST USED", "VRAM", "IN FLIGHT", "QUEUE", right=right)
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
    return FittedTable(table, [("STATE", STATE_MIN_WIDTH), ("MODEL", NAME_MIN_WIDTH)])


def status_view(status: Status, now: float) -> RenderableType:
    """The `modelctl status` screen: VRAM bar, counters, instances."""
    return Group(
        FittedVramBar(status.vram),
        _counters_line(status),
        Text(""),
        instances_table(status.instances, now),
    )


def _count(n: int) -> str:
    return "no tokens" if n == 0 else "1 token" if n == 1 else f"{n} tokens"


def outcome_parts(outcome: Outcome) -> list[str]:
    """The figures of the stats line: tokens, tokens/s (from 2 tokens on: one token has no
    rate), time to first token (or, with no token, the whole time), load, queue, model."""
    parts: list[str] = []
    n = outcome.completion_tokens
    if n is not None:
        parts.append(_count(n))
    rate = outcome.tokens_per_second()
    if rate is not None:
        parts.append(f"{rate:.1f} tokens/s")
    if n == 0:
        if outcome.total_ms is not None:
            parts.append(f"done in {fmt_ms(outcome.total_ms)}")
    elif outcome.ttft_ms is not None:
        parts.append(f"first token {fmt_ms(outcome.ttft_ms)}")
    if outcome.load_ms:
        parts.append(f"load {fmt_ms(outcome.load_ms)}")
    if outcome.queue_ms and outcome.queue_ms >= 1:
        parts.append(f"queued {fmt_ms(outcome.queue_ms)}")
    if outcome.finish_reason == "length":
        parts.append("stopped at max tokens")
    if outcome.model:
        parts.append(outcome.model)
    return parts


def join_wrapped(parts: list[str], width: int | None) -> str:
    """Join with ` · `; where a line would pass `width`, break at a separator instead,
    so no part is split ("stopped at max / tokens")."""
    lines: list[str] = []
    for part in parts:
        if lines and (width is None or cell_len(lines[-1] + SEPARATOR + part) <= width):
            lines[-1] += SEPARATOR + part
        else:
            lines.append(part)
    return "\n".join(lines)


def outcome_line(outcome: Outcome, width: int | None = None) -> Text:
    """The dim stats line after a generation, broken at separators to fit `width`."""
    return Text(join_wrapped(outcome_parts(outcome), width), style="dim")


def waiting_text(model: str | None, elapsed_s: float, whole: bool = False) -> Text:
    """The spinner's caption: it waits for the first token (queue, load, prompt), or with
    `whole` (`--no-stream`) for the end of the generation too."""
    what = model or "the default model"
    until = "finish" if whole else "start"
    return Text.assemble(f"waiting for {what} to {until} answering ", (f"{elapsed_s:.1f}s", "dim"))


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
