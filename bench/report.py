"""Turn bench results into bench/results/latest.{json,md,png} and check the issue's targets.

Pure formatting: `targets` and `markdown` read the results dict and compute nothing that
needs a server, so they can be rerun on an old latest.json (`python -m bench.report`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.workload import INPROC_HIGH, INPROC_LOW, LCP_SERVER, LLAMA_SERVER, SMOL, TINY

SYSTEM_ORDER = ("modeld", INPROC_LOW, LLAMA_SERVER, INPROC_HIGH, LCP_SERVER)  # table rows
MODEL_LABELS = {SMOL: "SmolLM2-135M", TINY: "tiny"}
DOCS = Path(__file__).parent.parent / "docs" / "performance.md"  # refreshed by default runs
LATEST_BEGIN = "<!-- bench:latest -->"  # docs/performance.md: the latest results go between
LATEST_END = "<!-- /bench:latest -->"
NOISE_NOTE = (
    "Measured on a shared machine (2 cores, other work running at the same time), so "
    "single numbers are noisy; the streaming rounds rotate through the systems request by "
    "request so that noise hits them alike, and each figure is a median."
)


def _get(d: Any, *keys: str) -> Any:
    """Nested lookup that yields None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, int | float) and b else None


def _target(name: str, value: Any, goal: str, ok: bool | None, e2e: Any = None) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "ok": ok, "e2e": e2e}


