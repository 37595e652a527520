"""Train-stage speed: plain TRL `SFTTrainer` defaults vs ragtune's configuration, same data, same tokens.

Both train LoRA (r=16, alpha 32, all-linear, PEFT's default dropout 0) for one epoch over the same
prompt-completion rows, so they process exactly the same tokens. The trainers are built once and their
epochs alternate `--repeats` times, so every arm sees the same machine load (other jobs on shared cores
only ever slow a run down: the best epoch of each is the headline, the median is reported too).

The JSON has, per arm, trained tokens/s, the settings it ran with (ragtune's: the `bf16: auto` probe and
its choice), and MFU: model FLOP/s over the fastest GEMM peak measured in this process among the dtypes
tried (fp32 and bf16, square and training-shaped matmuls, before and after the epochs); `mfu_peak` names
that dtype. Also: the CPU model, flags and torch threads, and the load average (1/5/15 min) before and
after, since a shared machine changes every number.

- baseline: `SFTConfig(use_cpu=True)` on CPU (the least TRL needs to run there) + `LoraConfig`, i.e.
  TRL's defaults: batch 8, gradient (activation) checkpointing on, bf16 autocast on.
- ragtune: `train.sft.build_trainer` on a config whose `train:` section holds only what the bench
  fixes (one epoch, no validation, no saving), so ragtune's own defaults (SFT_DEFAULTS) decide the rest.

    python scripts/bench_train.py                       # SmolLM2-135M, 24 synthetic RAG rows, 2 alternating epochs
    python scripts/bench_train.py --rows 8 --context-chars 2300 --out bench.json   # rows shaped like the demo's
    python scripts/bench_train.py --rows 64 --data runs/demo/data/train.jsonl
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
    `context_chars` > 0: context of consecutive sentences up to that many characters instead (configs/demo.yaml's
    RAFT rows hold two 256-token chunks, ~2000 characters), answers capped near 64 tokens like its teacher's."""
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


def matmul_peak(shapes: list[tuple[int, int, int]], budget_s: float = 5.0) -> dict[str, float]:
    """Best GFLOP/s of fp32 and bf16 matmuls on this machine, now: squares and the training's own (m, k, n)
    shapes. A dtype stops once it has used `budget_s` (bf16 without native support runs ~1 GFLOP/s)."""
    import torch

    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        best, spent = 0.0, 0.0
        for m, k, n in [(1024, 1024, 1024), (2048, 2048, 2048), *shapes]:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for i in range(4):  # the first call warms up
                start = time.perf_counter()
                a @ b
                seconds = time.perf_counter() - start
                spent += seconds
                # the warm-up call counts only when it is all the budget allowed (a slow bf16 reads 0 otherwise)
                best = max(best, 2 * m * k * n / seconds / 1e9) if i or spent > budget_s else best
                if spent > budget_s:
                    break
            if spent > budget_s:
                break
        peak[str(dtype).removeprefix("torch.")] = round(best, 1)
    return peak


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

    from ragtune.train.sft import to_prompt_completion

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
              peak_gflops: float) -> dict[str, Any]:
    import statistics

    import torch

    args = trainer.args
    wall, cpu = [w for w, _ in seconds], [c for _, c in seconds]
    best, median = tokens / min(wall), tokens / statistics.median(wall)
    return {
        "epoch_seconds": [round(x, 1) for x in wall],
        "tokens_per_s": round(best, 1),
        "tokens_per_s_median": round(median, 1),
        # Less sensitive to other jobs on the cores than wall time (but spin-waiting threads still count).
        "tokens_per_cpu_s": round(tokens / min(cpu), 1),
        "mfu": round(best * flops_per_token / (peak_gflops * 1e9), 4),
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
              ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """Epoch times of every arm, alternated `repeats` times, and the GEMM peaks measured before and after."""
    shapes = [(2048, model_config.hidden_size, model_config.intermediate_size),
              (2048, model_config.intermediate_size, model_config.hidden_size)]
    peaks = [matmul_peak(shapes)]
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():  # alternated, so every arm sees the same load
            seconds[name].append(timed_epoch(trainer))
            progress = {"arm": name, "epoch_seconds": round(seconds[name][-1][0], 1), "tokens": n_tokens,
                        "loadavg_1": round(os.getloadavg()[0], 2)}
            print(f"bench progress: {json.dumps(progress)}", file=sys.stderr, flush=True)
    peaks.append(matmul_peak(shapes))
    return seconds, {dtype: max(p[dtype] for p in peaks) for dtype in peaks[0]}


def compare(report: dict[str, Any]) -> None:
    """Speedups of ragtune over TRL's defaults, and of each lever over ragtune."""
    if "baseline_trl_defaults" in report:
        base, ours = report["baseline_trl_defaults"], report["ragtune"]
        report["speedup"] = round(ours["tokens_per_s"] / base["tokens_per_s"], 2)
        report["speedup_median"] = round(ours["tokens_per_s_median"] / base["tokens_per_s_median"], 2)
        report["speedup_cpu_time"] = round(ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)
    for name in [n for n in report if n.startswith("ragtune+")]:
        report[name]["vs_ragtune"] = round(report[name]["tokens_per_s"] / report["ragtune"]["tokens_per_s"], 2)


def main() -> None:
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
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()

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
        seconds, peak = alternate(trainers, model.config, args.repeats, n_tokens)
        fastest = max(peak, key=peak.__getitem__)
        flops_per_token = train_flops_per_token(model, n_tokens / len(rows))
        report: dict[str, Any] = {
            "model": args.model, "rows": len(rows), "tokens": n_tokens, "avg_row_tokens": round(n_tokens / len(rows), 1),
            "repeats": args.repeats, "matmul_peak_gflops": peak,
            # MFU's denominator: the fastest GEMM of the dtypes tried, whichever dtype the arm trained in.
            "mfu_peak": {"dtype": fastest, "gflops": peak[fastest]},
            "train_gflop_per_token": round(flops_per_token / 1e9, 3),
            **{name: summarize(t, seconds[name], n_tokens, flops_per_token, peak[fastest]) for name, t in trainers.items()},
        }
    compare(report)
    report.update(overrides=args.overrides, cpu_count=os.cpu_count(), machine={**machine(), "torch_threads": torch.get_num_threads()},
                  loadavg_1_5_15_before=[round(x, 2) for x in load_before],
                  loadavg_1_5_15_after=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
