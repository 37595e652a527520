"""`ragtune prep CONFIG`: documents → chunks → index → held-out split → questions → teacher RAG answers.

The LlamaIndex "GPT-4 teaches GPT-3.5" recipe, made robust, resumable and fit for local models:

1. chunks     read PDF/MD/TXT/HTML into clean page Documents (`documents.py`), split them with
              LlamaIndex's `SentenceSplitter` → data/chunks.jsonl (id, text, metadata: file, page)
2. index      embed the chunks into a `VectorStoreIndex` persisted under data/index/ (`rag.py`), which
              eval and serve reload for the very same retrieval
3. split      a seeded shuffle of pages (or documents): the first `train_fraction` of them give training
              questions, the rest held-out evaluation questions — never both from one page
4. questions  the teacher writes `num_questions_per_chunk` questions per chunk; the output is parsed
              (numbering, preambles, non-questions), de-duplicated and checked for answerability
              against its source chunk; eval questions too close to a train question are dropped
              (leakage). Every dropped question is kept in data/questions.rejected.jsonl with its reason
5. answers    for each training question: retrieve `similarity_top_k` chunks, build the exact messages
              eval will send (`build_rag_messages`), batch them through the teacher, append
              {"messages": [system, user, assistant], "meta": {...}} rows to data/train.jsonl
6. stats      validate the file and describe it (tokens with the student's tokenizer, cost) → data/stats.json

Each step records a fingerprint of its inputs in data/prep_state.json: a finished step with the same
fingerprint is skipped, an unfinished one resumes (questions and answers are appended as they arrive,
so a run killed with -9 redoes at most one batch), and a changed one starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tqdm.auto import tqdm

from data_prep.config import DataPrepConfig
from data_prep.rag import build_closed_book_messages, build_rag_messages, retrieve
from ragtune.artifacts import JsonlAppender, read_jsonl, write_json, write_jsonl
from ragtune.errors import UserFacingError
from ragtune.run_dir import RunDir, sha256_file

if TYPE_CHECKING:
    from llama_index.core import VectorStoreIndex

    from ragtune.config import RagtuneConfig
    from ragtune.llm import ChatBackend

log = logging.getLogger(__name__)

EVAL_SLACK = 0.2  # generate this many more eval questions than needed: the leakage check drops some


class PrepError(UserFacingError):
    """The stage cannot produce a usable dataset; says why and what to change."""


def run(config: "RagtuneConfig", run_dir: RunDir, teacher: "ChatBackend | None" = None) -> dict[str, Any]:
    """Build the training set and the held-out questions; return facts for the manifest.

    `teacher` overrides the backend built from `config.teacher` (it is only built when questions or
    answers still need the teacher).
    """
    from data_prep.rag import embedding_model

    run_dir.data.mkdir(parents=True, exist_ok=True)
    state = StepState(run_dir.prep_state)
    facts: dict[str, Any] = {"skipped_steps": []}
    teacher_backend = LazyBackend(lambda: teacher or _make_teacher(config))
    embed_model = embedding_model(config.embedding)

    chunks = make_chunks(config, run_dir, state, facts)
    index = make_index(config, run_dir, state, chunks, embed_model, facts)
    split = split_regions(chunks, config.data_prep, config.seed)
    facts.update(train_regions=len(split["train"]), eval_regions=len(split["eval"]))
    make_questions(config, run_dir, state, chunks, split, teacher_backend, embed_model, facts)
    make_answers(config, run_dir, state, index, teacher_backend, facts)
    facts["stats"] = describe(config, run_dir, facts)
    return facts


# --- 1. chunks ------------------------------------------------------------------------------------


def make_chunks(config: "RagtuneConfig", run_dir: RunDir, state: "StepState", facts: dict[str, Any]) -> list[dict[str, Any]]:
    """Read, clean and split the documents into data/chunks.jsonl; return the chunk rows."""
    from llama_index.core.node_parser import SentenceSplitter

    from data_prep.documents import CLEANING_VERSION, load_documents

    prep = config.data_prep
    fingerprint = _fingerprint(
        [(str(p), sha256_file(p)) for p in config.document_paths], prep.chunk_size, prep.chunk_overlap, CLEANING_VERSION
    )
    if state.is_done("chunks", fingerprint, run_dir.chunks):
        facts["skipped_steps"].append("chunks")
        chunks = read_jsonl(run_dir.chunks)
        facts.update(state.facts("chunks"))
        return chunks
    state.start("chunks", fingerprint, [run_dir.chunks])

    documents, warnings = load_documents(config.document_paths)
    splitter = SentenceSplitter(chunk_size=prep.chunk_size, chunk_overlap=prep.chunk_overlap)
    nodes = splitter.get_nodes_from_documents(documents, show_progress=len(documents) > 50)
    chunks = []
    per_page: dict[tuple[str, int], int] = {}
    for node in nodes:
        file, page = node.metadata["file_path"], node.metadata["page"]
        number = per_page.get((file, page), 0)
        per_page[(file, page)] = number + 1
        chunks.append({"id": _chunk_id(node.metadata, number), "text": node.get_content(), "metadata": dict(node.metadata)})
    write_jsonl(run_dir.chunks, chunks)
    step_facts = {"documents": len({d.metadata["file_path"] for d in documents}), "pages": len(documents),
                  "chunks": len(chunks), "document_warnings": warnings}
    state.finish("chunks", **step_facts)
    facts.update(step_facts)
    return chunks


def _chunk_id(metadata: dict[str, Any], number: int) -> str:
    """Readable and stable: `<file stem>-<short hash>-p<page>-c<n>`; the hash of the document's path below
    the documents' common folder tells apart equal names and does not change when the folder moves."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(metadata["file"]).stem)
    path_hash = hashlib.sha1(metadata["document"].encode()).hexdigest()[:6]
    return f"{stem}-{path_hash}-p{metadata['page']}-c{number}"


