"""The report's questions: whose they are, one row per (mode, question) with every model's answer and scores
(per_question.csv), and the few shown side by side."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ragtune.eval.score import load_scores
from ragtune.core.artifacts import read_jsonl, tmp_path
from ragtune.core.run_dir import RunDir

# Held-out questions shown with every model's rag answer side by side: enough to see what changed, few enough to read.
SIDE_BY_SIDE = 6


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


def model_header(summary: dict[str, Any], model: str) -> str:
    """A side-by-side column's name: the teacher is "(reference)" unless the golden set gives the references."""
    if model != summary["reference"]:
        return model
    return f"{model} (reference where no golden one)" if is_golden(summary) else f"{model} (reference)"
