"""report.html: the sections of report.md with plots (inline SVG), self-contained, and a script that records
what the browser laid out (the render check of tests/test_report.py)."""

from __future__ import annotations

from typing import Any

from ragtune.eval.report.cost import (
    BREAK_EVEN_COLUMNS, COST_COLUMNS, COST_NOTE, PER_QUERY_COLUMNS, break_even_line, break_even_rows, cost_rows,
    per_query_rows,
)
from ragtune.eval.report.data import data_count_rows, loss_lines, loss_points, rejection_rows, token_rows
from ragtune.eval.report.plots import svg_bars, svg_loss, svg_paired
from ragtune.eval.report.questions import (
    is_golden, model_header, questions_line, side_by_side_models, side_by_side_rows,
)
from ragtune.eval.report.roofline import ROOFLINE_COLUMNS, ROOFLINE_NOTE, roofline_rows
from ragtune.eval.report.verdicts import (
    CONDITION_COLUMNS, CONDITION_FACT_COLUMNS, CONDITIONS_NOTE, DECLARED, GAP_NOTE, VERDICT_COLUMNS, comparison_rows,
    condition_fact_rows, condition_rows, fmt, oracle_line, results_rows, sanity_rows, skip_lines, spread_rows,
    timing_lines,
)
from ragtune.core.render import CSS, html_table
from ragtune.core.render import escape as _e

RENDER_CHECK = """
window.addEventListener('load', function () {
  var shapes = document.querySelectorAll('svg rect, svg circle, svg line, svg polyline');
  var drawn = 0;
  shapes.forEach(function (s) { var b = s.getBoundingClientRect(); if (b.width > 0 || b.height > 0) drawn++; });
  document.body.setAttribute('data-svg-shapes', String(shapes.length));
  document.body.setAttribute('data-rendered-shapes', String(drawn));
  document.querySelectorAll('[data-check]').forEach(function (el) {
    var b = el.getBoundingClientRect();
    el.setAttribute('data-box', Math.round(b.width) + 'x' + Math.round(b.height));
  });
});
"""


