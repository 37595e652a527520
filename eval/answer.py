"""Answers to the held-out questions (or the user's golden set, `eval.questions_file`), from every model, through
the one retriever and prompt of training.

The models: the base student, each LoRA adapter on the base, the merged model, and the teacher (whose RAG answers
are the reference where a golden row gives none). Retrieval runs once (`eval/retrieval.jsonl`): every student sees
exactly the same contexts, and so does the teacher, except that the question's source chunk replaces the last
retrieved one when retrieval missed it. Messages are built by data_prep's `build_rag_messages` /
`build_closed_book_messages`. Generation is batched and greedy.

Each `eval/answers.<model>.<mode>.jsonl` row carries the fingerprint of what produced it (model weights,
prompts, questions, index, generation settings); a re-run reuses rows whose fingerprint still matches,
so adding an adapter only generates that adapter's answers. Stale files are retired to `stale/`.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ragtune.core.artifacts import JsonlAppender, iter_jsonl, read_jsonl, write_jsonl
from ragtune.core.errors import UserFacingError, check_failures
from ragtune.core.grounding import final_answer
from ragtune.core.llm.overlap import depth_for, overlapped
from ragtune.core.teacher import ask_teacher, best_of_n, teacher_fingerprint, teacher_view
from ragtune.core.run_dir import RunDir, sha256_file, short_hash

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig
    from ragtune.core.llm import ChatBackend

log = logging.getLogger(__name__)

MODES = ("rag", "closed_book")
REFERENCE_MODEL = "teacher"
SMALL_FILE = 32 << 20  # files up to this size are content-hashed; larger weights by size and mtime


class EvalError(UserFacingError):
    """The eval stage cannot start: a missing input, a bad adapter folder; says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One model under evaluation: `name` is its file-safe label in artifact names and the report."""

    name: str
    kind: str  # base | adapter | merged | teacher
    model: str
    adapter: str | None
    fingerprint: str


# --- questions ----------------------------------------------------------------------------------


def load_questions(run_dir: RunDir) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The held-out questions prep kept, and the count of rows marked `dropped` by reason (skipped)."""
    path = run_dir.questions_eval
    if not path.exists():
        raise EvalError(f"{path}: no held-out questions. Run `ragtune prep CONFIG` first.")
    questions, dropped = [], {}
    for number, row in iter_jsonl(path):
        missing = [k for k in ("id", "question", "source_chunk_id") if not row.get(k)]
        if missing:
            raise EvalError(f"{path}:{number}: row lacks {', '.join(missing)}. Re-run `ragtune prep` to rewrite the file.")
        if row.get("dropped"):
            reason = str(row["dropped"]).split(":")[0]
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        questions.append(row)
    if not questions:
        raise EvalError(f"{path}: every held-out question was dropped ({dropped}); nothing to evaluate.")
    return questions, dropped


def questions_path(config: "RagtuneConfig", run_dir: RunDir) -> Path:
    """The file of the questions eval answers: the golden set (`eval.questions_file`), else prep's held-out ones."""
    return Path(config.eval.questions_file) if config.eval.questions_file else run_dir.questions_eval


# --- models -------------------------------------------------------------------------------------


def model_specs(config: "RagtuneConfig", run_dir: RunDir, adapters: list[Path]) -> list[ModelSpec]:
    """base, run_dir/adapter and/or run_dir/merged (`eval.tuned_models`), each extra adapter, teacher."""
    student = config.student
    specs = [ModelSpec("base", "base", student.model, None, short_hash("base", _model_fingerprint(student.model)))]
    tuned = config.eval.tuned_models
    has_merged = (run_dir.merged / "config.json").exists()
    adapter_dirs: list[Path] = []
    if (run_dir.adapter / "adapter_config.json").exists() and ("adapter" in tuned or not has_merged):
        adapter_dirs.append(run_dir.adapter)
    for raw in [*config.eval.adapters, *adapters]:
        path = Path(raw).expanduser()
        if not (path / "adapter_config.json").exists():
            raise EvalError(
                f"{path}: not a PEFT adapter folder (no adapter_config.json). Pass the folder `save_pretrained` "
                "wrote, e.g. RUN_DIR/adapter or RUN_DIR/checkpoints/checkpoint-N."
            )
        if path.resolve() not in [p.resolve() for p in adapter_dirs]:
            adapter_dirs.append(path)
    taken = {"base", "merged", "full", REFERENCE_MODEL, "retriever"}
    for path in adapter_dirs:
        name = _adapter_name(path, run_dir, taken)
        taken.add(name)
        specs.append(ModelSpec(name, "adapter", student.model, str(path),
                               short_hash("adapter", _model_fingerprint(student.model), _dir_fingerprint(path))))
    if (run_dir.adapter / "config.json").exists() and not (run_dir.adapter / "adapter_config.json").exists():
        # method `full`: adapter/ is the complete fine-tuned model
        specs.append(ModelSpec("full", "merged", str(run_dir.adapter), None,
                               short_hash("full", _dir_fingerprint(run_dir.adapter))))
    if has_merged and ("merged" in tuned or run_dir.adapter not in adapter_dirs):
        specs.append(ModelSpec("merged", "merged", str(run_dir.merged), None,
                               short_hash("merged", _dir_fingerprint(run_dir.merged))))
    teacher = config.teacher
    teacher_id = [teacher.backend, teacher.model, teacher.base_url] if teacher.backend == "openai" else \
        [teacher.backend, _model_fingerprint(teacher.model)]
    specs.append(ModelSpec(REFERENCE_MODEL, "teacher", teacher.model, None, short_hash("teacher", teacher_id)))
    return specs


