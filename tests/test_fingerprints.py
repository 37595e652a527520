"""Stage fingerprints follow what changes a stage's outputs: model ids, prompts, generation settings, documents
and chunking invalidate; timeouts, concurrency, batch sizes and device placement do not."""

from __future__ import annotations

import pytest

from ragtune.app.config import load_config
from ragtune.app.pipeline import fingerprints


@pytest.mark.parametrize("override", [
    "teacher.timeout=5", "teacher.max_concurrency=2", "teacher.max_retries=0", "teacher.batch_size=2",
    "teacher.device_map=cpu", "teacher.base_url=http://127.0.0.1:9/v1", "embedding.embed_batch_size=8",
    "judge.timeout=5", "eval.batch_size=2", "teacher.engine_args={max_num_seqs: 8}", "gpus.count=8",
])
def test_operational_settings_keep_every_fingerprint(write_config, override: str) -> None:
    path = write_config()
    assert fingerprints(load_config(path, [override])) == fingerprints(load_config(path))


@pytest.mark.parametrize(("override", "first_changed"), [
    ("teacher.model=other/teacher", "prep"), ("teacher.max_new_tokens=32", "prep"), ("teacher.temperature=0.5", "prep"),
    ("data_prep.chunk_size=300", "prep"), ("data_prep.system_prompt=Be brief.", "prep"),
    ("train.learning_rate=1e-5", "train"), ("student.model=other/student", "train"), ("eval.max_new_tokens=16", "eval"),
])
def test_output_settings_change_their_stage_and_everything_downstream(write_config, override: str,
                                                                       first_changed: str) -> None:
    path = write_config()
    before, after = fingerprints(load_config(path)), fingerprints(load_config(path, [override]))
    stages = list(before)
    changed = [s for s in stages if before[s]["fingerprint"] != after[s]["fingerprint"]]
    assert changed == stages[stages.index(first_changed):] or (first_changed == "eval" and changed == ["eval", "report"])