def render_html(labels: list[str], summaries: list[dict[str, Any]], per_question: dict[str, list[dict[str, Any]]],
                run_files: dict[str, dict[str, dict[str, Any]]] | None = None,
                costs: dict[str, dict[str, Any]] | None = None) -> str:
    """report.html; the data and training sections need `run_files` (`load_run_files` per label), the cost and
    benefit section `costs`."""
    body = ["<h1>ragtune evaluation report</h1>"]
    for label, summary in zip(labels, summaries):
        stats = summary["stats"]
        dropped = sum(summary["questions"]["dropped"].values())
        body.append(f"<h2>Run {_e(label)}</h2><p class=muted>{_e(summary['run']['run_dir'])} · "
                    f"{_e(questions_line(summary))}"
                    f"{f' ({dropped} dropped)' if dropped else ''}"
                    f" · judge {_e(summary['judge']['backend'])} <code>{_e(summary['judge']['model'])}</code> · "
                    f"{_e(stats['method'])}, {stats['n_resamples']} resamples, seed {stats['seed']}</p>")
        if summary["warnings"]:
            items = "".join(f'<li class="{"loud" if "JUDGE" in w else ""}">{_e(w)}</li>' for w in summary["warnings"])
            body.append(f'<div class="warn"><strong>Warnings</strong><ul>{items}</ul></div>')
        if summary.get("notes"):
            body.append("<ul class=muted>" + "".join(f"<li>{_e(n)}</li>" for n in summary["notes"]) + "</ul>")
        body.append("<h3>Verdicts vs base</h3><p class=muted>Paired over the questions scored for both models "
                    f"(n; excluded = failed for one or both). {_e(DECLARED)} {_e(GAP_NOTE)}</p>")
        rows = comparison_rows(summary)
        body.append(html_table(VERDICT_COLUMNS, [list(r.values()) for r in rows],
                               verdict_col=VERDICT_COLUMNS.index("verdict"), check="verdicts") if rows
                    else "<p>No model to compare.</p>")
        body.append(side_by_side_html(summary, per_question[label]))
        for mode in summary["modes"]:
            models = summary["results"].get(mode, {})
            header, rows = results_rows(summary, mode)
            body.append(f"<h3>Scores, {_e(mode)}</h3>" + html_table(header, rows))
            charts = []
            for metric in summary["metrics"]:
                bars = [(m, e[metric]["mean"], e[metric]["ci_low"], e[metric]["ci_high"])
                        for m, e in models.items() if metric in e]
                if bars:
                    charts.append(svg_bars(metric, bars))
            body.append(f"<div class=charts>{''.join(charts)}</div>")
            body.append(_paired_section(summary, mode, per_question[label]))
        body.append(conditions_html(summary))
        if run_files is not None:
            body.append(data_html(run_files[label]))
        if costs is not None:
            body.append(cost_html(costs[label]))
        if run_files is not None:
            body.append(roofline_html(run_files[label]))
        retrieval = summary["retrieval"]
        rows = [[m, fmt(e["mean"]), e["failures"]] for m, e in retrieval.items() if isinstance(e, dict)]
        body.append(f"<h3>Retrieval (same for every model)</h3><p>{_e(oracle_line(retrieval))}</p>"
                    + (html_table(["metric", "mean", "failed"], rows) if rows else ""))
        body.append("<h3>Judge sanity check</h3><p class=muted>Share of known-good vs known-bad pairs (reference "
                    "answer vs the answer to another question; source chunk vs an unrelated chunk) that the judge "
                    "ranked correctly. Chance is 50%.</p>"
                    + html_table(["metric", "pairs", "failed pairs", "rate", "95% CI"], sanity_rows(summary)))
        body.append("<h3>Time</h3><ul>" + "".join(f"<li>{_e(line)}</li>" for line in timing_lines(summary)) + "</ul>")
    if len(summaries) > 1:
        rows = spread_rows(labels, summaries)
        body.append("<h2>Across runs</h2><p class=muted>Spread of each run's delta vs its own base.</p>"
                    + html_table(["mode", "model", "metric", "runs", "mean delta", "std", "min", "max", "runs 'better'"], rows))
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>ragtune evaluation report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}<script>{RENDER_CHECK}</script></body></html>")


def _paired_section(summary: dict[str, Any], mode: str, rows: list[dict[str, Any]]) -> str:
    baseline = summary["baseline"]
    parts = []
    for model in summary.get("comparisons", {}).get(mode, {}):
        charts = []
        for metric in summary["metrics"]:
            pairs = [(r["question_id"], r[f"{baseline}.{metric}"], r[f"{model}.{metric}"]) for r in rows
                     if r["mode"] == mode and r.get(f"{baseline}.{metric}") is not None
                     and r.get(f"{model}.{metric}") is not None]
            if pairs:
                charts.append(svg_paired(metric, pairs, baseline, model))
        if charts:
            parts.append(f"<h4>Per question: {_e(baseline)} → {_e(model)} ({_e(mode)})</h4>"
                         f"<div class=charts>{''.join(charts)}</div>")
    return "".join(parts)


