"""Eval speed: where the time of `ragtune eval` goes, and the batched judge vs a one-call-at-a-time judge.

1. breakdown  a full `eval.evaluate.run` (base, adapter, teacher; rag and closed_book; all metrics) on
              small real data: seconds per question per model for generation, judge seconds per
              LLM-scored sample, embedding seconds.
2. judge      the same Ragas jobs (faithfulness + answer relevancy on the base model's RAG answers) scored
              by ragtune's `BatchedJudge` (batched, greedy repeats generated once) and by the baseline:
              the same judge and schemas with batch size 1 and no cache, i.e. one `generate` per Ragas
              call as a plain `InstructorBaseRagasLLM` wrapper does. `ratio` = baseline s / ragtune s.

Prints one JSON object.

    python scripts/bench_eval.py                                   # tiny random models (fast)
    python scripts/bench_eval.py --model smollm2-135m-instruct --questions 4 --judge-max-new-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHUNKS = [
    "Uber operates a ridesharing platform connecting riders with drivers in over 70 countries.",
    "Uber Eats lets consumers order food from restaurants and have it delivered by couriers.",
    "Uber Freight connects shippers with carriers and provides logistics services for trucking.",
    "In 2021 Uber's revenue was 17.5 billion dollars, up 57 percent year over year.",
    "Drivers on the Uber platform are independent contractors who choose when and where to drive.",
    "Uber's principal executive offices are located at 1515 3rd Street, San Francisco, California.",
    "Proposition 22 in California classified app-based drivers as independent contractors with some benefits.",
    "Uber acquired Transplace in 2021 to expand the logistics capabilities of Uber Freight.",
]
QUESTIONS = [
    "In how many countries does Uber operate its ridesharing platform?",
    "What does Uber Eats let consumers do?",
    "What does Uber Freight connect shippers with?",
    "What was Uber's revenue in 2021?",
    "How are drivers on the Uber platform classified?",
    "Where are Uber's principal executive offices?",
    "What did Proposition 22 do for app-based drivers?",
    "Which company did Uber acquire in 2021 for Uber Freight?",
]


def tiny_model(out: Path, seed: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ragtune.core.models import SMOLLM2_ALIAS, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def prepare(root: Path, model: str | None, n_questions: int) -> tuple[str, str, Path]:
    """Models, a persisted index, eval questions and an adapter: what prep and train leave behind."""
    import torch
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from peft import LoraConfig, get_peft_model

    from ragtune.core.models import load_causal_lm, resolve_embedding

    student = model or tiny_model(root / "student", 0)
    teacher = model or tiny_model(root / "teacher", 1)
    data = root / "run" / "data"
    data.mkdir(parents=True)
    chunks = [{"id": f"c{i}", "text": t, "metadata": {"file": "uber.pdf", "page": i}} for i, t in enumerate(CHUNKS)]
    (data / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    questions = [{"id": f"q{i}", "question": q, "source_chunk_id": f"c{i}", "split": "eval"}
                 for i, q in enumerate(QUESTIONS[:n_questions])]
    (data / "questions.eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    Settings.llm = None
    embed = HuggingFaceEmbedding(model_name=resolve_embedding("all-minilm-l6-v2"))
    VectorStoreIndex([TextNode(id_=c["id"], text=c["text"]) for c in chunks], embed_model=embed) \
        .storage_context.persist(persist_dir=str(data / "index"))
    torch.manual_seed(2)
    peft_model = get_peft_model(load_causal_lm(student), LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    peft_model.save_pretrained(root / "run" / "adapter")
    return student, teacher, root / "run"


def judge_throughput(config: Any, run_dir: Any, batched: bool, n_questions: int) -> dict[str, Any]:
    from ragtune.eval.evaluate import make_embeddings
    from ragtune.eval.judge import BatchedJudge
    from ragtune.eval.score import Sample, build_metrics, score_one
    from ragtune.core.artifacts import read_jsonl
    from ragtune.core.llm import make_backend

    role = config.judge
    backend = make_backend(role)
    judge = BatchedJudge(backend, max_new_tokens=role.max_new_tokens, max_length=config.eval.judge_max_length,
                         max_items=config.eval.judge_max_items, batch_size=None if batched else 1, cache=batched)
    calls = build_metrics(["faithfulness", "answer_relevancy"], judge, make_embeddings(config), config.eval.strictness)
    samples = [Sample(r["question_id"], r["question"], answer=r["answer"], contexts=r["contexts"])
               for r in read_jsonl(run_dir.answers("base", "rag"))[:n_questions]]
    from ragas.metrics.collections.answer_relevancy.util import AnswerRelevanceOutput
    from ragas.metrics.collections.faithfulness.util import NLIStatementOutput, StatementGeneratorOutput

    for model in (AnswerRelevanceOutput, StatementGeneratorOutput, NLIStatementOutput):  # compile the grammars
        try:
            judge.generate("warm-up", model)
        except Exception:
            pass
    judge.usage = type(judge.usage)()

    async def score_all() -> list[dict[str, Any]]:
        return await asyncio.gather(*(score_one(calls[m], m, s) for s in samples
                                      for m in ("faithfulness", "answer_relevancy")))

    started = time.perf_counter()
    results = asyncio.run(score_all())
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "samples": len(results), "samples_per_s": round(len(results) / seconds, 3),
            "scored": sum(r["value"] is not None for r in results), "judge": judge.usage.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="student/teacher/judge model (default: tiny random Llamas)")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--judge-max-new-tokens", type=int, default=128)
    parser.add_argument("--judge-batch-size", type=int, default=8)
    parser.add_argument("--judge-questions", type=int, default=None, help="questions in the judge comparison")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folder here")
    args = parser.parse_args()

    from ragtune.eval import evaluate
    from ragtune.config import load_config
    from ragtune.core.run_dir import RunDir

    root = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    stdout = sys.stdout
    sys.stdout = sys.stderr  # LlamaIndex prints to stdout; keep it for the JSON result
    try:
        student, teacher, run_path = prepare(root, args.model, args.questions)
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump({
            "name": "bench-eval", "output_dir": str(run_path), "documents": [str(REPO / "tests/data/uber_10k_excerpt.pdf")],
            "teacher": {"backend": "hf", "model": teacher, "batch_size": 8},
            "student": {"model": student},
            "judge": {"backend": "hf", "model": student, "max_new_tokens": args.judge_max_new_tokens,
                      "batch_size": args.judge_batch_size},
            "eval": {"max_new_tokens": args.max_new_tokens, "judge_sanity_pairs": min(4, args.questions),
                     "n_resamples": 1000},
        }))
        config = load_config(config_path)
        run_dir = RunDir(run_path)
        started = time.perf_counter()
        facts = evaluate.run(config, run_dir, [])
        eval_seconds = time.perf_counter() - started
        timings = facts["timings"]
        n_judge = args.judge_questions or args.questions
        baseline = judge_throughput(config, run_dir, batched=False, n_questions=n_judge)
        ragtune = judge_throughput(config, run_dir, batched=True, n_questions=n_judge)
        result = {
            "model": args.model or "tiny random Llama (2 layers)", "questions": args.questions,
            "eval_seconds": round(eval_seconds, 1),
            "breakdown": {
                "generation_seconds_per_question": timings["generation_seconds_per_question"],
                "judge_seconds": timings.get("judge", {}).get("seconds"),
                "judge_seconds_per_llm_scored_sample": timings.get("judge_seconds_per_llm_scored_sample"),
                "llm_scored_samples": timings.get("llm_scored"), "all_scored_samples": timings.get("scored"),
                "embeddings_seconds": timings.get("embeddings_seconds"),
                "embedding_texts_cached": timings.get("embedding_texts_cached"),
                "scoring_wall_seconds": timings.get("scoring_seconds"),
                "judge_calls": timings.get("judge", {}).get("calls"), "judge_requests": timings.get("judge", {}).get("requests"),
                "judge_cached": timings.get("judge", {}).get("cached"),
            },
            "judge_baseline_one_call_at_a_time": baseline,
            "judge_ragtune_batched": ragtune,
            "ratio": round(baseline["seconds"] / ragtune["seconds"], 2),
        }
        print(json.dumps(result, indent=2), file=stdout)
        if args.keep:
            shutil.copytree(root, args.keep, dirs_exist_ok=True)
    finally:
        sys.stdout = stdout
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
