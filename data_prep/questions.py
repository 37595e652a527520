"""The question heuristics of prep: parse a teacher's reply into questions, then keep the answerable,
distinct, non-leaking ones. Every dropped question gets a reason (data/questions.rejected.jsonl)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from ragtune.core.grounding import lexical_overlap
from ragtune.data_prep.config import DataPrepConfig

if TYPE_CHECKING:
    from llama_index.core import VectorStoreIndex

    from ragtune.core.llm import ChatBackend


def question_prompt(context: str, prep: DataPrepConfig) -> str:
    return (prep.question_prompt.replace("{context_str}", context)
            .replace("{num_questions_per_chunk}", str(prep.num_questions_per_chunk)))


_LIST_MARKER = re.compile(
    r"^\s*(?:[-*•>#]+\s*|\(?\d{1,2}[.):]\s+|\(?[a-zA-Z][.)]\s+|Q\d*\s*[.:)]\s*|(?:the\s+)?question\s*\d*\s*[.:)-]\s*|(?:teacher|student|user|assistant)\s*:\s*)",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(sure|certainly|of course|here (is|are)|okay|ok\b|great|below|the following)", re.IGNORECASE)
_ANSWER = re.compile(r"^(answer|a\d*|solution|explanation)\s*[:.)-]", re.IGNORECASE)


def parse_questions(text: str, limit: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Questions from a teacher's reply: (kept, [(dropped, reason)]). Strips numbering, `Question:` and speaker
    (`TEACHER:`, one of 30 demo eval questions) prefixes, drops preambles, answers, non-questions, fragments and
    degenerate repetitions."""
    kept: list[str] = []
    dropped: list[tuple[str, str]] = []
    pieces = [p for line in text.splitlines() for p in re.split(r"(?<=\?)\s+", line)]
    for piece in pieces:
        question = piece.strip()
        previous = None
        while question != previous:
            previous = question
            question = _LIST_MARKER.sub("", question).strip().strip("*_\"'`“”").strip()
        if not question:
            continue
        if _PREAMBLE.match(question):
            reason = "preamble"
        elif _ANSWER.match(question):
            reason = "not a question: an answer"
        elif not question.endswith("?"):
            reason = "not a question: no question mark (or cut off by max_new_tokens)"
        elif len(question.split()) < 4:
            reason = "too short"
        elif _is_degenerate(question):
            reason = "degenerate: repeated words"
        elif normalize_question(question) in {normalize_question(q) for q in kept}:
            reason = "duplicate"
        elif len(kept) >= limit:
            reason = "over num_questions_per_chunk"
        else:
            kept.append(question)
            continue
        dropped.append((question, reason))
    return kept, dropped


def enough_questions(text: str, limit: int) -> bool:
    """Whether generation can stop: `limit` questions kept (parsing keeps them in order, so the rest could only add
    rejects), or a question repeated (a greedy small model that repeats one goes on repeating it: 29 of 130 demo
    chunks spent their whole budget on one question, 431 duplicates in all)."""
    kept, dropped = parse_questions(text, limit)
    return len(kept) >= limit or any(reason == "duplicate" for _, reason in dropped)


def _is_degenerate(question: str) -> bool:
    words = question.lower().split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(words) > 60 or (bool(trigrams) and max(trigrams.count(t) for t in set(trigrams)) >= 3)


