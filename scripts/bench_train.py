"""Train-stage speed: plain TRL `SFTTrainer` defaults vs ragtune's configuration, same data, same tokens.

Both train LoRA (r=16, alpha 32, all-linear, PEFT's default dropout 0) for one epoch over the same
prompt-completion rows, so they process exactly the same tokens. The trainers are built once and their
epochs alternate `--repeats` times, so every arm sees the same machine load (other jobs on shared cores
only ever slow a run down: the best epoch of each is the headline, the median is reported too).

The JSON has, per arm, trained tokens/s, the settings it ran with (ragtune's: the `bf16: auto` probe and
its choice), and model FLOP/s (`train_gflop_per_token`, every position through every Linear) as MFU
against three GEMM rates measured in this process, before and after the epochs (best of both):
- `mfu`: the fastest matmul of the dtypes tried (fp32, bf16; squares and 2048-row MLP shapes), `mfu_peak`.
- `mfu_square`: the fastest square matmul (1024^3, 2048^3) of the dtypes tried, `mfu_square_peak`.
- `mfu_shape`: the precision probe's best format at the student's own layer shapes, forward + input
  gradient as LoRA training runs them (`ragtune.core.precision.run_probe`), `mfu_shape_peak`: the rate a
  perfect implementation of this training could reach, hence also `floor_epoch_seconds` (the counted
  FLOPs at that rate) and `measured_over_floor`. `executed_*`: the same for the FLOPs the arm really runs
  (LoRA adapters with their weight gradients, the LM head only where the loss reads it, recomputation).
`targets` (issue #29) are judged on ragtune's arm, AMX's when the probe picked a bf16 format, else AVX2's.
Also: the CPU model, flags and torch threads, and the load average (1/5/15 min) before and after, since a
shared machine changes every number. `--profile` adds one more epoch of ragtune's arm under torch.profiler
(`profile`: seconds by op family, phase and module, see `profile_epoch`).

- baseline: `SFTConfig(use_cpu=True)` on CPU (the least TRL needs to run there) + `LoraConfig`, i.e.
  TRL's defaults: batch 8, gradient (activation) checkpointing on, bf16 autocast on.
- ragtune: `train.sft.build_trainer` on a config whose `train:` section holds only what the bench
  fixes (one epoch, no validation, no saving), so ragtune's own defaults (SFT_DEFAULTS) decide the rest.

    python scripts/bench_train.py                       # SmolLM2-135M, 24 synthetic RAG rows, 2 alternating epochs
    python scripts/bench_train.py --rows 8 --context-chars 2300 --out bench.json   # ~620 tokens: two 256-token chunks (gpu-qlora.yaml)
    python scripts/bench_train.py --rows 64 --data runs/demo/data/train.jsonl
    python scripts/bench_train.py --rows 8 --context-chars 2300 --repeats 1 --skip-baseline --profile
    python scripts/bench_train.py --skip-baseline --also train.bf16=true \
        --also "train.per_device_train_batch_size=4 train.gradient_accumulation_steps=1"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SYSTEM_PROMPT = ("You are an expert Q&A system that is trusted around the world. Always answer the query using the "
                 "provided context information, and not prior knowledge.")
USER_TEMPLATE = ("Context information is below.\n---------------------\n{context}\n---------------------\n"
                 "Given the context information and not prior knowledge, answer the query.\nQuery: {question}\nAnswer: ")


def synthetic_rows(pdf: Path, n: int, seed: int = 0, context_chars: int = 0) -> list[dict[str, Any]]:
    """data_prep-shaped chat rows from real filing text: 1-4 sentences of context, one of them the answer.
    `context_chars` > 0: context of consecutive sentences up to that many characters instead (two 256-token chunks,
    configs/gpu-qlora.yaml's, are ~2000 characters; configs/demo.yaml's two 128-token ones ~1000), answers capped
    near 64 tokens like the demo teacher's."""
    from pypdf import PdfReader

    text = re.sub(r"\s+", " ", " ".join(page.extract_text() for page in PdfReader(pdf).pages))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s) < 400]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, k = rng.randrange(len(sentences) - 40), rng.randint(1, 4)
        if context_chars:
            k = next(i for i in range(1, 40) if len(" ".join(sentences[start:start + i])) >= context_chars)
        context = sentences[start:start + k]
        answer = rng.choice(context)[:300]
        question = "What does the filing say about " + " ".join(answer.split()[:6]).rstrip(",.;:") + "?"
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(context="\n".join(context), question=question)},
            {"role": "assistant", "content": answer},
        ], "meta": {"synthetic": True}})
    return rows


