"""Supervised fine-tuning of the student on `data/train.jsonl` with TRL's `SFTTrainer`.

The recipe, top to bottom (alignment-handbook `sft.py` style):

1. Rows. data_prep writes chat rows `{"messages": [system, user, assistant], "meta": ...}`. SmolLM2's
   chat template has no `{% generation %}` markers, so TRL's `assistant_only_loss` refuses it; instead each
   row becomes TRL's conversational prompt-completion form (`prompt`: every message before the final
   assistant turn, `completion`: that turn). TRL then tokenizes `prompt` with the generation prompt and
   `prompt + completion` in full, and trains every token after the prompt: the answer, its end-of-turn
   token (`<|im_end|>`) and the template's trailing newline (trl/trainer/sft_trainer.py, `tokenize_fn`).
2. Validation rows: `train.validation_file`, or a seeded `train.validation_split` fraction.
3. Model: the student (4-bit NF4 for `qlora`, then `prepare_model_for_kbit_training`) and the PEFT
   config of `train.method` (`train.peft` over `PEFT_DEFAULTS`).
4. `SFTConfig(**config.train.sft_kwargs(), output_dir=checkpoints/, ...)`: the YAML's `train:` keys are
   SFTConfig's names; ragtune's defaults (`SFT_DEFAULTS`) fill in the rest.
5. Label check on TRL's own tokenized rows and collator: every row must train at least one answer token
   and the end-of-turn token; one example is printed with trained tokens in `[[...]]`.
6. Train (resuming from the latest checkpoint when `auto_resume`), then save `adapter/` (adapter +
   tokenizer) and the loss curve (`logs/loss_curve.json`).

`train.distillation` (soft labels, `DistillationConfig`): offline, each training row's stored teacher top-k
log-probs (data/teacher_logprobs.jsonl) are matched to its trained tokens by token id and the loss adds
alpha * T^2 * KL(teacher || student) on them (`top_k_kl`, logged as `kd_loss`); online, the student answers the
prompts itself and TRL's DistillationTrainer (GKDTrainer on older TRL) teaches it on its own answers
(`online_distillation`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from ragtune.core import precision
from ragtune.core.artifacts import ArtifactError, iter_jsonl, write_json
from ragtune.core.errors import UserFacingError
from ragtune.core.llm import check_same_tokenizer
from ragtune.core.models import adapter_weight_names, dense_copy, load_causal_lm, load_tokenizer, resolve_model
from ragtune.core.run_dir import RunDir, check_shared_folder, sha256_file
from ragtune.train.config import GKD_TRAINER, DistillationConfig, held_out_count, peft_config_class
from ragtune.train.data_stats import describe_rows

log = logging.getLogger(__name__)

CHECK_OPEN, CHECK_CLOSE = "[[", "]]"


class TrainDataError(UserFacingError, ValueError):
    """A training row that cannot be trained on; names the file and line."""


class LabelCheckError(UserFacingError, ValueError):
    """The tokenized rows would not train the answer or its end-of-turn token; names the rows."""


# --------------------------------------------------------------------------------------------------- rows


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read chat rows and turn them into TRL prompt-completion rows; `source` keeps `file:line` for errors."""
    if not path.is_file():
        raise TrainDataError(f"{path}: training data not found. Run `ragtune prep CONFIG` first (it writes this file).")
    rows = []
    try:
        for number, row in iter_jsonl(path):
            rows.append(to_prompt_completion(row, f"{path}:{number}"))
    except ArtifactError as err:
        raise TrainDataError(str(err)) from None
    if not rows:
        raise TrainDataError(f"{path}: no rows. Run `ragtune prep CONFIG` to produce training rows.")
    return rows


