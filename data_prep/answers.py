"""Teacher answers for prep's training rows: the teacher's gated best-of-N candidates (`ragtune.core.teacher`, the
same call as eval's references), an optional LLM faithfulness verdict by the judge, and the row (or rejected row)
each question ends as. Nothing is lost: a question is a kept row in data/train.jsonl or a rejected one, with every
candidate's text and reason, in data/answers.rejected.jsonl."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ragtune.core.artifacts import JsonlAppender
from ragtune.core.gates import AnswerGates, Verdict
from ragtune.core.grounding import final_answer
from ragtune.core.llm import LazyBackend
from ragtune.core.llm.overlap import depth_for, overlapped
from ragtune.core.rag import build_closed_book_messages
from ragtune.core.teacher import BestOfN, best_of_n
from ragtune.data_prep.questions import yes_no_schema

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

FAITHFUL_SCHEMA = yes_no_schema("faithful")
FAITHFUL_PROMPT = (
    "Context information is below.\n---------------------\n{context_str}\n---------------------\n"
    "Is every statement of the answer below supported by the context information? "
    'Reply with JSON: {"faithful": true} or {"faithful": false}.\nAnswer: {answer}'
)


@dataclass
class AnswerJob:
    """One training question with the exact messages eval will send and the contexts they hold."""

    question: dict[str, Any]
    messages: list[dict[str, str]]
    contexts: list[str]
    context_ids: list[str]
    oracle_in: bool


def answer_all(jobs: list[AnswerJob], config: "RagtuneConfig", teacher: LazyBackend, judge: LazyBackend,
               rows: JsonlAppender, rejected: JsonlAppender, failures: JsonlAppender,
               logprobs: JsonlAppender | None = None) -> int:
    """Answer the questions not done yet, batch by batch; returns how many were answered (kept or rejected) now.
    With `logprobs` (data_prep.teacher_top_logprobs), each kept RAG row's teacher tokens and top-k log-probs go there."""
    # Batches group prompts of similar length (less padding) in a fixed order, so a resumed run regenerates
    # a partly saved batch with exactly the same neighbours (same padding) and gets exactly the same rows.
    done = rows.done_keys | rejected.done_keys
    order = sorted((j for j in jobs if j.question["id"] not in done),
                   key=lambda j: (len(j.messages[-1]["content"]), j.question["id"]))
    generated = 0
    with tqdm(total=len(jobs), initial=len(jobs) - len(order), desc="teacher answers", unit="row") as bar:
        # a batch of questions is sent greedy first, then the samples: on vLLM the samples' prompts are then
        # prefix-cache hits (prefill is most of a RAG answer's cost on a CPU)
        batch_size = teacher.get().batch_size if order else 1

        def answer(batch: list[AnswerJob]) -> list[BestOfN]:
            picks = best_of_n(teacher.get(), [job.messages for job in batch], config.data_prep, config.teacher,
                              questions=[job.question["question"] for job in batch],
                              contexts=[job.contexts for job in batch], oracle_in=[job.oracle_in for job in batch],
                              top_logprobs=config.data_prep.teacher_top_logprobs)
            if config.data_prep.answer_gates.llm_faithfulness:
                _judge_faithfulness(batch, picks, judge, config.data_prep.answer_gates)
            return picks

        batches = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
        # the next batch starts while this one's tail generates; not beside a judge, which may replace the teacher's
        # managed server (one at a time on a machine without a GPU plan)
        depth = 1 if config.data_prep.answer_gates.llm_faithfulness or not order else depth_for(teacher.get())
        for batch, picks in overlapped(batches, answer, depth):
            for job, pick in zip(batch, picks):
                if all(c.error is not None for c in pick.candidates):
                    failures.append({"id": f"answers:{job.question['id']}:{time.time_ns()}", "step": "answers",
                                     "question_id": job.question["id"], "error": pick.candidates[0].error})
                    continue
                _keep_or_reject(job, pick, config, teacher.get().model_name, rows, rejected, logprobs)
                generated += 1
                bar.update(1)
    return generated


# a judge call that errors (timeout, invalid JSON) is asked again this many times before its candidate keeps the
# lexical gates' verdict: an error is no verdict, and recording it as "unfaithful" lost good rows
JUDGE_ATTEMPTS = 3


