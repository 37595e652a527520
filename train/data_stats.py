"""Token statistics of the training rows, counted with the student's tokenizer against the train config's
`max_length`: they belong to the train stage (its config, its fingerprint), not to prep. A row the trainer would
cut stops training before it starts (`check_lengths`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import write_json
from ragtune.core.chat_rows import validate_chat_jsonl
from ragtune.core.models import load_tokenizer
from ragtune.core.run_dir import RunDir
from ragtune.train.rows import TrainDataError

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


def check_lengths(config: "RagtuneConfig", run_dir: RunDir, write: bool, cuts_rows: bool = True) -> dict[str, Any]:
    """Token statistics of data/train.jsonl (logs/data_stats.json, for the report); a row longer than
    `max_length` stops training before it starts, where the trainer cuts rows (`cuts_rows`): SFTConfig would cut
    its end, the answer it is meant to teach."""
    stats = describe_rows(config, run_dir.train_jsonl)
    if write:
        write_json(run_dir.data_stats, stats)
    if cuts_rows and stats.get("rows_over_max_length"):
        raise TrainDataError(
            f"{run_dir.train_jsonl}: {stats['rows_over_max_length']} rows are longer than train.max_length "
            f"({stats['max_length']} tokens; longest {stats['tokens_per_row']['max']}), lines "
            f"{', '.join(map(str, stats['lines_over_max_length']))}: truncation would cut their answers. Raise "
            "train.max_length, or lower data_prep.chunk_size / similarity_top_k and run prep again.")
    return {k: stats[k] for k in ("rows", "tokens_total", "tokens_per_row", "training_tokens") if k in stats}
