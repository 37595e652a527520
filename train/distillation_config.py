"""`train.distillation`: its config section, the TRL trainer that runs online distillation, and the checks of its
keys against the installed TRL (`distillation_errors`), made at config load."""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ragtune.train.library_keys import (
    check_keys, dataclass_fields, key_named_in, sft_config_fields, value_check_class,
)

if TYPE_CHECKING:
    from ragtune.train.config import TrainConfig


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
    return {k: v for k, v in dataclass_fields(online_config_class(trainer)).items() if k not in ours}


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
    errors.extend(check_keys(f"train.distillation.{key}.", {k: v for k, v in given.items() if k not in carried},
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
        sft_only = sorted(set(train.model_extra or {}) & (set(sft_config_fields()) - set(dataclass_fields(
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
        value_check_class(online_config_class(trainer))(output_dir=tempfile.gettempdir(), use_cpu=True, bf16=False,
                                                         **given)
    except (ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        key = "trl" if trainer != GKD_TRAINER else "gkd"
        return [(key_named_in(message, given, set(given), f"train.distillation.{key}"), f"TRL rejects it: {message}")]
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
