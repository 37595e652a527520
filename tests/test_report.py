"""The report's data, training and side-by-side sections, the grounding metric and gap closed, on a real small
run: prep's index and files, a real tiny LoRA training (loss curve), the eval stage on tiny real models with the
non-LLM metrics, then report.html rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import untied_tiny_model
from ragtune.app.config import load_config
from ragtune.core.artifacts import read_jsonl, write_json
from ragtune.core.grounding import final_answer, grounding
from ragtune.core.run_dir import Manifest, RunDir
from ragtune.eval import evaluate, report
from ragtune.eval.score import load_scores
from ragtune.eval.stats import MIN_GAP

# The run folder is made by the stages themselves: ~40 s of CPU (training 11 s, eval 23 s on 2 cores).
pytestmark = pytest.mark.slow

EXCERPT_PDF = Path(__file__).parent / "data" / "uber_10k_excerpt.pdf"
METRICS = ["grounding", "rouge_score", "chrf_score", "non_llm_context_recall"]
CONDITIONS = ["oracle", "distractors_only", {"top_k": 1}]  # with rag mode itself, 4 rows per model and metric
FACTS = [  # (chunk id, chunk text, question, teacher-style answer)
    ("c1", "Uber operates a ridesharing platform connecting riders with drivers in over 70 countries.",
     "In how many countries does Uber operate its ridesharing platform?", "In over 70 countries."),
    ("c2", "Uber Eats lets consumers order food from restaurants and have it delivered by couriers.",
     "What does Uber Eats let consumers do?", "Order food from restaurants for delivery by couriers."),
    ("c3", "Uber Freight connects shippers with carriers and provides logistics services for trucking.",
     "Whom does Uber Freight connect?", "Shippers with carriers."),
    ("c4", "In 2021 Uber's revenue was 17.5 billion dollars, up 57 percent year over year.",
     "What was Uber's revenue in 2021?", "17.5 billion dollars."),
    ("c5", "Gross Bookings grew 56 percent year over year to 90.4 billion dollars in 2021.",
     "How much did Gross Bookings grow in 2021?", "56 percent, to 90.4 billion dollars."),
    ("c6", "Mobility trips were lower in 2021 because of COVID-19 restrictions in many cities.",
     "Why were Mobility trips lower in 2021?", "Because of COVID-19 restrictions."),
]


def _write_prep_outputs(config: Any, run: RunDir) -> None:
    """What prep leaves: chunks, a persisted LlamaIndex index, held-out questions, train.jsonl with the teacher's
    usage (counted with its tokenizer and chat template, as the hf backend counts), rejected answers, the question
    generations, and stats.json."""
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.schema import TextNode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from ragtune.core.models import resolve_embedding
    from ragtune.core.rag import build_rag_messages
    from ragtune.data_prep.prep import describe

    run.data.mkdir(parents=True)
    chunks = [{"id": cid, "text": text, "metadata": {"file": "uber.pdf", "page": i + 1}}
              for i, (cid, text, _, _) in enumerate(FACTS)]
    (run.chunks).write_text("".join(json.dumps(c) + "\n" for c in chunks))
    run.questions_eval.write_text("".join(
        json.dumps({"id": f"q{i + 1}", "question": q, "source_chunk_id": cid, "split": "eval"}) + "\n"
        for i, (cid, _, q, _) in enumerate(FACTS)))
    Settings.llm = None
    index = VectorStoreIndex([TextNode(id_=c["id"], text=c["text"], metadata=c["metadata"]) for c in chunks],
                             embed_model=HuggingFaceEmbedding(model_name=resolve_embedding("all-minilm-l6-v2")))
    index.storage_context.persist(persist_dir=str(run.index))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.teacher.model)
    rows = []
    for i, (_, text, q, a) in enumerate(FACTS * 2):
        messages = build_rag_messages(q, [text], config.data_prep)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        usage = {"prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                 "completion_tokens": len(tokenizer(a)["input_ids"]) + 1}  # + the end-of-turn token
        rows.append({"messages": [*messages, {"role": "assistant", "content": a}],
                     "meta": {"question_id": f"t{i}", "mode": "rag", "candidates": 1, "usage": usage}})
    run.train_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.answers_rejected.write_text("".join(json.dumps(
        {"id": f"r{i}", "question_id": f"r{i}", "question": q, "reason": "ungrounded", "context_ids": [cid],
         "candidates": [{"text": "It is not stated in the context at all.", "reason": "ungrounded"}] * 2}) + "\n"
        for i, (cid, _, q, _) in enumerate(FACTS[:3])))
    run.questions_raw.write_text("".join(json.dumps(
        {"chunk_id": cid, "split": "train", "completion": f"Question: {q}", "candidates": [{"question": q}]}) + "\n"
        for cid, _, q, _ in FACTS))
    describe(config, run, {"documents": 1, "pages": 8, "chunks": 6, "questions_train": 12, "questions_eval": 6,
                           "questions_rejected": {"near-duplicate": 3, "degenerate": 1}, "train_rows": 12})
    stats = json.loads(run.stats.read_text())
    # prep's answer gates record these beside the question counts (issue 9); until prep writes them, add them here
    stats["dataset"].setdefault("answers_rejected", {"truncated": 2, "ungrounded": 5})
    stats["dataset"].setdefault("answers_kept", 12)
    write_json(run.stats, stats)


@pytest.fixture(scope="module")
def reported(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run folder made by the stages themselves (prep's files, LoRA training, eval), and its report."""
    from ragtune.train import sft
    from ragtune.train.data_stats import describe_rows

    root = tmp_path_factory.mktemp("reported")
    student = untied_tiny_model(tiny_llama_dir, root / "student", seed=0)
    teacher = untied_tiny_model(tiny_llama_dir, root / "teacher", seed=1)
    run = RunDir(root / "run")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "name": "report-test", "output_dir": str(run.root), "documents": [str(EXCERPT_PDF)],
        "teacher": {"backend": "hf", "model": str(teacher), "max_new_tokens": 16},
        "student": {"model": str(student)},
        "judge": {"backend": "hf", "model": str(student)},
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_strategy": "steps",
                  "eval_steps": 2, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
                  "validation_split": 0.2, "learning_rate": 1e-3},
        "eval": {"metrics": METRICS, "tuned_models": ["adapter"], "max_new_tokens": 16, "n_resamples": 500,
                 "retrieval_conditions": CONDITIONS},
        "cost": {"price_per_cpu_hour": 0.5},
    }, sort_keys=False))
    # the teacher as a priced API: $30 / $60 per million tokens in / out
    teacher_prices = ["teacher.price_per_million_input_tokens=30", "teacher.price_per_million_output_tokens=60"]
    config = load_config(path, teacher_prices)
    _write_prep_outputs(config, run)
    manifest = Manifest(run)  # what `ragtune train` / `ragtune eval` record: the config, each stage's time and facts
    manifest.record_run(config.resolved(), {})
    with manifest.timed_stage("train") as facts:
        facts.update(sft.run(config, run))
    tokens = run.data_stats
    if not tokens.exists():  # the train stage's token statistics, computed by its own function
        write_json(tokens, describe_rows(config, run.train_jsonl))
    with manifest.timed_stage("eval") as facts:
        facts.update(evaluate.run(config, run, []))
    out = report.run([run.root])
    return {"config": config, "path": path, "run": run, "summary": json.loads(run.summary.read_text()), "out": out}


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("no chromium binary on PATH (scripts/setup_test_tools.sh installs Debian's `chromium` as root)")
    return binary


