"""Ragas scoring of saved answers: every (sample, metric) ends as a score or a recorded failure.

Metrics are Ragas 0.4's own classes (`ragas.metrics.collections`, plus the legacy non-LLM context
metrics), called one sample at a time with `ascore`. All samples of all models run concurrently in
one event loop so the judge (`eval.judge.BatchedJudge`) can batch their calls.

Inputs per metric:
- answer metrics, per model and mode: the question, the model's answer, the contexts (in closed-book
  mode the contexts retrieved for the question serve as evidence for faithfulness and grounding: does the
  knowledge the model baked in agree with the documents?), and the reference (`reference_answers`): a golden
  row's `reference`, else the teacher's RAG answer;
- `grounding` is ragtune's own non-LLM metric, `ragtune.core.grounding.grounding` of the final answer (the
  text after RAFT's `<ANSWER>:`) against the contexts the model was shown (rag) or retrieved for the question
  (closed_book): the same support score prep gates teacher answers with, so it is scored for the teacher too;
- retrieval metrics, once per question (`scores.retriever.rag.jsonl`): the retrieved contexts, the reference, and
  the question's source (oracle) chunk, or a golden row's `contexts`, as reference contexts (`reference_passages`).

A sample whose inputs are missing (failed or empty answer, failed reference), a judge error (backend
failure, timeout, truncated or invalid output), or a NaN from Ragas is written with `value: null` and
the reason in `error`: nothing is silently dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tqdm.auto import tqdm

from ragtune.eval.answer import REFERENCE_MODEL
from ragtune.eval.config import ANSWER_METRICS, RETRIEVAL_METRICS
from ragtune.eval.judge import JudgeError
from ragtune.core.artifacts import JsonlAppender, read_jsonl
from ragtune.core.grounding import final_answer, grounding
from ragtune.core.llm import BackendUnavailable

if TYPE_CHECKING:
    from ragtune.eval.judge import BatchedJudge

os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")

log = logging.getLogger(__name__)

LLM_METRICS = frozenset({"faithfulness", "answer_relevancy", "answer_correctness", "context_precision", "context_recall"})
EMBEDDING_METRICS = frozenset({"answer_relevancy", "answer_correctness", "semantic_similarity"})
# the inputs each metric needs from a sample
NEEDS: dict[str, tuple[str, ...]] = {
    "faithfulness": ("answer", "contexts"),
    "answer_relevancy": ("answer",),
    "answer_correctness": ("answer", "reference"),
    "semantic_similarity": ("answer", "reference"),
    "bleu_score": ("answer", "reference"),
    "chrf_score": ("answer", "reference"),
    "rouge_score": ("answer", "reference"),
    "non_llm_string_similarity": ("answer", "reference"),
    "grounding": ("answer", "contexts"),
    "context_precision": ("contexts", "reference"),
    "context_recall": ("contexts", "reference"),
    "non_llm_context_precision_with_reference": ("contexts", "reference_contexts"),
    "non_llm_context_recall": ("contexts", "reference_contexts"),
}
REFERENCE_ANSWER_METRICS = frozenset(m for m in ANSWER_METRICS if "reference" in NEEDS[m])
# Why Ragas returns NaN for a metric, in words (it does so when the judge extracted nothing to score).
NAN_REASONS = {
    "faithfulness": "the judge extracted no statements from the answer",
    "context_recall": "the judge returned no classified statements",
}
# the judge sanity check uses the LLM metrics that can be given a known-good and a known-bad input
SANITY_METRICS = ("faithfulness", "answer_relevancy", "context_precision", "context_recall")


@dataclass
class Sample:
    question_id: str
    question: str
    answer: str | None = None
    answer_error: str | None = None
    contexts: list[str] | None = None
    reference: str | None = None
    reference_error: str | None = None
    reference_contexts: list[str] | None = None


@dataclass
class Job:
    rows: JsonlAppender
    key: str
    metric: str
    sample: Sample
    fingerprint: str
    extra: dict[str, Any] | None = None


MetricCall = Callable[[Sample], Awaitable[Any]]


def build_metrics(names: list[str], llm: "BatchedJudge | None", embeddings: Any, strictness: int) -> dict[str, MetricCall]:
    """One `ascore` call per metric name, with Ragas's argument names."""
    from ragas.dataset_schema import SingleTurnSample

    with warnings.catch_warnings():  # Ragas 0.4.3 points to collections versions of these that it does not ship
        warnings.simplefilter("ignore", DeprecationWarning)
        from ragas.metrics import NonLLMContextPrecisionWithReference, NonLLMContextRecall
    from ragas.metrics.collections import (
        AnswerCorrectness, AnswerRelevancy, BleuScore, CHRFScore, ContextPrecision, ContextRecall, Faithfulness,
        NonLLMStringSimilarity, RougeScore, SemanticSimilarity,
    )

    calls: dict[str, MetricCall] = {}
    for name in names:
        if name in LLM_METRICS and llm is None:
            raise ValueError(f"metric {name} needs a judge")
        if name == "faithfulness":
            m = Faithfulness(llm=llm)
            calls[name] = lambda s, m=m: m.ascore(user_input=s.question, response=s.answer, retrieved_contexts=s.contexts)
        elif name == "answer_relevancy":
            m = AnswerRelevancy(llm=llm, embeddings=embeddings, strictness=strictness)
            calls[name] = lambda s, m=m: m.ascore(user_input=s.question, response=s.answer)
        elif name == "answer_correctness":
            m = AnswerCorrectness(llm=llm, embeddings=embeddings)
            calls[name] = lambda s, m=m: m.ascore(user_input=s.question, response=s.answer, reference=s.reference)
        elif name == "semantic_similarity":
            m = SemanticSimilarity(embeddings=embeddings)
            calls[name] = lambda s, m=m: m.ascore(reference=s.reference, response=s.answer)
        elif name in ("bleu_score", "chrf_score", "rouge_score", "non_llm_string_similarity"):
            m = {"bleu_score": BleuScore, "chrf_score": CHRFScore, "rouge_score": RougeScore,
                 "non_llm_string_similarity": NonLLMStringSimilarity}[name]()
            calls[name] = lambda s, m=m: m.ascore(reference=s.reference, response=s.answer)
        elif name == "context_precision":
            m = ContextPrecision(llm=llm)
            calls[name] = lambda s, m=m: m.ascore(user_input=s.question, reference=s.reference,
                                                  retrieved_contexts=s.contexts)
        elif name == "context_recall":
            m = ContextRecall(llm=llm)
            calls[name] = lambda s, m=m: m.ascore(user_input=s.question, retrieved_contexts=s.contexts,
                                                  reference=s.reference)
        elif name == "grounding":
            calls[name] = score_grounding
        elif name in ("non_llm_context_precision_with_reference", "non_llm_context_recall"):
            m = NonLLMContextPrecisionWithReference() if name.startswith("non_llm_context_precision") else NonLLMContextRecall()
            calls[name] = lambda s, m=m: m.single_turn_ascore(
                SingleTurnSample(retrieved_contexts=s.contexts, reference_contexts=s.reference_contexts))
        else:
            raise ValueError(f"unknown metric {name}")
    return calls


