"""`ragtune report RUN_DIR [RUN_DIR ...]`: the evaluation as report.html, report.md and a per-question CSV.

Works offline from saved files only (eval/summary.json, answers and scores JSONL; prep's data/stats.json,
train's logs/data_stats.json and logs/loss_curve.json when they exist): no model is loaded, so several runs
(seeds, adapters, configs) can be compared anywhere. The HTML is self-contained: plots are inline SVG
(per-metric bars with confidence intervals, per-question paired dots, the loss curve), no external
scripts, fonts or images.

Cost and benefit come from the same files (prep's teacher usage, manifest.json's stage times and config prices,
eval's timings and the teacher's token counts): what the tuned student cost to make, what a rag query costs from
the teacher's API and from the student, and the break-even query count. They also go into manifest.json
(`stages.report.cost_benefit`), for scripts.

The package follows the report's seams: `verdicts` (eval/summary.json as table rows), `questions` (the
per-question table and the side-by-side answers), `data` (prep's and train's files), `cost` (cost and benefit),
`plots` (the inline SVG), and the two renderings, `markdown` and `html`; tables, escaping and style come from
ragtune.core.render.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ragtune.eval.report.cost import break_even_line, cost_benefit, prices_from
from ragtune.eval.report.data import load_run_files
from ragtune.eval.report.html import render_html
from ragtune.eval.report.markdown import render_markdown
from ragtune.eval.report.questions import SIDE_BY_SIDE, per_question_rows, write_csv
from ragtune.eval.report.verdicts import VERDICT_COLUMNS, comparison_rows, verdict_rows, verdict_table
from ragtune.core.errors import UserFacingError
from ragtune.core.run_dir import Manifest, RunDir

__all__ = ["SIDE_BY_SIDE", "VERDICT_COLUMNS", "ReportError", "break_even_line", "comparison_rows", "cost_benefit",
           "load_run_files", "load_summary", "per_question_rows", "prices_from", "render_html", "render_markdown",
           "run", "verdict_rows", "verdict_table", "write_csv"]


class ReportError(UserFacingError):
    """A run folder holds no evaluation to report."""


def run(run_dirs: list[Path], out: Path | None = None, prices: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Write report.html, report.md and per_question.csv for one run (into the run folder) or a
    comparison of several (into `out`, default FIRST_RUN_DIR/compare); record each run's cost and benefit in its
    manifest.json (priced with `prices`, default the run's own config); returns the paths, warnings and costs."""
    if not run_dirs:
        raise ReportError("give at least one run folder: ragtune report RUN_DIR [RUN_DIR ...]")
    runs = [(RunDir(Path(p)), load_summary(RunDir(Path(p)))) for p in run_dirs]
    labels = _labels(runs)
    if len(runs) == 1 and out is None:
        run_dir = runs[0][0]
        html_path, md_path, csv_path = run_dir.report_html, run_dir.report_md, run_dir.per_question_csv
    else:
        out = Path(out) if out is not None else runs[0][0].root / "compare"
        out.mkdir(parents=True, exist_ok=True)
        html_path, md_path, csv_path = out / "report.html", out / "report.md", out / "per_question.csv"

    per_question = {label: per_question_rows(run_dir, summary) for label, (run_dir, summary) in zip(labels, runs)}
    files = {label: load_run_files(run_dir) for label, (run_dir, _) in zip(labels, runs)}
    costs = {label: cost_benefit(run_dir, summary, prices) for label, (run_dir, summary) in zip(labels, runs)}
    write_csv(csv_path, per_question)
    md_path.write_text(render_markdown(labels, [s for _, s in runs], per_question, files, costs), encoding="utf-8")
    html_path.write_text(render_html(labels, [s for _, s in runs], per_question, files, costs), encoding="utf-8")
    warnings = [f"{label}: {w}" if len(runs) > 1 else w for label, (_, s) in zip(labels, runs) for w in s["warnings"]]
    for label, (run_dir, _) in zip(labels, runs):
        if run_dir.manifest.exists():  # beside the stage facts; `ragtune run` records the returned copy there too
            Manifest(run_dir).update_stage("report", cost_benefit=costs[label])
    return {"report_html": str(html_path), "report_md": str(md_path), "per_question_csv": str(csv_path),
            "runs": len(runs), "warnings": warnings, "cost_benefit": costs[labels[0]] if len(runs) == 1 else costs}


def load_summary(run_dir: RunDir) -> dict[str, Any]:
    if not run_dir.summary.exists():
        raise ReportError(f"{run_dir.summary}: no evaluation summary. Run `ragtune eval CONFIG` for this run first.")
    try:
        return json.loads(run_dir.summary.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{run_dir.summary}:{err.lineno}: not valid JSON ({err.msg}). Re-run `ragtune eval`.") from None


def _labels(runs: list[tuple[RunDir, dict[str, Any]]]) -> list[str]:
    names = [s["run"]["name"] for _, s in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{s['run']['name']}:{r.root.name}" for r, s in runs]
