"""The data and training facts the report shows, read from prep's data/stats.json and train's
logs/data_stats.json and logs/loss_curve.json: what prep kept and rejected, the token counts, the loss curve."""

from __future__ import annotations

import json
import math
from typing import Any

from ragtune.core.run_dir import RunDir

DATASET_COUNTS = ("documents", "pages", "chunks", "train_regions", "eval_regions", "questions_train", "questions_eval",
                  "train_rows", "answers_kept", "questions_without_answer")
REJECTIONS = (("question", "questions_rejected"), ("answer", "answers_rejected"))


def load_run_files(run_dir: RunDir) -> dict[str, dict[str, Any]]:
    """prep's data/stats.json (`stats`), train's logs/data_stats.json (`tokens`) and logs/loss_curve.json
    (`loss`), the run's manifest.json (`manifest`): each {"path", "data"} with data None and a `problem` when the
    file is missing or unreadable."""
    files = {"stats": (run_dir.stats, "`ragtune prep` writes it"),
             "manifest": (run_dir.manifest, "`ragtune run` writes it"),
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
