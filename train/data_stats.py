"""Token statistics of the training rows, counted with the student's tokenizer against the train config's
`max_length`: they belong to the train stage (its config, its fingerprint), not to prep."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.core.chat_rows import validate_chat_jsonl
from ragtune.core.models import load_tokenizer

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig


def sft_setting(config: "RagtuneConfig", key: str) -> Any:
    """An `SFTConfig` argument as the trainer will see it: the config's value, else TRL's own default."""
    from trl import SFTConfig

    given = config.train.sft_kwargs()
    if key in given:
        return given[key]
    return next(f.default for f in dataclasses.fields(SFTConfig) if f.name == key)


def describe_rows(config: "RagtuneConfig", path: Path) -> dict[str, Any]:
    """Rows, tokens per row, training tokens × epochs, and the rows longer than `max_length` (which SFTConfig
    would truncate, cutting the answer the student is meant to learn)."""
    student = config.student
    return validate_chat_jsonl(path, tokenizer=load_tokenizer(student.model, student.trust_remote_code),
                               max_length=sft_setting(config, "max_length"),
                               epochs=float(sft_setting(config, "num_train_epochs")))
