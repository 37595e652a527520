"""The teacher, once: how it is asked (its view of the RAG messages, sentence cap, extractive mode), its best-of-N
candidates, the answer gates' verdict on each and the one `pick_best` keeps, and the fingerprint of what changes a
teacher answer. Prep turns the pick into a training row; eval into its reference answer, so a reference is what the
student was taught, never the teacher's raw greedy text.

The keys that shape the teacher's answers live in the `data_prep:` section of a config (users write them there);
they are declared here once (`TeacherStyle`, which `DataPrepConfig` extends) because eval's references need them too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragtune.core.gates import AnswerGates, Verdict, gate_candidates, pick_best
from ragtune.core.grounding import first_sentences, repetition
from ragtune.core.llm import Completion

if TYPE_CHECKING:
    from ragtune.core.roles import TeacherRole

CHAIN_OF_THOUGHT_INSTRUCTION = (
    "\n\nFirst reason step by step, quoting the sentences of the context you rely on between "
    "##begin_quote## and ##end_quote##. Then give the final answer on a last line starting with <ANSWER>:"
)


class RaftConfig(BaseModel):
    """RAFT (Zhang et al. 2024): with probability `oracle_probability` the question's source chunk is among the
    `num_contexts` contexts, otherwise only distractors; distractors are retrieved non-oracle chunks, topped up at
    random. `num_contexts` defaults to `similarity_top_k`, so a training row shows as many contexts as eval does."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    oracle_probability: float = Field(0.8, ge=0, le=1)
    num_contexts: int | None = Field(None, ge=1)
    chain_of_thought: bool = False
    chain_of_thought_instruction: str = CHAIN_OF_THOUGHT_INSTRUCTION


class TeacherStyle(BaseModel):
    """The keys that shape how the teacher answers (sent to the teacher only, never saved in a row); the
    `data_prep:` section extends this."""

    model_config = ConfigDict(extra="forbid")
    # appended to the teacher's user message only (not to the saved row): how the teacher should answer, e.g.
    # "Answer in one or two sentences, using the context's own words." The student learns the behaviour without it.
    teacher_instruction: str | None = None
    # end each teacher answer after this many sentences (a stop sequence at the sentence boundary: generation
    # stops, the answer keeps its complete sentences; None: the teacher's own end). For a small teacher that runs
    # on until max_new_tokens or loops; a sentence boundary is a period, ! or ? followed by a capitalised word
    teacher_max_sentences: int | None = Field(None, ge=1)
    # "generate": the teacher writes its answer. "extract": it chooses one complete sentence of the contexts it is
    # shown, verbatim, by decoding under a JSON schema that allows only those sentences (vLLM structured outputs;
    # xgrammar on hf): a RAFT-style quote as the whole answer, for a teacher too small to write grounded answers.
    # On the demo's first 16 questions SmolLM2-135M's extracted answers were all grounded (its generated ones: 7
    # of 16 kept at best-of-6); with a strong teacher, generate.
    teacher_answer: Literal["generate", "extract"] = "generate"
    raft: RaftConfig = RaftConfig()
    answer_gates: AnswerGates = AnswerGates()

    @property
    def chain_of_thought(self) -> bool:
        """Whether the teacher reasons before its `<ANSWER>:` (RAFT's chain of thought)."""
        return self.raft.enabled and self.raft.chain_of_thought


def teacher_fingerprint(role: "TeacherRole", style: TeacherStyle, best_of_n: bool = True) -> dict[str, Any]:
    """Everything that changes a teacher answer (its model, token budget, instruction, sentence cap and mode, and with
    `best_of_n` the sampling and the gates that pick the kept candidate), for prep's answers step and eval's
    references alike: one list, so the two cannot drift apart. `best_of_n=False`: a single greedy answer (eval's
    closed-book teacher), which neither sampling nor the gates change."""
    settings: dict[str, Any] = {"model": role.model, "max_new_tokens": role.max_new_tokens,
                                "extra": teacher_extra(style), "max_sentences": style.teacher_max_sentences,
                                "answer": style.teacher_answer, "chain_of_thought": style.chain_of_thought}
    if best_of_n:
        settings.update(temperature=role.temperature, num_candidates=role.num_candidates,
                        candidate_temperature=role.candidate_temperature,
                        answer_gates=style.answer_gates.model_dump())
    return settings


@dataclass
class BestOfN:
    """One question's candidates and the answer gates' verdict on each (a judge may revise a verdict before `best`)."""

    candidates: list[Any]
    verdicts: list[Verdict]

    @property
    def best(self) -> int | None:
        """The candidate `pick_best` keeps, or None when none passed."""
        return pick_best(self.verdicts, [c.text for c in self.candidates])


