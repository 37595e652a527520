"""The `train:` section of a ragtune config.

ragtune's own keys are the few declared below; every other key under `train:` is passed unchanged
to TRL's `SFTConfig` (so TRL's docs document it), `train.peft` to PEFT's `LoraConfig` (or
`PromptTuningConfig`/`PrefixTuningConfig`), `train.quantization` to transformers' `BitsAndBytesConfig`.

Where ragtune's defaults differ from TRL's, they are listed in `SFT_DEFAULTS` with the reason
(measured with `scripts/bench_train.py`); a key set in the YAML always wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ragtune.core.roles import ConfigError

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
    # One row per forward, four per optimizer step (the same updates as batch 4: the loss sums tokens over the
    # accumulated rows). No padding, so nothing is computed twice and attention takes its causal kernel; the
    # demo's train stage (rows of ~500-740 tokens, max_length 768) peaked at 2.97 GB RSS instead of 8.63 GB
    # with batch 4 (activations kept for backward: 0.9 vs 4.2 GB), with the same losses, at 1.04x batch 4's
    # tokens/s (scripts/bench_train.py, AMD EPYC AVX2, 2 cores). With one row per batch, grouping rows by
    # length has no padding left to save: TRL's random order stays.
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 4,
    "per_device_eval_batch_size": 8,
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


class DistillationConfig(BaseModel):
    """`train.distillation`: soft-label distillation, the student also matches the teacher's next-token distribution
    on the answer, not only its text. Teacher and student must share a tokenizer (checked before training).

    offline (default): prep stores the teacher's top-k log-probs per answer token (`data_prep.teacher_top_logprobs:
    k`, data/teacher_logprobs.jsonl) and the loss adds `alpha * temperature**2 * KL(teacher || student)` over those
    k tokens, both renormalised over them at `temperature` (axolotl's kd plugin; no teacher in training memory).
    online: the student answers the training prompts itself and learns the teacher's distribution on its own answers,
    with TRL's `DistillationTrainer` (`online_trainer`); `trl` holds TRL's DistillationConfig's own keys (`beta`,
    `max_completion_length`, `temperature`, ..., and ServerDistillationConfig's `teacher_model_server_url` for a
    teacher served by vLLM). `gkd` holds GKDConfig's own keys (`lmbda`, `beta`, `max_new_tokens`, `seq_kd`) and
    runs TRL's experimental `GKDTrainer`, which is also the trainer on a TRL without DistillationTrainer."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["offline", "online"] = "offline"
    alpha: float = Field(0.5, ge=0)  # weight of the KL term next to the SFT loss (1.0: as much as the text)
    # 1.0 keeps the teacher's distribution as stored; higher flattens both, teaching the ranking of unlikely tokens
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)  # the first top_k of the stored log-probs (None: all prep stored)
    # the teacher's tokenizer (Hugging Face id or folder) when `teacher.model` is an endpoint's served name
    teacher_tokenizer: str | None = None
    gkd: dict[str, Any] = Field(default_factory=dict)  # online only: GKDConfig keys
    # online only: TRL DistillationConfig keys; left out of the dump when unset, so no fingerprint changes
    trl: dict[str, Any] = Field(default_factory=dict, exclude_if=lambda value: not value)

    @model_validator(mode="after")
    def _keys_of_the_mode(self) -> "DistillationConfig":
        offline_only = sorted({"alpha", "temperature", "top_k"} & self.model_fields_set)
        if self.mode == "online" and offline_only:
            raise ValueError(f"{', '.join(offline_only)}: offline keys (the stored top-k log-probs); online "
                             "distillation is TRL's: set its keys under `trl` (DistillationConfig's beta, "
                             "temperature, max_completion_length, ...)")
        online_only = [key for key in ("trl", "gkd") if getattr(self, key)]
        if self.mode == "offline" and online_only:
            raise ValueError(f"`{online_only[0]}` configures TRL's online distillation: set `mode: online` to use "
                             f"it, or remove `{online_only[0]}`")
        if len(online_only) == 2:
            raise ValueError("`trl` configures TRL's DistillationTrainer and `gkd` its GKDTrainer: keep one")
        return self


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
        return {**defaults, **schedule_kwargs(given), **coerce_floats(given, fields)}

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


def _dataclass_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _init_params(cls: type) -> dict[str, Any]:
    return {
        name: (p.annotation if p.annotation is not inspect.Parameter.empty else Any)
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "kwargs")
    }


def _type_problem(value: Any, annotation: Any) -> str | None:
    """A short 'expected X' message when a YAML scalar clearly has the wrong type, else None."""
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (annotation,)
    scalars = [a for a in allowed if a in (int, float, bool, str)]
    if not scalars or len(scalars) != len([a for a in allowed if a is not type(None)]):
        return None
    if value is None and type(None) in allowed:
        return None
    for kind in scalars:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if kind is bool and isinstance(value, bool):
            return None
        if kind is str and isinstance(value, str):
            return None
    names = " or ".join(k.__name__ for k in scalars)
    return f"expected {names}, got {type(value).__name__} {value!r}"


def _check_keys(prefix: str, given: dict[str, Any], known: dict[str, Any], library: str) -> Iterator[tuple[str, str]]:
    for key, value in given.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            yield f"{prefix}{key}", f"unknown key: not a ragtune train key nor a {library} argument.{hint}"
            continue
        problem = _type_problem(value, known[key])
        if problem:
            yield f"{prefix}{key}", f"{problem} ({library}.{key})."


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


def sft_config_fields() -> dict[str, Any]:
    from trl import SFTConfig

    return _dataclass_fields(SFTConfig)


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
    if sft_given.get("bf16") == "auto":  # ragtune resolves it (train.sft.training_precision)
        del sft_given["bf16"]
    errors = list(_check_keys("train.", sft_given, sft_fields, "SFTConfig"))
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
        errors.extend(_check_keys("train.peft.", train.peft, _dataclass_fields(peft_cls), peft_cls.__name__))
    if train.method == "qlora":
        errors.extend(_check_keys("train.quantization.", train.quantization, _init_params(BitsAndBytesConfig), "BitsAndBytesConfig"))
    errors.extend(distillation_errors(train))
    return errors


def _renamed_twice(train: TrainConfig, fields: dict[str, Any]) -> list[tuple[str, str]]:
    """Both names of one renamed key in the YAML: one would silently win."""
    given = set(train.model_extra or {})
    return [(f"train.{old}", f"`{old}` and `{new}` are one setting (transformers renamed it); keep `{new}`.")
            for new, old in OLD_SFT_NAMES.items() if {new, old} <= given]


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


GKD_TRAINER = "trl.experimental.gkd.GKDTrainer"
SERVER_TRAINER = "trl.experimental.server_distillation.ServerDistillationTrainer"


# GKDConfig's keys that a config moving to DistillationTrainer may carry over under `trl`
GKD_ONLY = {
    "max_new_tokens": "DistillationConfig names it max_completion_length.",
    "lmbda": "DistillationTrainer trains on the student's answers only (GKD's lmbda 1); keep lmbda under "
             "train.distillation.gkd to train with GKDTrainer.",
    "seq_kd": "DistillationTrainer has no sequence-level KD; keep seq_kd under train.distillation.gkd to train with "
              "GKDTrainer.",
}


def online_trainer(distillation: DistillationConfig) -> tuple[str, str]:
    """The TRL trainer that runs online distillation, as imported, and why (for the manifest): `DistillationTrainer`
    (stable since TRL 1.10), or with `trl.teacher_model_server_url` TRL's trainer for a vLLM-served teacher; GKD when
    `gkd` asks for it, or on a TRL without DistillationTrainer."""
    import trl

    if distillation.gkd:
        return GKD_TRAINER, "train.distillation.gkd is set (GKDConfig's keys)"
    if not hasattr(trl, "DistillationTrainer"):
        return GKD_TRAINER, f"TRL {trl.__version__} has no DistillationTrainer (stable since TRL 1.10)"
    if distillation.trl.get("teacher_model_server_url"):
        return SERVER_TRAINER, "train.distillation.trl.teacher_model_server_url: the teacher is served by vLLM"
    return "trl.DistillationTrainer", f"TRL {trl.__version__} has it"


def online_config_class(trainer: str) -> type:
    """The TRL config class of an `online_trainer`."""
    if trainer == GKD_TRAINER:
        from trl.experimental.gkd import GKDConfig

        return GKDConfig
    if trainer == SERVER_TRAINER:
        from trl.experimental.server_distillation import ServerDistillationConfig

        return ServerDistillationConfig
    from trl import DistillationConfig as TRLDistillationConfig

    return TRLDistillationConfig


def online_config_fields(trainer: str) -> dict[str, Any]:
    """The online trainer's config keys that go under `train.distillation.trl`/`gkd`: its own, less SFTConfig's (set
    under `train:`) and the teacher's (ragtune loads the teacher of the `teacher:` section)."""
    ours = set(sft_config_fields()) | {"teacher_model_name_or_path", "teacher_model_init_kwargs", "teacher_model_revision"}
    return {k: v for k, v in _dataclass_fields(online_config_class(trainer)).items() if k not in ours}


def online_errors(train: TrainConfig) -> list[tuple[str, str]]:
    """Online distillation's keys checked against the installed TRL's config class of the trainer that will run."""
    from trl.import_utils import is_vllm_available

    distillation = train.distillation
    trainer, reason = online_trainer(distillation)
    key = "gkd" if trainer == GKD_TRAINER else "trl"
    if distillation.trl and trainer == GKD_TRAINER:
        return [("train.distillation.trl", f"the keys of TRL's DistillationTrainer, and {reason}: upgrade TRL, or set "
                                           "GKDConfig's keys under train.distillation.gkd instead.")]
    given = getattr(distillation, key)
    carried = {name for name in given if key == "trl" and name in GKD_ONLY}
    errors = [(f"train.distillation.trl.{name}", f"GKDConfig's key: {GKD_ONLY[name]}") for name in sorted(carried)]
    errors.extend(_check_keys(f"train.distillation.{key}.", {k: v for k, v in given.items() if k not in carried},
                              online_config_fields(trainer), online_config_class(trainer).__name__))
    for name in ("teacher_model_server_url", "use_vllm"):
        if given.get(name) and not is_vllm_available():
            errors.append((f"train.distillation.{key}.{name}", "TRL talks to vLLM through the vllm package, which this "
                           "training environment lacks: install it next to TRL (pip install 'trl[vllm]'), or remove "
                           "the key (the teacher loads in-process, the student generates with transformers)."))
    if trainer != GKD_TRAINER:
        if train.method in ("prompt_tuning", "prefix_tuning"):
            errors.append(("train.method", f"{trainer} scores the student's backbone directly, past the virtual "
                           f"tokens of {train.method}. Use lora (or full), or GKD (train.distillation.gkd)."))
        sft_only = sorted(set(train.model_extra or {}) & (set(sft_config_fields()) - set(_dataclass_fields(
            online_config_class(trainer)))))
        errors.extend((f"train.{name}", f"an SFTConfig key that {trainer} does not take: it trains on the "
                       "student's own answers (their length: train.distillation.trl.max_completion_length). Remove it.")
                      for name in sft_only)
    if not errors:
        errors.extend(online_value_errors(trainer, given))
    return errors


def online_value_errors(trainer: str, given: dict[str, Any]) -> list[tuple[str, str]]:
    """The online trainer's config built from its own keys, so TRL's checks (beta's range, the served teacher's
    loss_top_k) run at config load; side-effect free as in `sft_value_errors`."""
    try:
        _value_check_class(online_config_class(trainer))(output_dir=tempfile.gettempdir(), use_cpu=True, bf16=False,
                                                         **given)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        key = "trl" if trainer != GKD_TRAINER else "gkd"
        return [(_key_named_in(message, given, set(given), f"train.distillation.{key}"), f"TRL rejects it: {message}")]
    return []


def distillation_errors(train: TrainConfig) -> list[tuple[str, str]]:
    """What the distillation modes cannot train with: the online trainer's keys checked against TRL's config class
    (`online_errors`); offline distillation aligns the stored teacher tokens row by row, so rows must stay apart (no
    packing), and scores the answer tokens itself with the plain token loss (the student's own logits: not prompt or
    prefix tuning)."""
    distillation = train.distillation
    if distillation is None:
        return []
    if distillation.mode == "online":
        return online_errors(train)
    errors = []
    extra = train.model_extra or {}
    if train.method in ("prompt_tuning", "prefix_tuning"):
        errors.append(("train.method", f"offline distillation adds its KL term to the token loss of a LoRA or full "
                                       f"model; {train.method} is not supported. Use lora, or mode: online."))
    if extra.get("loss_type", "nll") != "nll" or extra.get("label_smoothing_factor"):
        key = "loss_type" if extra.get("loss_type", "nll") != "nll" else "label_smoothing_factor"
        errors.append((f"train.{key}", "offline distillation adds its KL term to the plain token loss (loss_type "
                                       "nll, no label smoothing): remove the key, or remove train.distillation."))
    for key in ("packing", "padding_free"):
        if (train.model_extra or {}).get(key):
            errors.append((f"train.{key}", f"distillation compares each row with its teacher's tokens; {key} joins "
                                           "rows. Remove it, or remove train.distillation."))
    return errors


# Ranges TRL and transformers leave unchecked until training meets them, minutes in, after the student has loaded:
# torch's AdamW rejects a negative learning_rate only when the Trainer builds it (`ragtune train` died there with
# a traceback), and 0 trains nothing; torch's DataLoader rejects batch size 0 and the Trainer divides by
# gradient_accumulation_steps. `None` (where a key allows it) is not checked.
SFT_MINIMUMS: dict[str, tuple[float, bool]] = {  # key: (bound, whether the bound itself is allowed)
    "learning_rate": (0, False),
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "max_length": (1, True),
}

# Settings whose check depends on the machine (tf32 needs an Ampere GPU; SFTConfig also switches it on globally):
# the trainer checks them on the machine that trains, so a GPU config still validates on a laptop.
_DEVICE_KEYS = ("tf32",)


def sft_value_errors(sft_kwargs: dict[str, Any], given: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Build TRL's `SFTConfig` from the `train:` keys so its own checks (strategies, steps, schedulers, precision
    pairs) run at config load, plus `SFT_MINIMUMS` where the libraries check nothing. Side-effect free: no folder
    is made, no device or process group is set up (`_ValueCheck`). 8 ms the first time, 0.1 ms after, on the 2-core
    CPU box (TRL is imported already by the key check)."""
    errors = []
    for key, (bound, inclusive) in SFT_MINIMUMS.items():
        value = sft_kwargs.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (value < bound or (value == bound and not inclusive)):
            problem = f"must be {'>=' if inclusive else '>'} {bound:g}, got {value!r}."
            errors.append((f"train.{key}", f"{problem} Fix the value, or remove the key to use the default."))
    if errors:
        return errors
    kwargs = {k: v for k, v in sft_kwargs.items() if k not in _DEVICE_KEYS and k != "resume_from_checkpoint"}
    # use_cpu skips transformers' "bf16 needs a GPU" check here; the trainer runs it where it trains
    kwargs["use_cpu"] = True
    try:
        from trl import SFTConfig

        _value_check_class(SFTConfig)(output_dir=tempfile.gettempdir(), **kwargs)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        return [(_key_named_in(message, sft_kwargs, given), f"TRL's SFTConfig rejects it: {message}")]
    return []


def _key_named_in(message: str, sft_kwargs: dict[str, Any], given: set[str], section: str = "train") -> str:
    """The `section.` key a TRL config error is about (SFTConfig's under `train`, an online trainer's under
    `train.distillation.trl`/`gkd`): the one it names, else the one whose value it quotes (the YAML's own keys
    first: they are the likelier cause than ragtune's defaults)."""
    keys = sorted(sft_kwargs, key=lambda k: k not in given)
    for key in keys:
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message):
            return f"{section}.{key}"
    for key in keys:
        if isinstance(sft_kwargs[key], str) and sft_kwargs[key] in message:
            return f"{section}.{key}"
    return section


@functools.cache
def _value_check_class(config_class: type) -> type:
    """`config_class` (SFTConfig, an online trainer's config) whose `device` is a plain CPU device:
    TrainingArguments' __post_init__ would otherwise set up accelerate's process-wide PartialState (a process group
    under torchrun, CUDA in this process) at config load, and the trainer would later inherit that state instead of
    its own."""
    import torch

    class _ValueCheck(config_class):  # type: ignore[misc, valid-type]
        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

    return _ValueCheck
