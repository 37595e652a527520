"""Words, grounding and the answer format shared by prep's answer gates and eval's grounding metric.

`grounding` is ragtune's non-LLM support score: the share of an answer's content-word pairs found in the contexts
it was written from. prep rejects teacher answers below `data_prep.answer_gates.min_grounding`; eval scores every
model's answers with the same function, so "grounded" means one thing on both sides.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
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


# A figure as written: "1,577", "(1,577)", "$8.7", "13.1%"; a trailing "," or "." is punctuation.
NUMBER = re.compile(r"(?<![\w.,])\d+(?:,\d{3})*(?:\.\d+)?")
# A figure in an answer counts as this many words in `support`: it is the claim a wrong filing gets wrong. On the
# FinanceBench dev file (scripts/bench_gates.py) the correct answers with their own pages against the same answers
# with another filing's pages: AUROC 0.961 at weight 1, 0.980 at 2, 0.986 at 3, 0.988 at 5.
NUMBER_WEIGHT = 3
# the scale of a figure: a teacher that writes "$17.5 billion" for "17,455 (in millions)" claims the figure, not a word
UNITS = frozenset("thousand million billion trillion percent percentage usd dollar".split())


# the day of a date ("December 31, 2021", "31 December"): a label like the year, not a figure of the contexts
_DAY = re.compile(r"\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+\d{1,2}\b|"
                  r"\b\d{1,2}\s+(?=(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\b)")


def figures(text: str) -> list[str]:
    """The figures of a text as significant digits (`_digits`), without dates' days, years, small counts and
    figures of one significant digit."""
    digits = [_digits(n) for n in NUMBER.findall(_DAY.sub(" ", normalize(text))) if not _is_label(n)]
    return [d for d in digits if len(d) >= 2]  # "2,000", "5%": one digit is in any table, it tells nothing


def _digits(number: str) -> str:
    """A figure's significant digits, scale and separators dropped: "1,469,502,000", "1,469,502" (in thousands)
    and "1.469502" are one figure to a strong teacher that converts units."""
    return number.replace(",", "").replace(".", "").strip("0")


def _is_label(number: str) -> bool:
    """Years and small counts ("2021", "3 segments", list item "2."): they name no figure of the contexts
    ("2,018" million is one)."""
    plain = number.replace(",", "")
    return plain.isdigit() and (int(plain) <= 12 or (number == plain and len(plain) == 4 and 1900 <= int(plain) <= 2100))


def _figure_found(digits: str, known: frozenset[str]) -> bool:
    """Whether a figure occurs in the contexts, exactly or rounded from one: "$17.5 billion" from "17,455" (millions)."""
    if digits in known:
        return True
    if len(digits) < 3:  # two significant digits ("16%", "$8.7") match only themselves: a table holds many
        return False
    width = len(digits)
    return any(len(k) > width and str((int(k[: width + 1]) + 5) // 10) == digits for k in known)


@lru_cache(maxsize=64)
def _context_index(contexts: tuple[str, ...]) -> tuple[frozenset[str], str, frozenset[str]]:
    """What `support` looks answers up in: the contexts' content words, their text without spaces and punctuation,
    and their figures. Most of its cost, and the same for every best-of-N candidate of a question: made once."""
    vocabulary = frozenset(w for context in contexts for w in content_words(context))
    squashed = " ".join(re.sub(r"[^a-z0-9]", "", normalize(context)) for context in contexts)
    known = frozenset(_digits(n) for context in contexts for n in NUMBER.findall(normalize(context)))
    return vocabulary, squashed, known


def support(answer: str, contexts: Sequence[str], question: str = "") -> float:
    """The share of the answer's claims found in the contexts: its content words and figures that are not the
    question's, a figure weighing NUMBER_WEIGHT words. A strong teacher's answer scores high when it paraphrases,
    converts units or lists, and low when shown another filing's pages.

    Why not `grounding` (bigrams): a 70B teacher's correct answers paraphrase ("purchases of PP&E were $1,577
    million") and compute; on FinanceBench's human-labelled GPT-4 answers bigrams kept 40 of 122 correct ones at
    0.3. Single words alone cannot tell a filing from another one of its kind (the same financial vocabulary: AUROC
    0.85); its figures can (0.97 with them). A word is found as a content word of a context, or (5+ letters) inside
    a context's text with spaces and punctuation removed, as PDF extraction writes "CONSOLIDATEDBALANCESHEETS".
    Restating the question supports nothing: an answer whose claims are all the question's scores 0.
    """
    asked = set(content_words(question))
    asked_figures = set(figures(question))
    vocabulary, squashed, known = _context_index(tuple(contexts))
    claimed_words = [w for w in content_words(answer) if w not in asked and w not in UNITS and not w[0].isdigit()]
    claimed_figures = [d for d in figures(answer) if d not in asked_figures]
    found = sum(w in vocabulary or (len(w) >= 5 and w in squashed) for w in claimed_words)
    found += NUMBER_WEIGHT * sum(_figure_found(d, known) for d in claimed_figures)
    total = len(claimed_words) + NUMBER_WEIGHT * len(claimed_figures)
    return found / total if total else 0.0


def final_answer(text: str) -> str:
    """What the user is given: the text after the last `<ANSWER>:` ("" when nothing follows it), or the whole
    text when it has no tag."""
    _, tag, tail = text.rpartition(ANSWER_TAG)
    return tail.strip() if tag else text.strip()


# where one sentence or line of an answer ends and the next begins (repetition, refusals)
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(])")


def first_sentences(text: str, n: int) -> str | None:
    """The first `n` sentences of `text` once the (n+1)th has begun, else None. A boundary is ., ! or ?
    (closing quotes or brackets allowed) followed by whitespace and a capital, a digit or an opening quote:
    "$1.5 billion" and "e.g. the" are not boundaries."""
    ends = [m.start() + len(m.group().rstrip()) for m in SENTENCE_END.finditer(text)]
    return text[: ends[n - 1]].strip() if len(ends) >= n else None


# --- degenerate text ------------------------------------------------------------------------------

# the longest block `repetition` looks for: a loop of a whole sentence or two (SmolLM2's were 3-12 words)
MAX_LOOP_WORDS = 40


def repetition(answer: str) -> str | None:
    """The first degenerate loop in the answer, or None: a block of words said again right after itself (three
    times, or twice for a block of 8+ words; a single word six times), or a sentence (of 4+ words) said three times
    (a formula written once and again for its figures is no loop: 3 of FinanceBench's correct answers).

    Greedy decoding of a small model falls into such loops: 13 of SmolLM2-135M's 24 answers in 96 tokens and 21 of
    24 in 200 tokens (scripts/probe_teacher.py), each a phrase said again and again ("was discovered by a data
    breach that was discovered by a data breach that ..."). A careful answer names a term three times without
    looping ("property, plant and equipment" in a PP&E calculation, "registered on the New York Stock Exchange" in
    each item of a list): the old rule, any 4-word phrase seen three times, rejected 33 of FinanceBench's 122
    correct GPT-4 answers. Only back-to-back copies are a loop. Also usable as a backend's `stop_when`, so a loop
    stops generating where it is detected."""
    words = WORD.findall(normalize(answer))
    for period in range(1, min(len(words) // 2, MAX_LOOP_WORDS) + 1):
        copies_needed = 2 if period >= 8 else max(3, -(-6 // period))
        run = 0  # words equal to the word `period` before them, in a row
        for j in range(period, len(words)):
            run = run + 1 if words[j] == words[j - period] else 0
            if run >= (copies_needed - 1) * period:
                start = j - run + 1 - period
                return " ".join(words[start : start + period])
    seen: dict[str, int] = {}
    for sentence in SENTENCE_BREAK.split(answer):
        key = " ".join(WORD.findall(normalize(sentence)))
        seen[key] = seen.get(key, 0) + 1
        if len(key.split()) >= 4 and seen[key] >= 3:
            return sentence.strip()
    return None
