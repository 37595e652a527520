"""The `train:` section of a ragtune config.

ragtune's own keys are the few declared below; every other key under `train:` is passed unchanged
to TRL's `SFTConfig` (so TRL's docs document it), `train.peft` to PEFT's `LoraConfig` (or
`PromptTuningConfig`/`PrefixTuningConfig`), `train.quantization` to transformers' `BitsAndBytesConfig`.

Where ragtune's defaults differ from TRL's, they are listed in `SFT_DEFAULTS` with the reason
(measured with `scripts/bench_train.py`); a key set in the YAML always wins.

Its sub-sections and checks live beside it: `train.distillation` in `distillation_config`, the batch and sharding
checks in `parallelism`, the check of pass-through keys against the libraries' signatures in `library_keys`.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragtune.core.roles import ConfigError
from ragtune.train.distillation_config import DistillationConfig, distillation_errors
from ragtune.train.library_keys import check_keys, dataclass_fields, init_params, sft_config_fields, sft_value_errors
from ragtune.train.parallelism import parallel_errors

Method = Literal["lora", "qlora", "dora", "full", "prompt_tuning", "prefix_tuning"]

# PEFT arguments per method, under whatever the YAML's `train.peft` sets. `lora_dropout` stays at PEFT's
# default 0.0: a dropout mask on the input of every adapted Linear cost ~25% of a CPU step (bernoulli +
# mul; torch profiler, SmolLM2-135M); set e.g. `train.peft.lora_dropout: 0.05` to regularize anyway.
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "qlora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "dora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "use_dora": True},
    "prompt_tuning": {"num_virtual_tokens": 20},
    "prefix_tuning": {"num_virtual_tokens": 20},
    "full": {},
}

# SFTConfig values ragtune sets where TRL's default is slow or unhelpful for this workload
# (short RAG chat rows, LoRA on small students). Each was measured; see scripts/bench_train.py.
SFT_DEFAULTS: dict[str, Any] = {
    # `auto` (ragtune's value; true/false are TRL's): on CPU the fastest of fp32, bf16 autocast and bf16
    # frozen weights in a GEMM probe of the student's layer shapes, cached per machine
    # (ragtune.core.precision); on CUDA/XPU bf16 autocast where the device supports it. No constant is right
    # everywhere: bf16 GEMM ran 4x fp32 on an AMD EPYC with avx512_bf16, and 1/160 of it (0.9 vs 143 GFLOP/s)
    # on an AMD EPYC with AVX2 only (2 cores, torch 2.13), where the probe picks fp32.
    "bf16": "auto",
    # TRL turns activation recomputation on by default (`gradient_checkpointing`, now named
    # `activation_checkpointing` in transformers): every layer's forward runs twice; 0.67x tokens/s on
    # CPU. Small students on CPU or one GPU have the memory to keep activations; turn it on for big ones.
    "activation_checkpointing": False,
    # `torch_compile` stays TRL's false: compiling SmolLM2's 30 decoder layers (`nn.Module.compile`, inductor) made
    # an epoch of 16 rows of ~620 tokens 12 % faster once compiled (31.2-32.4 s vs 34.6-37.0) but its first epoch took
    # 87.6 s: 55 s of compiling on 2 cores, more than the demo's 191 s of training would save (AMD EPYC,
    # avx512_bf16). TRL's `torch_compile: true` compiles the whole model: no epoch in 500 s on a 2-core Xeon.
    # One row per forward, four per optimizer step (the same updates as batch 4: the loss sums tokens over the
    # accumulated rows). No row padded to another's length, and attention takes its causal kernel (the trainer
    # leaves out the mask of right-padded rows, `LabelledPositionsSFTTrainer`); the demo's train stage (rows of
    # ~500-740 tokens, max_length 768) peaked at 2.97 GB RSS instead of 8.63 GB with batch 4 (activations kept for
    # backward: 0.9 vs 4.2 GB), with the same losses, at 1.04x batch 4's tokens/s (scripts/bench_train.py, AMD EPYC
    # AVX2, 2 cores). With one row per batch, grouping rows by length has no padding left to save: TRL's random order
    # stays.
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 4,
    # Every new sequence length makes oneDNN build (and cache, with its reordered bf16 weights) new GEMM primitives:
    # with rows of every length the demo's train stage grew to 4.28 GB RSS. At most 24 lengths up to max_length 768:
    # one epoch of the demo's rows (AMD EPYC, avx512_bf16, bf16 weights) peaked at 2.59 GB instead of 3.49, in 131.7 s
    # instead of 131.0 (a multiple of 64: 2.55 GB, but 140.1 s). TRL's own "auto" pads only on Neuron, for the same
    # reason (one compilation per shape).
    "pad_to_multiple_of": 32,
    "learning_rate": 2e-4,
    "num_train_epochs": 3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    # A fraction is a share of the total steps (transformers' TrainerState takes ceil(fraction x max_steps)), so the
    # schedule holds when the world size changes the step count: about 50 points on the loss curve, whatever the
    # run length.
    "logging_steps": 0.02,
    # With `eval_strategy`/`save_strategy: steps`: ten evaluations and checkpoints per run on any number of GPUs.
    # Integers broke on the GPU box: gpu-qlora.yaml's 50 with a global batch of 128 on 8 GPUs (~4 steps per epoch)
    # never evaluated, never saved, and early stopping never acted; transformers' own fallbacks are 500 (save) and
    # logging_steps (eval: 0.02, fifty evaluations). A key given alone sets the other too (`schedule_kwargs`).
    "eval_steps": 0.1,
    "save_steps": 0.1,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": ["tensorboard"],
}
# SFTConfig names that changed: transformers before `activation_checkpointing` (5.17, the image of the H200 box
# scripts/gpu_check ran on) only knows `gradient_checkpointing`; later ones keep the old name as a deprecated alias
# that the new name overrides (so a YAML's `gradient_checkpointing: true` beside ragtune's default
# `activation_checkpointing: false` trained without it). Either name in the YAML or the defaults becomes the
# installed transformers' own (`installed_name`).
OLD_SFT_NAMES = {"activation_checkpointing": "gradient_checkpointing",
                 "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}
NEW_SFT_NAMES = {old: new for new, old in OLD_SFT_NAMES.items()}


def installed_name(key: str, fields: dict[str, Any]) -> str:
    """`key` as the installed SFTConfig names it: the new name where it exists, else the old one."""
    new = NEW_SFT_NAMES.get(key, key)
    return new if new in fields else OLD_SFT_NAMES.get(new, key)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: Method = "lora"
    # PEFT config kwargs; merged over PEFT_DEFAULTS[method], so `{r: 64}` keeps the other defaults.
    peft: dict[str, Any] = Field(default_factory=dict)
    quantization: dict[str, Any] = Field(default_factory=lambda: {
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"})
    # Held-out rows for eval loss: a fraction of train.jsonl, or a JSONL file of the same shape.
    validation_split: float = Field(0.1, ge=0, lt=1)
    validation_file: str | None = None
    # Stop after this many evaluations without eval-loss improvement (EarlyStoppingCallback).
    early_stopping_patience: int | None = Field(None, ge=1)
    # Continue from the latest checkpoint under the run's checkpoints/ when one exists.
    auto_resume: bool = True
    # `method: qlora` without a working bitsandbytes 4-bit backend is an error; `lora` trains LoRA instead,
    # recorded in the manifest (facts `qlora_fallback`, `warnings`).
    qlora_fallback: Literal["lora"] | None = None
    # soft-label distillation (DistillationConfig); left out of the dump when unset, so no fingerprint changes
    distillation: DistillationConfig | None = Field(None, exclude_if=lambda value: value is None)
    # Rows per optimizer step over all processes: gradient_accumulation_steps becomes global_batch_size /
    # (per_device_train_batch_size x world size) in each run, so 1, 4 or 8 GPUs train the same schedule (the run's
    # manifest records the split under `batch`). Unset: gradient_accumulation_steps as given, and the global batch
    # grows with the GPUs. Left out of the dump when unset, so no fingerprint changes.
    global_batch_size: int | None = Field(None, ge=1, exclude_if=lambda value: value is None)

    def sft_kwargs(self) -> dict[str, Any]:
        """The keys that go to `SFTConfig`: ragtune's defaults overlaid with the YAML's keys, both named as the
        installed transformers names them (`OLD_SFT_NAMES`)."""
        fields = sft_config_fields()
        defaults = {installed_name(key, fields): value for key, value in SFT_DEFAULTS.items()}
        given = {installed_name(key, fields): value for key, value in (self.model_extra or {}).items()}
        kwargs = {**defaults, **schedule_kwargs(given), **coerce_floats(given, fields)}
        # Unset, eval batches are training's size: the same shapes reuse the GEMM primitives training built (see
        # pad_to_multiple_of). Batches of 8 (transformers' default) grew the demo's train stage from 2.18 to 3.71 GB
        # RSS at its first evaluation, which took 5.2 s instead of 4.5 (2026-12-05, AMD EPYC avx512_bf16, bf16 weights).
        kwargs.setdefault("per_device_eval_batch_size", kwargs["per_device_train_batch_size"])
        return kwargs

    def batch(self, world_size: int) -> dict[str, Any]:
        """The batch of a run on `world_size` processes: `global_batch_size` split into per-device rows and
        accumulation steps, or the configured accumulation; ConfigError when no whole number of steps gives it."""
        kwargs = self.sft_kwargs()
        per_device, accumulation = kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]
        source = "train.gradient_accumulation_steps"
        if self.global_batch_size is not None:
            per_step = per_device * world_size
            if self.global_batch_size % per_step:
                fits = [n for n in range(1, self.global_batch_size + 1) if self.global_batch_size % (per_device * n) == 0]
                raise ConfigError(
                    f"train.global_batch_size {self.global_batch_size} is not a multiple of per_device_train_batch_size "
                    f"{per_device} x {world_size} processes: no whole number of accumulation steps gives it. Run on "
                    f"{', '.join(map(str, fits))} processes, or change global_batch_size / per_device_train_batch_size.")
            accumulation, source = self.global_batch_size // per_step, "train.global_batch_size"
        return {"global_batch_size": per_device * accumulation * world_size, "per_device_train_batch_size": per_device,
                "gradient_accumulation_steps": accumulation, "world_size": world_size, "from": source}

    def peft_kwargs(self) -> dict[str, Any]:
        """The kwargs for the method's PEFT config class (empty for `full`)."""
        forced = {"use_dora": True} if self.method == "dora" else {}
        return {**PEFT_DEFAULTS[self.method], **self.peft, **forced}


