"""The eval stage end to end on small real data: tiny real models, a real LlamaIndex index, real Ragas
metrics through the in-process judge, a real OpenAI-compatible judge server on 127.0.0.1, the report
opened in headless Chromium."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import untied_tiny_model
from ragtune.eval import evaluate, report
from ragtune.core.artifacts import read_jsonl
from ragtune.app.config import load_config
from ragtune.core.run_dir import RunDir

EXCERPT_PDF = Path(__file__).parent / "data" / "uber_10k_excerpt.pdf"
ALL_METRICS = [
    "faithfulness", "answer_relevancy", "answer_correctness", "semantic_similarity", "bleu_score", "chrf_score",
    "rouge_score", "non_llm_string_similarity", "context_precision", "context_recall",
    "non_llm_context_precision_with_reference", "non_llm_context_recall",
]
CHUNKS = [
    ("c1", "Uber operates a ridesharing platform connecting riders with drivers in over 70 countries."),
    ("c2", "Uber Eats lets consumers order food from restaurants and have it delivered by couriers."),
    ("c3", "Uber Freight connects shippers with carriers and provides logistics services for trucking."),
    ("c4", "In 2021 Uber's revenue was 17.5 billion dollars, up 57 percent year over year."),
]
QUESTIONS = [
    {"id": "q1", "question": "In how many countries does Uber operate its ridesharing platform?", "source_chunk_id": "c1"},
    {"id": "q2", "question": "What does Uber Eats let consumers do?", "source_chunk_id": "c2"},
    {"id": "q3", "question": "What was Uber's revenue in 2021?", "source_chunk_id": "c4"},
    {"id": "q4", "question": "What?", "source_chunk_id": "c3", "dropped": "degenerate: too short"},
]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval_models")
    student = untied_tiny_model(tiny_llama_dir, root / "student", seed=0)
    teacher = untied_tiny_model(tiny_llama_dir, root / "teacher", seed=1)
    from transformers import AutoTokenizer

    adapters = {}
    for name, seed in (("adapter", 2), ("other", 3)):
        torch.manual_seed(seed)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(student),
                                    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft_model.save_pretrained(root / name)
        adapters[name] = root / name
        if name == "adapter":  # what `ragtune merge` leaves: the adapter folded into the base weights
            peft_model.merge_and_unload().save_pretrained(root / "merged")
            AutoTokenizer.from_pretrained(student).save_pretrained(root / "merged")
    return {"student": student, "teacher": teacher, "merged": root / "merged", **adapters}


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What prep leaves for eval: data/chunks.jsonl, a persisted LlamaIndex index, data/questions.eval.jsonl."""
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from ragtune.core.models import resolve_embedding

    data = tmp_path_factory.mktemp("eval_data") / "data"
    data.mkdir()
    chunks = [{"id": cid, "text": text, "metadata": {"file": "uber.pdf", "page": i + 1}}
              for i, (cid, text) in enumerate(CHUNKS)]
    (data / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    (data / "questions.eval.jsonl").write_text("".join(json.dumps({**q, "split": "eval"}) + "\n" for q in QUESTIONS))
    Settings.llm = None
    embed = HuggingFaceEmbedding(model_name=resolve_embedding("all-minilm-l6-v2"))
    index = VectorStoreIndex([TextNode(id_=c["id"], text=c["text"], metadata=c["metadata"]) for c in chunks],
                             embed_model=embed)
    index.storage_context.persist(persist_dir=str(data / "index"))
    return data


def make_run(root: Path, prepared_data: Path, models: dict[str, Path], *, adapter: bool = True,
             judge: dict[str, Any] | None = None, **eval_section: Any) -> tuple[Any, RunDir]:
    """A run folder holding prep's outputs (and a trained adapter), with its config."""
    run = RunDir(root / "run")
    shutil.copytree(prepared_data, run.data)
    if adapter:
        shutil.copytree(models["adapter"], run.adapter)
        shutil.copytree(models["merged"], run.merged)
    config = {
        "name": root.name, "output_dir": str(run.root), "documents": [str(EXCERPT_PDF)],
        "teacher": {"backend": "hf", "model": str(models["teacher"]), "max_new_tokens": 16},
        "student": {"model": str(models["student"])},
        "judge": judge or {"backend": "hf", "model": str(models["student"]), "max_new_tokens": 96},
        "eval": {"max_new_tokens": 12, "judge_max_length": 40, "judge_max_items": 3, "judge_sanity_pairs": 3,
                 "n_resamples": 500, "metrics": ALL_METRICS, **eval_section},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(path), run


@pytest.fixture(scope="module")
def evaluated(prepared_data: Path, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config, run = make_run(tmp_path_factory.mktemp("evaluated"), prepared_data, models)
    facts = evaluate.run(config, run, [])
    return {"config": config, "run": run, "facts": facts, "summary": json.loads(run.summary.read_text())}


# --- answers --------------------------------------------------------------------------------------


def test_every_model_answers_every_question_in_both_modes(evaluated: dict[str, Any]) -> None:
    run, facts = evaluated["run"], evaluated["facts"]
    assert facts["models"] == ["base", "adapter", "merged", "teacher"]
    assert facts["questions"] == 3 and facts["questions_dropped"] == 1
    assert evaluated["summary"]["questions"]["dropped"] == {"degenerate": 1}
    retrieval = {r["question_id"]: r for r in read_jsonl(run.retrieval)}
    for model in ("base", "adapter", "merged", "teacher"):
        for mode in ("rag", "closed_book"):
            rows = read_jsonl(run.answers(model, mode))
            assert [r["question_id"] for r in rows] == ["q1", "q2", "q3"]
            for row in rows:
                assert {"question_id", "question", "contexts", "answer", "error"} <= row.keys()
                assert row["error"] is None and row["answer"].strip()
                if mode == "closed_book":
                    assert row["contexts"] == []
                elif model != "teacher":  # the one persisted retriever: every student saw the same contexts
                    assert row["contexts"] == retrieval[row["question_id"]]["contexts"]
                else:  # the reference is written with the question's source chunk among the contexts
                    source = next(q["source_chunk_id"] for q in QUESTIONS if q["id"] == row["question_id"])
                    assert source in row["context_ids"] and len(row["contexts"]) == 2
    assert len(retrieval["q1"]["contexts"]) == 2 and retrieval["q1"]["oracle_in_context"]
    # the adapter really changes the model
    base = [r["answer"] for r in read_jsonl(run.answers("base", "rag"))]
    tuned = [r["answer"] for r in read_jsonl(run.answers("adapter", "rag"))]
    merged = [r["answer"] for r in read_jsonl(run.answers("merged", "rag"))]
    assert base != tuned
    assert merged == tuned  # greedy: folding the adapter into the weights answers the same


def test_reference_contexts_swap_in_a_missed_source_chunk() -> None:
    from ragtune.eval.answer import reference_contexts

    chunk_text = dict(CHUNKS)
    retrieved = {"context_ids": ["c2", "c3"], "contexts": [chunk_text["c2"], chunk_text["c3"]]}
    missed = {"id": "q", "question": "?", "source_chunk_id": "c4"}
    assert reference_contexts(missed, retrieved, chunk_text) == (["c2", "c4"], [chunk_text["c2"], chunk_text["c4"]])
    hit = {**missed, "source_chunk_id": "c3"}
    assert reference_contexts(hit, retrieved, chunk_text) == (["c2", "c3"], retrieved["contexts"])


def test_the_first_students_server_starts_during_retrieval_only_when_its_answers_are_missing(write_config) -> None:
    from ragtune.eval.answer import REFERENCE_MODEL, ModelSpec, starts_a_server

    config = load_config(write_config(eval={"backend": "vllm", "modes": ["rag", "closed_book"]}))
    run_dir = RunDir(config.output_dir)
    base = ModelSpec("base", "base", "smollm2-135m-instruct", None, "base")
    teacher = ModelSpec(REFERENCE_MODEL, "teacher", "smollm2-135m-instruct", None, "teacher")
    assert starts_a_server(config, run_dir, base) and not starts_a_server(config, run_dir, teacher)
    run_dir.answers("base", "rag").parent.mkdir(parents=True)
    run_dir.answers("base", "rag").write_text("", encoding="utf-8")
    assert starts_a_server(config, run_dir, base)  # closed_book's answers are still missing
    run_dir.answers("base", "closed_book").write_text("", encoding="utf-8")
    assert not starts_a_server(config, run_dir, base)
    assert not starts_a_server(load_config(write_config(eval={"backend": "hf"})), run_dir, base)


def test_tuned_models_scores_only_the_merged_model(evaluated: dict[str, Any], tmp_path: Path) -> None:
    """`eval.tuned_models: [merged]` skips base + adapter/ (the merge stage verified they agree)."""
    run = RunDir(tmp_path / "merged_only")
    shutil.copytree(evaluated["run"].root, run.root)
    config = evaluated["config"].model_copy(update={"output_dir": run.root})
    config.eval = config.eval.model_copy(update={"tuned_models": ["merged"]})
    facts = evaluate.run(config, run, [])
    assert facts["models"] == ["base", "merged", "teacher"]
    assert "adapter" not in json.loads(run.summary.read_text())["comparisons"]["rag"]
    shutil.rmtree(run.merged)  # nothing merged (e.g. prompt tuning): the adapter is scored instead
    assert evaluate.run(config, run, [])["models"] == ["base", "adapter", "teacher"]


def test_rag_prompt_is_the_training_prompt(evaluated: dict[str, Any]) -> None:
    """Eval sends data_prep's messages: the same system prompt and template as the training rows."""
    from ragtune.core.rag import build_rag_messages

    config, run = evaluated["config"], evaluated["run"]
    row = read_jsonl(run.answers("base", "rag"))[0]
    messages = build_rag_messages(row["question"], row["contexts"], config.data_prep)
    assert messages[0]["content"] == config.data_prep.system_prompt
    assert all(context in messages[1]["content"] for context in row["contexts"])
    assert row["prompt_tokens"] > 0


# --- scores: no silent NaN ------------------------------------------------------------------------


def test_every_sample_metric_is_a_score_or_a_recorded_failure(evaluated: dict[str, Any]) -> None:
    run, summary = evaluated["run"], evaluated["summary"]
    reference_metrics = {"answer_correctness", "semantic_similarity", "bleu_score", "chrf_score", "rouge_score",
                         "non_llm_string_similarity"}
    answer_metrics = [m for m in ALL_METRICS if not m.startswith(("context_", "non_llm_context"))]
    llm_scored = 0
    for model in ("base", "adapter", "merged", "teacher"):
        for mode in ("rag", "closed_book"):
            rows = read_jsonl(run.scores(model, mode))
            expected = [m for m in answer_metrics if not (model == "teacher" and m in reference_metrics)]
            assert sorted((r["question_id"], r["metric"]) for r in rows) == sorted(
                (q, m) for q in ("q1", "q2", "q3") for m in expected)
            for row in rows:
                if row["value"] is None:
                    assert row["error"], row  # a failure always says why
                else:
                    assert row["error"] is None and math.isfinite(row["value"])
                    llm_scored += row["metric"] in ("faithfulness", "answer_relevancy", "answer_correctness")
            # the summary counts exactly the recorded failures
            for metric in expected:
                failed = sum(1 for r in rows if r["metric"] == metric and r["value"] is None)
                assert summary["results"][mode][model][metric]["failures"] == failed
    assert llm_scored > 0, "the in-process judge produced no LLM-judged score at all"
    retrieval_rows = read_jsonl(run.scores("retriever", "rag"))
    assert len(retrieval_rows) == 3 * 4
    assert all((r["value"] is None) == bool(r["error"]) for r in retrieval_rows)
    assert_no_nan(run.summary)


def assert_no_nan(path: Path) -> None:
    """JSON numbers only: Python's json writes a NaN mean as the bare constant NaN."""
    def reject(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    json.loads(path.read_text(), parse_constant=reject)


def test_comparisons_are_paired_on_the_intersection(evaluated: dict[str, Any]) -> None:
    run, summary = evaluated["run"], evaluated["summary"]
    base = {(r["question_id"], r["metric"]): r["value"] for r in read_jsonl(run.scores("base", "rag"))}
    tuned = {(r["question_id"], r["metric"]): r["value"] for r in read_jsonl(run.scores("adapter", "rag"))}
    for metric, comparison in summary["comparisons"]["rag"]["adapter"].items():
        if metric == "ragas_score":
            continue
        common = [q for q in ("q1", "q2", "q3") if base[(q, metric)] is not None and tuned[(q, metric)] is not None]
        assert comparison["n"] == len(common) and comparison["excluded"] == 3 - len(common)
        if common:
            expected = sum(tuned[(q, metric)] - base[(q, metric)] for q in common) / len(common)
            assert comparison["delta"] == pytest.approx(expected)
            assert comparison["wins"] + comparison["ties"] + comparison["losses"] == len(common)
        # 3 questions: no verdict is ever declared
        assert comparison["verdict"].startswith("too few questions")


def test_judge_sanity_check_is_reported_and_warns(evaluated: dict[str, Any]) -> None:
    run, summary = evaluated["run"], evaluated["summary"]
    rows = read_jsonl(run.judge_sanity)
    assert {r["label"] for r in rows} == {"good", "bad"}
    assert all(r["pair"] != r["other"] for r in rows)
    sanity = summary["judge"]["sanity"]
    assert set(sanity["metrics"]) == {"faithfulness", "answer_relevancy", "context_precision", "context_recall"}
    # a random 2-layer judge cannot discriminate: the report must say so loudly, first
    assert sanity["warning"] and summary["warnings"][0] == sanity["warning"]
    assert sanity["warning"].startswith("JUDGE")


def test_timings_say_where_eval_time_goes(evaluated: dict[str, Any]) -> None:
    timings = evaluated["summary"]["timings"]
    assert set(timings["generation_seconds_per_question"]) == {
        f"{m}/{mode}" for m in ("base", "adapter", "merged", "teacher") for mode in ("rag", "closed_book")}
    assert timings["judge"]["calls"] < timings["judge"]["requests"]  # batched and cached
    assert timings["embeddings_seconds"] > 0 and timings["scoring_seconds"] > 0


# --- re-running -----------------------------------------------------------------------------------


def test_rerun_with_another_adapter_reuses_the_other_answers(
    evaluated: dict[str, Any], models: dict[str, Path], tmp_path: Path
) -> None:
    run = RunDir(tmp_path / "rerun")
    shutil.copytree(evaluated["run"].root, run.root)
    config = evaluated["config"].model_copy(update={"output_dir": run.root})
    before = {p.name: p.read_bytes() for p in run.eval.glob("answers.*.jsonl")}
    facts = evaluate.run(config, run, [models["other"]])
    assert facts["models"] == ["base", "adapter", "other", "merged", "teacher"]
    generation = facts["timings"]["generation"]
    for model in ("base", "adapter", "merged", "teacher"):
        assert "load_seconds" not in generation[model]  # not even loaded
        assert generation[model]["rag"]["generated"] == 0 and generation[model]["rag"]["reused"] == 3
    assert generation["other"]["rag"]["generated"] == 3
    for name, content in before.items():
        assert (run.eval / name).read_bytes() == content
    summary = json.loads(run.summary.read_text())
    assert "other" in summary["comparisons"]["rag"]
    # only the new adapter's samples were scored
    assert facts["timings"]["scored"] == len(read_jsonl(run.scores("other", "rag"))) * 2


def test_changed_generation_settings_regenerate_and_keep_the_old_answers(
    evaluated: dict[str, Any], tmp_path: Path
) -> None:
    run = RunDir(tmp_path / "changed")
    shutil.copytree(evaluated["run"].root, run.root)
    config = evaluated["config"].model_copy(update={"output_dir": run.root})
    config.eval = config.eval.model_copy(update={"max_new_tokens": 6, "metrics": ["bleu_score"], "modes": ["rag"],
                                                 "judge_sanity_pairs": 0})
    facts = evaluate.run(config, run, [])
    assert facts["timings"]["generation"]["base"]["rag"]["generated"] == 3
    assert all(r["completion_tokens"] <= 6 for r in read_jsonl(run.answers("base", "rag")))
    stale = list(run.stale.glob("*/eval/answers.base.rag.jsonl"))
    assert len(stale) == 1 and len(read_jsonl(stale[0])) == 3


def test_teacher_equal_to_the_student_is_flagged(prepared_data: Path, models: dict[str, Path], tmp_path: Path) -> None:
    """One model for every role, no teacher instruction and the answer gates off (no longer retry of a cut answer):
    the reference is then the base's own answer (the teacher answers with its own max_new_tokens, here eval's)."""
    config, run = make_run(tmp_path, prepared_data, {**models, "teacher": models["student"]}, adapter=False,
                           metrics=["bleu_score"], modes=["rag"], judge_sanity_pairs=0, max_new_tokens=16)
    gates = config.data_prep.answer_gates.model_copy(update={"enabled": False})
    config.data_prep = config.data_prep.model_copy(update={"answer_gates": gates})
    evaluate.run(config, run, [])
    summary = json.loads(run.summary.read_text())
    assert summary["results"]["rag"]["base"]["bleu_score"]["mean"] == pytest.approx(1.0)
    assert any("favour the base by construction" in w for w in summary["warnings"])


def test_reference_is_the_best_gated_of_the_teachers_candidates(
    prepared_data: Path, models: dict[str, Path], smollm2_dir: Path, tmp_path: Path
) -> None:
    """Eval's rag reference is chosen as prep chooses a training row: among the teacher's candidates that pass the
    answer gates, the one `pick_best` chooses (the others agree with it most), else its first answer, marked with
    the gate it failed; every candidate stays on the row. Real SmolLM2 as teacher, best-of-3."""
    from ragtune.core.gates import check_answer, pick_best
    from ragtune.core.grounding import support
    from ragtune.eval.answer import answer_fingerprint, model_specs

    config, run = make_run(tmp_path, prepared_data, {**models, "teacher": smollm2_dir}, adapter=False,
                           metrics=["grounding"], modes=["rag"], judge_sanity_pairs=0)
    config.teacher = config.teacher.model_copy(update={"num_candidates": 3, "max_new_tokens": 48})
    evaluate.run(config, run, [])
    rows = read_jsonl(run.answers("teacher", "rag"))
    assert len(rows) == 3
    for row in rows:
        candidates = row["candidates"]
        assert len(candidates) == 3
        verdicts = [check_answer(c["text"], c["finish_reason"], row["contexts"], question=row["question"])
                    for c in candidates]
        assert [v.reason for v in verdicts] == [c["reason"] for c in candidates]
        best = pick_best(verdicts, [c["text"] for c in candidates])
        expected = 0 if best is None else best
        assert row["candidate"] == expected and row["gate"] == candidates[expected]["reason"]
        assert row["raw_answer"] == candidates[expected]["text"].strip()
        assert row["grounding"] == round(support(row["answer"], row["contexts"], row["question"]), 3)
    assert any(len({c["text"] for c in row["candidates"]}) > 1 for row in rows)  # the samples are samples
    # the students' rows carry no gate facts, and the reference's fingerprint follows the best-of-N settings
    assert "candidates" not in read_jsonl(run.answers("base", "rag"))[0]
    teacher = next(s for s in model_specs(config, run, []) if s.kind == "teacher")
    other = config.model_copy(update={"teacher": config.teacher.model_copy(update={"num_candidates": 2})})
    assert answer_fingerprint(config, run, teacher, "rag") != answer_fingerprint(other, run, teacher, "rag")
    assert answer_fingerprint(config, run, teacher, "closed_book") == answer_fingerprint(other, run, teacher,
                                                                                           "closed_book")


def test_answers_that_all_fail_stop_eval_non_zero_and_a_rerun_retries_them(
    prepared_data: Path, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that fails every generation (injected) must not give an eval that "completes" over errors: more than
    eval.max_failure_fraction failed stops it with the first distinct errors; the failed rows stay, and once the
    cause is gone a rerun retries exactly them."""
    from ragtune.core.errors import TooManyFailures
    from ragtune.core.llm import HFChatBackend

    config, run = make_run(tmp_path, prepared_data, models, adapter=False, metrics=["bleu_score"], modes=["rag"],
                           judge_sanity_pairs=0)

    def dead_device(self: Any, batch: Any, *args: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(HFChatBackend, "_generate", dead_device)
    with pytest.raises(TooManyFailures, match=r"eval answers of base \(rag\): 3 of 3 failed .*illegal memory access"):
        evaluate.run(config, run, [])
    rows = read_jsonl(run.answers("base", "rag"))
    assert len(rows) == 3 and all(r["error"] and r["answer"] is None for r in rows)
    monkeypatch.undo()
    facts = evaluate.run(config, run, [])
    assert facts["timings"]["generation"]["base"]["rag"]["generated"] == 3
    assert all(r["error"] is None for r in read_jsonl(run.answers("base", "rag")))


def test_missing_questions_file_says_what_to_run(evaluated: dict[str, Any], tmp_path: Path) -> None:
    from ragtune.eval.answer import EvalError

    config = evaluated["config"].model_copy(update={"output_dir": tmp_path / "empty"})
    with pytest.raises(EvalError, match="ragtune prep"):
        evaluate.run(config, RunDir(tmp_path / "empty"), [])


def test_bad_adapter_folder_is_named(evaluated: dict[str, Any], tmp_path: Path) -> None:
    from ragtune.eval.answer import EvalError

    (tmp_path / "not_an_adapter").mkdir()
    with pytest.raises(EvalError, match="not_an_adapter.*adapter_config.json"):
        evaluate.run(evaluated["config"], evaluated["run"], [tmp_path / "not_an_adapter"])


# --- the judge ------------------------------------------------------------------------------------


def test_batched_judge_returns_schema_valid_objects_in_few_calls(models: dict[str, Path]) -> None:
    """Ragas's own response models, many concurrent calls: every result validates, calls are batched,
    and identical greedy prompts are generated once."""
    from ragas.metrics.collections.answer_relevancy.util import AnswerRelevanceOutput
    from ragas.metrics.collections.faithfulness.util import NLIStatementOutput

    from ragtune.eval.judge import BatchedJudge
    from ragtune.core.llm import HFChatBackend

    judge = BatchedJudge(HFChatBackend(str(models["student"]), batch_size=4, max_new_tokens=96),
                         max_new_tokens=96, max_length=30, max_items=2)

    async def ask() -> list[Any]:
        prompts = [f"Question {i}: what does Uber do?" for i in range(6)]
        calls = [judge.agenerate(p, AnswerRelevanceOutput) for p in prompts]
        calls += [judge.agenerate(prompts[0], AnswerRelevanceOutput)]  # a repeat: answered from the first
        calls += [judge.agenerate("Judge: Uber is a company.", NLIStatementOutput)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(ask())
    for result in results[:7]:
        assert isinstance(result, AnswerRelevanceOutput) and result.noncommittal in (0, 1)
    assert isinstance(results[7], NLIStatementOutput) and len(results[7].statements) <= 2
    assert all(s.verdict in (0, 1) for s in results[7].statements)
    assert results[6] == results[0]
    assert judge.usage.requests == 8 and judge.usage.cached == 1
    assert judge.usage.calls == 3  # 6 distinct relevance prompts in batches of 4, then the NLI one
    assert isinstance(judge.generate("Question 0: what does Uber do?", AnswerRelevanceOutput), AnswerRelevanceOutput)


def test_bounded_schema_rejects_what_ragas_cannot_parse() -> None:
    """The bounds keep Ragas's schema valid and exclude control characters and non-binary verdicts."""
    import xgrammar as xgr
    from ragas.metrics.collections.context_recall.util import ContextRecallOutput
    from xgrammar.testing import _is_grammar_accept_string

    from ragtune.eval.judge import bounded_schema

    schema = bounded_schema(ContextRecallOutput.model_json_schema(), max_length=20, max_items=2)
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)

    def output(statement: str, attributed: int, n: int = 1) -> str:
        item = {"statement": statement, "reason": "in the context", "attributed": attributed}
        return json.dumps({"classifications": [item] * n})

    good = output("Uber has drivers.", 1)
    assert _is_grammar_accept_string(grammar, good)
    ContextRecallOutput.model_validate_json(good)
    assert not _is_grammar_accept_string(grammar, output("Uber has drivers.", 2))
    assert not _is_grammar_accept_string(grammar, output("Uber\thas drivers.", 1).replace("\\t", "\t"))
    assert not _is_grammar_accept_string(grammar, output("Uber has many many drivers.", 1))
    assert not _is_grammar_accept_string(grammar, output("Uber has drivers.", 1, n=3))


def test_judge_output_parsing_and_its_errors() -> None:
    """An OpenAI-compatible server without structured output may wrap the JSON in prose or a fence."""
    from ragas.metrics.collections.answer_relevancy.util import AnswerRelevanceOutput

    from ragtune.eval.judge import BatchedJudge, JudgeError

    fenced = 'Here you go:\n```json\n{"question": "What does Uber do?", "noncommittal": 0}\n```'
    assert BatchedJudge._parse(fenced, None, AnswerRelevanceOutput).question == "What does Uber do?"
    with pytest.raises(JudgeError, match="not a valid AnswerRelevanceOutput"):
        BatchedJudge._parse('{"question": 3}', None, AnswerRelevanceOutput)
    with pytest.raises(JudgeError, match="judge call failed: HTTP 500"):
        BatchedJudge._parse(None, "HTTP 500: boom", AnswerRelevanceOutput)


# --- a judge that fails -----------------------------------------------------------------------------


class _JudgeServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers AnswerRelevancy calls and stalls on everything else."""

    stall_seconds = 20.0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        schema_name = body.get("response_format", {}).get("json_schema", {}).get("name")
        if schema_name != "AnswerRelevanceOutput":
            time.sleep(self.stall_seconds)
        content = json.dumps({"question": "What does Uber do?", "noncommittal": 0})
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                              "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (that is the point)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("limit", ["backend timeout", "eval.judge_timeout"])
def test_failing_judge_is_a_recorded_failure_not_a_nan(
    limit: str, judge_server: str, prepared_data: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    # 4 s, not 1: under CI's load a 1 s limit also cut the answers this server gives at once
    backend_timeout, judge_timeout = (4.0, 600.0) if limit == "backend timeout" else (30.0, 4.0)
    config, run = make_run(
        tmp_path, prepared_data, models,
        judge={"backend": "openai", "model": "stub-judge", "base_url": judge_server, "timeout": backend_timeout,
               "max_retries": 0, "max_concurrency": 8},
        metrics=["faithfulness", "answer_relevancy", "bleu_score"], modes=["rag"], judge_sanity_pairs=2,
        judge_timeout=judge_timeout,
    )
    evaluate.run(config, run, [])
    summary = json.loads(run.summary.read_text())
    base = summary["results"]["rag"]["base"]
    assert base["faithfulness"]["n"] == 0 and base["faithfulness"]["mean"] is None
    assert base["faithfulness"]["failures"] == 3
    (reason,) = base["faithfulness"]["failure_reasons"]
    assert re.search(r"timed out after 4(\.0)?s", reason), reason
    assert base["answer_relevancy"]["n"] == 3 and 0 <= base["answer_relevancy"]["mean"] <= 1, base["answer_relevancy"]
    assert base["bleu_score"]["n"] == 3
    assert base["ragas_score"] == {"n": 0, "value": None}
    for row in read_jsonl(run.scores("base", "rag")):
        assert (row["value"] is None) == (row["metric"] == "faithfulness")
    assert any("faithfulness: 3 of 3 samples failed" in w for w in summary["warnings"])
    assert_no_nan(run.summary)


# --- report -----------------------------------------------------------------------------------------


def test_report_files_and_verdict_rows(evaluated: dict[str, Any], tmp_path: Path) -> None:
    run = RunDir(tmp_path / "reported")
    shutil.copytree(evaluated["run"].root, run.root)
    out = report.run([run.root])
    assert Path(out["report_html"]) == run.report_html and run.report_md.exists()
    rows = list(csv.DictReader(run.per_question_csv.open(encoding="utf-8")))
    assert len(rows) == 6  # 3 questions x 2 modes
    first = rows[0]
    assert first["question"] and first["reference_answer"]
    assert first["base.answer"] and first["adapter.answer"] and first["merged.answer"] and first["teacher.answer"]
    assert "base.bleu_score" in first and "retriever.non_llm_context_recall" in first
    comparisons = report.comparison_rows(evaluated["summary"])
    assert {(r["mode"], r["model"]) for r in comparisons} == {
        (mode, model) for mode in ("rag", "closed_book") for model in ("adapter", "merged", "teacher")}
    assert list(comparisons[0]) == list(report.VERDICT_COLUMNS)
    # the CLI's short table: (metric, base, tuned, delta with CI, verdict), fine-tuned models only
    verdicts = report.verdict_rows(evaluated["summary"])
    assert all(len(row) == 6 and "teacher" not in row[0] for row in verdicts)
    relevancy = next(r for r in verdicts if r[0] == "answer_relevancy (adapter, rag)")
    entry = evaluated["summary"]["comparisons"]["rag"]["adapter"]["answer_relevancy"]
    assert relevancy[1] == f"{entry['base']:.3f}" and relevancy[4] == entry["verdict"]
    assert relevancy[3].startswith(f"{entry['delta']:+.3f} [")
    assert "delta (95% CI)" in report.verdict_table(evaluated["summary"]).splitlines()[0]
    md = run.report_md.read_text()
    assert "JUDGE" in md and "| mode | model | metric |" in md


def test_report_compares_several_runs_offline(evaluated: dict[str, Any], tmp_path: Path) -> None:
    runs = []
    for name in ("seed1", "seed2"):
        run = RunDir(tmp_path / name)
        shutil.copytree(evaluated["run"].root, run.root)
        summary = json.loads(run.summary.read_text())
        summary["run"]["name"] = name
        run.summary.write_text(json.dumps(summary))
        runs.append(run.root)
    out = report.run(runs, tmp_path / "compare")
    md = Path(out["report_md"]).read_text()
    assert "Across runs" in md and "seed1" in md and "seed2" in md
    assert {r["run"] for r in csv.DictReader(Path(out["per_question_csv"]).open())} == {"seed1", "seed2"}
    with pytest.raises(report.ReportError, match="ragtune eval"):
        report.run([tmp_path / "nothing"])


def test_report_renders_in_headless_chromium(evaluated: dict[str, Any], tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium)")
    run = RunDir(tmp_path / "rendered")
    shutil.copytree(evaluated["run"].root, run.root)
    report.run([run.root])
    html = run.report_html.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html) and "<link" not in html  # self-contained
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=3000"]
    dom = subprocess.run([*command, "--dump-dom", run.report_html.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    shapes = int(dom.split('data-svg-shapes="')[1].split('"')[0])
    drawn = int(dom.split('data-rendered-shapes="')[1].split('"')[0])
    assert shapes > 20 and drawn == shapes  # every bar, whisker and dot was laid out with a size
    png = tmp_path / "report.png"
    subprocess.run([*command, f"--screenshot={png}", "--window-size=1200,2000", run.report_html.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    colours = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20  # not a blank page


@pytest.mark.slow
def test_smollm2_judge_gives_ragas_scores_not_nan() -> None:
    """The 135M judge that gave NaN on every sample through Ragas's legacy wrappers, now schema-constrained,
    scores a real sample through Ragas's AnswerRelevancy (~1 min on 2 CPU cores, mostly loading the GGUF)."""
    from ragtune.eval.judge import BatchedJudge, timed_embeddings
    from ragtune.eval.score import Sample, build_metrics, score_one
    from ragtune.core.llm import HFChatBackend
    from ragtune.core.models import resolve_embedding

    judge = BatchedJudge(HFChatBackend("smollm2-135m-instruct", batch_size=4, max_new_tokens=64),
                         max_new_tokens=64, max_length=64, max_items=3)
    calls = build_metrics(["answer_relevancy"], judge, timed_embeddings(resolve_embedding("all-minilm-l6-v2"), 32),
                          strictness=2)
    sample = Sample("q1", "In how many countries does Uber operate?", answer="Uber operates in over 70 countries.")
    result = asyncio.run(score_one(calls["answer_relevancy"], "answer_relevancy", sample))
    assert result["error"] is None, result
    assert 0.0 <= result["value"] <= 1.0
    assert judge.usage.calls == 1 and judge.usage.cached == 1  # the repeated greedy question is generated once


# --- the grounding metric and gap closed, on score rows written by eval.score ---------------------

GROUNDING_CONTEXT = "Uber operates a ridesharing platform in over 70 countries."


def _grounding_table(path: Path, answers: dict[str, str | None], *, teacher: bool = False,
                     contexts: list[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Score answers on `grounding` through eval.score's own jobs, metric and row writer; the loaded rows."""
    from ragtune.core.artifacts import JsonlAppender
    from ragtune.eval.score import answer_jobs, build_metrics, load_scores, run_jobs

    rows = [{"question_id": qid, "question": "What is Uber?", "answer": text,  # no word pair to restate
             "error": "backend down" if text is None else None,
             "contexts": [GROUNDING_CONTEXT] if contexts is None else contexts} for qid, text in answers.items()]
    retrieval = {qid: {"contexts": [GROUNDING_CONTEXT]} for qid in answers}  # closed_book's evidence
    with JsonlAppender(path, key="key") as appender:
        jobs = answer_jobs(appender, rows, ["grounding", "rouge_score"], is_reference_model=teacher, references={},
                           retrieval=retrieval, fingerprint="test")
        asyncio.run(run_jobs(jobs, build_metrics(sorted({j.metric for j in jobs}), None, None, 1), concurrency=4))
    return load_scores(path)


def test_grounding_metric_scores_the_final_answer_against_its_contexts(tmp_path: Path) -> None:
    from ragtune.eval.config import EvalConfig

    assert "grounding" in EvalConfig().metrics  # on by default, next to the Ragas metrics
    table = _grounding_table(tmp_path / "scores.jsonl", {
        "all": "Uber operates a ridesharing platform in 70 countries.",  # every content-word pair is in the context
        "half": "Uber operates bananas.",  # (uber, operate) found, (operate, banana) not
        "raft": "##begin_quote## Uber operates a ridesharing platform ##end_quote## <ANSWER>: Purple bananas.",
        "empty": "", "failed": None,
    })
    assert {q: table[q]["grounding"]["value"] for q in ("all", "half", "raft")} == {"all": 1.0, "half": 0.5, "raft": 0.0}
    assert table["empty"]["grounding"]["error"] == "empty answer: the model generated no text"
    assert table["failed"]["grounding"]["error"].startswith("no answer: generation failed (backend down)")
    assert table["all"]["rouge_score"]["value"] is None  # reference-based metrics need the teacher's answer
    # closed_book rows carry no contexts: the ones retrieved for the question are the evidence
    closed = _grounding_table(tmp_path / "closed.jsonl", {"q": "Over 70 countries."}, contexts=[])
    assert closed["q"]["grounding"]["value"] == 1.0
    # the teacher is scored on grounding (not on the reference-based metrics: it wrote the references)
    teacher = _grounding_table(tmp_path / "teacher.jsonl", {"q": "Uber operates bananas."}, teacher=True)
    assert teacher["q"]["grounding"]["value"] == 0.5 and "rouge_score" not in teacher["q"]


def test_gap_closed_from_real_score_rows(tmp_path: Path) -> None:
    from ragtune.eval.stats import MIN_GAP, gap_closed
    from ragtune.eval.summary import gap_to_teacher

    qids = [f"q{i}" for i in range(5)]
    base = _grounding_table(tmp_path / "base.jsonl", {q: "Purple bananas grow quickly." for q in qids})  # 0.0
    tuned = _grounding_table(tmp_path / "tuned.jsonl", {**{q: "Uber operates bananas." for q in qids},  # 0.5
                                                        "q4": ""})  # a failed score: q4 leaves the comparison
    teacher = _grounding_table(tmp_path / "teacher.jsonl", {q: "Uber operates a ridesharing platform in 70 countries."
                                                            for q in qids},
                               teacher=True)  # 1.0
    assert gap_to_teacher(base, tuned, teacher, qids, "grounding") == {"teacher": 1.0, "gap_closed": 0.5, "gap_n": 4}
    assert gap_to_teacher(base, teacher, tuned, qids, "grounding")["gap_closed"] == 2.0  # beyond the teacher
    assert gap_to_teacher(tuned, base, teacher, qids, "grounding")["gap_closed"] == -1.0  # worse than the base
    # no teacher score (reference-based metric) or no teacher lead: no ratio
    assert gap_to_teacher(base, tuned, teacher, qids, "rouge_score") == {"teacher": None, "gap_closed": None, "gap_n": 0}
    assert gap_to_teacher(base, tuned, base, qids, "grounding")["gap_closed"] is None
    assert gap_to_teacher(base, tuned, None, qids, "grounding")["gap_closed"] is None
    assert gap_closed(0.5, 0.9, 0.5 + MIN_GAP / 2) is None and gap_closed(0.5, 0.6, 0.7) == pytest.approx(0.5)


# --- retrieval conditions: did the student learn to read the context? -------------------------------

CONDITION_METRICS = ["grounding", "rouge_score", "chrf_score"]


def test_retrieval_conditions_answer_the_rag_questions_under_other_contexts(
    prepared_data: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    """`oracle` puts the source chunk first, `distractors_only` never shows it (topped up to similarity_top_k from
    the next rank), `{top_k: 1}` is the retriever's first rank; every student answers each, the teacher none; the
    judge-free metrics score every answer, and the summary and report.md hold the table."""
    from ragtune.eval.score import load_scores

    config, run = make_run(tmp_path, prepared_data, models, modes=["rag"], tuned_models=["adapter"],
                           metrics=[*CONDITION_METRICS, "faithfulness"], judge_sanity_pairs=0,
                           retrieval_conditions=["oracle", "distractors_only", {"top_k": 1}])
    evaluate.run(config, run, [])
    chunk_text, retrieval = dict(CHUNKS), {r["question_id"]: r for r in read_jsonl(run.retrieval)}
    source = {q["id"]: q["source_chunk_id"] for q in QUESTIONS if "dropped" not in q}
    for model in ("base", "adapter"):
        rows = {name: read_jsonl(run.answers(model, f"rag@{name}")) for name in ("oracle", "distractors_only", "top_k=1")}
        for name, answers in rows.items():
            assert [r["question_id"] for r in answers] == ["q1", "q2", "q3"] and all(r["error"] is None for r in answers)
            scores = read_jsonl(run.scores(model, f"rag@{name}"))  # judge-free only: no faithfulness
            assert sorted((r["question_id"], r["metric"]) for r in scores) == sorted(
                (q, m) for q in source for m in CONDITION_METRICS)
            assert all((r["value"] is None) == bool(r["error"]) for r in scores)
        for row in rows["oracle"]:
            qid = row["question_id"]
            assert row["context_ids"][0] == source[qid] and row["contexts"][0] == chunk_text[source[qid]]
            assert len(row["contexts"]) == 2 and row["context_ids"][1] != source[qid]
        for row in rows["distractors_only"]:
            assert source[row["question_id"]] not in row["context_ids"] and len(row["contexts"]) == 2
            assert chunk_text[source[row["question_id"]]] not in row["contexts"]
        assert [r["context_ids"] for r in rows["top_k=1"]] == [retrieval[q]["context_ids"][:1] for q in source]
    assert not list(run.eval.glob("answers.teacher.rag@*"))

    part = json.loads(run.summary.read_text())["retrieval_conditions"]
    facts = {c["name"]: c for c in part["conditions"]}
    assert list(facts) == ["retrieved", "oracle", "distractors_only", "top_k=1"] and part["metrics"] == CONDITION_METRICS
    assert (facts["oracle"]["source_in_context"], facts["distractors_only"]["source_in_context"]) == (1.0, 0.0)
    assert facts["top_k=1"]["contexts_per_question"] == 1.0 and all(c["skipped"] == 0 for c in facts.values())
    base, tuned = (load_scores(run.scores(m, "rag@oracle")) for m in ("base", "adapter"))
    entry = part["comparisons"]["oracle"]["adapter"]["rouge_score"]
    assert entry["n"] == 3 and entry["delta"] == pytest.approx(
        sum(tuned[q]["rouge_score"]["value"] - base[q]["rouge_score"]["value"] for q in source) / 3)
    assert part["readings"][0].startswith("adapter vs base, rouge_score: ") and "with distractors only" in part["readings"][0]
    assert_no_nan(run.summary)

    report.run([run.root])
    section = run.report_md.read_text().split("### Retrieval conditions")[1].split("\n### ")[0]
    assert "| condition | model | metric | n | base | tuned | delta (95% CI) | verdict |" in section
    assert len([line for line in section.splitlines() if line.startswith("| oracle | adapter |")]) == 3
    assert f"- {part['readings'][0]}" in section
    again = evaluate.run(config, run, [])["timings"]["generation"]  # resumed: every condition's answers reused
    assert all(again[m][f"rag@{c}"]["generated"] == 0 for m in ("base", "adapter") for c in facts if c != "retrieved")


def test_golden_question_without_contexts_is_skipped_and_counted(
    prepared_data: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    """A golden row's `contexts` stand in for the source chunk (a chunk holding one is the source); a golden
    question without them is skipped under oracle and distractors_only, and the summary and report count it."""
    golden = tmp_path / "golden.jsonl"
    passage = "Uber Eats lets consumers order food from restaurants"  # held in chunk c2
    golden.write_text(json.dumps({"id": "g1", "question": "What does Uber Eats let consumers do?",
                                  "reference": "Order food from restaurants.", "contexts": [passage]}) + "\n"
                      + json.dumps({"id": "g2", "question": "What was Uber's revenue in 2021?",
                                    "reference": "17.5 billion dollars."}) + "\n")
    config, run = make_run(tmp_path, prepared_data, models, adapter=False, modes=["rag"], metrics=["rouge_score"],
                           judge_sanity_pairs=0, questions_file=str(golden),
                           retrieval_conditions=["oracle", "distractors_only"])
    evaluate.run(config, run, [])
    (oracle,) = read_jsonl(run.answers("base", "rag@oracle"))
    assert oracle["context_ids"][0] == "golden#1" and oracle["contexts"][0] == passage
    assert len(oracle["contexts"]) == 2 and oracle["context_ids"][1] != "c2"
    (distractors,) = read_jsonl(run.answers("base", "rag@distractors_only"))
    assert distractors["question_id"] == "g1" and len(distractors["contexts"]) == 2 and "c2" not in distractors["context_ids"]
    facts = {c["name"]: c for c in json.loads(run.summary.read_text())["retrieval_conditions"]["conditions"]}
    for name in ("oracle", "distractors_only"):
        assert (facts[name]["questions"], facts[name]["skipped"]) == (1, 1)
        assert list(facts[name]["skip_reasons"]) == ["golden question without `contexts`: no source passage to put in or take out"]
    assert facts["retrieved"]["skipped"] == 0
    report.run([run.root])
    md = run.report_md.read_text()
    assert "- oracle: 1 of 2 questions skipped (golden question without `contexts`" in md
    assert "| oracle | base | rouge_score | 1 |" in md  # no tuned model: the base's means alone


def test_retrieval_condition_errors_name_the_key(write_config: Any) -> None:
    from ragtune.app.config import ConfigError

    for conditions, problem in ((["orcale"], r"\[0\]: 'orcale' is not a retrieval condition"),
                                ([{"top_k": 0}], r"top_k is a whole number of chunks >= 1")):
        with pytest.raises(ConfigError, match=r"config.yaml:\d+: eval.retrieval_conditions: .*" + problem):
            load_config(write_config(eval={"retrieval_conditions": conditions}))
    with pytest.raises(ConfigError, match=r"add `rag` to eval.modes"):
        load_config(write_config(eval={"retrieval_conditions": ["oracle"], "modes": ["closed_book"]}))
    config = load_config(write_config(eval={"retrieval_conditions": ["oracle", {"top_k": [1, 3]}, "top_k=1"]}))
    assert config.eval.retrieval_conditions == ["oracle", "top_k=1", "top_k=3"]