def generation_order(specs: list[ModelSpec]) -> list[ModelSpec]:
    """The order the models answer in, so that one managed vLLM server runs at a time and as few start as can: the
    base and its adapters (one server, every adapter a LoRA module), then the teacher (that same server when it is
    the base's model served alike), then each merged model on its own. A start cost 27-34 s of the demo's eval on
    a 2-core CPU; base, merged, teacher took 3."""
    rank = {"base": 0, "adapter": 0, "teacher": 1}
    return sorted(specs, key=lambda spec: rank.get(spec.kind, 2))


def _adapter_name(path: Path, run_dir: RunDir, taken: set[str]) -> str:
    if path.resolve() == run_dir.adapter.resolve():
        return "adapter"
    parts = [path.name] if path.name != "adapter" else [path.parent.name, path.name]
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(parts)).strip("-") or "adapter"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def _model_fingerprint(ref: str) -> Any:
    from ragtune.core.models import resolve_model

    resolved = resolve_model(ref)
    path = Path(resolved.name_or_path)
    if resolved.gguf_file:
        return [ref, _file_fingerprint(path / resolved.gguf_file)]
    return [ref, _dir_fingerprint(path)] if path.is_dir() else [ref]


def _dir_fingerprint(path: Path) -> list[Any]:
    return [[p.name, _file_fingerprint(p)] for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return sha256_file(path) if stat.st_size <= SMALL_FILE else f"{stat.st_size}:{stat.st_mtime_ns}"


# --- resumable rows keyed by fingerprint --------------------------------------------------------


def open_rows(run_dir: RunDir, path: Path, key: str, fingerprint: str, *, retry_errors: bool = False) -> JsonlAppender:
    """A `JsonlAppender` holding only rows made under `fingerprint`.

    A file written under another fingerprint (other weights, prompts, judge) is retired to `stale/` (never
    deleted, never reused); with `retry_errors`, rows that recorded a backend error are dropped so they are retried.
    """
    if path.exists():
        rows = read_jsonl(path, tolerate_torn_tail=True)
        if any(row.get("fingerprint") != fingerprint for row in rows):
            run_dir.retire([path])
        elif retry_errors and any(row.get("error") for row in rows):
            write_jsonl(path, [row for row in rows if not row.get("error")])
    return JsonlAppender(path, key=key)


# --- retrieval ----------------------------------------------------------------------------------


def retrieve_contexts(config: "RagtuneConfig", run_dir: RunDir, questions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Top-`similarity_top_k` chunks per question from prep's persisted index, once for every model; whether they
    hold the question's source chunk (None for a golden question: it has none)."""
    from ragtune.core.rag import load_index, retrieve

    prep = config.data_prep
    fingerprint = short_hash(*[[p.name, _file_fingerprint(p)] for p in sorted(run_dir.index.glob("*.json"))],
                             prep.similarity_top_k, config.embedding.model, sha256_file(questions_path(config, run_dir)))
    with open_rows(run_dir, run_dir.retrieval, "question_id", fingerprint) as rows:
        todo = [q for q in questions if q["id"] not in rows.done_keys]
        if todo:
            started = time.perf_counter()
            index = load_index(config.embedding, run_dir.index)
            hits = retrieve(index, [q["question"] for q in todo], prep.similarity_top_k)
            for question, found in zip(todo, hits):
                rows.append({
                    "question_id": question["id"], "context_ids": [h["id"] for h in found],
                    "contexts": [h["text"] for h in found], "scores": [h.get("score") for h in found],
                    "oracle_in_context": None if question["source_chunk_id"] is None  # a golden question
                    else question["source_chunk_id"] in [h["id"] for h in found],
                    "fingerprint": fingerprint,
                })
            log.info("retrieved contexts for %d questions in %.1fs", len(todo), time.perf_counter() - started)
        return {row["question_id"]: row for row in rows.rows}


# --- answers ------------------------------------------------------------------------------------


def is_rag(mode: str) -> bool:
    """`rag`, or one of its retrieval conditions `rag@<condition>` (eval/conditions.py): answered with contexts."""
    return mode.split("@", 1)[0] == "rag"


def contexts_file(run_dir: RunDir, mode: str) -> Path:
    """Where a rag mode's contexts are: eval/retrieval.jsonl for `rag`, eval/contexts.<condition>.jsonl for
    `rag@<condition>`."""
    return run_dir.retrieval if mode == "rag" else run_dir.eval / f"contexts.{mode.split('@', 1)[1]}.jsonl"


def answer_fingerprint(config: "RagtuneConfig", run_dir: RunDir, spec: ModelSpec, mode: str) -> str:
    """What an answers file depends on: the model, the questions, the contexts, the prompt, generation."""
    prep = config.data_prep
    prompt = [prep.system_prompt, prep.text_qa_template] if is_rag(mode) else [prep.closed_book_system_prompt]
    retrieval = read_jsonl(contexts_file(run_dir, mode)) if is_rag(mode) else []
    oracle = sha256_file(run_dir.chunks) if mode == "rag" and spec.kind == "teacher" else None
    engine = config.eval.backend if spec.kind != "teacher" else None
    if spec.kind == "teacher":  # the teacher answers as in prep (`_generate`): the same settings change both
        # best-of-N and the gates choose only the rag reference; closed book is one greedy answer
        prompt += [teacher_fingerprint(config.teacher, prep, best_of_n=mode == "rag")]
    return short_hash(spec.fingerprint, mode, prompt, config.eval.max_new_tokens, prep.raft.chain_of_thought,
                      sha256_file(questions_path(config, run_dir)), sorted({r["fingerprint"] for r in retrieval}), oracle,
                      *([engine] if engine != "hf" else []))


def reference_contexts(question: dict[str, Any], retrieved: dict[str, Any], chunk_text: dict[str, str]
                       ) -> tuple[list[str], list[str]]:
    """The teacher's contexts for a reference answer: the retrieved ones, with the question's source chunk
    (the oracle) in place of the lowest-ranked if retrieval missed it. A reference written from the right
    passage is what a good answer looks like; from the student's very contexts it would only measure
    agreement with the teacher (and, when the teacher is the student model, equal the base's answers)."""
    ids, texts = list(retrieved["context_ids"]), list(retrieved["contexts"])
    oracle = question["source_chunk_id"]
    if oracle in ids or oracle not in chunk_text:
        return ids, texts
    keep = max(len(ids) - 1, 0)
    return ids[:keep] + [oracle], texts[:keep] + [chunk_text[oracle]]


@dataclass
class ModeRows:
    """One mode's answers file for one model: the questions it asks, their contexts and the ones still to answer."""

    mode: str
    contexts: dict[str, tuple[list[str], list[str]]]
    asked: list[dict[str, Any]]
    fingerprint: str
    rows: JsonlAppender
    todo: list[dict[str, Any]]


def generate_answers(
    config: "RagtuneConfig",
    run_dir: RunDir,
    spec: ModelSpec,
    modes: list[str],
    questions: list[dict[str, Any]],
    retrieval: dict[str, dict[str, Any]],
    specs: list[ModelSpec] = (),
    conditions: dict[str, dict[str, tuple[list[str], list[str]]]] | None = None,
) -> dict[str, Any]:
    """Answer every question in every mode with one model (loaded only if some answer is missing); `specs`
    are all the models of this eval, so a vLLM server for the base starts with every adapter at once.
    `conditions` holds, per retrieval-condition mode `rag@<condition>`, the (context ids, texts) of each question it
    asks (eval/conditions.py; a question it skipped is not there). Every mode's batches go to the model overlapped
    (`overlapped`: the next batch starts while the one before finishes), each written to its mode's file in order.

    Returns timing facts per mode: seconds its batches were in flight, answers generated, tokens, errors recorded.
    """
    backend: ChatBackend | None = None
    facts: dict[str, Any] = {}
    # rag-mode (context ids, context texts) per question: the retrieved ones; the teacher's include the oracle
    rag_contexts = {q["id"]: (retrieval[q["id"]]["context_ids"], retrieval[q["id"]]["contexts"]) for q in questions}
    if spec.kind == "teacher" and "rag" in modes:
        chunk_text = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks)} if run_dir.chunks.exists() else {}
        rag_contexts = {q["id"]: reference_contexts(q, retrieval[q["id"]], chunk_text) for q in questions}
    with ExitStack() as files:
        plans = []
        for mode in modes:
            mode_contexts = (conditions or {}).get(mode, rag_contexts)
            asked = [q for q in questions if q["id"] in mode_contexts]
            fingerprint = answer_fingerprint(config, run_dir, spec, mode)
            rows = files.enter_context(open_rows(run_dir, run_dir.answers(spec.name, mode), "question_id",
                                                 fingerprint, retry_errors=True))
            plans.append(ModeRows(mode, mode_contexts, asked, fingerprint, rows,
                                  [q for q in asked if q["id"] not in rows.done_keys]))
            facts[mode] = {"generated": 0, "reused": len(asked) - len(plans[-1].todo), "seconds": 0.0,
                           "completion_tokens": 0}
        if any(plan.todo for plan in plans):
            started = time.perf_counter()
            backend = load_backend(config, spec, run_dir, specs)
            facts["load_seconds"] = round(time.perf_counter() - started, 2)
            _answer_modes(backend, spec, config, plans, facts)
        for plan in plans:
            _check_mode(config, run_dir, spec, plan, facts[plan.mode])
    if backend is not None:
        del backend
        gc.collect()
    return facts


