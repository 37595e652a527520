"""The render kit of ragtune's reports: aligned text tables for the terminal, markdown and HTML tables, HTML
escaping, the pages' CSS and palette, and the scale the inline SVG plots share.

It sits in the core so that eval's report and the app's sweep and repeats reports look alike without the app
reaching into a stage for its style.
"""

from __future__ import annotations

import html
from typing import Any, Callable

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}.warn{background:#fff0f0;border:2px solid #d62728;padding:.6em 1em;border-radius:6px}
.warn li.loud{font-weight:700;color:#b00}.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}.muted{color:#666;font-size:.9em}svg{background:#fff;border:1px solid #eee}
.missing{color:#8a5a00;font-style:italic}table.answers td{vertical-align:top;white-space:pre-wrap;max-width:22em}
"""


def escape(value: Any) -> str:
    return html.escape(str(value))


def text_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, under a dashed rule: the terminal's tables."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def md_table(header: list[str] | tuple[str, ...], rows: list[list[Any]]) -> str:
    """A markdown table; a cell's `|` is escaped and its newlines become spaces, so a cell stays one cell."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str] | tuple[str, ...], rows: list[list[Any]], verdict_col: int | None = None,
               check: str | None = None) -> str:
    """`verdict_col`'s cells that read better or worse get that class (green, red); `check` names the table for
    the report's render check (its laid-out size lands in `data-box`)."""
    attrs = f' data-check="{escape(check)}"' if check else ""
    out = [f"<table{attrs}><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ""
            if i == verdict_col and str(cell) in ("better", "worse"):
                cls = f' class="{cell}"'
            cells.append(f"<td{cls}>{escape(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    """The linear map of [lo, hi] onto [a, b] (a plot's axis: b < a flips it, as SVG's y grows downwards)."""
    return lambda v: a + (v - lo) / (hi - lo or 1.0) * (b - a)