def best_of_n(backend: Any, messages: list[list[dict[str, str]]], style: TeacherStyle, role: "TeacherRole", *,
              questions: list[str], contexts: list[list[str]], oracle_in: list[bool],
              top_logprobs: int | None = None) -> list[BestOfN]:
    """Per RAG conversation (the messages a row saves and eval sends): the teacher's candidates on its view
    (`teacher_view`, `teacher_candidates`) and the answer gates' verdict on each."""
    views = [teacher_view(m, style) for m in messages]
    per_view = teacher_candidates(backend, views, style, role, top_logprobs=top_logprobs, contexts=contexts)
    return [BestOfN(candidates, gate_candidates(candidates, ctx, style.answer_gates, oracle_in_context=oracle,
                                                chain_of_thought=style.chain_of_thought, question=question))
            for candidates, ctx, oracle, question in zip(per_view, contexts, oracle_in, questions)]


# --- the teacher's view: what prep's teacher was told, so eval's references come from the same teacher ------------


def teacher_extra(style: TeacherStyle) -> str:
    """What is appended to the teacher's last message: `teacher_instruction` and, in RAFT CoT mode, the
    chain-of-thought instruction."""
    return (style.teacher_instruction or "") + (style.raft.chain_of_thought_instruction
                                                if style.chain_of_thought else "")


def teacher_view(messages: list[dict[str, str]], style: TeacherStyle) -> list[dict[str, str]]:
    """What the teacher is sent: the training messages plus `teacher_extra`. The saved row keeps the plain
    messages, the ones eval sends: the student learns the instructed behaviour without the instruction (context
    distillation)."""
    extra = teacher_extra(style)
    if not extra:
        return messages
    return messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + extra}]


def teacher_stop_when(style: TeacherStyle, loops: bool = False) -> Callable[[str], bool] | None:
    """Where the teacher stops early: at a loop when `loops` (the answer gates reject it anyway; not at
    max_new_tokens as "truncated"), and after `teacher_max_sentences` complete sentences."""
    cap = style.teacher_max_sentences
    if not loops and cap is None:
        return None
    return lambda text: (loops and repetition(text) is not None) or (cap is not None and
                                                                     first_sentences(text, cap) is not None)


def cut_sentences(completion: Any, style: TeacherStyle) -> Any:
    """A completion stopped after `teacher_max_sentences` keeps those sentences, not the next one's first word."""
    cap = style.teacher_max_sentences
    if cap is None or completion.text is None or completion.finish_reason != "stop":
        return completion
    head = first_sentences(completion.text, cap)
    return completion if head is None else replace(completion, text=head)


def ask_teacher(backend: Any, views: list[list[dict[str, str]]], style: TeacherStyle, *, loops: bool = False,
                **chat_kwargs: Any) -> list[Any]:
    """`backend.chat` on teacher views, stopped (`teacher_stop_when`) and cut (`cut_sentences`) as prep's teacher is:
    one call for prep's answers and eval's references."""
    completions = backend.chat(views, stop_when=teacher_stop_when(style, loops), **chat_kwargs)
    return [cut_sentences(c, style) for c in completions]


def teacher_candidates(backend: Any, views: list[list[dict[str, str]]], style: TeacherStyle, role: "TeacherRole",
                       top_logprobs: int | None = None, contexts: list[list[str]] | None = None) -> list[list[Any]]:
    """Per view, the teacher's best-of-N candidates as prep draws them: the answer at `role.temperature`, then
    `role.num_candidates - 1` samples at `role.candidate_temperature` (sent after the greedy batch: on vLLM their
    prompts are prefix-cache hits), and, with the answer gates on, a longer second try of the first answer when
    every candidate was cut at max_new_tokens. Prep gates them into training rows; eval into its references.
    `top_logprobs=k` (soft-label distillation) asks every call for the teacher's top-k log-probs per token.
    With `teacher_answer: extract`, each candidate is one sentence of the view's `contexts` (`extract_answers`)."""
    gates = style.answer_gates
    logprobs = {"top_logprobs": top_logprobs} if top_logprobs else {}
    if style.teacher_answer == "extract" and contexts is None:
        raise ValueError("teacher_answer: extract needs the contexts of every view")

    def ask(temperature: float, repeat: int = 1) -> list[Any]:
        """Every view `repeat` times in a row, answered as `teacher_answer` says."""
        asked = [v for v in views for _ in range(repeat)]
        if style.teacher_answer == "extract":
            return extract_answers(backend, asked, [c for c in contexts for _ in range(repeat)], role.max_new_tokens,
                                   temperature=temperature)
        return ask_teacher(backend, asked, style, loops=gates.enabled, temperature=temperature, **logprobs)

    per_view = [[answer] for answer in ask(role.temperature)]
    extra = role.num_candidates - 1
    if extra > 0:
        samples = ask(role.candidate_temperature, repeat=extra)
        for k, candidates in enumerate(per_view):
            candidates.extend(samples[k * extra : (k + 1) * extra])
    retry = [k for k, cands in enumerate(per_view) if gates.enabled and style.teacher_answer == "generate"
             and all(c.finish_reason == "length" for c in cands)]
    if retry:
        again = ask_teacher(backend, [views[k] for k in retry], style, loops=gates.enabled, temperature=role.temperature,
                            max_new_tokens=gates.retry_max_new_tokens or 2 * role.max_new_tokens, **logprobs)
        for k, answer in zip(retry, again):
            per_view[k][0] = answer
    return per_view


