"""The prep stage on the 10-K excerpt with SmolLM2 as teacher, its parts, and kill -9 + resume."""

from __future__ import annotations

import json
from collections import Counter
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ragtune.data_prep.config import DataPrepConfig
from ragtune.data_prep.prep import PrepError, choose_contexts, region_of, run, split_regions
from ragtune.core.gates import threshold
from ragtune.core.grounding import lexical_overlap
from ragtune.data_prep.questions import drop_leakage, enough_questions, parse_questions
from ragtune.core.rag import build_closed_book_messages, build_rag_messages, load_index, retrieve
from ragtune.core.artifacts import read_jsonl
from ragtune.app.config import load_config
from ragtune.core.run_dir import RunDir

REPO = Path(__file__).parent.parent


# --- parts ----------------------------------------------------------------------------------------


def test_parse_questions_strips_numbering_and_drops_non_questions() -> None:
    reply = (
        "Sure, here are the questions:\n"
        "1. What is Uber's main line of business?\n"
        "2) **How many countries does Uber operate in?**\n"
        "Question 3: What are the three segments? Q4: What does Freight connect shippers with?\n"
        "Answer: Uber is a technology platform.\n"
        "What is what what what what what what what what?\n"
        "Why?\n"
        "- how many countries does Uber operate in ?\n"
        "TEACHER: What does the TIBOR Rate mean for a Borrowing?\n"
        "The question: What is the name of the freight"
    )
    kept, dropped = parse_questions(reply, limit=3)
    assert kept == ["What is Uber's main line of business?", "How many countries does Uber operate in?",
                    "What are the three segments?"]
    reasons = {question: reason for question, reason in dropped}
    assert reasons["Sure, here are the questions:"] == "preamble"
    assert reasons["What does Freight connect shippers with?"] == "over num_questions_per_chunk"
    assert reasons["Answer: Uber is a technology platform."].startswith("not a question: an answer")
    assert reasons["What is what what what what what what what what?"].startswith("degenerate")
    assert reasons["Why?"] == "too short"
    assert reasons["how many countries does Uber operate in ?"] == "duplicate"
    assert reasons["What does the TIBOR Rate mean for a Borrowing?"] == "over num_questions_per_chunk"
    assert reasons["What is the name of the freight"].startswith("not a question: no question mark")


def test_question_generation_stops_at_the_limit_or_at_the_first_repeat() -> None:
    """A real SmolLM2-135M reply (demo chunk p8-c2, greedy): one question, then the same one until the budget."""
    looping = 'Question: What is the purpose of the "Mobility" product?\n\nQuestion: What is the purpose of the "Mobility" product?'
    assert enough_questions(looping, 3)
    assert not enough_questions(looping.split("\n")[0], 3)  # one question so far, no repeat: go on
    assert enough_questions("1. What are Uber's segments?\n2. Where is Uber based?", 2)
    assert not enough_questions("1. What are Uber's segments?\n2. Where is Uber", 2)  # the second is not finished


def test_lexical_overlap() -> None:
    chunk = "As of December 31, 2021, we had three operating segments: Mobility, Delivery and Freight."
    assert lexical_overlap("What are the three operating segments?", chunk) == 1.0
    assert lexical_overlap("What is the context of the question?", chunk) == 0.0
    assert lexical_overlap("How many segments did Uber report in 2021?", chunk) == pytest.approx(2 / 5)


def _chunks(pages: int, per_page: int = 2, file: str = "/docs/a.pdf") -> list[dict[str, Any]]:
    return [{"id": f"{Path(file).stem}-p{p}-c{c}", "text": f"text {p} {c}", "metadata": {
        "file": Path(file).name, "file_path": file, "document": Path(file).name, "page": p}}
        for p in range(1, pages + 1) for c in range(per_page)]


def test_split_is_by_region_seeded_and_disjoint() -> None:
    chunks = _chunks(10)
    prep = DataPrepConfig(train_fraction=0.6)
    split = split_regions(chunks, prep, seed=1)
    assert len(split["train"]) == 6 and len(split["eval"]) == 4 and not split["train"] & split["eval"]
    assert split == split_regions(chunks, prep, seed=1)
    assert split != split_regions(chunks, prep, seed=2)
    by_document = split_regions(_chunks(3) + _chunks(2, file="/docs/b.pdf"), DataPrepConfig(split_unit="document"), seed=0)
    assert sorted(by_document["train"] | by_document["eval"]) == ["a.pdf", "b.pdf"]
    with pytest.raises(PrepError, match="only 1 document"):
        split_regions(_chunks(3), DataPrepConfig(split_unit="document"), seed=0)


