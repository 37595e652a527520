"""Shared fixtures: real tiny models built once per session, the sample 10-K excerpt, config files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ragtune's cache (the GGUF -> safetensors copy) per test session, shared with the CLI subprocesses it starts
os.environ["RAGTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ragtune-cache-")

TESTS = Path(__file__).parent
REPO = TESTS.parent
EXCERPT_PDF = TESTS / "data" / "uber_10k_excerpt.pdf"


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
