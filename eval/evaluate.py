"""`ragtune eval CONFIG [--adapters DIR ...]`: did fine-tuning help, by how much, and can we trust it?

1. answers   the held-out questions (data/questions.eval.jsonl) answered by the base student, each
             adapter, the merged model and the teacher, in `rag` and `closed_book` modes, through the
             retriever and prompt of training (`eval.answer`) → eval/answers.<model>.<mode>.jsonl
2. scores    Ragas metrics per (question, metric): LLM-judged (faithfulness, answer relevancy, answer
             correctness, context precision/recall) and the non-LLM floor (semantic similarity, BLEU, chrF,
             ROUGE, string similarity, string-matched context precision/recall) (`eval.score`)
             → eval/scores.<model>.<mode>.jsonl, eval/scores.retriever.rag.jsonl
3. sanity    the judge scores known-good vs known-bad pairs built from the data → eval/judge_sanity.jsonl
4. summary   means with CIs, failure counts, paired differences vs the base on the questions both were
             scored on, with bootstrap CIs and win/tie/loss (`eval.stats`) → eval/summary.json

Every step resumes: rows already saved under the same fingerprint are reused, so re-running with a
new adapter only generates and scores that adapter.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.answer import (
    MODES, REFERENCE_MODEL, ModelSpec, answer_fingerprint, generate_answers, load_questions, model_specs, open_rows,
    retrieve_contexts,
)
from eval.config import ANSWER_METRICS, RETRIEVAL_METRICS
from eval.score import (
    EMBEDDING_METRICS, LLM_METRICS, REFERENCE_ANSWER_METRICS, answer_jobs, build_metrics, discrimination, reason_key,
    retrieval_jobs, run_jobs, sanity_jobs, score_fingerprint,
)
from eval.report import load_scores
from eval.stats import mean_with_ci, paired_difference, paired_ragas_score, ragas_score
from ragtune.artifacts import read_jsonl, write_json
from ragtune.run_dir import RunDir

if TYPE_CHECKING:
    from ragtune.config import RagtuneConfig

log = logging.getLogger(__name__)

BASELINE = "base"
RETRIEVER = "retriever"
FEW_QUESTIONS = 30


def run(config: "RagtuneConfig", run_dir: RunDir | Path, adapters: list[Path] | tuple[Path, ...] = ()) -> dict[str, Any]:
    """Answer, score, sanity-check the judge and summarize; returns the facts for the manifest.

    `adapters` are extra PEFT adapter folders scored besides RUN_DIR/adapter (and `eval.adapters`).
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    started = time.perf_counter()
    questions, dropped = load_questions(run_dir)
    specs = model_specs(config, run_dir, [Path(a) for a in adapters])
    step = time.perf_counter()
    retrieval = retrieve_contexts(config, run_dir, questions)
    timings: dict[str, Any] = {"retrieval_seconds": round(time.perf_counter() - step, 2), "generation": {}}

    for spec in specs:
        modes = config.eval.modes if spec.kind != "teacher" else [m for m in MODES if m in config.eval.modes or m == "rag"]
        timings["generation"][spec.name] = generate_answers(config, run_dir, spec, modes, questions, retrieval)

    timings.update(score(config, run_dir, specs, questions, retrieval))
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    summary = summarize(config, run_dir, specs, questions, dropped, retrieval, timings)
    write_summary(run_dir, summary)

    facts: dict[str, Any] = {
        "questions": len(questions), "questions_dropped": sum(dropped.values()),
        "models": [s.name for s in specs], "modes": config.eval.modes,
        "judge_discrimination": summary["judge"]["sanity"]["overall"].get("rate"),
        "score_failures": {f"{model}/{mode}": sum(m.get("failures", 0) for m in metrics.values())
                           for mode, models in summary["results"].items() for model, metrics in models.items()},
        "warnings": summary["warnings"], "timings": summary["timings"],
    }
    return facts


