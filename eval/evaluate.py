"""`ragtune eval CONFIG [--adapters DIR ...] [--questions FILE]`: did fine-tuning help, by how much, can we trust it?

0. questions the held-out questions (data/questions.eval.jsonl), or the user's golden set (`eval.questions_file`,
             eval/golden.py) with its references checked for leaks into data/train.jsonl
1. answers   those questions answered by the base student, each adapter, the merged model and the teacher,
             in `rag` and `closed_book` modes, through the retriever and prompt of training (`eval.answer`)
             → eval/answers.<model>.<mode>.jsonl; with `eval.retrieval_conditions`, the students again in
             rag mode under other contexts (oracle, distractors only, another top_k: `eval.conditions`)
             → eval/answers.<model>.rag@<condition>.jsonl, scored on the metrics that need no judge
2. scores    Ragas metrics per (question, metric): LLM-judged (faithfulness, answer relevancy, answer
             correctness, context precision/recall) and the non-LLM floor (semantic similarity, BLEU, chrF,
             ROUGE, string similarity, string-matched context precision/recall) (`eval.score`)
             → eval/scores.<model>.<mode>.jsonl, eval/scores.retriever.rag.jsonl
3. sanity    the judge scores known-good vs known-bad pairs built from the data → eval/judge_sanity.jsonl
4. summary   means with CIs, failure counts, paired differences vs the base on the questions both were
             scored on, with bootstrap CIs and win/tie/loss (`eval.summary`, `eval.stats`) → eval/summary.json

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

from ragtune.eval.answer import (
    MODES, REFERENCE_MODEL, ModelSpec, answer_fingerprint, generate_answers, generation_order, load_backend,
    load_questions, model_specs, open_rows, retrieve_contexts, starts_a_server,
)
from ragtune.eval.conditions import condition_contexts, condition_modes, judge_free
from ragtune.eval.config import RETRIEVAL_METRICS
from ragtune.eval.golden import leaked_references, load_golden, question_source
from ragtune.eval.score import (
    EMBEDDING_METRICS, LLM_METRICS, Job, answer_jobs, build_metrics, reference_answers, retrieval_jobs, run_jobs,
    sanity_jobs,
)
from ragtune.eval.summary import RETRIEVER, summarize, write_summary
from ragtune.core.artifacts import JsonlAppender, read_jsonl
from ragtune.core.llm import LazyBackend
from ragtune.core.run_dir import RunDir, sha256_file, short_hash

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

log = logging.getLogger(__name__)


def run(config: "RagtuneConfig", run_dir: RunDir | Path, adapters: list[Path] | tuple[Path, ...] = ()) -> dict[str, Any]:
    """Answer, score, sanity-check the judge and summarize; returns the facts for the manifest.

    `adapters` are extra PEFT adapter folders scored besides RUN_DIR/adapter (and `eval.adapters`).
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    started = time.perf_counter()

    ################
    # 0. Questions: prep's held-out ones, or the user's golden set
    ################
    questions, dropped, source = load_eval_questions(config, run_dir)
    specs = model_specs(config, run_dir, [Path(a) for a in adapters])

    ################
    # 1. Retrieval (once, shared by every model), and the contexts of each `eval.retrieval_conditions`; the first
    #    model's vLLM server starts meanwhile
    ################
    timings: dict[str, Any] = {"generation": {}}
    retrieval, conditions = contexts_as_the_first_server_starts(config, run_dir, questions, specs, timings)

    ################
    # 2. Answers
    ################
    for spec in generation_order(specs):
        modes = [*config.eval.modes, *conditions] if spec.kind != "teacher" else \
            [m for m in MODES if m in config.eval.modes or m == "rag"]
        timings["generation"][spec.name] = generate_answers(config, run_dir, spec, modes, questions, retrieval, specs,
                                                            conditions)

    ################
    # 3. Scores and the judge's sanity check
    ################
    timings.update(score(config, run_dir, specs, questions, retrieval))
    timings["total_seconds"] = round(time.perf_counter() - started, 2)

    ################
    # 4. Summary
    ################
    summary = summarize(config, run_dir, specs, questions, dropped, retrieval, timings, source)
    write_summary(run_dir, summary)

    facts: dict[str, Any] = {
        "questions": len(questions), "questions_dropped": sum(dropped.values()), "questions_source": source["kind"],
        "models": [s.name for s in specs], "modes": config.eval.modes,
        "judge_discrimination": summary["judge"]["sanity"]["overall"].get("rate"),
        "score_failures": {f"{model}/{mode}": sum(m.get("failures", 0) for m in metrics.values())
                           for mode, models in summary["results"].items() for model, metrics in models.items()},
        "warnings": summary["warnings"], "timings": summary["timings"],
    }
    return facts


