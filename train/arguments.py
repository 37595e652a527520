"""The run's training arguments: TRL's `SFTConfig` (or the online distillation trainer's config) from the
`train:` keys, placed in the run directory."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ragtune.core.run_dir import RunDir
from ragtune.train.online_distillation import online_args
from ragtune.train.rows import TrainDataError
from ragtune.train.student import has_accelerator

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

log = logging.getLogger(__name__)


def sft_config(config: "RagtuneConfig", run_dir: RunDir, has_eval: bool, bf16: bool | None) -> Any:
    """`SFTConfig` from the `train:` keys, placed in the run directory, with the choices they imply
    (`bf16`: the resolved `train.bf16`, see `student.training_precision`). Online distillation: the online trainer's
    TRL config (`online_distillation.online_args`) with the same keys."""
    from trl import SFTConfig

    distillation = config.train.distillation
    train = config.train
    given = set(train.model_extra or {})
    kwargs = train.sft_kwargs()
    kwargs.setdefault("seed", config.seed)
    kwargs.setdefault("data_seed", kwargs["seed"])
    # Loss on the completion (the answer + end-of-turn) only; the label check verifies it.
    kwargs["completion_only_loss"] = True
    kwargs["bf16"] = bf16
    kwargs["gradient_accumulation_steps"] = train.batch(world_size())["gradient_accumulation_steps"]
    if train.method != "full":
        # transformers asks DDP to find unused parameters for any model that is not a PreTrainedModel, and a PeftModel
        # is not one: a search of the autograd graph after every forward, for nothing (a PEFT method's trainable
        # weights are all on the forward path), which also breaks reentrant activation checkpointing ("marked ready
        # twice"). transformers sets False for its own models under checkpointing; the YAML's value wins.
        kwargs.setdefault("ddp_find_unused_parameters", False)
    if not has_accelerator():
        # Without `use_cpu`, TrainingArguments rejects bf16 on CPU and multi-process CPU runs stay single-process.
        kwargs.setdefault("use_cpu", True)
    if not has_eval:
        if kwargs.get("eval_strategy", "no") != "no" and "eval_strategy" in given:
            log.warning("train.eval_strategy is set but there are no validation rows; evaluation is off.")
        kwargs["eval_strategy"] = "no"
        kwargs.pop("eval_steps", None)
    if train.early_stopping_patience:
        if not has_eval:
            raise TrainDataError(f"{run_dir.train_jsonl}: too few rows to hold any out for the eval loss that "
                                 "train.early_stopping_patience watches; add rows or set train.validation_file.")
        kwargs.setdefault("load_best_model_at_end", True)
        kwargs.setdefault("metric_for_best_model", "eval_loss")
        kwargs.setdefault("greater_is_better", False)
        if "save_strategy" not in given:
            kwargs["save_strategy"] = kwargs["eval_strategy"]
            if kwargs.get("eval_steps"):
                kwargs["save_steps"] = kwargs["eval_steps"]
    kwargs.pop("resume_from_checkpoint", None)
    if distillation is not None and distillation.mode == "online":
        return online_args(distillation, str(run_dir.checkpoints), kwargs)
    return SFTConfig(output_dir=str(run_dir.checkpoints), **kwargs)


def world_size() -> int:
    """The number of training processes `accelerate launch`/torchrun started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
