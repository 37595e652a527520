"""The student as this machine can train it: its devices, the method (`qlora` needs a working 4-bit backend), the
precision `train.bf16` resolves to, the loaded model and the PEFT config of `train.method`."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from ragtune.core import precision
from ragtune.core.errors import UserFacingError
from ragtune.core.models import dense_copy, load_causal_lm, resolve_model
from ragtune.train.config import peft_config_class

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

log = logging.getLogger(__name__)


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def rank_device(device_type: str | None = None) -> str:
    """This process's own device: `cuda:LOCAL_RANK` (or `xpu:…`) on an accelerator, `cpu` without one.

    `accelerate launch`/torchrun give each rank the GPU of its LOCAL_RANK, but only once accelerate's state is
    made; a bare `cuda` before that is GPU 0, so every rank made a CUDA context there (8 on the GPU the teacher's
    vLLM may hold)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "xpu" if has_accelerator() else "cpu")
    return "cpu" if device_type == "cpu" else f"{device_type}:{int(os.environ.get('LOCAL_RANK', '0'))}"


def bnb_4bit_works(device: str | None = None) -> str | None:
    """None when bitsandbytes can quantize and run a 4-bit NF4 matmul on `device` (this rank's GPU, else the CPU),
    else the reason."""
    device = device or (rank_device("cuda") if torch.cuda.is_available() else "cpu")
    try:
        import bitsandbytes as bnb

        with torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext():
            weight = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
            packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
            out = bnb.matmul_4bit(torch.randn(2, 64, dtype=torch.bfloat16, device=device), packed.t(), quant_state=state)
        if not torch.isfinite(out).all():
            return "bitsandbytes 4-bit matmul returned non-finite values"
    except Exception as err:  # any failure here means "no working 4-bit backend"
        return f"{type(err).__name__}: {err}"
    return None


class QLoRAUnavailableError(UserFacingError, RuntimeError):
    """`method: qlora` on a machine whose bitsandbytes cannot run 4-bit, and no fallback was asked for."""


def resolve_method(method: str, qlora_fallback: str | None = None) -> tuple[str, dict[str, Any]]:
    """The method to run, and facts about it. `qlora` without a working 4-bit backend is an error, unless the
    config opts into `train.qlora_fallback: lora` (then the facts say what ran instead, and why)."""
    if method != "qlora":
        return method, {}
    problem = bnb_4bit_works()
    if problem is None:
        return method, {}
    if qlora_fallback == "lora":
        return "lora", {"qlora_fallback": {"ran": "lora", "cause": problem}}
    raise QLoRAUnavailableError(
        f"train.method: qlora needs a working bitsandbytes 4-bit backend, and this machine has none ({problem}). "
        "Install a bitsandbytes build for this machine (pip install -U bitsandbytes; on a GPU, one matching its "
        "CUDA), or set train.method: lora, or set train.qlora_fallback: lora to train LoRA here (recorded in "
        "the manifest).")


def load_student(config: "RagtuneConfig", method: str, gradient_checkpointing: bool, dtype: str) -> Any:
    """The student, 4-bit NF4 and prepared for k-bit training for `qlora`, else in `dtype`."""
    student = config.student
    common = dict(trust_remote_code=student.trust_remote_code, attn_implementation=student.attn_implementation,
                  device_map=student.device_map)
    if method != "qlora":
        return load_causal_lm(student.model, dtype=dtype, **common)
    from peft import prepare_model_for_kbit_training

    quantization = dict(config.train.quantization)
    # FSDP shards only float tensors of one dtype: store the packed 4-bit weights in the student's dtype
    # and keep every other weight in it too (no fp32 upcast), as in the bitsandbytes FSDP-QLoRA guide.
    sharded = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if sharded:
        quantization.setdefault("bnb_4bit_quant_storage", dtype)
    model = load_causal_lm(student.model, dtype=dtype, quantization=quantization, **common)
    if sharded:
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def peft_config(method: str, kwargs: dict[str, Any]) -> Any:
    """The PEFT config for `method` (None for full fine-tuning)."""
    return None if method == "full" else peft_config_class(method)(task_type="CAUSAL_LM", **kwargs)


def training_device(sft_kwargs: dict[str, Any]) -> str:
    """Where the Trainer will run: `cpu` when told (`use_cpu`) or when there is no accelerator."""
    if sft_kwargs.get("use_cpu") or not has_accelerator():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "xpu"


