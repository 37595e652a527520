"""Measure teacher settings against the answer gates (ragtune/core/gates.py) on real prep output; print JSON.

Reads a prep run's artifacts (data/chunks.jsonl, data/questions.train.jsonl, or while prep is still running
data/questions.raw.jsonl, data/index/), shows the teacher each of the first `--questions` training questions with
its oracle chunk and the best retrieved distractor (the demo's RAFT setup: oracle_probability 1, one distractor),
and compares settings:

  a  today's prompt, max_new_tokens 64          b  today's prompt, 200 new tokens
  c  short-answer system prompt, 96 tokens      d  RAFT chain of thought with quotes, 256 tokens
  e  best-of-N (temperature 0.7) on c's prompt, the gates pick
  closed_book  the question alone (answers invented by construction): negatives for the grounding score

For each: the share of answers that finished (EOS before max_new_tokens and no loop), that are grounded
(`grounding` >= --min-grounding), the share of questions kept (some candidate passes every gate), and the wall
and CPU seconds. Every setting stops a row once it loops (`stop_when=gates.repetition`), as prep should. It also
compares grounding scores (content-word bigrams, single words, single words not in the question): against the
closed-book answers, and against hand labels (--labels), and lists the closest generated question pairs.

    nice -n 10 .venv/bin/ragtune prep configs/demo.yaml --set output_dir=runs/probe
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/probe_teacher.py runs/probe --partial p.json > probe.json
    .venv/bin/python scripts/probe_teacher.py runs/probe --regate probe.json --min-grounding 0.25 --labels l.json

On a shared 2-core box, OMP_NUM_THREADS=1 matters: with torch's 2 threads and a load of ~9, a batch of 8 took
~6 min instead of ~50 s.
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

from ragtune.app.config import load_config
from ragtune.core.artifacts import read_jsonl
from ragtune.core.llm import HFChatBackend
from ragtune.core.rag import (
    build_closed_book_messages,
    build_rag_messages,
    embedding_model,
    load_index,
)
from ragtune.core import gates

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
    rows = [{"id": e["id"], "question": e["question"], "candidates": [
        {"text": c.text, "finish_reason": gates.finish_reason_of(c, budget), "tokens": c.completion_tokens}
        for c in completions[i * n : (i + 1) * n]]} for i, e in enumerate(examples)]
    return {**gate_rows(rows, examples, setting, min_grounding), "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1)}


def gate_rows(rows: list[dict[str, Any]], examples: list[dict[str, Any]], setting: dict[str, Any],
              min_grounding: float) -> dict[str, Any]:
    """Gate every candidate (in place) and pick the best per question; the summary and the rows."""
    for row, example in zip(rows, examples):
        for candidate in row["candidates"]:
            verdict = gates.check_answer(candidate["text"], candidate["finish_reason"], example["contexts"],
                                         oracle_in_context=True, chain_of_thought=setting["chain_of_thought"],
                                         min_grounding=min_grounding)
            text = candidate["text"] or ""
            answer = gates.final_answer(text) if setting["chain_of_thought"] else text
            candidate.update(grounding=round(gates.grounding(answer, example["contexts"]), 3), ok=verdict.ok,
                             reason=verdict.reason, detail=verdict.detail)
        row["best"] = gates.pick_best([gates.Verdict(c["ok"], c["reason"], c["grounding"]) for c in row["candidates"]])
    return {**summarize(rows, setting["n"], min_grounding), "rows": rows}


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


def unigram_grounding(answer: str, contexts: list[str]) -> float:
    """The alternative score: the share of the answer's content words that occur in the contexts."""
    words = gates.content_words(answer)
    have = {w for c in contexts for w in gates.content_words(c)}
    return sum(w in have for w in words) / len(words) if words else 0.0


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
    against the same contexts (cut and looping answers too: their text is as grounded as it is)."""
    out: dict[str, Any] = {}
    scores = {"bigram": lambda text, e: gates.grounding(text, e["contexts"]),
              "unigram": lambda text, e: unigram_grounding(text, e["contexts"]),
              "unigram_without_question_words": new_word_grounding}
    for name, score in scores.items():
        pos = [score(r["candidates"][0]["text"] or "", e) for e, r in zip(examples, rag_rows)]
        neg = [score(r["candidates"][0]["text"] or "", e) for e, r in zip(examples, closed_rows)]
        thresholds = {t: {"rag_pass": round(sum(p >= t for p in pos) / max(1, len(pos)), 3),
                          "closed_book_pass": round(sum(q >= t for q in neg) / max(1, len(neg)), 3)}
                      for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)}
        out[name] = {"auc": auc(pos, neg), "rag": sorted(round(p, 2) for p in pos),
                     "closed_book": sorted(round(q, 2) for q in neg), "by_threshold": thresholds}
    return out


def closed_book(teacher: HFChatBackend, examples: list[dict[str, Any]], prep: Any, budget: int) -> dict[str, Any]:
    started = time.perf_counter()
    completions = teacher.chat([build_closed_book_messages(e["question"], prep) for e in examples],
                               max_new_tokens=budget, temperature=0.0,
                               stop_when=lambda text: gates.repetition(text) is not None)
    rows = [{"id": e["id"], "question": e["question"], "best": 0, "candidates": [{
        "text": c.text, "finish_reason": gates.finish_reason_of(c, budget), "tokens": c.completion_tokens,
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


def regate(result: dict[str, Any], examples: list[dict[str, Any]], min_grounding: float) -> dict[str, Any]:
    """An earlier result with today's gates and `min_grounding` applied again to its saved answers."""
    result["min_grounding"] = min_grounding
    for measured in result["settings"].values():
        measured.update(gate_rows(measured["rows"], examples, measured, min_grounding))
    return result


