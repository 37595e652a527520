"""Quality gates for teacher answers and generated questions: what a student must never be taught.

Every check is pure text (or a given embedding matrix) and takes microseconds, so prep can run all of them on
every candidate answer. `check_answer` is the one call per answer; it returns a `Verdict` whose `reason` is the
rejection reason written to data/answers.rejected.jsonl (or None for a kept answer), and `pick_best` chooses
among best-of-N candidates. Thresholds were measured with scripts/probe_teacher.py (SmolLM2-135M-Instruct as
teacher on Uber's 2021 10-K, 2-core CPU); the numbers are beside each default.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, Sequence

# Function words and the words every question or answer about a passage has; they carry no fact, so neither
# the answerability check (questions) nor the grounding score (answers) counts them.
STOPWORDS = frozenset("""
a an the and or but if then of to in on at by for with from as into about over under between after before during
is are was were be been being am do does did done has have had having can could will would shall should may might
must what which who whom whose when where why how that this these those there here it its they them their we our
you your he she his her i me my not no yes than so such also any all each both some more most other only own same
very just according context text passage document question quiz examination based mentioned described provided
""".split())

ANSWER_TAG = "<ANSWER>:"
BEGIN_QUOTE, END_QUOTE = "##begin_quote##", "##end_quote##"

Reason = Literal["truncated", "ungrounded", "bad_quote", "missing_answer_tag", "repetition", "refusal_with_oracle",
                 "empty", "unfaithful"]

# A word, or a number with its decimal/thousands parts ("1.2", "25,000"); a trailing "," or "." is punctuation.
_TOKEN = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*")
_QUOTE = re.compile(re.escape(BEGIN_QUOTE) + r"(.*?)(?:" + re.escape(END_QUOTE) + r"|$)", re.DOTALL)


# --- words ----------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    """NFKC, lower case, straight quotes and dashes, one space between words: PDF text vs model output."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.translate(str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                                         "\u2013": "-", "\u2014": "-"}))
    return " ".join(text.split())


def _stem(word: str) -> str:
    """Plural "s" off words ("segments" → "segment"); numbers are kept exactly."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word[0].isdigit() else word


def content_words(text: str) -> list[str]:
    """The text's content words in order: lower-cased tokens without STOPWORDS, plural "s" removed, numbers
    exact ("25,000" stays "25,000": a number matches only the same number)."""
    return [_stem(w) for w in _TOKEN.findall(_normalize(text)) if w not in STOPWORDS]


def lexical_overlap(question: str, context: str) -> float:
    """The share of the question's distinct content words found in the context (0 when it has none)."""
    words = set(content_words(question))
    return len(words & set(content_words(context))) / len(words) if words else 0.0


# --- grounding ------------------------------------------------------------------------------------


def grounding(answer: str, contexts: Sequence[str]) -> float:
    """The share of the answer's content-word bigrams that occur in one of the contexts; an answer with a single
    content word scores 1 when the word occurs, 0 for one without any.

    Bigrams of content words (stopwords out, so "segments: Mobility, Delivery and Freight" still matches
    "segments are Mobility, Delivery, and Freight") because a 135M teacher invents by restating the question's
    words, which the answerability check guarantees are in the chunk, around made-up claims: single words
    then look grounded, word pairs do not. Measured on 24 SmolLM2-135M answers to real questions about
    uber_2021_part1.pdf (oracle + 1 distractor, hand-labelled 5 grounded / 17 invented): AUC 0.97 for bigrams,
    0.91 for single content words, 0.86 for single words not in the question; grounded answers scored
    0.28-0.77, invented ones 0-0.26 (one looping answer 0.41, rejected as a loop). A number is one token
    ("30.0", "25,000"), so a wrong number breaks both pairs it is in.
    """
    words = content_words(answer)
    vocabulary = [content_words(context) for context in contexts]
    if len(words) < 2:
        return float(bool(words) and any(words[0] in context for context in vocabulary))
    found = {pair for context in vocabulary for pair in zip(context, context[1:])}
    pairs = list(zip(words, words[1:]))
    return sum(pair in found for pair in pairs) / len(pairs)


# --- degenerate text ------------------------------------------------------------------------------


def repetition(answer: str, n: int = 4, max_count: int = 3) -> str | None:
    """The first degenerate loop in the answer, or None: a word `n`-gram occurring `max_count` or more times, or
    a sentence (of 4+ words) repeated. Greedy decoding of a small model falls into such loops."""
    words = _TOKEN.findall(_normalize(answer))
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= max_count:
            return " ".join(gram)
    seen: set[str] = set()
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer):
        key = " ".join(_TOKEN.findall(_normalize(sentence)))
        if len(key.split()) >= 4 and key in seen:
            return sentence.strip()
        seen.add(key)
    return None