def precision_modes(method: str) -> tuple[str, ...]:
    """The formats `bf16: auto` chooses from: bf16 weights only for a frozen, unquantized base (full
    fine-tuning would update bf16 weights, and a 4-bit base has no dense weights to store in bf16)."""
    frozen_dense = method in ("lora", "dora", "prompt_tuning", "prefix_tuning")
    return precision.MODES if frozen_dense else (precision.FP32, precision.BF16_AUTOCAST)


def training_precision(config: "RagtuneConfig", method: str) -> dict[str, Any]:
    """`train.bf16` resolved: `bf16` for SFTConfig, `torch_dtype` to load the student in, and why.

    `true`/`false` are kept. `auto` (the default): on CUDA/XPU, bf16 autocast where the device supports it;
    on CPU, the fastest of `precision.MODES` in a GEMM probe of this student's layer shapes (cached per
    machine), unless `student.torch_dtype` is set to a 16-bit type, whose weights then train as they are
    (its `auto` is the probe's choice here too, as it is for a managed vLLM server's weights on CPU).
    """
    sft_kwargs = config.train.sft_kwargs()
    requested, device, student_dtype = sft_kwargs.get("bf16"), training_device(sft_kwargs), config.student.torch_dtype
    facts: dict[str, Any] = {"requested": requested, "device": device}
    if requested != "auto":
        return {**facts, "choice": "as configured", "bf16": requested, "torch_dtype": student_dtype}
    if device != "cpu":
        bf16 = precision.device_bf16(device)
        return {**facts, "choice": precision.BF16_AUTOCAST if bf16 else precision.FP32, "bf16": bf16,
                "torch_dtype": student_dtype, "reason": f"{device} {'supports' if bf16 else 'lacks'} bf16"}
    if "torch_dtype" in config.student.model_fields_set and student_dtype not in ("float32", "auto"):
        return {**facts, "choice": "student.torch_dtype", "bf16": False, "torch_dtype": student_dtype,
                "reason": f"student.torch_dtype is {student_dtype}; the weights train in it"}
    from transformers import AutoConfig

    model_ref = dense_copy(resolve_model(config.student.model), config.student.trust_remote_code)
    model_config = AutoConfig.from_pretrained(model_ref.name_or_path, trust_remote_code=config.student.trust_remote_code)
    probe = precision.probe(precision.linear_shapes(model_config), precision_modes(method))
    choice = precision.pick(probe["gflops"])
    probe_facts = {k: probe[k] for k in ("gflops", "stopped_early", "rows", "shapes", "passes", "settled", "seconds",
                                         "cached", "cpu", "isa", "torch", "threads", "cache_file")}
    # bf16_weights trains under autocast too: the fp32 adapters' GEMMs in bf16 (one demo epoch 125.6 s vs 139.7 s,
    # train/eval loss 0.2317/0.1235 vs 0.2303/0.1249, avx512_bf16 EPYC); bf16 weights leave autocast no other cast.
    return {**facts, "choice": choice, "bf16": choice in (precision.BF16_AUTOCAST, precision.BF16_WEIGHTS),
            "torch_dtype": "bfloat16" if choice == precision.BF16_WEIGHTS else "float32", "probe": probe_facts}


def method_and_precision(config: "RagtuneConfig") -> dict[str, Any]:
    """Facts for the manifest: the method this machine trains (`resolve_method`; a QLoRA fallback is also a
    warning), the CPU threads it takes, and the precision `train.bf16` resolves to (`training_precision`)."""
    train = config.train
    facts: dict[str, Any] = {"warnings": []}
    if torch.cuda.is_available():  # this rank's GPU before anything touches CUDA (the 4-bit and bf16 probes)
        torch.cuda.set_device(rank_device("cuda"))
    method, method_facts = resolve_method(train.method, train.qlora_fallback)
    if method_facts:
        cause = method_facts["qlora_fallback"]["cause"]
        facts["warnings"].append(f"method qlora has no working 4-bit backend here ({cause}); "
                                 "train.qlora_fallback: lora, so this run trains lora")
        log.warning(facts["warnings"][-1])
    facts.update(method=method, **method_facts)
    if training_device(train.sft_kwargs()) == "cpu":  # before the probe: its cache is keyed by the thread count
        facts["cpu_threads"] = precision.set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    facts["precision"] = training_precision(config, method)
    log.info("precision: %s", facts["precision"]["choice"])
    return facts