def to_prompt_completion(row: dict[str, Any], source: str) -> dict[str, Any]:
    """`messages` -> `prompt` (all turns before the last) + `completion` ([last assistant turn]); `meta` dropped."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TrainDataError(f"{source}: expected `messages`, a list of chat turns; got {type(messages).__name__}.")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
                and isinstance(message.get("content"), str)):
            raise TrainDataError(
                f"{source}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}; got {message!r:.120}.")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise TrainDataError(f"{source}: the last message must be the assistant's answer, after at least one prompt turn.")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": turns[:-1], "completion": turns[-1:], "source": source}


def split_rows(rows: list[dict[str, Any]], validation_split: float, validation_file: Path | None, seed: int
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Held-out rows for eval loss: the validation file when given, else a seeded fraction (at least one row)."""
    if validation_file is not None:
        return rows, load_rows(validation_file)
    n_eval = held_out_count(len(rows), validation_split)
    if not n_eval:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# -------------------------------------------------------------------------------------------------- model


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


def load_student(config: Any, method: str, gradient_checkpointing: bool, dtype: str) -> Any:
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


# ---------------------------------------------------------------------------------------------- precision


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


def training_precision(config: Any, method: str) -> dict[str, Any]:
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
    probe_facts = {k: probe[k] for k in ("gflops", "stopped_early", "rows", "shapes", "seconds", "cached", "cpu",
                                         "isa", "torch", "threads", "cache_file")}
    return {**facts, "choice": choice, "bf16": choice == precision.BF16_AUTOCAST,
            "torch_dtype": "bfloat16" if choice == precision.BF16_WEIGHTS else "float32", "probe": probe_facts}


# ----------------------------------------------------------------------------------------------- SFTConfig


def sft_config(config: Any, run_dir: RunDir, has_eval: bool, bf16: bool | None) -> Any:
    """`SFTConfig` from the `train:` keys, placed in the run directory, with the choices they imply
    (`bf16`: the resolved `train.bf16`, see `training_precision`). Online distillation: the online trainer's TRL
    config (`online_distillation.online_args`) with the same keys."""
    from trl import SFTConfig

    distillation = config.train.distillation
    train = config.train
    given = set(train.model_extra or {})
    kwargs = train.sft_kwargs()
    kwargs.setdefault("seed", config.seed)
    kwargs.setdefault("data_seed", kwargs["seed"])
    # Loss on the completion (the answer + end-of-turn) only; the label check verifies it.
    kwargs["completion_only_loss"] = True
    kwargs["bf16"] = bf16
    kwargs["gradient_accumulation_steps"] = train.batch(world_size())["gradient_accumulation_steps"]
    if train.method != "full":
        # transformers asks DDP to find unused parameters for any model that is not a PreTrainedModel, and a PeftModel
        # is not one: a search of the autograd graph after every forward, for nothing (a PEFT method's trainable
        # weights are all on the forward path), which also breaks reentrant activation checkpointing ("marked ready
        # twice"). transformers sets False for its own models under checkpointing; the YAML's value wins.
        kwargs.setdefault("ddp_find_unused_parameters", False)
    if not has_accelerator():
        # Without `use_cpu`, TrainingArguments rejects bf16 on CPU and multi-process CPU runs stay single-process.
        kwargs.setdefault("use_cpu", True)
    if not has_eval:
        if kwargs.get("eval_strategy", "no") != "no" and "eval_strategy" in given:
            log.warning("train.eval_strategy is set but there are no validation rows; evaluation is off.")
        kwargs["eval_strategy"] = "no"
        kwargs.pop("eval_steps", None)
    if train.early_stopping_patience:
        if not has_eval:
            raise TrainDataError(f"{run_dir.train_jsonl}: too few rows to hold any out for the eval loss that "
                                 "train.early_stopping_patience watches; add rows or set train.validation_file.")
        kwargs.setdefault("load_best_model_at_end", True)
        kwargs.setdefault("metric_for_best_model", "eval_loss")
        kwargs.setdefault("greater_is_better", False)
        if "save_strategy" not in given:
            kwargs["save_strategy"] = kwargs["eval_strategy"]
            if kwargs.get("eval_steps"):
                kwargs["save_steps"] = kwargs["eval_steps"]
    kwargs.pop("resume_from_checkpoint", None)
    if distillation is not None and distillation.mode == "online":
        from ragtune.train.online_distillation import online_args

        return online_args(distillation, str(run_dir.checkpoints), kwargs)
    return SFTConfig(output_dir=str(run_dir.checkpoints), **kwargs)


