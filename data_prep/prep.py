"""`ragtune prep CONFIG`: documents → chunks → index → held-out split → questions → teacher RAG answers.

The LlamaIndex "GPT-4 teaches GPT-3.5" recipe, made robust, resumable and fit for local models:

1. chunks     read PDF/MD/TXT/HTML into clean page Documents (`documents.py`), split them with
              LlamaIndex's `SentenceSplitter` → data/chunks.jsonl (id, text, metadata: file, page)
2. index      embed the chunks into a `VectorStoreIndex` persisted under data/index/ (`ragtune.core.rag`),
              which eval and serve reload for the very same retrieval (the teacher starts during steps 1-2);
              with `retriever:`, steps 1-2 take the nodes of your own LlamaIndex index and retrieve through it
              (`own_index.py`)
3. split      a seeded shuffle of pages (or documents): the first `train_fraction` of them give training
              questions, the rest held-out evaluation questions — never both from one page
4. questions  the teacher writes `num_questions_per_chunk` questions per chunk; the output is parsed,
              de-duplicated and checked for answerability against its source chunk; eval questions too
              close to a train question are dropped (leakage) (`questions.py`). Every dropped question
              is kept in data/questions.rejected.jsonl with its reason
5. answers    for each training question: retrieve chunks, build the exact messages eval will send
              (`build_rag_messages`), batch them through the teacher, append
              {"messages": [system, user, assistant], "meta": {...}} rows to data/train.jsonl
6. stats      check the rows and describe them (rows, modes, teacher cost) → data/stats.json; token counts
              need the student's tokenizer and `max_length`, so the train stage computes them

Each step records a fingerprint of its inputs in data/prep_state.json (`state.py`): a finished step with the
same fingerprint is skipped, an unfinished one resumes (questions and answers are appended as they arrive,
so a run killed with -9 redoes at most one batch), and a changed one starts over.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ragtune.core.artifacts import JsonlAppender, read_jsonl, write_json, write_jsonl
from ragtune.core.chat_rows import validate_chat_jsonl
from ragtune.core.errors import UserFacingError, check_failures
from ragtune.core.gpu_plan import gpu_plan
from ragtune.core.rag import build_rag_messages, embedding_model, retrieve
from ragtune.core.run_dir import RunDir, sha256_file, short_hash
from ragtune.core.llm import LazyBackend, check_same_tokenizer, make_backend
from ragtune.core.llm.overlap import depth_for, overlapped
from ragtune.core.teacher import teacher_fingerprint
from ragtune.data_prep.config import DataPrepConfig
from ragtune.data_prep.answers import AnswerJob, answer_all
from ragtune.data_prep.questions import (
    answerable_verdicts, enough_questions, filter_questions, parse_questions, question_prompt, roundtrip_verdicts,
)
from ragtune.data_prep.state import StepState

if TYPE_CHECKING:
    from llama_index.core import VectorStoreIndex

    from ragtune.app.config import RagtuneConfig
    from ragtune.core.llm import ChatBackend

log = logging.getLogger(__name__)

class PrepError(UserFacingError):
    """The stage cannot produce a usable dataset; says why and what to change."""


def run(config: "RagtuneConfig", run_dir: RunDir, teacher: "ChatBackend | None" = None) -> dict[str, Any]:
    """Build the training set and the held-out questions; return facts for the manifest.

    `teacher` overrides the backend built from `config.teacher` (it is only built when questions or
    answers still need the teacher).
    """
    run_dir.data.mkdir(parents=True, exist_ok=True)
    state = StepState(run_dir)
    servers = gpu_plan(config)  # where managed vLLM servers run: GPUs, tensor parallelism, memory, context length
    teacher_backend = LazyBackend(lambda: teacher or make_backend(config.teacher, run_dir.logs, servers.teacher))
    # the judge only for data_prep.answer_gates.llm_faithfulness
    judge_backend = LazyBackend(lambda: make_backend(config.judge, run_dir.logs, servers.judge))
    embed_model = embedding_model(config.embedding)
    if config.retriever is None and config.data_prep.chunk_size > embed_model.max_length:  # --dry-run says it too
        log.warning("data_prep.chunk_size %d is longer than the %d word pieces %s reads: retrieval and the leakage, "
                    "near-duplicate and round-trip checks see only the start of each chunk", config.data_prep.chunk_size,
                    embed_model.max_length, config.embedding.model)

    ################
    # 1-2. Chunks and index; the teacher starts meanwhile when prep has anything left to write
    ################
    def chunks_and_index() -> tuple[list[dict[str, Any]], dict[str, Any], "VectorStoreIndex"]:
        chunks, chunk_facts = make_chunks(config, run_dir, state)
        return chunks, chunk_facts, make_index(config, run_dir, state, chunks, embed_model)

    chunks, chunk_facts, index = teacher_backend.build_during(chunks_and_index, when=not state.all_done())

    ################
    # 3. Held-out split
    ################
    split = split_regions(chunks, config.data_prep, config.seed)
    split_facts = {"train_regions": len(split["train"]), "eval_regions": len(split["eval"])}

    ################
    # 4. Questions
    ################
    question_facts = make_questions(config, run_dir, state, chunks, split, teacher_backend, embed_model, index)

    ################
    # 5. Teacher answers
    ################
    answer_facts = make_answers(config, run_dir, state, index, split, teacher_backend, judge_backend)

    ################
    # 6. Stats
    ################
    facts = {**chunk_facts, **split_facts, **question_facts, **answer_facts}
    stats = describe(config, run_dir, facts)
    return {"skipped_steps": state.skipped, **facts, "stats": stats}


# --- 1. chunks ------------------------------------------------------------------------------------


def make_chunks(config: "RagtuneConfig", run_dir: RunDir, state: StepState) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read, clean and split the documents into data/chunks.jsonl (or take the nodes of your own index,
    `retriever:`); return the chunk rows and their facts."""
    from llama_index.core.node_parser import SentenceSplitter

    if config.retriever is not None:
        from ragtune.data_prep.own_index import index_chunks

        return index_chunks(config, run_dir, state)

    from ragtune.data_prep.documents import CLEANING_VERSION, load_documents

    prep = config.data_prep
    fingerprint = short_hash(
        [(str(p), sha256_file(p)) for p in config.document_paths], prep.chunk_size, prep.chunk_overlap, CLEANING_VERSION
    )
    if state.is_done("chunks", fingerprint, run_dir.chunks):
        return read_jsonl(run_dir.chunks), state.facts("chunks")
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
    facts = {"documents": len({d.metadata["file_path"] for d in documents}), "pages": len(documents),
             "chunks": len(chunks), "document_warnings": warnings}
    state.finish("chunks", **facts)
    return chunks, facts