def score(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], questions: list[dict[str, Any]],
          retrieval: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Score every saved answer, the retrieval, and the judge sanity pairs that are not scored yet."""
    ev = config.eval
    metrics = list(ev.metrics)
    references = {r["question_id"]: r for r in read_jsonl(run_dir.answers(REFERENCE_MODEL, "rag"))}
    reference_fp = answer_fingerprint(config, run_dir, _spec(specs, REFERENCE_MODEL), "rag")
    chunk_text = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks)} if run_dir.chunks.exists() else {}
    judge_fp = judge_fingerprint(config)
    retrieval_fp = sorted({r["fingerprint"] for r in retrieval.values()})

    appenders, jobs = [], []
    for spec in specs:
        for mode in ev.modes:
            answers_path = run_dir.answers(spec.name, mode)
            if not answers_path.exists():
                continue
            fingerprint = score_fingerprint(answer_fingerprint(config, run_dir, spec, mode), reference_fp, judge_fp)
            rows = open_rows(run_dir.scores(spec.name, mode), "key", fingerprint)
            appenders.append(rows)
            jobs += answer_jobs(rows, read_jsonl(answers_path), metrics, is_reference_model=spec.kind == "teacher",
                                references=references, retrieval=retrieval, fingerprint=fingerprint)
    if any(m in RETRIEVAL_METRICS for m in metrics):
        fingerprint = score_fingerprint(retrieval_fp, reference_fp, judge_fp)
        rows = open_rows(run_dir.scores(RETRIEVER, "rag"), "key", fingerprint)
        appenders.append(rows)
        jobs += retrieval_jobs(rows, questions, metrics, references=references, retrieval=retrieval,
                               chunk_text=chunk_text, fingerprint=fingerprint)
    if ev.judge_sanity_pairs and any(m in LLM_METRICS for m in metrics):
        fingerprint = score_fingerprint("sanity", retrieval_fp, reference_fp, judge_fp)
        rows = open_rows(run_dir.judge_sanity, "key", fingerprint)
        appenders.append(rows)
        jobs += sanity_jobs(rows, questions, metrics, ev.judge_sanity_pairs, references=references,
                            retrieval=retrieval, chunk_text=chunk_text, fingerprint=fingerprint)

    facts: dict[str, Any] = {"scored": len(jobs), "llm_scored": sum(j.metric in LLM_METRICS for j in jobs)}
    judge, embeddings = None, None
    try:
        if any(j.metric in LLM_METRICS for j in jobs):
            step = time.perf_counter()
            judge = make_judge(config)
            facts["judge_load_seconds"] = round(time.perf_counter() - step, 2)
        if any(j.metric in EMBEDDING_METRICS for j in jobs):
            step = time.perf_counter()
            embeddings = make_embeddings(config)
            facts["embeddings_load_seconds"] = round(time.perf_counter() - step, 2)
        calls = build_metrics(sorted({j.metric for j in jobs}), judge, embeddings, ev.strictness)
        step = time.perf_counter()
        parallel = config.judge.batch_size if config.judge.backend == "hf" else config.judge.max_concurrency
        asyncio.run(run_jobs(jobs, calls, concurrency=max(16, 4 * parallel)))
        facts["scoring_seconds"] = round(time.perf_counter() - step, 2)
    finally:
        for rows in appenders:
            rows.close()
    if judge is not None:
        facts["judge"] = judge.usage.as_dict()
    if embeddings is not None:
        facts["embeddings_seconds"] = round(embeddings.seconds, 2)
        facts["embedding_calls"] = embeddings.calls
        facts["embedding_texts_cached"] = embeddings.cached
    del judge, embeddings
    gc.collect()
    return facts


def make_judge(config: "RagtuneConfig") -> Any:
    """The configured judge behind Ragas's structured-output interface (schema-bounded when in-process)."""
    from eval.judge import BatchedJudge
    from ragtune.llm import make_backend

    role = config.judge
    in_process = role.backend == "hf"
    return BatchedJudge(make_backend(role), max_new_tokens=role.max_new_tokens, temperature=role.temperature,
                        constrain=in_process, max_length=config.eval.judge_max_length,
                        max_items=config.eval.judge_max_items, batch_size=None if in_process else 1,
                        concurrent_calls=1 if in_process else role.max_concurrency,
                        call_timeout=None if in_process else config.eval.judge_timeout)


