"""A golden eval set of the user's own (`eval.questions_file`): the questions their experts wrote, with the answers
they accept, answered by every model instead of prep's held-out questions.

One JSON object per line: `{"question": str, "reference": str, "contexts": [str, ...], "id": str}`; only
`question` is required. `reference` is what reference-based metrics compare answers with (the teacher's rag answer
where a row has none); `contexts` are the passages a good retriever returns, for the string-matched context
metrics (prep's source chunk plays that part for its own questions). Other keys are ignored.

Leakage: a golden reference found in a training row (data/train.jsonl: its contexts or its answer) may have been
learned in training, so a closed-book "better" on that question says little; eval warns and names the rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import ArtifactError, iter_jsonl
from ragtune.core.grounding import content_words, figures, normalize, support
from ragtune.core.run_dir import RunDir, sha256_file
from ragtune.eval.answer import EvalError

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

FORMAT = '{"question": str, "reference": str (optional), "contexts": [str, ...] (optional), "id": str (optional)}'
# A reference with fewer claims (content words and figures) than this is matched only verbatim: "Mobility,
# Delivery and Freight" is in most training contexts of a 10-K without anyone having leaked it.
MIN_LEAK_CLAIMS = 4


def load_golden(path: Path) -> list[dict[str, Any]]:
    """The golden questions in file order, shaped as eval uses prep's (`id`, `question`, `source_chunk_id` None) plus
    `reference` and `reference_contexts`; the first bad row raises EvalError naming its line."""
    if not path.is_file():
        raise EvalError(f"eval.questions_file: {path} is not a file (resolved against {Path.cwd()}). Point it at "
                        f"your golden set, one JSON object per line: {FORMAT}.")
    questions: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        for number, row in iter_jsonl(path):
            question = _golden_row(path, number, row)
            if question["id"] in seen:
                raise EvalError(f"{path}:{number}: id {question['id']!r} is already used on line "
                                f"{seen[question['id']]}. Give every question its own id (or leave `id` out).")
            seen[question["id"]] = number
            questions.append(question)
    except ArtifactError as err:
        raise EvalError(f"{err} One JSON object per line: {FORMAT}.") from None
    if not questions:
        raise EvalError(f"{path}: no questions. Write one JSON object per line: {FORMAT}.")
    return questions


def _golden_row(path: Path, number: int, row: dict[str, Any]) -> dict[str, Any]:
    def bad(problem: str) -> EvalError:
        return EvalError(f"{path}:{number}: {problem}. Fix that line ({FORMAT}) and run again.")

    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad("`question` is missing or not a non-empty string")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise bad(f"`reference` is a {type(reference).__name__}, not a string")
    contexts = row.get("contexts")
    if contexts is not None and (not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts)):
        raise bad("`contexts` is not a list of strings")
    qid = row.get("id", f"golden-{number}")
    if not isinstance(qid, str) or not qid.strip():
        raise bad("`id` is not a non-empty string")
    return {"id": qid.strip(), "question": question.strip(), "source_chunk_id": None,
            "reference": (reference or "").strip() or None,
            "reference_contexts": [c for c in contexts or [] if c.strip()] or None}


def leaked_references(questions: list[dict[str, Any]], train_jsonl: Path) -> list[dict[str, Any]]:
    """Golden references found in a training row: verbatim (case, spacing and quotes aside) in its user message (the
    contexts) or its answer, or, for a reference of at least MIN_LEAK_CLAIMS claims, every claim of it found there
    (`ragtune.core.grounding.support` is 1: the same words and figures, "$17.5 billion" found as "17,455").
    One entry per leaked question: its id and the training rows, in file order."""
    golden = [q for q in questions if q.get("reference")]
    if not golden or not train_jsonl.exists():
        return []
    verbatim = {q["id"]: normalize(q["reference"]) for q in golden}
    claims = {q["id"]: len(content_words(q["reference"])) + len(figures(q["reference"])) for q in golden}
    found: dict[str, list[str]] = {}
    for number, row in iter_jsonl(train_jsonl):
        texts = [m.get("content") or "" for m in row.get("messages", []) if m.get("role") in ("user", "assistant")]
        flat = [normalize(t) for t in texts]
        for question in golden:
            qid = question["id"]
            hit = any(verbatim[qid] in text for text in flat) or (
                claims[qid] >= MIN_LEAK_CLAIMS and any(support(question["reference"], [t]) >= 1.0 for t in texts))
            if hit:
                found.setdefault(qid, []).append(str(row.get("id") or f"line {number}"))
    return [{"question_id": q["id"], "train_rows": found[q["id"]]} for q in golden if q["id"] in found]


def question_source(config: "RagtuneConfig", run_dir: RunDir, questions: list[dict[str, Any]],
                    leaks: list[dict[str, Any]]) -> dict[str, Any]:
    """Whose questions these are, for the summary and the report: the golden file's (with how many references it
    gave, how many the teacher's answer stood in for, and the leaks) or prep's held-out ones."""
    if not config.eval.questions_file:
        return {"kind": "prep", "file": str(run_dir.questions_eval.relative_to(run_dir.root))}
    path = Path(config.eval.questions_file)
    with_reference = sum(1 for q in questions if q.get("reference"))
    return {"kind": "golden", "file": str(path.resolve()), "sha256": sha256_file(path),
            "references": {"golden": with_reference, "teacher": len(questions) - with_reference},
            "reference_contexts": sum(1 for q in questions if q.get("reference_contexts")), "leaked": leaks}
