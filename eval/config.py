"""The `eval:` section of a ragtune config (keys owned by the eval stage).

Metric names are Ragas's own (`Faithfulness().name == "faithfulness"`, ...), except `grounding`, ragtune's
non-LLM support score (`ragtune.core.grounding`, the same one prep's answer gate uses); the statistics keys
are `scipy.stats.bootstrap`'s argument names (`n_resamples`, `confidence_level`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ragtune.core.roles import refuse_owned_engine_args

# Scored per model and mode, on the model's answer.
ANSWER_METRICS = (
    "faithfulness",  # LLM judge: share of the answer's statements supported by the contexts
    "answer_relevancy",  # LLM judge + embeddings: does the answer address the question
    "answer_correctness",  # LLM judge + embeddings: vs the teacher's (reference) answer
    "semantic_similarity",  # embeddings: vs the teacher's answer
    "bleu_score", "chrf_score", "rouge_score", "non_llm_string_similarity",  # n-gram / edit distance vs the teacher
    "grounding",  # ragtune's own, no LLM: share of the answer's content-word pairs found in its contexts
)
# Scored once per question: the retriever is the same for every model.
RETRIEVAL_METRICS = (
    "context_precision", "context_recall",  # LLM judge, the teacher's answer as reference
    "non_llm_context_precision_with_reference", "non_llm_context_recall",  # string match vs the oracle chunk
)
# `eval.retrieval_conditions` by name (eval/conditions.py), besides `{top_k: N}`: `retrieved` is rag mode itself
NAMED_CONDITIONS = ("retrieved", "oracle", "distractors_only")
CONDITIONS_EXAMPLE = "[oracle, distractors_only, {top_k: [1, 3, 5]}]"
MetricName = Literal[
    "faithfulness", "answer_relevancy", "answer_correctness", "semantic_similarity", "bleu_score", "chrf_score",
    "rouge_score", "non_llm_string_similarity", "grounding", "context_precision", "context_recall",
    "non_llm_context_precision_with_reference", "non_llm_context_recall",
]


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a golden set of your own, answered instead of prep's held-out questions (eval/golden.py): a JSONL of
    # {"question", "reference"?, "contexts"?, "id"?}, relative to the working directory like `documents`
    # (`ragtune eval CONFIG --questions FILE` sets it). Prep still writes its held-out questions; eval ignores them
    questions_file: str | None = None
    # what is answered: `rag` (retrieved contexts, the deployed setting) and `closed_book` (no context)
    modes: list[Literal["rag", "closed_book"]] = Field(default_factory=lambda: ["rag", "closed_book"], min_length=1)
    metrics: list[MetricName] = Field(default_factory=lambda: [*ANSWER_METRICS, *RETRIEVAL_METRICS], min_length=1)
    # RAFT's question, did the student learn to read the context or memorise answers (eval/conditions.py): the rag
    # questions answered again by every student under other contexts: `oracle` (the source chunk first, then the
    # retrieved ones), `distractors_only` (the source chunk taken out), `{top_k: N}` or `{top_k: [1, 3, 5]}` (another
    # similarity_top_k); `retrieved` is rag mode itself. Off: each condition costs every student one more answer
    # per question, scored on the judge-free metrics
    retrieval_conditions: list[str] = Field(default_factory=list)
    # extra adapter folders to score besides this run's own (the CLI's --adapters adds more)
    adapters: list[str] = Field(default_factory=list)
    # which forms of this run's fine-tuned student are scored: `adapter` (base + adapter/ through PEFT) and/or
    # `merged` (merged/, verified by the merge stage to give the same logits). Under greedy decoding they
    # answer alike, so one halves the tuned side's cost; `adapter` is used when there is no merged model.
    tuned_models: list[Literal["adapter", "merged"]] = Field(default_factory=lambda: ["adapter", "merged"], min_length=1)
    # where the students answer: `hf` in-process (adapters through PEFT), or `vllm`: one managed vLLM server for
    # the base with every adapter as a LoRA module (`--lora-modules`), so N adapters cost one model load; a merged
    # model is served as its own model. vLLM's fp32 greedy text equals the hf backend's (tests/test_vllm_engine.py)
    backend: Literal["hf", "vllm"] = "hf"
    # `backend: vllm`: vLLM engine arguments of the student's managed server, by vLLM's names (as `teacher.engine_args`)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # student/teacher answer generation (greedy)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    # eval stops non-zero when more than this share of one model's answers in one mode failed (an OOM or a dead
    # server fails them all alike; a comparison over the rest would be silently thin). Rows stay; a rerun retries
    max_failure_fraction: float = Field(0.5, ge=0, le=1)
    # Ragas AnswerRelevancy's number of generated questions (identical greedy calls are computed once)
    strictness: int = Field(3, ge=1)
    # seconds one call to an `openai` judge may take, retries included, before its samples are recorded as
    # failed (the in-process judge needs none: judge.max_new_tokens bounds every call)
    judge_timeout: float = Field(600.0, gt=0)
    # known-good vs known-bad pairs scored to measure whether the judge discriminates at all
    judge_sanity_pairs: int = Field(10, ge=0)
    # JSON Schema bounds added to Ragas's output schemas for the in-process (hf) judge, so constrained
    # decoding always closes its strings and lists within judge.max_new_tokens (at most 128 characters:
    # xgrammar 0.2.8 fails to compile longer bounded string patterns)
    judge_max_length: int = Field(128, ge=8, le=128)
    judge_max_items: int = Field(6, ge=1)
    # paired bootstrap over questions (scipy.stats.bootstrap, percentile method), seeded by `seed`
    n_resamples: int = Field(2000, ge=100)
    confidence_level: float = Field(0.95, gt=0, lt=1)
    # |tuned - base| <= tie_tolerance counts as a tie in win/tie/loss
    tie_tolerance: float = Field(0.0, ge=0)

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, engine_args: dict[str, Any]) -> dict[str, Any]:
        return refuse_owned_engine_args(engine_args)

    @field_validator("metrics", "modes", "tuned_models")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("retrieval_conditions", mode="before")
    @classmethod
    def _conditions(cls, value: Any) -> list[str]:
        return condition_names(value)

    @model_validator(mode="after")
    def _conditions_need_rag(self) -> "EvalConfig":
        if self.retrieval_conditions and "rag" not in self.modes:
            raise ValueError("eval.retrieval_conditions answers rag mode's questions under other contexts: add `rag` "
                             "to eval.modes, or set eval.retrieval_conditions: []")
        return self


def condition_names(value: Any) -> list[str]:
    """`eval.retrieval_conditions` as names, each once: `retrieved`, `oracle`, `distractors_only` and `top_k=N` (from
    `{top_k: N}`, `{top_k: [N, ...]}` or the name itself, as `config.resolved()` writes it back)."""
    if not isinstance(value, list):
        raise ValueError(f"eval.retrieval_conditions is a list, e.g. {CONDITIONS_EXAMPLE}")
    names: list[str] = []
    for i, entry in enumerate(value):
        if isinstance(entry, str) and entry.startswith("top_k="):
            entry = {"top_k": int(entry[6:]) if entry[6:].isdigit() else entry[6:]}
        if isinstance(entry, dict) and list(entry) == ["top_k"]:
            ks = entry["top_k"] if isinstance(entry["top_k"], list) else [entry["top_k"]]
            if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
                raise ValueError(f"eval.retrieval_conditions[{i}]: top_k is a whole number of chunks >= 1 or a list "
                                 f"of them, e.g. {{top_k: [1, 3, 5]}} (got {entry['top_k']!r})")
            names += [f"top_k={k}" for k in ks]
        elif isinstance(entry, str) and entry in NAMED_CONDITIONS:
            names.append(entry)
        else:
            raise ValueError(f"eval.retrieval_conditions[{i}]: {entry!r} is not a retrieval condition; use "
                             f"{', '.join(NAMED_CONDITIONS)} or {{top_k: N}}, e.g. {CONDITIONS_EXAMPLE}")
    return list(dict.fromkeys(names))