def _chunk_id(metadata: dict[str, Any], number: int) -> str:
    """Readable and stable: `<file stem>-<short hash>-p<page>-c<n>`; the hash of the document's path below
    the documents' common folder tells apart equal names and does not change when the folder moves."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(metadata["file"]).stem)
    path_hash = hashlib.sha1(metadata["document"].encode()).hexdigest()[:6]
    return f"{stem}-{path_hash}-p{metadata['page']}-c{number}"


# --- 2. index -------------------------------------------------------------------------------------


def make_index(config: "RagtuneConfig", run_dir: RunDir, state: StepState, chunks: list[dict[str, Any]],
               embed_model: Any) -> "VectorStoreIndex":
    """Embed the chunks into a persisted `VectorStoreIndex` (or reload it when it is up to date); with
    `retriever:`, open your own index instead."""
    from llama_index.core.schema import TextNode

    if config.retriever is not None:
        from ragtune.data_prep.own_index import own_index

        return own_index(config, run_dir, state, embed_model)

    from ragtune.core.rag import build_index, load_index

    fingerprint = short_hash(state.fingerprint("chunks"), config.embedding.model)
    if state.is_done("index", fingerprint, run_dir.index / "docstore.json"):
        return load_index(config.embedding, run_dir.index, embed_model)
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
    """The page (`file#page=N`) or document a chunk belongs to: the unit the split never cuts through (a node of
    your own index without a page label: its document)."""
    metadata = chunk["metadata"]
    if split_unit == "document" or metadata["page"] is None:
        return metadata["document"]
    return f"{metadata['document']}#page={metadata['page']}"


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


def make_questions(config: "RagtuneConfig", run_dir: RunDir, state: StepState, chunks: list[dict[str, Any]],
                   split: dict[str, set[str]], teacher: LazyBackend, embed_model: Any,
                   index: "VectorStoreIndex") -> dict[str, Any]:
    """Generate, parse and filter questions per split; write questions.{train,eval}.jsonl and the rejects."""
    prep = config.data_prep
    fingerprint = short_hash(
        state.fingerprint("chunks"), config.teacher.model, config.teacher.max_new_tokens, config.teacher.temperature,
        config.embedding.model, config.seed,
        prep.model_dump(include={"train_fraction", "split_unit", "num_questions_per_chunk", "num_train_questions",
                                 "num_eval_questions", "question_prompt", "answerable_check", "min_lexical_overlap",
                                 "leakage_threshold", "near_duplicate_threshold"}),
        *([prep.roundtrip_top_k, prep.roundtrip_splits, state.fingerprint("index")] if prep.roundtrip_top_k else []),
    )
    outputs = [run_dir.questions_raw, run_dir.questions_train, run_dir.questions_eval, run_dir.questions_rejected]
    if state.is_done("questions", fingerprint, run_dir.questions_train):
        return state.facts("questions")
    state.start("questions", fingerprint, outputs)

    targets = {"train": prep.num_train_questions, "eval": prep.num_eval_questions}
    selected = _ask_until_kept(config, run_dir, chunks, split, targets, teacher, index, embed_model)
    rejected = selected.pop("rejected")
    if not selected["train"]:
        raise PrepError(
            f"no usable training question out of {len(rejected) + len(selected['eval'])} generated "
            f"(see {run_dir.questions_rejected} for the reasons). Use a stronger teacher, raise teacher.max_new_tokens, "
            "or relax data_prep.answerable_check."
        )
    write_jsonl(run_dir.questions_rejected, rejected)
    write_jsonl(run_dir.questions_train, selected["train"])
    write_jsonl(run_dir.questions_eval, selected["eval"])
    warnings = [
        f"only {len(selected[s])} of {targets[s]} {s} questions left after the filters (reasons in "
        f"{run_dir.questions_rejected.name}): raise num_questions_per_chunk, add documents, or lower num_{s}_questions"
        for s in ("train", "eval") if len(selected[s]) < targets[s]
    ]
    for warning in warnings:
        log.warning(warning)
    facts = {"questions_train": len(selected["train"]), "questions_eval": len(selected["eval"]),
             "questions_rejected": dict(Counter(r["reason"].split(":")[0] for r in rejected)),
             "question_warnings": warnings}
    state.finish("questions", **facts)
    return facts


def _ask_until_kept(config: "RagtuneConfig", run_dir: RunDir, chunks: list[dict[str, Any]], split: dict[str, set[str]],
                   targets: dict[str, int], teacher: LazyBackend, index: "VectorStoreIndex",
                   embed_model: Any) -> dict[str, list[dict[str, Any]]]:
    """The teacher's questions per chunk (data/questions.raw.jsonl, resumed), chunks in a seeded order per split,
    until the filters keep each split's target; returns the kept questions per split and every rejected one
    ("rejected"). Generation stops on the filtered count, not the raw one: a fixed 20 % margin for the
    near-duplicate and leakage filters asked ~100 of the demo's 512 chunks for questions that were then surplus."""
    prep = config.data_prep
    chunk_by_id = {c["id"]: c for c in chunks}
    embeddings = _CachedEmbeddings(embed_model)
    selected: dict[str, list[dict[str, Any]]] = {"rejected": []}
    with JsonlAppender(run_dir.questions_raw, key="chunk_id") as raw, \
            JsonlAppender(run_dir.teacher_failures, key="id") as failures:
        for split_name in ("train", "eval"):
            order = [c for c in chunks if region_of(c, prep.split_unit) in split[split_name]]
            random.Random(f"{config.seed}:{split_name}").shuffle(order)
            roundtrip = None
            if prep.roundtrip_top_k and split_name in prep.roundtrip_splits:
                # the check searches as the split is answered: train rows among train chunks, eval everywhere
                roundtrip = (index, sorted(c["id"] for c in order) if split_name == "train" else None)

            def kept(split_name: str = split_name) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
                rows = [r for r in raw.rows if r["split"] == split_name]
                return filter_questions(rows, chunk_by_id, prep, embeddings, selected.get("train"))

            _generate_questions(split_name, order, targets[split_name], prep, teacher, raw, failures, roundtrip,
                                lambda: len(kept()[0]))
            questions, rejected = kept()
            surplus = questions[targets[split_name]:]
            selected[split_name] = questions[: targets[split_name]]
            selected["rejected"] += rejected + [{**q, "reason": f"surplus: num_{split_name}_questions reached"}
                                                for q in surplus]
    return selected


