"""Quality gates for teacher answers and generated questions: what a student must never be taught.

Every check is pure text (or a given embedding matrix) and takes at most about a millisecond, so prep can run all
of them on every candidate answer. `check_answer` is the one call per answer; it returns a `Verdict` whose `reason`
is the rejection reason written to data/answers.rejected.jsonl (or None for a kept answer), and `pick_best` chooses
among best-of-N candidates. Two teachers set the defaults: a strong one (FinanceBench's human-labelled GPT-4
answers, scripts/bench_gates.py) and the demo's SmolLM2-135M-Instruct on Uber's 2021 10-K
(scripts/probe_teacher.py); the numbers are beside each default. `ragtune gates` runs them on a user's own labels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragtune.core.grounding import (ANSWER_TAG, SENTENCE_BREAK, content_words, final_answer, grounding, lexical_overlap,
                                    normalize, repetition, support)

BEGIN_QUOTE, END_QUOTE = "##begin_quote##", "##end_quote##"

Reason = Literal["truncated", "ungrounded", "bad_quote", "missing_answer_tag", "repetition", "refusal_with_oracle",
                 "empty", "unfaithful", "prompt_echo", "off_topic"]

_QUOTE = re.compile(re.escape(BEGIN_QUOTE) + r"(.*?)(?:" + re.escape(END_QUOTE) + r"|$)", re.DOTALL)


_SOURCE = (r"(?:context|text|passage|document|information|excerpt|evidence|data|filing|statement|report|table|sheet|"
           r"page|disclosure|10-k|10-q)s?")
_REFUSAL = re.compile("|".join([
    _SOURCE + r"\b[^.]{0,40}?\b(?:does not|doesn't|do not|don't|did not)\s+(?:explicitly\s+|specifically\s+)?"
    r"(?:say|mention|provide|specify|state|contain|include|give|discuss|address|indicate|tell|list|show|disclose|"
    r"report|break down|offer)",
    r"\b(?:information|data|details?)\b[^.]{0,30}?\b(?:is|are|was|were)\s+(?:insufficient|not\s+(?:available|"
    r"sufficient|enough|provided|included))",
    r"\bnot\s+(?:explicitly\s+)?(?:provided|mentioned|specified|stated|given|included|available|found|addressed|"
    r"discussed)\s+in\s+the\s+(?:given\s+|provided\s+)?" + _SOURCE,
    r"\b(?:cannot|can't|can not|unable to|not able to|not possible to|impossible to)\s+(?:be\s+)?(?:answer|determine|"
    r"find|tell|calculate|compute|say|provide|assess|answered|determined|calculated|computed|provided|assessed)",
    r"\bno\s+(?:information|mention|details?|data)\s+(?:about|on|regarding|is|was|in|of)\b",
    r"\bthere is no (?:information|mention)\b",
    r"\bi (?:do not|don't) know\b",
    r"\b(?:insufficient|not enough) (?:information|context|data)\b",
]), re.IGNORECASE)


# A RAG prompt's own labels in an answer: the teacher wrote the next turn of the template ("... posted publicly on
# a\n\nQuestion: What is the context of the incident?") or labelled its answer with it ("Context information: The
# context is given by ..."). 3 of the 105 answers kept in a whole-filing demo run (2026-11-30) had one, each
# trained as a finished answer; the `<ANSWER>:` tag of RAFT's chain of thought is not one of them.
_PROMPT_ECHO = re.compile(r"(?<![<\w])(?:question|query|answer|context information)\s*:", re.IGNORECASE)


def prompt_echo(answer: str) -> str | None:
    """The prompt label an answer repeats (`Question:`, `Query:`, `Answer:`, `Context information:`), or None."""
    match = _PROMPT_ECHO.search(answer)
    return match.group(0) if match else None


def is_refusal(answer: str) -> bool:
    """Whether the answer declines: "the context does not say", "not provided in the text", "cannot answer", said
    in its first sentence or in most of its sentences. A hedge inside an answer is no refusal: of
    FinanceBench's 122 correct GPT-4 answers, 5 say "the document does not provide ..." of one part ("In FY2021, the
    document does not provide any information about AMCOR's acquisitions") after answering the rest."""
    sentences = [s for s in SENTENCE_BREAK.split(answer.strip()) if s.strip()]
    declined = [bool(_REFUSAL.search(s)) for s in sentences]
    return bool(declined) and (declined[0] or 2 * sum(declined) > len(declined))


