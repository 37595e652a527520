"""Words, grounding and the answer format shared by prep's answer gates and eval's grounding metric.

`grounding` is ragtune's non-LLM support score: the share of an answer's content words found in the contexts
it was written from. prep rejects teacher answers below `data_prep.answer_gates.min_grounding`; eval scores every
model's answers with the same function, so "grounded" means one thing on both sides.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

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


def grounding(answer: str, contexts: Sequence[str]) -> float:
    """The share of the answer's content words that occur in the contexts (0 for an answer without any).

    Why content-word unigrams: TODO(measurement).
    """
    words = content_words(answer)
    if not words:
        return 0.0
    vocabulary = {w for context in contexts for w in content_words(context)}
    return sum(w in vocabulary for w in words) / len(words)


def final_answer(text: str) -> str:
    """What the user is given: the text after the last `<ANSWER>:` ("" when nothing follows it), or the whole
    text when it has no tag."""
    head, tag, tail = text.rpartition(ANSWER_TAG)
    return tail.strip() if tag else text.strip()