def world_size() -> int:
    """The number of training processes `accelerate launch`/torchrun started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def latest_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` that was written completely (a killed save lacks trainer_state.json)."""
    if not folder.is_dir():
        return None
    steps = {int(p.name.split("-")[-1]): p for p in folder.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()}
    return str(steps[max(steps)]) if steps else None


def resume_point(config: Any, run_dir: RunDir, method: str, accelerator: Any) -> str | None:
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


# -------------------------------------------------------------------------------------------------- trainer


class LabelledPositionsSFTTrainer(FSDPAdapterCheckpoints, SFTTrainer):
    """`SFTTrainer` whose loss projects only the positions that have a label through the LM head, on CPU too.

    TRL's fused LM head scores just the labelled positions on Triton devices (CUDA/XPU) but every position,
    prompt and padding included, through a torch fallback elsewhere. RAG rows are mostly prompt (~85% of
    tokens), so on CPU that head took ~40% of a step (1 fwd+bwd, SmolLM2-135M LoRA, batch 8: 13.9 s vs 8.0 s).
    transformers' own `logits_to_keep` (a boolean mask) compacts the same way inside the model's forward, so
    DDP/FSDP/PEFT wrappers stay on the call path. The loss and the logged metrics keep TRL's definitions.
    Used only where TRL's path is not already compact and nothing else needs full logits.

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
        if return_outputs or not (self.score_labelled_only or teacher):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        # logits[:, t] predicts labels[:, t + 1]: keep position t when token t + 1 is trained.
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        targets = labels[:, 1:][keep[:, :-1]]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits.float()
        num_tokens = targets.numel() if num_items_in_batch is None else num_items_in_batch
        loss = F.cross_entropy(logits, targets, reduction="sum") / torch.as_tensor(num_tokens).clamp(min=1)
        if teacher:
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
        return loss

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


# ------------------------------------------------------------------------------------------------ distillation

TEACHER_COLUMNS = ("teacher_ids", "teacher_logprobs")


def top_k_kl(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) at `temperature` over the teacher's top-k tokens, summed over the positions that have
    a teacher (a row of -inf has none), and the number of those positions. As axolotl's kd plugin: the teacher's
    top-k are renormalised over themselves, the student's log-probs are over the whole vocabulary (so mass it puts
    outside the teacher's top-k costs too). `logits`: [N, vocab]; `teacher_*`: [N, k], -inf where there is none."""
    has = torch.isfinite(teacher_logprobs).any(-1)
    valid = torch.isfinite(teacher_logprobs[has])
    student = (logits[has] / temperature).log_softmax(-1).gather(-1, teacher_ids[has])
    teacher = (teacher_logprobs[has].float() / temperature).log_softmax(-1)
    kl = torch.where(valid, teacher.exp() * (teacher - student), torch.zeros_like(student))
    return kl.sum(), has.sum()


class TeacherLogprobsCollator:
    """TRL's collator, plus the rows' teacher top-k as `teacher_ids`/`teacher_logprobs` tensors of shape [trained
    tokens of the batch, k] in the order of the labels (-inf: no teacher at that token). Rows without the
    columns (validation, the label check) collate as before."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator([{k: v for k, v in e.items() if k not in TEACHER_COLUMNS} for e in examples])
        if not all(TEACHER_COLUMNS[0] in e for e in examples):
            return batch
        ids = [position for e in examples for position in e["teacher_ids"]]
        logprobs = [position for e in examples for position in e["teacher_logprobs"]]
        k = max((len(position) for position in ids), default=1) or 1
        batch["teacher_ids"] = torch.zeros(len(ids), k, dtype=torch.long)
        batch["teacher_logprobs"] = torch.full((len(ids), k), float("-inf"))
        for row, (position_ids, position_logprobs) in enumerate(zip(ids, logprobs)):
            batch["teacher_ids"][row, : len(position_ids)] = torch.tensor(position_ids, dtype=torch.long)
            batch["teacher_logprobs"][row, : len(position_logprobs)] = torch.tensor(position_logprobs)
        return batch


def load_teacher_logprobs(run_dir: RunDir) -> dict[str, dict[str, Any]]:
    """Prep's teacher records by the `source` (`train.jsonl:line`) of the row they belong to."""
    path = run_dir.teacher_logprobs
    if not path.is_file():
        raise TrainDataError(f"{path}: not found. Offline train.distillation learns from the teacher's top-k "
                             "log-probs that prep stores: set data_prep.teacher_top_logprobs (e.g. 20) and run prep "
                             "again (its teacher answers are redone), or use train.distillation.mode: online.")
    try:
        by_id = {record["id"]: record for _, record in iter_jsonl(path)}
        return {f"{run_dir.train_jsonl}:{number}": by_id[row["id"]] for number, row in iter_jsonl(run_dir.train_jsonl)
                if row.get("id") in by_id}
    except (ArtifactError, KeyError) as err:
        raise TrainDataError(f"{path}: unreadable teacher log-probs ({err}). Run prep again.") from None


