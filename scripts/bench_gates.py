"""The answer gates against answers people labelled, and against the demo's own candidates: one JSON document.

    .venv/bin/python scripts/bench_gates.py [--labelled FILE.jsonl] [--run RUN_DIR] [--config CONFIG]

1. labelled     `ragtune gates FILE --json` on a labelled file (default: FinanceBench's GPT-4 answers in
                ../shared/data/gate_calibration_financebench_dev.jsonl), for ragtune's gates (`support`) and for
                the bigram measure (`--set data_prep.answer_gates.measure=bigram`), as a user runs it.
2. unsupported  the same file's `good` answers shown with *another filing's* evidence (a row whose question names
                no company of this one and whose contexts share no passage with it), relabelled `unsupported`: a
                correct answer is then unsupported and must be rejected. Three seeded pairings.
3. demo         every candidate the teacher wrote in a real run (RUN_DIR: data/answers.rejected.jsonl, and the kept
                rows of data/train.jsonl), gated again with the run's config: the share kept per measure.
4. cost         microseconds per answer of each measure on the labelled file (its contexts are 1.5-12k characters).

The targets (issue: a strong teacher's good answers survive the gates): good kept ≥ 0.90, refusals and
unsupported answers rejected ≥ 0.80.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEV = REPO.parent / "shared" / "data" / "gate_calibration_financebench_dev.jsonl"
SEEDS = (0, 1, 2)
# capitalised words of FinanceBench's question templates that name no company
TEMPLATE_WORDS = frozenset("""What Is Does If Which Assume Answer Give Using Based FY Q USD How Has Are Round You Basing
Considering The In Among Please Do Calculate Cash Flow Statement Balance Sheet Income Net Operating Among Use When
Assuming Total Among From""".split())
CAPITALISED = re.compile(r"\b[A-Z][A-Za-z&]+")


def gates_json(path: Path, *overrides: str) -> dict[str, Any]:
    """`ragtune gates PATH --json` as a user runs it."""
    command = [sys.executable, "-m", "ragtune.app.cli", "gates", str(path), "--json"]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def same_filing(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows may come from one company: a shared company word in the questions, or a shared passage."""
    names = [set(CAPITALISED.findall(r["question"])) - TEMPLATE_WORDS for r in (a, b)]
    if names[0] & names[1]:
        return True
    text_a, text_b = " ".join(a["contexts"]), " ".join(b["contexts"])
    return any(text_a[i : i + 60] in text_b for i in range(0, max(len(text_a) - 60, 0), 200))


def unsupported_rows(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Each good answer with the contexts of a random row of another filing, labelled `unsupported`."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        if row["label"] != "good":
            continue
        other = rng.choice([o for o in rows if not same_filing(row, o)])
        out.append({**row, "contexts": other["contexts"], "label": "unsupported"})
    return out


def demo_candidates(run_dir: Path) -> list[dict[str, Any]]:
    """Every candidate of a run's rejected questions and every kept answer, with the question and contexts."""
    chunks = {c["id"]: c["text"] for c in map(json.loads, (run_dir / "data/chunks.jsonl").open(encoding="utf-8"))}
    questions = {}
    for split in ("train", "eval"):
        path = run_dir / f"data/questions.{split}.jsonl"
        if path.exists():
            questions.update({q["id"]: q["question"] for q in map(json.loads, path.open(encoding="utf-8"))})
    out = []
    for row in map(json.loads, (run_dir / "data/answers.rejected.jsonl").open(encoding="utf-8")):
        contexts = [chunks[i] for i in row["context_ids"] if i in chunks]
        out += [{"question": row["question"], "contexts": contexts, "answer": c["text"] or "", "label": "rejected_then",
                 "finish_reason": c.get("finish_reason") or "stop"} for c in row["candidates"]]
    for row in map(json.loads, (run_dir / "data/train.jsonl").open(encoding="utf-8")):
        meta = row["meta"]
        if meta.get("mode") != "rag":
            continue
        out.append({"question": questions.get(meta["question_id"], row["messages"][-2]["content"]),
                    "contexts": [chunks[i] for i in meta["retrieved_ids"] if i in chunks],
                    "answer": row["messages"][-1]["content"], "label": "kept_then",
                    "finish_reason": meta.get("finish_reason") or "stop"})
    return out


def cost_per_answer(rows: list[dict[str, Any]]) -> dict[str, float]:
    from ragtune.core.gates import MEASURES

    out = {}
    for name, measure in MEASURES.items():
        start = time.perf_counter()
        for row in rows:
            measure(row["answer"], row["contexts"], row["question"])
        out[name] = round((time.perf_counter() - start) / len(rows) * 1e6, 1)
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=Path, default=DEV, help="labelled answers (ragtune gates' format)")
    parser.add_argument("--run", type=Path, help="a demo run folder whose candidates to gate again")
    parser.add_argument("--config", type=Path, default=REPO / "configs/demo.yaml", help="the run's config")
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.labelled.open(encoding="utf-8") if line.strip()]
    result: dict[str, Any] = {"labelled": str(args.labelled), "answers": len(rows)}
    with tempfile.TemporaryDirectory() as scratch:
        result["support"] = gates_json(args.labelled)
        result["bigram"] = gates_json(args.labelled, "data_prep.answer_gates.measure=bigram")
        for measure, overrides in (("support", ()), ("bigram", ("data_prep.answer_gates.measure=bigram",))):
            rejected = []
            for seed in SEEDS:
                path = write_jsonl(unsupported_rows(rows, seed), Path(scratch) / f"unsupported.{seed}.jsonl")
                rejected.append(1 - gates_json(path, *overrides)["labels"]["unsupported"]["keep_rate"])
            result[measure]["unsupported_rejected"] = {"per_seed": [round(r, 3) for r in rejected],
                                                       "mean": round(sum(rejected) / len(rejected), 3)}
        if args.run:
            path = write_jsonl(demo_candidates(args.run), Path(scratch) / "demo.jsonl")
            result["demo"] = {"run": str(args.run), "candidates": sum(1 for _ in path.open())}
            for measure in ("support", "bigram"):
                command = [sys.executable, "-m", "ragtune.app.cli", "gates", str(path), "--json", "--config", str(args.config),
                           "--set", f"data_prep.answer_gates.measure={measure}", "--set", "output_dir=" + scratch]
                report = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                result["demo"][measure] = report["labels"]
    result["cost_us_per_answer"] = cost_per_answer(rows)
    labels = result["support"]["labels"]
    result["targets"] = {
        "good_kept": labels["good"]["keep_rate"],
        "refusal_rejected": round(1 - labels["refusal"]["keep_rate"], 3) if "refusal" in labels else None,
        "unsupported_rejected": result["support"]["unsupported_rejected"]["mean"],
    }
    result["targets"]["met"] = (result["targets"]["good_kept"] >= 0.9
                                and (result["targets"]["refusal_rejected"] or 1) >= 0.8
                                and result["targets"]["unsupported_rejected"] >= 0.8)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
