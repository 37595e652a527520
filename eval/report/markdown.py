"""report.md: each run's verdicts, answers side by side, mean scores, data, training, cost, retrieval, judge check
and time, then the spread across runs."""

from __future__ import annotations

from typing import Any

from ragtune.eval.report.cost import (
    BREAK_EVEN_COLUMNS, COST_COLUMNS, COST_NOTE, PER_QUERY_COLUMNS, break_even_line, break_even_rows, cost_rows,
    per_query_rows,
)
from ragtune.eval.report.data import data_count_rows, loss_lines, rejection_rows, token_rows
from ragtune.eval.report.questions import (
    is_golden, model_header, questions_line, side_by_side_models, side_by_side_rows,
)
from ragtune.eval.report.roofline import ROOFLINE_COLUMNS, ROOFLINE_NOTE, roofline_rows
from ragtune.eval.report.verdicts import (
    CONDITION_COLUMNS, CONDITION_FACT_COLUMNS, CONDITIONS_NOTE, DECLARED, GAP_NOTE, VERDICT_COLUMNS, comparison_rows,
    condition_fact_rows, condition_rows, fmt, oracle_line, results_rows, sanity_rows, skip_lines, spread_rows,
    timing_lines,
)
from ragtune.core.render import md_table


def render_markdown(labels: list[str], summaries: list[dict[str, Any]],
                    per_question: dict[str, list[dict[str, Any]]] | None = None,
                    run_files: dict[str, dict[str, dict[str, Any]]] | None = None,
                    costs: dict[str, dict[str, Any]] | None = None) -> str:
    """report.md; the side-by-side answers need `per_question`, the data and training sections `run_files`, the
    cost and benefit section `costs` (`cost_benefit` per label)."""
    parts = ["# ragtune evaluation report", ""]
    for label, summary in zip(labels, summaries):
        parts += [f"## Run `{label}`", "", f"Folder: `{summary['run']['run_dir']}` · "
                  f"{questions_line(summary)} · judge: {summary['judge']['backend']} "
                  f"`{summary['judge']['model']}` · {summary['stats']['method']}, "
                  f"{summary['stats']['n_resamples']} resamples, seed {summary['stats']['seed']}", ""]
        if summary["warnings"]:
            parts += ["### ⚠ Warnings", ""] + [f"- **{w}**" if i == 0 and "JUDGE" in w else f"- {w}"
                                               for i, w in enumerate(summary["warnings"])] + [""]
        parts += [f"- {note}" for note in summary.get("notes", [])] + [""]
        parts += ["### Verdicts (vs base, paired over questions scored for both)", "",
                  f"{DECLARED} {GAP_NOTE}", ""]
        rows = comparison_rows(summary)
        parts += [md_table(VERDICT_COLUMNS, [list(r.values()) for r in rows]) if rows else "_no model to compare_", ""]
        if per_question is not None:
            parts += side_by_side_markdown(summary, per_question[label])
        for mode in summary["modes"]:
            header, rows = results_rows(summary, mode)
            parts += [f"### Mean scores, {mode}", "", md_table(header, rows), ""]
        parts += conditions_markdown(summary)
        if run_files is not None:
            parts += data_markdown(run_files[label])
        if costs is not None:
            parts += cost_markdown(costs[label])
        if run_files is not None:
            parts += roofline_markdown(run_files[label])
        retrieval = summary["retrieval"]
        parts += ["### Retrieval (same for every model)", "", oracle_line(retrieval), ""]
        rows = [[m, fmt(e["mean"]), str(e["failures"])] for m, e in retrieval.items() if isinstance(e, dict)]
        if rows:
            parts += [md_table(["metric", "mean", "failed"], rows), ""]
        parts += ["### Judge sanity check", "", "Share of known-good/known-bad pairs the judge ranked correctly "
                  "(chance = 50%).", "", md_table(["metric", "pairs", "failed pairs", "rate", "95% CI"], sanity_rows(summary)),
                  "", "### Time", ""] + [f"- {line}" for line in timing_lines(summary)] + [""]
    if len(summaries) > 1:
        rows = spread_rows(labels, summaries)
        parts += ["## Across runs (seeds / configs)", "", "Spread of each run's delta vs its own base.", "",
                  md_table(["mode", "model", "metric", "runs", "mean delta", "std", "min", "max", "runs 'better'"], rows)
                  if rows else "_no comparison shared by two runs_", ""]
    return "\n".join(parts)


