"""`ragtune sweep`: the `sweep:` section's checks, then a real Optuna study of tiny trials on a real prep, resumed."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from ragtune.app.cli import main
from ragtune.app.config import ConfigError, load_config
from ragtune.core.run_dir import Manifest, RunDir
from ragtune.app.sweep import objective_value

SEARCH = {
    "train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "train.peft.r": {"type": "categorical", "choices": [4, 8]},
}


@pytest.mark.parametrize(("params", "extra", "message"), [
    ({"train.peft.rr": {"type": "categorical", "choices": [4]}}, {},
     "sweep.params.train.peft.rr: 4 fails the train checks: unknown key: not a ragtune train key nor a LoraConfig "
     "argument. Did you mean `r`?"),
    ({"data_prep.chunk_size": {"type": "int", "low": 128, "high": 512}}, {}, "a sweep searches `train.*` keys only"),
    ({"train.learning_rate": {"type": "float", "low": 0.0, "high": 1.0e-3, "log": True}}, {}, "`log: true` needs low > 0"),
    ({"train.learning_rate": {"type": "float", "low": -1.0, "high": 1.0e-3}}, {},
     "sweep.params.train.learning_rate: -1.0 fails the train checks: must be > 0"),
    ({"train.num_train_epochs": {"type": "int", "low": 1.5, "high": 3}}, {}, "`type: int` takes whole numbers"),
    (SEARCH, {"objective": "results.rag.adapter.rouge_score.mean"}, "set `direction: maximize` or `direction: minimize`"),
    (SEARCH, {"objective": "adapter.rouge_score"}, "use `eval_loss`, or a path in eval/summary.json"),
])
def test_sweep_section_errors_name_the_key(write_config, params, extra, message) -> None:
    path = write_config(sweep={"params": params, **extra})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_sweep_params_become_optuna_suggestions(write_config) -> None:
    config = load_config(write_config(sweep={"params": {
        **SEARCH, "train.num_train_epochs": {"type": "int", "low": 1, "high": 3}}, "n_trials": 4}))
    kwargs = {key: param.suggest_kwargs() for key, param in config.sweep.params.items()}
    assert kwargs == {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                      "train.peft.r": {"choices": [4, 8]},
                      "train.num_train_epochs": {"low": 1, "high": 3, "log": False}}
    assert isinstance(kwargs["train.num_train_epochs"]["low"], int)
    assert config.sweep.objective == "eval_loss" and config.sweep.study_direction() == "minimize"


def test_objective_reads_the_loss_curve_or_a_summary_path(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.logs.mkdir()
    run.loss_curve.write_text(json.dumps({"eval": [{"step": 2, "loss": 3.5}, {"step": 4, "loss": 3.25}]}))
    assert objective_value(run, "eval_loss") == 3.25
    run.eval.mkdir()
    run.summary.write_text(json.dumps({"comparisons": {"rag": {"adapter": {"rouge_score": {"delta": 0.125}}}}}))
    assert objective_value(run, "comparisons.rag.adapter.rouge_score.delta") == 0.125
    with pytest.raises(Exception, match=r"no `merged` at `comparisons.rag` \(there: adapter\)"):
        objective_value(run, "comparisons.rag.merged.rouge_score.delta")


def _study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{run / 'sweep.db'}")


@pytest.mark.slow
def test_a_study_of_two_trials_reuses_prep_and_a_rerun_continues_it(prepped_config, capsys) -> None:
    """Two real trials (LoRA, 2 steps each) on the copied prep; `--trials 3` later adds one, a killed trial is
    retried in its own folder, and the report names the best config, which loads."""
    path = prepped_config(sweep={"params": SEARCH})
    run = path.parent / "run"
    prep_before = Manifest(RunDir(run)).data["stages"]["prep"]

    assert main(["sweep", str(path), "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "prep: running" not in out and "nothing to do: `prep` is up to date" in out
    study = _study(run)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.trials:
        folder = RunDir(run / "sweep" / f"trial-{trial.number:03d}")
        assert folder.data.is_symlink() and folder.data.resolve() == (run / "data").resolve()
        stages = Manifest(folder).data["stages"]
        assert stages["prep"] == prep_before and stages["train"]["status"] == "done"
        assert "merge" not in stages  # eval_loss needs training only
        assert trial.value == pytest.approx(json.loads(folder.loss_curve.read_text())["eval"][-1]["loss"])
        trained = yaml.safe_load((folder.root / "config.yaml").read_text())["train"]
        assert trained["learning_rate"] == pytest.approx(trial.params["train.learning_rate"])
        assert trained["peft"]["r"] == trial.params["train.peft.r"]
        assert json.loads((folder.adapter / "adapter_config.json").read_text())["r"] == trial.params["train.peft.r"]
    assert len({t.params["train.learning_rate"] for t in study.trials}) == 2

    summary = json.loads((run / "sweep" / "summary.json").read_text())
    best = min(study.trials, key=lambda t: t.value)
    assert summary["best"]["number"] == best.number and summary["best"]["value"] == pytest.approx(best.value)
    md = (run / "sweep" / "report.md").read_text()
    assert f"best: trial {best.number}, eval_loss" in md and "| trial | state | eval_loss | train.learning_rate |" in md
    html = (run / "sweep" / "report.html").read_text()
    assert html.count("<circle") == 2 and "<polyline" in html and "best so far" in html
    best_config = load_config(run / "sweep" / "best.yaml")
    assert best_config.output_dir == (run / "sweep" / f"trial-{best.number:03d}").resolve()
    assert best_config.train.peft["r"] == best.params["train.peft.r"]

    # a sweep killed mid-trial leaves it RUNNING: the next one retries it, with its values, in its folder
    study.enqueue_trial({"train.learning_rate": 3e-3, "train.peft.r": 4})
    killed = study.ask()
    assert killed.number == 2
    for key, param in load_config(path).sweep.params.items():
        getattr(killed, f"suggest_{param.type}")(key, **param.suggest_kwargs())
    killed.set_user_attr("run_folder", "trial-002")

    assert main(["sweep", str(path), "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "retrying unfinished trial(s) 2 in their folders" in out
    study = _study(run)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    retry = study.trials[3]
    assert retry.params == {"train.learning_rate": 3e-3, "train.peft.r": 4}
    assert retry.user_attrs["run_folder"] == "trial-002" and not (run / "sweep" / "trial-003").exists()
    assert [l for l in out.splitlines() if "sweep trial" in l and "→" in l] == [
        l for l in out.splitlines() if "sweep trial 3:" in l and "→" in l]  # trials 0 and 1 were not run again

    assert main(["sweep", str(path), "--trials", "3"]) == 0
    assert "already holds 3 complete trials" in capsys.readouterr().out
    assert len(_study(run).trials) == 4
