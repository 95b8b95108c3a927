"""Presenting :class:`EvalResult` s: a plain-text table for the terminal and an HTML / Markdown report.

>>> from lowbit.eval import evaluate
>>> result = evaluate(qmodel, model, tok, "held_out.txt", windows=2, window_len=64, label="tiny-int4", speed=False)
>>> print(format_table([result]))  # doctest: +ELLIPSIS
2 windows × 64 tokens
model      size      bpw    ppl     Δppl    KL mean   KL p99    top-1
reference  4.6 MB    32.00  316.49  –       –         –         –
tiny-int4  670.9 kB  4.68   ...%
tiny-int4 worst windows: ...
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.eval.result import DASH, EvalResult
from lowbit.io.atomic import atomic_file


def table_rows(results: list[EvalResult]) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of every result (a reference shared by several results appears once, first, with
    the speed measured in the first evaluation).

    Columns where every row has no value are dropped.
    """
    rows: list[dict[str, str]] = []
    seen: set[tuple] = set()
    for r in results:
        for row in r.rows():
            # one row per reference model, though each evaluation timed it anew (its ratios are 1.00 anyway)
            ident = ("model", "size", "ppl", "cos mean") if row["model"] == "reference" else tuple(row)
            key = tuple((c, row.get(c)) for c in ident)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    rows.sort(key=lambda row: row["model"] != "reference")  # stable: references first
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    columns = [c for c in columns if c == "model" or any(row.get(c, DASH) != DASH for row in rows)]
    return columns, rows