# --- RAFT chain of thought ------------------------------------------------------------------------


def quotes(text: str) -> list[str]:
    """The `##begin_quote##…##end_quote##` spans of a chain-of-thought answer (an unclosed one runs to the end)."""
    return [m.group(1) for m in _QUOTE.finditer(text)]


def bad_quote(text: str, contexts: Sequence[str]) -> str | None:
    """The first quote that is not verbatim in one of the contexts (case, whitespace, curly quotes and the
    quote's outer punctuation normalised), or None when every quote is."""
    normalized = [normalize(c) for c in contexts]
    for quote in quotes(text):
        key = normalize(quote).strip(" \"'.,;:")
        if not key or not any(key in context for context in normalized):
            return quote.strip()
    return None


# --- the verdict on one answer --------------------------------------------------------------------


@dataclass
class Verdict:
    """Whether an answer may be trained on; `reason` (None when ok) is the rejection reason, `detail` says more."""

    ok: bool
    reason: Reason | None = None
    grounding: float = 0.0
    refusal: bool = False
    detail: str | None = None
    # the share of the question's content words in the answer: best-of-N's second key, after grounding
    on_topic: float = 0.0


Measure = Literal["support", "bigram"]
# The grounding score each measure gates on, and its measured default threshold:
# - support (`grounding.support`, the default): a strong teacher's paraphrase, figures and lists. On FinanceBench's
#   human-labelled GPT-4 answers (scripts/bench_gates.py, dev half), 0.35 keeps 99% of the correct answers (97.5%
#   with every gate) and rejects 88% of the same answers shown with another filing's pages; 0.4 keeps 96% and
#   rejects 93%.
# - bigram (`grounding.grounding`): a small teacher that invents around the question's words. Keeps 4 of 5
#   hand-labelled SmolLM2-135M grounded answers and 1 of 17 invented ones at 0.3, 1 of 24 closed-book answers.
MEASURES = {"support": support, "bigram": grounding}
MIN_GROUNDING: dict[str, float] = {"support": 0.35, "bigram": 0.3}


def threshold(measure: Measure, min_grounding: float | None) -> float:
    """The grounding score an answer needs: `min_grounding`, or None for the measure's measured default."""
    return MIN_GROUNDING[measure] if min_grounding is None else min_grounding


def finish_reason_of(completion: Any, max_new_tokens: int) -> str:
    """A completion's `finish_reason` ("stop" or "length"); from backends that do not report one, "length" when
    it used all `max_new_tokens`."""
    reported = getattr(completion, "finish_reason", None)
    if reported:
        return reported
    return "length" if completion.completion_tokens >= max_new_tokens else "stop"


