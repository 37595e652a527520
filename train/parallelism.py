"""Batch and sharding settings across processes: the DeepSpeed ZeRO stage a run trains with, and the settings that
cannot train on any number of processes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ragtune.train.config import TrainConfig


def deepspeed_zero_stage(train: TrainConfig) -> int | None:
    """The DeepSpeed ZeRO stage this run trains with: `accelerate launch` with a DeepSpeed config says it in the
    environment (ACCELERATE_DEEPSPEED_ZERO_STAGE, or the JSON at ACCELERATE_DEEPSPEED_CONFIG_FILE); SFTConfig's
    `deepspeed` key (a dict or a JSON path) says it in the YAML. None: no DeepSpeed."""
    setting = (train.model_extra or {}).get("deepspeed")
    if setting is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        setting = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if isinstance(setting, str) and Path(setting).is_file():
        setting = json.loads(Path(setting).read_text(encoding="utf-8"))
    if isinstance(setting, dict):
        stage = (setting.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None
    return None


def parallel_errors(train: TrainConfig) -> list[tuple[str, str]]:
    """Batch and sharding settings that cannot train: a global batch beside an accumulation of its own, or one no
    per-device batch divides; QLoRA under DeepSpeed ZeRO-3, refused here rather than trained untested: ZeRO-3
    partitions every parameter, and bitsandbytes' packed 4-bit weights are uint8 unless `bnb_4bit_quant_storage`
    is the float dtype of the rest, which ragtune sets under FSDP only (`load_student`). FSDP shards QLoRA
    (configs/accelerate/fsdp_qlora.yaml); ZeRO-3 trains lora and full."""
    errors = []
    extra = train.model_extra or {}
    if train.global_batch_size is not None:
        if "gradient_accumulation_steps" in extra:
            errors.append(("train.global_batch_size", "set either global_batch_size (ragtune derives "
                           "gradient_accumulation_steps from it and the world size) or gradient_accumulation_steps, "
                           "not both."))
        per_device = train.sft_kwargs()["per_device_train_batch_size"]
        if isinstance(per_device, int) and per_device > 0 and train.global_batch_size % per_device:
            errors.append(("train.global_batch_size", f"{train.global_batch_size} is not a multiple of "
                           f"per_device_train_batch_size {per_device}: no run divides it into whole batches."))
    if train.method == "qlora" and deepspeed_zero_stage(train) == 3:
        errors.append(("train.method", "qlora is not supported under DeepSpeed ZeRO-3: ZeRO-3 partitions every "
                       "parameter, and bitsandbytes packs the 4-bit weights as uint8 (ragtune stores them in the "
                       "student's dtype under FSDP only), so they are not sharded with the rest. Launch with "
                       "configs/accelerate/fsdp_qlora.yaml (FSDP shards QLoRA), or use method: lora with ZeRO-3, "
                       "or ZeRO stage 2."))
    return errors
