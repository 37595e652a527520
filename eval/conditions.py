"""The retrieval-condition eval (`eval.retrieval_conditions`), RAFT's question: did the student learn to read the
context, or memorise answers? Every student answers the rag questions again, each time with other contexts:

- `retrieved`: rag mode itself (eval/retrieval.jsonl), the row the others are read against;
- `oracle`: the question's source chunk first, then the retrieved ones, `similarity_top_k` in all;
- `distractors_only`: the retrieved chunks without the source chunk, topped up from the next ranks;
- `top_k=N`: the retriever's top N (`similarity_top_k: N`).

A golden question (eval.questions_file) has no source chunk: its row's `contexts` stand in (a chunk that holds one
of them, or is held in one, counts as the source), and a golden question without `contexts` is skipped under
`oracle` and `distractors_only`, counted in the summary. Each condition's contexts go to
eval/contexts.<condition>.jsonl, its answers to eval/answers.<model>.rag@<condition>.jsonl (resumable by
fingerprint as every answers file), scored on the eval.metrics that need no judge, against rag mode's references:
the judge is most of eval's time, and each condition would add a rag mode's worth of it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import read_jsonl
from ragtune.core.grounding import normalize
from ragtune.core.run_dir import RunDir, sha256_file, short_hash
from ragtune.eval.answer import ModelSpec, contexts_file, open_rows
from ragtune.eval.config import ANSWER_METRICS
from ragtune.eval.score import LLM_METRICS, REFERENCE_ANSWER_METRICS, load_scores, reason_key
from ragtune.eval.stats import mean_with_ci, paired_difference

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig
    from ragtune.eval.config import EvalConfig

log = logging.getLogger(__name__)

RETRIEVED = "retrieved"
NO_SOURCE = "golden question without `contexts`: no source passage to put in or take out"
Contexts = dict[str, tuple[list[str], list[str]]]  # {question_id: (context ids, context texts)}


def condition_modes(ev: "EvalConfig") -> list[str]:
    """The answer modes of the configured conditions, `rag@<condition>` (`retrieved` is `rag` itself)."""
    return [f"rag@{name}" for name in ev.retrieval_conditions if name != RETRIEVED]


def judge_free(metrics: list[str]) -> list[str]:
    """The answer metrics a condition is scored on: those of `metrics` that call no judge."""
    return [m for m in metrics if m in ANSWER_METRICS and m not in LLM_METRICS]


# --- the contexts of each condition --------------------------------------------------------------


def condition_contexts(config: "RagtuneConfig", run_dir: RunDir, questions: list[dict[str, Any]],
                       retrieval: dict[str, dict[str, Any]]) -> dict[str, Contexts]:
    """Per condition mode, the contexts of each question it asks, written to eval/contexts.<condition>.jsonl
    (reused while rag mode's retrieval, the chunks and the questions are unchanged)."""
    from ragtune.core.rag import load_index, retrieve

    top_k = config.data_prep.similarity_top_k
    chunk_text = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks)} if run_dir.chunks.exists() else {}
    chunks_fp = sha256_file(run_dir.chunks) if run_dir.chunks.exists() else None
    retrieval_fp = sorted({r["fingerprint"] for r in retrieval.values()})
    index, out = None, {}
    for mode in condition_modes(config.eval):
        name = mode.split("@", 1)[1]
        depth = _depth(name, questions, top_k)
        fingerprint = short_hash(retrieval_fp, name, top_k, chunks_fp if name == "oracle" else None)
        with open_rows(run_dir, contexts_file(run_dir, mode), "question_id", fingerprint) as rows:
            todo = [q for q in questions if q["id"] not in rows.done_keys]
            if todo and depth and index is None:
                index = load_index(config.embedding, run_dir.index)
            hits = retrieve(index, [q["question"] for q in todo], depth) if todo and depth else [[] for _ in todo]
            for question, found in zip(todo, hits):
                chosen = _choose(name, question, retrieval[question["id"]], found, chunk_text, top_k)
                skipped = chosen if isinstance(chosen, str) else None
                ids, texts = ([], []) if skipped else chosen
                rows.append({"question_id": question["id"], "condition": name, "context_ids": ids, "contexts": texts,
                             "source_in_context": None if skipped else _holds_source(question, ids, texts),
                             "skipped": skipped, "fingerprint": fingerprint})
            by_id = {r["question_id"]: r for r in rows.rows}
        out[mode] = {q["id"]: (by_id[q["id"]]["context_ids"], by_id[q["id"]]["contexts"]) for q in questions
                     if not by_id[q["id"]]["skipped"]}
        if len(out[mode]) < len(questions):
            reasons = sorted({by_id[q["id"]]["skipped"] for q in questions if by_id[q["id"]]["skipped"]})
            log.warning("retrieval condition %s: %d of %d questions skipped (%s)", name,
                        len(questions) - len(out[mode]), len(questions), "; ".join(reasons))
    return out