_REFUSAL = re.compile("|".join([
    r"\b(?:context|text|passage|document|information|excerpt)s?\b[^.]{0,40}?\b(?:does not|doesn't|do not|don't|did not)\s+"
    r"(?:say|mention|provide|specify|state|contain|include|give|discuss|address|indicate|tell)",
    r"\bnot\s+(?:explicitly\s+)?(?:provided|mentioned|specified|stated|given|included|available|found|addressed|"
    r"discussed)\s+in\s+the\s+(?:given\s+|provided\s+)?(?:context|text|passage|document|information|excerpt)",
    r"\b(?:cannot|can't|can not|unable to|not able to)\s+(?:answer|determine|be answered|be determined|find|tell)",
    r"\bno\s+(?:information|mention|details?|data)\s+(?:about|on|regarding|is|was|in|of)\b",
    r"\bthere is no (?:information|mention)\b",
    r"\bi (?:do not|don't) know\b",
    r"\b(?:insufficient|not enough) (?:information|context)\b",
]), re.IGNORECASE)


def is_refusal(answer: str) -> bool:
    """Whether the answer declines: "the context does not say", "not provided in the text", "cannot answer"."""
    return bool(_REFUSAL.search(answer))


# --- RAFT chain of thought ------------------------------------------------------------------------


def final_answer(text: str) -> str:
    """What the user is given: the text after the last `<ANSWER>:` ("" when nothing follows it), or the whole
    text when it has no tag."""
    head, tag, tail = text.rpartition(ANSWER_TAG)
    return tail.strip() if tag else text.strip()


def quotes(text: str) -> list[str]:
    """The `##begin_quote##…##end_quote##` spans of a chain-of-thought answer (an unclosed one runs to the end)."""
    return [m.group(1) for m in _QUOTE.finditer(text)]


def bad_quote(text: str, contexts: Sequence[str]) -> str | None:
    """The first quote that is not verbatim in one of the contexts (case, whitespace, curly quotes and the
    quote's outer punctuation normalised), or None when every quote is."""
    normalized = [_normalize(c) for c in contexts]
    for quote in quotes(text):
        key = _normalize(quote).strip(" \"'.,;:")
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


MIN_GROUNDING = 0.3  # TODO(measurement)


def finish_reason(completion: Any, max_new_tokens: int) -> str:
    """A completion's `finish_reason` ("stop" or "length"); from backends that do not report one, "length" when
    it used all `max_new_tokens`."""
    reported = getattr(completion, "finish_reason", None)
    if reported:
        return reported
    return "length" if completion.completion_tokens >= max_new_tokens else "stop"


def check_answer(text: str | None, finish_reason: str | None, contexts: Sequence[str], *, oracle_in_context: bool = True,
                 chain_of_thought: bool = False, min_grounding: float = MIN_GROUNDING) -> Verdict:
    """Every gate on one teacher answer, cheapest and most telling first.

    A loop is reported before truncation (a longer retry of a loop only loops longer); a refusal is kept only
    where the oracle chunk was not shown (RAFT: then "the context does not say" is the right answer), and is
    not scored for grounding.
    """
    text = (text or "").strip()
    if not text:
        return Verdict(False, "empty")
    loop = repetition(text)
    if loop is not None:
        return Verdict(False, "repetition", detail=f"repeated: {loop[:80]!r}")
    if finish_reason == "length":
        return Verdict(False, "truncated", detail="stopped at max_new_tokens")
    if chain_of_thought:
        if ANSWER_TAG not in text:
            return Verdict(False, "missing_answer_tag", detail=f"no {ANSWER_TAG} line")
        quote = bad_quote(text, contexts)
        if quote is not None:
            return Verdict(False, "bad_quote", detail=f"not in the contexts: {quote[:80]!r}")
    answer = final_answer(text) if chain_of_thought else text
    if not answer:
        return Verdict(False, "empty", detail=f"nothing after {ANSWER_TAG}")
    score = grounding(answer, contexts)
    if is_refusal(answer):
        if oracle_in_context:
            return Verdict(False, "refusal_with_oracle", score, True, "refused although the oracle chunk was shown")
        return Verdict(True, None, score, True)
    if score < min_grounding:
        return Verdict(False, "ungrounded", score, detail=f"grounding {score:.2f} < min_grounding {min_grounding}")
    return Verdict(True, None, score)


def pick_best(candidates: Sequence[Verdict]) -> int | None:
    """Best-of-N: the index of the ok candidate with the highest grounding (the first on a tie), None if none is ok."""
    ok = [i for i, verdict in enumerate(candidates) if verdict.ok]
    return max(ok, key=lambda i: (candidates[i].grounding, -i)) if ok else None


# --- questions ------------------------------------------------------------------------------------


NEAR_DUPLICATE_THRESHOLD = 0.9  # TODO(measurement)


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