def _cmp(value: float | None, limit: float, at_least: bool) -> bool | None:
    if value is None:
        return None
    return value >= limit if at_least else value <= limit


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met (None: n/a)."""
    st = _get(results, "stream", "stream") or {}
    rows = []

    def tok(system: str, model: str) -> Any:
        return _get(st, system, model, "decode_tok_s")

    def ttft(system: str, model: str) -> Any:
        return _get(st, system, model, "ttft_ms")

    def e2e(system: str, model: str) -> Any:
        return _get(st, system, model, "e2e_tok_s")

    for model, vs_srv, vs_inproc in ((TINY, 1.0, 0.95), (SMOL, 0.98, 0.98)):
        label = MODEL_LABELS[model]
        for ref, goal in ((LLAMA_SERVER, vs_srv), (INPROC_LOW, vs_inproc)):
            r = _ratio(tok("modeld", model), tok(ref, model))
            b = _ratio(e2e("modeld", model), e2e(ref, model))
            ok_decode, ok_e2e = _cmp(r, goal, True), _cmp(b, goal, True)
            # Met only when the end-to-end ratio, which batching cannot flatter, agrees.
            ok = None if ok_decode is None or ok_e2e is None else ok_decode and ok_e2e
            rows.append(_target(f"{label} tok/s vs {ref}", r, f">= {goal}x", ok, b))
    for ref in (LLAMA_SERVER, INPROC_LOW):
        a, b = ttft("modeld", SMOL), ttft(ref, SMOL)
        d = round(a - b, 2) if a is not None and b is not None else None
        rows.append(_target(f"SmolLM2 TTFT minus {ref} (ms)", d, "<= 2", _cmp(d, 2.0, False)))
    b2b = _get(results, "stream", "ttft_tiny_back_to_back") or {}
    for ref in (LLAMA_SERVER, INPROC_LOW):
        a, b = _get(b2b, "modeld", "p50_ms"), _get(b2b, ref, "p50_ms")
        d = round(a - b, 2) if a is not None and b is not None else None
        name = f"tiny TTFT p50 (back to back) minus {ref} (ms)"
        rows.append(_target(name, d, "<= 2", _cmp(d, 2.0, False)))
    greedy = _get(results, "stream", "greedy_vs_inproc", "modeld") or {}
    same = all(v.startswith("identical") for v in greedy.values()) if greedy else None
    rows.append(_target("greedy output = in-process", greedy or None, "identical", same))
    sw = _get(results, "stream", "switching") or {}
    r = _get(sw, "modeld", "ratio")
    rows.append(_target("A/B alternating / same-model", r, "<= 1.05", _cmp(r, 1.05, False)))
    r = _ratio(_get(sw, "modeld", "alternating_s"), _get(sw, LCP_SERVER, "alternating_s"))
    rows.append(_target("A/B vs llama_cpp.server alternating", r, "<= 0.5x", _cmp(r, 0.5, False)))
    ours = _get(results, "cold", "modeld (spare worker)", "first_token_s")
    theirs = _get(results, "router", "cold", "first_token_s")
    ok = ours <= theirs if ours is not None and theirs is not None else None
    rows.append(_target("cold first token (s) vs router", [ours, theirs], "modeld <= router", ok))
    p99 = _get(results, "control", "healthz_under_load", "p99_ms")
    rows.append(_target("/healthz p99 under load (ms)", p99, "<= 5", _cmp(p99, 5.0, False)))
    rej = _get(results, "control", "overload_429", "rejections_per_s")
    rows.append(_target("429 rejections/s", rej, ">= 2000", _cmp(rej, 2000.0, True)))
    rss = _get(results, "cold", "idle_rss", "modeld (spare worker)", "daemon_mb")
    rows.append(_target("idle daemon RSS (MB)", rss, "<= 60", _cmp(rss, 60.0, False)))
    return rows


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _stream_table(st: dict[str, Any]) -> list[str]:
    """One row per system: tok/s and TTFT per model, with ratios to llama-server/in-process."""
    head = "| system |"
    rule = "|---|"
    for m in (SMOL, TINY):
        lab = MODEL_LABELS[m]
        head += f" {lab} tok/s | vs llama-server | vs in-process | {lab} TTFT ms |"
        rule += "---:|---:|---:|---:|"
    out = [head, rule]
    for system in [s for s in SYSTEM_ORDER if s in st] + [s for s in st if s not in SYSTEM_ORDER]:
        row = f"| {system} |"
        for m in (SMOL, TINY):
            tok = _get(st, system, m, "decode_tok_s")
            r_srv = _ratio(tok, _get(st, LLAMA_SERVER, m, "decode_tok_s"))
            r_in = _ratio(tok, _get(st, INPROC_LOW, m, "decode_tok_s"))
            row += f" {_fmt(tok)} | {_fmt(r_srv, 2)} | {_fmt(r_in, 2)} |"
            row += f" {_fmt(_get(st, system, m, 'ttft_ms'))} |"
        out.append(row)
    return out


def _e2e_table(st: dict[str, Any]) -> list[str]:
    """End-to-end tokens/s (send to last token): no batching of token events can flatter it."""
    out = ["End to end, n_tokens / (last token - send), medians:", ""]
    head, rule = "| system |", "|---|"
    for m in (SMOL, TINY):
        head += f" {MODEL_LABELS[m]} e2e tok/s | vs llama-server | vs in-process |"
        rule += "---:|---:|---:|"
    out += [head, rule]
    for system in [s for s in SYSTEM_ORDER if s in st]:
        row = f"| {system} |"
        for m in (SMOL, TINY):
            tok = _get(st, system, m, "e2e_tok_s")
            r_srv = _ratio(tok, _get(st, LLAMA_SERVER, m, "e2e_tok_s"))
            r_in = _ratio(tok, _get(st, INPROC_LOW, m, "e2e_tok_s"))
            row += f" {_fmt(tok)} | {_fmt(r_srv, 2)} | {_fmt(r_in, 2)} |"
        out.append(row)
    return [*out, ""]


def _ttft_table(b2b: dict[str, Any]) -> list[str]:
    """TTFT of back-to-back 2-token tiny requests: the per-request overhead of each system."""
    if not b2b:
        return []
    out = ["TTFT of back-to-back 2-token requests on the tiny model (overhead per request):", ""]
    out += ["| system | p50 ms | p90 ms | min ms |", "|---|---:|---:|---:|"]
    for system in [s for s in SYSTEM_ORDER if s in b2b]:
        v = b2b[system]
        out.append(
            f"| {system} | {_fmt(v['p50_ms'], 2)} | {_fmt(v['p90_ms'], 2)} "
            f"| {_fmt(v['min_ms'], 2)} |"
        )
    return [*out, ""]


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report."""
    meta = results.get("meta", {})
    lines = [
        f"# modeld bench — {meta.get('date', '?')}",
        "",
        f"Machine: {meta.get('machine', '?')}; load average at start "
        f"{meta.get('load_avg_at_start')}; llama-cpp-python {meta.get('llama_cpp_python')}; "
        f"run took {meta.get('wall_s')} s.",
        f"Settings: {json.dumps(meta.get('settings', {}))}",
        "",
        NOISE_NOTE,
        "",
        "## Streaming (medians; decode tok/s from first to last token, TTFT from send)",
        "",
        *_stream_table(_get(results, "stream", "stream") or {}),
        "",
        "Greedy output compared with the in-process low-level loop: "
        + "; ".join(
            f"{system}: " + ", ".join(f"{MODEL_LABELS.get(m, m)} {v}" for m, v in per_model.items())
            for system, per_model in (_get(results, "stream", "greedy_vs_inproc") or {}).items()
        ),
        "",
        *_e2e_table(_get(results, "stream", "stream") or {}),
        *_ttft_table(_get(results, "stream", "ttft_tiny_back_to_back") or {}),
        "## Model switching (per-request latency, 16 tokens, medians)",
        "",
        "| system | same model s | alternating A/B s | ratio |",
        "|---|---:|---:|---:|",
    ]
    switching = dict(_get(results, "stream", "switching") or {})
    for key in ("switching_models_max_2", "switching_models_max_1"):
        if _get(results, "router", key):
            switching[f"llama-server router, {key[10:].replace('_', ' ')}"] = results["router"][key]
    for name, sw in switching.items():
        lines.append(
            f"| {name} | {_fmt(sw['same_model_s'], 3)} | {_fmt(sw['alternating_s'], 3)} "
            f"| {_fmt(sw['ratio'], 2)} |"
        )
    lines += ["", "## Cold request → first token (SmolLM2, fresh server)", ""]
    lines += ["| system | start → serving s | first request → first token s | note |"]
    lines += ["|---|---:|---:|---|"]
    cold = {k: v for k, v in (_get(results, "cold") or {}).items() if k != "idle_rss"}
    if _get(results, "router", "cold"):
        cold["llama-server router (--models-max 2)"] = results["router"]["cold"]
    for name, c in cold.items():
        lines.append(
            f"| {name} | {_fmt(c.get('start_s'), 3)} | {_fmt(c['first_token_s'], 3)} "
            f"| {c.get('note', '')} |"
        )
    lines += ["", "## Targets (medians; tok/s targets also as end-to-end ratios)", ""]
    lines += ["| target | measured | goal | met | end-to-end |", "|---|---|---|---|---|"]
    for t in results.get("targets", []):
        ok = {True: "yes", False: "**no**", None: "n/a"}[t["ok"]]
        lines.append(
            f"| {t['target']} | {_fmt(t['value'], 2)} | {t['goal']} | {ok} "
            f"| {_fmt(t.get('e2e'), 2)} |"
        )
    extra = {k: _get(results, *k.split(".")) for k in ("control", "cold.idle_rss")}
    extra["modeld_rss_3_models"] = _get(results, "stream", "modeld_rss_3_models")
    lines += ["", "## Control plane and memory", "", "```json", json.dumps(extra, indent=1)]
    lines += ["```", ""]
    lines += _profile_lines(results.get("profile"))
    lines += ["## Phases", "", "| phase | seconds | other processes' load (cores) |"]
    lines += ["|---|---:|---:|"]
    for name, secs in results.get("phase_s", {}).items():
        other = _get(results, "other_load_cores", name)
        lines.append(f"| {name} | {_fmt(secs)} | {_fmt(other, 2)} |")
    lines.append("")
    if results.get("skipped"):
        lines += ["## Skipped or failed", ""]
        lines += [f"- {k}: {v}" for k, v in results["skipped"].items()]
    errors = _get(results, "stream", "errors")
    if errors:
        lines += [f"- stream error, {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def _profile_lines(prof: Any) -> list[str]:
    """The daemon's CPU per token and its hottest functions, when the run profiled it."""
    if not isinstance(prof, dict):
        return []
    lines = ["## Daemon profile (tiny model streaming back to back)", ""]
    for key in ("unprofiled", "profiled"):
        if key in prof:
            lines.append(f"- {key}: {json.dumps(prof[key])}")
    lines += ["", f"py-spy, {prof.get('samples')} samples holding the GIL: {prof.get('note')}"]
    lines += ["", "| self % | function |", "|---:|---|"]
    lines += [f"| {pct} | `{fn}` |" for fn, pct in prof.get("self_by_function_pct", [])[:15]]
    lines += ["", "| inclusive % | modeld function |", "|---:|---|"]
    lines += [
        f"| {pct} | `{fn}` |" for fn, pct in prof.get("inclusive_modeld_functions_pct", [])[:15]
    ]
    lines += ["", "| self % | package |", "|---:|---|"]
    lines += [f"| {pct} | {pkg} |" for pkg, pct in prof.get("self_by_package_pct", [])]
    return [*lines, ""]


def _switch_panel(ax: Any, results: dict[str, Any]) -> None:
    """Per-request latency, same model vs alternating A/B, per system."""
    sw = dict(_get(results, "stream", "switching") or {})
    for key in ("switching_models_max_2", "switching_models_max_1"):
        if _get(results, "router", key):
            sw[f"router, max {key[-1]}"] = results["router"][key]
    names = list(sw)
    ys = range(len(names))
    same = [sw[n]["same_model_s"] * 1000 for n in names]
    alt = [sw[n]["alternating_s"] * 1000 for n in names]
    ax.barh([y - 0.2 for y in ys], same, height=0.4, label="same model", color="#1f77b4")
    ax.barh([y + 0.2 for y in ys], alt, height=0.4, label="alternating A/B", color="#ff7f0e")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_title("switching: ms per 16-token request")
    ax.legend(fontsize=8)


def chart(results: dict[str, Any], path: Path) -> str | None:
    """Write a PNG of tok/s and TTFT per system; return why not if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (make bench-deps installs it)"
    st = _get(results, "stream", "stream") or {}
    systems = [s for s in SYSTEM_ORDER if s in st]
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5))
    panels = (
        (SMOL, "decode_tok_s", "SmolLM2-135M: decode tokens/s"),
        (TINY, "e2e_tok_s", "tiny: end-to-end tokens/s"),
        (SMOL, "ttft_ms", "SmolLM2-135M: time to first token, ms"),
    )
    for ax, (model, key, title) in zip(axes.flat, panels, strict=False):
        vals = [_get(st, s, model, key) or 0.0 for s in systems]
        ax.barh(systems, vals, color=["#d62728" if s == "modeld" else "#1f77b4" for s in systems])
        ax.set_title(title)
        ax.invert_yaxis()
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    _switch_panel(axes.flat[3], results)
    fig.suptitle(f"modeld bench, {_get(results, 'meta', 'date')} (medians; noisy 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def update_docs(doc: Path, md: str) -> bool:
    """Put md between the LATEST markers of doc (docs/performance.md); False if it has none."""
    try:
        text = doc.read_text()
    except OSError:
        return False
    start, end = text.find(LATEST_BEGIN), text.find(LATEST_END)
    if start < 0 or end < start:
        return False
    body = md.split("\n", 1)[1].replace("\n## ", "\n### ")  # nest under the doc's heading
    doc.write_text(text[: start + len(LATEST_BEGIN)] + "\n" + body + "\n" + text[end:])
    return True


def write(results: dict[str, Any], out: Path, docs: Path | None = None) -> None:
    """Write latest.json, latest.md and latest.png into out; refresh docs if given."""
    out.mkdir(parents=True, exist_ok=True)
    why = chart(results, out / "latest.png")
    if why is not None:
        results["skipped"]["chart"] = why
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    (out / "latest.md").write_text(md)
    if docs is not None:
        update_docs(docs, md)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: re-render the markdown and chart from a results JSON."""
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument(
        "json", type=Path, nargs="?", default=Path(__file__).parent / "results/latest.json"
    )
    ap.add_argument("--docs", action="store_true", help="also refresh docs/performance.md")
    args = ap.parse_args(argv)
    results = json.loads(args.json.read_text())
    results["targets"] = targets(results)
    write(results, args.json.parent, DOCS if args.docs else None)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
