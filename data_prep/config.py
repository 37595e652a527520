"""The `data_prep:` section of a ragtune config (keys owned by the data_prep stage).

Names follow LlamaIndex where it has one: `chunk_size`/`chunk_overlap` (SentenceSplitter),
`similarity_top_k` (retriever), `num_questions_per_chunk` (the question generator), and the prompt
templates use LlamaIndex's placeholders `{context_str}`, `{query_str}`, `{num_questions_per_chunk}`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DOCUMENT_SUFFIXES = (".pdf", ".md", ".markdown", ".txt", ".html", ".htm")  # what data_prep.documents reads

QUESTION_PROMPT = (
    "Context information is below.\n"
    "---------------------\n"
    "{context_str}\n"
    "---------------------\n"
    "Given the context information and not prior knowledge, generate only questions based on the query below.\n"
    "You are a Teacher/Professor. Your task is to setup {num_questions_per_chunk} question(s) for an upcoming "
    "quiz/examination. Restrict the questions to the context information provided. Formulate each question so "
    "that it captures an important fact from the context. Write one question per line."
)

SYSTEM_PROMPT = (
    "You are an expert Q&A system that is trusted around the world. Always answer the query using the "
    "provided context information, and not prior knowledge."
)

TEXT_QA_TEMPLATE = (
    "Context information is below.\n"
    "---------------------\n"
    "{context_str}\n"
    "---------------------\n"
    "Given the context information and not prior knowledge, answer the query.\n"
    "Query: {query_str}\n"
    "Answer: "
)

CLOSED_BOOK_SYSTEM_PROMPT = "You are an expert Q&A system that is trusted around the world. Answer the query accurately."

CHAIN_OF_THOUGHT_INSTRUCTION = (
    "\n\nFirst reason step by step, quoting the sentences of the context you rely on between "
    "##begin_quote## and ##end_quote##. Then give the final answer on a last line starting with <ANSWER>:"
)


def _require(template: str, *names: str) -> str:
    missing = [name for name in names if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"the template must contain {', '.join('{' + m + '}' for m in missing)}")
    return template


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


class DataPrepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # SentenceSplitter arguments
    chunk_size: int = Field(512, ge=32)
    chunk_overlap: int = Field(64, ge=0)
    # held-out split by document region: a seeded shuffle of pages (or whole documents), the first
    # `train_fraction` of them give training questions, the rest evaluation questions
    train_fraction: float = Field(0.5, gt=0, lt=1)
    split_unit: Literal["page", "document"] = "page"
    # question generation by the teacher
    num_questions_per_chunk: int = Field(1, ge=1)
    num_train_questions: int = Field(40, ge=1)
    num_eval_questions: int = Field(10, ge=1)
    question_prompt: str = QUESTION_PROMPT
    # drop questions the source chunk cannot answer: "lexical" keeps a question when at least
    # `min_lexical_overlap` of its content words occur in the chunk; "teacher" asks the teacher (yes/no)
    answerable_check: Literal["lexical", "teacher", "none"] = "lexical"
    min_lexical_overlap: float = Field(0.5, ge=0, le=1)
    # eval questions more similar than this (cosine of embeddings) to any train question are dropped
    leakage_threshold: float = Field(0.92, gt=0, le=1)
    # questions of one split more similar than this to an earlier kept one are dropped as near-duplicates: on 111
    # generated questions every pair above 0.85 was a duplicate, about 10 of 17 pairs at 0.80-0.85 were not
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1)
    # round-trip consistency (Promptagator, Dai et al. 2022): keep a question only if retrieving for it ranks its
    # source chunk in the top `roundtrip_top_k` (0: off), searching as its split is answered: train questions among
    # train-region chunks, eval questions in the whole index. A question the retriever cannot trace to its source is
    # too vague to have one answer: on the demo's eval questions the source was among the top 2 for 11 of 30, and
    # no model could agree with the teacher's reference (written from the source) on the other 19
    roundtrip_top_k: int = Field(0, ge=0)
    roundtrip_splits: list[Literal["train", "eval"]] = ["train", "eval"]
    # teacher answers through the RAG pipeline (the same messages eval sends to the student)
    similarity_top_k: int = Field(2, ge=1)
    # prep stops non-zero when more than this share of the training questions got no answer from the teacher
    # (failed calls, not rejected answers): a dead server or an OOM fails every row alike; below it, prep warns
    # and a rerun retries the failed ones
    max_failure_fraction: float = Field(0.5, ge=0, le=1)
    system_prompt: str = SYSTEM_PROMPT
    text_qa_template: str = TEXT_QA_TEMPLATE
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
    # also emit (question without context -> the teacher's RAG answer) rows, to bake knowledge in
    closed_book_rows: bool = False
    # store the teacher's `top_logprobs` most likely tokens with their log-probs per answer token in
    # data/teacher_logprobs.jsonl, for `train.distillation` (OpenAI and vLLM allow up to 20; vLLM up to its
    # --max-logprobs). Needs a teacher with the student's tokenizer. Left out of the dump when unset (fingerprints)
    teacher_top_logprobs: int | None = Field(None, ge=1, exclude_if=lambda value: value is None)
    closed_book_system_prompt: str = CLOSED_BOOK_SYSTEM_PROMPT

    @field_validator("question_prompt")
    @classmethod
    def _question_prompt(cls, value: str) -> str:
        return _require(value, "context_str")

    @field_validator("text_qa_template")
    @classmethod
    def _qa_template(cls, value: str) -> str:
        return _require(value, "context_str", "query_str")

    @property
    def raft_contexts(self) -> int:
        """Contexts per RAFT training row (the oracle, when drawn, plus distractors)."""
        return self.raft.num_contexts or self.similarity_top_k

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "DataPrepConfig":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})")
        return self

    @model_validator(mode="after")
    def _extract_alone(self) -> "DataPrepConfig":
        if self.teacher_answer == "extract" and self.raft.enabled and self.raft.chain_of_thought:
            raise ValueError("teacher_answer: extract answers with one sentence, RAFT's chain of thought with "
                             "reasoning and quotes; set one of them")
        if self.teacher_answer == "extract" and self.teacher_top_logprobs:
            raise ValueError("teacher_answer: extract decodes JSON around the sentence, so its log-probs are not the "
                             "answer's; leave teacher_top_logprobs unset or use teacher_answer: generate")
        return self

    @model_validator(mode="after")
    def _sentence_cap_without_chain_of_thought(self) -> "DataPrepConfig":
        if self.teacher_max_sentences is not None and self.raft.enabled and self.raft.chain_of_thought:
            raise ValueError("teacher_max_sentences would cut RAFT's chain of thought before its `<ANSWER>:`; "
                             "set one of teacher_max_sentences and raft.chain_of_thought")
        return self