def check_answer(text: str | None, finish_reason: str | None, contexts: Sequence[str], *, oracle_in_context: bool = True,
                 chain_of_thought: bool = False, min_grounding: float | None = None, question: str = "",
                 min_question_overlap: float = 0.0, measure: Measure = "support") -> Verdict:
    """Every gate on one teacher answer; the verdict carries the first failed gate, and the grounding score and
    refusal label of the answer (the final answer in chain-of-thought mode) whatever the outcome.

    A loop is reported before truncation (a longer retry of a loop only loops longer); a refusal is kept only
    where the oracle chunk was not shown (RAFT: then "the context does not say" is the right answer), and then
    is not held to `min_grounding` (None: the measure's measured default, MIN_GROUNDING).
    """
    min_grounding = threshold(measure, min_grounding)
    text = (text or "").strip()
    answer = final_answer(text) if chain_of_thought else text
    score, refusal = MEASURES[measure](answer, contexts, question), is_refusal(answer)
    on_topic = lexical_overlap(question, answer) if question else 0.0
    reason, detail = _first_failure(text, answer, finish_reason, contexts, chain_of_thought)
    if reason is None and refusal and oracle_in_context:
        reason, detail = "refusal_with_oracle", "refused although the oracle chunk was shown"
    elif reason is None and not refusal and score < min_grounding:
        reason, detail = "ungrounded", f"grounding {score:.2f} < min_grounding {min_grounding}"
    elif reason is None and not refusal and on_topic < min_question_overlap:
        reason, detail = "off_topic", (f"{on_topic:.2f} of the question's words in the answer "
                                       f"< min_question_overlap {min_question_overlap}")
    return Verdict(reason is None, reason, score, refusal, detail, on_topic)


def _first_failure(text: str, answer: str, finish_reason: str | None, contexts: Sequence[str],
                   chain_of_thought: bool) -> tuple[Reason | None, str | None]:
    """The first form gate the answer fails, cheapest and most telling first, with its detail."""
    if not text:
        return "empty", None
    loop = repetition(text)
    if loop is not None:
        return "repetition", f"repeated: {loop[:80]!r}"
    if finish_reason == "length":
        return "truncated", "stopped at max_new_tokens"
    if chain_of_thought and ANSWER_TAG not in text:
        return "missing_answer_tag", f"no {ANSWER_TAG} line"
    quote = bad_quote(text, contexts) if chain_of_thought else None
    if quote is not None:
        return "bad_quote", f"not in the contexts: {quote[:80]!r}"
    if not answer:
        return "empty", f"nothing after {ANSWER_TAG}"
    echo = prompt_echo(answer)
    if echo is not None:
        return "prompt_echo", f"repeats the prompt's {echo!r}"
    return None, None