async def score_grounding(sample: Sample) -> float:
    """The share of the final answer's content-word pairs, beyond those of the question, found in the sample's
    contexts (no LLM, no Ragas): `ragtune.core.grounding.grounding`, the gate prep applies to teacher answers."""
    assert sample.answer is not None and sample.contexts is not None  # `missing_input` checked both
    return grounding(final_answer(sample.answer), sample.contexts, sample.question or "")


def missing_input(metric: str, sample: Sample) -> str | None:
    """Why this sample cannot be scored on this metric, or None when every input is there."""
    for need in NEEDS[metric]:
        if need == "answer":
            if sample.answer is None:
                return f"no answer: generation failed ({sample.answer_error})"
            if not sample.answer.strip():
                return "empty answer: the model generated no text"
        elif need == "reference" and not (sample.reference or "").strip():
            return f"no reference: the teacher's rag answer failed or is empty ({sample.reference_error or 'empty'})"
        elif need == "contexts" and not sample.contexts:
            return "no contexts retrieved for the question"
        elif need == "reference_contexts" and not sample.reference_contexts:
            return ("no reference context: the question's source chunk is missing from data/chunks.jsonl, or its "
                    "golden row gives no `contexts`")
    return None


async def score_one(call: MetricCall, metric: str, sample: Sample) -> dict[str, Any]:
    """Score one (sample, metric): {"value": float} or {"value": None, "error": reason}, and its seconds.

    No wall clock here: a sample's time includes waiting for its turn at the judge. The judge times
    its own calls (`eval.judge_timeout`) and the in-process judge is bounded by `judge.max_new_tokens`.
    """
    started = time.perf_counter()
    reason = missing_input(metric, sample)
    value: float | None = None
    if reason is None:
        try:
            result = await call(sample)
            value = float(getattr(result, "value", result))
        except BackendUnavailable:
            raise
        except JudgeError as err:
            reason = str(err)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
        if reason is None and (value is None or math.isnan(value)):
            value, reason = None, f"Ragas returned NaN: {NAN_REASONS.get(metric, 'no score from the judge output')}"
    return {"value": value, "error": reason, "seconds": round(time.perf_counter() - started, 3)}


