"""Train-stage speed: plain TRL `SFTTrainer` defaults vs ragtune's configuration, same data, same tokens.

Both train LoRA (r=16, alpha 32, all-linear, PEFT's default dropout 0) for one epoch over the same
prompt-completion rows, so they process exactly the same tokens. The two trainers are built once and
their epochs alternate `--repeats` times, so both see the same machine load (other jobs on shared cores
only ever slow a run down: the best epoch of each is the headline, the median is reported too). The JSON
has trained tokens/s of each, the ratio, and achieved FLOP/s as a fraction of this machine's matmul peak
measured in the same process (MFU).

- baseline: `SFTConfig(use_cpu=True)` on CPU (the least TRL needs to run there) + `LoraConfig`, i.e.
  TRL's defaults: batch 8, gradient (activation) checkpointing on, bf16 autocast on.
- ragtune: `train.sft.build_trainer` on a config whose `train:` section holds only what the bench
  fixes (one epoch, no validation, no saving), so ragtune's own defaults (SFT_DEFAULTS) decide the rest.

    python scripts/bench_train.py                       # SmolLM2-135M, 24 synthetic RAG rows, 2 alternating epochs
    python scripts/bench_train.py --rows 64 --data runs/demo/data/train.jsonl
    python scripts/bench_train.py --skip-baseline --also train.bf16=true --also train.per_device_train_batch_size=16
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


def synthetic_rows(pdf: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """data_prep-shaped chat rows from real filing text: 1-4 sentences of context, one of them the answer."""
    from pypdf import PdfReader

    text = re.sub(r"\s+", " ", " ".join(page.extract_text() for page in PdfReader(pdf).pages))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s) < 400]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, k = rng.randrange(len(sentences) - 5), rng.randint(1, 4)
        context = sentences[start:start + k]
        answer = rng.choice(context)
        question = "What does the filing say about " + " ".join(answer.split()[:6]).rstrip(",.;:") + "?"
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(context="\n".join(context), question=question)},
            {"role": "assistant", "content": answer},
        ], "meta": {"synthetic": True}})
    return rows


def matmul_peak() -> dict[str, float]:
    """Best GFLOP/s of square matmuls in fp32 and bf16 on this machine, now."""
    import torch

    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in (1024, 2048):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            for _ in range(3):
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
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


def build_baseline(model_dir: Path, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from train.sft import to_prompt_completion

    data = Dataset.from_list([to_prompt_completion(r, f"row {i}") for i, r in enumerate(rows)])
    args = SFTConfig(output_dir=str(out), use_cpu=not torch.cuda.is_available(), num_train_epochs=1,
                     save_strategy="no", report_to="none", disable_tqdm=True)
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args, train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    return trainer


def build_ragtune(model_dir: Path, rows: list[dict[str, Any]], out: Path, overrides: list[str]) -> dict[str, Any]:
    import yaml

    from ragtune.config import load_config
    from ragtune.run_dir import RunDir
    from train.sft import build_trainer

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
    trainer, _, _ = build_trainer(config, run_dir)
    return trainer


def summarize(trainer: Any, seconds: list[tuple[float, float]], tokens: int, flops_per_token: float, peak_gflops: float) -> dict[str, Any]:
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
                     "activation_checkpointing": args.activation_checkpointing, "bf16": args.bf16,
                     "train_sampling_strategy": args.train_sampling_strategy, "torch_compile": args.torch_compile,
                     "padding_free": args.padding_free, "loss": type(trainer).__name__,
                     "torch_threads": torch.get_num_threads()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="student model reference (alias, folder, hub id)")
    parser.add_argument("--data", type=Path, help="a data_prep train.jsonl (default: synthetic rows from the 10-K excerpt)")
    parser.add_argument("--rows", type=int, default=24, help="rows to train on (one epoch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="ragtune config override, e.g. train.bf16=true")
    parser.add_argument("--repeats", type=int, default=2, help="epochs per configuration, alternating")
    parser.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                        help="also time ragtune with this one override (repeatable), e.g. --also train.bf16=true")
    parser.add_argument("--skip-baseline", action="store_true", help="only time ragtune's configuration")
    args = parser.parse_args()

    from ragtune.artifacts import read_jsonl
    from train.models import load_causal_lm, load_tokenizer

    rows = read_jsonl(args.data)[: args.rows] if args.data else synthetic_rows(REPO / "tests/data/uber_10k_excerpt.pdf", args.rows)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        model_dir = Path(tmp) / "model"
        model = load_causal_lm(args.model)  # saved once as safetensors so both runs load the same weights fast
        model.save_pretrained(model_dir)
        load_tokenizer(args.model).save_pretrained(model_dir)
        trainers = {}
        if not args.skip_baseline:
            trainers["baseline_trl_defaults"] = build_baseline(model_dir, rows, Path(tmp) / "baseline")
        trainers["ragtune"] = build_ragtune(model_dir, rows, Path(tmp) / "ragtune", args.overrides)
        for i, lever in enumerate(args.also):
            trainers[f"ragtune+{lever}"] = build_ragtune(model_dir, rows, Path(tmp) / f"lever{i}", [*args.overrides, lever])
        tokens = {sum(len(ids) for ids in t.train_dataset["input_ids"]) for t in trainers.values()}
        assert len(tokens) == 1, f"the runs would train different token counts: {tokens}"
        n_tokens = tokens.pop()
        peaks = [matmul_peak()]
        seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in trainers}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                seconds[name].append(timed_epoch(trainer))
        peaks.append(matmul_peak())
        peak = {dtype: max(p[dtype] for p in peaks) for dtype in peaks[0]}
        flops_per_token = train_flops_per_token(model, n_tokens / len(rows))
        report: dict[str, Any] = {
            "model": args.model, "rows": len(rows), "tokens": n_tokens, "avg_row_tokens": round(n_tokens / len(rows), 1),
            "repeats": args.repeats, "matmul_peak_gflops": peak, "train_gflop_per_token": round(flops_per_token / 1e9, 3),
            **{name: summarize(t, seconds[name], n_tokens, flops_per_token, max(peak.values())) for name, t in trainers.items()},
        }
    if "baseline_trl_defaults" in report:
        base, ours = report["baseline_trl_defaults"], report["ragtune"]
        report["speedup"] = round(ours["tokens_per_s"] / base["tokens_per_s"], 2)
        report["speedup_median"] = round(ours["tokens_per_s_median"] / base["tokens_per_s_median"], 2)
        report["speedup_cpu_time"] = round(ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)
    for name in trainers:
        if name.startswith("ragtune+"):
            report[name]["vs_ragtune"] = round(report[name]["tokens_per_s"] / report["ragtune"]["tokens_per_s"], 2)
    report["overrides"] = args.overrides
    report["cpu_count"] = os.cpu_count()
    report["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