def _depth(name: str, questions: list[dict[str, Any]], top_k: int) -> int | None:
    """How deep a condition retrieves (None: it reuses rag mode's retrieval): `top_k=N` N; `distractors_only` deep
    enough to top up `top_k` after taking out every source passage a question has."""
    if name.startswith("top_k="):
        return int(name.split("=", 1)[1])
    if name == "distractors_only":
        return top_k + max([len(q.get("reference_contexts") or []) for q in questions] + [1])
    return None


def _choose(name: str, question: dict[str, Any], retrieved: dict[str, Any], found: list[dict[str, Any]],
            chunk_text: dict[str, str], top_k: int) -> tuple[list[str], list[str]] | str:
    """(context ids, texts) of `question` under condition `name`, or why it is skipped. `found` is the deeper
    retrieval of `_depth`."""
    if name.startswith("top_k="):
        return [h["id"] for h in found], [h["text"] for h in found]
    if name == "distractors_only":
        if not _has_source(question):
            return NO_SOURCE
        kept = [h for h in found if not _is_source(question, h["id"], h["text"])][:top_k]
        return [h["id"] for h in kept], [h["text"] for h in kept]
    sources = _sources(question, chunk_text)
    if isinstance(sources, str):
        return sources
    others = [(i, t) for i, t in zip(retrieved["context_ids"], retrieved["contexts"]) if not _is_source(question, i, t)]
    chosen = sources + others[:max(top_k - len(sources), 0)]
    return [i for i, _ in chosen], [t for _, t in chosen]


def _sources(question: dict[str, Any], chunk_text: dict[str, str]) -> list[tuple[str, str]] | str:
    """The question's source passages as (id, text): prep's source chunk, else a golden row's `contexts`
    (`golden#1`, ...); or why there are none."""
    source = question.get("source_chunk_id")
    if source:
        return [(source, chunk_text[source])] if source in chunk_text else f"source chunk {source} is not in data/chunks.jsonl"
    passages = question.get("reference_contexts") or []
    return [(f"golden#{i + 1}", text) for i, text in enumerate(passages)] or NO_SOURCE


def _has_source(question: dict[str, Any]) -> bool:
    return bool(question.get("source_chunk_id") or question.get("reference_contexts"))


def _is_source(question: dict[str, Any], chunk_id: str, text: str) -> bool:
    """Whether a context is the question's source: prep's source chunk by id; for a golden question, a text that holds
    one of its `contexts` or is held in one (case and spacing aside)."""
    if question.get("source_chunk_id"):
        return chunk_id == question["source_chunk_id"]
    flat = normalize(text)
    return bool(flat) and any(p in flat or flat in p for p in map(normalize, question.get("reference_contexts") or []))


def _holds_source(question: dict[str, Any], ids: list[str], texts: list[str]) -> bool | None:
    """Whether the contexts hold the question's source; None when it has none (a golden question without contexts)."""
    return any(_is_source(question, i, t) for i, t in zip(ids, texts)) if _has_source(question) else None


# --- the summary's table -------------------------------------------------------------------------