def _token_id(token: int | str, vocab: dict[str, int], tokenizer: Any) -> int | None:
    """A stored teacher token as an id: ids as they are; an endpoint's token text through the vocabulary, or when
    it encodes to exactly one token."""
    if isinstance(token, int):
        return token
    if token in vocab:
        return vocab[token]
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def teacher_targets(trained: list[int], record: dict[str, Any], stop_ids: set[int], top_k: int | None,
                    vocab: dict[str, int], tokenizer: Any) -> tuple[list[list[int]], list[list[float]]] | None:
    """Per trained token of a row, its teacher's top-k ids and log-probs, where the teacher generated that very
    token at that place: the teacher's tokens must equal the row's trained tokens (by id) at least up to the
    answer's end-of-turn token. None when they do not (another tokenization of the text, a cut answer). Prep strips
    the answer's text, so a first teacher token that differs only by its whitespace (" The" for "The") is allowed,
    without a teacher there."""
    tokens = [_token_id(t, vocab, tokenizer) for t in record["tokens"]]
    start = 0
    if (trained and tokens and tokens[0] is not None and trained[0] != tokens[0]
            and tokenizer.decode([tokens[0]]).strip() == tokenizer.decode([trained[0]]).strip()):
        start = 1
    common = start
    while common < min(len(trained), len(tokens)) and trained[common] == tokens[common]:
        common += 1
    answer = next((i for i, t in enumerate(trained) if t in stop_ids), len(trained))
    if common < answer:
        return None
    ids, logprobs = [], []
    for position in range(len(trained)):
        pairs = []
        if start <= position < common:
            top = zip(record["top_tokens"][position][:top_k], record["top_logprobs"][position][:top_k])
            pairs = [(i, lp) for i, lp in ((_token_id(t, vocab, tokenizer), lp) for t, lp in top) if i is not None]
        ids.append([i for i, _ in pairs])
        logprobs.append([lp for _, lp in pairs])
    return ids, logprobs


def attach_teacher_logprobs(dataset: Any, records: dict[str, dict[str, Any]], tokenizer: Any, top_k: int | None
                            ) -> tuple[Any, dict[str, Any]]:
    """TRL's tokenized training rows with `teacher_ids`/`teacher_logprobs` columns (one entry per trained token),
    and counts: rows whose teacher tokens do not align are trained without the KL term and named, never dropped
    silently; with none aligned, distillation has nothing to learn from and stops."""
    stop_ids, vocab = end_of_turn_ids(tokenizer), tokenizer.get_vocab()
    ids_column, logprobs_column = [], []
    aligned, misaligned, without, positions = 0, [], 0, 0
    for row in dataset:
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        record = records.get(row["source"])
        targets = teacher_targets(trained, record, stop_ids, top_k, vocab, tokenizer) if record else None
        if record is None:
            without += 1
        elif targets is None:
            misaligned.append(row["source"])
        else:
            aligned += 1
            positions += sum(1 for ids in targets[0] if ids)
        ids, logprobs = targets or ([[] for _ in trained], [[] for _ in trained])
        ids_column.append(ids)
        logprobs_column.append(logprobs)
    facts = {"rows": len(ids_column), "aligned_rows": aligned, "misaligned_rows": len(misaligned),
             "rows_without_logprobs": without, "teacher_positions": positions, "misaligned": misaligned[:20]}
    if misaligned:
        log.warning("distillation: %d of %d rows' teacher tokens do not match their tokenized answers (trained "
                    "without the KL term): %s", len(misaligned), len(ids_column), ", ".join(misaligned[:5]))
    if without:
        log.info("distillation: %d rows have no teacher log-probs (closed-book rows, or prep without them)", without)
    if not aligned:
        raise TrainDataError(f"train.distillation: no training row's teacher tokens align with its tokenized answer "
                             f"({len(misaligned)} misaligned, {without} without log-probs, e.g. "
                             f"{(misaligned or ['-'])[0]}). Check that prep ran with this teacher and "
                             "data_prep.teacher_top_logprobs, then run prep again.")
    dataset = dataset.add_column(TEACHER_COLUMNS[0], ids_column).add_column(TEACHER_COLUMNS[1], logprobs_column)
    return dataset, facts