# One batch embeds at a time: a tokenizer shared by two threads can fail ("Already borrowed"), and the two would
# only share the same cores.
_EMBEDDING = threading.Lock()


class _CachedEmbeddings:
    """The embedding model's vectors by text, each text embedded once: generation counts the kept questions after
    every batch, each count embedding only the new ones."""

    def __init__(self, embed_model: Any) -> None:
        self.embed_model, self.vectors = embed_model, {}

    def get_text_embedding_batch(self, texts: list[str]) -> list[list[float]]:
        new = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if new:
            with _EMBEDDING:
                self.vectors.update(zip(new, self.embed_model.get_text_embedding_batch(new)))
        return [self.vectors[t] for t in texts]


def _generate_questions(split_name: str, order: list[dict[str, Any]], need: int, prep: DataPrepConfig,
                        teacher: "LazyBackend", raw: JsonlAppender, failures: JsonlAppender,
                        roundtrip: tuple["VectorStoreIndex", list[str] | None] | None,
                        usable: Callable[[], int]) -> None:
    """Ask the teacher for questions, chunk batch by chunk batch, until `usable()` (the questions the filters keep)
    reaches `need`; `roundtrip` is the index and chunk ids the round-trip check searches (None: no check)."""
    sent = {"chunks": 0, "written": 0}  # this call's chunks asked and chunks written back

    def batches() -> Iterator[list[dict[str, Any]]]:
        position = 0
        while usable() < need and position < len(order):
            size = teacher.get().batch_size
            batch = [c for c in order[position : position + size] if c["id"] not in raw.done_keys]
            position += size
            if batch:
                sent["chunks"] += len(batch)
                yield batch

    def worth_asking_ahead() -> bool:
        """Whether the batches in flight, at the yield so far of usable questions per chunk, leave `need` unmet."""
        rows = sum(1 for r in raw.rows if r["split"] == split_name)
        per_chunk = usable() / rows if rows else 1.0
        return usable() + per_chunk * (sent["chunks"] - sent["written"]) < need

    def ask(batch: list[dict[str, Any]]) -> tuple[list[Any], list[Any], list[Any]]:
        backend = teacher.get()
        prompts = [[{"role": "user", "content": question_prompt(c["text"], prep)}] for c in batch]
        completions = backend.chat(prompts, stop_when=lambda text: enough_questions(text, prep.num_questions_per_chunk))
        parsed = [parse_questions(c.text or "", prep.num_questions_per_chunk) for c in completions]
        verdicts: list[list[str | None]] = [[None] * len(kept) for kept, _ in parsed]
        # the cheapest check first, each on what the ones before kept: words, a vector search, a teacher call
        if prep.answerable_check == "lexical":
            answerable_verdicts(batch, parsed, verdicts, prep, backend)
        if roundtrip is not None:
            index, node_ids = roundtrip
            with _EMBEDDING:
                roundtrip_verdicts(batch, parsed, verdicts, index, prep.roundtrip_top_k, node_ids)
        if prep.answerable_check == "teacher":
            answerable_verdicts(batch, parsed, verdicts, prep, backend)
        return completions, parsed, verdicts

    if usable() >= need:
        return  # nothing to ask: the teacher is not even built
    with tqdm(total=need, initial=min(usable(), need), desc=f"{split_name} questions", unit="q") as bar:
        # the next batch is asked while this one's tail generates, unless the one in flight should meet `need`
        for batch, (completions, parsed, verdicts) in overlapped(batches(), ask, depth_for(teacher.get()),
                                                                 ahead=worth_asking_ahead):
            sent["written"] += len(batch)
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


