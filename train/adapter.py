"""Saving the trained adapter to adapter/, and an adapter's checkpoints under FSDP.

Under FSDP (version 1) with a PEFT adapter, PEFT's own saving and loading match the adapter's keys by module names
that FSDP's nested units change, and find none; here the adapter is gathered and saved (and loaded back for
`load_best_model_at_end`) with those wrappers spliced out of the module tree.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from trl import SFTTrainer

from ragtune.core.errors import UserFacingError
from ragtune.core.models import adapter_weight_names
from ragtune.core.run_dir import RunDir

log = logging.getLogger(__name__)


class AdapterSaveError(UserFacingError, RuntimeError):
    """adapter/ was written without the trained weights."""


_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@contextlib.contextmanager
def nested_wrappers_spliced_out(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model`'s module tree without the FSDP units and activation-checkpoint wrappers nested inside it, for the
    block; put back afterwards. Only the parents' `_modules` entries change, no parameter.

    PEFT (0.21) picks an adapter's keys out of a state dict by module names, and strips a wrapper's name only
    where it leads: FSDP's per-layer units (PEFT's own `fsdp_auto_wrap_policy`) put `_fsdp_wrapped_module.`
    inside every name under a decoder layer, so none of the gathered keys matched and `save_pretrained` wrote an
    adapter file without a tensor (on the H200 box, and on CPU with gloo: 0 of 56 LoRA tensors kept)."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            inner = child
            while (wrapper := next((w for w in _WRAPPERS if w in getattr(inner, "_modules", {})), None)) is not None:
                inner = inner._modules[wrapper]
            if inner is not child:
                swapped.append((parent, name, child))
                parent._modules[name] = inner
    try:
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def save_fsdp_adapter(accelerator: Any, model: Any, adapter_dir: Path) -> str:
    """Gather the full state dict (a collective: every rank calls this) and save the adapter from rank 0; returns
    what was gathered, in words, for the manifest and for an error."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return ""
    adapter_keys = [k for k in state_dict if "lora_" in k or "prompt_embeddings" in k]
    peft_model = accelerator.unwrap_model(model)
    with nested_wrappers_spliced_out(peft_model):
        peft_model.save_pretrained(str(adapter_dir), state_dict=state_dict)
    return f"FSDP gathered {len(state_dict)} tensors, {len(adapter_keys)} of them adapter tensors"


class AdapterLoadError(UserFacingError, RuntimeError):
    """A checkpoint's adapter could not be loaded back into the FSDP-wrapped model."""


def load_fsdp_adapter(accelerator: Any, model: Any, adapter_dir: Path) -> int:
    """Load the adapter `save_fsdp_adapter` wrote in `adapter_dir` into the FSDP-wrapped PEFT model, on every rank
    (a collective: every rank calls this); returns how many adapter tensors were loaded.

    PEFT's loader maps the file's keys onto module names the same way its saver does, so under FSDP it matched none
    of them (every key unexpected, nothing loaded, no error: `load_best_model_at_end` kept the last weights). Here
    the FSDP units gather their full parameters (`summon_full_params`, written back to each rank's shard on exit)
    and PEFT loads into the module tree with the wrappers spliced out, as saving does."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    accelerator.wait_for_everyone()  # rank 0 wrote the file
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    peft_model = accelerator.unwrap_model(model)
    with FSDP.summon_full_params(model, writeback=True), nested_wrappers_spliced_out(peft_model):
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=peft_model.active_adapter)
    loaded = len(weights) - len(result.unexpected_keys)
    if not weights or result.unexpected_keys:
        raise AdapterLoadError(f"{adapter_dir}: {loaded} of {len(weights)} adapter tensors matched the model "
                               f"(unmatched: {', '.join(result.unexpected_keys[:3]) or '-'}); the best checkpoint "
                               "cannot be restored. Please report it with the versions of torch, peft and accelerate.")
    return loaded


class FSDPAdapterCheckpoints:
    """Trainer methods for a PEFT adapter under FSDP (version 1, the one configs/accelerate/fsdp_qlora.yaml runs):
    each checkpoint's adapter is the gathered one (`save_fsdp_adapter`), and `load_best_model_at_end` (early
    stopping) loads the best checkpoint's adapter back (`load_fsdp_adapter`). transformers' own FSDP path saves and
    loads through PEFT's key matching, which sees 0 adapter tensors under nested FSDP units. Other runs: unchanged."""

    def _fsdp_adapter(self) -> bool:
        from peft import PeftModel

        return (bool(getattr(self, "is_fsdp_enabled", False)) and not getattr(self.accelerator, "is_fsdp2", False)
                and isinstance(self.accelerator.unwrap_model(self.model), PeftModel))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._fsdp_adapter():
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        log.info("adapter: %s", save_fsdp_adapter(self.accelerator, self.model, Path(output_dir or self.args.output_dir)))

    def _load_best_model(self) -> None:
        if not self._fsdp_adapter():
            return super()._load_best_model()  # type: ignore[misc]
        best = Path(self.state.best_model_checkpoint)
        log.info("best checkpoint %s (%s %s): %d adapter tensors loaded", best, self.args.metric_for_best_model,
                 self.state.best_metric, load_fsdp_adapter(self.accelerator, self.model, best))


def save_adapter(trainer: SFTTrainer, run_dir: RunDir, method: str) -> None:
    """adapter/ as one loadable folder, checked to hold the trained weights before merge trusts it. Under FSDP the
    checkpoints stay sharded (fast); adapter/ is gathered on rank 0 (`save_fsdp_adapter`)."""
    gathered = ""
    if trainer.is_fsdp_enabled:
        gathered = save_fsdp_adapter(trainer.accelerator, trainer.model, run_dir.adapter)
        log.info("adapter: %s", gathered)
    else:
        trainer.save_model(str(run_dir.adapter))
    if method != "full" and trainer.is_world_process_zero() and not adapter_weight_names(run_dir.adapter):
        raise AdapterSaveError(f"{run_dir.adapter / 'adapter_model.safetensors'} was written without the trained "
                               f"adapter weights ({gathered or 'trainer.save_model'}); nothing to merge. Please report "
                               "it with the versions of torch, transformers, peft and accelerate.")
