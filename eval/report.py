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
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from ragtune.eval.score import load_scores
from ragtune.eval.stats import MIN_QUESTIONS, spread
from ragtune.core.artifacts import read_jsonl, tmp_path
from ragtune.core.errors import UserFacingError
from ragtune.core.run_dir import Manifest, RunDir

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
VERDICT_COLUMNS = ("mode", "model", "metric", "n", "base", "tuned", "delta (95% CI)", "verdict", "teacher", "gap closed")
DECLARED = (f"A difference is declared only when its 95% CI excludes 0 and the two models' scores differ on at least "
            f"{MIN_QUESTIONS} questions.")
GAP_NOTE = ("Gap closed = (tuned − base) / (teacher − base) on the questions scored for all three; '–' where the "
            "teacher is not scored (reference-based metrics where the teacher wrote the references) or does not "
            "lead the base.")
# Held-out questions shown with every model's rag answer side by side: enough to see what changed, few enough to read.
SIDE_BY_SIDE = 6


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


def load_run_files(run_dir: RunDir) -> dict[str, dict[str, Any]]:
    """prep's data/stats.json (`stats`), train's logs/data_stats.json (`tokens`) and logs/loss_curve.json
    (`loss`): each {"path", "data"} with data None and a `problem` when the file is missing or unreadable."""
    files = {"stats": (run_dir.stats, "`ragtune prep` writes it"),
             "tokens": (run_dir.data_stats, "`ragtune train` writes the token statistics"),
             "loss": (run_dir.loss_curve, "`ragtune train` writes it")}
    out: dict[str, dict[str, Any]] = {}
    for name, (path, writer) in files.items():
        entry: dict[str, Any] = {"path": str(path.relative_to(run_dir.root)), "data": None, "problem": None}
        if not path.exists():
            entry["problem"] = f"{entry['path']} is missing ({writer})"
        else:
            try:
                entry["data"] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                entry["problem"] = f"{entry['path']}:{err.lineno}: not valid JSON ({err.msg})"
        out[name] = entry
    return out