def _judge_faithfulness(batch: list[AnswerJob], picks: list[BestOfN], judge: LazyBackend, gates: AnswerGates) -> None:
    """The judge decides the candidates the lexical grounding score cannot: every one that passed the form gates
    and scores at least `judge_min_grounding` is kept when the judge calls it faithful and rejected as "unfaithful"
    when it does not (InstructLab-style filter, widened to the lexical gate's unsure band below `min_grounding`).
    A judge error or unparsable verdict is retried; one that persists leaves the lexical verdict."""
    pairs = [(k, i) for k, pick in enumerate(picks) for i, v in enumerate(pick.verdicts)
             if v.ok or (v.reason == "ungrounded" and v.grounding >= gates.judge_min_grounding)]
    for _ in range(JUDGE_ATTEMPTS):
        if not pairs:
            return
        prompts = [[{"role": "user", "content": FAITHFUL_PROMPT.replace("{context_str}", "\n\n".join(batch[k].contexts))
                     .replace("{answer}", final_answer(picks[k].candidates[i].text))}] for k, i in pairs]
        undecided = []
        for (k, i), answer in zip(pairs, judge.get().chat(prompts, max_new_tokens=16, json_schema=FAITHFUL_SCHEMA)):
            faithful = _faithful(answer)
            if faithful is None:
                undecided.append((k, i))
                continue
            v = picks[k].verdicts[i]
            picks[k].verdicts[i] = (Verdict(True, None, v.grounding, v.refusal, "the judge: faithful", v.on_topic) if faithful
                              else Verdict(False, "unfaithful", v.grounding, v.refusal,
                                           f"the judge: {(answer.text or '')[:80]!r}", v.on_topic))
        pairs = undecided


def _faithful(answer: Any) -> bool | None:
    """The judge's verdict, or None when it gave none (an error, or no {"faithful": bool})."""
    if answer.error is not None:
        return None
    try:
        verdict = json.loads(answer.text).get("faithful")
    except (json.JSONDecodeError, AttributeError, TypeError):
        return None
    return verdict if isinstance(verdict, bool) else None


def _keep_or_reject(job: AnswerJob, pick: BestOfN, config: "RagtuneConfig", teacher_model: str, rows: JsonlAppender,
                    rejected: JsonlAppender, logprobs: JsonlAppender | None = None) -> None:
    """The candidate `pick_best` chooses among those that passed becomes the training row(s), else the question is
    one rejected row."""
    prep = config.data_prep
    candidates, verdicts, best = pick.candidates, pick.verdicts, pick.best
    if best is None:
        rejected.append({
            "id": job.question["id"], "question_id": job.question["id"], "question": job.question["question"],
            "reason": Counter(v.reason for v in verdicts).most_common(1)[0][0], "context_ids": job.context_ids,
            "oracle_in_context": job.oracle_in,
            "candidates": [{"text": c.text, "reason": v.reason, "detail": v.detail, "grounding": round(v.grounding, 3),
                            "finish_reason": c.finish_reason} for c, v in zip(candidates, verdicts)],
        })
        return
    chosen, verdict = candidates[best], verdicts[best]
    meta = {"question_id": job.question["id"], "source_chunk_id": job.question["source_chunk_id"],
            "retrieved_ids": job.context_ids, "oracle_in_context": job.oracle_in, "teacher_model": teacher_model,
            "mode": "rag", "grounding": round(verdict.grounding, 3), "refusal": verdict.refusal,
            "candidate": best, "candidates": len(candidates), "finish_reason": chosen.finish_reason,
            "retried": chosen.completion_tokens > config.teacher.max_new_tokens,
            "usage": {"prompt_tokens": sum(c.prompt_tokens for c in candidates),
                      "completion_tokens": sum(c.completion_tokens for c in candidates)}}
    answer = chosen.text.strip()
    if prep.closed_book_rows:  # written first: the RAG row's id marks the pair as done
        rows.append({"id": f"{job.question['id']}:closed_book",
                     "messages": build_closed_book_messages(job.question["question"], prep)
                     + [{"role": "assistant", "content": final_answer(answer)}],
                     "meta": {**meta, "mode": "closed_book", "retrieved_ids": [], "usage": None}})
    if logprobs is not None and chosen.tokens:  # before the row: the row's id marks the question as done
        logprobs.append({"id": job.question["id"], "tokens": chosen.tokens,
                         "top_tokens": [[token for token, _ in top] for top in chosen.logprobs],
                         "top_logprobs": [[value for _, value in top] for top in chosen.logprobs]})
    rows.append({"id": job.question["id"], "messages": job.messages + [{"role": "assistant", "content": answer}],
                 "meta": meta})
