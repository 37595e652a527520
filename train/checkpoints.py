"""Resuming a run: the latest complete checkpoint, trusted only when it was made from the same rows, student and
adapter settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.core.run_dir import RunDir, sha256_file

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

log = logging.getLogger(__name__)


def latest_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` that was written completely (a killed save lacks trainer_state.json)."""
    if not folder.is_dir():
        return None
    steps = {int(p.name.split("-")[-1]): p for p in folder.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()}
    return str(steps[max(steps)]) if steps else None


def resume_point(config: "RagtuneConfig", run_dir: RunDir, method: str, accelerator: Any) -> str | None:
    """The checkpoint to continue from: the latest complete one, if made from the same rows, student and adapter.

    Hyperparameters such as `num_train_epochs`/`max_steps` may change between runs (that is how a run is
    extended). Checkpoints of other data or another adapter would silently mix two trainings: they are
    retired to `stale/<time>/checkpoints/` (RunDir.retire) and training starts over.
    """
    key = {"train_jsonl": sha256_file(run_dir.train_jsonl), "student": config.student.model, "method": method,
           "peft": config.train.peft_kwargs(), "validation": [config.train.validation_split, config.train.validation_file]}
    if config.train.distillation is not None:  # another loss: its checkpoints are another training
        key["distillation"] = config.train.distillation.model_dump(mode="json")
    marker = run_dir.checkpoints / "ragtune_resume_key.json"
    with accelerator.main_process_first():
        latest = latest_checkpoint(run_dir.checkpoints)
        if latest and marker.exists() and json.loads(marker.read_text(encoding="utf-8")) == key:
            return latest
        if latest and accelerator.is_main_process:
            stale = run_dir.retire([run_dir.checkpoints])
            log.warning("checkpoints in %s were made from other rows/student/adapter settings; moved to %s, "
                        "training starts over", run_dir.checkpoints, stale)
        if accelerator.is_main_process:
            run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
    return None


def auto_resume(config: "RagtuneConfig", run_dir: RunDir, trainer: Any, method: str) -> tuple[str | None, str | None]:
    """`train.auto_resume`'s checkpoint (`resume_point`), and a warning when there is none to take."""
    if trainer.is_fsdp_enabled and method != "full":
        # transformers resumes from the sharded checkpoint state (accelerate's save_fsdp_model, adapter_only),
        # which the same PEFT name matching left without an adapter key (0 on CPU with gloo): start over.
        return None, ("auto_resume is off under FSDP with a PEFT adapter: transformers resumes from the sharded "
                      "checkpoint state, which holds no adapter weights (PEFT's key matching misses nested FSDP "
                      "units); training starts over")
    return resume_point(config, run_dir, method, trainer.accelerator), None