def test_raft_contexts() -> None:
    chunks = _chunks(6)
    chunk_text = {c["id"]: c["text"] for c in chunks}
    question = {"id": "a-p1-c0-q0", "source_chunk_id": "a-p1-c0"}
    hits = [{"id": i} for i in ("a-p1-c0", "a-p2-c0", "a-p3-c1")]
    ids, oracle_in = choose_contexts(question, hits, DataPrepConfig(similarity_top_k=2), 0, chunk_text)
    assert ids == ["a-p1-c0", "a-p2-c0"] and oracle_in
    always = DataPrepConfig(raft={"enabled": True, "oracle_probability": 1.0, "num_contexts": 4})
    ids, oracle_in = choose_contexts(question, hits, always, 0, chunk_text)
    assert oracle_in and len(ids) == 4 and len(set(ids)) == 4 and {"a-p1-c0", "a-p2-c0", "a-p3-c1"} <= set(ids)
    assert choose_contexts(question, hits, always, 0, chunk_text) == (ids, True)  # seeded per question
    never = DataPrepConfig(raft={"enabled": True, "oracle_probability": 0.0, "num_contexts": 4})
    ids, oracle_in = choose_contexts(question, hits, never, 0, chunk_text)
    assert not oracle_in and len(ids) == 4 and "a-p1-c0" not in ids and {"a-p2-c0", "a-p3-c1"} <= set(ids)


def test_leakage_check_drops_near_duplicates_with_reason() -> None:
    from ragtune.core.rag import embedding_model
    from ragtune.app.config import EmbeddingConfig

    train = [{"id": "t0", "question": "What was Uber's revenue in 2021?"}]
    eval_questions = [{"id": "e0", "question": "What was the revenue of Uber in 2021?"},
                      {"id": "e1", "question": "Which city is Uber headquartered in?"}]
    kept, leaked = drop_leakage(train, eval_questions, embedding_model(EmbeddingConfig()), threshold=0.9)
    assert [q["id"] for q in kept] == ["e1"]
    assert [q["id"] for q in leaked] == ["e0"] and "to train question t0" in leaked[0]["reason"]


def test_the_teacher_is_built_while_chunks_and_index_are_made_and_a_failed_build_keeps_their_work(tmp_path: Path) -> None:
    import threading

    from ragtune.core.llm import LazyBackend

    events: list[str] = []
    work_started = threading.Event()

    def work() -> str:
        work_started.set()
        time.sleep(0.3)
        (tmp_path / "index.done").write_text("kept")
        events.append("work done")
        return "index"

    def build() -> str:
        assert work_started.wait(5)  # the work runs while the backend builds, not after it
        events.append(f"built in {threading.current_thread().name}")
        return "teacher"

    backend = LazyBackend(build)
    assert backend.build_during(work) == "index"
    assert events == ["built in MainThread", "work done"] and backend.get() == "teacher"

    def broken() -> str:
        raise ConnectionError("vLLM exited during startup")

    (tmp_path / "index.done").unlink()
    with pytest.raises(ConnectionError, match="exited during startup"):
        LazyBackend(broken).build_during(work)
    assert (tmp_path / "index.done").read_text() == "kept"  # the failure waited for the work, which was kept

    events.clear()
    assert LazyBackend(build).build_during(lambda: "resumed", when=False) == "resumed" and events == []


