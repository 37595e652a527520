"""`ragtune gates FILE.jsonl`: the answer gates of a config run over answers a person labelled, so a user sees
what the gates would keep of *their* teacher before spending GPU hours on it.

One JSON object per line: `{"question", "contexts": [...], "answer", "label", "finish_reason"?}`. Labels are the
user's strings; `good` and `bad` have a meaning (the AUROC and the suggested thresholds compare them), any other
label is counted. The report: per label how many answers were kept and why the others were rejected, how well
the grounding score ranks `good` above `bad`, and the `min_grounding` that would keep 90% and 95% of `good`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragtune.core.artifacts import ArtifactError, iter_jsonl
from ragtune.core.gates import gate_candidates, threshold
from ragtune.core.llm import Completion
from ragtune.core.gates import AnswerGates

KEEP_TARGETS = (0.90, 0.95)


def read_labelled(path: Path) -> list[dict[str, Any]]:
    """The labelled answers of `path`; a line of the wrong shape is one ArtifactError naming it and the key."""
    rows = []
    for number, row in iter_jsonl(path):
        problem = _shape_problem(row)
        if problem:
            raise ArtifactError(f"{path}:{number}: {problem}. Each line is "
                                '{"question": str, "contexts": [str, ...], "answer": str, "label": str, '
                                '"finish_reason": "stop"|"length" (optional)}.')
        rows.append(row)
    if not rows:
        raise ArtifactError(f"{path}: no labelled answers (the file is empty)")
    return rows


def _shape_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"a JSON object expected, got {type(row).__name__}"
    for key in ("question", "answer", "label"):
        if not isinstance(row.get(key), str):
            return f"key {key!r} must be a string (got {type(row.get(key)).__name__})"
    contexts = row.get("contexts")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        return "key 'contexts' must be a list of strings"
    if row.get("finish_reason", "stop") not in ("stop", "length"):
        return f"key 'finish_reason' must be \"stop\" or \"length\" (got {row.get('finish_reason')!r})"
    return None


def gate_rows(rows: Sequence[dict[str, Any]], gates: AnswerGates) -> list[Any]:
    """The verdict of the gates on each labelled answer, as prep gates a candidate, its evidence shown as the
    oracle (a refusal is wrong)."""
    return [gate_candidates([Completion(row["answer"], finish_reason=row.get("finish_reason", "stop"))],
                            row["contexts"], gates, oracle_in_context=True, chain_of_thought=False,
                            question=row["question"])[0]
            for row in rows]


def calibrate(rows: Sequence[dict[str, Any]], gates: AnswerGates) -> dict[str, Any]:
    """Kept counts and rejection reasons per label, the grounding score's AUROC for good over bad, and the
    thresholds that keep 90% and 95% of good (with what each would keep of every label)."""
    verdicts = gate_rows(rows, gates)
    report: dict[str, Any] = {"measure": gates.measure, "min_grounding": threshold(gates.measure, gates.min_grounding),
                              "labels": _by_label(rows, verdicts)}
    scores = {label: [v.grounding for row, v in zip(rows, verdicts) if row["label"] == label] for label in ("good", "bad")}
    report["auroc"] = auroc(scores["good"], scores["bad"])
    report["suggested"] = {}
    # only grounding moves with the threshold: good answers another gate rejects count as lost at any threshold
    movable = [v.grounding for row, v in zip(rows, verdicts)
               if row["label"] == "good" and v.reason in (None, "ungrounded")]
    for target in KEEP_TARGETS:
        needed = math.ceil(target * len(scores["good"]) - 1e-9)
        if not movable:
            break
        cut = int(sorted(movable, reverse=True)[min(needed, len(movable)) - 1] * 100) / 100
        report["suggested"][f"keep_{round(target * 100)}_good"] = {
            "min_grounding": cut,
            "keep_rate": {label: facts["keep_rate"] for label, facts in _by_label(
                rows, gate_rows(rows, gates.model_copy(update={"min_grounding": cut}))).items()}}
    return report


def _by_label(rows: Sequence[dict[str, Any]], verdicts: Sequence[Any]) -> dict[str, dict[str, Any]]:
    labels: dict[str, dict[str, Any]] = {}
    for row, verdict in zip(rows, verdicts):
        facts = labels.setdefault(row["label"], {"n": 0, "kept": 0, "reasons": Counter()})
        facts["n"] += 1
        facts["kept"] += verdict.ok
        if not verdict.ok:
            facts["reasons"][verdict.reason] += 1
    return {label: {"n": f["n"], "kept": f["kept"], "keep_rate": round(f["kept"] / f["n"], 3),
                    "reasons": dict(f["reasons"].most_common())} for label, f in sorted(labels.items())}


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """The probability that a random positive scores above a random negative (ties count half); None without both."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return round(wins / (len(positives) * len(negatives)), 3)


def render(report: dict[str, Any], path: Path) -> str:
    """The report as a table and one line of advice."""
    lines = [f"{path}: answer gates, measure {report['measure']}, min_grounding {report['min_grounding']}", "",
             f"{'label':<12} {'n':>5} {'kept':>5} {'keep rate':>10}  rejected because"]
    for label, facts in report["labels"].items():
        reasons = ", ".join(f"{reason} {count}" for reason, count in facts["reasons"].items()) or "-"
        lines.append(f"{label:<12} {facts['n']:>5} {facts['kept']:>5} {facts['keep_rate']:>10.1%}  {reasons}")
    lines.append("")
    auc = report["auroc"]
    lines.append("grounding ranks good above bad: AUROC " + (f"{auc:.3f}" if auc is not None else
                                                            "n/a (needs answers labelled good and bad)"))
    for name, suggestion in report["suggested"].items():
        rates = ", ".join(f"{label} {rate:.0%}" for label, rate in suggestion["keep_rate"].items())
        lines.append(f"{name}: min_grounding {suggestion['min_grounding']} (would keep {rates})")
    lines.append("")
    lines.append(advice(report))
    return "\n".join(lines)


def advice(report: dict[str, Any]) -> str:
    """One line: what to change, if anything, for the gates to keep most good answers."""
    good = report["labels"].get("good")
    if not good:
        return "advice: label some answers `good` (and `bad`) to calibrate min_grounding on them."
    if good["keep_rate"] >= 0.9:
        return f"advice: the gates keep {good['keep_rate']:.0%} of good answers; nothing to change."
    reasons = good["reasons"]
    top = max(reasons, key=reasons.get)
    if top == "ungrounded" and "keep_90_good" in report["suggested"]:
        return (f"advice: most good answers fail on grounding; set data_prep.answer_gates.min_grounding: "
                f"{report['suggested']['keep_90_good']['min_grounding']} (keeps 90% of good), or try "
                f"measure: {'bigram' if report['measure'] == 'support' else 'support'}.")
    return (f"advice: {reasons[top]} good answers are rejected as {top!r}; read them with --json and check "
            f"the teacher's settings (max_new_tokens for 'truncated', its prompt for 'refusal_with_oracle').")