# --- 2. index -------------------------------------------------------------------------------------


def make_index(config: "RagtuneConfig", run_dir: RunDir, state: "StepState", chunks: list[dict[str, Any]],
               embed_model: Any, facts: dict[str, Any]) -> "VectorStoreIndex":
    """Embed the chunks into a persisted `VectorStoreIndex` (or reload it when it is up to date)."""
    from llama_index.core.schema import TextNode

    from data_prep.rag import build_index, load_index

    fingerprint = _fingerprint(state.fingerprint("chunks"), config.embedding.model)
    if state.is_done("index", fingerprint, run_dir.index / "docstore.json"):
        facts["skipped_steps"].append("index")
        return load_index(config, run_dir, embed_model)
    state.start("index", fingerprint, [run_dir.index])
    nodes = [
        TextNode(id_=c["id"], text=c["text"], metadata=c["metadata"],
                 excluded_embed_metadata_keys=list(c["metadata"]), excluded_llm_metadata_keys=list(c["metadata"]))
        for c in chunks
    ]
    index = build_index(nodes, embed_model, run_dir.index)
    state.finish("index")
    return index


# --- 3. held-out split ----------------------------------------------------------------------------


def region_of(chunk: dict[str, Any], split_unit: str) -> str:
    """The page (`file#page=N`) or document a chunk belongs to: the unit the split never cuts through."""
    metadata = chunk["metadata"]
    return metadata["document"] if split_unit == "document" else f"{metadata['document']}#page={metadata['page']}"


def split_regions(chunks: list[dict[str, Any]], prep: DataPrepConfig, seed: int) -> dict[str, set[str]]:
    """Shuffle the pages (or documents) with the seed; the first `train_fraction` train, the rest eval."""
    regions = sorted({region_of(c, prep.split_unit) for c in chunks})
    if len(regions) < 2:
        raise PrepError(
            f"only {len(regions)} {prep.split_unit} with text: a held-out split needs at least 2. "
            + ("Use `data_prep.split_unit: page`." if prep.split_unit == "document" else "Add documents.")
        )
    random.Random(seed).shuffle(regions)
    n_train = min(len(regions) - 1, max(1, round(prep.train_fraction * len(regions))))
    return {"train": set(regions[:n_train]), "eval": set(regions[n_train:])}


# --- 4. questions ---------------------------------------------------------------------------------