def make_embeddings(config: "RagtuneConfig") -> Any:
    from eval.judge import timed_embeddings
    from train.models import resolve_embedding

    return timed_embeddings(resolve_embedding(config.embedding.model), config.embedding.embed_batch_size)


def judge_fingerprint(config: "RagtuneConfig") -> str:
    """Everything that can change a score: judge, embeddings, metric settings, Ragas version."""
    from importlib.metadata import version

    judge = config.judge.model_dump(exclude={"price_per_million_input_tokens", "price_per_million_output_tokens",
                                             "max_concurrency", "batch_size", "timeout", "max_retries", "api_key_env"})
    return score_fingerprint(judge, config.embedding.model, config.eval.strictness, config.eval.judge_max_length,
                             config.eval.judge_max_items, version("ragas"))


def _spec(specs: list[ModelSpec], name: str) -> ModelSpec:
    return next(s for s in specs if s.name == name)


# --- summary ------------------------------------------------------------------------------------


def summarize(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], questions: list[dict[str, Any]],
              dropped: dict[str, int], retrieval: dict[str, dict[str, Any]], timings: dict[str, Any]) -> dict[str, Any]:
    """Per model and mode: means with CIs and failure counts; vs the base: paired differences on the
    intersection of questions scored for both, with bootstrap CIs, win/tie/loss and a verdict."""
    ev = config.eval
    boot = {"n_resamples": ev.n_resamples, "confidence_level": ev.confidence_level}
    qids = [q["id"] for q in questions]
    answer_metrics = [m for m in ev.metrics if m in ANSWER_METRICS]
    warnings: list[str] = []

    files: dict[str, Any] = {"answers": {}, "scores": {}}
    results: dict[str, Any] = {}
    comparisons: dict[str, Any] = {}
    answer_health: dict[str, Any] = {}
    for mode in ev.modes:
        tables = {}
        for spec in specs:
            answers_path, scores_path = run_dir.answers(spec.name, mode), run_dir.scores(spec.name, mode)
            if not answers_path.exists():
                continue
            files["answers"].setdefault(spec.name, {})[mode] = str(answers_path.relative_to(run_dir.root))
            files["scores"].setdefault(spec.name, {})[mode] = str(scores_path.relative_to(run_dir.root))
            answers = {r["question_id"]: r for r in read_jsonl(answers_path)}
            errors = sum(1 for q in qids if answers.get(q, {}).get("error"))
            empty = sum(1 for q in qids if answers.get(q, {}).get("answer") == "")
            answer_health.setdefault(spec.name, {})[mode] = {"answers": len(answers), "errors": errors, "empty": empty}
            if errors or empty:
                warnings.append(f"{spec.name}/{mode}: {errors} failed and {empty} empty answers out of {len(qids)} "
                                "(their answer metrics are recorded failures)")
            table = load_scores(scores_path)
            tables[spec.name] = table
            metrics = [m for m in answer_metrics if not (spec.kind == "teacher" and m in REFERENCE_ANSWER_METRICS)]
            model_result = {m: _metric_summary(table, qids, m, config.seed, boot) for m in metrics}
            if {"faithfulness", "answer_relevancy"} <= set(metrics):
                both = _scored(table, qids, "faithfulness", "answer_relevancy")
                model_result["ragas_score"] = {
                    "n": len(both),
                    "value": ragas_score(_mean(table, both, "faithfulness"), _mean(table, both, "answer_relevancy"))
                    if both else None,
                }
            results.setdefault(mode, {})[spec.name] = model_result
        if BASELINE not in tables:
            continue
        for spec in specs:
            if spec.name == BASELINE or spec.name not in tables:
                continue
            comparisons.setdefault(mode, {})[spec.name] = _compare(
                tables[BASELINE], tables[spec.name], qids, [m for m in results[mode][spec.name] if m in answer_metrics],
                config.seed, ev.tie_tolerance, boot)

    retrieval_summary: dict[str, Any] = {
        "oracle_hit_rate": sum(1 for q in qids if retrieval.get(q, {}).get("oracle_in_context")) / len(qids),
        "similarity_top_k": config.data_prep.similarity_top_k,
    }
    retrieval_table = load_scores(run_dir.scores(RETRIEVER, "rag"))
    for metric in [m for m in ev.metrics if m in RETRIEVAL_METRICS]:
        retrieval_summary[metric] = _metric_summary(retrieval_table, qids, metric, config.seed, boot)
    if retrieval_table:
        files["retrieval_scores"] = str(run_dir.scores(RETRIEVER, "rag").relative_to(run_dir.root))

    sanity_rows = read_jsonl(run_dir.judge_sanity) if run_dir.judge_sanity.exists() else []
    sanity = discrimination(sanity_rows, ev.confidence_level)
    if sanity_rows:
        files["judge_sanity"] = str(run_dir.judge_sanity.relative_to(run_dir.root))
    if sanity["warning"]:
        warnings.insert(0, sanity["warning"])
    elif not sanity_rows and any(m in LLM_METRICS for m in ev.metrics):
        warnings.insert(0, "JUDGE NOT CHECKED: no sanity pairs were scored (eval.judge_sanity_pairs is 0, or fewer "
                           "than two questions have a teacher answer): nothing shows the LLM-judged scores mean anything.")

    for mode, models in results.items():
        for model, metrics in models.items():
            for metric, entry in metrics.items():
                if entry.get("failures"):
                    top = ", ".join(f"{k} ×{v}" for k, v in list(entry["failure_reasons"].items())[:2])
                    warnings.append(f"{model}/{mode} {metric}: {entry['failures']} of {len(qids)} samples failed ({top})")
    base_rag, teacher_rag = run_dir.answers(BASELINE, "rag"), run_dir.answers(REFERENCE_MODEL, "rag")
    if base_rag.exists() and teacher_rag.exists() and set(answer_metrics) & REFERENCE_ANSWER_METRICS:
        base_answers = {r["question_id"]: r["answer"] for r in read_jsonl(base_rag)}
        same = sum(1 for r in read_jsonl(teacher_rag) if r["answer"] and r["answer"] == base_answers.get(r["question_id"]))
        if same >= len(qids) / 2:
            warnings.append(f"the teacher's reference answers equal the base model's for {same} of {len(qids)} "
                            "questions (is the teacher the student model?): reference-based metrics then measure "
                            "distance from the base's own answers and favour the base by construction")
    if not any(s.kind in ("adapter", "merged") for s in specs):
        warnings.append(f"no fine-tuned model found ({run_dir.adapter} and {run_dir.merged} are missing, no --adapters): "
                        "only the teacher is compared to the base")
    if len(qids) < FEW_QUESTIONS:
        warnings.append(f"only {len(qids)} held-out questions: confidence intervals are wide and a real change of a few "
                        "points will usually read as 'no difference'; raise data_prep.num_eval_questions")

    notes = [
        "Every comparison is paired over the questions scored for both models (their intersection); 'excluded' "
        "counts questions left out because a score failed for one or both.",
        f"Reference answers are the teacher's rag answers (model '{REFERENCE_MODEL}'), written with the question's "
        "source chunk among the contexts; reference-based metrics are not computed for the teacher itself.",
    ]
    if "closed_book" in ev.modes and "faithfulness" in answer_metrics:
        notes.append("closed_book faithfulness is judged against the contexts retrieved for the question, which the "
                     "model did not see: does the knowledge it baked in agree with the documents?")
    if any(m in RETRIEVAL_METRICS for m in ev.metrics):
        notes.append("Context precision/recall measure the retriever, which is the same for every model: they are "
                     "scored once per question, against the teacher's answer and the question's source chunk.")
    return {
        "run": {"name": config.name, "run_dir": str(run_dir.root), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "questions": {"evaluated": len(qids), "dropped": dropped},
        "modes": list(ev.modes),
        "metrics": answer_metrics,
        "retrieval_metrics": [m for m in ev.metrics if m in RETRIEVAL_METRICS],
        "baseline": BASELINE,
        "reference": REFERENCE_MODEL,
        "models": [{"name": s.name, "kind": s.kind, "model": s.model, "adapter": s.adapter, "fingerprint": s.fingerprint}
                   for s in specs],
        "files": files,
        "answers": answer_health,
        "results": results,
        "comparisons": comparisons,
        "retrieval": retrieval_summary,
        "judge": {"backend": config.judge.backend, "model": config.judge.model, "sanity": sanity},
        "stats": {**boot, "seed": config.seed, "method": "percentile bootstrap (scipy.stats.bootstrap), paired over questions",
                  "tie_tolerance": ev.tie_tolerance},
        "timings": _timing_breakdown(timings, len(qids)),
        "warnings": warnings,
        "notes": notes,
    }


def _scored(table: dict[str, dict[str, dict[str, Any]]], qids: list[str], *metrics: str) -> list[str]:
    return [q for q in qids if all(table.get(q, {}).get(m, {}).get("value") is not None for m in metrics)]


def _mean(table: dict[str, dict[str, dict[str, Any]]], qids: list[str], metric: str) -> float:
    return sum(table[q][metric]["value"] for q in qids) / len(qids)


def _metric_summary(table: dict[str, dict[str, dict[str, Any]]], qids: list[str], metric: str, seed: int,
                    boot: dict[str, Any]) -> dict[str, Any]:
    values = [table[q][metric]["value"] for q in _scored(table, qids, metric)]
    reasons: dict[str, int] = {}
    for q in qids:
        row = table.get(q, {}).get(metric)
        if row is None:
            reasons["not scored yet"] = reasons.get("not scored yet", 0) + 1
        elif row["value"] is None:
            key = reason_key(row["error"] or "unknown")
            reasons[key] = reasons.get(key, 0) + 1
    return {**mean_with_ci(values, seed=seed, **boot), "failures": sum(reasons.values()),
            "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def _compare(base: dict[str, Any], tuned: dict[str, Any], qids: list[str], metrics: list[str], seed: int,
             tie_tolerance: float, boot: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in metrics:
        common = [q for q in qids if base.get(q, {}).get(metric, {}).get("value") is not None
                  and tuned.get(q, {}).get(metric, {}).get("value") is not None]
        entry = paired_difference([base[q][metric]["value"] for q in common], [tuned[q][metric]["value"] for q in common],
                                  seed=seed, tie_tolerance=tie_tolerance, **boot)
        out[metric] = {**entry, "excluded": len(qids) - len(common)}
    if {"faithfulness", "answer_relevancy"} <= set(metrics):
        common = [q for q in _scored(base, qids, "faithfulness", "answer_relevancy")
                  if q in set(_scored(tuned, qids, "faithfulness", "answer_relevancy"))]
        entry = paired_ragas_score(
            *[[table[q][m]["value"] for q in common] for table in (base, tuned) for m in ("faithfulness", "answer_relevancy")],
            seed=seed, tie_tolerance=tie_tolerance, **boot)
        out["ragas_score"] = {**entry, "excluded": len(qids) - len(common)}
    return out


def _timing_breakdown(timings: dict[str, Any], n_questions: int) -> dict[str, Any]:
    """Seconds per question per model, split into generation, judge and embeddings."""
    generation = timings.get("generation", {})
    per_model = {}
    for model, facts in generation.items():
        for mode, entry in facts.items():
            if isinstance(entry, dict) and entry.get("generated"):
                per_model[f"{model}/{mode}"] = round(entry["seconds"] / entry["generated"], 3)
    judge = timings.get("judge", {})
    scored = timings.get("llm_scored", 0)
    return {
        **timings,
        "generation_seconds_per_question": per_model,
        "judge_seconds_per_llm_scored_sample": round(judge.get("seconds", 0) / scored, 3) if scored else None,
        "questions": n_questions,
    }


def write_summary(run_dir: RunDir, summary: dict[str, Any]) -> None:
    write_json(run_dir.summary, summary, default=str)