def _answer_md(answer: str | None, grounded: float | None) -> str:
    text = "–" if answer is None else answer.strip() or "(empty)"
    return text + ("" if grounded is None else f" (grounding {grounded:.2f})")


def conditions_markdown(summary: dict[str, Any]) -> list[str]:
    """The retrieval-condition section (`eval.retrieval_conditions`; none when it was off)."""
    part = summary.get("retrieval_conditions")
    if not part:
        return []
    rows = condition_rows(part)
    return (["### Retrieval conditions (did the student learn to read the context?)", "", CONDITIONS_NOTE, "",
             md_table(CONDITION_FACT_COLUMNS, condition_fact_rows(part)), ""]
            + [f"- {line}" for line in skip_lines(part)] + ([""] if skip_lines(part) else [])
            + [md_table(CONDITION_COLUMNS, rows) if rows else "_no student answered_", ""]
            + [f"- {line}" for line in part["readings"]] + ([""] if part["readings"] else []))


def data_markdown(files: dict[str, dict[str, Any]]) -> list[str]:
    """The data and training sections of report.md (what exists; what is missing, said)."""
    parts = ["### Data", ""]
    stats, tokens, loss = files["stats"], files["tokens"], files["loss"]
    if stats["data"] is not None:
        rejected, unrecorded = rejection_rows(stats["data"])
        parts += [md_table(["count", "value"], data_count_rows(stats["data"])), ""]
        parts += [md_table(["rejected", "reason", "count"], rejected) if rejected else "_no rejections recorded_", ""]
        parts += [f"- {line}" for line in unrecorded] + ([""] if unrecorded else [])
    else:
        parts += [f"_{stats['problem']}_", ""]
    parts += ([md_table(["tokens", "value"], token_rows(tokens["data"])), ""] if tokens["data"] is not None
              else [f"_{tokens['problem']}_", ""])
    parts += ["### Training", ""]
    parts += ([f"- {line}" for line in loss_lines(loss["data"])] + ["- the plot is in report.html", ""]
              if loss["data"] is not None else [f"_{loss['problem']}_", ""])
    return parts


def side_by_side_markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    chosen = side_by_side_rows(summary, rows)
    models = side_by_side_models(summary)
    parts = ["### Answers side by side (rag)", ""]
    if not chosen:
        return parts + ["_no rag-mode answers_", ""]
    golden = is_golden(summary)
    table = [[r["question"], *([r["golden"] or "–"] if golden else []), *[_answer_md(*r["answers"][m]) for m in models]]
             for r in chosen]
    return parts + [md_table(["question", *(["golden reference"] if golden else []),
                              *[model_header(summary, m) for m in models]], table), ""]


def roofline_markdown(files: dict[str, dict[str, Any]]) -> list[str]:
    """Stage times against this machine's floor (none when the manifest recorded no roofline)."""
    rows = roofline_rows(files["manifest"]["data"])
    return ["### Time against this machine", "", ROOFLINE_NOTE, "", md_table(ROOFLINE_COLUMNS, rows), ""] if rows else []


def cost_markdown(cost: dict[str, Any]) -> list[str]:
    parts = ["### Cost and benefit", "", COST_NOTE, "", md_table(COST_COLUMNS, cost_rows(cost)), ""]
    rows = per_query_rows(cost)
    parts += [md_table(PER_QUERY_COLUMNS, rows), ""] if rows else []
    parts += [break_even_line(cost), ""]
    if cost["break_even"]["table"]:
        parts += [md_table(BREAK_EVEN_COLUMNS, break_even_rows(cost)), ""]
    parts += [f"- {line}" for line in cost["missing"]] + ([""] if cost["missing"] else [])
    return parts