def test_roundtrip_check_keeps_questions_whose_source_chunk_retrieval_finds(tmp_path: Path,
                                                                            tiny_llama_dir: Path) -> None:
    """Promptagator's round-trip filter on a real LlamaIndex index: a specific question finds its chunk, one
    closer to another chunk (or whose chunk the split's search leaves out) is "not retrievable"; earlier rejects stay.
    The teacher's answerability check then asks about the survivors only."""
    from llama_index.core.schema import TextNode

    from ragtune.app.config import EmbeddingConfig
    from ragtune.core.llm.hf import HFChatBackend
    from ragtune.core.rag import build_index, embedding_model
    from ragtune.data_prep.questions import answerable_verdicts, roundtrip_verdicts

    texts = {"p1-c0": "Uber's Mobility segment connects consumers with Drivers who provide rides in a variety of "
                      "vehicles, such as cars, auto rickshaws, motorbikes, minibuses, or taxis.",
             "p2-c0": "Freight connects carriers with shippers on our platform, and gives carriers upfront, "
                      "transparent pricing and the ability to book a shipment.",
             "p3-c0": "Delivery allows consumers to search for and discover local commerce, order a meal or other "
                      "items, and either pick up at the restaurant or have it delivered."}
    index = build_index([TextNode(id_=i, text=t) for i, t in texts.items()], embedding_model(EmbeddingConfig()),
                        tmp_path / "index")
    batch = [{"id": i, "text": texts[i]} for i in ("p2-c0", "p3-c0")]
    parsed = [(["How does Freight connect carriers with shippers?", "What kinds of vehicles do Drivers use?"], []),
              (["Can consumers pick up a meal at the restaurant?", "What is a minibus?"], [])]
    verdicts: list[list[str | None]] = [[None, None], [None, "unanswerable: lexical overlap 0.00"]]
    roundtrip_verdicts(batch, parsed, verdicts, index, 1, None)
    assert verdicts[0][0] is None and verdicts[1][0] is None
    assert verdicts[0][1].startswith("not retrievable: its source chunk is not in the top 1 of the whole index")
    assert verdicts[1][1] == "unanswerable: lexical overlap 0.00"

    class Recording(HFChatBackend):
        def chat(self, conversations: list[Any], **kwargs: Any) -> list[Any]:
            asked.extend(c[0]["content"].rsplit("Question: ", 1)[1] for c in conversations)
            return super().chat(conversations, **kwargs)

    asked: list[str] = []
    dropped = [verdicts[0][1], verdicts[1][1]]
    answerable_verdicts(batch, parsed, verdicts, DataPrepConfig(answerable_check="teacher"),
                        Recording(str(tiny_llama_dir), batch_size=2, max_new_tokens=16))
    assert asked == [parsed[0][0][0], parsed[1][0][0]]
    assert [verdicts[0][1], verdicts[1][1]] == dropped
    assert all(v is None or v.startswith("unanswerable") for v in (verdicts[0][0], verdicts[1][0]))
    only_others = [[None, None], [None, None]]
    roundtrip_verdicts(batch[:1], parsed[:1], only_others, index, 2, ["p1-c0", "p3-c0"])
    assert only_others[0] == [
        "not retrievable: its source chunk is not in the top 2 of its split's chunks (roundtrip_top_k)"] * 2


def test_prompt_builders() -> None:
    prep = DataPrepConfig()
    messages = build_rag_messages("Where is Uber based?", ["Chunk one {x}.", "Chunk two."], prep)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Chunk one {x}.\n\nChunk two." in messages[1]["content"] and "Query: Where is Uber based?" in messages[1]["content"]
    closed = build_closed_book_messages("Where is Uber based?", prep)
    assert closed == [{"role": "system", "content": prep.closed_book_system_prompt},
                      {"role": "user", "content": "Where is Uber based?"}]


# --- the stage on the 10-K excerpt ----------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, excerpt_pdf: Path) -> dict[str, Any]:
    """One uninterrupted prep run with SmolLM2 as teacher (tiny: 5 train and 2 eval questions)."""
    root = tmp_path_factory.mktemp("prep")
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "name": "prep-test", "output_dir": str(root / "run"), "documents": [str(excerpt_pdf)],
        "teacher": {"backend": "hf", "model": str(smollm2_dir), "max_new_tokens": 32, "batch_size": 4},
        "student": {"model": str(smollm2_dir)}, "judge": {"model": str(smollm2_dir)},
        "data_prep": {"chunk_size": 256, "chunk_overlap": 32, "num_train_questions": 5, "num_eval_questions": 2},
    }), encoding="utf-8")
    config = load_config(config_path)
    run_dir = RunDir(config.output_dir)
    facts = run(config, run_dir)
    return {"config_path": config_path, "config": config, "run_dir": run_dir, "facts": facts}


