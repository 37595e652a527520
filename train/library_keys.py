"""The libraries' own signatures, read from the installed TRL, PEFT and transformers, to check the `train:` keys
that pass through to them: unknown keys (with the closest name), clearly wrong YAML types, and the values TRL's
`SFTConfig` itself refuses, all at config load, before any model loads."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import tempfile
import typing
from typing import Any, Iterator


def dataclass_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def init_params(cls: type) -> dict[str, Any]:
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


def check_keys(prefix: str, given: dict[str, Any], known: dict[str, Any], library: str) -> Iterator[tuple[str, str]]:
    for key, value in given.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            yield f"{prefix}{key}", f"unknown key: not a ragtune train key nor a {library} argument.{hint}"
            continue
        problem = _type_problem(value, known[key])
        if problem:
            yield f"{prefix}{key}", f"{problem} ({library}.{key})."


def sft_config_fields() -> dict[str, Any]:
    from trl import SFTConfig

    return dataclass_fields(SFTConfig)


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

        value_check_class(SFTConfig)(output_dir=tempfile.gettempdir(), **kwargs)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        return [(key_named_in(message, sft_kwargs, given), f"TRL's SFTConfig rejects it: {message}")]
    return []


def key_named_in(message: str, sft_kwargs: dict[str, Any], given: set[str], section: str = "train") -> str:
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
def value_check_class(config_class: type) -> type:
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