class AnswerGates(BaseModel):
    """What a teacher answer must pass to become a training row (`ragtune.core.gates`): finished (not cut at
    max_new_tokens), grounded in the contexts it was shown, no loop, RAFT quotes verbatim, no refusal when the
    oracle chunk was shown. Every rejected answer goes to data/answers.rejected.jsonl with its reason and text."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # how grounding is measured (ragtune.core.gates.MEASURES): "support", the share of the answer's words and figures
    # (beyond the question's) found in its contexts, for a teacher that paraphrases and computes (with every gate:
    # keeps 97% of FinanceBench's correct GPT-4 answers, rejects 88% of them shown another filing's pages, and both
    # refusals; bigram keeps 44%; scripts/bench_gates.py); "bigram", the share
    # of its content-word pairs, for a small teacher that invents around the question's words (SmolLM2-135M:
    # AUC 0.97 against 0.91 for single words). `ragtune gates FILE --config C` measures both on your teacher
    measure: Literal["support", "bigram"] = "support"
    # the grounding score an answer needs; None: the measure's measured default (support 0.35, bigram 0.3)
    min_grounding: float | None = Field(None, ge=0, le=1)
    # share of the question's content words the answer must contain: an answer about something else is off topic.
    # 0 (off) by default: a strong teacher's "$1.2 billion." shares no word with "What was 2021 revenue?"; an
    # extractive teacher (`teacher_answer: extract`) needs it, its sentence is grounded whatever it chose
    min_question_overlap: float = Field(0.0, ge=0, le=1)
    # a truncated answer is asked again once with this budget (None: twice teacher.max_new_tokens)
    retry_max_new_tokens: int | None = Field(None, ge=1)
    # the judge role decides where the lexical gate is unsure: every candidate that passed the form gates (no
    # loop, finished, no refusal with the oracle shown) and scores at least `judge_min_grounding` is kept or
    # rejected by the judge's faithfulness verdict (an LLM call each; worth it with a strong judge). A judge error
    # is retried; one that persists leaves the lexical verdict, never "unfaithful"
    llm_faithfulness: bool = False
    # below this, an answer is ungrounded whatever the judge says: on FinanceBench's dev half every correct answer
    # scores at least 0.2 (support), and 64% of them shown another filing's pages score less (no judge call)
    judge_min_grounding: float = Field(0.2, ge=0, le=1)


def pick_best(candidates: Sequence[Verdict], texts: Sequence[str | None] | None = None) -> int | None:
    """Best-of-N: the ok candidate the others agree with most (self-consistency: the mean overlap of its content
    words with each other ok candidate's), then the most on topic, then the first; None if none is ok.

    Not the best grounded one: among answers that all pass the gate, the one copying the most words of the
    contexts is not the most correct, and a strong teacher's computed figure scores lower than a copied table. An
    extractive teacher's samples that chose the same sentence agree: its most chosen sentence wins."""
    ok = [i for i, verdict in enumerate(candidates) if verdict.ok]
    words = [set(content_words(t or "")) for t in texts] if texts is not None else None

    def agreement(i: int) -> float:
        if words is None or len(ok) < 2:
            return 0.0
        return sum(len(words[i] & words[j]) / max(len(words[i] | words[j]), 1) for j in ok if j != i) / (len(ok) - 1)

    return max(ok, key=lambda i: (round(agreement(i), 6), candidates[i].on_topic, -i)) if ok else None


def gate_candidates(candidates: Sequence[Any], contexts: Sequence[str], gates: AnswerGates, *, oracle_in_context: bool,
                    chain_of_thought: bool, question: str) -> list[Verdict]:
    """The verdict on each of one question's candidate completions under the `answer_gates` settings (with the gates
    off, every non-empty answer passes and still carries its grounding score)."""
    verdicts = [check_answer(c.text, c.finish_reason, contexts, oracle_in_context=oracle_in_context,
                             chain_of_thought=chain_of_thought, min_grounding=gates.min_grounding, question=question,
                             min_question_overlap=gates.min_question_overlap, measure=gates.measure)
                if c.error is None else Verdict(False, "empty", detail=c.error) for c in candidates]
    if not gates.enabled:
        verdicts = [Verdict(c.error is None and bool((c.text or "").strip()), None, v.grounding, v.refusal,
                            on_topic=v.on_topic)
                    for c, v in zip(candidates, verdicts)]
    return verdicts


# --- questions ------------------------------------------------------------------------------------


# Measured on the 111 questions SmolLM2-135M wrote for uber_2021_part1.pdf (all-minilm-l6-v2 embeddings): the 9
# pairs above 0.85 all ask the same thing ("purpose of the Mobility product" / "… platform", "Specter device" /
# "Specter technology"); of the 17 between 0.80 and 0.85, about 10 are different questions on one topic
# ("COVID-19 and the workplace" / "COVID-19 and the delivery of goods"). Dropping a question costs a row;
# keeping a duplicate only weights its topic twice, so the threshold sits where no measured pair was a false
# positive.
NEAR_DUPLICATE_THRESHOLD = 0.85


def near_duplicate_questions(questions: Sequence[str], embeddings: Any,
                             threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[int | None]:
    """For each question, the index of the earlier kept question it near-duplicates (cosine similarity of the
    embeddings > `threshold`; the most similar one), or None when it is kept."""
    import numpy as np

    if len(questions) != len(embeddings):
        raise ValueError(f"{len(questions)} questions but {len(embeddings)} embeddings")
    if not len(questions):
        return []
    vectors = np.asarray(embeddings, dtype=np.float64)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    duplicate_of: list[int | None] = []
    kept: list[int] = []
    for i, vector in enumerate(vectors):
        similarity = vectors[kept] @ vector if kept else np.empty(0)
        best = int(similarity.argmax()) if len(similarity) else -1
        if best >= 0 and similarity[best] > threshold:
            duplicate_of.append(kept[best])
        else:
            duplicate_of.append(None)
            kept.append(i)
    return duplicate_of