def _answer_modes(backend: "ChatBackend", spec: ModelSpec, config: "RagtuneConfig", plans: list[ModeRows],
                  facts: dict[str, Any]) -> None:
    """Every mode's missing answers, batch by batch, overlapped; each batch appended to its mode's file in order."""
    size = backend.batch_size
    jobs = [(plan, plan.todo[start : start + size]) for plan in plans for start in range(0, len(plan.todo), size)]

    def ask(job: tuple[ModeRows, list[dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]], float]:
        plan, batch = job
        started = time.perf_counter()
        completions, gated = _generate(backend, _conversations(config, plan, batch), spec, config, batch,
                                       [_context(plan, q)[1] for q in batch], plan.mode)
        return completions, gated, time.perf_counter() - started

    with tqdm(total=sum(len(plan.todo) for plan in plans), desc=f"answers {spec.name}", unit="q") as bar:
        for (plan, batch), (completions, gated, seconds) in overlapped(jobs, ask, depth_for(backend)):
            mode_facts = facts[plan.mode]
            mode_facts["seconds"] += seconds
            for question, completion, verdict in zip(batch, completions, gated):
                ids, ctx = _context(plan, question)
                text = None if completion.error else (completion.text or "").strip()
                plan.rows.append({
                    "question_id": question["id"], "question": question["question"], "contexts": ctx,
                    "context_ids": ids, "answer": user_answer(text, config), "raw_answer": text,
                    "error": completion.error, "model": spec.name, "mode": plan.mode,
                    "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                    **verdict, "fingerprint": plan.fingerprint,
                })
                mode_facts["generated"] += 1
                mode_facts["completion_tokens"] += completion.completion_tokens
            bar.update(len(batch))


