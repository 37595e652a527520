"""The report's inline SVG plots: bars of means with CIs, per-question paired dots, the loss curve."""

from __future__ import annotations

from ragtune.core.render import PALETTE, scale
from ragtune.core.render import escape as _e


def svg_bars(title: str, bars: list[tuple[str, float | None, float | None, float | None]]) -> str:
    """Bars of means with CI whiskers, one per model."""
    width, height, left, bottom, top = max(170, 60 + 46 * len(bars)), 190, 34, 40, 22
    values = [v for _, m, lo, hi in bars for v in (m, lo, hi) if v is not None]
    lo, hi = min([0.0, *values]), max([1.0, *values])
    y = scale(lo, hi, height - bottom, top)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="11" font-weight="600">{_e(title)}</text>',
             f'<line x1="{left}" y1="{y(lo)}" x2="{width - 8}" y2="{y(lo)}" stroke="#999"/>']
    for tick in (lo, (lo + hi) / 2, hi):
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 4}" text-anchor="end" font-size="9">{tick:.1f}</text>')
    for i, (label, mean, ci_low, ci_high) in enumerate(bars):
        x = left + 10 + i * 46
        if mean is not None:
            parts.append(f'<rect x="{x}" y="{min(y(mean), y(0 if lo <= 0 else lo))}" width="30" '
                         f'height="{abs(y(mean) - y(0 if lo <= 0 else lo)) or 1}" fill="{PALETTE[i % len(PALETTE)]}">'
                         f'<title>{_e(label)}: {mean:.3f}</title></rect>')
        if ci_low is not None and ci_high is not None:
            if ci_high > ci_low:
                parts.append(f'<line x1="{x + 15}" y1="{y(ci_low)}" x2="{x + 15}" y2="{y(ci_high)}" stroke="#222" '
                             'stroke-width="1.5"/>')
            for v in (ci_low, ci_high):
                parts.append(f'<line x1="{x + 9}" y1="{y(v)}" x2="{x + 21}" y2="{y(v)}" stroke="#222" stroke-width="1.5"/>')
        parts.append(f'<text x="{x + 15}" y="{height - bottom + 14}" text-anchor="middle" font-size="9">{_e(label[:9])}</text>')
    if all(mean is None for _, mean, _, _ in bars):
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="10" fill="#c62828">'
                     "no scores: every sample failed</text>")
    parts.append("</svg>")
    return "".join(parts)


def svg_paired(title: str, pairs: list[tuple[str, float, float]], left_label: str, right_label: str) -> str:
    """Per-question paired dots: base on the left, tuned on the right, one line per question."""
    width, height, top, bottom = 200, 190, 24, 30
    values = [v for _, a, b in pairs for v in (a, b)]
    lo, hi = min([0.0, *values]), max([1.0, *values])
    y = scale(lo, hi, height - bottom, top)
    xa, xb = 50, 140
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="11" font-weight="600">{_e(title)}</text>',
             f'<line x1="{xa}" y1="{y(lo)}" x2="{xa}" y2="{y(hi)}" stroke="#ddd"/>',
             f'<line x1="{xb}" y1="{y(lo)}" x2="{xb}" y2="{y(hi)}" stroke="#ddd"/>']
    for qid, a, b in pairs:
        colour = "#1a7f37" if b > a else "#c62828" if b < a else "#888"
        parts.append(f'<line x1="{xa}" y1="{y(a):.1f}" x2="{xb}" y2="{y(b):.1f}" stroke="{colour}" stroke-opacity=".6"/>')
        for x, v in ((xa, a), (xb, b)):
            parts.append(f'<circle cx="{x}" cy="{y(v):.1f}" r="3" fill="{colour}"><title>{_e(qid)}: {v:.3f}</title></circle>')
    for x, label in ((xa, left_label), (xb, right_label)):
        parts.append(f'<text x="{x}" y="{height - 10}" text-anchor="middle" font-size="10">{_e(label[:14])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_loss(train: list[tuple[float, float]], evals: list[tuple[float, float]]) -> str:
    """Train loss (line) and eval loss (line with dots) against the optimizer step."""
    width, height, left, right, top, bottom = 560, 250, 52, 110, 24, 36
    steps = [s for s, _ in train + evals] or [0.0, 1.0]
    losses = [v for _, v in train + evals] or [0.0, 1.0]
    pad = (max(losses) - min(losses)) * 0.05 or 0.05
    x = scale(min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1, left, width - right)
    y = scale(min(losses) - pad, max(losses) + pad, height - bottom, top)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" class="loss-curve" '
             'data-check="loss-plot">',
             '<text x="10" y="15" font-size="11" font-weight="600">loss by step</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>']
    for tick in (min(losses), (min(losses) + max(losses)) / 2, max(losses)):
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 3:.1f}" text-anchor="end" font-size="9">{tick:.3g}</text>')
    for tick in sorted({min(steps), round((min(steps) + max(steps)) / 2), max(steps)}):
        parts.append(f'<text x="{x(tick):.1f}" y="{height - bottom + 13}" text-anchor="middle" font-size="9">{tick:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" font-size="10">step</text>'
                 f'<text x="12" y="{(top + height - bottom) / 2}" font-size="10" transform="rotate(-90 12 '
                 f'{(top + height - bottom) / 2})" text-anchor="middle">loss</text>')
    for i, (name, points) in enumerate((("train loss", train), ("eval loss", evals))):
        colour = PALETTE[i]
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        if len(points) > 1:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.8" '
                         f'data-series="{name}"/>')
        if name == "eval loss" or len(points) <= 60:
            parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"><title>{name}, step {s:g}: '
                      f'{v:.4f}</title></circle>' for s, v in points]
        parts.append(f'<rect x="{width - right + 12}" y="{top + 16 * i}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - right + 26}" y="{top + 9 + 16 * i}" font-size="10">{name} ({len(points)})</text>')
    parts.append("</svg>")
    return "".join(parts)
