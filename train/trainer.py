"""The SFTTrainer ragtune trains with: TRL's, scoring only the labelled positions through the LM head, adding
offline distillation's KL term when asked, and saving an FSDP adapter's checkpoints (`adapter`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from ragtune.core.errors import UserFacingError
from ragtune.train.adapter import FSDPAdapterCheckpoints
from ragtune.train.distillation_config import DistillationConfig
from ragtune.train.offline_distillation import (
    TEACHER_COLUMNS, TeacherLogprobsCollator, attach_teacher_logprobs, top_k_kl,
)


class LabelledPositionsSFTTrainer(FSDPAdapterCheckpoints, SFTTrainer):
    """`SFTTrainer` whose loss projects only the positions that have a label through the LM head, on CPU too.

    TRL's fused LM head scores just the labelled positions on Triton devices (CUDA/XPU) but every position,
    prompt and padding included, through a torch fallback elsewhere. RAG rows are mostly prompt (~85% of
    tokens), so on CPU that head took ~40% of a step (1 fwd+bwd, SmolLM2-135M LoRA, batch 8: 13.9 s vs 8.0 s).
    transformers' own `logits_to_keep` (a boolean mask) compacts the same way inside the model's forward, so
    DDP/FSDP/PEFT wrappers stay on the call path. The loss and the logged metrics keep TRL's definitions.
    Used only where TRL's path is not already compact and nothing else needs full logits.

    Right-padded rows (TRL's collators pad right) go in without their attention mask (`right_padded`): under causal
    attention a real token sees only earlier positions, all real, and no padded position is scored, so the loss and
    gradients are TRL's. Without a mask SDPA takes its causal kernel, which skips the blocks above the diagonal:
    0.70 instead of 0.89 s of attention per 640-token row (bf16, SmolLM2-135M's 30 layers, forward + backward), and
    an epoch of 16 rows of ~620 tokens (two 256-token chunks) in 30.3-34.7 s instead of 33.4-37.6 (3 alternations;
    AMD EPYC, avx512_bf16, 2 cores). On the demo's ~340-token rows the two were within noise.

    With `distillation` (offline) and `teacher_logprobs` (prep's records by row `source`), the training rows get
    their teacher's top-k (`attach_teacher_logprobs`) and the loss adds the KL term on every device; `eval_loss`
    stays the plain SFT loss, comparable with runs without distillation.
    """

    def __init__(self, *args: Any, distillation: DistillationConfig | None = None,
                 teacher_logprobs: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_config = getattr(self.model, "active_peft_config", None)
        compact = (
            self.args.loss_type == "nll"
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and self.accelerator.parallelism_config is None
            and not getattr(peft_config, "is_prompt_learning", False)
        )
        self.score_labelled_only = compact and self.args.device.type not in ("cuda", "xpu")
        self.distillation = distillation
        self.distillation_facts: dict[str, Any] = {}
        if distillation is not None and teacher_logprobs is not None:
            if not compact:
                raise UserFacingError("train.distillation scores the student on the answer tokens itself: it needs "
                                      "loss_type nll, no label smoothing and a LoRA/full method (not prompt or prefix "
                                      "tuning, not context parallelism).")
            self.train_dataset, self.distillation_facts = attach_teacher_logprobs(
                self.train_dataset, teacher_logprobs, self.processing_class, distillation.top_k)
            self.data_collator = TeacherLogprobsCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if getattr(self, "distillation", None) is not None and self._signature_columns is not None:
            self._signature_columns = [*self._signature_columns, *TEACHER_COLUMNS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        teacher = {key: inputs.pop(key) for key in TEACHER_COLUMNS if key in inputs}
        # evaluation that reads only the loss (`Trainer.evaluate` without compute_metrics: prediction_loss_only) needs
        # no full logits either: the demo's 3 evaluations of 9 rows took 5.5 s each with them
        loss_only = return_outputs and not model.training and self.compute_metrics is None
        if (return_outputs and not loss_only) or not (self.score_labelled_only or teacher):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        # logits[:, t] predicts labels[:, t + 1]: keep position t when token t + 1 is trained.
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        targets = labels[:, 1:][keep[:, :-1]]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if right_padded(model_inputs.get("attention_mask")):
            del model_inputs["attention_mask"]
        logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits.float()
        num_tokens = targets.numel() if num_items_in_batch is None else num_items_in_batch
        loss = F.cross_entropy(logits, targets, reduction="sum") / torch.as_tensor(num_tokens).clamp(min=1)
        if teacher and mode == "train":  # eval_loss stays the plain SFT loss
            loss = loss + self._distillation_loss(logits, teacher, targets.numel(), num_tokens, mode)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks, as in TRL

        with torch.no_grad():
            log_probs = logits.log_softmax(-1)
            entropy_sum = -(log_probs.exp() * log_probs).sum()
            correct = (logits.argmax(-1) == targets).sum()
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(torch.tensor(targets.numel(), device=logits.device)).sum()
        entropy_sum, correct = gather(entropy_sum).sum(), gather(correct).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            # Non-padding tokens; padding-free batches carry position_ids instead of an attention mask.
            mask = inputs.get("attention_mask")
            seen = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1), device=logits.device)
            self._total_train_tokens += gather(seen).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, {"logits": logits}) if return_outputs else loss

    def _distillation_loss(self, logits: torch.Tensor, teacher: dict[str, torch.Tensor], trained: int,
                           num_tokens: Any, mode: str) -> torch.Tensor:
        """alpha * T^2 * KL summed over the trained tokens that have a teacher, over the SFT loss's token count;
        logs the mean KL per such token as `kd_loss` (T^2 keeps the gradient's scale at any temperature, as in
        Hinton et al.)."""
        ids, logprobs = teacher["teacher_ids"], teacher["teacher_logprobs"]
        if ids.shape[0] != trained:
            raise RuntimeError(f"the batch has {trained} trained tokens but {ids.shape[0]} teacher positions: the "
                               "teacher columns no longer follow TRL's labels (a collator or truncation change?)")
        temperature = self.distillation.temperature
        kl_sum, positions = top_k_kl(logits, ids, logprobs, temperature)
        gather = self.accelerator.gather_for_metrics
        kl_total, positions_total = gather(kl_sum.detach()).sum(), gather(positions).sum()
        if positions_total > 0:
            self._metrics[mode]["kd_loss"].append((kl_total / positions_total).item())
        return self.distillation.alpha * temperature**2 * kl_sum / torch.as_tensor(num_tokens).clamp(min=1)


def right_padded(mask: torch.Tensor | None) -> bool:
    """Whether every row of a 2D attention mask is ones followed by zeros: padding only after the row's tokens."""
    if mask is None or mask.dim() != 2:
        return False
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return bool(((positions < mask.sum(-1, keepdim=True)) == mask.bool()).all())