def make_questions(config: "RagtuneConfig", run_dir: RunDir, state: "StepState", chunks: list[dict[str, Any]],
                   split: dict[str, set[str]], teacher: "LazyBackend", embed_model: Any, facts: dict[str, Any]) -> None:
    """Generate, parse and filter questions per split; write questions.{train,eval}.jsonl and the rejects."""
    prep = config.data_prep
    fingerprint = _fingerprint(
        state.fingerprint("chunks"), config.teacher.model, config.teacher.max_new_tokens, config.teacher.temperature,
        config.embedding.model, config.seed,
        prep.model_dump(include={"train_fraction", "split_unit", "num_questions_per_chunk", "num_train_questions",
                                 "num_eval_questions", "question_prompt", "answerable_check", "min_lexical_overlap",
                                 "leakage_threshold"}),
    )
    outputs = [run_dir.questions_raw, run_dir.questions_train, run_dir.questions_eval, run_dir.questions_rejected]
    if state.is_done("questions", fingerprint, run_dir.questions_train):
        facts["skipped_steps"].append("questions")
        facts.update(state.facts("questions"))
        return
    state.start("questions", fingerprint, outputs)

    targets = {"train": prep.num_train_questions, "eval": prep.num_eval_questions}
    with JsonlAppender(run_dir.questions_raw, key="chunk_id") as raw, \
            JsonlAppender(run_dir.teacher_failures, key="id") as failures:
        for split_name in ("train", "eval"):
            order = [c for c in chunks if region_of(c, prep.split_unit) in split[split_name]]
            random.Random(f"{config.seed}:{split_name}").shuffle(order)
            need = targets[split_name] + (math.ceil(EVAL_SLACK * targets[split_name]) if split_name == "eval" else 0)
            _generate_questions(split_name, order, need, prep, teacher, raw, failures)
        raw_rows = {row["chunk_id"]: row for row in raw.rows}

    chunk_by_id = {c["id"]: c for c in chunks}
    selected: dict[str, list[dict[str, Any]]] = {}
    rejected: list[dict[str, Any]] = []
    for split_name in ("train", "eval"):
        rows = [r for r in raw_rows.values() if r["split"] == split_name]
        kept, dropped = _select(rows, chunk_by_id)
        selected[split_name] = kept
        rejected.extend(dropped)
    for split_name in ("train", "eval"):
        if split_name == "eval":
            selected["eval"], leaked = drop_leakage(selected["train"], selected["eval"], embed_model, prep.leakage_threshold)
            rejected.extend(leaked)
        surplus = selected[split_name][targets[split_name]:]
        selected[split_name] = selected[split_name][: targets[split_name]]
        rejected.extend({**q, "reason": f"surplus: num_{split_name}_questions reached"} for q in surplus)

    if not selected["train"]:
        raise PrepError(
            f"no usable training question out of {sum(len(r['candidates']) for r in raw_rows.values())} generated "
            f"(see {run_dir.questions_rejected} for the reasons). Use a stronger teacher, raise teacher.max_new_tokens, "
            "or relax data_prep.answerable_check."
        )
    write_jsonl(run_dir.questions_rejected, rejected)
    write_jsonl(run_dir.questions_train, selected["train"])
    write_jsonl(run_dir.questions_eval, selected["eval"])
    warnings = [
        f"only {len(selected[s])} of {targets[s]} {s} questions: the {s} pages ran out of chunks "
        f"(raise num_questions_per_chunk, add documents, or lower num_{s}_questions)"
        for s in ("train", "eval") if len(selected[s]) < targets[s]
    ]
    for warning in warnings:
        log.warning(warning)
    step_facts = {"questions_train": len(selected["train"]), "questions_eval": len(selected["eval"]),
                  "questions_rejected": _count(r["reason"].split(":")[0] for r in rejected), "question_warnings": warnings}
    state.finish("questions", **step_facts)
    facts.update(step_facts)