def normalize_question(question: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", question.lower()))


def yes_no_schema(key: str) -> dict[str, Any]:
    """The JSON schema of a one-boolean verdict (`{"<key>": true|false}`), for schema-constrained decoding."""
    return {"title": key, "type": "object", "properties": {key: {"type": "boolean"}}, "required": [key],
            "additionalProperties": False}


ANSWERABLE_SCHEMA = yes_no_schema("answerable")
ANSWERABLE_PROMPT = (
    "Context information is below.\n---------------------\n{context_str}\n---------------------\n"
    "Can the question below be answered from the context information alone? "
    'Reply with JSON: {"answerable": true} or {"answerable": false}.\nQuestion: {query_str}'
)


def answerable_verdicts(batch: list[dict[str, Any]], parsed: list[tuple[list[str], list[tuple[str, str]]]],
                        verdicts: list[list[str | None]], prep: DataPrepConfig, backend: "ChatBackend") -> None:
    """Mark each still-kept question the configured answerability check drops, in place. A question an earlier
    check dropped is not judged again: with `teacher`, the round-trip check runs first, since it costs a vector
    search and this one a teacher call (on the demo's eval split the round trip dropped 58 of the 107 questions
    the lexical check kept)."""
    pairs = [(i, j, q) for i, (kept, _) in enumerate(parsed) for j, q in enumerate(kept) if verdicts[i][j] is None]
    if prep.answerable_check == "none" or not pairs:
        return
    if prep.answerable_check == "lexical":
        for i, j, question in pairs:
            overlap = lexical_overlap(question, batch[i]["text"])
            if overlap < prep.min_lexical_overlap:
                verdicts[i][j] = f"unanswerable: lexical overlap {overlap:.2f} < min_lexical_overlap {prep.min_lexical_overlap}"
        return
    conversations = [[{"role": "user", "content": ANSWERABLE_PROMPT.replace("{context_str}", batch[i]["text"])
                       .replace("{query_str}", q)}] for i, _, q in pairs]
    answers = backend.chat(conversations, max_new_tokens=16, json_schema=ANSWERABLE_SCHEMA)
    for (i, j, _), answer in zip(pairs, answers):
        try:
            answerable = answer.error is None and bool(json.loads(answer.text).get("answerable", False))
        except (json.JSONDecodeError, AttributeError):
            answer.error = f"not JSON: {answer.text[:80]!r}"
            answerable = False
        if answer.error is not None:
            verdicts[i][j] = f"unanswerable check failed: {answer.error}"
        elif not answerable:
            verdicts[i][j] = "unanswerable: the teacher says the source chunk does not answer it"


def roundtrip_verdicts(batch: list[dict[str, Any]], parsed: list[tuple[list[str], list[tuple[str, str]]]],
                       verdicts: list[list[str | None]], index: "VectorStoreIndex", top_k: int,
                       node_ids: list[str] | None) -> None:
    """Mark each still-kept question whose source chunk is not among the top `top_k` chunks retrieved for it
    (from `node_ids`, or the whole index) as "not retrievable", in place."""
    from ragtune.core.rag import retrieve

    pairs = [(i, j, q) for i, (kept, _) in enumerate(parsed) for j, q in enumerate(kept) if verdicts[i][j] is None]
    if not pairs:
        return
    where = "its split's chunks" if node_ids is not None else "the whole index"
    for (i, j, _), found in zip(pairs, retrieve(index, [q for _, _, q in pairs], top_k, node_ids=node_ids)):
        if batch[i]["id"] not in [hit["id"] for hit in found]:
            verdicts[i][j] = f"not retrievable: its source chunk is not in the top {top_k} of {where} (roundtrip_top_k)"


def select_questions(raw_rows: list[dict[str, Any]], chunk_by_id: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Question rows in generation order, de-duplicated across chunks; and the rejects with reasons."""
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for row in raw_rows:
        chunk = chunk_by_id[row["chunk_id"]]
        for number, candidate in enumerate(row["candidates"]):
            question = {"id": f"{row['chunk_id']}-q{number}", "question": candidate["question"],
                        "source_chunk_id": row["chunk_id"], "file": chunk["metadata"]["file"],
                        "page": chunk["metadata"]["page"], "split": row["split"]}
            key = normalize_question(candidate["question"])
            if candidate.get("reason"):
                rejected.append({**question, "reason": candidate["reason"]})
            elif key in seen:
                rejected.append({**question, "reason": f"duplicate of {seen[key]}"})
            else:
                seen[key] = question["id"]
                kept.append(question)
    return kept, rejected


def filter_questions(rows: list[dict[str, Any]], chunk_by_id: dict[str, dict[str, Any]], prep: DataPrepConfig,
                     embed_model: Any, train: list[dict[str, Any]] | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One split's kept questions in generation order (distinct, no near-duplicate and, given the kept `train`
    questions, none leaking one of them) and the rejected ones with their reasons."""
    questions, rejected = select_questions(rows, chunk_by_id)
    questions, near = drop_near_duplicates(questions, embed_model, prep.near_duplicate_threshold)
    leaked: list[dict[str, Any]] = []
    if train is not None:
        questions, leaked = drop_leakage(train, questions, embed_model, prep.leakage_threshold)
    return questions, rejected + near + leaked


def drop_near_duplicates(questions: list[dict[str, Any]], embed_model: Any, threshold: float
                         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop questions whose embedding is within `threshold` cosine similarity of an earlier kept one (the same
    question reworded: it would only weight one fact twice)."""
    from ragtune.core.gates import near_duplicate_questions

    if len(questions) < 2:
        return questions, []
    vectors = embed_model.get_text_embedding_batch([q["question"] for q in questions])
    kept, dropped = [], []
    for question, duplicate_of in zip(questions, near_duplicate_questions([q["question"] for q in questions], vectors,
                                                                          threshold)):
        if duplicate_of is None:
            kept.append(question)
        else:
            dropped.append({**question, "reason": f"near-duplicate: of {questions[duplicate_of]['id']} "
                                                  f"(cosine > near_duplicate_threshold {threshold})"})
    return kept, dropped


def drop_leakage(train: list[dict[str, Any]], eval_questions: list[dict[str, Any]], embed_model: Any,
                 threshold: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop eval questions whose embedding cosine similarity to some train question exceeds `threshold`."""
    import numpy as np

    if not train or not eval_questions:
        return eval_questions, []
    train_vectors = np.asarray(embed_model.get_text_embedding_batch([q["question"] for q in train]))
    eval_vectors = np.asarray(embed_model.get_text_embedding_batch([q["question"] for q in eval_questions]))
    train_vectors /= np.linalg.norm(train_vectors, axis=1, keepdims=True)
    eval_vectors /= np.linalg.norm(eval_vectors, axis=1, keepdims=True)
    similarity = eval_vectors @ train_vectors.T
    kept, leaked = [], []
    for question, row in zip(eval_questions, similarity):
        nearest = int(row.argmax())
        if row[nearest] > threshold:
            leaked.append({**question, "reason": f"leakage: similarity {row[nearest]:.3f} > {threshold} "
                                                 f"to train question {train[nearest]['id']}"})
        else:
            kept.append(question)
    return kept, leaked