def held_out_count(rows: int, validation_split: float) -> int:
    """How many of `rows` a `validation_split` holds out for the eval loss: at least one, never all (none below two
    rows or without a split)."""
    if validation_split <= 0 or rows < 2:
        return 0
    return min(rows - 1, max(1, round(rows * validation_split)))


def schedule_kwargs(given: dict[str, Any]) -> dict[str, Any]:
    """`eval_steps` or `save_steps` given alone sets the other: checkpoints land on evaluations (which
    `load_best_model_at_end` needs), and an integer beside the other's default fraction is no mix transformers
    refuses ("cannot get guaranteed when mixing ratio and absolute steps")."""
    steps = {key: given[key] for key in ("eval_steps", "save_steps") if given.get(key) is not None}
    if len(steps) != 1:
        return {}
    value = next(iter(steps.values()))
    return {"eval_steps": value, "save_steps": value}


def coerce_floats(kwargs: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads `2e-4` as a string; turn such strings into floats where the library wants a float."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if isinstance(value, str) and float in typing.get_args(known.get(key)) + (known.get(key),):
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def peft_config_class(method: str) -> type:
    import peft

    return {"prompt_tuning": peft.PromptTuningConfig, "prefix_tuning": peft.PrefixTuningConfig}.get(method, peft.LoraConfig)


def library_key_errors(train: TrainConfig) -> list[tuple[str, str]]:
    """Check pass-through keys against the real TRL/PEFT/transformers signatures, before any model loads."""
    from transformers import BitsAndBytesConfig

    sft_fields = sft_config_fields()
    errors = parallel_errors(train)
    if errors:  # before SFTConfig: it would fail on a DeepSpeed setting without saying why ragtune refuses it
        return errors
    sft_given = coerce_floats(train.sft_kwargs(), sft_fields)
    if sft_given.get("bf16") == "auto":  # ragtune resolves it (train.student.training_precision)
        del sft_given["bf16"]
    errors = list(check_keys("train.", sft_given, sft_fields, "SFTConfig"))
    errors.extend(_renamed_twice(train, sft_fields))
    if not errors:  # only known keys of the right types reach SFTConfig itself
        errors.extend(sft_value_errors(sft_given, set(train.model_extra or {})))
    if "output_dir" in sft_given:
        errors.append(("train.output_dir", "set the run directory with the top-level `output_dir`; ragtune places checkpoints under it."))
    if train.early_stopping_patience and not train.validation_split and not train.validation_file:
        errors.append(("train.early_stopping_patience", "early stopping watches the eval loss: set "
                       "train.validation_split > 0 or train.validation_file."))
    peft_cls = peft_config_class(train.method)
    if train.method == "full" and train.peft:
        errors.append(("train.peft", "`method: full` trains every weight and takes no PEFT config; remove `train.peft`."))
    elif train.method != "full":
        errors.extend(check_keys("train.peft.", train.peft, dataclass_fields(peft_cls), peft_cls.__name__))
    if train.method == "qlora":
        errors.extend(check_keys("train.quantization.", train.quantization, init_params(BitsAndBytesConfig), "BitsAndBytesConfig"))
    errors.extend(distillation_errors(train))
    return errors


def _renamed_twice(train: TrainConfig, fields: dict[str, Any]) -> list[tuple[str, str]]:
    """Both names of one renamed key in the YAML: one would silently win."""
    given = set(train.model_extra or {})
    return [(f"train.{old}", f"`{old}` and `{new}` are one setting (transformers renamed it); keep `{new}`.")
            for new, old in OLD_SFT_NAMES.items() if {new, old} <= given]
