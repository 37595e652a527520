"""The `data_prep:` section of a ragtune config (keys owned by the data_prep stage)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

QUESTION_PROMPT = (
    "Context information is below.\n"
    "---------------------\n"
    "{context}\n"
    "---------------------\n"
    "Given the context information and not prior knowledge, generate only questions based on the query below.\n"
    "You are a Teacher/Professor. Your task is to setup {num_questions} questions for an upcoming quiz/examination. "
    "The questions should be diverse in nature across the document. Restrict the questions to the context "
    "information provided. Formulate a single question that captures an important fact from the context."
)

SYSTEM_PROMPT = (
    "You are an expert Q&A system that is trusted around the world. Always answer the query using the "
    "provided context information, and not prior knowledge."
)

USER_TEMPLATE = (
    "Context information is below.\n"
    "---------------------\n"
    "{context}\n"
    "---------------------\n"
    "Given the context information and not prior knowledge, answer the query.\n"
    "Query: {question}\n"
    "Answer: "
)


class RaftConfig(BaseModel):
    """RAFT: with probability `oracle_probability` the oracle chunk is among the contexts, else only distractors."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    oracle_probability: float = Field(0.8, ge=0, le=1)
    num_distractors: int = Field(2, ge=0)
    chain_of_thought: bool = False


class DataPrepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # SentenceSplitter arguments
    chunk_size: int = Field(512, ge=32)
    chunk_overlap: int = Field(64, ge=0)
    # held-out split by document region
    train_fraction: float = Field(0.5, gt=0, lt=1)
    split_unit: str = Field("page", pattern="^(page|document)$")
    # question generation
    questions_per_chunk: int = Field(1, ge=1)
    num_train_questions: int = Field(40, ge=1)
    num_eval_questions: int = Field(10, ge=1)
    question_prompt: str = QUESTION_PROMPT
    filter_unanswerable: bool = True
    leakage_threshold: float = Field(0.92, gt=0, le=1)
    # teacher answers through the RAG pipeline
    similarity_top_k: int = Field(2, ge=1)
    system_prompt: str = SYSTEM_PROMPT
    user_template: str = USER_TEMPLATE
    raft: RaftConfig = RaftConfig()
    closed_book_rows: bool = False