def format_table(results: list[EvalResult], worst: bool = True) -> str:
    """A plain-text table, one line per model, with the data summary above and (up to 3) worst windows below.

    >>> from lowbit.eval.result import EvalResult
    >>> print(format_table([EvalResult("m", "causal", 2, 8, 14, perplexity=3.0)]))
    2 windows × 8 tokens
    model  ppl
    m      3.00
    """
    if not results:
        return ""
    columns, rows = table_rows(results)
    widths = {c: max(len(c), *(len(row.get(c, DASH)) for row in rows)) for c in columns}
    lines = sorted({r.summary_line() for r in results})
    lines.append("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        lines.append("  ".join(row.get(c, DASH).ljust(widths[c]) for c in columns).rstrip())
    if worst:
        lines += [r.worst_line(3) for r in results if r.worst]
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------
def _figure(w: float = 6.4, h: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_kl_hist(results: list[EvalResult]) -> bytes | None:
    """Histogram of per-position KL (log-spaced bins), one outline per model; None when no KL was measured."""
    have = [r for r in results if r.kl_positions is not None and r.kl_positions.numel()]
    if not have:
        return None
    floor = 1e-8  # KL below this (identical predictions) lands in the first bin
    lo = max(floor, min(float(r.kl_positions.clamp_min(floor).min()) for r in have))
    hi = max(lo * 10, max(float(r.kl_positions.max()) for r in have))
    edges = torch.logspace(torch.log10(torch.tensor(lo)).item(), torch.log10(torch.tensor(hi)).item(), 61).numpy()
    fig, ax = _figure()
    for r in have:
        ax.hist(r.kl_positions.clamp_min(floor).numpy(), bins=edges, histtype="step", linewidth=1.4,
                label=f"{r.label} (mean {r.kl_mean:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("KL(p_ref ‖ p_model) per position [nats]")
    ax.set_ylabel("positions")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_size_vs_quality(results: list[EvalResult]) -> bytes | None:
    """Scatter of model size (MB) against mean KL (causal) or 1 − mean cosine (encoders)."""
    pts = []
    for r in results:
        y = r.kl_mean if r.kind == "causal" else (None if r.cos_mean is None else 1.0 - r.cos_mean)
        if y is not None and r.size is not None:
            pts.append((r.size.total_bytes / 1e6, max(y, 1e-9), r.label))
    if not pts:
        return None
    fig, ax = _figure()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=28)
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.margins(0.15)  # room for the labels
    ax.set_xlabel("size [MB]")
    ax.set_ylabel("mean KL [nats]" if any(r.kind == "causal" for r in results) else "1 − mean cosine")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_window_kl(results: list[EvalResult]) -> bytes | None:
    """Mean KL of each window, one line per model (shows whether a few passages dominate)."""
    have = [r for r in results if r.window_kl]
    if not have:
        return None
    fig, ax = _figure()
    for r in have:
        ax.plot(range(len(r.window_kl)), r.window_kl, marker=".", linewidth=1, label=r.label)
    ax.set_yscale("log")
    ax.set_xlabel("window")
    ax.set_ylabel("mean KL [nats]")
    ax.legend(fontsize=8)
    return _png(fig)


# -- report files -------------------------------------------------------------------------------
_PLOTS = (("KL distribution", plot_kl_hist), ("size vs quality", plot_size_vs_quality),
          ("KL per window", plot_window_kl))


def write_report(results: list[EvalResult], path: str | os.PathLike, title: str = "lowbit evaluation", *,
                 tasks: Sequence = (), generations: Any = None) -> Path:
    """Write a report: ``.html`` → one self-contained file (plots inlined as PNG); ``.md`` → Markdown with
    the PNGs written beside it (``<stem>-<plot>.png``). Returns the report's path.

    >>> from lowbit.eval import evaluate
    >>> result = evaluate(qmodel, model, tok, "held_out.txt", windows=2, window_len=64, speed=False)
    >>> write_report([result], "eval.html")
    PosixPath('eval.html')
    >>> write_report([result], "eval.md"), sorted(p.name for p in Path().glob("eval-*.png"))
    (PosixPath('eval.md'), ['eval-KL-distribution.png', 'eval-KL-per-window.png', 'eval-size-vs-quality.png'])
    """
    if not results and not tasks and generations is None:
        raise LowbitError("write_report: no results to report")
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm", ".md"):
        raise LowbitError(f"{p}: report must end in .html or .md")
    plots = [(name, fn(results)) for name, fn in _PLOTS]
    plots = [(name, png) for name, png in plots if png is not None]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    data = json.dumps([r.to_dict() for r in results], indent=1, default=str)
    extra = _task_text(tasks, generations)
    if p.suffix.lower() == ".md":
        body = [f"# {title}", "", f"_{stamp}_", "", "```", format_table(results), extra, "```", ""]
        for name, png in plots:
            img = p.with_name(f"{p.stem}-{name.replace(' ', '-')}.png")
            with atomic_file(img) as tmp:
                tmp.write_bytes(png)
            body += [f"## {name}", "", f"![{name}]({img.name})", ""]
        body += ["<details><summary>raw results (JSON)</summary>", "", "```json", data, "```", "</details>", ""]
        text = "\n".join(body)
    else:
        text = _html(results, plots, title, stamp, data)
        if extra:
            sect = f"<h2>tasks and generations</h2><pre>{html.escape(extra)}</pre>"
            text = text.replace("<details>", sect + "<details>", 1)
    with atomic_file(p) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return p


def _task_text(tasks: Sequence, generations: Any) -> str:
    """Task accuracies and side-by-side generations as text (see :mod:`lowbit.eval.tasks`)."""
    from lowbit.eval.generations import format_generations
    from lowbit.eval.tasks import format_tasks

    parts = ([format_tasks(tasks)] if tasks else []) + ([format_generations(generations)] if generations else [])
    return "\n\n".join(parts)


def _html(results, plots, title, stamp, data) -> str:
    columns, rows = table_rows(results)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(row.get(c, DASH))}</td>" for c in columns) + "</tr>" for row in rows)
    worst = "".join(f"<li>{esc(r.worst_line())}</li>" for r in results if r.worst_line())
    figs = "".join(
        f'<h2>{esc(name)}</h2><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in plots
    )
    summary = esc("; ".join(sorted({r.summary_line() for r in results})))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
        f"</head><body><h1>{esc(title)}</h1><p>{summary} · {esc(stamp)}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"{f'<ul>{worst}</ul>' if worst else ''}{figs}"
        f"<details><summary>raw results (JSON)</summary><pre>{esc(data)}</pre></details></body></html>\n"
    )
