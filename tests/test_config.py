"""Config validation: every bad input fails before any model loads, naming file, key/line and a fix."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragtune.app.config import ConfigError, load_config


def test_valid_config_resolves_documents_and_overrides(write_config, excerpt_pdf):
    path = write_config(train={"learning_rate": "2e-4", "num_train_epochs": 2})
    config = load_config(path, ["train.num_train_epochs=1", "data_prep.chunk_size=256"])
    assert config.document_paths == [excerpt_pdf.resolve()]
    assert config.train.sft_kwargs()["num_train_epochs"] == 1
    assert config.train.sft_kwargs()["learning_rate"] == pytest.approx(2e-4)  # YAML 1.1 string -> float
    assert config.data_prep.chunk_size == 256


def test_base_config_is_inherited_and_overridden(tmp_path, write_config):
    base = write_config("base.yaml", data_prep={"chunk_size": 300, "chunk_overlap": 20})
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base.name}\nname: child\ndata_prep:\n  chunk_size: 128\n")
    config = load_config(child)
    assert config.name == "child"
    assert config.data_prep.chunk_size == 128
    assert config.data_prep.chunk_overlap == 20


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace("name: test", "name: test\nteachr: {}"), ["teachr", "Did you mean `teacher`?", ":2:"]),
        (lambda t: t + "train:\n  num_train_epoch: 1\n", ["train.num_train_epoch", "Did you mean `num_train_epochs`?"]),
        (lambda t: t + "data_prep:\n  chunk_sise: 5\n", ["data_prep.chunk_sise", "Did you mean `chunk_size`?"]),
        (lambda t: t + "train:\n  learning_rate: fast\n", ["train.learning_rate", "expected float"]),
        (lambda t: t + "data_prep:\n  chunk_size: many\n", ["data_prep.chunk_size", "integer"]),
        (lambda t: t.replace("name: test", "name: test\n  broken: [1"), ["malformed YAML", ":2"]),
        (lambda t: t.replace("uber_10k_excerpt.pdf", "missing.pdf"), ["documents[0]", "no document found", "missing.pdf"]),
        (lambda t: t + "train:\n  peft:\n    lora_alfa: 8\n", ["train.peft.lora_alfa", "Did you mean `lora_alpha`?"]),
        # ranges and combinations: ragtune's minimum where TRL has none, TRL's own SFTConfig checks elsewhere
        (lambda t: t + "train:\n  learning_rate: -1.0\n", ["train.learning_rate", "must be > 0, got -1.0"]),
        (lambda t: t + "train:\n  warmup_steps: -5\n", ["train.warmup_steps", "SFTConfig rejects it",
                                                          "Expected value warmup_steps >= 0"]),
        (lambda t: t + "train:\n  eval_strategy: sometimes\n", ["train.eval_strategy", "not a valid IntervalStrategy"]),
        (lambda t: t.replace("backend: hf\n  model: smollm2-135m-instruct\n  max_new_tokens: 64",
                             "backend: openai\n  model: m\n  api_key: sk-abc"), ["teacher.api_key", "api_key_env"]),
    ],
)
def test_bad_config_names_file_key_and_fix(write_config, edit, expected):
    path = write_config()
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message
    assert "sk-abc" not in message  # secrets are never echoed


def test_cli_reports_config_error_before_loading_any_model(write_config):
    path = write_config()
    path.write_text(path.read_text() + "train:\n  lerning_rate: 0.1\n")
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "ragtune.app.cli", "train", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "train.lerning_rate" in result.stderr and "learning_rate" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - started < 120  # sanity bound only: no model was loaded


def test_set_override_needs_key_value(write_config):
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(write_config(), ["train.num_train_epochs"])


def test_shipped_configs_validate():
    configs = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ ships no YAML"
    for path in configs:
        load_config(path)


def test_building_sft_config_at_load_makes_no_folder_and_no_device_state(write_config, tmp_path):
    """The load-time SFTConfig must not create output_dir nor set up accelerate's process-wide state (the trainer
    of this process, and vLLM's fork, would inherit it)."""
    from accelerate.state import PartialState

    before = dict(PartialState._shared_state)
    config = load_config(write_config(train={"learning_rate": 1e-4, "bf16": True, "tf32": True}))
    assert config.train.sft_kwargs()["learning_rate"] == pytest.approx(1e-4)
    assert not (tmp_path / "run").exists()
    assert PartialState._shared_state == before


def test_negative_learning_rate_fails_dry_run_in_one_line(write_config):
    path = write_config(train={"learning_rate": -1.0})
    result = subprocess.run([sys.executable, "-m", "ragtune.app.cli", "run", str(path), "--dry-run"], capture_output=True,
                            text=True, timeout=300, check=False)
    line = path.read_text().splitlines().index("  learning_rate: -1.0") + 1
    assert result.returncode == 2
    expected = (f"config error: {path}:{line}: train.learning_rate: must be > 0, got -1.0. "
                "Fix the value, or remove the key to use the default.")
    assert result.stderr.strip().splitlines() == [expected]