def _generate_questions(split_name: str, order: list[dict[str, Any]], need: int, prep: DataPrepConfig,
                        teacher: "LazyBackend", raw: JsonlAppender, failures: JsonlAppender) -> None:
    """Ask the teacher for questions, chunk batch by chunk batch, until `need` usable ones exist."""
    def usable() -> int:
        rows = [r for r in raw.rows if r["split"] == split_name]
        return len({_normalize_question(c["question"]) for r in rows for c in r["candidates"] if not c.get("reason")})

    position = 0
    with tqdm(total=need, initial=min(usable(), need), desc=f"{split_name} questions", unit="q") as bar:
        while usable() < need and position < len(order):
            backend = teacher.get()
            batch = [c for c in order[position : position + backend.batch_size] if c["id"] not in raw.done_keys]
            position += backend.batch_size
            if not batch:
                continue
            prompts = [[{"role": "user", "content": question_prompt(c["text"], prep)}] for c in batch]
            # A row may stop once it holds num_questions_per_chunk kept questions: parsing keeps questions in
            # order, so the rest of the text could only add rejects.
            completions = backend.chat(prompts, stop_when=lambda text: len(
                parse_questions(text, prep.num_questions_per_chunk)[0]) >= prep.num_questions_per_chunk)
            parsed = [parse_questions(c.text or "", prep.num_questions_per_chunk) for c in completions]
            verdicts = _answerable(batch, parsed, completions, prep, backend)
            for chunk, completion, (kept, dropped), verdict in zip(batch, completions, parsed, verdicts):
                if completion.error is not None:
                    failures.append({"id": f"questions:{chunk['id']}:{time.time_ns()}", "step": "questions",
                                     "chunk_id": chunk["id"], "error": completion.error})
                    continue
                candidates = [{"question": q, "reason": reason} for q, reason in zip(kept, verdict)]
                candidates += [{"question": q, "reason": reason} for q, reason in dropped]
                raw.append({"chunk_id": chunk["id"], "split": split_name, "completion": completion.text,
                            "candidates": candidates})
            bar.n = min(usable(), need)
            bar.refresh()


def question_prompt(context: str, prep: DataPrepConfig) -> str:
    return (prep.question_prompt.replace("{context_str}", context)
            .replace("{num_questions_per_chunk}", str(prep.num_questions_per_chunk)))