def _headless(binary: str, profile: Path) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
            "--virtual-time-budget=3000"]


# --- the grounding metric and gap closed on the run's score rows ---------------------------------


def test_grounding_rows_score_every_models_final_answer_against_its_contexts(reported: dict[str, Any]) -> None:
    run = reported["run"]
    retrieval = {r["question_id"]: r for r in read_jsonl(run.retrieval)}
    checked = 0
    for model in ("base", "adapter", "teacher"):
        for mode in ("rag", "closed_book"):
            scores = load_scores(run.scores(model, mode))
            for answer in read_jsonl(run.answers(model, mode)):
                row = scores[answer["question_id"]]["grounding"]
                # rag: the contexts the model was shown; closed_book: the ones retrieved for the question
                contexts = answer["contexts"] if mode == "rag" else retrieval[answer["question_id"]]["contexts"]
                if not (answer["answer"] or "").strip():
                    assert row["value"] is None and row["error"].startswith("empty answer")
                    continue
                assert row["error"] is None
                assert row["value"] == pytest.approx(grounding(final_answer(answer["answer"]), contexts))
                checked += 1
    assert checked >= 20
    teacher = reported["summary"]["results"]["rag"]["teacher"]
    assert teacher["grounding"]["n"] >= 5 and "rouge_score" not in teacher  # the teacher wrote the references


def test_gap_closed_is_computed_from_the_three_models_score_rows(reported: dict[str, Any]) -> None:
    run, summary = reported["run"], reported["summary"]
    for mode in ("rag", "closed_book"):
        tables = {m: load_scores(run.scores(m, mode)) for m in ("base", "adapter", "teacher")}
        common = [q for q in tables["base"] if all(tables[m].get(q, {}).get("grounding", {}).get("value") is not None
                                                    for m in tables)]
        base, tuned, teacher = (sum(tables[m][q]["grounding"]["value"] for q in common) / len(common)
                                for m in ("base", "adapter", "teacher"))
        entry = summary["comparisons"][mode]["adapter"]["grounding"]
        assert entry["gap_n"] == len(common) and entry["teacher"] == pytest.approx(teacher)
        expected = None if abs(teacher - base) < MIN_GAP else (tuned - base) / (teacher - base)
        assert entry["gap_closed"] == (None if expected is None else pytest.approx(expected))
        rouge = summary["comparisons"][mode]["adapter"]["rouge_score"]
        assert rouge["teacher"] is None and rouge["gap_closed"] is None and rouge["gap_n"] == 0
        assert "gap_closed" not in summary["comparisons"][mode]["teacher"]["grounding"]
    assert any("Gap closed" in note and "wrote the references" in note for note in summary["notes"])
    verdicts = report.verdict_rows(summary)
    grounding_row = next(r for r in verdicts if r[0] == "grounding (adapter, rag)")
    gap = summary["comparisons"]["rag"]["adapter"]["grounding"]["gap_closed"]
    assert grounding_row[5] == ("–" if gap is None else f"{gap:.0%}")
    assert report.verdict_table(summary).splitlines()[0].rstrip().endswith("gap closed")


# --- the report's sections ----------------------------------------------------------------------


def test_markdown_has_data_training_and_side_by_side_sections(reported: dict[str, Any]) -> None:
    md = reported["run"].report_md.read_text()
    stats = json.loads(reported["run"].stats.read_text())
    assert "### Data" in md and f"| training rows kept | {stats['rows']} |" in md
    assert "| question | near-duplicate | 3 |" in md and "| answer | ungrounded | 5 |" in md
    assert "| tokens per row, p95 |" in md and "rows over max_length" in md
    assert re.search(r"train loss: 4 points, steps 1–4", md) and re.search(r"eval loss: 2 points", md)
    table = md.split("### Answers side by side (rag)")[1].split("###")[0]
    assert "| question | base | adapter | teacher (reference) |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and "?" in line]) == report.SIDE_BY_SIDE


def test_missing_stage_files_are_named_not_fatal(reported: dict[str, Any], tmp_path: Path) -> None:
    run = RunDir(tmp_path / "bare")
    shutil.copytree(reported["run"].root, run.root)
    run.stats.unlink()
    shutil.rmtree(run.logs)
    report.run([run.root])
    for text in (run.report_md.read_text(), run.report_html.read_text()):
        assert "data/stats.json is missing (`ragtune prep` writes it)" in text
        assert "logs/data_stats.json is missing" in text and "logs/loss_curve.json is missing" in text
    assert "Answers side by side" in run.report_md.read_text()


def test_new_sections_render_in_headless_chromium(reported: dict[str, Any], tmp_path: Path) -> None:
    binary = _chromium()
    run = reported["run"]
    command = _headless(binary, tmp_path / "profile")
    dom = subprocess.run([*command, "--dump-dom", run.report_html.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    boxes = dict(re.findall(r'data-check="([a-z-]+)"[^>]*?data-box="(\d+x\d+)"', dom))
    for section in ("verdicts", "side-by-side", "data-counts", "data-rejected", "data-tokens", "loss-plot", "cost",
                    "cost-per-query", "break-even", "retrieval-condition-contexts", "retrieval-conditions"):
        width, height = map(int, boxes[section].split("x"))  # laid out by the browser with a real size
        assert width > 100 and height > 40, (section, boxes[section])
    side = dom.split('data-check="side-by-side"')[1].split("</table>")[0]
    assert len(re.findall(r"<tr data-question=", side)) == report.SIDE_BY_SIDE >= 5
    assert len(re.findall(r'data-model="(base|adapter|teacher)"', side)) == 3 * report.SIDE_BY_SIDE
    conditions = dom.split('data-check="retrieval-conditions"')[1].split("</table>")[0]
    judge_free = [m for m in METRICS if m != "non_llm_context_recall"]  # a retrieval metric: scored once, not per model
    assert len(re.findall(r"<tr><td>(retrieved|oracle|distractors_only|top_k=1)</td><td>adapter</td>", conditions)) \
        == 4 * len(judge_free)
    plot = dom.split('class="loss-curve"')[1].split("</svg>")[0]
    assert 'data-series="train loss"' in plot and 'data-series="eval loss"' in plot
    assert int(dom.split('data-rendered-shapes="')[1].split('"')[0]) == int(dom.split('data-svg-shapes="')[1].split('"')[0])
    png = tmp_path / "report.png"
    subprocess.run([*command, f"--screenshot={png}", "--window-size=1200,3000", run.report_html.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    colours = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20  # not a blank page


# --- cost and benefit ---------------------------------------------------------------------------


def test_cost_and_benefit_from_the_runs_own_files(reported: dict[str, Any]) -> None:
    """Every number traced to its file: prep's usage, the manifest's stage times and prices, eval's timings and the
    teacher's token counts; the break-even is where the student's fixed cost is paid back by its cheaper queries."""
    run, summary, cost = reported["run"], reported["summary"], reported["out"]["cost_benefit"]
    assert json.loads(run.manifest.read_text())["stages"]["report"]["cost_benefit"] == json.loads(json.dumps(cost))
    assert cost["prices"] == {"teacher_input_per_million": 30.0, "teacher_output_per_million": 60.0,
                              "gpu_hour": None, "cpu_hour": 0.5} and cost["missing"] == []

    kept = cost["teacher"]["answers_kept"]
    usage = [r["meta"]["usage"] for r in read_jsonl(run.train_jsonl)]
    assert (kept["calls"], kept["counted"]) == (12, "exact")
    assert kept["tokens_in"] == sum(u["prompt_tokens"] for u in usage) > 12 * 30
    assert kept["usd"] == pytest.approx((kept["tokens_in"] * 30 + kept["tokens_out"] * 60) / 1e6, abs=1e-4)
    rejected, questions = cost["teacher"]["answers_rejected"], cost["teacher"]["questions"]
    assert rejected["calls"] == 6 and rejected["counted"].startswith("estimated")
    assert rejected["tokens_in"] == round(6 * kept["tokens_in"] / 12)  # the kept rows' prompt per call
    assert questions["calls"] == len(FACTS) and questions["tokens_in"] > questions["tokens_out"] > 0
    total = cost["teacher"]["total"]
    assert total["tokens_in"] == kept["tokens_in"] + rejected["tokens_in"] + questions["tokens_in"]

    stages = json.loads(run.manifest.read_text())["stages"]
    train = cost["train"]
    assert (train["device"], train["priced_as"], train["seconds"]) == ("cpu", "CPU-hours", stages["train"]["seconds"])
    assert train["usd"] == pytest.approx(train["seconds"] / 3600 * 0.5, abs=1e-4)
    assert train["training_tokens"] == json.loads(run.data_stats.read_text())["training_tokens"] > 0
    assert cost["eval_seconds"] == stages["eval"]["seconds"]

    teacher_rows = read_jsonl(run.answers("teacher", "rag"))
    teacher = cost["per_query"]["teacher"]
    assert teacher["tokens_in"] == pytest.approx(sum(r["prompt_tokens"] for r in teacher_rows) / len(teacher_rows), abs=0.05)
    assert teacher["usd_per_1k"] == pytest.approx((teacher["tokens_in"] * 30 + teacher["tokens_out"] * 60) / 1000)
    measured = summary["timings"]["generation"]["adapter"]["rag"]
    student = cost["per_query"]["student"]
    assert student["model"] == "adapter" and student["seconds_per_query"] == pytest.approx(
        measured["seconds"] / measured["generated"], abs=1e-3)
    assert student["usd_per_1k"] == pytest.approx(measured["seconds"] / measured["generated"] * 1000 / 3600 * 0.5)

    even = cost["break_even"]
    saving = (teacher["usd_per_1k"] - student["usd_per_1k"]) / 1000
    assert saving > 0 and even["queries"] == math.ceil(even["fixed_usd"] / saving)
    assert even["fixed_usd"] == pytest.approx(total["usd"] + train["usd"])
    for row in even["table"]:
        assert (row["student_usd"] < row["teacher_usd"]) == (row["queries"] >= even["queries"])
    md = run.report_md.read_text()
    section = md.split("### Cost and benefit")[1].split("### Retrieval")[0]
    assert f"Break-even: after {even['queries']:,} queries" in section
    assert "| teacher: answers kept | 12 |" in section and "| tuned student | adapter |" in section
    assert "| queries | teacher API with RAG | tuned student (tuning + serving) | cheaper |" in section
    assert 'data-check="break-even"' in run.report_html.read_text()


def test_unpriced_costs_are_named_and_the_cli_prices_a_finished_run(reported: dict[str, Any], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from ragtune.app.cli import main

    run = RunDir(tmp_path / "unpriced")
    shutil.copytree(reported["run"].root, run.root)
    unpriced = {"teacher_input_per_million": None, "teacher_output_per_million": None, "gpu_hour": None, "cpu_hour": None}
    cost = report.run([run.root], prices=unpriced)["cost_benefit"]
    assert cost["teacher"]["total"]["usd"] is None and cost["break_even"]["table"] == []
    assert any("teacher.price_per_million_input_tokens" in m for m in cost["missing"])
    assert any("cost.price_per_cpu_hour is not set" in m for m in cost["missing"])
    section = run.report_md.read_text().split("### Cost and benefit")[1].split("### Retrieval")[0]
    assert "not priced" in section and "Break-even: not computed" in section
    assert cost["teacher"]["total"]["tokens_in"] == reported["out"]["cost_benefit"]["teacher"]["total"]["tokens_in"]

    priced = tmp_path / "priced.yaml"  # the run's own config plus prices: `ragtune report --config` uses these
    priced.write_text(yaml.safe_dump({**yaml.safe_load(reported["path"].read_text()),
                                      "teacher": {**yaml.safe_load(reported["path"].read_text())["teacher"],
                                                  "price_per_million_input_tokens": 30,
                                                  "price_per_million_output_tokens": 60}}))
    assert main(["report", str(run.root), "--config", str(priced)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"Break-even: after [\d,]+ queries the tuned student", printed)
    recorded = json.loads(run.manifest.read_text())["stages"]["report"]["cost_benefit"]
    assert recorded["prices"]["cpu_hour"] == 0.5 and recorded["break_even"]["queries"] is not None