def _context(plan: ModeRows, question: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(context ids, texts) a question is asked with in the plan's mode: none closed-book."""
    return plan.contexts[question["id"]] if is_rag(plan.mode) else ([], [])


def _conversations(config: "RagtuneConfig", plan: ModeRows, batch: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    from ragtune.core.rag import build_closed_book_messages, build_rag_messages

    if is_rag(plan.mode):
        return [build_rag_messages(q["question"], _context(plan, q)[1], config.data_prep) for q in batch]
    return [build_closed_book_messages(q["question"], config.data_prep) for q in batch]


def _check_mode(config: "RagtuneConfig", run_dir: RunDir, spec: ModelSpec, plan: ModeRows,
                mode_facts: dict[str, Any]) -> None:
    """The mode's facts finished; too many failed answers stop eval (`eval.max_failure_fraction`)."""
    mode_facts["seconds"] = round(mode_facts["seconds"], 2)
    mode_facts["errors"] = sum(1 for r in plan.rows.rows if r.get("error"))
    check_failures(f"eval answers of {spec.name} ({plan.mode})", mode_facts["errors"], len(plan.asked),
                   (r.get("error") for r in plan.rows.rows), config.eval.max_failure_fraction,
                   run_dir.answers(spec.name, plan.mode))
    mode_facts["empty"] = sum(1 for r in plan.rows.rows if r.get("answer") == "")


def _generate(backend: "ChatBackend", conversations: list[list[dict[str, str]]], spec: ModelSpec,
              config: "RagtuneConfig", questions: list[dict[str, Any]], contexts: list[list[str]], mode: str
              ) -> tuple[list[Any], list[dict[str, Any]]]:
    """Greedy answers for the students (the plain messages). The teacher answers as prep's teacher did (its
    instruction, sentence cap and token budget) and, in rag mode, its reference is chosen as a training row is:
    the one of `teacher.num_candidates` that passes the answer gates and `pick_best` chooses, else its first answer, marked
    with the gate it failed. So a reference shows what the student was taught, not the teacher's raw greedy text.
    Returns the completions and, per answer, the reference's gate facts (empty for the students): the chosen
    candidate, the gate it failed (None: passed), its grounding, and every candidate as in answers.rejected.jsonl."""
    if spec.kind != "teacher":
        answers = backend.chat(conversations, max_new_tokens=config.eval.max_new_tokens, temperature=0.0)
        return answers, [{} for _ in answers]
    prep = config.data_prep
    if mode != "rag":
        views = [teacher_view(c, prep) for c in conversations]
        answers = ask_teacher(backend, views, prep, temperature=0.0, max_new_tokens=config.teacher.max_new_tokens)
        return answers, [{} for _ in answers]
    chosen, facts = [], []
    picks = best_of_n(backend, conversations, prep, config.teacher, questions=[q["question"] for q in questions],
                      contexts=contexts, oracle_in=[True] * len(questions))
    for pick in picks:
        best = 0 if pick.best is None else pick.best
        verdict = pick.verdicts[best]
        chosen.append(pick.candidates[best])
        facts.append({"candidate": best, "gate": verdict.reason, "grounding": round(verdict.grounding, 3),
                      "candidates": [{"text": c.text, "reason": v.reason, "grounding": round(v.grounding, 3),
                                      "finish_reason": c.finish_reason} for c, v in zip(pick.candidates, pick.verdicts)]})
    return chosen, facts


def user_answer(text: str | None, config: "RagtuneConfig") -> str | None:
    """What the user is given: with RAFT chain-of-thought training, the text after the last `<ANSWER>:`."""
    if text is None or not config.data_prep.raft.chain_of_thought:
        return text
    return final_answer(text)


def starts_a_server(config: "RagtuneConfig", run_dir: RunDir, spec: ModelSpec) -> bool:
    """Whether `spec`'s answers will start a managed vLLM server (`eval.backend: vllm`, a student with an answer file
    missing): eval starts it while it retrieves (7 of the demo's 114 s) instead of after."""
    from ragtune.core.gpu_plan import gpu_plan

    return (spec.kind != "teacher" and gpu_plan(config).eval is not None
            and not all(run_dir.answers(spec.name, mode).exists() for mode in config.eval.modes))


def load_backend(config: "RagtuneConfig", spec: ModelSpec, run_dir: RunDir, specs: list[ModelSpec] = ()) -> "ChatBackend":
    """The teacher's configured backend, or the student (base, adapter-on-base, merged): in-process, or through
    the managed vLLM server (`eval.backend: vllm`) that serves the base and every adapter of `specs` by name."""
    from ragtune.core.gpu_plan import gpu_plan
    from ragtune.core.llm import HFChatBackend, ManagedServerBackend, make_backend

    plan = gpu_plan(config)
    if spec.kind == "teacher":
        return make_backend(config.teacher, log_dir=run_dir.logs, server=plan.teacher)
    student = config.student
    if plan.eval is not None:  # eval.backend: vllm
        from ragtune.core.servers import get_server
        from ragtune.core.roles import LLMRole

        on_base = spec.kind in ("base", "adapter")
        adapters = {s.name: str(s.adapter) for s in [*specs, spec] if on_base and s.adapter}
        role = LLMRole(backend="vllm", model=spec.model, max_concurrency=config.eval.batch_size,
                       max_new_tokens=config.eval.max_new_tokens, temperature=0.0)
        server = plan.eval
        return ManagedServerBackend(
            lambda: get_server(spec.model, lora_modules=adapters, log_dir=run_dir.logs, dtype=server.dtype,
                               engine_args=server.engine_args, gpus=server.gpus,
                               trust_remote_code=student.trust_remote_code),
            role, served=spec.name if spec.adapter else None)
    return HFChatBackend(
        spec.model, adapter=spec.adapter, torch_dtype=student.torch_dtype, device_map=student.device_map,
        batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens, temperature=0.0,
        trust_remote_code=student.trust_remote_code, model_name=spec.name,
    )
