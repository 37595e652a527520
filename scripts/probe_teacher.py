"""Measure teacher settings against the answer gates (data_prep/gates.py) on real prep output; print JSON.

Reads a prep run's artifacts (data/chunks.jsonl, data/questions.train.jsonl, data/questions.raw.jsonl,
data/index/), shows the teacher each of the first `--questions` training questions with its oracle chunk and the
best retrieved distractor (the demo's RAFT setup: oracle_probability 1, one distractor), and compares settings:

  a  today's prompt, max_new_tokens 64          b  today's prompt, 200 new tokens
  c  short-answer system prompt, 96 tokens      d  RAFT chain of thought with quotes, 256 tokens
  e  best-of-N (temperature 0.7) on c's prompt, the gates pick
  closed_book  the question alone (answers invented by construction): the negatives for the grounding score

For each: the share of answers that finished (EOS before max_new_tokens), that are grounded, that pass every
gate, and the seconds. It also compares grounding scores (content-word unigrams vs bigrams) by how well they
separate the RAG answers from the closed-book ones, and lists near-duplicate question pairs by similarity.

    nice -n 10 .venv/bin/ragtune prep configs/demo.yaml --set output_dir=runs/probe
    nice -n 10 .venv/bin/python scripts/probe_teacher.py runs/probe --config configs/demo.yaml > probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ragtune.config import load_config
from ragtune.core.artifacts import read_jsonl
from ragtune.core.llm import HFChatBackend
from ragtune.core.rag import build_closed_book_messages, build_rag_messages, embedding_model, load_index
from ragtune.data_prep import gates

SHORT_SYSTEM_PROMPT = "Answer in one or two sentences using only the context."


def settings(prep: Any, n_candidates: int) -> dict[str, dict[str, Any]]:
    """The compared settings: system prompt, whether chain of thought is asked for, budget, samples."""
    greedy = {"temperature": 0.0, "n": 1, "chain_of_thought": False, "system_prompt": prep.system_prompt}
    return {
        "a_today_64": {**greedy, "max_new_tokens": 64},
        "c_short_96": {**greedy, "system_prompt": SHORT_SYSTEM_PROMPT, "max_new_tokens": 96},
        "d_raft_cot_256": {**greedy, "chain_of_thought": True, "max_new_tokens": 256},
        f"e_best_of_{n_candidates}_short_96": {**greedy, "system_prompt": SHORT_SYSTEM_PROMPT, "max_new_tokens": 96,
                                               "temperature": 0.7, "n": n_candidates},
        "b_today_200": {**greedy, "max_new_tokens": 200},
    }


def load_examples(run: Path, config: Any, limit: int) -> list[dict[str, Any]]:
    """The first `limit` training questions, each with [oracle, best non-oracle retrieved chunk] in a seeded order."""
    chunk_text = {c["id"]: c["text"] for c in read_jsonl(run / "data" / "chunks.jsonl")}
    questions = train_questions(run)[:limit]
    index = load_index(config.embedding, run / "data" / "index")
    retriever = index.as_retriever(similarity_top_k=2)
    examples = []
    for question in questions:
        oracle = question["source_chunk_id"]
        distractor = next(h.node.node_id for h in retriever.retrieve(question["question"]) if h.node.node_id != oracle)
        ids = [oracle, distractor]
        random.Random(f"{config.seed}:{question['id']}").shuffle(ids)
        examples.append({"id": question["id"], "question": question["question"], "context_ids": ids,
                         "contexts": [chunk_text[i] for i in ids]})
    return examples


def train_questions(run: Path) -> list[dict[str, Any]]:
    """data/questions.train.jsonl, or (while prep is still generating eval questions) the usable training
    candidates of data/questions.raw.jsonl, exact duplicates dropped."""
    if (run / "data" / "questions.train.jsonl").exists():
        return read_jsonl(run / "data" / "questions.train.jsonl")
    questions, seen = [], set()
    for row in read_jsonl(run / "data" / "questions.raw.jsonl"):
        for number, candidate in enumerate(row["candidates"]):
            key = " ".join(gates.content_words(candidate["question"]))
            if row["split"] == "train" and not candidate.get("reason") and key not in seen:
                seen.add(key)
                questions.append({"id": f"{row['chunk_id']}-q{number}", "question": candidate["question"],
                                  "source_chunk_id": row["chunk_id"]})
    return questions


def messages_for(example: dict[str, Any], setting: dict[str, Any], prep: Any) -> list[dict[str, str]]:
    prompts = prep.model_copy(update={"system_prompt": setting["system_prompt"]})
    messages = build_rag_messages(example["question"], example["contexts"], prompts)
    if setting["chain_of_thought"]:
        messages[-1]["content"] += prep.raft.chain_of_thought_instruction
    return messages


def run_setting(teacher: HFChatBackend, examples: list[dict[str, Any]], setting: dict[str, Any], prep: Any,
                min_grounding: float, seed: int) -> dict[str, Any]:
    """Generate `n` answers per example, gate each, keep the best; the shares and per-row outputs."""
    n, budget = setting["n"], setting["max_new_tokens"]
    conversations = [messages_for(e, setting, prep) for e in examples for _ in range(n)]
    torch.manual_seed(seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    # a row stops once it loops: the gates reject it anyway, and a loop otherwise runs to max_new_tokens
    completions = teacher.chat(conversations, max_new_tokens=budget, temperature=setting["temperature"],
                               stop_when=lambda text: gates.repetition(text) is not None)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    rows = []
    for i, example in enumerate(examples):
        candidates = []
        for completion in completions[i * n : (i + 1) * n]:
            reason = gates.finish_reason(completion, budget)
            verdict = gates.check_answer(completion.text, reason, example["contexts"], oracle_in_context=True,
                                         chain_of_thought=setting["chain_of_thought"], min_grounding=min_grounding)
            answer = gates.final_answer(completion.text or "") if setting["chain_of_thought"] else (completion.text or "")
            candidates.append({"text": completion.text, "finish_reason": reason, "tokens": completion.completion_tokens,
                               "grounding": round(gates.grounding(answer, example["contexts"]), 3),
                               "ok": verdict.ok, "reason": verdict.reason, "detail": verdict.detail})
        best = gates.pick_best([gates.Verdict(c["ok"], c["reason"], c["grounding"]) for c in candidates])
        rows.append({"id": example["id"], "question": example["question"], "best": best, "candidates": candidates})
    return {**summarize(rows, n, min_grounding), "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "rows": rows}


def summarize(rows: list[dict[str, Any]], n: int, min_grounding: float) -> dict[str, Any]:
    """Shares over all candidates (finished, grounded) and over questions (kept: some candidate passes)."""
    candidates = [c for r in rows for c in r["candidates"]]
    reasons: dict[str, int] = {}
    for c in candidates:
        reasons[str(c["reason"])] = reasons.get(str(c["reason"]), 0) + 1
    kept_by_n = {k: round(sum(any(c["ok"] for c in r["candidates"][:k]) for r in rows) / len(rows), 3)
                 for k in range(1, n + 1)}
    picked = [r["candidates"][r["best"]]["grounding"] for r in rows if r["best"] is not None]
    return {
        "answers": len(candidates),
        # ended on their own: not cut by max_new_tokens, not stopped in a loop
        "finished": round(sum(c["finish_reason"] == "stop" and c["reason"] != "repetition" for c in candidates)
                          / len(candidates), 3),
        "grounded": round(sum(c["grounding"] >= min_grounding for c in candidates) / len(candidates), 3),
        "candidates_ok": round(sum(c["ok"] for c in candidates) / len(candidates), 3),
        "kept": kept_by_n[n], "kept_by_n": kept_by_n, "reasons": reasons,
        "mean_tokens": round(sum(c["tokens"] for c in candidates) / len(candidates), 1),
        "mean_grounding_kept": round(sum(picked) / len(picked), 3) if picked else None,
    }


def finished(row: dict[str, Any]) -> bool:
    """The first candidate ended on its own (not cut by the budget, not stopped in a loop)."""
    candidate = row["candidates"][0]
    return candidate["finish_reason"] == "stop" and gates.repetition(candidate["text"] or "") is None


def bigram_grounding(answer: str, contexts: list[str]) -> float:
    """The alternative score: the share of the answer's content-word bigrams that occur in the contexts."""
    def bigrams(text: str) -> set[tuple[str, str]]:
        words = gates.content_words(text)
        return set(zip(words, words[1:]))

    wanted = list(zip(gates.content_words(answer), gates.content_words(answer)[1:]))
    have = set().union(*(bigrams(c) for c in contexts))
    return sum(b in have for b in wanted) / len(wanted) if wanted else 0.0


