"""The `train:` section of a ragtune config.

ragtune's own keys are the few declared below; every other key under `train:` is passed unchanged
to TRL's `SFTConfig` (so TRL's docs document it), `train.peft` to PEFT's `LoraConfig` (or
`PromptTuningConfig`/`PrefixTuningConfig`), `train.quantization` to transformers' `BitsAndBytesConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["lora", "qlora", "dora", "full", "prompt_tuning", "prefix_tuning"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: Method = "lora"
    peft: dict[str, Any] = Field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                                          "target_modules": "all-linear"})
    quantization: dict[str, Any] = Field(default_factory=lambda: {
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"})
    validation_split: float = Field(0.1, ge=0, lt=1)
    validation_file: str | None = None
    early_stopping_patience: int | None = Field(None, ge=1)
    auto_resume: bool = True

    def sft_kwargs(self) -> dict[str, Any]:
        """The keys that go to `SFTConfig` unchanged."""
        return dict(self.model_extra or {})


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
    errors = list(_check_keys("train.", sft_given, sft_fields, "SFTConfig"))
    if "output_dir" in sft_given:
        errors.append(("train.output_dir", "set the run directory with the top-level `output_dir`; ragtune places checkpoints under it."))
    peft_cls = peft_config_class(train.method)
    if train.method != "full":
        errors.extend(_check_keys("train.peft.", train.peft, _dataclass_fields(peft_cls), peft_cls.__name__))
    if train.method == "qlora":
        errors.extend(_check_keys("train.quantization.", train.quantization, _init_params(BitsAndBytesConfig), "BitsAndBytesConfig"))
    return errors