Table = dict[str, dict[str, dict[str, Any]]]  # {question_id: {metric: score row}}
LABELS = {RETRIEVED: "as retrieved", "oracle": "with the oracle", "distractors_only": "with distractors only"}


def condition_summary(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], questions: list[dict[str, Any]],
                      retrieval: dict[str, dict[str, Any]], boot: dict[str, Any]) -> dict[str, Any]:
    """eval/summary.json's `retrieval_conditions`: per condition (`retrieved` first) what the students were given
    (questions asked, skipped and why, contexts per question, how often the source was among them), each student's
    means on the judge-free metrics, its paired difference from the base on the questions scored for both (the
    percentile bootstrap of every comparison), and one reading per compared model."""
    ev = config.eval
    metrics = judge_free(list(ev.metrics))
    students = [s for s in specs if s.kind != "teacher"]
    base = next((s.name for s in students if s.kind == "base"), None)
    qids = [q["id"] for q in questions]
    conditions, results, comparisons = [], {}, {}
    for name in [RETRIEVED, *(c for c in ev.retrieval_conditions if c != RETRIEVED)]:
        mode = "rag" if name == RETRIEVED else f"rag@{name}"
        rows = _context_rows(run_dir, mode, questions, retrieval)
        asked = [q for q in qids if q in rows and not rows[q]["skipped"]]
        conditions.append(_facts(run_dir, name, mode, rows, qids, config.data_prep.similarity_top_k))
        tables = {s.name: load_scores(run_dir.scores(s.name, mode)) for s in students
                  if run_dir.answers(s.name, mode).exists()}
        results[name] = {model: {m: _mean(table, asked, m, config.seed, boot) for m in metrics}
                         for model, table in tables.items()}
        if base in tables:
            comparisons[name] = {model: {m: _paired(tables[base], table, asked, m, config.seed, ev.tie_tolerance, boot)
                                         for m in metrics} for model, table in tables.items() if model != base}
    part = {"metrics": metrics, "baseline": base, "conditions": conditions, "results": results,
            "comparisons": comparisons}
    return {**part, "readings": readings(part)}