def new_word_grounding(answer: str, example: dict[str, Any]) -> float:
    """The alternative score: unigram grounding of the answer's words that the question does not already contain."""
    asked = set(gates.content_words(example["question"]))
    words = [w for w in gates.content_words(answer) if w not in asked]
    have = {w for c in example["contexts"] for w in gates.content_words(c)}
    return sum(w in have for w in words) / len(words) if words else 0.0


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(a random positive scores above a random negative), ties count half."""
    pairs = [(p > q) + 0.5 * (p == q) for p in positives for q in negatives]
    return round(sum(pairs) / len(pairs), 3) if pairs else float("nan")


def separation(examples: list[dict[str, Any]], rag_rows: list[dict[str, Any]], closed_rows: list[dict[str, Any]],
               ) -> dict[str, Any]:
    """How each score separates RAG answers (mostly grounded) from closed-book answers (invented), both scored
    against the same contexts; finished answers only, so truncation and loops do not blur it."""
    out: dict[str, Any] = {}
    scores = {"unigram": lambda text, e: gates.grounding(text, e["contexts"]),
              "bigram": lambda text, e: bigram_grounding(text, e["contexts"]),
              "unigram_without_question_words": lambda text, e: new_word_grounding(text, e)}
    for name, score in scores.items():
        pos = [score(r["candidates"][0]["text"] or "", e) for e, r in zip(examples, rag_rows) if finished(r)]
        neg = [score(r["candidates"][0]["text"] or "", e) for e, r in zip(examples, closed_rows) if finished(r)]
        thresholds = {t: {"rag_pass": round(sum(p >= t for p in pos) / max(1, len(pos)), 3),
                          "closed_book_pass": round(sum(q >= t for q in neg) / max(1, len(neg)), 3)}
                      for t in (0.4, 0.5, 0.6, 0.7, 0.8)}
        out[name] = {"auc": auc(pos, neg), "rag": sorted(round(p, 2) for p in pos),
                     "closed_book": sorted(round(q, 2) for q in neg), "by_threshold": thresholds}
    return out


def closed_book(teacher: HFChatBackend, examples: list[dict[str, Any]], prep: Any, budget: int) -> dict[str, Any]:
    started = time.perf_counter()
    completions = teacher.chat([build_closed_book_messages(e["question"], prep) for e in examples],
                               max_new_tokens=budget, temperature=0.0,
                               stop_when=lambda text: gates.repetition(text) is not None)
    rows = [{"id": e["id"], "question": e["question"], "best": 0, "candidates": [{
        "text": c.text, "finish_reason": gates.finish_reason(c, budget), "tokens": c.completion_tokens,
        "grounding": round(gates.grounding(c.text or "", e["contexts"]), 3), "ok": False, "reason": None}]}
        for e, c in zip(examples, completions)]
    return {"seconds": round(time.perf_counter() - started, 1), "rows": rows}


def near_duplicates(run: Path, config: Any) -> dict[str, Any]:
    """Every generated question (train and eval, kept or unanswerable), embedded with the configured MiniLM:
    the closest pairs, for reading, and how many pairs exceed each threshold."""
    import numpy as np

    raw = read_jsonl(run / "data" / "questions.raw.jsonl")
    questions = sorted({c["question"] for r in raw for c in r["candidates"]
                        if not c.get("reason") or c["reason"].startswith("unanswerable")})
    vectors = np.asarray(embedding_model(config.embedding).get_text_embedding_batch(questions))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = vectors @ vectors.T
    pairs = sorted(((float(similarity[i, j]), i, j) for i in range(len(questions)) for j in range(i)), reverse=True)
    return {"questions": len(questions),
            "pairs_above": {t: sum(s > t for s, _, _ in pairs) for t in (0.8, 0.85, 0.88, 0.9, 0.92, 0.95)},
            "closest": [{"similarity": round(s, 3), "a": questions[j], "b": questions[i]} for s, i, j in pairs[:40]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a prep run's output_dir (with data/)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=4, help="N of best-of-N")
    parser.add_argument("--min-grounding", type=float, default=gates.MIN_GROUNDING)
    parser.add_argument("--only", nargs="*", help="setting names (prefixes) to run; default all")
    parser.add_argument("--partial", type=Path, help="also write the result so far here after each setting")
    args = parser.parse_args()
    config = load_config(args.config)
    prep = config.data_prep
    examples = load_examples(args.run_dir, config, args.questions)
    teacher = HFChatBackend(config.teacher.model, batch_size=config.teacher.batch_size, torch_dtype="float32")
    result: dict[str, Any] = {"teacher": config.teacher.model, "questions": len(examples), "min_grounding": args.min_grounding,
                              "threads": torch.get_num_threads(), "settings": {}}
    chosen = settings(prep, args.candidates)
    for name, setting in chosen.items():
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        print(f"running {name}", file=sys.stderr, flush=True)
        result["settings"][name] = {**setting,
                                    **run_setting(teacher, examples, setting, prep, args.min_grounding, config.seed)}
        if args.partial:
            args.partial.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("running closed_book", file=sys.stderr, flush=True)
    result["closed_book"] = closed_book(teacher, examples, prep, 96)
    result["grounding_separation"] = {
        name: separation(examples, measured["rows"], result["closed_book"]["rows"])
        for name, measured in result["settings"].items() if measured["n"] == 1 and not measured["chain_of_thought"]}
    result["near_duplicates"] = near_duplicates(args.run_dir, config)
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