# --- the extractive teacher: one sentence of the contexts, chosen by the model ---------------------------------------

# A sentence worth answering with has this many words at least: shorter pieces of a filing are headings and table
# cells ("Item 1A.", "2022 $ 280 $ 140"), which the probe on the demo's questions saw chosen when they were allowed.
MIN_SENTENCE_WORDS = 4
# A complete sentence starts with a capital letter (an opening quote allowed) and ends with ., ! or ? (closing quotes
# or brackets allowed): a chunk's first and last pieces, cut mid-sentence by the splitter, are not answers. Not a
# digit: in a demo run the teacher chose "000 units of such currency and ..." (a chunk cut inside "100,000").
COMPLETE_SENTENCE = re.compile(r"""^["'“‘(]?[A-Z].*[.!?]["'”’)]?$""", re.DOTALL)
# List markers before an item ("• ", "(e) ", "(ii) ", "(1) ", "(e) (d) "): the item itself may be a complete sentence.
# In a demo run 14 of the 28 pieces of the 8 eval contexts that offered no sentence were such items, as were most
# sentences of the credit agreement's sections.
LIST_MARKER = re.compile(r"^(?:(?:[•●▪◦*–-]|\((?:[a-z]{1,2}|[ivx]{1,5}|\d{1,2})\))\s+)+")
# Words a title keeps in lower case (articles, conjunctions, short prepositions): a line whose other words are all
# capitalised is a heading, a name or a clause in capitals, not a sentence.
TITLE_CASE_SMALL_WORDS = frozenset(
    "a an and as at but by for from in into nor of off on onto or over per the to up upon via vs with yet".split())


@lru_cache(maxsize=1)
def _sentence_tokenizer() -> Callable[[str], list[str]]:
    from llama_index.core.node_parser.text.utils import split_by_sentence_tokenizer

    return split_by_sentence_tokenizer()


def context_sentences(contexts: list[str], max_chars: int) -> list[str]:
    """The complete sentences of the contexts (LlamaIndex's sentence tokenizer, NLTK punkt, per paragraph), in
    order, whitespace collapsed, without repeats: the answers an extractive teacher may choose from. Sentences
    longer than `max_chars` are left out (they would not fit the answer's token budget)."""
    split = _sentence_tokenizer()
    found: list[str] = []
    for context in contexts:
        for paragraph in re.split(r"\n\s*\n", context):
            for sentence in _joined(split(paragraph)):
                sentence = LIST_MARKER.sub("", sentence)
                if (len(sentence.split()) >= MIN_SENTENCE_WORDS and len(sentence) <= max_chars
                        and _mostly_words(sentence) and _prose(sentence)
                        and COMPLETE_SENTENCE.match(sentence) and sentence not in found):
                    found.append(sentence)
    return found


def _prose(sentence: str) -> bool:
    """Whether a word other than TITLE_CASE_SMALL_WORDS starts in lower case. Filings end headings, names and
    capitalised clauses with a period too ("Section 2.17 Defaulting Lenders.", "Morgan Stanley Senior Funding, Inc.",
    "INCLUDING FEDERAL AND STATE SECURITIES LAWS."): 4 of 108 training answers of a demo run were such lines, which
    answer no question. 135 of the 3,469 candidate sentences of Uber's 10-K chunks are."""
    words = (word.strip("\"'“”‘’()[],;:.!?") for word in sentence.split())
    return any(word[:1].islower() and word not in TITLE_CASE_SMALL_WORDS for word in words)


def _mostly_words(sentence: str) -> bool:
    """Whether most of its tokens hold a letter: a table row with a period at its end is not a sentence ("Effective
    income tax rate (0.5)% 2.8 % 48." was a training answer in a demo run); prose with figures keeps its words."""
    tokens = sentence.split()
    return sum(any(c.isalpha() for c in token) for token in tokens) > len(tokens) / 2


