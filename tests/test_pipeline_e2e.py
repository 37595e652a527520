"""`ragtune run` end to end on real components, then the caching contract of issue 6."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.core.run_dir import RunDir


def _ragtune(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ragtune.app.cli", *args], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    assert result.returncode == 0, f"ragtune {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _executed(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split()[1].rstrip(":") for line in result.stdout.splitlines()
            if line.startswith("[ragtune]") and ("running" in line or "resuming" in line)]


@pytest.fixture
def tiny_run(write_config, smollm2_dir, tiny_llama_dir) -> Path:
    return write_config(
        student={"model": str(tiny_llama_dir)},
        teacher={"backend": "hf", "model": str(smollm2_dir), "max_new_tokens": 48, "batch_size": 8},
        judge={"backend": "hf", "model": str(smollm2_dir), "max_new_tokens": 64},
        # this test is about the stages' orchestration: the answer gates (tests/test_gates.py, test_data_prep.py) are
        # off, so it does not depend on how many of a 135M teacher's six answers pass them
        data_prep={"chunk_size": 256, "chunk_overlap": 16, "num_train_questions": 6, "num_eval_questions": 3,
                   "answer_gates": {"enabled": False}},
        train={"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 2,
               "validation_split": 0.0},
        eval={"modes": ["rag", "closed_book"], "max_new_tokens": 16, "judge_sanity_pairs": 0,
              "metrics": ["semantic_similarity", "rouge_score", "non_llm_context_recall"]},
    )


@pytest.mark.slow
def test_run_every_stage_then_skip_then_rerun_only_downstream_of_a_change(tiny_run):
    first = _ragtune("run", str(tiny_run))
    assert _executed(first) == ["prep", "train", "merge", "eval", "report"]
    run_dir = RunDir(Path(json.loads(json.dumps(str(tiny_run.parent / "run")))))
    for artifact in (run_dir.chunks, run_dir.train_jsonl, run_dir.questions_eval, run_dir.stats,
                     run_dir.adapter / "adapter_config.json", run_dir.merged / "config.json",
                     run_dir.summary, run_dir.report_html, run_dir.manifest):
        assert artifact.exists(), artifact
    manifest = json.loads(run_dir.manifest.read_text())
    assert {name: stage["status"] for name, stage in manifest["stages"].items()} == dict.fromkeys(
        ["prep", "train", "merge", "eval", "report"], "done")
    # every stage is timed; the report (no model loaded) can round to 0.0 s
    assert all(manifest["stages"][name]["seconds"] > 0 for name in ("prep", "train", "merge", "eval"))
    assert manifest["stages"]["report"]["seconds"] >= 0
    assert manifest["inputs"] and manifest["versions"]["transformers"]
    assert "report:" in first.stdout and "metric" in first.stdout  # the verdict table
    # each stage's work against this machine's floor (ragtune.core.roofline): the teacher's and the embedding's in
    # prep, the student's training steps, the students' answers in eval; the report and --dry-run read it
    work = {name: {w["kind"]: w for w in manifest["stages"][name]["roofline"]["work"]} for name in ("prep", "train", "eval")}
    assert {"embed", "prefill", "decode"} <= set(work["prep"]) and {"prefill", "decode"} <= set(work["eval"])
    assert work["train"]["train"]["tokens"] > 0 and work["train"]["train"]["where"].startswith("cpu")
    for name in ("prep", "train", "eval"):
        roof = manifest["stages"][name]["roofline"]
        assert roof["floor_s"] > 0 and roof["x_floor"] >= 1 and roof["rss_peak_gb"] > 0.1, (name, roof)
    assert "Time against this machine" in run_dir.report_md.read_text()
    plan = _ragtune("run", str(tiny_run), "--dry-run", "--force").stdout
    assert re.search(r"train +run +~[0-9.]+ min \(its floor here", plan) and "min on this machine" in plan, plan

    second = _ragtune("run", str(tiny_run))
    assert _executed(second) == []

    third = _ragtune("run", str(tiny_run), "--set", "train.learning_rate=1e-3")
    assert _executed(third) == ["train", "merge", "eval", "report"]
    answers_base = run_dir.answers("base", "rag")
    assert answers_base.exists()


def test_dry_run_checks_without_running(write_config, tiny_llama_dir):
    config = write_config(student={"model": str(tiny_llama_dir)}, train={"method": "qlora"})
    result = _ragtune("run", str(config), "--dry-run")
    assert "[ok   ] config" in result.stdout
    assert "plan for" in result.stdout and "prep    run" in result.stdout
    # where each role runs, by the one device policy (this machine has no GPU)
    assert "[ok   ] device: teacher answers through in-process on the CPU" in result.stdout
    assert "device: merge on the CPU" in result.stdout
    assert not (config.parent / "run" / "data").exists()