def _context_rows(run_dir: RunDir, mode: str, questions: list[dict[str, Any]],
                  retrieval: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{question_id: its contexts row} of a condition: rag mode's retrieval for `retrieved`."""
    if mode != "rag":
        path = contexts_file(run_dir, mode)
        return {r["question_id"]: r for r in read_jsonl(path)} if path.exists() else {}
    return {q["id"]: {**retrieval[q["id"]], "skipped": None,
                      "source_in_context": _holds_source(q, retrieval[q["id"]]["context_ids"], retrieval[q["id"]]["contexts"])}
            for q in questions if q["id"] in retrieval}


def _facts(run_dir: RunDir, name: str, mode: str, rows: dict[str, dict[str, Any]], qids: list[str],
           top_k: int) -> dict[str, Any]:
    asked = [rows[q] for q in qids if q in rows and not rows[q]["skipped"]]
    reasons: dict[str, int] = {}
    for q in qids:
        reason = rows[q]["skipped"] if q in rows else "no contexts recorded for it"
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    known = [r["source_in_context"] for r in asked if r["source_in_context"] is not None]
    return {"name": name, "mode": mode, "description": _describe(name, top_k), "questions": len(asked),
            "skipped": sum(reasons.values()), "skip_reasons": reasons,
            "contexts_per_question": sum(len(r["context_ids"]) for r in asked) / len(asked) if asked else None,
            "source_in_context": sum(known) / len(known) if known else None, "source_known": len(known),
            "file": str(contexts_file(run_dir, mode).relative_to(run_dir.root))}


def _describe(name: str, top_k: int) -> str:
    if name == RETRIEVED:
        return f"rag mode: the retriever's top {top_k}"
    if name == "oracle":
        return f"the source chunk first, then the retrieved ones ({top_k} in all)"
    if name == "distractors_only":
        return f"the retrieved chunks without the source chunk, topped up from the next ranks ({top_k} in all)"
    return f"the retriever's top {name.split('=', 1)[1]}"


def _mean(table: Table, qids: list[str], metric: str, seed: int, boot: dict[str, Any]) -> dict[str, Any]:
    """The mean over the questions scored, its CI, and how many of `qids` were not, by reason."""
    values, reasons = [], {}
    for q in qids:
        row = table.get(q, {}).get(metric)
        if row is not None and row["value"] is not None:
            values.append(row["value"])
            continue
        key = "not scored yet" if row is None else reason_key(row["error"] or "unknown")
        reasons[key] = reasons.get(key, 0) + 1
    return {**mean_with_ci(values, seed=seed, **boot), "failures": sum(reasons.values()), "failure_reasons": reasons}


def _paired(base: Table, tuned: Table, qids: list[str], metric: str, seed: int, tie_tolerance: float,
            boot: dict[str, Any]) -> dict[str, Any]:
    """tuned − base on the questions scored for both (`excluded`: the others), as summary.py compares modes."""
    common = [q for q in qids if all(t.get(q, {}).get(metric, {}).get("value") is not None for t in (base, tuned))]
    entry = paired_difference([base[q][metric]["value"] for q in common], [tuned[q][metric]["value"] for q in common],
                              seed=seed, tie_tolerance=tie_tolerance, **boot)
    return {**entry, "excluded": len(qids) - len(common)}


# --- the reading -----------------------------------------------------------------------------------


def readings(part: dict[str, Any]) -> list[str]:
    """One line per compared model, on the first reference-based metric (else the first): its difference from the
    base in each condition, what taking the source chunk out does to both, and what that suggests."""
    metrics = part["metrics"]
    metric = next((m for m in metrics if m in REFERENCE_ANSWER_METRICS), metrics[0] if metrics else None)
    if metric is None:
        return []
    lines = []
    for model in dict.fromkeys(m for models in part["comparisons"].values() for m in models):
        entries = {name: models[model][metric] for name, models in part["comparisons"].items() if model in models}
        deltas = ", ".join(f"{_signed(e['delta'])} {_label(name)} ({_short(e['verdict'])})" for name, e in entries.items())
        lines.append(f"{model} vs {part['baseline']}, {metric}: {deltas}{_drop(part, model, metric)}; "
                     f"{_meaning(entries, metric)}.")
    return lines


def _drop(part: dict[str, Any], model: str, metric: str) -> str:
    """What taking the source chunk out does to both models' means (oracle → distractors only)."""
    results = part["results"]
    if not {"oracle", "distractors_only"} <= set(results):
        return ""
    moves = []
    for name in (model, part["baseline"]):
        o = results["oracle"].get(name, {}).get(metric, {}).get("mean")
        d = results["distractors_only"].get(name, {}).get(metric, {}).get("mean")
        if o is not None and d is not None:
            moves.append(f"{name} {o:.3f} → {d:.3f}")
    return f"; from the oracle to distractors only: {', '.join(moves)}" if moves else ""


def _meaning(entries: dict[str, dict[str, Any]], metric: str) -> str:
    if metric not in REFERENCE_ANSWER_METRICS:
        return (f"{metric} says how far the contexts shown support the answer, not whether it is right: add "
                "rouge_score or chrf_score to eval.metrics to tell reading from memorising")
    if entries.get("distractors_only", {}).get("verdict") == "better":
        return ("its gain holds with the source chunk taken out: it answers from what it memorised in training, "
                "not only from the context")
    if entries.get("oracle", {}).get("verdict") == "better":
        return "its gain needs the source chunk in the context: it learned to read the context"
    worse = [_label(name) for name, e in entries.items() if e["verdict"] == "worse"]
    if worse:
        return f"it is worse than the base {' and '.join(worse)}"
    return "no condition separates it from the base at this sample size"


def _label(name: str) -> str:
    return LABELS.get(name) or f"with {name}"


def _short(verdict: str) -> str:
    """better / worse / n.s. (the CI includes 0) / too few questions."""
    return verdict if verdict in ("better", "worse") else "n.s." if verdict.startswith("no difference") else "too few questions"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"
