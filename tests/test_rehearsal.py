"""The GPU-box workflow rehearsed on this CPU, with the real pieces: a managed vLLM server as teacher, `ragtune prep`,
`accelerate launch -m ragtune.train` on two CPU processes (gloo), then `ragtune run`, which finds prep and train up
to date and goes on with merge → eval → report, the students answering through vLLM (the base, and the adapter as a
LoRA module of the same server) and the judge scoring through vLLM's structured output. Only the device differs from the README's "On a GPU box" commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from ragtune.core import engine
from ragtune.core.artifacts import read_jsonl
from ragtune.core.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent


def _engine_missing() -> bool:
    try:
        engine.find_engine_python()
    except engine.EngineError:
        return True
    return False


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_engine_missing(), reason="no vLLM (bash scripts/setup.sh installs .venv-vllm)")]


def _run(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(list(command), cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{' '.join(command[:4])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _vllm_processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vllm.entrypoints.openai.api_server" in text and str(os.getpid()) not in text.split():
            found.append(text)
    return found


def test_prep_on_vllm_then_two_process_training_then_run_finishes_on_vllm(write_config, smollm2_dir, tmp_path):
    model = str(smollm2_dir)
    config = write_config(
        teacher={"backend": "vllm", "model": model, "max_new_tokens": 48},
        student={"model": model},
        judge={"backend": "vllm", "model": model},
        # the workflow is under test here; the gates are tested on real teacher output in test_gates/test_data_prep
        data_prep={"chunk_size": 256, "chunk_overlap": 16, "num_train_questions": 8, "num_eval_questions": 3,
                   "teacher_max_sentences": 2, "answer_gates": {"enabled": False}},
        train={"max_steps": 2, "per_device_train_batch_size": 2, "validation_split": 0.0, "save_strategy": "no"},
        eval={"backend": "vllm", "modes": ["rag"], "max_new_tokens": 24, "tuned_models": ["adapter"],
              "metrics": ["grounding", "rouge_score", "answer_relevancy"], "strictness": 1, "judge_sanity_pairs": 0},
    )
    run_dir = RunDir(tmp_path / "run")
    before = set(_vllm_processes())

    _run(sys.executable, "-m", "ragtune.app.cli", "prep", str(config))
    rows = read_jsonl(run_dir.train_jsonl)
    assert rows and all(r["meta"]["usage"]["prompt_tokens"] > 0 for r in rows)  # vLLM's usage, per row
    [log] = run_dir.logs.glob("vllm-*.log")  # one server for teacher and judge: the same model
    assert "Application startup complete" in log.read_text()

    port = str(free_port())
    _run(str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", port, "-m", "ragtune.train", str(config))
    train = json.loads(run_dir.manifest.read_text())["stages"]["train"]
    assert train["status"] == "done" and train["world_size"] == 2

    finished = _run(sys.executable, "-m", "ragtune.app.cli", "run", str(config))
    executed = [line.split()[1].rstrip(":") for line in finished.stdout.splitlines()
                if line.startswith("[ragtune]") and ("running" in line or "resuming" in line)]
    assert executed == ["merge", "eval", "report"]  # prep and train were up to date
    base, tuned = read_jsonl(run_dir.answers("base", "rag")), read_jsonl(run_dir.answers("adapter", "rag"))
    assert len(base) == len(tuned) == len(read_jsonl(run_dir.questions_eval))
    assert all(r["error"] is None and r["answer"] for r in base + tuned)
    assert log.read_text().count("Application startup complete") == 2  # prep's server, then eval's with the LoRA
    assert "enable_lora" in log.read_text().split("ragtune starts vLLM")[-1]
    assert run_dir.report_html.exists() and "grounding" in run_dir.summary.read_text()
    # the judge (the same vLLM server) answered Ragas through response_format json_schema
    judged = [r for r in read_jsonl(run_dir.scores("adapter", "rag")) if r["metric"] == "answer_relevancy"]
    assert judged and any(r["value"] is not None for r in judged), judged[:2]
    assert set(_vllm_processes()) <= before, "a vLLM server outlived ragtune"
