"""The `eval:` section of a ragtune config (keys owned by the eval stage)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modes: list[str] = Field(default_factory=lambda: ["rag", "closed_book"])
    metrics: list[str] = Field(default_factory=lambda: ["faithfulness", "answer_relevancy"])
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    bootstrap_resamples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    judge_sanity_pairs: int = Field(10, ge=0)
    judge_timeout: float = Field(600.0, gt=0)
    adapters: list[str] = Field(default_factory=list)