def _labels(runs: list[tuple[RunDir, dict[str, Any]]]) -> list[str]:
    names = [s["run"]["name"] for _, s in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{s['run']['name']}:{r.root.name}" for r, s in runs]


# --- verdicts -----------------------------------------------------------------------------------


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def comparison_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """Every comparison vs the base: one row per (mode, model, metric), columns `VERDICT_COLUMNS`."""
    rows = []
    for mode, models in summary.get("comparisons", {}).items():
        for model, metrics in models.items():
            for metric, c in metrics.items():
                n = str(c["n"]) + (f" ({c['excluded']} excl.)" if c.get("excluded") else "")
                rows.append(dict(zip(VERDICT_COLUMNS, (mode, model, metric, n, _fmt(c["base"]), _fmt(c["tuned"]),
                                                       _delta(c), c["verdict"], _fmt(c.get("teacher")),
                                                       _gap(c.get("gap_closed"))))))
    return rows


def _gap(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _delta(c: dict[str, Any]) -> str:
    text = _fmt(c["delta"], signed=True)
    if c["ci_low"] is not None:
        text += f" [{_fmt(c['ci_low'], True)}, {_fmt(c['ci_high'], True)}]"
    return text


def verdict_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """The short verdict table for the terminal: (metric, base, tuned, delta with 95% CI, verdict, gap closed)
    for each fine-tuned model (adapters, merged) vs the base; the metric reads `faithfulness (adapter, rag)`."""
    tuned = {m["name"] for m in summary.get("models", []) if m["kind"] in ("adapter", "merged")}
    return [(f"{r['metric']} ({r['model']}, {r['mode']})", r["base"], r["tuned"], r["delta (95% CI)"], r["verdict"],
             r["gap closed"]) for r in comparison_rows(summary) if r["model"] in tuned]


def verdict_table(summary: dict[str, Any]) -> str:
    """`verdict_rows` as aligned plain text."""
    return _text_table(("metric", "base", "tuned", "delta (95% CI)", "verdict", "gap closed"),
                       [list(r) for r in verdict_rows(summary)])


def _text_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


# --- per-question table -------------------------------------------------------------------------


def questions_line(summary: dict[str, Any]) -> str:
    """Whose questions were answered: "25 golden questions (FILE)" or "30 held-out questions"."""
    source = summary["questions"].get("source") or {"kind": "prep"}
    n = summary["questions"]["evaluated"]
    if source["kind"] == "golden":
        return f"{n} golden questions ({source['file']})"
    return f"{n} held-out questions"


def is_golden(summary: dict[str, Any]) -> bool:
    return (summary["questions"].get("source") or {}).get("kind") == "golden"


def per_question_rows(run_dir: RunDir, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (mode, question): the question, the reference (a golden one, else the teacher's rag answer) and
    whose it is, every model's answer and scores."""
    files = summary["files"]
    golden = summary["questions"].get("golden_references") or {}
    retrieval = {r["question_id"]: r for r in read_jsonl(run_dir.retrieval)} if run_dir.retrieval.exists() else {}
    reference_rel = files["answers"].get(summary["reference"], {}).get("rag")
    reference = {r["question_id"]: r for r in read_jsonl(run_dir.root / reference_rel)} if reference_rel else {}
    retriever_scores = load_scores(run_dir.root / files["retrieval_scores"]) if "retrieval_scores" in files else {}
    rows = []
    for mode in summary["modes"]:
        answers = {m: {r["question_id"]: r for r in read_jsonl(run_dir.root / p[mode])}
                   for m, p in files["answers"].items() if mode in p}
        scores = {m: load_scores(run_dir.root / p[mode]) for m, p in files["scores"].items() if mode in p}
        qids = list(dict.fromkeys(q for table in answers.values() for q in table))
        for qid in qids:
            any_answer = next(table[qid] for table in answers.values() if qid in table)
            row: dict[str, Any] = {"mode": mode, "question_id": qid, "question": any_answer["question"],
                                   "reference_answer": golden.get(qid) or (reference.get(qid) or {}).get("answer"),
                                   "reference_source": "golden" if qid in golden else summary["reference"],
                                   "context_ids": " ".join(retrieval.get(qid, {}).get("context_ids", [])),
                                   "oracle_in_context": retrieval.get(qid, {}).get("oracle_in_context")}
            for metric in summary.get("retrieval_metrics", []):
                row[f"retriever.{metric}"] = retriever_scores.get(qid, {}).get(metric, {}).get("value")
            for model in answers:
                answer = answers[model].get(qid, {})
                row[f"{model}.answer"] = answer.get("answer") if answer.get("error") is None else f"[error] {answer['error']}"
            for model, table in scores.items():
                failures = []
                for metric, entry in table.get(qid, {}).items():
                    row[f"{model}.{metric}"] = entry["value"]
                    if entry["value"] is None:
                        failures.append(f"{metric}: {entry['error']}")
                row[f"{model}.failures"] = "; ".join(failures)
            rows.append(row)
    return rows


def write_csv(path: Path, per_run: dict[str, list[dict[str, Any]]]) -> None:
    columns: list[str] = ["run"]
    for rows in per_run.values():
        for row in rows:
            columns += [k for k in row if k not in columns]
    tmp = tmp_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("x", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for label, rows in per_run.items():
            for row in rows:
                writer.writerow({"run": label, **row})
    tmp.replace(path)


# --- data, training, answers side by side -------------------------------------------------------

DATASET_COUNTS = ("documents", "pages", "chunks", "train_regions", "eval_regions", "questions_train", "questions_eval",
                  "train_rows", "answers_kept", "questions_without_answer")
REJECTIONS = (("question", "questions_rejected"), ("answer", "answers_rejected"))


def _prep_fact(stats: dict[str, Any], key: str) -> Any:
    """A dataset fact of data/stats.json: under `dataset` (where prep puts its counts) or at the top."""
    return stats.get("dataset", {}).get(key, stats.get(key))


def data_count_rows(stats: dict[str, Any]) -> list[list[Any]]:
    """(count, value): the training rows kept (and by mode), then prep's dataset counts that exist."""
    rows: list[list[Any]] = [["training rows kept", stats.get("rows", "–")]]
    rows += [[f"training rows, {mode}", n] for mode, n in stats.get("rows_by_mode", {}).items()]
    rows += [[key.replace("_", " "), _prep_fact(stats, key)] for key in DATASET_COUNTS
             if isinstance(_prep_fact(stats, key), (int, float))]
    if stats.get("teacher_cost_usd") is not None:
        rows.append(["teacher cost (USD)", stats["teacher_cost_usd"]])
    return rows


def rejection_rows(stats: dict[str, Any]) -> tuple[list[list[Any]], list[str]]:
    """(what, reason, rejected) for each rejection reason prep counted, and the kinds it did not record."""
    rows, unrecorded = [], []
    for what, key in REJECTIONS:
        counts = _prep_fact(stats, key)
        if not isinstance(counts, dict):
            unrecorded.append(f"{what} rejections are not recorded in data/stats.json ({key})")
            continue
        rows += [[what, reason, n] for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return rows, unrecorded


def token_rows(tokens: dict[str, Any]) -> list[list[Any]]:
    """(statistic, value) of the train stage's token counts (the student's tokenizer and chat template)."""
    rows: list[list[Any]] = [["tokens, all rows", tokens.get("tokens_total", "–")]]
    rows += [[f"tokens per row, {k}", v] for k, v in tokens.get("tokens_per_row", {}).items()]
    for key, label in (("assistant_tokens_total", "answer tokens, all rows"), ("training_tokens", "training tokens × epochs")):
        if key in tokens:
            rows.append([label, tokens[key]])
    if "rows_over_max_length" in tokens:
        rows.append([f"rows over max_length ({tokens.get('max_length')}), truncated in training",
                     tokens["rows_over_max_length"]])
    return rows


def loss_points(curve: dict[str, Any], series: str) -> list[tuple[float, float]]:
    """(step, loss) of `train` or `eval` in logs/loss_curve.json; train/sft.py stores both under `loss`."""
    points = [(p.get("step"), p.get("loss", p.get("eval_loss"))) for p in curve.get(series, [])]
    return [(float(s), float(v)) for s, v in points
            if isinstance(s, (int, float)) and isinstance(v, (int, float)) and math.isfinite(v)]


def loss_lines(curve: dict[str, Any]) -> list[str]:
    """One line per series: points, steps, first, last and lowest loss (the markdown's stand-in for the plot)."""
    lines = []
    for series, label in (("train", "train loss"), ("eval", "eval loss")):
        points = loss_points(curve, series)
        if not points:
            lines.append(f"{label}: no points")
            continue
        lowest = min(points, key=lambda p: p[1])
        lines.append(f"{label}: {len(points)} points, steps {points[0][0]:g}–{points[-1][0]:g}, first {points[0][1]:.4f}, "
                     f"last {points[-1][1]:.4f}, lowest {lowest[1]:.4f} (step {lowest[0]:g})")
    return lines


def svg_loss(train: list[tuple[float, float]], evals: list[tuple[float, float]]) -> str:
    """Train loss (line) and eval loss (line with dots) against the optimizer step."""
    width, height, left, right, top, bottom = 560, 250, 52, 110, 24, 36
    steps = [s for s, _ in train + evals] or [0.0, 1.0]
    losses = [v for _, v in train + evals] or [0.0, 1.0]
    pad = (max(losses) - min(losses)) * 0.05 or 0.05
    x = _scale(min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1, left, width - right)
    y = _scale(min(losses) - pad, max(losses) + pad, height - bottom, top)
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


def side_by_side_models(summary: dict[str, Any]) -> list[str]:
    """The base, each fine-tuned model, then the reference (teacher): the columns of the side-by-side table."""
    tuned = [m["name"] for m in summary.get("models", []) if m["kind"] in ("adapter", "merged")]
    return [summary["baseline"], *tuned, summary["reference"]]


def side_by_side_rows(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first `SIDE_BY_SIDE` held-out questions in rag mode (file order: no picking), each with every
    model's answer and its grounding score."""
    chosen = [r for r in rows if r["mode"] == "rag"][:SIDE_BY_SIDE]
    return [{"question_id": r["question_id"], "question": r["question"],
             "golden": r["reference_answer"] if r.get("reference_source") == "golden" else None,
             "answers": {m: (r.get(f"{m}.answer"), r.get(f"{m}.grounding")) for m in side_by_side_models(summary)}}
            for r in chosen]


def _model_header(summary: dict[str, Any], model: str) -> str:
    """A side-by-side column's name: the teacher is "(reference)" unless the golden set gives the references."""
    if model != summary["reference"]:
        return model
    return f"{model} (reference where no golden one)" if is_golden(summary) else f"{model} (reference)"


def _answer_md(answer: str | None, grounded: float | None) -> str:
    text = "–" if answer is None else answer.strip() or "(empty)"
    return text + ("" if grounded is None else f" (grounding {grounded:.2f})")


def data_markdown(files: dict[str, dict[str, Any]]) -> list[str]:
    """The data and training sections of report.md (what exists; what is missing, said)."""
    parts = ["### Data", ""]
    stats, tokens, loss = files["stats"], files["tokens"], files["loss"]
    if stats["data"] is not None:
        rejected, unrecorded = rejection_rows(stats["data"])
        parts += [_md_table(["count", "value"], data_count_rows(stats["data"])), ""]
        parts += [_md_table(["rejected", "reason", "count"], rejected) if rejected else "_no rejections recorded_", ""]
        parts += [f"- {line}" for line in unrecorded] + ([""] if unrecorded else [])
    else:
        parts += [f"_{stats['problem']}_", ""]
    parts += ([_md_table(["tokens", "value"], token_rows(tokens["data"])), ""] if tokens["data"] is not None
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
    return parts + [_md_table(["question", *(["golden reference"] if golden else []),
                               *[_model_header(summary, m) for m in models]], table), ""]


def data_html(files: dict[str, dict[str, Any]]) -> str:
    """The data and training sections of report.html."""
    stats, tokens, loss = files["stats"], files["tokens"], files["loss"]
    body = ["<h3>Data</h3>"]
    if stats["data"] is not None:
        rejected, unrecorded = rejection_rows(stats["data"])
        body.append(f"<p class=muted>From {_e(stats['path'])}: the training rows prep kept, and what it rejected.</p>")
        body.append(_html_table(["count", "value"], data_count_rows(stats["data"]), check="data-counts"))
        body.append(_html_table(["rejected", "reason", "count"], rejected, check="data-rejected") if rejected
                    else "<p>No rejections recorded.</p>")
        body.append("".join(f"<p class=muted>{_e(line)}</p>" for line in unrecorded))
    else:
        body.append(f"<p class=missing>{_e(stats['problem'])}</p>")
    body.append(_html_table(["tokens", "value"], token_rows(tokens["data"]), check="data-tokens")
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
        f"<th>{_e(_model_header(summary, m))}</th>" for m in models)
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


# --- cost and benefit ---------------------------------------------------------------------------

# Query volumes of the break-even table: a pilot to a busy product.
QUERY_VOLUMES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
PRICE_KEYS = {"teacher_input_per_million": ("teacher", "price_per_million_input_tokens"),
              "teacher_output_per_million": ("teacher", "price_per_million_output_tokens"),
              "gpu_hour": ("cost", "price_per_gpu_hour"), "cpu_hour": ("cost", "price_per_cpu_hour")}


def prices_from(config: dict[str, Any]) -> dict[str, float | None]:
    """The four prices of a resolved config (the run's, from manifest.json, or `ragtune report --config`)."""
    return {name: (config.get(section) or {}).get(key) for name, (section, key) in PRICE_KEYS.items()}


def _usd(tokens_in: float, tokens_out: float, prices: dict[str, float | None]) -> float | None:
    p_in, p_out = prices["teacher_input_per_million"], prices["teacher_output_per_million"]
    if p_in is None and p_out is None:
        return None
    return (tokens_in * (p_in or 0.0) + tokens_out * (p_out or 0.0)) / 1e6


def teacher_usage(run_dir: RunDir, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """prep's teacher calls: {"answers_kept", "answers_rejected", "questions"} → calls, tokens in and out, how
    counted. Kept rows carry the backend's counts (meta.usage, all candidates); rejected answers and question
    generations carry only text, so their tokens are estimated at the characters per token measured on the kept
    rows' prompts (None when no kept row has counts)."""
    calls = prompt_tokens = completion_tokens = prompt_chars = 0
    for row in read_jsonl(run_dir.train_jsonl) if run_dir.train_jsonl.exists() else []:
        meta = row.get("meta") or {}
        usage = meta.get("usage")
        if not usage:  # closed-book rows reuse their rag row's answer: no call of their own
            continue
        n = int(meta.get("candidates") or 1)
        calls += n
        prompt_tokens += usage.get("prompt_tokens") or 0
        completion_tokens += usage.get("completion_tokens") or 0
        prompt_chars += n * sum(len(m["content"]) for m in row["messages"] if m["role"] != "assistant")
    out: dict[str, dict[str, Any]] = {"answers_kept": {"calls": calls, "tokens_in": prompt_tokens,
                                                       "tokens_out": completion_tokens, "counted": "exact"}}
    chars_per_token = prompt_chars / prompt_tokens if prompt_tokens else None
    prompt_per_call = prompt_tokens / calls if calls else None

    def estimate(n_calls: int, in_chars: float | None, out_chars: int) -> dict[str, Any]:
        if chars_per_token is None:
            return {"calls": n_calls, "tokens_in": None, "tokens_out": None, "counted": "not countable"}
        tokens_in = in_chars / chars_per_token if in_chars is not None else n_calls * (prompt_per_call or 0)
        return {"calls": n_calls, "tokens_in": round(tokens_in), "tokens_out": round(out_chars / chars_per_token),
                "counted": f"estimated ({chars_per_token:.1f} characters per token)"}

    rejected = read_jsonl(run_dir.answers_rejected) if run_dir.answers_rejected.exists() else []
    candidates = [c for row in rejected for c in row.get("candidates", [])]
    # same template and top_k as the kept rows: their mean prompt per call
    out["answers_rejected"] = estimate(len(candidates), None, sum(len(c.get("text") or "") for c in candidates))
    raw = read_jsonl(run_dir.questions_raw) if run_dir.questions_raw.exists() else []
    chunks = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks)} if raw and run_dir.chunks.exists() else {}
    template = (config.get("data_prep") or {}).get("question_prompt") or "{context_str}"
    in_chars = sum(len(template) + len(chunks.get(r.get("chunk_id"), "")) for r in raw)
    out["questions"] = estimate(len(raw), in_chars, sum(len(r.get("completion") or "") for r in raw))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _machine_hour(device: str | None, prices: dict[str, float | None]) -> tuple[str, float | None]:
    """("GPU"|"CPU", the price of one hour of it) for the device the train stage recorded."""
    if device and device != "cpu":
        return "GPU", prices["gpu_hour"]
    return "CPU", prices["cpu_hour"]


def serving_per_query(run_dir: RunDir, summary: dict[str, Any], prices: dict[str, float | None],
                      device: str | None) -> dict[str, dict[str, Any]]:
    """Per rag query, from eval's own measurements: the teacher's mean tokens in and out (its answers' usage) at
    the API prices, and the tuned student's throughput (merged, else adapter) at the hourly price. Retrieval is the
    same for both and left out."""
    out: dict[str, dict[str, Any]] = {}
    reference = summary.get("reference")
    teacher = _mean_tokens(run_dir, summary, reference)
    if teacher is not None:
        usd = _usd(teacher["tokens_in"], teacher["tokens_out"], prices)
        out["teacher"] = {"model": reference, **teacher, "usd_per_1k": None if usd is None else usd * 1000}
    tuned = [m["name"] for m in summary.get("models", []) if m["kind"] in ("merged", "adapter")]
    tuned.sort(key=lambda name: name != "merged")
    generation = summary.get("timings", {}).get("generation", {})
    for name in tuned:
        measured = generation.get(name, {}).get("rag") or {}
        if measured.get("generated") and measured.get("seconds"):
            kind, hourly = _machine_hour(device, prices)
            per_query = measured["seconds"] / measured["generated"]
            out["student"] = {"model": name, **(_mean_tokens(run_dir, summary, name) or {}),
                              "queries": measured["generated"], "device": kind,
                              "tokens_per_second": round(measured.get("completion_tokens", 0) / measured["seconds"], 1),
                              "seconds_per_query": round(per_query, 3),
                              "usd_per_1k": None if hourly is None else per_query * 1000 / 3600 * hourly}
            break
    return out


def _mean_tokens(run_dir: RunDir, summary: dict[str, Any], model: str | None) -> dict[str, Any] | None:
    """A model's rag answers in eval: how many, and their mean prompt and completion tokens (the backend's counts)."""
    path = summary.get("files", {}).get("answers", {}).get(model, {}).get("rag")
    if not path or not (run_dir.root / path).exists():
        return None
    rows = [r for r in read_jsonl(run_dir.root / path) if r.get("error") is None]
    if not rows:
        return None
    return {"queries": len(rows), "tokens_in": round(sum(r.get("prompt_tokens") or 0 for r in rows) / len(rows), 1),
            "tokens_out": round(sum(r.get("completion_tokens") or 0 for r in rows) / len(rows), 1)}


def cost_benefit(run_dir: RunDir, summary: dict[str, Any], prices: dict[str, float | None] | None = None) -> dict[str, Any]:
    """What the tuned student cost (teacher tokens in prep, training time), what a rag query costs from the
    teacher's API and from the student, and after how many queries the student is the cheaper; `missing` says
    which price or measurement is absent. Prices default to the config the run recorded in manifest.json."""
    manifest = _read_json(run_dir.manifest)
    config, stages = manifest.get("config") or {}, manifest.get("stages") or {}
    prices = prices if prices is not None else prices_from(config)
    train = stages.get("train") or {}
    device = (train.get("precision") or {}).get("device")
    kind, hourly = _machine_hour(device, prices)
    missing = [] if manifest else ["manifest.json is missing: no stage times or prices"]

    teacher = teacher_usage(run_dir, config)
    for entry in teacher.values():
        usd = None if entry["tokens_in"] is None else _usd(entry["tokens_in"], entry["tokens_out"], prices)
        entry["usd"] = None if usd is None else round(usd, 4)
    counted = [e for e in teacher.values() if e["tokens_in"] is not None]
    teacher_total = {"calls": sum(e["calls"] for e in teacher.values()),
                     "tokens_in": sum(e["tokens_in"] for e in counted), "tokens_out": sum(e["tokens_out"] for e in counted),
                     "usd": None if any(e["usd"] is None for e in teacher.values()) else
                     round(sum(e["usd"] for e in teacher.values()), 4)}
    tokens = _read_json(run_dir.data_stats)
    seconds = train.get("seconds")
    gpus = (train.get("world_size") or 1) if kind == "GPU" else 1
    machine_hours = None if seconds is None else seconds / 3600 * gpus
    training = {"device": device, "priced_as": f"{kind}-hours", "seconds": seconds,
                "hours": None if machine_hours is None else round(machine_hours, 4),
                "training_tokens": tokens.get("training_tokens"), "tokens_seen": train.get("tokens_seen"),
                "usd": None if machine_hours is None or hourly is None else round(machine_hours * hourly, 4)}
    per_query = serving_per_query(run_dir, summary, prices, device)
    fixed = None if teacher_total["usd"] is None or training["usd"] is None else teacher_total["usd"] + training["usd"]

    if prices["teacher_input_per_million"] is None and prices["teacher_output_per_million"] is None:
        missing.append("teacher.price_per_million_input_tokens / …_output_tokens are not set: teacher tokens are not priced")
    if hourly is None:
        missing.append(f"cost.price_per_{kind.lower()}_hour is not set: training and serving time are not priced")
    if seconds is None:
        missing.append("no train stage in manifest.json: training time unknown")
    for who, what in (("teacher", "the teacher's rag answers in eval"), ("student", "a tuned model's rag answers in eval")):
        if who not in per_query:
            missing.append(f"no measurement of {what}: per-query cost unknown")
    teacher_q = (per_query.get("teacher") or {}).get("usd_per_1k")
    student_q = (per_query.get("student") or {}).get("usd_per_1k")
    break_even: dict[str, Any] = {"fixed_usd": None if fixed is None else round(fixed, 4), "queries": None, "table": []}
    if None not in (fixed, teacher_q, student_q):
        saving = (teacher_q - student_q) / 1000
        break_even["queries"] = math.ceil(fixed / saving) if saving > 0 else None
        break_even["never"] = saving <= 0
        break_even["table"] = [{"queries": n, "teacher_usd": round(n * teacher_q / 1000, 4),
                                "student_usd": round(fixed + n * student_q / 1000, 4)} for n in QUERY_VOLUMES]
    return {"prices": prices, "teacher": {**teacher, "total": teacher_total}, "train": training,
            "prep_seconds": (stages.get("prep") or {}).get("seconds"), "eval_seconds": (stages.get("eval") or {}).get("seconds"),
            "per_query": per_query, "break_even": break_even, "missing": missing}


def _n(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _money(value: float | None) -> str:
    return "not priced" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


COST_COLUMNS = ("what", "calls", "tokens in", "tokens out", "time", "USD", "counted")
PER_QUERY_COLUMNS = ("per rag query", "model", "measured on", "tokens in", "tokens out", "throughput", "USD per 1k queries")
BREAK_EVEN_COLUMNS = ("queries", "teacher API with RAG", "tuned student (tuning + serving)", "cheaper")


def cost_rows(cost: dict[str, Any]) -> list[list[str]]:
    """What tuning the student cost: prep's teacher calls by kind, their total, training, and the stage times."""
    labels = {"answers_kept": "teacher: answers kept", "answers_rejected": "teacher: answers rejected",
              "questions": "teacher: question generation", "total": "teacher: total"}
    rows = [[labels[k], _n(e["calls"]), _n(e["tokens_in"]), _n(e["tokens_out"]), "", _money(e["usd"]), e.get("counted", "")]
            for k, e in cost["teacher"].items()]
    t = cost["train"]
    rows.append([f"training ({t['device'] or 'device unknown'})", "", _n(t["training_tokens"]), "",
                 "–" if t["seconds"] is None else f"{t['seconds']:.0f} s = {t['hours']:.3f} {t['priced_as']}",
                 _money(t["usd"]), "training tokens × epochs (logs/data_stats.json); stage wall time"])
    for stage in ("prep", "eval"):
        seconds = cost[f"{stage}_seconds"]
        rows.append([f"{stage} stage", "", "", "", "–" if seconds is None else f"{seconds:.0f} s", "", "wall time, not priced"])
    return rows


def per_query_rows(cost: dict[str, Any]) -> list[list[str]]:
    rows = []
    teacher, student = cost["per_query"].get("teacher"), cost["per_query"].get("student")
    if teacher:
        rows.append(["teacher API", teacher["model"], f"{teacher['queries']} eval answers", _n(teacher["tokens_in"]),
                     _n(teacher["tokens_out"]), "", _money(teacher["usd_per_1k"])])
    if student:
        rows.append(["tuned student", student["model"], f"{student['queries']} eval answers ({student['device']})",
                     _n(student.get("tokens_in")), _n(student.get("tokens_out")),
                     f"{student['tokens_per_second']} tokens/s, {student['seconds_per_query']} s/query",
                     _money(student["usd_per_1k"])])
    return rows


def break_even_rows(cost: dict[str, Any]) -> list[list[str]]:
    return [[_n(r["queries"]), _money(r["teacher_usd"]), _money(r["student_usd"]),
             "student" if r["student_usd"] < r["teacher_usd"] else "teacher"] for r in cost["break_even"]["table"]]


def break_even_line(cost: dict[str, Any]) -> str:
    b = cost["break_even"]
    if not b["table"]:
        return "Break-even: not computed (" + "; ".join(cost["missing"]) + ")."
    if b.get("never"):
        return "Break-even: never: a query costs more on the student than through the teacher's API."
    return (f"Break-even: after {b['queries']:,} queries the tuned student ({_money(b['fixed_usd'])} to make) "
            "is cheaper than sending every query to the teacher's API with RAG.")


COST_NOTE = ("Teacher tokens of kept answers are the backend's counts; rejected answers and question generations are "
             "estimated from their text (the answerability checks are not counted). The student's cost per query is "
             "its eval throughput (batched, so at full load) at the hourly price of the training device; retrieval "
             "costs the same on both sides and is left out.")


def cost_markdown(cost: dict[str, Any]) -> list[str]:
    parts = ["### Cost and benefit", "", COST_NOTE, "", _md_table(COST_COLUMNS, cost_rows(cost)), ""]
    rows = per_query_rows(cost)
    parts += [_md_table(PER_QUERY_COLUMNS, rows), ""] if rows else []
    parts += [break_even_line(cost), ""]
    if cost["break_even"]["table"]:
        parts += [_md_table(BREAK_EVEN_COLUMNS, break_even_rows(cost)), ""]
    parts += [f"- {line}" for line in cost["missing"]] + ([""] if cost["missing"] else [])
    return parts


def cost_html(cost: dict[str, Any]) -> str:
    body = [f"<h3>Cost and benefit</h3><p class=muted>{_e(COST_NOTE)}</p>",
            _html_table(COST_COLUMNS, cost_rows(cost), check="cost")]
    rows = per_query_rows(cost)
    if rows:
        body.append(_html_table(PER_QUERY_COLUMNS, rows, check="cost-per-query"))
    body.append(f"<p><strong>{_e(break_even_line(cost))}</strong></p>")
    if cost["break_even"]["table"]:
        body.append(_html_table(BREAK_EVEN_COLUMNS, break_even_rows(cost), check="break-even"))
    body.append("".join(f"<p class=missing>{_e(line)}</p>" for line in cost["missing"]))
    return "".join(body)


# --- markdown -----------------------------------------------------------------------------------


def _md_table(header: list[str] | tuple[str, ...], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _results_rows(summary: dict[str, Any], mode: str) -> tuple[list[str], list[list[str]]]:
    """Metrics as rows, models as columns: mean [95% CI] and the count of failed samples."""
    models = summary["results"].get(mode, {})
    metrics = list(dict.fromkeys(m for entry in models.values() for m in entry))
    rows = []
    for metric in metrics:
        cells = [metric]
        for entry in models.values():
            e = entry.get(metric)
            if e is None:
                cells.append("n/a")
            elif metric == "ragas_score":
                cells.append(_fmt(e["value"]) + f" (n={e['n']})")
            else:
                ci = f" [{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]" if e["ci_low"] is not None else ""
                cells.append(_fmt(e["mean"]) + ci + (f", {e['failures']} failed" if e["failures"] else ""))
        rows.append(cells)
    return ["metric", *models], rows


def _sanity_rows(summary: dict[str, Any]) -> list[list[str]]:
    sanity = summary["judge"]["sanity"]
    rows = []
    for metric, s in {**sanity["metrics"], "overall": sanity["overall"]}.items():
        rate = "–" if s["rate"] is None else f"{s['rate']:.0%}"
        ci = "–" if s["ci_low"] is None else f"{s['ci_low']:.0%}–{s['ci_high']:.0%}"
        rows.append([metric, str(s["pairs"]), str(s["failed_pairs"]), rate, ci])
    return rows


def _timing_lines(summary: dict[str, Any]) -> list[str]:
    t = summary["timings"]
    lines = [f"total {t.get('total_seconds', 0):.0f}s for {t.get('questions')} questions"]
    for key, value in t.get("generation_seconds_per_question", {}).items():
        lines.append(f"generation {key}: {value:.2f} s/question")
    if t.get("judge"):
        lines.append(f"judge: {t['judge']['seconds']:.0f}s in {t['judge']['calls']} batched calls "
                     f"({t['judge']['requests']} requests, {t['judge']['cached']} answered from cache), "
                     f"{t.get('judge_seconds_per_llm_scored_sample') or 0:.2f} s per LLM-scored sample")
    if "embeddings_seconds" in t:
        lines.append(f"embeddings: {t['embeddings_seconds']:.1f}s in {t.get('embedding_calls', 0)} calls")
    if "scoring_seconds" in t:
        lines.append(f"scoring wall time {t['scoring_seconds']:.1f}s (judge and embeddings overlap; the rest is "
                     "string metrics and Ragas itself)")
    return lines


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
        parts += [_md_table(VERDICT_COLUMNS, [list(r.values()) for r in rows]) if rows else "_no model to compare_", ""]
        if per_question is not None:
            parts += side_by_side_markdown(summary, per_question[label])
        for mode in summary["modes"]:
            header, rows = _results_rows(summary, mode)
            parts += [f"### Mean scores, {mode}", "", _md_table(header, rows), ""]
        if run_files is not None:
            parts += data_markdown(run_files[label])
        if costs is not None:
            parts += cost_markdown(costs[label])
        retrieval = summary["retrieval"]
        parts += ["### Retrieval (same for every model)", "", oracle_line(retrieval), ""]
        rows = [[m, _fmt(e["mean"]), str(e["failures"])] for m, e in retrieval.items() if isinstance(e, dict)]
        if rows:
            parts += [_md_table(["metric", "mean", "failed"], rows), ""]
        parts += ["### Judge sanity check", "", "Share of known-good/known-bad pairs the judge ranked correctly "
                  "(chance = 50%).", "", _md_table(["metric", "pairs", "failed pairs", "rate", "95% CI"], _sanity_rows(summary)),
                  "", "### Time", ""] + [f"- {line}" for line in _timing_lines(summary)] + [""]
    if len(summaries) > 1:
        rows = _spread_rows(labels, summaries)
        parts += ["## Across runs (seeds / configs)", "", "Spread of each run's delta vs its own base.", "",
                  _md_table(["mode", "model", "metric", "runs", "mean delta", "std", "min", "max", "runs 'better'"], rows)
                  if rows else "_no comparison shared by two runs_", ""]
    return "\n".join(parts)


def oracle_line(retrieval: dict[str, Any]) -> str:
    top_k, rate = retrieval["similarity_top_k"], retrieval["oracle_hit_rate"]
    if rate is None:
        return (f"Oracle chunk among the top {top_k}: not known (golden questions have no source chunk; the "
                "string-matched context metrics compare the retrieved chunks with a golden row's `contexts`)")
    return f"Oracle chunk among the top {top_k}: {rate:.0%}"


def _spread_rows(labels: list[str], summaries: list[dict[str, Any]]) -> list[list[str]]:
    keys: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for summary in summaries:
        for mode, models in summary.get("comparisons", {}).items():
            for model, metrics in models.items():
                for metric, c in metrics.items():
                    keys.setdefault((mode, model, metric), []).append(c)
    rows = []
    for (mode, model, metric), comparisons in keys.items():
        if len(comparisons) < 2:
            continue
        s = spread([c["delta"] for c in comparisons])
        better = sum(c["verdict"] == "better" for c in comparisons)
        rows.append([mode, model, metric, str(s["runs"]), _fmt(s.get("mean"), True), _fmt(s.get("std")),
                     _fmt(s.get("min"), True), _fmt(s.get("max"), True), f"{better}/{len(comparisons)}"])
    return rows


# --- html ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}.warn{background:#fff0f0;border:2px solid #d62728;padding:.6em 1em;border-radius:6px}
.warn li.loud{font-weight:700;color:#b00}.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}.muted{color:#666;font-size:.9em}svg{background:#fff;border:1px solid #eee}
.missing{color:#8a5a00;font-style:italic}table.answers td{vertical-align:top;white-space:pre-wrap;max-width:22em}
"""

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


def _e(value: Any) -> str:
    return html.escape(str(value))


def _html_table(header: list[str] | tuple[str, ...], rows: list[list[Any]], verdict_col: int | None = None,
                check: str | None = None) -> str:
    """`check` names the table for the render check (its laid-out size lands in `data-box`)."""
    attrs = f' data-check="{_e(check)}"' if check else ""
    out = [f"<table{attrs}><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ""
            if i == verdict_col and str(cell) in ("better", "worse"):
                cls = f' class="{cell}"'
            cells.append(f"<td{cls}>{_e(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _scale(lo: float, hi: float, a: float, b: float):  # type: ignore[no-untyped-def]
    return lambda v: a + (v - lo) / (hi - lo or 1.0) * (b - a)


def svg_bars(title: str, bars: list[tuple[str, float | None, float | None, float | None]]) -> str:
    """Bars of means with CI whiskers, one per model."""
    width, height, left, bottom, top = max(170, 60 + 46 * len(bars)), 190, 34, 40, 22
    values = [v for _, m, lo, hi in bars for v in (m, lo, hi) if v is not None]
    lo, hi = min([0.0, *values]), max([1.0, *values])
    y = _scale(lo, hi, height - bottom, top)
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
    y = _scale(lo, hi, height - bottom, top)
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
        body.append(_html_table(VERDICT_COLUMNS, [list(r.values()) for r in rows],
                                verdict_col=VERDICT_COLUMNS.index("verdict"), check="verdicts") if rows
                    else "<p>No model to compare.</p>")
        body.append(side_by_side_html(summary, per_question[label]))
        for mode in summary["modes"]:
            models = summary["results"].get(mode, {})
            header, rows = _results_rows(summary, mode)
            body.append(f"<h3>Scores, {_e(mode)}</h3>" + _html_table(header, rows))
            charts = []
            for metric in summary["metrics"]:
                bars = [(m, e[metric]["mean"], e[metric]["ci_low"], e[metric]["ci_high"])
                        for m, e in models.items() if metric in e]
                if bars:
                    charts.append(svg_bars(metric, bars))
            body.append(f"<div class=charts>{''.join(charts)}</div>")
            body.append(_paired_section(summary, mode, per_question[label]))
        if run_files is not None:
            body.append(data_html(run_files[label]))
        if costs is not None:
            body.append(cost_html(costs[label]))
        retrieval = summary["retrieval"]
        rows = [[m, _fmt(e["mean"]), e["failures"]] for m, e in retrieval.items() if isinstance(e, dict)]
        body.append(f"<h3>Retrieval (same for every model)</h3><p>{_e(oracle_line(retrieval))}</p>"
                    + (_html_table(["metric", "mean", "failed"], rows) if rows else ""))
        body.append("<h3>Judge sanity check</h3><p class=muted>Share of known-good vs known-bad pairs (reference "
                    "answer vs the answer to another question; source chunk vs an unrelated chunk) that the judge "
                    "ranked correctly. Chance is 50%.</p>"
                    + _html_table(["metric", "pairs", "failed pairs", "rate", "95% CI"], _sanity_rows(summary)))
        body.append("<h3>Time</h3><ul>" + "".join(f"<li>{_e(line)}</li>" for line in _timing_lines(summary)) + "</ul>")
    if len(summaries) > 1:
        rows = _spread_rows(labels, summaries)
        body.append("<h2>Across runs</h2><p class=muted>Spread of each run's delta vs its own base.</p>"
                    + _html_table(["mode", "model", "metric", "runs", "mean delta", "std", "min", "max", "runs 'better'"], rows))
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