# ---------------------------------------------------------------------------------------------- label check


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an assistant turn: EOS, and the added token the chat template puts right after the answer."""
    ids = {tokenizer.eos_token_id} - {None}
    marker = "ragtune-answer"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text[text.index(marker) + len(marker):].lstrip()
    for token, token_id in tokenizer.get_added_vocab().items():
        if token and tail.startswith(token):
            ids.add(token_id)
    return ids


def mark_trained(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The decoded row with each run of trained tokens wrapped in [[...]]."""
    parts, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(input_ids[start:i])
            parts.append(f"{CHECK_OPEN}{text}{CHECK_CLOSE}" if labels[start] != -100 else text)
            start = i
    return "".join(parts)


def check_labels(trainer: Any, rows: dict[str, list[dict[str, Any]]], *, show: bool = True) -> dict[str, Any]:
    """Check the labels TRL built: every row trains an answer token and the end-of-turn token.

    Runs on `trainer.train_dataset`/`eval_dataset` (tokenized by TRL) through `trainer.data_collator`,
    so it checks exactly what training sees (with `packing`: TRL's preparation of the rows, unpacked).
    Raises LabelCheckError naming the train.jsonl lines; returns counts and one decoded example with
    trained tokens in [[...]].
    """
    from datasets import Dataset

    tokenizer = trainer.processing_class
    stop_ids = end_of_turn_ids(tokenizer)
    prepared = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    if trainer.args.packing:
        # Packed rows lose their identity; check the same TRL preparation, unpacked, row by row.
        prepared = {split: trainer._prepare_dataset(Dataset.from_list(split_rows), tokenizer, trainer.args, False, None,
                                                    f"{split} (label check)")
                    for split, split_rows in rows.items() if split_rows}
    problems: list[str] = []
    example, trained_tokens, total_tokens, checked = None, 0, 0, 0
    for split, dataset in prepared.items():
        if dataset is None:
            continue
        seen = set()
        for item in dataset:
            seen.add(item["source"])
            batch = trainer.data_collator([{"input_ids": item["input_ids"], "labels": item["labels"]}])
            input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
            trained = [t for t, label in zip(input_ids, labels) if label != -100]
            checked += 1
            total_tokens += len(input_ids)
            trained_tokens += len(trained)
            answer = tokenizer.decode([t for t in trained if t not in stop_ids], skip_special_tokens=True).strip()
            if not answer:
                problems.append(f"{item['source']}: no answer token is trained (empty assistant answer?).")
            elif not stop_ids & set(trained):
                stop_tokens = tokenizer.convert_ids_to_tokens(sorted(stop_ids))
                problems.append(f"{item['source']}: the end-of-turn token {stop_tokens} is not trained "
                                f"(answer cut by max_length={trainer.args.max_length}?).")
            if example is None and answer:
                example = mark_trained(tokenizer, input_ids, labels)
        # TRL drops rows whose labels are all masked after truncation (the prompt alone fills max_length).
        for row in rows[split]:
            if row["source"] not in seen:
                problems.append(f"{row['source']}: the prompt fills max_length={trainer.args.max_length}; "
                                "no token of it is trained (TRL dropped the row).")
    if show and example and trainer.is_world_process_zero():
        print(f"label check: one training row as the model sees it, trained tokens in {CHECK_OPEN}...{CHECK_CLOSE}:")
        print(f"{example}\n")
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise LabelCheckError(
            f"label check failed for {len(problems)} of {checked} rows:\n  {listed}\n"
            "Fix or remove these rows (or raise train.max_length), then run again."
        )
    return {"rows_checked": checked, "tokens": total_tokens, "trained_tokens": trained_tokens,
            "end_of_turn_tokens": tokenizer.convert_ids_to_tokens(sorted(stop_ids)), "example": example}


