"""Shared fixtures: real tiny models built once per session, the sample 10-K excerpt, config files."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ragtune's cache (the GGUF -> safetensors copy) per test session, shared with the CLI subprocesses it starts, and
# removed when the session ends (517 MB each: 179 sessions' copies had filled this machine's disk)
os.environ["RAGTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ragtune-cache-")
atexit.register(shutil.rmtree, os.environ["RAGTUNE_CACHE_DIR"], ignore_errors=True)

TESTS = Path(__file__).parent
REPO = TESTS.parent
EXCERPT_PDF = TESTS / "data" / "uber_10k_excerpt.pdf"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test's server or a launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def excerpt_pdf() -> Path:
    """Pages 5-12 of Uber's 2021 10-K (the business overview): real filing text with its extraction noise."""
    return EXCERPT_PDF


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct from the embedded GGUF, as the plain safetensors folder ragtune converts it to."""
    from ragtune.core.models import SMOLLM2_ALIAS, dense_copy, resolve_model

    return Path(dense_copy(resolve_model(SMOLLM2_ALIAS)).name_or_path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template: real architecture, trains in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ragtune.core.models import SMOLLM2_ALIAS, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def untied_tiny_model(tiny_llama_dir: Path, out: Path, seed: int) -> Path:
    """The tiny Llama with untied output embeddings: a tied random model only echoes its last prompt token
    (newlines), which would make every answer empty."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture
def write_config(tmp_path: Path, excerpt_pdf: Path) -> Callable[..., Path]:
    """Write a valid config to tmp_path; keyword arguments override top-level keys (deep-merged)."""

    def _write(name: str = "config.yaml", **overrides: Any) -> Path:
        config: dict[str, Any] = {
            "name": "test",
            "output_dir": str(tmp_path / "run"),
            "documents": [str(excerpt_pdf)],
            "teacher": {"backend": "hf", "model": "smollm2-135m-instruct", "max_new_tokens": 64},
            "student": {"model": "smollm2-135m-instruct"},
            "judge": {"backend": "hf", "model": "smollm2-135m-instruct"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    return _write


def _tiny_run_config(output_dir: Path, student: Path, smollm2_dir: Path, excerpt_pdf: Path) -> dict[str, Any]:
    """A whole pipeline in seconds per stage: SmolLM2 teaches and judges, a 2-layer Llama learns (2 steps)."""
    return {
        "name": "tiny", "output_dir": str(output_dir), "documents": [str(excerpt_pdf)],
        "teacher": {"backend": "hf", "model": str(smollm2_dir), "max_new_tokens": 48, "batch_size": 8},
        "student": {"model": str(student)},
        "judge": {"backend": "hf", "model": str(smollm2_dir), "max_new_tokens": 64},
        # the answer gates are off: the run must not depend on how many of a 135M teacher's answers pass them
        "data_prep": {"chunk_size": 256, "chunk_overlap": 16, "num_train_questions": 6, "num_eval_questions": 3,
                      "answer_gates": {"enabled": False}},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_strategy": "no",
                  "report_to": "none", "disable_tqdm": True, "validation_split": 0.34, "eval_strategy": "steps",
                  "eval_steps": 2},
        "eval": {"modes": ["rag"], "tuned_models": ["adapter"], "max_new_tokens": 16, "judge_sanity_pairs": 0,
                 "n_resamples": 200, "metrics": ["semantic_similarity", "rouge_score", "grounding"]},
    }


@pytest.fixture(scope="session")
def prepped_run(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, tiny_llama_dir: Path,
                excerpt_pdf: Path) -> Path:
    """A run folder whose prep stage ran for real (SmolLM2 the teacher; 6 training, 3 held-out questions), made once
    per session: `prepped_config` gives each test a copy, so runs that share prep (repeats, sweeps) start from it."""
    from ragtune.app.config import load_config
    from ragtune.app.pipeline import RunOptions, run_pipeline

    root = tmp_path_factory.mktemp("prepped")
    student = untied_tiny_model(tiny_llama_dir, root / "student", seed=0)  # untied: its answers are not all empty
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(_tiny_run_config(root / "run", student, smollm2_dir, excerpt_pdf), sort_keys=False))
    config = load_config(path)
    run_pipeline(config, RunOptions(only="prep"))
    return root / "run"


@pytest.fixture
def prepped_config(prepped_run: Path, tmp_path: Path, smollm2_dir: Path, excerpt_pdf: Path) -> Callable[..., Path]:
    """Write the tiny run's config over a copy of `prepped_run` in tmp_path/run; keyword arguments override
    top-level keys (a section's keys are merged into it)."""
    import shutil

    def _write(name: str = "config.yaml", **overrides: Any) -> Path:
        if not (tmp_path / "run").exists():
            shutil.copytree(prepped_run, tmp_path / "run", symlinks=True)
        config = _tiny_run_config(tmp_path / "run", prepped_run.parent / "student", smollm2_dir, excerpt_pdf)
        for key, value in overrides.items():
            config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    return _write