@pytest.mark.slow
def test_prep_on_the_excerpt(prepared: dict[str, Any]) -> None:
    config, run_dir, facts = prepared["config"], prepared["run_dir"], prepared["facts"]
    prep = config.data_prep

    chunks = read_jsonl(run_dir.chunks)
    assert len(chunks) == facts["chunks"] > 8 and len({c["id"] for c in chunks}) == len(chunks)
    assert all(c["metadata"]["file"] == "uber_10k_excerpt.pdf" and 1 <= c["metadata"]["page"] <= 8 for c in chunks)
    by_id = {c["id"]: c for c in chunks}

    index = load_index(config.embedding, run_dir.index)
    from llama_index.core import StorageContext  # load_index reads the vector stores' JSON itself: the same data
    stores = StorageContext.from_defaults(persist_dir=str(run_dir.index)).vector_stores
    assert {n: s.data for n, s in stores.items()} == {n: s.data for n, s in index.storage_context.vector_stores.items()}
    probe = chunks[len(chunks) // 2]
    assert retrieve(index, [probe["text"]], 1)[0][0]["id"] == probe["id"]

    train_q, eval_q = read_jsonl(run_dir.questions_train), read_jsonl(run_dir.questions_eval)
    assert 1 <= len(train_q) <= 5 and len(eval_q) <= 2
    train_pages = {region_of(by_id[q["source_chunk_id"]], "page") for q in train_q}
    eval_pages = {region_of(by_id[q["source_chunk_id"]], "page") for q in eval_q}
    assert not train_pages & eval_pages
    assert all(q["question"].endswith("?") and q["page"] == by_id[q["source_chunk_id"]]["metadata"]["page"]
               for q in train_q + eval_q)
    # every generated question is either kept or rejected with a reason: none silently dropped
    rejected = read_jsonl(run_dir.questions_rejected)
    assert all(r["reason"] for r in rejected)
    raw = read_jsonl(run_dir.questions_raw)
    assert sum(len(r["candidates"]) for r in raw) == len(train_q) + len(eval_q) + len(rejected)
    # generation stops on what the filters keep: a split short of its target asked every chunk it has
    split = split_regions(chunks, prep, config.seed)
    for name, kept, target in (("train", train_q, prep.num_train_questions), ("eval", eval_q, prep.num_eval_questions)):
        region = {c["id"] for c in chunks if region_of(c, prep.split_unit) in split[name]}
        assert len(kept) == target or {r["chunk_id"] for r in raw if r["split"] == name} == region, name

    # every training question ends as a kept row or a rejected answer with its reason and text: none lost
    rows, rejected_answers = read_jsonl(run_dir.train_jsonl), read_jsonl(run_dir.answers_rejected)
    assert len(rows) == facts["answers_kept"] == facts["train_rows"] and rows
    assert sorted([r["meta"]["question_id"] for r in rows] + [r["question_id"] for r in rejected_answers]) == sorted(
        q["id"] for q in train_q)
    assert all(r["reason"] and r["candidates"] and all("text" in c for c in r["candidates"]) for r in rejected_answers)
    assert facts["answers_rejected"] == dict(Counter(r["reason"] for r in rejected_answers))
    # no training context comes from an eval page: retrieval and RAFT distractors see train-region chunks only
    questions = {q["id"]: q for q in train_q}
    for row in rows:
        meta = row["meta"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][2]["content"].strip()
        assert meta["finish_reason"] == "stop" and meta["grounding"] >= threshold(prep.answer_gates.measure,
                                                                                     prep.answer_gates.min_grounding)
        assert len(meta["retrieved_ids"]) == prep.similarity_top_k
        assert all(region_of(by_id[i], prep.split_unit) in split["train"] for i in meta["retrieved_ids"])
        question = questions[meta["question_id"]]
        contexts = [by_id[i]["text"] for i in meta["retrieved_ids"]]
        assert row["messages"][:2] == build_rag_messages(question["question"], contexts, prep)  # what eval sends
        assert meta["source_chunk_id"] == question["source_chunk_id"]
        assert meta["oracle_in_context"] == (question["source_chunk_id"] in meta["retrieved_ids"])
        assert meta["teacher_model"] == config.teacher.model and meta["usage"]["completion_tokens"] > 0

    stats = json.loads(run_dir.stats.read_text())
    assert stats["rows"] == len(rows) == sum(stats["rows_by_mode"].values()) and stats["dataset"]["chunks"] == len(chunks)


class _NoTeacher:
    model_name = "none"

    @property
    def batch_size(self) -> int:
        raise AssertionError("a finished prep run must not use the teacher")

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished prep run must not use the teacher")


@pytest.mark.slow
def test_rerun_skips_finished_steps(prepared: dict[str, Any]) -> None:
    run_dir = prepared["run_dir"]
    outputs = [run_dir.chunks, run_dir.questions_train, run_dir.questions_eval, run_dir.train_jsonl, run_dir.index / "docstore.json"]
    before = [p.stat().st_mtime_ns for p in outputs]
    facts = run(prepared["config"], run_dir, teacher=_NoTeacher())
    assert facts["skipped_steps"] == ["chunks", "index", "questions", "answers"]
    assert [p.stat().st_mtime_ns for p in outputs] == before


@pytest.mark.slow
def test_killed_teacher_run_resumes_to_the_same_rows(prepared: dict[str, Any], tmp_path: Path) -> None:
    """kill -9 in the middle of the teacher answers, run again: the same rows, none twice, none lost."""
    reference = read_jsonl(prepared["run_dir"].train_jsonl)
    reference_rejected = read_jsonl(prepared["run_dir"].answers_rejected)
    assert len(reference) + len(reference_rejected) > 4  # more than one teacher batch (batch_size 4)
    resumed_dir = RunDir(tmp_path / "run")
    shutil.copytree(prepared["run_dir"].root, resumed_dir.root)
    for path in (resumed_dir.train_jsonl, resumed_dir.answers_rejected, resumed_dir.stats):
        path.unlink(missing_ok=True)

    script = ("import sys; from pathlib import Path; from ragtune.app.config import load_config; "
              "from ragtune.core.run_dir import RunDir; from ragtune.data_prep.prep import run; "
              "run(load_config(sys.argv[1]), RunDir(Path(sys.argv[2])))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, str(prepared["config_path"]), str(resumed_dir.root)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900  # a hang guard: a loaded CI box takes minutes to load the models
        while time.time() < deadline and process.poll() is None:
            if any(p.exists() and "\n" in p.read_text(encoding="utf-8")  # one whole row written
                   for p in (resumed_dir.train_jsonl, resumed_dir.answers_rejected)):
                break
            time.sleep(0.02)
        assert process.poll() is None, "the teacher run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    at_kill = [read_jsonl(p, tolerate_torn_tail=True) if p.exists() else []
               for p in (resumed_dir.train_jsonl, resumed_dir.answers_rejected)]
    assert 0 < sum(map(len, at_kill)) < len(reference) + len(reference_rejected)

    facts = run(prepared["config"], resumed_dir)
    assert facts["skipped_steps"] == ["chunks", "index", "questions"]
    resumed = read_jsonl(resumed_dir.train_jsonl)
    assert len({r["id"] for r in resumed}) == len(resumed)
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(reference, key=lambda r: r["id"])
    assert sorted(read_jsonl(resumed_dir.answers_rejected), key=lambda r: r["id"]) == sorted(
        reference_rejected, key=lambda r: r["id"])


@pytest.mark.slow
def test_question_rows_stop_early_with_the_same_kept_questions(prepared: dict[str, Any]) -> None:
    """Stopping a row once it holds its kept questions saves decode steps and changes no kept question."""
    from ragtune.data_prep.questions import question_prompt
    from ragtune.core.llm import HFChatBackend

    config, run_dir = prepared["config"], prepared["run_dir"]
    prep, limit = config.data_prep, config.data_prep.num_questions_per_chunk
    chunks = read_jsonl(run_dir.chunks)[:8]
    prompts = [[{"role": "user", "content": question_prompt(c["text"], prep)}] for c in chunks]
    teacher = HFChatBackend(config.teacher.model, batch_size=8, max_new_tokens=64)
    full = teacher.chat(prompts)
    early = teacher.chat(prompts, stop_when=lambda text: len(parse_questions(text, limit)[0]) >= limit)
    assert [parse_questions(c.text, limit)[0] for c in early] == [parse_questions(c.text, limit)[0] for c in full]
    assert sum(c.completion_tokens for c in early) < sum(c.completion_tokens for c in full)
    assert all(e.completion_tokens <= f.completion_tokens for e, f in zip(early, full))