# ------------------------------------------------------------------------------------------------------ run


def build_trainer(config: Any, run_dir: RunDir) -> tuple[Any, dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The SFTTrainer for this config, facts about the choices made (method, warnings), and the train/eval rows."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    train = config.train
    validation_file = Path(train.validation_file) if train.validation_file else None
    if validation_file is not None and not validation_file.is_absolute() and config.config_path is not None:
        validation_file = config.config_path.parent / validation_file
    rows = load_rows(run_dir.train_jsonl)
    train_rows, eval_rows = split_rows(rows, train.validation_split, validation_file, config.seed)
    distillation, teacher_logprobs = train.distillation, None
    if distillation is not None:  # before any model loads: a wrong teacher or missing log-probs fail in seconds
        check_same_tokenizer(distillation.teacher_tokenizer or config.teacher.model, config.student.model,
                             config.student.trust_remote_code)
        if distillation.mode == "offline":
            teacher_logprobs = load_teacher_logprobs(run_dir)

    facts: dict[str, Any] = {"requested_method": train.method, "warnings": [], "batch": train.batch(world_size())}
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

    args = sft_config(config, run_dir, has_eval=bool(eval_rows), bf16=facts["precision"]["bf16"])
    # TensorBoard's writer reads its folder from this variable (transformers' TensorBoardCallback).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir.logs / "tensorboard")
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:  # transformers before the rename (train.config.OLD_SFT_NAMES)
        checkpointing = args.gradient_checkpointing
    model = load_student(config, method, checkpointing, facts["precision"]["torch_dtype"])
    tokenizer = load_tokenizer(config.student.model, trust_remote_code=config.student.trust_remote_code)
    callbacks = [EarlyStoppingCallback(train.early_stopping_patience)] if train.early_stopping_patience else []
    if distillation is not None and distillation.mode == "online":
        from ragtune.train.online_distillation import build_online_trainer

        trainer, facts["distillation"] = build_online_trainer(config, args, model, tokenizer, train_rows, eval_rows,
                                                              peft_config(method, train.peft_kwargs()), callbacks)
        log.info("online distillation: %s (%s)", facts["distillation"]["trainer"], facts["distillation"]["why"])
        facts.update(train_rows=len(train_rows), eval_rows=len(eval_rows),
                     loaded_in_4bit=bool(getattr(model, "is_loaded_in_4bit", False)))
        return trainer, facts, {"train": train_rows, "eval": eval_rows}
    trainer = LabelledPositionsSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config(method, train.peft_kwargs()),
        callbacks=callbacks,
        distillation=distillation,
        teacher_logprobs=teacher_logprobs,
    )
    if distillation is not None:
        facts["distillation"] = {**distillation.model_dump(mode="json", exclude={"gkd"}), **trainer.distillation_facts}
    facts.update(train_rows=len(train_rows), eval_rows=len(eval_rows),
                 loaded_in_4bit=bool(getattr(model, "is_loaded_in_4bit", False)))
    return trainer, facts, {"train": train_rows, "eval": eval_rows}