def _joined(pieces: list[str]) -> list[str]:
    """The tokenizer's pieces, whitespace collapsed, each piece that starts in lower case joined to the one before:
    punkt ends a sentence at some abbreviations ("… commercial paper, U.S." | "government and agency securities …"
    in a demo reference), and a sentence never starts in lower case. A paragraph's first piece stays apart (a
    chunk cut mid-sentence)."""
    joined: list[str] = []
    for piece in (" ".join(p.split()) for p in pieces):
        if joined and piece[:1].islower():
            joined[-1] += " " + piece
        elif piece:
            joined.append(piece)
    return joined


def sentence_schema(sentences: list[str]) -> dict[str, Any]:
    """A JSON schema whose only valid answers are `{"answer": <one of the sentences>}`: vLLM's structured outputs
    (and xgrammar on the hf backend) make the model choose one, verbatim, by decoding under the constraint."""
    return {"title": "sentence", "type": "object", "properties": {"answer": {"type": "string", "enum": sentences}},
            "required": ["answer"], "additionalProperties": False}


# The tokens an extractive choice is decoded with first. Once they start one sentence only, the schema forces the rest
# token by token (probability 1, greedy or sampled), so the choice is made: of the demo's 87 kept answers (mean 41
# tokens as JSON) every one was told apart within 12 tokens of its JSON string, 95 % within 8; 4 more are the
# `{"answer": "` the schema writes first. A choice still open after these is decoded again in full.
CHOICE_TOKENS = 16


def extract_answers(backend: Any, views: list[list[dict[str, str]]], contexts: list[list[str]], max_new_tokens: int,
                    temperature: float) -> list[Any]:
    """Per view, the teacher's choice of one complete sentence of its contexts, as a Completion whose text is the
    sentence (empty where the contexts hold none: the answer gates reject it as "empty").

    Why: a 135M teacher writing freely invents (88 of 160 demo answers failed the grounding gate at best-of-6),
    while choosing among the contexts' sentences it is grounded by construction and is left only the choice, which
    the answer gates still check (on topic, not a restatement of the question). Sentences are kept up to 3
    characters per token of `max_new_tokens` (SmolLM2's tokenizer averages 4.75 characters per token on a 10-K,
    2.7 on its densest 5 %). The call's budget is a token per character of the longest as JSON writes it (curly
    quotes as \\u201c): a token is at least one character of ASCII, so a chosen sentence is never cut, and the
    grammar ends the answer with the sentence whatever the budget. Half a token per character cut 2 of 160.
    The choice is read off its first CHOICE_TOKENS tokens (`chosen_sentence`): the rest would be forced."""
    options = [context_sentences(c, 3 * max_new_tokens) for c in contexts]
    asked = [k for k, sentences in enumerate(options) if sentences]
    answers: list[Any] = [Completion("", None, 0, 0, "stop") for _ in views]
    budget = max([len(json.dumps(s)) for k in asked for s in options[k]], default=0) + len('{"answer":}')
    for tokens in sorted({min(budget, CHOICE_TOKENS), budget}):
        if not asked:
            break
        chosen = backend.chat([views[k] for k in asked], json_schema=[sentence_schema(options[k]) for k in asked],
                              max_new_tokens=tokens, temperature=temperature)
        undecided = []
        for k, completion in zip(asked, chosen):
            sentence = chosen_sentence(completion.text or completion.cut_json, options[k])
            if sentence is not None:
                answers[k] = replace(completion, text=sentence, error=None, finish_reason="stop", cut_json=None)
            elif tokens < budget and (completion.error is None or completion.cut_json is not None):
                undecided.append(k)
            else:
                answers[k] = completion
        asked = undecided
    return answers


def chosen_sentence(text: str | None, sentences: list[str]) -> str | None:
    """The sentence a (possibly cut) `{"answer": "…` reply chose: its answer when complete, else the one sentence its
    text so far starts; None while it starts several (or none)."""
    try:
        return json.loads(text or "")["answer"]
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    opened = re.match(r'\s*\{\s*"answer"\s*:\s*"', text or "")
    if opened is None:
        return None
    body = text[opened.end():]
    for cut in range(min(len(body), 6) + 1):  # a cut escape (`\\u20`) is left out
        try:
            prefix = json.loads(f'"{body[:len(body) - cut]}"')
            break
        except json.JSONDecodeError:
            continue
    else:
        return None
    found = [s for s in sentences if s.startswith(prefix)]
    return found[0] if len(found) == 1 else None
