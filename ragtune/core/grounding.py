"""Words, grounding and the answer format shared by prep's answer gates and eval's grounding metric.

`grounding` is ragtune's non-LLM support score: the share of an answer's content-word pairs found in the contexts
it was written from. prep rejects teacher answers below `data_prep.answer_gates.min_grounding`; eval scores every
model's answers with the same function, so "grounded" means one thing on both sides.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from itertools import pairwise

# Function words and the words every question or answer about a passage has; they carry no fact, so neither
# the answerability check (questions) nor the grounding score (answers) counts them.
STOPWORDS = frozenset("""
a an the and or but if then of to in on at by for with from as into about over under between after before during
is are was were be been being am do does did done has have had having can could will would shall should may might
must what which who whom whose when where why how that this these those there here it its they them their we our
you your he she his her i me my not no yes than so such also any all each both some more most other only own same
very just according context information text passage document question quiz examination based mentioned described
provided
""".split())

ANSWER_TAG = "<ANSWER>:"

# A word, or a number with its decimal/thousands parts ("1.2", "25,000"); a trailing "," or "." is punctuation.
WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)*")

def normalize(text: str) -> str:
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
    return [_stem(w) for w in WORD.findall(normalize(text)) if w not in STOPWORDS]


def lexical_overlap(question: str, context: str) -> float:
    """The share of the question's distinct content words found in the context (0 when it has none)."""
    words = set(content_words(question))
    return len(words & set(content_words(context))) / len(words) if words else 0.0


def grounding(answer: str, contexts: Sequence[str], question: str = "") -> float:
    """The share of the answer's content-word bigrams that occur in one of the contexts; an answer with a single
    content word scores 1 when the word occurs, 0 for one without any. Bigrams the answer shares with `question`
    do not count: restating the question supports nothing (an answer that only restates it scores 0).

    Why the question's pairs are left out: told to copy the context's words, SmolLM2-135M restates the question
    (whose words come from the chunk) around an invented claim. Of the 55 answers the 0.3 gate kept in a demo run
    (2026-11-30), 22 scored 0 once the question's pairs were left out; read one by one, all 22 were such
    restatements ("The purpose of the "U.S. and foreign antitrust and competition laws" is to promote competition
    and protect the consumers"), while the answers still above 0.5 carried facts of the context.

    Bigrams of content words (stopwords out, so "segments: Mobility, Delivery and Freight" still matches
    "segments are Mobility, Delivery, and Freight") because a small teacher invents by restating the question's
    words, which the answerability check guarantees are in the chunk, around made-up claims: single words then
    look grounded, word pairs do not. Measured with scripts/probe_teacher.py on 24 SmolLM2-135M answers (short-
    answer prompt, greedy) to real questions about uber_2021_part1.pdf, oracle + 1 distractor, hand-labelled
    5 grounded / 17 invented / 2 partly: AUC 0.97 for bigrams, 0.91 for single content words, 0.86 for single
    words not in the question. Grounded answers scored 0.28-0.77, invented ones 0-0.26 (and 0.41 for a loop the
    repetition gate rejects); single words need a threshold of 0.6 to keep all grounded answers and then still
    pass 7 of the 17 invented ones. The same teacher's closed-book answers (invented by construction) scored
    against the same contexts pass 0.3 in 1 of 24 cases. A number is one token ("30.0", "25,000"), so a wrong
    number breaks both pairs it is in.
    """
    words = content_words(answer)
    vocabulary = [content_words(context) for context in contexts]
    if len(words) < 2:
        return float(bool(words) and any(words[0] in context for context in vocabulary))
    found = {pair for context in vocabulary for pair in pairwise(context)}
    asked = set(pairwise(content_words(question)))
    pairs = [pair for pair in pairwise(words) if pair not in asked]
    return sum(pair in found for pair in pairs) / len(pairs) if pairs else 0.0


def final_answer(text: str) -> str:
    """What the user is given: the text after the last `<ANSWER>:` ("" when nothing follows it), or the whole
    text when it has no tag."""
    _, tag, tail = text.rpartition(ANSWER_TAG)
    return tail.strip() if tag else text.strip()


SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(])")


def first_sentences(text: str, n: int) -> str | None:
    """The first `n` sentences of `text` once the (n+1)th has begun, else None. A boundary is ., ! or ?
    (closing quotes or brackets allowed) followed by whitespace and a capital, a digit or an opening quote:
    "$1.5 billion" and "e.g. the" are not boundaries."""
    ends = [m.start() + len(m.group().rstrip()) for m in SENTENCE_END.finditer(text)]
    return text[: ends[n - 1]].strip() if len(ends) >= n else None


# --- degenerate text ------------------------------------------------------------------------------


def repetition(answer: str, n: int = 4, max_count: int = 3) -> str | None:
    """The first degenerate loop in the answer, or None: a word `n`-gram occurring `max_count` or more times, or
    a sentence (of 4+ words) repeated. Greedy decoding of a small model falls into such loops: 13 of SmolLM2-135M's
    24 answers in 96 tokens and 21 of 24 in 200 tokens (scripts/probe_teacher.py), each one a phrase said a
    third time ("was discovered by a data breach that was discovered by a …"). Also usable as a backend's
    `stop_when`, so a loop stops generating where it is detected."""
    words = WORD.findall(normalize(answer))
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= max_count:
            return " ".join(gram)
    seen: set[str] = set()
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer):
        key = " ".join(WORD.findall(normalize(sentence)))
        if len(key.split()) >= 4 and key in seen:
            return sentence.strip()
        seen.add(key)
    return None