def run(config: Any, run_dir: RunDir, check_only: bool = False) -> dict[str, Any]:
    """Fine-tune the student on data/train.jsonl; returns facts for the manifest.

    Writes checkpoints/ (resumable), adapter/ (PEFT adapter or full model, plus tokenizer),
    logs/tensorboard/ and logs/loss_curve.json. `check_only` stops after the label check.
    """
    trainer, facts, rows = build_trainer(config, run_dir)
    check_shared_folder(run_dir.root)  # several nodes: every rank must see the folder rank 0 writes
    distillation = config.train.distillation
    online = distillation is not None and distillation.mode == "online"
    if not online:  # the online trainers tokenize in their collators (or generate the answers): nothing to check
        label_check = check_labels(trainer, rows)  # first: it names the row whose answer or end of turn is lost
        facts["label_check"] = {k: v for k, v in label_check.items() if k != "example"}
    # DistillationTrainer cuts no row (no max_length): its answers are the student's own, max_completion_length long
    cuts_rows = not online or facts["distillation"]["trainer"] == GKD_TRAINER
    facts["data"] = check_lengths(config, run_dir, trainer.is_world_process_zero(), cuts_rows)
    if check_only:
        return facts

    resume = (config.train.model_extra or {}).get("resume_from_checkpoint")
    if resume is None and config.train.auto_resume:
        if trainer.is_fsdp_enabled and facts["method"] != "full":
            # transformers resumes from the sharded checkpoint state (accelerate's save_fsdp_model, adapter_only),
            # which the same PEFT name matching left without an adapter key (0 on CPU with gloo): start over.
            facts["warnings"].append("auto_resume is off under FSDP with a PEFT adapter: transformers resumes from the "
                                     "sharded checkpoint state, which holds no adapter weights (PEFT's key matching "
                                     "misses nested FSDP units); training starts over")
            log.warning(facts["warnings"][-1])
        else:
            resume = resume_point(config, run_dir, facts["method"], trainer.accelerator)
    if resume:
        log.info("resuming from %s", resume)
    facts["resumed_from"] = resume
    result = trainer.train(resume_from_checkpoint=resume)

    save_adapter(trainer, run_dir, facts["method"])
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(run_dir.adapter))
        write_loss_curve(trainer.state.log_history, run_dir.loss_curve)
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    facts.update(
        global_step=trainer.state.global_step,
        epochs=round(trainer.state.epoch or 0, 3),
        train_loss=round(result.training_loss, 5),
        eval_loss=round(eval_losses[-1], 5) if eval_losses else None,
        best_eval_loss=round(min(eval_losses), 5) if eval_losses else None,
        train_seconds=round(result.metrics.get("train_runtime", 0.0), 2),
        # TRL's running count of non-padding input tokens, summed over processes.
        tokens_seen=int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0)),
        world_size=trainer.args.world_size,
        adapter=str(run_dir.adapter),
        loss_curve=str(run_dir.loss_curve),
    )
    return facts


def check_lengths(config: Any, run_dir: RunDir, write: bool, cuts_rows: bool = True) -> dict[str, Any]:
    """Token statistics of data/train.jsonl (logs/data_stats.json, for the report); a row longer than
    `max_length` stops training before it starts, where the trainer cuts rows (`cuts_rows`): SFTConfig would cut
    its end, the answer it is meant to teach."""
    stats = describe_rows(config, run_dir.train_jsonl)
    if write:
        write_json(run_dir.data_stats, stats)
    if cuts_rows and stats.get("rows_over_max_length"):
        raise TrainDataError(
            f"{run_dir.train_jsonl}: {stats['rows_over_max_length']} rows are longer than train.max_length "
            f"({stats['max_length']} tokens; longest {stats['tokens_per_row']['max']}), lines "
            f"{', '.join(map(str, stats['lines_over_max_length']))}: truncation would cut their answers. Raise "
            "train.max_length, or lower data_prep.chunk_size / similarity_top_k and run prep again.")
    return {k: stats[k] for k in ("rows", "tokens_total", "tokens_per_row", "training_tokens") if k in stats}


def write_loss_curve(log_history: list[dict[str, Any]], path: Path) -> None:
    """The Trainer's log history (train loss per logging step, eval loss per evaluation) as plain JSON."""
    def points(key: str) -> list[dict[str, Any]]:
        return [{"step": e["step"], "epoch": e.get("epoch"), "loss": e[key]} for e in log_history if key in e]

    write_json(path, {"train": points("loss"), "eval": points("eval_loss"), "log_history": log_history}, indent=1)