_LIST_MARKER = re.compile(
    r"^\s*(?:[-*•>#]+\s*|\(?\d{1,2}[.):]\s+|\(?[a-zA-Z][.)]\s+|Q\d*\s*[.:)]\s*|(?:the\s+)?question\s*\d*\s*[.:)-]\s*)",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(sure|certainly|of course|here (is|are)|okay|ok\b|great|below|the following)", re.IGNORECASE)
_ANSWER = re.compile(r"^(answer|a\d*|solution|explanation)\s*[:.)-]", re.IGNORECASE)


def parse_questions(text: str, limit: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Questions from a teacher's reply: (kept, [(dropped, reason)]). Strips numbering and `Question:`
    prefixes, drops preambles, answers, non-questions, fragments and degenerate repetitions."""
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
        elif _normalize_question(question) in {_normalize_question(q) for q in kept}:
            reason = "duplicate"
        elif len(kept) >= limit:
            reason = "over num_questions_per_chunk"
        else:
            kept.append(question)
            continue
        dropped.append((question, reason))
    return kept, dropped


def _is_degenerate(question: str) -> bool:
    words = question.lower().split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(words) > 60 or (bool(trigrams) and max(trigrams.count(t) for t in set(trigrams)) >= 3)


def _normalize_question(question: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", question.lower()))


# Function words and the words every question has; what is left must occur in the source chunk.
STOPWORDS = set("""
a an the and or but if then of to in on at by for with from as into about over under between after before during
is are was were be been being am do does did done has have had having can could will would shall should may might
must what which who whom whose when where why how that this these those there here it its they them their we our
you your he she his her i me my not no yes than so such also any all each both some more most other only own same
very just according context text passage document question quiz examination based mentioned described provided
""".split())


def _content_words(text: str) -> set[str]:
    words = re.findall(r"[a-z0-9]+(?:[.,][0-9]+)*", text.lower())
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if w not in STOPWORDS}


def lexical_overlap(question: str, context: str) -> float:
    """The share of the question's content words found in the context (0 when it has none)."""
    words = _content_words(question)
    return len(words & _content_words(context)) / len(words) if words else 0.0


ANSWERABLE_SCHEMA = {"title": "answerable", "type": "object", "properties": {"answerable": {"type": "boolean"}},
                     "required": ["answerable"], "additionalProperties": False}
ANSWERABLE_PROMPT = (
    "Context information is below.\n---------------------\n{context_str}\n---------------------\n"
    "Can the question below be answered from the context information alone? "
    'Reply with JSON: {"answerable": true} or {"answerable": false}.\nQuestion: {query_str}'
)


def _answerable(batch: list[dict[str, Any]], parsed: list[tuple[list[str], list[tuple[str, str]]]],
                completions: list[Any], prep: DataPrepConfig, backend: "ChatBackend") -> list[list[str | None]]:
    """For each chunk, a drop reason (or None) per kept question, by the configured answerability check."""
    pairs = [(i, q) for i, (kept, _) in enumerate(parsed) for q in kept]
    verdicts: list[list[str | None]] = [[None] * len(kept) for kept, _ in parsed]
    if prep.answerable_check == "none" or not pairs:
        return verdicts
    if prep.answerable_check == "lexical":
        for i, (kept, _) in enumerate(parsed):
            for j, question in enumerate(kept):
                overlap = lexical_overlap(question, batch[i]["text"])
                if overlap < prep.min_lexical_overlap:
                    verdicts[i][j] = f"unanswerable: lexical overlap {overlap:.2f} < min_lexical_overlap {prep.min_lexical_overlap}"
        return verdicts
    conversations = [[{"role": "user", "content": ANSWERABLE_PROMPT.replace("{context_str}", batch[i]["text"])
                       .replace("{query_str}", q)}] for i, q in pairs]
    answers = backend.chat(conversations, max_new_tokens=16, json_schema=ANSWERABLE_SCHEMA)
    position: dict[int, int] = {}
    for (i, _), answer in zip(pairs, answers):
        j = position.get(i, 0)
        position[i] = j + 1
        try:
            answerable = answer.error is None and bool(json.loads(answer.text).get("answerable", False))
        except (json.JSONDecodeError, AttributeError):
            answer.error = f"not JSON: {answer.text[:80]!r}"
            answerable = False
        if answer.error is not None:
            verdicts[i][j] = f"unanswerable check failed: {answer.error}"
        elif not answerable:
            verdicts[i][j] = "unanswerable: the teacher says the source chunk does not answer it"
    return verdicts


def _select(raw_rows: list[dict[str, Any]], chunk_by_id: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
            key = _normalize_question(candidate["question"])
            if candidate.get("reason"):
                rejected.append({**question, "reason": candidate["reason"]})
            elif key in seen:
                rejected.append({**question, "reason": f"duplicate of {seen[key]}"})
            else:
                seen[key] = question["id"]
                kept.append(question)
    return kept, rejected


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


# --- 5. teacher answers through the RAG pipeline --------------------------------------------------


def make_answers(config: "RagtuneConfig", run_dir: RunDir, state: "StepState", index: "VectorStoreIndex",
                 teacher: "LazyBackend", facts: dict[str, Any]) -> None:
    """Answer every training question through retrieval + the teacher; append rows to data/train.jsonl."""
    prep = config.data_prep
    fingerprint = _fingerprint(
        state.fingerprint("questions"), state.fingerprint("index"), config.teacher.model,
        config.teacher.max_new_tokens, config.teacher.temperature, config.seed,
        prep.model_dump(include={"similarity_top_k", "system_prompt", "text_qa_template", "raft",
                                 "closed_book_rows", "closed_book_system_prompt"}),
    )
    if state.is_done("answers", fingerprint, run_dir.train_jsonl):
        facts["skipped_steps"].append("answers")
        facts.update(state.facts("answers"))
        return
    state.start("answers", fingerprint, [run_dir.train_jsonl])

    questions = read_jsonl(run_dir.questions_train)
    chunk_text = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks)}
    top_k = prep.raft.num_distractors + 1 if prep.raft.enabled else prep.similarity_top_k
    started, generated = time.perf_counter(), 0
    hits = retrieve(index, [q["question"] for q in questions], top_k)
    contexts = [choose_contexts(q, found, prep, config.seed, chunk_text) for q, found in zip(questions, hits)]
    conversations = [build_rag_messages(q["question"], [chunk_text[i] for i in ids], prep)
                     for q, (ids, _) in zip(questions, contexts)]
    # Batches group prompts of similar length (less padding) in a fixed order, so a resumed run regenerates
    # a partly saved batch with exactly the same neighbours (same padding) and gets exactly the same rows.
    order = sorted(range(len(questions)), key=lambda i: (len(conversations[i][-1]["content"]), questions[i]["id"]))
    with JsonlAppender(run_dir.train_jsonl, key="id") as rows, \
            JsonlAppender(run_dir.teacher_failures, key="id") as failures, \
            tqdm(total=len(questions), desc="teacher answers", unit="row") as bar:
        bar.update(sum(q["id"] in rows.done_keys for q in questions))
        batch_size = teacher.get().batch_size if any(q["id"] not in rows.done_keys for q in questions) else 1
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if all(questions[i]["id"] in rows.done_keys for i in batch):
                continue
            completions = teacher.get().chat([_teacher_view(conversations[i], prep) for i in batch])
            for i, completion in zip(batch, completions):
                question, messages, (ids, oracle_in) = questions[i], conversations[i], contexts[i]
                if question["id"] in rows.done_keys:
                    continue
                error = completion.error or (None if (completion.text or "").strip() else "empty answer")
                if error is not None:
                    failures.append({"id": f"answers:{question['id']}:{time.time_ns()}", "step": "answers",
                                     "question_id": question["id"], "error": error})
                    continue
                meta = {"question_id": question["id"], "source_chunk_id": question["source_chunk_id"],
                        "retrieved_ids": ids, "oracle_in_context": oracle_in, "teacher_model": teacher.get().model_name,
                        "mode": "rag", "usage": {"prompt_tokens": completion.prompt_tokens,
                                                 "completion_tokens": completion.completion_tokens}}
                answer = completion.text.strip()
                if prep.closed_book_rows:  # written first: the RAG row's id marks the pair as done
                    rows.append({"id": f"{question['id']}:closed_book",
                                 "messages": build_closed_book_messages(question["question"], prep)
                                 + [{"role": "assistant", "content": _final_answer(answer)}],
                                 "meta": {**meta, "mode": "closed_book", "retrieved_ids": [], "usage": None}})
                rows.append({"id": question["id"], "messages": messages + [{"role": "assistant", "content": answer}],
                             "meta": meta})
                generated += 1
                bar.update(1)
        answered = {r["meta"]["question_id"] for r in rows.rows if r["meta"]["mode"] == "rag"}
    seconds = time.perf_counter() - started
    step_facts = {"train_rows": len(answered) * (2 if prep.closed_book_rows else 1),
                  "questions_without_answer": len(questions) - len(answered)}
    if generated:
        step_facts["teacher_rows_per_s"] = round(generated / seconds, 3)
    if not answered:
        raise PrepError(f"the teacher answered none of {len(questions)} questions; see {run_dir.teacher_failures}.")
    if step_facts["questions_without_answer"]:
        log.warning("%d questions have no answer (failed teacher calls, see %s); run prep again to retry them",
                    step_facts["questions_without_answer"], run_dir.teacher_failures)
        facts.update(step_facts)
        return  # not finished: the next run retries the failed questions
    state.finish("answers", **step_facts)
    facts.update(step_facts)


def choose_contexts(question: dict[str, Any], hits: list[dict[str, Any]], prep: DataPrepConfig, seed: int,
              chunk_text: dict[str, str]) -> tuple[list[str], bool]:
    """The context chunk ids for a question, and whether its oracle (source chunk) is among them.

    RAFT draws, per question and seeded by its id, whether the oracle is included; the distractors are
    the retrieved non-oracle chunks, topped up with random chunks.
    """
    oracle = question["source_chunk_id"]
    if not prep.raft.enabled:
        ids = [h["id"] for h in hits[: prep.similarity_top_k]]
        return ids, oracle in ids
    rng = random.Random(f"{seed}:{question['id']}")
    with_oracle = rng.random() < prep.raft.oracle_probability
    wanted = prep.raft.num_distractors + (0 if with_oracle else 1)
    distractors = [h["id"] for h in hits if h["id"] != oracle][:wanted]
    others = sorted(set(chunk_text) - set(distractors) - {oracle})
    distractors += rng.sample(others, min(len(others), wanted - len(distractors)))
    ids = distractors + ([oracle] if with_oracle else [])
    rng.shuffle(ids)
    return ids, with_oracle


def _teacher_view(messages: list[dict[str, str]], prep: DataPrepConfig) -> list[dict[str, str]]:
    """What the teacher is sent: the training messages, plus the chain-of-thought instruction in RAFT CoT mode
    (the saved row keeps the plain messages, which are the ones eval sends)."""
    if not (prep.raft.enabled and prep.raft.chain_of_thought):
        return messages
    return messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + prep.raft.chain_of_thought_instruction}]


