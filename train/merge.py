"""Fold the trained adapter into the student's weights: adapter/ -> merged/ (plain transformers model).

`merge_and_unload` runs on a 16-bit or fp32 copy of the base, never on a 4-bit one (folding LoRA into
NF4 weights would re-quantize them, the classic QLoRA merge bug); a QLoRA adapter is merged onto the
unquantized base. The merge is verified on the saved files: `merged/` reloaded with plain
`AutoModelForCausalLM.from_pretrained` must give the same logits as base + `adapter/` through
`PeftModel.from_pretrained` on a few training prompts; the largest difference goes to the manifest and
the stage fails above the tolerance for the merge dtype.

Prompt and prefix tuning add virtual tokens at inference time: there are no weights to fold them into,
so they are served as base + adapter/ and this stage says so.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import iter_jsonl
from ragtune.core.errors import UserFacingError
from ragtune.core.models import adapter_weight_names, dense_copy, load_causal_lm, resolve_model
from ragtune.core.run_dir import RunDir

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig
    from ragtune.core.roles import StudentConfig

log = logging.getLogger(__name__)

# Largest allowed |logit difference| between merged/ and base + adapter/, per merge dtype. fp32 merges differ
# only by summation order (~1e-5); bf16/fp16 round W + BA to 8/11 mantissa bits.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
NUM_PROMPTS = 4
NOT_MERGEABLE = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}


class MergeError(UserFacingError, RuntimeError):
    """The merge cannot run, or merged/ disagrees with base + adapter/ beyond tolerance."""


def merge_dtype(student_dtype: str) -> str:
    """Keep a 16-bit student in its dtype; `auto` and anything else merge in fp32."""
    return student_dtype if student_dtype in ("bfloat16", "float16") else "float32"


def merge_device_map(student: "StudentConfig", dtype: str) -> str | None:
    """`student.device_map` when set; else the first GPU when the base in `dtype` fits in its free memory with
    room for the merge (x1.3); else None (CPU). Counted on an empty (meta-device) copy, so nothing loads twice."""
    import torch

    if student.device_map:
        return student.device_map
    if not torch.cuda.is_available():
        return None
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = dense_copy(resolve_model(student.model), student.trust_remote_code)
    model_config = AutoConfig.from_pretrained(ref.name_or_path, trust_remote_code=student.trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model_config, trust_remote_code=student.trust_remote_code)
    need = sum(p.numel() for p in empty.parameters()) * torch.finfo(getattr(torch, dtype)).bits // 8
    free, _ = torch.cuda.mem_get_info()
    return "cuda:0" if 1.3 * need < free else None


def verification_prompts(run_dir: RunDir, tokenizer: Any) -> list[str]:
    """A few prompts the adapter was trained on (rendered with the chat template), else fixed ones."""
    prompts: list[str] = []
    if run_dir.train_jsonl.exists():
        for _, row in iter_jsonl(run_dir.train_jsonl, tolerate_torn_tail=True):
            messages = [m for m in row.get("messages", []) if isinstance(m, dict)]
            if len(messages) >= 2:
                prompts.append(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
            if len(prompts) == NUM_PROMPTS:
                break
    return prompts or ["The capital of France is", "Question: what does a 10-K report contain?\nAnswer:"]


def logits_for(model: Any, tokenizer: Any, prompts: list[str]) -> list[Any]:
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False, truncation=True, max_length=512)
            ids = {k: v.to(model.device) for k, v in ids.items()}
            out.append(model(**ids).logits.float().cpu())
    return out


def run(config: "RagtuneConfig", run_dir: RunDir) -> dict[str, Any]:
    """Merge adapter/ into the base and save merged/ (safetensors + tokenizer + chat template); returns facts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_config = run_dir.adapter / "adapter_config.json"
    if not adapter_config.exists():
        if (run_dir.adapter / "config.json").exists():
            return {"merged": False, "reason": "method full: adapter/ already holds the complete model; load it "
                    "with AutoModelForCausalLM.from_pretrained(adapter/)."}
        raise MergeError(f"{run_dir.adapter}: no trained adapter found. Run `ragtune train CONFIG` first.")
    peft_type = json.loads(adapter_config.read_text(encoding="utf-8")).get("peft_type", "")
    if peft_type in NOT_MERGEABLE:
        return {"merged": False, "reason": f"{peft_type.lower()} adds virtual tokens at inference and has no weights "
                "to merge; use base + adapter/ (PeftModel.from_pretrained)."}

    if not adapter_weight_names(run_dir.adapter):
        raise MergeError(f"{run_dir.adapter / 'adapter_model.safetensors'} holds no adapter weights, so merged/ would "
                         "equal the base model. Train again (`ragtune train CONFIG`); under FSDP, see the train log.")
    student = config.student
    dtype = merge_dtype(student.torch_dtype)
    # The tokenizer saved with the adapter is the one training used (chat template included).
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir.adapter), trust_remote_code=student.trust_remote_code)
    prompts = verification_prompts(run_dir, tokenizer)

    device_map = merge_device_map(student, dtype)
    base = load_causal_lm(student.model, dtype=dtype, device_map=device_map, trust_remote_code=student.trust_remote_code)
    with_adapter = PeftModel.from_pretrained(base, str(run_dir.adapter))
    with_adapter.eval()
    reference = logits_for(with_adapter, tokenizer, prompts)
    merged = with_adapter.merge_and_unload()
    merged.save_pretrained(str(run_dir.merged), safe_serialization=True)
    tokenizer.save_pretrained(str(run_dir.merged))
    del merged, with_adapter, base

    reloaded = AutoModelForCausalLM.from_pretrained(str(run_dir.merged), dtype=dtype, device_map=device_map,
                                                    trust_remote_code=student.trust_remote_code)
    reloaded.eval()
    max_diff = max(float((a - b).abs().max()) for a, b in zip(reference, logits_for(reloaded, tokenizer, prompts)))
    tolerance = TOLERANCE[dtype]
    facts = {"merged": True, "peft_type": peft_type, "dtype": dtype, "device": str(reloaded.device),
             "prompts_checked": len(prompts),
             "max_abs_logit_diff": max_diff, "tolerance": tolerance, "path": str(run_dir.merged)}
    if not max_diff <= tolerance:
        raise MergeError(
            f"merged/ disagrees with base + adapter/: max |logit diff| {max_diff:.4g} > {tolerance} ({dtype}) on "
            f"{len(prompts)} prompts. Do not use {run_dir.merged}; serve base + adapter/ instead and report this."
        )
    log.info("merge verified: max |logit diff| %.3g over %d prompts", max_diff, len(prompts))
    return facts