async def run_jobs(jobs: list[Job], calls: dict[str, MetricCall], concurrency: int, desc: str = "ragas") -> None:
    """Score all jobs concurrently (at most `concurrency` at a time), appending each row as it finishes."""
    semaphore = asyncio.Semaphore(concurrency)
    with tqdm(total=len(jobs), desc=desc, unit="score", disable=not jobs) as bar:

        async def one(job: Job) -> None:
            async with semaphore:
                outcome = await score_one(calls[job.metric], job.metric, job.sample)
            job.rows.append({"key": job.key, "question_id": job.sample.question_id, "metric": job.metric, **outcome,
                             **(job.extra or {}), "fingerprint": job.fingerprint})
            bar.update(1)

        # LLM jobs first so the judge starts batching at once; the fast non-LLM ones fill the gaps
        ordered = sorted(jobs, key=lambda j: j.metric not in LLM_METRICS)
        await asyncio.gather(*(one(job) for job in ordered))


def reference_answers(questions: list[dict[str, Any]], teacher_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question, what answers are compared with: a golden row's `reference` (`source: golden`), else the
    teacher's rag answer row (`source: teacher`)."""
    teacher = {r["question_id"]: {**r, "source": REFERENCE_MODEL} for r in teacher_rows}
    references = {}
    for question in questions:
        if question.get("reference"):
            references[question["id"]] = {"answer": question["reference"], "error": None, "source": "golden"}
        elif question["id"] in teacher:
            references[question["id"]] = teacher[question["id"]]
    return references


def reference_passages(question: dict[str, Any], chunk_text: dict[str, str]) -> list[str] | None:
    """The passages a good retriever returns for the question: a golden row's `contexts`, else prep's source chunk."""
    if question.get("reference_contexts"):
        return question["reference_contexts"]
    oracle = chunk_text.get(question.get("source_chunk_id") or "")
    return [oracle] if oracle else None


def answer_jobs(rows: JsonlAppender, answers: list[dict[str, Any]], metrics: list[str], *, is_reference_model: bool,
                references: dict[str, dict[str, Any]], retrieval: dict[str, dict[str, Any]], fingerprint: str) -> list[Job]:
    """The (question, metric) pairs of one model/mode answers file not yet in its scores file. The reference model
    (the teacher) is scored on reference-based metrics only where its answer is not the reference (a golden one is)."""
    jobs = []
    for row in answers:
        ref = references.get(row["question_id"], {})
        own_reference = is_reference_model and ref.get("source") != "golden"
        sample = Sample(
            question_id=row["question_id"], question=row["question"], answer=row.get("answer"),
            answer_error=row.get("error"),
            contexts=row.get("contexts") or retrieval.get(row["question_id"], {}).get("contexts"),
            reference=ref.get("answer"), reference_error=ref.get("error") or (None if ref else "no teacher answer"),
        )
        for metric in metrics:
            if metric not in ANSWER_METRICS or (own_reference and metric in REFERENCE_ANSWER_METRICS):
                continue
            key = f"{row['question_id']}|{metric}"
            if key not in rows.done_keys:
                jobs.append(Job(rows, key, metric, sample, fingerprint))
    return jobs


def retrieval_jobs(rows: JsonlAppender, questions: list[dict[str, Any]], metrics: list[str], *,
                   references: dict[str, dict[str, Any]], retrieval: dict[str, dict[str, Any]],
                   chunk_text: dict[str, str], fingerprint: str) -> list[Job]:
    jobs = []
    for question in questions:
        ref = references.get(question["id"], {})
        sample = Sample(
            question_id=question["id"], question=question["question"],
            contexts=retrieval.get(question["id"], {}).get("contexts"),
            reference=ref.get("answer"), reference_error=ref.get("error") or (None if ref else "no teacher answer"),
            reference_contexts=reference_passages(question, chunk_text),
        )
        for metric in metrics:
            key = f"{question['id']}|{metric}"
            if metric in RETRIEVAL_METRICS and key not in rows.done_keys:
                jobs.append(Job(rows, key, metric, sample, fingerprint))
    return jobs


def sanity_jobs(rows: JsonlAppender, questions: list[dict[str, Any]], metrics: list[str], n_pairs: int, *,
                references: dict[str, dict[str, Any]], retrieval: dict[str, dict[str, Any]],
                chunk_text: dict[str, str], fingerprint: str) -> list[Job]:
    """Known-good vs known-bad inputs built from the data, for the judge sanity check.

    For question i and another question j (a different source passage): answer metrics compare the
    reference answer to i against the reference answer to j; context metrics compare i's source passage
    against j's (`reference_passages`). A judge that cannot tell these apart cannot be trusted on finer differences.
    """
    passages = {q["id"]: reference_passages(q, chunk_text) for q in questions}
    usable = [q for q in questions if (references.get(q["id"], {}).get("answer") or "").strip() and passages[q["id"]]]
    jobs = []
    for i, question in enumerate(usable[:n_pairs]):
        other = next((o for o in usable[i + 1:] + usable[:i]
                      if passages[o["id"]][0] != passages[question["id"]][0]
                      and references[o["id"]]["answer"].strip() != references[question["id"]]["answer"].strip()), None)
        if other is None:
            continue
        answer, wrong_answer = references[question["id"]]["answer"], references[other["id"]]["answer"]
        oracle, unrelated = passages[question["id"]][0], passages[other["id"]][0]
        contexts = retrieval.get(question["id"], {}).get("contexts") or [oracle]
        for metric in metrics:
            if metric not in SANITY_METRICS:
                continue
            if metric in ("faithfulness", "answer_relevancy"):
                good = Sample(question["id"], question["question"], answer=answer, contexts=contexts)
                bad = Sample(question["id"], question["question"], answer=wrong_answer, contexts=contexts)
            else:
                good = Sample(question["id"], question["question"], reference=answer, contexts=[oracle])
                bad = Sample(question["id"], question["question"], reference=answer, contexts=[unrelated])
            for label, sample in (("good", good), ("bad", bad)):
                key = f"{metric}|{question['id']}|{label}"
                if key not in rows.done_keys:
                    jobs.append(Job(rows, key, metric, sample, fingerprint,
                                    extra={"pair": question["id"], "other": other["id"], "label": label}))
    return jobs


def discrimination(rows: list[dict[str, Any]], confidence_level: float) -> dict[str, Any]:
    """Per metric: share of pairs where the judge scored the good input above the bad one (ties count ½)."""
    from ragtune.eval.stats import wilson_interval

    by_metric: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_metric.setdefault(row["metric"], {}).setdefault(row["pair"], {})[row["label"]] = row
    result: dict[str, Any] = {}
    total_success, total_n, total_failed = 0.0, 0, 0
    for metric, pairs in by_metric.items():
        success, n, failed, reasons = 0.0, 0, 0, {}
        for pair in pairs.values():
            good, bad = pair.get("good"), pair.get("bad")
            if not good or not bad or good["value"] is None or bad["value"] is None:
                failed += 1
                for side in (good, bad):
                    if side and side["error"]:
                        reason = reason_key(side["error"])
                        reasons[reason] = reasons.get(reason, 0) + 1
                continue
            n += 1
            success += 1.0 if good["value"] > bad["value"] else 0.5 if good["value"] == bad["value"] else 0.0
        low, high = wilson_interval(success, n, confidence_level)
        result[metric] = {"pairs": n, "failed_pairs": failed, "failure_reasons": reasons,
                          "rate": success / n if n else None, "ci_low": low, "ci_high": high}
        total_success, total_n, total_failed = total_success + success, total_n + n, total_failed + failed
    low, high = wilson_interval(total_success, total_n, confidence_level)
    overall = {"pairs": total_n, "failed_pairs": total_failed, "rate": total_success / total_n if total_n else None,
               "ci_low": low, "ci_high": high}
    warning = None
    if total_n == 0 and by_metric:
        warning = (f"JUDGE NOT CHECKED: all {total_failed} sanity pairs failed to score — the LLM-judged metrics "
                   "of this run rest on a judge that produced no usable verdicts.")
    elif total_n and (low is None or low <= 0.5):
        warning = (f"JUDGE NEAR CHANCE: it ranked the known-good input above the known-bad one in "
                   f"{overall['rate']:.0%} of {total_n} pairs (95% CI {low:.0%}–{high:.0%}, chance is 50%). "
                   "Its faithfulness/relevancy/context scores cannot be trusted: use a stronger judge "
                   "(e.g. judge.backend: openai against a vLLM server) and rely on the non-LLM metrics meanwhile.")
    return {"metrics": result, "overall": overall, "warning": warning}


def reason_key(error: str) -> str:
    """A failure reason without the judge output it quotes, for counting."""
    return error.split(" — output: ")[0].strip()[:160]


def load_scores(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{question_id: {metric: row}} from a scores file (empty when the file does not exist)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    if path.exists():
        for row in read_jsonl(path, tolerate_torn_tail=True):
            table.setdefault(row["question_id"], {})[row["metric"]] = row
    return table