def _final_answer(answer: str) -> str:
    """The answer without RAFT chain-of-thought reasoning (for closed-book rows)."""
    return answer.rsplit("<ANSWER>:", 1)[-1].strip() or answer


# --- 6. stats -------------------------------------------------------------------------------------


def describe(config: "RagtuneConfig", run_dir: RunDir, facts: dict[str, Any]) -> dict[str, Any]:
    """Validate data/train.jsonl with the student's tokenizer and write data/stats.json."""
    from data_prep.validate import validate_chat_jsonl
    from train.models import load_tokenizer

    sft = config.train.sft_kwargs()
    teacher = config.teacher
    prices = None
    if teacher.price_per_million_input_tokens is not None or teacher.price_per_million_output_tokens is not None:
        prices = (teacher.price_per_million_input_tokens or 0.0, teacher.price_per_million_output_tokens or 0.0)
    stats = validate_chat_jsonl(
        run_dir.train_jsonl, tokenizer=load_tokenizer(config.student.model, config.student.trust_remote_code),
        max_length=sft.get("max_length", 1024), epochs=float(sft.get("num_train_epochs", 3.0)), prices=prices,
    )
    stats["dataset"] = {key: facts[key] for key in (
        "documents", "pages", "chunks", "train_regions", "eval_regions", "questions_train", "questions_eval",
        "questions_rejected", "train_rows", "questions_without_answer") if key in facts}
    run_dir.stats.write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return {key: stats[key] for key in ("rows", "tokens_total", "training_tokens", "rows_over_max_length") if key in stats}


