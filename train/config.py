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
import re
import tempfile
import typing
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    # A fraction is a share of the total steps: about 50 points on the loss curve, whatever the run length.
    "logging_steps": 0.02,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": ["tensorboard"],
}
# Defaults whose SFTConfig name changed: transformers before `activation_checkpointing` (5.17, the image of the
# H200 box scripts/gpu_check ran on) only knows `gradient_checkpointing`.
OLD_SFT_NAMES = {"activation_checkpointing": "gradient_checkpointing"}


class DistillationConfig(BaseModel):
    """`train.distillation`: soft-label distillation, the student also matches the teacher's next-token distribution
    on the answer, not only its text. Teacher and student must share a tokenizer (checked before training).

    offline (default): prep stores the teacher's top-k log-probs per answer token (`data_prep.teacher_top_logprobs:
    k`, data/teacher_logprobs.jsonl) and the loss adds `alpha * temperature**2 * KL(teacher || student)` over those
    k tokens, both renormalised over them at `temperature` (axolotl's kd plugin; no teacher in training memory).
    online: TRL's `GKDTrainer` with the teacher (`teacher.model`) loaded next to the student; `gkd` holds
    GKDConfig's own keys (`lmbda`, `beta`, `max_new_tokens`, `seq_kd`, `temperature`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["offline", "online"] = "offline"
    alpha: float = Field(0.5, ge=0)  # weight of the KL term next to the SFT loss (1.0: as much as the text)
    # 1.0 keeps the teacher's distribution as stored; higher flattens both, teaching the ranking of unlikely tokens
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)  # the first top_k of the stored log-probs (None: all prep stored)
    # the teacher's tokenizer (Hugging Face id or folder) when `teacher.model` is an endpoint's served name
    teacher_tokenizer: str | None = None
    gkd: dict[str, Any] = Field(default_factory=dict)  # online only: GKDConfig keys

    @model_validator(mode="after")
    def _keys_of_the_mode(self) -> "DistillationConfig":
        offline_only = sorted({"alpha", "temperature", "top_k"} & self.model_fields_set)
        if self.mode == "online" and offline_only:
            raise ValueError(f"{', '.join(offline_only)}: offline keys (the stored top-k log-probs); online "
                             "distillation is TRL's GKD: set its keys under `gkd` (lmbda, beta, temperature, ...)")
        if self.mode == "offline" and self.gkd:
            raise ValueError("`gkd` configures TRL's GKDTrainer: set `mode: online` to use it, or remove `gkd`")
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

    def sft_kwargs(self) -> dict[str, Any]:
        """The keys that go to `SFTConfig`: ragtune's defaults (named as the installed transformers names them)
        overlaid with the YAML's keys."""
        fields = sft_config_fields()
        defaults = {key if key in fields else OLD_SFT_NAMES.get(key, key): value for key, value in SFT_DEFAULTS.items()}
        return {**defaults, **coerce_floats(dict(self.model_extra or {}), fields)}

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
    sft_given = coerce_floats(train.sft_kwargs(), sft_fields)
    if sft_given.get("bf16") == "auto":  # ragtune resolves it (train.sft.training_precision)
        del sft_given["bf16"]
    errors = list(_check_keys("train.", sft_given, sft_fields, "SFTConfig"))
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


def gkd_config_fields() -> dict[str, Any]:
    """GKDConfig's own keys (the rest are SFTConfig's, set under `train:`), less the teacher's: ragtune loads the
    teacher of the `teacher:` section."""
    from trl.experimental.gkd import GKDConfig

    ours = set(sft_config_fields()) | {"teacher_model_name_or_path", "teacher_model_init_kwargs"}
    return {k: v for k, v in _dataclass_fields(GKDConfig).items() if k not in ours}


def distillation_errors(train: TrainConfig) -> list[tuple[str, str]]:
    """What the distillation modes cannot train with: GKD's keys checked against GKDConfig; offline distillation
    aligns the stored teacher tokens row by row, so rows must stay apart (no packing), and scores the answer tokens
    itself with the plain token loss (the student's own logits: not prompt or prefix tuning)."""
    distillation = train.distillation
    if distillation is None:
        return []
    errors = []
    if distillation.mode == "online":
        errors.extend(_check_keys("train.distillation.gkd.", distillation.gkd, gkd_config_fields(), "GKDConfig"))
        return errors
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
        _value_check_class()(output_dir=tempfile.gettempdir(), **kwargs)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        return [(_key_named_in(message, sft_kwargs, given), f"TRL's SFTConfig rejects it: {message}")]
    return []


def _key_named_in(message: str, sft_kwargs: dict[str, Any], given: set[str]) -> str:
    """The `train.` key an SFTConfig error is about: the one it names, else the one whose value it quotes (the
    YAML's own keys first: they are the likelier cause than ragtune's defaults)."""
    keys = sorted(sft_kwargs, key=lambda k: k not in given)
    for key in keys:
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message):
            return f"train.{key}"
    for key in keys:
        if isinstance(sft_kwargs[key], str) and sft_kwargs[key] in message:
            return f"train.{key}"
    return "train"


@functools.cache
def _value_check_class() -> type:
    """SFTConfig whose `device` is a plain CPU device: TrainingArguments' __post_init__ would otherwise set up
    accelerate's process-wide PartialState (a process group under torchrun, CUDA in this process) at config load,
    and the trainer would later inherit that state instead of its own."""
    import torch
    from trl import SFTConfig

    class _ValueCheck(SFTConfig):
        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

    return _ValueCheck