def labelled(result: dict[str, Any], examples: list[dict[str, Any]], labels: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Each score's AUC on hand-labelled greedy answers ({setting: {question id: label}}): "G" (grounded) against
    "I" (invented); "P" (partly) is left out."""
    out: dict[str, Any] = {}
    by_id = {e["id"]: e for e in examples}
    scores = {"bigram": lambda t, e: gates.grounding(t, e["contexts"]),
              "unigram": lambda t, e: unigram_grounding(t, e["contexts"]), "unigram_without_question_words": new_word_grounding}
    for name, setting_labels in labels.items():
        rows = [r for r in result["settings"][name]["rows"] if r["id"] in setting_labels]
        texts = [(setting_labels[r["id"]], r["candidates"][0]["text"] or "", by_id[r["id"]]) for r in rows]
        out[name] = {score: {"auc": auc([f(t, e) for l, t, e in texts if l == "G"], [f(t, e) for l, t, e in texts if l == "I"]),
                             "G": sorted(round(f(t, e), 2) for l, t, e in texts if l == "G"),
                             "I": sorted(round(f(t, e), 2) for l, t, e in texts if l == "I")}
                     for score, f in scores.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a prep run's output_dir (with data/)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=4, help="N of best-of-N")
    parser.add_argument("--min-grounding", type=float, default=gates.MIN_GROUNDING)
    parser.add_argument("--only", nargs="*", help="setting names (prefixes) to run; default all")
    parser.add_argument("--partial", type=Path, help="also write the result so far here after each setting")
    parser.add_argument("--regate", type=Path, help="no generation: gate the answers of an earlier result again")
    parser.add_argument("--labels", type=Path, help='JSON {setting: {question id: "G", "I" or "P"}}: hand labels of greedy answers')
    args = parser.parse_args()
    config = load_config(args.config)
    prep = config.data_prep
    examples = load_examples(args.run_dir, config, args.questions)
    if args.regate:
        result = regate(json.loads(args.regate.read_text("utf-8")), examples, args.min_grounding)
        finish(result, examples, args, config)
        return
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
    finish(result, examples, args, config)


def finish(result: dict[str, Any], examples: list[dict[str, Any]], args: argparse.Namespace, config: Any) -> None:
    """Add the score comparisons and the near-duplicate pairs; print the JSON."""
    result["grounding_separation"] = {
        name: separation(examples, measured["rows"], result["closed_book"]["rows"])
        for name, measured in result["settings"].items() if measured["n"] == 1 and not measured["chain_of_thought"]}
    if args.labels:
        result["grounding_on_labels"] = labelled(result, examples, json.loads(args.labels.read_text("utf-8")))
    result["near_duplicates"] = near_duplicates(args.run_dir, config)
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