# --- plumbing: resumable steps and the lazily built teacher ---------------------------------------


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepState:
    """data/prep_state.json: per step, the fingerprint of its inputs, whether it finished, and its facts."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, Any]] = json.loads(path.read_text("utf-8")) if path.exists() else {}

    def fingerprint(self, step: str) -> str | None:
        return self.steps.get(step, {}).get("fingerprint")

    def facts(self, step: str) -> dict[str, Any]:
        return self.steps.get(step, {}).get("facts", {})

    def is_done(self, step: str, fingerprint: str, output: Path) -> bool:
        entry = self.steps.get(step, {})
        return entry.get("fingerprint") == fingerprint and entry.get("done", False) and output.exists()

    def start(self, step: str, fingerprint: str, outputs: list[Path]) -> None:
        """Begin (or resume) a step; outputs made under other inputs are removed first."""
        if self.fingerprint(step) != fingerprint:
            for output in outputs:
                if output.is_dir():
                    shutil.rmtree(output)
                elif output.exists():
                    output.unlink()
            if step in self.steps:
                log.info("prep step %s: inputs changed, starting it over", step)
        self.steps[step] = {"fingerprint": fingerprint, "done": False}
        self._save()

    def finish(self, step: str, **facts: Any) -> None:
        self.steps[step].update(done=True, facts=facts)
        self._save()

    def _save(self) -> None:
        write_json(self.path, self.steps)


class LazyBackend:
    """Builds the teacher on first use, so a rerun with nothing left to generate never loads it."""

    def __init__(self, factory: Callable[[], "ChatBackend"]):
        self._factory = factory
        self._value: "ChatBackend | None" = None

    def get(self) -> "ChatBackend":
        if self._value is None:
            self._value = self._factory()
        return self._value


def _make_teacher(config: "RagtuneConfig") -> "ChatBackend":
    from ragtune.llm import make_backend

    return make_backend(config.teacher)


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts
