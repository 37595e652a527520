"""A golden eval set of the user's own (`eval.questions_file`, `ragtune eval --questions`): the hand-written Uber 2021
set checked against the filing's pages, bad rows named by line, and the CLI answering exactly those questions on
test_eval's tiny run (real tiny models, a real LlamaIndex index, real Ragas metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.app.cli import main
from ragtune.core.artifacts import read_jsonl
from ragtune.core.grounding import NUMBER, _digits, _figure_found, figures, normalize, support
from ragtune.eval.answer import EvalError
from ragtune.eval.golden import leaked_references, load_golden
from ragtune.eval.score import answer_jobs, reference_answers
from test_eval import make_run, models, prepared_data  # noqa: F401  (the tiny run's fixtures)

GOLDEN = Path(__file__).parent / "data" / "golden_uber_2021.jsonl"
UBER_PDF = Path(__file__).parents[1] / "data" / "uber_2021.pdf"
FAST_METRICS = ["rouge_score", "chrf_score", "grounding", "non_llm_context_recall"]


def test_the_uber_golden_set_loads_and_its_references_are_on_its_pages() -> None:
    """Every figure of every reference is on the filing pages its row cites (`pages`, 1-based, an extra key eval
    ignores), and most of its words too: the references are the 10-K's facts, not recollections."""
    from pypdf import PdfReader

    questions = load_golden(GOLDEN)
    rows = read_jsonl(GOLDEN)
    assert len(questions) == len(rows) >= 20
    assert len({q["id"] for q in questions}) == len(questions)
    assert all(q["reference"] and q["source_chunk_id"] is None for q in questions)
    assert sum(1 for q in questions if q["reference_contexts"]) >= 5
    pdf = PdfReader(UBER_PDF)
    for row in rows:
        text = " ".join(pdf.pages[page - 1].extract_text() for page in row["pages"])
        known = frozenset(_digits(n) for n in NUMBER.findall(normalize(text)))
        assert [d for d in figures(row["reference"]) if not _figure_found(d, known)] == [], row["id"]
        assert support(row["reference"], [text]) >= 0.7, row["id"]


@pytest.mark.parametrize("lines, line, says", [
    (['{"question": "What was revenue?"}', '{"question": "What was revenue?", "reference": 17455}'], 2,
     "`reference` is a int"),
    (['{"question": "What was revenue?"}', "", '{"reference": "17.5 billion"}'], 3, "`question` is missing"),
    (['{"question": "Q?", "contexts": "one passage"}'], 1, "`contexts` is not a list of strings"),
    (['{"question": "Q?", "id": "a"}', '{"question": "R?", "id": "a"}'], 2, "id 'a' is already used on line 1"),
    (['{"question": "Q?"', ], 1, "not valid JSON"),
    (['["Q?"]'], 1, "expected a JSON object"),
])
def test_a_bad_row_is_named_by_its_line(tmp_path: Path, lines: list[str], line: int, says: str) -> None:
    path = tmp_path / "golden.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(EvalError) as err:
        load_golden(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and says in str(err.value)


def test_reference_is_golden_where_given_and_the_teachers_elsewhere(tmp_path: Path) -> None:
    """The teacher is scored on reference metrics only against golden references, never against its own answers."""
    from ragtune.core.artifacts import JsonlAppender

    questions = [{"id": "g1", "question": "Q1?", "reference": "Gold one."}, {"id": "g2", "question": "Q2?", "reference": None}]
    teacher = [{"question_id": "g1", "answer": "Teacher one.", "error": None},
               {"question_id": "g2", "answer": "Teacher two.", "error": None}]
    references = reference_answers(questions, teacher)
    assert references["g1"]["answer"] == "Gold one." and references["g1"]["source"] == "golden"
    assert references["g2"]["answer"] == "Teacher two." and references["g2"]["source"] == "teacher"
    answers = [{"question_id": q, "question": "?", "answer": "An answer.", "contexts": ["c"]} for q in ("g1", "g2")]
    with JsonlAppender(tmp_path / "scores.teacher.rag.jsonl", key="key") as rows:
        jobs = answer_jobs(rows, answers, ["rouge_score", "grounding"], is_reference_model=True, references=references,
                           retrieval={}, fingerprint="f")
    assert sorted(j.key for j in jobs) == ["g1|grounding", "g1|rouge_score", "g2|grounding"]
    assert next(j for j in jobs if j.key == "g1|rouge_score").sample.reference == "Gold one."


def test_eval_questions_answers_exactly_the_golden_set(prepared_data: Path, models: dict[str, Path],  # noqa: F811
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ragtune eval CONFIG --questions FILE` on the tiny run: every model answers exactly the golden questions in
    both modes, the golden references are the answer metrics' references, a reference found in a training row is
    warned about, and the verdict table and the report say whose questions they are. The first 8 questions of the
    Uber set (3 with contexts) keep it fast: a rag answer of the tiny models took 0.7-1 s on the loaded 2-core box."""
    config, run = make_run(tmp_path, prepared_data, models, metrics=FAST_METRICS, tuned_models=["adapter"],
                           judge_sanity_pairs=0, n_resamples=200)
    path = tmp_path / "golden.jsonl"
    path.write_text("".join(GOLDEN.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    golden = load_golden(path)
    leaked = golden[3]  # its reference, verbatim in a training answer: the tuned model may have learned it
    run.train_jsonl.write_text(json.dumps({"id": "row-7", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "Context: ...\nQuery: Freight?"},
        {"role": "assistant", "content": f"Sure. {leaked['reference'].upper()}"}]}) + "\n", encoding="utf-8")

    assert main(["eval", str(config.config_path), "--questions", str(path)]) == 0
    out = capsys.readouterr().out
    assert "delta (95% CI)" in out and "rouge_score (adapter, rag)" in out and "chrf_score (adapter, closed_book)" in out

    ids = [q["id"] for q in golden]
    for model in ("base", "adapter", "teacher"):
        for mode in ("rag", "closed_book"):
            assert [r["question_id"] for r in read_jsonl(run.answers(model, mode))] == ids
    assert [r["question_id"] for r in read_jsonl(run.retrieval)] == ids  # retrieved from the run's own index
    assert all(r["oracle_in_context"] is None for r in read_jsonl(run.retrieval))

    summary = json.loads(run.summary.read_text())
    source = summary["questions"]["source"]
    assert source["kind"] == "golden" and source["file"] == str(path.resolve())
    assert source["references"] == {"golden": len(golden), "teacher": 0}
    assert source["leaked"] == [{"question_id": leaked["id"], "train_rows": ["row-7"]}]
    assert any(f"1 of {len(golden)} golden references are in training rows" in w and leaked["id"] in w
               for w in summary["warnings"])
    assert summary["retrieval"]["oracle_hit_rate"] is None
    # the teacher did not write the references, so it is scored on them too, and gap closed is measured against it
    assert summary["results"]["rag"]["teacher"]["rouge_score"]["n"] == len(golden)
    assert "rouge_score" in summary["comparisons"]["rag"]["teacher"]
    # recall of the golden rows' passages among the retrieved chunks: scored where a row gives `contexts`
    retriever = summary["retrieval"]["non_llm_context_recall"]
    assert retriever["n"] == sum(1 for q in golden if q["reference_contexts"])

    manifest = json.loads(run.manifest.read_text())
    assert manifest["config"]["eval"]["questions_file"] == str(path.resolve())
    report_md = run.report_md.read_text()
    assert f"{len(golden)} golden questions ({path.resolve()})" in report_md
    assert "golden reference" in report_md and golden[0]["reference"] in report_md
    csv_text = (run.eval / "per_question.csv").read_text()
    assert "reference_source" in csv_text and golden[1]["reference"] in csv_text


def test_a_bad_golden_file_stops_the_cli_with_its_line(prepared_data: Path, models: dict[str, Path],  # noqa: F811
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, run = make_run(tmp_path, prepared_data, models, adapter=False, metrics=FAST_METRICS)
    bad = tmp_path / "golden.jsonl"
    bad.write_text('{"question": "What was revenue?"}\n{"question": ""}\n', encoding="utf-8")
    assert main(["eval", str(config.config_path), "--questions", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: `question` is missing") and len(err.strip().splitlines()) == 1
    assert not run.answers("base", "rag").exists()  # stopped before any model answered


def test_leak_check_matches_verbatim_or_every_claim_not_a_few_words(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    rows = [("a", "Revenue was $17,455 million in 2021, up 57% from $11,139 million.", "Revenue grew."),
            ("b", "We have three segments: Mobility, Delivery, and Freight.", "Mobility.")]
    train.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": c},
                                                               {"role": "assistant", "content": a}]}) + "\n"
                             for i, c, a in rows), encoding="utf-8")
    questions = [{"id": "rev", "question": "Revenue?", "reference": "Revenue was $17.5 billion in 2021, up 57% from 2020."},
                 {"id": "seg", "question": "Segments?", "reference": "Mobility, Delivery and Freight."},
                 {"id": "emp", "question": "Employees?", "reference": "About 29,300 employees."}]
    assert leaked_references(questions, train) == [{"question_id": "rev", "train_rows": ["a"]}]
    assert leaked_references(questions, tmp_path / "missing.jsonl") == []


def test_an_edited_golden_file_changes_evals_fingerprint_only(write_config, tmp_path: Path) -> None:
    """`ragtune run` reruns eval (not prep or train) when the golden set's content changes under the same name."""
    from ragtune.app.config import load_config
    from ragtune.app.pipeline import fingerprints

    golden = tmp_path / "golden.jsonl"
    golden.write_text('{"question": "How many countries?", "reference": "Over 70."}\n', encoding="utf-8")
    config = write_config(eval={"questions_file": str(golden)})
    before = fingerprints(load_config(config))
    golden.write_text('{"question": "How many cities?", "reference": "Over 10,000."}\n', encoding="utf-8")
    after = fingerprints(load_config(config))
    assert before["eval"]["fingerprint"] != after["eval"]["fingerprint"]
    assert all(before[s]["fingerprint"] == after[s]["fingerprint"] for s in ("prep", "train", "merge"))
