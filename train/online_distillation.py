"""Online distillation (`train.distillation.mode: online`) with TRL's trainers for it.

The student answers the training prompts itself and learns the teacher's next-token distribution on its own answers
(on-policy distillation, Agarwal et al., ICLR 2024): what it is taught is where its own answers go, not only where the
teacher's went. The trainer is the installed TRL's (`distillation_config.online_trainer`, recorded in the manifest):

- `trl.DistillationTrainer` (stable since TRL 1.10): generalized JSD (`beta`: 0 forward KL, 1 reverse KL) over the
  whole vocabulary, computed in chunks; the teacher is `teacher.model`, loaded next to the student. It reads the
  rows' prompts only: the answers in train.jsonl are not trained on.
- `ServerDistillationTrainer` (`trl.experimental.server_distillation`) when `trl.teacher_model_server_url` names a
  vLLM server of the teacher: the server scores the student's answers (the teacher's top `loss_top_k` log-probs per
  token), so the teacher takes no training memory.
- `GKDTrainer` (`trl.experimental.gkd`) when `gkd` is set, or on a TRL without DistillationTrainer: `lmbda` is the
  share of batches the student answers; the rest train on the rows' own answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trl

from ragtune.core.models import load_causal_lm
from ragtune.train.adapter import FSDPAdapterCheckpoints
from ragtune.train.distillation_config import (
    GKD_TRAINER, SERVER_TRAINER, DistillationConfig, online_config_class, online_trainer,
)

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig


def online_args(distillation: DistillationConfig, output_dir: str, kwargs: dict[str, Any]) -> Any:
    """The online trainer's TRL config: the `train:` keys it takes (ragtune's SFT-only settings, such as
    `completion_only_loss`, dropped; a YAML's own SFT-only key is a config error before this) and its own keys."""
    config_class = online_config_class(online_trainer(distillation)[0])
    fields = set(config_class.__dataclass_fields__)
    own = distillation.gkd or distillation.trl
    return config_class(output_dir=output_dir, **{k: v for k, v in kwargs.items() if k in fields}, **own)


def build_online_trainer(config: "RagtuneConfig", args: Any, model: Any, tokenizer: Any,
                         train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], peft: Any,
                         callbacks: list[Any]) -> tuple[Any, dict[str, Any]]:
    """The online trainer for this config, and its facts for the manifest: which trainer and why, where the teacher
    runs, and the TRL settings it was given."""
    from datasets import Dataset

    distillation, teacher = config.train.distillation, config.teacher
    name, reason = online_trainer(distillation)
    facts: dict[str, Any] = {"mode": "online", "trainer": name, "why": reason, "trl_version": trl.__version__}
    if name == GKD_TRAINER:
        # GKD tokenizes chat rows (`messages`) itself, in its collator (DataCollatorForChatML).
        from trl.experimental.gkd import GKDTrainer as trainer_class

        def dataset(rows: list[dict[str, Any]]) -> Any:
            return Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows]) if rows else None

        facts["gkd"] = distillation.gkd
    else:
        if name == SERVER_TRAINER:
            from trl.experimental.server_distillation import ServerDistillationTrainer as trainer_class
        else:
            from trl import DistillationTrainer as trainer_class

        def dataset(rows: list[dict[str, Any]]) -> Any:
            return Dataset.from_list([{"prompt": r["prompt"]} for r in rows]) if rows else None

        facts["trl"] = distillation.trl
    kwargs: dict[str, Any] = {}
    if name == SERVER_TRAINER:
        facts["teacher"] = {"served": args.teacher_model_server_url, "model": teacher.model}
    else:
        facts["teacher"] = {"loaded": teacher.model, "torch_dtype": teacher.torch_dtype}
        kwargs["teacher_model"] = load_causal_lm(teacher.model, dtype=teacher.torch_dtype, device_map=teacher.device_map,
                                                 trust_remote_code=teacher.trust_remote_code)

    class FSDPAdapterOnlineTrainer(FSDPAdapterCheckpoints, trainer_class):
        pass

    trainer = FSDPAdapterOnlineTrainer(model=model, args=args, train_dataset=dataset(train_rows),
                                       eval_dataset=dataset(eval_rows), processing_class=tokenizer, peft_config=peft,
                                       callbacks=callbacks, **kwargs)
    return trainer, facts