# --- 5. teacher answers through the RAG pipeline --------------------------------------------------


def make_answers(config: "RagtuneConfig", run_dir: RunDir, state: StepState, index: "VectorStoreIndex",
                 split: dict[str, set[str]], teacher: LazyBackend, judge: LazyBackend) -> dict[str, Any]:
    """Answer every training question through retrieval over train-region chunks + the teacher, gate every answer,
    and append kept rows to data/train.jsonl and rejected answers to data/answers.rejected.jsonl."""
    prep = config.data_prep
    fingerprint = short_hash(
        state.fingerprint("questions"), state.fingerprint("index"), teacher_fingerprint(config.teacher, prep),
        config.seed, prep.model_dump(include={"similarity_top_k", "system_prompt", "text_qa_template", "raft",
                                              "teacher_top_logprobs", "closed_book_rows", "closed_book_system_prompt"}),
    )
    logprobs_path = run_dir.teacher_logprobs
    if state.is_done("answers", fingerprint, run_dir.train_jsonl):
        return state.facts("answers")
    if prep.teacher_top_logprobs:  # before any teacher call: log-probs of another vocabulary teach nothing
        distillation = config.train.distillation
        check_same_tokenizer((distillation and distillation.teacher_tokenizer) or config.teacher.model,
                             config.student.model, config.student.trust_remote_code)
    state.start("answers", fingerprint, [run_dir.train_jsonl, run_dir.answers_rejected, logprobs_path])

    questions = read_jsonl(run_dir.questions_train)
    # Training rows (and RAFT distractors) come from train-region chunks only: no eval page is ever trained on.
    train_chunks = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks) if region_of(c, prep.split_unit) in split["train"]}
    hits = retrieve(index, [q["question"] for q in questions],
                    prep.raft_contexts if prep.raft.enabled else prep.similarity_top_k, node_ids=sorted(train_chunks))
    contexts = [choose_contexts(q, found, prep, config.seed, train_chunks) for q, found in zip(questions, hits)]
    jobs = [AnswerJob(q, build_rag_messages(q["question"], [train_chunks[i] for i in ids], prep),
                      [train_chunks[i] for i in ids], ids, oracle_in) for q, (ids, oracle_in) in zip(questions, contexts)]
    started = time.perf_counter()
    with JsonlAppender(run_dir.train_jsonl, key="id") as rows, \
            JsonlAppender(run_dir.answers_rejected, key="id") as rejected, \
            JsonlAppender(run_dir.teacher_failures, key="id") as failures, \
            (JsonlAppender(logprobs_path, key="id") if prep.teacher_top_logprobs else nullcontext()) as logprobs:
        generated = answer_all(jobs, config, teacher, judge, rows, rejected, failures, logprobs)
        answered = {r["meta"]["question_id"] for r in rows.rows if r["meta"]["mode"] == "rag"}
        refused = sum(1 for r in rows.rows if r["meta"]["mode"] == "rag" and r["meta"].get("refusal"))
        reasons = Counter(r["reason"] for r in rejected.rows)
        done = answered | {r["question_id"] for r in rejected.rows}
    facts: dict[str, Any] = {"train_rows": len(answered) * (2 if prep.closed_book_rows else 1),
                             "answers_kept": len(answered), "answers_rejected": dict(reasons),
                             "refusals_kept": refused, "questions_without_answer": len(questions) - len(done)}
    if generated:
        facts["teacher_rows_per_s"] = round(generated / (time.perf_counter() - started), 3)
    # the newest failures first: older ones may be from a cause already fixed
    errors = [r.get("error") for r in read_jsonl(run_dir.teacher_failures) if r.get("step") == "answers"][::-1]
    check_failures("prep's teacher answers", facts["questions_without_answer"], len(questions), errors,
                   prep.max_failure_fraction, run_dir.teacher_failures)
    if not answered:
        raise PrepError(f"no teacher answer of {len(questions)} passed the answer gates (reasons: {dict(reasons)}; "
                        f"see {run_dir.answers_rejected} and {run_dir.teacher_failures}). Use a stronger teacher, raise "
                        "teacher.max_new_tokens or teacher.num_candidates, or relax data_prep.answer_gates.")
    if facts["questions_without_answer"]:
        log.warning("%d questions have no answer (failed teacher calls, see %s); run prep again to retry them",
                    facts["questions_without_answer"], run_dir.teacher_failures)
        return facts  # not finished: the next run retries the failed questions
    state.finish("answers", **facts)
    return facts


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
    wanted = prep.raft_contexts - (1 if with_oracle else 0)
    distractors = [h["id"] for h in hits if h["id"] != oracle][:wanted]
    others = sorted(set(chunk_text) - set(distractors) - {oracle})
    distractors += rng.sample(others, min(len(others), wanted - len(distractors)))
    ids = distractors + ([oracle] if with_oracle else [])
    rng.shuffle(ids)
    return ids, with_oracle


# --- 6. stats -------------------------------------------------------------------------------------


def describe(config: "RagtuneConfig", run_dir: RunDir, facts: dict[str, Any]) -> dict[str, Any]:
    """Check data/train.jsonl and write data/stats.json (rows, modes, the teacher's cost, the dataset's counts)."""
    teacher = config.teacher
    prices = None
    if teacher.price_per_million_input_tokens is not None or teacher.price_per_million_output_tokens is not None:
        prices = (teacher.price_per_million_input_tokens or 0.0, teacher.price_per_million_output_tokens or 0.0)
    stats = validate_chat_jsonl(run_dir.train_jsonl, prices=prices)
    stats["dataset"] = {key: facts[key] for key in (
        "documents", "pages", "chunks", "train_regions", "eval_regions", "questions_train", "questions_eval",
        "questions_rejected", "answers_kept", "answers_rejected", "refusals_kept", "train_rows",
        "questions_without_answer") if key in facts}
    write_json(run_dir.stats, stats)
    return {key: stats[key] for key in ("rows", "rows_by_mode") if key in stats}