def matmul_peak(shapes: list[tuple[int, int, int]], budget_s: float = 5.0) -> dict[str, dict[str, float]]:
    """Best GFLOP/s of fp32 and bf16 matmuls on this machine, now, by kind: `square` (1024^3, 2048^3) and
    `shapes` (the training's own (m, k, n)). A dtype stops once it has used `budget_s` (bf16 without native
    support runs ~1 GFLOP/s); a kind it never reached reads 0."""
    import torch

    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        best, spent = {"square": 0.0, "shapes": 0.0}, 0.0
        for kind, (m, k, n) in [("square", (1024,) * 3), ("square", (2048,) * 3), *(("shapes", s) for s in shapes)]:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for i in range(4):  # the first call warms up
                start = time.perf_counter()
                a @ b
                seconds = time.perf_counter() - start
                spent += seconds
                # the warm-up call counts only when it is all the budget allowed (a slow bf16 reads 0 otherwise)
                if i or spent > budget_s:
                    best[kind] = max(best[kind], 2 * m * k * n / seconds / 1e9)
                if spent > budget_s:
                    break
            if spent > budget_s:
                break
        peak[str(dtype).removeprefix("torch.")] = {kind: round(rate, 1) for kind, rate in best.items()}
    return peak


def shape_probe(model_config: Any) -> dict[str, Any]:
    """GFLOP/s of each training format at the student's own layer shapes, forward + input gradient (the
    precision probe, uncached: measured now, under this load)."""
    from ragtune.core.precision import MODES, linear_shapes, run_probe

    return run_probe(linear_shapes(model_config), MODES, backward=True)


def train_flops_per_token(model: Any, avg_len: float) -> float:
    """Model FLOPs per trained token for LoRA (frozen base): forward 2P + input-gradient backward 2P over
    every Linear (LM head included), plus causal attention (forward 2*L*d per layer, backward twice that).
    Counted for every position and without activation-checkpointing recomputation (the usual MFU convention),
    so work a configuration skips (LM head on untrained positions) shows up as higher MFU."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    attention = 3 * 2 * avg_len * config.hidden_size * config.num_hidden_layers
    return 4 * linear + attention


def executed_flops_per_token(trainer: Any, avg_len: float) -> tuple[dict[str, float], float]:
    """The FLOPs per token an arm really runs, by part: the frozen base's Linears (4P: forward + input
    gradient), the LM head (4P over the positions it scores: the labelled ones when ragtune's loss compacts
    them), the trainable adapters (6 per parameter: forward, input and weight gradients), causal attention,
    and activation checkpointing's second forward; and the labelled share of positions. Padding (batch > 1)
    is not counted."""
    import torch

    model, config = trainer.model, trainer.model.config
    head = model.get_output_embeddings()
    columns = trainer.train_dataset.column_names
    masks = ([[label != -100 for label in row] for row in trainer.train_dataset["labels"]] if "labels" in columns
             else trainer.train_dataset["completion_mask"] if "completion_mask" in columns else None)
    labelled = sum(map(sum, masks)) / sum(map(len, masks)) if masks else 1.0
    frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                 and not m.weight.requires_grad and m is not head)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = 2 * avg_len * config.hidden_size * config.num_hidden_layers
    parts = {"base_linear": 4 * frozen, "lm_head": 4 * head.weight.numel() * (
                 labelled if getattr(trainer, "score_labelled_only", False) else 1.0),
             "lora": 6 * adapters, "attention": 3 * attention}
    if trainer.args.activation_checkpointing:
        parts["recompute"] = 2 * frozen + 2 * adapters + attention
    return parts, labelled


def timed_epoch(trainer: Any) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of one epoch."""
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    return time.perf_counter() - start, time.process_time() - cpu_start


def build_baseline(model_dir: Path, rows: list[dict[str, Any]], out: Path) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ragtune.train.rows import to_prompt_completion

    data = Dataset.from_list([to_prompt_completion(r, f"row {i}") for i, r in enumerate(rows)])
    args = SFTConfig(output_dir=str(out), use_cpu=not torch.cuda.is_available(), num_train_epochs=1,
                     save_strategy="no", report_to="none", disable_tqdm=True)
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args, train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )


def build_ragtune(model_dir: Path, rows: list[dict[str, Any]], out: Path, overrides: list[str]) -> Any:
    import yaml

    from ragtune.app.config import load_config
    from ragtune.core.run_dir import RunDir
    from ragtune.train.sft import build_trainer

    run_dir = RunDir(out)
    run_dir.train_jsonl.parent.mkdir(parents=True, exist_ok=True)
    run_dir.train_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config_path = out / "bench.yaml"
    config_path.write_text(yaml.safe_dump({
        "name": "bench", "output_dir": str(out), "documents": [str(REPO / "tests/data/uber_10k_excerpt.pdf")],
        "teacher": {"model": str(model_dir)}, "judge": {"model": str(model_dir)}, "student": {"model": str(model_dir)},
        "train": {"num_train_epochs": 1, "validation_split": 0.0, "save_strategy": "no", "report_to": "none",
                  "disable_tqdm": True},
    }), encoding="utf-8")
    config = load_config(config_path, overrides)
    trainer, facts, _ = build_trainer(config, run_dir)
    trainer.ragtune_precision = facts["precision"]
    return trainer


def summarize(trainer: Any, seconds: list[tuple[float, float]], tokens: int, flops_per_token: float,
              peaks: dict[str, float]) -> dict[str, Any]:
    """One arm's numbers: tokens/s, MFU against each peak in `peaks` (GFLOP/s: `mfu`, `square`, `shape`),
    the arithmetic floor at the shape-level peak, and the settings it ran with."""
    import statistics

    import torch

    args = trainer.args
    wall, cpu = [w for w, _ in seconds], [c for _, c in seconds]
    best, median = tokens / min(wall), tokens / statistics.median(wall)
    executed, labelled = executed_flops_per_token(trainer, tokens / len(trainer.train_dataset))
    floor = tokens * flops_per_token / (peaks["shape"] * 1e9)
    executed_floor = tokens * sum(executed.values()) / (peaks["shape"] * 1e9)
    return {
        "epoch_seconds": [round(x, 1) for x in wall],
        "tokens_per_s": round(best, 1),
        "tokens_per_s_median": round(median, 1),
        # Less sensitive to other jobs on the cores than wall time (but spin-waiting threads still count).
        "tokens_per_cpu_s": round(tokens / min(cpu), 1),
        "mfu": round(best * flops_per_token / (peaks["mfu"] * 1e9), 4),
        "mfu_square": round(best * flops_per_token / (peaks["square"] * 1e9), 4),
        "mfu_shape": round(best * flops_per_token / (peaks["shape"] * 1e9), 4),
        # The counted FLOPs at the shape-level peak: no implementation of this training can be faster.
        "floor_epoch_seconds": round(floor, 2),
        "measured_over_floor": round(min(wall) / floor, 2),
        # The FLOPs this arm really runs (an estimate, by part) at that peak: how far its own work is from it.
        "executed_gflop_per_token": {k: round(v / 1e9, 4) for k, v in executed.items()},
        "labelled_fraction": round(labelled, 3),
        "executed_floor_epoch_seconds": round(executed_floor, 2),
        "executed_measured_over_floor": round(min(wall) / executed_floor, 2),
        "settings": {"per_device_train_batch_size": args.per_device_train_batch_size,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps,
                     "activation_checkpointing": args.activation_checkpointing, "bf16": args.bf16,
                     "weights_dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                     "train_sampling_strategy": args.train_sampling_strategy, "torch_compile": args.torch_compile,
                     "padding_free": args.padding_free, "loss": type(trainer).__name__,
                     "torch_threads": torch.get_num_threads()},
        **({"precision": trainer.ragtune_precision} if hasattr(trainer, "ragtune_precision") else {}),
    }


def build_trainers(args: argparse.Namespace, model_dir: Path, rows: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    """The arms, by name: TRL's defaults, ragtune's, and ragtune with each `--also` lever."""
    trainers = {}
    if not args.skip_baseline:
        trainers["baseline_trl_defaults"] = build_baseline(model_dir, rows, tmp / "baseline")
    trainers["ragtune"] = build_ragtune(model_dir, rows, tmp / "ragtune", args.overrides)
    for i, lever in enumerate(args.also):
        trainers[f"ragtune+{lever}"] = build_ragtune(model_dir, rows, tmp / f"lever{i}", [*args.overrides, *lever.split()])
    return trainers


def alternate(trainers: dict[str, Any], model_config: Any, repeats: int, n_tokens: int
              ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, Any]]:
    """Epoch times of every arm, alternated `repeats` times, and the GEMM rates measured before and after
    (best of both): `matmul` (`matmul_peak`) and `probe` (`shape_probe`'s GFLOP/s by format)."""
    shapes = [(2048, model_config.hidden_size, model_config.intermediate_size),
              (2048, model_config.intermediate_size, model_config.hidden_size)]
    matmuls, probes = [matmul_peak(shapes)], [shape_probe(model_config)]
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():  # alternated, so every arm sees the same load
            seconds[name].append(timed_epoch(trainer))
            progress = {"arm": name, "epoch_seconds": round(seconds[name][-1][0], 1), "tokens": n_tokens,
                        "loadavg_1": round(os.getloadavg()[0], 2)}
            print(f"bench progress: {json.dumps(progress)}", file=sys.stderr, flush=True)
    matmuls.append(matmul_peak(shapes))
    probes.append(shape_probe(model_config))
    matmul = {dtype: {kind: max(m[dtype][kind] for m in matmuls) for kind in matmuls[0][dtype]} for dtype in matmuls[0]}
    probe = {mode: max(p["gflops"][mode] for p in probes) for mode in probes[0]["gflops"]}
    return seconds, {"matmul": matmul, "probe": probe, "probe_runs": probes}


def peak_facts(rates: dict[str, Any]) -> dict[str, Any]:
    """The report's GEMM rates and the three MFU denominators (see the module docstring)."""
    from ragtune.core.precision import pick

    matmul, probe = rates["matmul"], rates["probe"]
    overall = {dtype: max(kinds.values()) for dtype, kinds in matmul.items()}
    fastest = max(overall, key=overall.__getitem__)
    square = max(matmul, key=lambda dtype: matmul[dtype]["square"])
    best_format = max(probe, key=probe.__getitem__)
    runs = rates["probe_runs"]
    return {
        "matmul_peak_gflops": overall, "matmul_peak_by_kind_gflops": matmul,
        # `mfu`'s denominator: the fastest GEMM of the dtypes tried, whichever dtype the arm trained in.
        "mfu_peak": {"dtype": fastest, "gflops": overall[fastest]},
        "mfu_square_peak": {"dtype": square, "gflops": matmul[square]["square"]},
        "mfu_shape_peak": {"format": best_format, "gflops": probe[best_format], "picked": pick(probe),
                           "gflops_by_format": probe, "rows": runs[0]["rows"], "shapes": runs[0]["shapes"],
                           "stopped_early": runs[0]["stopped_early"], "backward": True},
    }


def judge_targets(report: dict[str, Any], reference_tokens_per_s: float | None) -> dict[str, Any]:
    """Issue #29's targets for ragtune's arm: on a CPU whose probe picks a bf16 format (AMX), tokens/s >= 2x
    the reference (`--reference-tokens-per-s`, an earlier ragtune run; null without one), speedup >= 4.5 over
    TRL's defaults and MFU >= 0.35 of the shape-level peak; where it picks fp32 (AVX2), MFU >= 0.40 of it."""
    ours = report["ragtune"]
    picked = ours.get("precision", {}).get("choice") or report["mfu_shape_peak"]["picked"]
    if picked.startswith("bf16"):
        speedup = report.get("speedup")
        ratio = ours["tokens_per_s"] / reference_tokens_per_s if reference_tokens_per_s else None
        return {"cpu_class": "bf16 (the probe picked a bf16 format: the issue's AMX targets, an avx512_bf16 EPYC's too)",
                "picked": picked,
                "mfu_shape": ours["mfu_shape"], "mfu_shape_min": 0.35, "mfu_shape_ok": ours["mfu_shape"] >= 0.35,
                "speedup_min": 4.5, "speedup_ok": None if speedup is None else speedup >= 4.5,
                "tokens_per_s_vs_reference": None if ratio is None else round(ratio, 2),
                "tokens_per_s_min_ratio": 2.0, "tokens_per_s_ok": None if ratio is None else ratio >= 2.0}
    return {"cpu_class": "fp32 (the probe picked fp32: the issue's AVX2 target)", "picked": picked,
            "mfu_shape": ours["mfu_shape"],
            "mfu_shape_min": 0.40, "mfu_shape_ok": ours["mfu_shape"] >= 0.40}


def compare(report: dict[str, Any]) -> None:
    """Speedups of ragtune over TRL's defaults, and of each lever over ragtune."""
    if "baseline_trl_defaults" in report:
        base, ours = report["baseline_trl_defaults"], report["ragtune"]
        report["speedup"] = round(ours["tokens_per_s"] / base["tokens_per_s"], 2)
        report["speedup_median"] = round(ours["tokens_per_s_median"] / base["tokens_per_s_median"], 2)
        report["speedup_cpu_time"] = round(ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)
    for name in [n for n in report if n.startswith("ragtune+")]:
        report[name]["vs_ragtune"] = round(report[name]["tokens_per_s"] / report["ragtune"]["tokens_per_s"], 2)


# --- the profile (--profile) -----------------------------------------------------------------------

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::mv",
            "aten::addmv"}
GEMM_FAMILY = {"lora_A": "gemm_lora", "lora_B": "gemm_lora", "base_linear": "gemm_base", "lm_head": "gemm_lm_head"}
COPY_OPS = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
            "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zeros_like",
            "aten::zero_", "aten::fill_", "aten::ones_like", "aten::new_zeros", "aten::index", "aten::index_select",
            "aten::embedding", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view",
            "aten::t", "aten::transpose", "aten::permute", "aten::as_strided", "aten::expand", "aten::unsqueeze",
            "aten::squeeze", "aten::slice", "aten::select", "aten::split", "aten::alias", "aten::detach",
            "detach", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::item",
            "aten::_local_scalar_dense"}
LOSS_WORDS = ("cross_entropy", "log_softmax", "nll_loss", "softmax")
BACKWARD_NODE = "autograd::engine::evaluate_function"
# (prefix of an enclosing event, phase), innermost match first: backward runs inside `training_step`.
PHASES = (("enumerate(DataLoader)", "data"), ("Optimizer.", "optimizer"), (BACKWARD_NODE, "backward"),
          ("training_step", "forward"))
REGIONS = {"lora_glue", "base_linear", "lora_A", "lora_B", "lm_head", "attention_block", "mlp_block", "norm",
           "embedding", "model_forward", "compute_loss"}


def label_modules(trainer: Any) -> list[Any]:
    """record_function labels (`REGIONS`) around what the profile tells apart, the innermost wins: PEFT's LoRA
    Linear (`lora_glue`: its own ops, scaling and sum), its `base_layer`, `lora_A` and `lora_B`, the LM head,
    the attention and MLP blocks (their ops outside Linears: RoPE, SDPA, SiLU), norms, the embedding, the
    whole model, and the trainer's `training_step` and `compute_loss` (instance attributes, removed after).
    Returns the hook handles."""
    from peft.tuners.lora import LoraLayer
    from torch.autograd.profiler import record_function

    def label(module: Any, name: str) -> list[Any]:
        open_: list[Any] = []
        return [module.register_forward_pre_hook(lambda *_: open_.append(record_function(name).__enter__())),
                module.register_forward_hook(lambda *_: open_.pop().__exit__(None, None, None))]

    def wrap(name: str) -> None:
        method = getattr(trainer, name)

        def labelled(*args: Any, **kwargs: Any) -> Any:
            with record_function(name):
                return method(*args, **kwargs)
        setattr(trainer, name, labelled)

    head, handles = trainer.model.get_output_embeddings(), label(trainer.model, "model_forward")
    for name, module in trainer.model.named_modules():
        region = ("lora_glue" if isinstance(module, LoraLayer) else "base_linear" if name.endswith(".base_layer")
                  else "lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name
                  else "lm_head" if module is head else "attention_block" if name.endswith(".self_attn")
                  else "mlp_block" if name.endswith(".mlp") else "norm" if type(module).__name__.endswith("RMSNorm")
                  else "embedding" if name.endswith(".embed_tokens") else None)
        handles += label(module, region) if region else []
    wrap("training_step")
    wrap("compute_loss")
    return handles


def attribute(events: list[Any]) -> Any:
    """(event, phase, region) for each event of one thread, in time order: the innermost enclosing phase
    (`PHASES`) and region (`REGIONS`); a backward op's region is its forward's, through the autograd node's
    sequence number. A forward event carries the counter as it was when the event began, so ops that make no
    node share the number of the next op that does: the last event to carry a number made its node."""
    forward_region: dict[int, str] = {}
    for event in events:
        chain, parent = [], event
        while parent is not None:
            chain.append(parent)
            parent = parent.cpu_parent
        phase = next((p for e in chain for prefix, p in PHASES if e.name.startswith(prefix)), "other")
        region = next((e.name for e in chain if e.name in REGIONS), None)
        node = next((e for e in chain if e.name.startswith(BACKWARD_NODE)), None)
        if node is not None:
            region = forward_region.get(node.sequence_nr)
        elif event.sequence_nr >= 0:
            forward_region[event.sequence_nr] = region
        yield event, phase, region or "unlabelled"


def op_family(event: Any, phase: str, region: str) -> str:
    """The family an event's self time counts in (see `profile_epoch`)."""
    name = event.name
    if phase in ("data", "optimizer"):
        return {"data": "data_collation", "optimizer": "optimizer"}[phase]
    if event.is_user_annotation:
        return "python_in_labelled_regions"
    if name.startswith("autograd::") or name.endswith(("Backward0", "Backward1")) or "AccumulateGrad" in name:
        return "autograd_bookkeeping"
    if name in GEMM_OPS:
        return GEMM_FAMILY.get(region, "gemm_other")
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if region == "compute_loss" or any(word in name for word in LOSS_WORDS):
        return "loss_and_metrics"
    return "copy_cast_layout" if name in COPY_OPS else "elementwise_norm"


def profile_epoch(trainer: Any, tokens: int, executed: dict[str, float]) -> dict[str, Any]:
    """One more epoch of `trainer` under torch.profiler (CPU ops; no shapes, no stacks: low overhead), as
    self-CPU seconds and % of the epoch's wall time: by op family (`op_family`, split by phase: data, forward
    (+ loss), backward, optimizer, other = the trainer's loop), by labelled module (`label_modules`, forward
    and backward), and the GFLOP/s the GEMMs of each part reached (`executed` FLOPs per token)."""
    from collections import Counter, defaultdict

    import torch
    from torch.profiler import ProfilerActivity, profile

    handles = label_modules(trainer)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False) as prof:
            wall, _ = timed_epoch(trainer)
    finally:
        for handle in handles:
            handle.remove()
        for name in ("training_step", "compute_loss"):
            trainer.__dict__.pop(name, None)
    events = list(prof.events())
    main_thread = Counter(e.thread for e in events).most_common(1)[0][0]
    families: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    regions: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event, phase, region in attribute([e for e in events if e.thread == main_thread]):
        seconds = event.self_cpu_time_total / 1e6
        families[op_family(event, phase, region)][phase] += seconds
        if phase in ("forward", "backward"):
            regions[region][phase] += seconds
    families["python_outside_ops"]["other"] = wall - sum(sum(v.values()) for v in families.values())
    phases = {phase: sum(v.get(phase, 0.0) for v in families.values())
              for phase in ("data", "forward", "backward", "optimizer", "other")}
    gemm = {f: sum(families[f].values()) for f in ("gemm_base", "gemm_lora", "gemm_lm_head")}
    return {
        "epoch_seconds": round(wall, 2), "torch_threads": torch.get_num_threads(),
        "other_threads_s": round(sum(e.self_cpu_time_total for e in events if e.thread != main_thread) / 1e6, 2),
        "by_phase": {phase: {"s": round(v, 2), "pct": round(100 * v / wall, 1)} for phase, v in phases.items()},
        "by_family": percent_table(families, wall),
        "by_module": percent_table(regions, wall),
        "gemm_gflops": {f: round(tokens * executed[part] / max(gemm[f], 1e-9) / 1e9, 1) for f, part in
                        (("gemm_base", "base_linear"), ("gemm_lora", "lora"), ("gemm_lm_head", "lm_head"))},
    }


def percent_table(rows: dict[str, dict[str, float]], wall: float) -> dict[str, dict[str, float]]:
    """{row: {s, pct of wall, per-column seconds}}, biggest first."""
    totals = {name: sum(split.values()) for name, split in rows.items()}
    return {name: {"s": round(totals[name], 2), "pct": round(100 * totals[name] / wall, 1),
                   **{k: round(v, 2) for k, v in rows[name].items()}}
            for name in sorted(rows, key=lambda n: -totals[n])}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="student model reference (alias, folder, hub id)")
    parser.add_argument("--data", type=Path, help="a data_prep train.jsonl (default: synthetic rows from the 10-K excerpt)")
    parser.add_argument("--rows", type=int, default=24, help="rows to train on (one epoch)")
    parser.add_argument("--context-chars", type=int, default=0,
                        help="synthetic rows with this much context (2000: configs/demo.yaml's two 256-token chunks)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="ragtune config override, e.g. train.bf16=true")
    parser.add_argument("--repeats", type=int, default=2, help="epochs per configuration, alternating")
    parser.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                        help="also time ragtune with these overrides (space-separated; repeatable), e.g. "
                             "--also train.bf16=true --also 'train.per_device_train_batch_size=1 train.gradient_accumulation_steps=4'")
    parser.add_argument("--skip-baseline", action="store_true", help="only time ragtune's configuration")
    parser.add_argument("--profile", action="store_true",
                        help="then profile one more epoch of ragtune's arm (torch.profiler): `profile` in the JSON")
    parser.add_argument("--reference-tokens-per-s", type=float,
                        help="an earlier ragtune tokens/s, for the AMX target of 2x it (`targets`)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    import torch

    from ragtune.core.artifacts import read_jsonl, write_json
    from ragtune.core.models import load_causal_lm, load_tokenizer
    from ragtune.core.precision import machine

    rows = (read_jsonl(args.data)[: args.rows] if args.data else
            synthetic_rows(REPO / "tests/data/uber_10k_excerpt.pdf", args.rows, context_chars=args.context_chars))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        model_dir = Path(tmp) / "model"
        model = load_causal_lm(args.model)  # saved once as safetensors so every arm loads the same weights fast
        model.save_pretrained(model_dir)
        load_tokenizer(args.model).save_pretrained(model_dir)
        trainers = build_trainers(args, model_dir, rows, Path(tmp))
        tokens = {sum(len(ids) for ids in t.train_dataset["input_ids"]) for t in trainers.values()}
        assert len(tokens) == 1, f"the runs would train different token counts: {tokens}"
        n_tokens = tokens.pop()
        seconds, rates = alternate(trainers, model.config, args.repeats, n_tokens)
        peaks = peak_facts(rates)
        denominators = {"mfu": peaks["mfu_peak"]["gflops"], "square": peaks["mfu_square_peak"]["gflops"],
                        "shape": peaks["mfu_shape_peak"]["gflops"]}
        flops_per_token = train_flops_per_token(model, n_tokens / len(rows))
        report: dict[str, Any] = {
            "model": args.model, "rows": len(rows), "tokens": n_tokens, "avg_row_tokens": round(n_tokens / len(rows), 1),
            "repeats": args.repeats, **peaks, "train_gflop_per_token": round(flops_per_token / 1e9, 3),
            **{name: summarize(t, seconds[name], n_tokens, flops_per_token, denominators) for name, t in trainers.items()},
        }
        compare(report)
        report["targets"] = judge_targets(report, args.reference_tokens_per_s)
        if args.profile:
            load_profile = os.getloadavg()
            executed, _ = executed_flops_per_token(trainers["ragtune"], n_tokens / len(rows))
            report["profile"] = {"arm": "ragtune", **profile_epoch(trainers["ragtune"], n_tokens, executed),
                                 "loadavg_1_5_15_before": [round(x, 2) for x in load_profile]}
    report.update(overrides=args.overrides, cpu_count=os.cpu_count(), machine={**machine(), "torch_threads": torch.get_num_threads()},
                  loadavg_1_5_15_before=[round(x, 2) for x in load_before],
                  loadavg_1_5_15_after=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