def conditions_html(summary: dict[str, Any]) -> str:
    """The retrieval-condition section (empty when `eval.retrieval_conditions` was off)."""
    part = summary.get("retrieval_conditions")
    if not part:
        return ""
    rows = condition_rows(part)
    return ("<h3>Retrieval conditions (did the student learn to read the context?)</h3>"
            f"<p class=muted>{_e(CONDITIONS_NOTE)}</p>"
            + html_table(CONDITION_FACT_COLUMNS, condition_fact_rows(part), check="retrieval-condition-contexts")
            + "".join(f"<p class=missing>{_e(line)}</p>" for line in skip_lines(part))
            + (html_table(CONDITION_COLUMNS, rows, verdict_col=CONDITION_COLUMNS.index("verdict"),
                          check="retrieval-conditions") if rows else "<p>No student answered.</p>")
            + "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in part["readings"]) + "</ul>")


def data_html(files: dict[str, dict[str, Any]]) -> str:
    """The data and training sections of report.html."""
    stats, tokens, loss = files["stats"], files["tokens"], files["loss"]
    body = ["<h3>Data</h3>"]
    if stats["data"] is not None:
        rejected, unrecorded = rejection_rows(stats["data"])
        body.append(f"<p class=muted>From {_e(stats['path'])}: the training rows prep kept, and what it rejected.</p>")
        body.append(html_table(["count", "value"], data_count_rows(stats["data"]), check="data-counts"))
        body.append(html_table(["rejected", "reason", "count"], rejected, check="data-rejected") if rejected
                    else "<p>No rejections recorded.</p>")
        body.append("".join(f"<p class=muted>{_e(line)}</p>" for line in unrecorded))
    else:
        body.append(f"<p class=missing>{_e(stats['problem'])}</p>")
    body.append(html_table(["tokens", "value"], token_rows(tokens["data"]), check="data-tokens")
                if tokens["data"] is not None else f"<p class=missing>{_e(tokens['problem'])}</p>")
    body.append("<h3>Training</h3>")
    if loss["data"] is not None:
        body.append(svg_loss(loss_points(loss["data"], "train"), loss_points(loss["data"], "eval")))
        body.append("<ul class=muted>" + "".join(f"<li>{_e(line)}</li>" for line in loss_lines(loss["data"])) + "</ul>")
    else:
        body.append(f"<p class=missing>{_e(loss['problem'])}</p>")
    return "".join(body)


def side_by_side_html(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    chosen = side_by_side_rows(summary, rows)
    models = side_by_side_models(summary)
    golden = is_golden(summary)
    head = ("<h3>Answers side by side (rag)</h3><p class=muted>The first "
            + ("golden" if golden else "held-out") + " questions in file order, each model's answer to the same "
            "contexts and its grounding; the reference is "
            + ("the golden set's where it gives one, else " if golden else "")
            + "the teacher's best-of-N answer that passed the answer gates, as training rows are chosen.</p>")
    if not chosen:
        return head + "<p>No rag-mode answers.</p>"
    header = ("<th>golden reference</th>" if golden else "") + "".join(
        f"<th>{_e(model_header(summary, m))}</th>" for m in models)
    out = [f'<table class=answers data-check="side-by-side"><tr><th>question</th>{header}</tr>']
    for r in chosen:
        cells = [f'<td data-model="golden reference">{_e(r["golden"] or "–")}</td>'] if golden else []
        for m in models:
            answer, grounded = r["answers"][m]
            text = "–" if answer is None else answer.strip() or "(empty)"
            score = "" if grounded is None else f"<div class=muted>grounding {grounded:.2f}</div>"
            cells.append(f'<td data-model="{_e(m)}">{_e(text)}{score}</td>')
        out.append(f'<tr data-question="{_e(r["question_id"])}"><td>{_e(r["question"])}</td>{"".join(cells)}</tr>')
    return head + "".join(out) + "</table>"


def roofline_html(files: dict[str, dict[str, Any]]) -> str:
    """Stage times against this machine's floor (nothing when the manifest recorded no roofline)."""
    rows = roofline_rows(files["manifest"]["data"])
    return (f"<h3>Time against this machine</h3><p class=muted>{_e(ROOFLINE_NOTE)}</p>"
            + html_table(ROOFLINE_COLUMNS, rows, check="roofline")) if rows else ""


def cost_html(cost: dict[str, Any]) -> str:
    body = [f"<h3>Cost and benefit</h3><p class=muted>{_e(COST_NOTE)}</p>",
            html_table(COST_COLUMNS, cost_rows(cost), check="cost")]
    rows = per_query_rows(cost)
    if rows:
        body.append(html_table(PER_QUERY_COLUMNS, rows, check="cost-per-query"))
    body.append(f"<p><strong>{_e(break_even_line(cost))}</strong></p>")
    if cost["break_even"]["table"]:
        body.append(html_table(BREAK_EVEN_COLUMNS, break_even_rows(cost), check="break-even"))
    body.append("".join(f"<p class=missing>{_e(line)}</p>" for line in cost["missing"]))
    return "".join(body)
