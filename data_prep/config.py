"""The `data_prep:` section of a ragtune config (keys owned by the data_prep stage).

Names follow LlamaIndex where it has one: `chunk_size`/`chunk_overlap` (SentenceSplitter),
`similarity_top_k` (retriever), `num_questions_per_chunk` (the question generator), and the prompt
templates use LlamaIndex's placeholders `{context_str}`, `{query_str}`, `{num_questions_per_chunk}`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ragtune.core.teacher import TeacherStyle

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

def _require(template: str, *names: str) -> str:
    missing = [name for name in names if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"the template must contain {', '.join('{' + m + '}' for m in missing)}")
    return template


class DataPrepConfig(TeacherStyle):
    """The `data_prep:` section; the teacher's own keys (`teacher_answer`, `raft`, `answer_gates`, …) come from
    `ragtune.core.teacher.TeacherStyle`, which eval reads too."""

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
