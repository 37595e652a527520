"""`ragtune run --repeats N`: seeds on one prep, then the pooled report; the pooled verdict's rules on their own."""

from __future__ import annotations

import json

import pytest
import yaml

from ragtune.app.cli import main
from ragtune.core.run_dir import Manifest, RunDir
from ragtune.eval.summary import pooled_verdict

CI_EXCLUDES_0 = "better"
NO_DIFFERENCE = "no difference (CI includes 0)"


@pytest.mark.parametrize(("pooled", "deltas", "verdicts", "expected"), [
    (CI_EXCLUDES_0, [0.04, 0.02, 0.03], ["better", NO_DIFFERENCE, "better"], "better (every run)"),
    ("worse", [-0.04, -0.01, -0.03], ["worse", NO_DIFFERENCE, NO_DIFFERENCE], "worse (every run)"),
    # one seed's large gain carries the pooled mean: the others went the other way
    (CI_EXCLUDES_0, [0.12, -0.01, -0.02], ["better", NO_DIFFERENCE, NO_DIFFERENCE],
     "not a result: pooled better, but the runs' deltas disagree in sign"),
    (NO_DIFFERENCE, [0.05, 0.0, -0.01], ["better", NO_DIFFERENCE, NO_DIFFERENCE],
     f"{NO_DIFFERENCE}; 'better' in 1 of 3 runs only: not a result"),
    (NO_DIFFERENCE, [0.01, 0.0, -0.01], [NO_DIFFERENCE] * 3, NO_DIFFERENCE),
])
def test_pooled_verdict_needs_every_seed(pooled, deltas, verdicts, expected) -> None:
    assert pooled_verdict(pooled, deltas, verdicts) == expected


@pytest.mark.slow
def test_repeats_train_each_seed_on_one_prep_and_pool_the_report(prepped_config, capsys) -> None:
    """`--repeats 2` on a copied real prep: the config's own run, then seed 43 in repeats/seed-43/ (prep linked, not
    redone); pooled.json/md and the across-runs report; `--repeats 3` later trains only seed 44."""
    path = prepped_config()
    root = RunDir(path.parent / "run")
    prep_before = Manifest(root).data["stages"]["prep"]

    assert main(["run", str(path), "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "prep: running" not in out and out.count("train: running") == 2 and out.count("eval: running") == 2
    seed43 = RunDir(root.root / "repeats" / "seed-43")
    assert seed43.data.is_symlink() and seed43.data.resolve() == root.data.resolve()
    assert Manifest(seed43).data["stages"]["prep"] == prep_before
    assert yaml.safe_load((seed43.root / "config.yaml").read_text())["train"]["seed"] == 43
    assert Manifest(seed43).data["config"]["train"]["seed"] == 43
    assert "seed" not in Manifest(root).data["config"]["train"]  # the config's own run: SFTConfig's seed = `seed`
    # the base and the teacher are the same models on the same questions: their rows are reused, not redone
    for model in ("base", "teacher"):
        assert seed43.answers(model, "rag").read_text() == root.answers(model, "rag").read_text()
    # different seeds, different LoRA init: the adapters differ
    assert (root.adapter / "adapter_model.safetensors").read_bytes() != (seed43.adapter / "adapter_model.safetensors").read_bytes()

    pooled = json.loads((root.root / "repeats" / "pooled.json").read_text())
    assert pooled["runs"] == [str(root.root), str(seed43.root)]
    summaries = [json.loads(r.summary.read_text()) for r in (root, seed43)]
    rows = {(c["mode"], c["model"], c["metric"]): c for c in pooled["comparisons"]}
    assert {key[1] for key in rows} == {"adapter"}  # the teacher is the same in every run: not pooled
    for (mode, model, metric), row in rows.items():
        deltas = [s["comparisons"][mode][model][metric]["delta"] for s in summaries]
        assert row["deltas"] == deltas
        if None not in deltas:
            assert row["spread"]["mean"] == pytest.approx(sum(deltas) / 2)
            # the same questions, the same base answers: the pooled delta is the mean of the runs' deltas
            if row["pooled"]["excluded"] == 0 and all(s["comparisons"][mode][model][metric]["excluded"] == 0 for s in summaries):
                assert row["pooled"]["delta"] == pytest.approx(sum(deltas) / 2)
        assert row["verdict"] == pooled_verdict(row["pooled"]["verdict"], deltas, row["verdicts"])
    md = (root.root / "repeats" / "pooled.md").read_text()
    assert "# Pooled over seeds" in md and "is not a result" in md and "| rag | adapter | rouge_score |" in md
    report = (root.root / "repeats" / "report.md").read_text()
    assert "## Across runs (seeds / configs)" in report and "runs 'better'" in report
    assert "pooled verdict" in out and "pooled:" in out

    assert main(["run", str(path), "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("train: running") == 1 and "repeat train.seed=44" in out
    assert "nothing to do: every stage is up to date" in out
    assert len(json.loads((root.root / "repeats" / "pooled.json").read_text())["runs"]) == 3