def load_eval_questions(config: "RagtuneConfig", run_dir: RunDir
                        ) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """(questions, dropped counts, whose questions they are): the golden set when `eval.questions_file` is set (prep's
    held-out questions are then not read), with a warning for each reference found in a training row."""
    if not config.eval.questions_file:
        questions, dropped = load_questions(run_dir)
        return questions, dropped, question_source(config, run_dir, questions, [])
    questions = load_golden(Path(config.eval.questions_file))
    leaks = leaked_references(questions, run_dir.train_jsonl)
    for leak in leaks:
        log.warning("golden question %s: its reference is in training row(s) %s of %s", leak["question_id"],
                    ", ".join(leak["train_rows"][:3]), run_dir.train_jsonl)
    return questions, {}, question_source(config, run_dir, questions, leaks)


def contexts_as_the_first_server_starts(config: "RagtuneConfig", run_dir: RunDir, questions: list[dict[str, Any]],
                                       specs: list[ModelSpec], timings: dict[str, Any]
                                       ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The retrieved contexts and each retrieval condition's, while the first model's vLLM server starts (when its
    answers will need one: `starts_a_server`); `timings` gets the retrieval's own seconds."""
    def contexts() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        step = time.perf_counter()
        retrieval = retrieve_contexts(config, run_dir, questions)
        conditions = condition_contexts(config, run_dir, questions, retrieval)
        timings["retrieval_seconds"] = round(time.perf_counter() - step, 2)
        return retrieval, conditions

    first = generation_order(specs)[0]
    server = LazyBackend(lambda: load_backend(config, first, run_dir, specs))
    return server.build_during(contexts, when=starts_a_server(config, run_dir, first))


def score(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], questions: list[dict[str, Any]],
          retrieval: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Score every saved answer, the retrieval, and the judge sanity pairs that are not scored yet."""
    appenders, jobs = pending_jobs(config, run_dir, specs, questions, retrieval)
    facts: dict[str, Any] = {"scored": len(jobs), "llm_scored": sum(j.metric in LLM_METRICS for j in jobs)}
    judge, embeddings = None, None
    try:
        if any(j.metric in LLM_METRICS for j in jobs):
            step = time.perf_counter()
            judge = make_judge(config, run_dir)
            facts["judge_load_seconds"] = round(time.perf_counter() - step, 2)
        if any(j.metric in EMBEDDING_METRICS for j in jobs):
            step = time.perf_counter()
            embeddings = make_embeddings(config)
            facts["embeddings_load_seconds"] = round(time.perf_counter() - step, 2)
        calls = build_metrics(sorted({j.metric for j in jobs}), judge, embeddings, config.eval.strictness)
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


def pending_jobs(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], questions: list[dict[str, Any]],
                 retrieval: dict[str, dict[str, Any]]) -> tuple[list[JsonlAppender], list[Job]]:
    """The scoring jobs not saved yet (each model's answers, the retrieval, the judge sanity pairs), and the score
    files they append to, open: the caller closes them. A saved row counts only under the same fingerprint (of what
    is scored, the reference answers and the judge)."""
    ev = config.eval
    metrics = list(ev.metrics)
    references = reference_answers(questions, read_jsonl(run_dir.answers(REFERENCE_MODEL, "rag")))
    reference_fp = answer_fingerprint(config, run_dir, _spec(specs, REFERENCE_MODEL), "rag")
    chunk_text = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks)} if run_dir.chunks.exists() else {}
    judge_fp = judge_fingerprint(config)
    retrieval_fp = sorted({r["fingerprint"] for r in retrieval.values()})

    appenders, jobs = [], []
    for spec in specs:
        for mode in [*ev.modes, *condition_modes(ev)]:  # a retrieval condition is scored without the judge
            answers_path = run_dir.answers(spec.name, mode)
            if not answers_path.exists():
                continue
            fingerprint = short_hash(answer_fingerprint(config, run_dir, spec, mode), reference_fp, judge_fp)
            rows = open_rows(run_dir, run_dir.scores(spec.name, mode), "key", fingerprint)
            appenders.append(rows)
            jobs += answer_jobs(rows, read_jsonl(answers_path), metrics if mode in ev.modes else judge_free(metrics),
                                is_reference_model=spec.kind == "teacher",
                                references=references, retrieval=retrieval, fingerprint=fingerprint)
    if any(m in RETRIEVAL_METRICS for m in metrics):
        fingerprint = short_hash(retrieval_fp, reference_fp, judge_fp)
        rows = open_rows(run_dir, run_dir.scores(RETRIEVER, "rag"), "key", fingerprint)
        appenders.append(rows)
        jobs += retrieval_jobs(rows, questions, metrics, references=references, retrieval=retrieval,
                               chunk_text=chunk_text, fingerprint=fingerprint)
    if ev.judge_sanity_pairs and any(m in LLM_METRICS for m in metrics):
        fingerprint = short_hash("sanity", retrieval_fp, reference_fp, judge_fp)
        rows = open_rows(run_dir, run_dir.judge_sanity, "key", fingerprint)
        appenders.append(rows)
        jobs += sanity_jobs(rows, questions, metrics, ev.judge_sanity_pairs, references=references,
                            retrieval=retrieval, chunk_text=chunk_text, fingerprint=fingerprint)
    return appenders, jobs


def make_judge(config: "RagtuneConfig", run_dir: RunDir) -> Any:
    """The configured judge behind Ragas's structured-output interface (schema-bounded when in-process)."""
    from ragtune.eval.judge import BatchedJudge
    from ragtune.core.gpu_plan import gpu_plan
    from ragtune.core.llm import make_backend

    role = config.judge
    in_process = role.backend == "hf"
    backend = make_backend(role, log_dir=run_dir.logs, server=gpu_plan(config).judge)
    return BatchedJudge(backend, max_new_tokens=role.max_new_tokens, temperature=role.temperature,
                        constrain=in_process, max_length=config.eval.judge_max_length,
                        max_items=config.eval.judge_max_items, batch_size=None if in_process else 1,
                        concurrent_calls=1 if in_process else role.max_concurrency,
                        call_timeout=None if in_process else config.eval.judge_timeout)


def make_embeddings(config: "RagtuneConfig") -> Any:
    from ragtune.core.models import resolve_embedding
    from ragtune.core.rag import embedding_dtype
    from ragtune.eval.judge import timed_embeddings

    path = resolve_embedding(config.embedding.model)
    return timed_embeddings(path, config.embedding.embed_batch_size, embedding_dtype(config.embedding, path))


def judge_fingerprint(config: "RagtuneConfig") -> str:
    """Everything that can change a score: judge, embeddings, metric settings, Ragas version, ragtune's own
    grounding metric's code."""
    from importlib.metadata import version

    import ragtune.core.grounding

    judge = config.judge.model_dump(exclude={"max_concurrency", "batch_size", "timeout", "max_retries", "api_key_env"})
    return short_hash(judge, config.embedding.model, config.eval.strictness, config.eval.judge_max_length,
                      config.eval.judge_max_items, version("ragas"), sha256_file(ragtune.core.grounding.__file__))


def _spec(specs: list[ModelSpec], name: str) -> ModelSpec:
    return next(s for s in specs if s.name == name)
