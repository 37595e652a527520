"""`ragtune sweep CONFIG --trials N`: Optuna searches the config's `sweep.params` (keys under `train:`) for the best
`sweep.objective`; every trial is a run folder on the run's prep.

The study is Optuna's SQLite storage in `output_dir/sweep.db` (`load_if_exists`), so a rerun continues it: it adds
trials until the study holds N complete ones, and retries a trial that a killed or interrupted sweep left unfinished
in that trial's own folder, where the stage cache resumes its training from its checkpoints. Trial k is
`output_dir/sweep/trial-<k>/` with the config.yaml that reproduces it; `output_dir/sweep/` gets the report (the
trials table and the optimization history: report.md, report.html, summary.json) and the best trial as best.yaml.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from ragtune.app.config import ConfigError, RagtuneConfig, SweepConfig
from ragtune.core.artifacts import write_json
from ragtune.core.errors import UserFacingError
from ragtune.core.render import CSS, PALETTE, html_table, md_table, scale, text_table
from ragtune.core.render import escape as _e
from ragtune.core.run_dir import RunDir
from ragtune.app.pipeline import RunOptions, child_config, run_on_shared_prep, run_pipeline, share_eval_rows

SWEEP_DIR = "sweep"
STORAGE_NAME = "sweep.db"


class SweepError(UserFacingError):
    """A trial finished without the number the sweep optimizes."""


def run_sweep(
    config: RagtuneConfig,
    overrides: Sequence[str],
    n_trials: int | None = None,
    options: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """Prep once, then trials until the study holds `n_trials` (default `sweep.n_trials`) complete ones; returns the
    sweep's summary (also sweep/summary.json)."""
    sweep = check_sweep(config)
    root = RunDir(config.output_dir)
    n_trials = n_trials or sweep.n_trials

    ################
    # Prep, shared by every trial
    ################
    run_pipeline(config, replace(options, only="prep"))

    ################
    # The study: resumed, unfinished trials retried first
    ################
    study = load_study(config, sweep)
    retry_interrupted(study)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if remaining > 0:
        objective = trial_objective(config, overrides, root, sweep, options)
        study.optimize(objective, n_trials=remaining)
    else:
        print(f"[ragtune] sweep: the study already holds {n_trials} complete trials (--trials raises it)", flush=True)

    ################
    # Report and the best config
    ################
    return write_report(study, config, sweep, root.root / SWEEP_DIR)


def check_sweep(config: RagtuneConfig) -> SweepConfig:
    """The sweep section, and what its objective needs from the rest of the config, checked before any work."""
    where = config.config_path or "config"
    sweep = config.sweep
    if sweep is None:
        raise ConfigError(f"{where}: no `sweep:` section. Add one with the keys to search (see configs/gpu-qlora.yaml).")
    if sweep.objective == "eval_loss":
        train = config.train
        if not train.validation_split and not train.validation_file:
            raise ConfigError(f"{where}: sweep.objective: eval_loss needs held-out rows; set train.validation_split > 0 "
                              "or train.validation_file.")
        if train.sft_kwargs().get("eval_strategy") == "no":
            raise ConfigError(f"{where}: sweep.objective: eval_loss needs an evaluation; train.eval_strategy is `no`.")
        return sweep
    parts = sweep.objective.split(".")
    metrics = set(config.eval.metrics) | {"ragas_score"}
    if len(parts) != 5 or parts[1] not in config.eval.modes or parts[3] not in metrics:
        raise ConfigError(f"{where}: sweep.objective: `{sweep.objective}` is not `results|comparisons.<mode>.<model>."
                          f"<metric>.<field>` with a mode of eval.modes ({', '.join(config.eval.modes)}) and a metric "
                          f"of eval.metrics, e.g. comparisons.{config.eval.modes[0]}.adapter.{config.eval.metrics[0]}.delta")
    return sweep


def load_study(config: RagtuneConfig, sweep: SweepConfig) -> optuna.Study:
    """The study `config.name` in output_dir/sweep.db, created or loaded; TPE seeded from `seed` and the trials so
    far, so a resumed study does not draw its first trials' values again."""
    path = Path(config.output_dir) / STORAGE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{path.resolve()}", study_name=config.name,
                                direction=sweep.study_direction(), load_if_exists=True)
    stored = study.direction.name.lower()
    if stored != sweep.study_direction():
        raise ConfigError(f"{path}: study `{config.name}` was made to {stored} its objective, the config now says "
                          f"sweep.direction: {sweep.study_direction()}. Move {path.name} aside to start a new study.")
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials))
    return study


def retry_interrupted(study: optuna.Study) -> list[int]:
    """A trial left RUNNING was killed (this sweep holds the run folder's lock: nothing else runs it), one marked
    `interrupted` was stopped by Ctrl-C. Each is enqueued again with its values and folder, once; returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    retried = []
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")):
            continue
        folder = trial.user_attrs.get("run_folder")
        if folder and not any(t.number > trial.number and t.user_attrs.get("run_folder") == folder for t in trials):
            study.enqueue_trial(trial.params, user_attrs={"run_folder": folder})
            retried.append(trial.number)
    if retried:
        print(f"[ragtune] sweep: retrying unfinished trial(s) {', '.join(map(str, retried))} in their folders", flush=True)
    return retried


def trial_objective(config: RagtuneConfig, overrides: Sequence[str], root: RunDir, sweep: SweepConfig,
                    options: RunOptions) -> Callable[[optuna.Trial], float]:
    """Optuna's objective: draw the trial's values, run its folder on the shared prep, read the objective there."""

    def objective(trial: optuna.Trial) -> float:
        settings = {key: getattr(trial, f"suggest_{param.type}")(key, **param.suggest_kwargs())
                    for key, param in sweep.params.items()}
        folder_name = trial.user_attrs.get("run_folder") or f"trial-{trial.number:03d}"
        trial.set_user_attr("run_folder", folder_name)
        folder = root.root / SWEEP_DIR / folder_name
        print(f"[ragtune] sweep trial {trial.number}: " + ", ".join(f"{k}={_show(v)}" for k, v in settings.items())
              + f" → {folder}", flush=True)
        child = child_config(config, overrides, folder, settings,
                             comment=f"trial {trial.number} of sweep `{config.name}` ({config.config_path})")
        evaluated = sorted((root.root / SWEEP_DIR).glob("trial-*/eval/summary.json"))
        if sweep.objective != "eval_loss" and evaluated:  # the base's and teacher's rows of an earlier trial
            share_eval_rows(RunDir(evaluated[-1].parent.parent), RunDir(folder), child.eval)
        try:
            run_on_shared_prep(child, root, replace(options, only="train" if sweep.objective == "eval_loss" else None))
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # the next `ragtune sweep` retries it in this folder
            raise
        value = objective_value(RunDir(folder), sweep.objective)
        print(f"[ragtune] sweep trial {trial.number}: {sweep.objective} = {value:.5g}", flush=True)
        return value

    return objective


def objective_value(run_dir: RunDir, objective: str) -> float:
    """`eval_loss`: the last eval loss in logs/loss_curve.json; otherwise the number at that path of eval/summary.json."""
    if objective == "eval_loss":
        curve = json.loads(run_dir.loss_curve.read_text(encoding="utf-8")) if run_dir.loss_curve.exists() else {}
        points = [p["loss"] for p in curve.get("eval", []) if isinstance(p.get("loss"), (int, float))]
        if not points:
            raise SweepError(f"{run_dir.loss_curve}: no eval loss was logged (check train.eval_strategy and "
                             "train.validation_split), so this trial has no objective.")
        return float(points[-1])
    node: Any = json.loads(run_dir.summary.read_text(encoding="utf-8"))
    for depth, part in enumerate(objective.split(".")):
        if not isinstance(node, dict) or part not in node:
            found = ", ".join(sorted(node)) if isinstance(node, dict) else type(node).__name__
            raise SweepError(f"{run_dir.summary}: sweep.objective `{objective}` has no `{part}` at "
                             f"`{'.'.join(objective.split('.')[:depth]) or '(top)'}` (there: {found}).")
        node = node[part]
    if not isinstance(node, (int, float)) or not math.isfinite(node):
        raise SweepError(f"{run_dir.summary}: sweep.objective `{objective}` is {node!r}, not a number (a metric whose "
                         "every sample failed, or too few questions for an interval).")
    return float(node)


# --- the sweep's report --------------------------------------------------------------------------------------------


def trial_rows(study: optuna.Study, keys: list[str]) -> list[list[str]]:
    """(trial, state, objective, each searched key, seconds, folder) for every trial, in order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append([str(t.number), t.state.name.lower(), "–" if t.value is None else f"{t.value:.5g}",
                     *[_show(t.params[k]) if k in t.params else "–" for k in keys],
                     "–" if seconds is None else f"{seconds:.0f}", f"{SWEEP_DIR}/{t.user_attrs.get('run_folder', '–')}"])
    return rows


def write_report(study: optuna.Study, config: RagtuneConfig, sweep: SweepConfig, out: Path) -> dict[str, Any]:
    """sweep/summary.json, report.md, report.html and best.yaml (the best trial's config.yaml, with a header)."""
    keys = list(sweep.params)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "study": study.study_name, "storage": str(Path(config.output_dir) / STORAGE_NAME),
        "objective": sweep.objective, "direction": sweep.study_direction(), "params": keys,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                    "run_folder": t.user_attrs.get("run_folder")} for t in study.get_trials(deepcopy=False)],
        "best": None,
    }
    if best is not None:
        folder = out / best.user_attrs["run_folder"]
        best_yaml = out / "best.yaml"
        header = (f"# The best of {len(complete)} complete trials of sweep `{study.study_name}`: trial {best.number}, "
                  f"{sweep.objective} {best.value:.5g} ({sweep.study_direction()}d).\n"
                  f"# `ragtune run {best_yaml}` completes that trial's run (merge, eval, report) in {folder}.\n")
        raw = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        raw["base"] = os.path.relpath((folder / raw["base"]).resolve(), out)  # relative to best.yaml, not the trial
        best_yaml.write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run_folder": str(folder), "config": str(best_yaml)}
    header = ["trial", "state", sweep.objective, *keys, "seconds", "folder"]
    rows = trial_rows(study, keys)
    write_json(out / "summary.json", summary, default=str)
    (out / "report.md").write_text(render_markdown(summary, header, rows), encoding="utf-8")
    (out / "report.html").write_text(render_html(summary, header, rows, complete), encoding="utf-8")
    summary.update(report_md=str(out / "report.md"), report_html=str(out / "report.html"), table=text_table(header, rows))
    return summary


def best_line(summary: dict[str, Any]) -> str:
    best = summary["best"]
    if best is None:
        return "no complete trial yet"
    values = ", ".join(f"{k}={_show(v)}" for k, v in best["params"].items())
    return (f"best: trial {best['number']}, {summary['objective']} {best['value']:.5g} ({values}); "
            f"config: {best['config']}")


def render_markdown(summary: dict[str, Any], header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([
        f"# ragtune sweep `{summary['study']}`", "",
        f"Objective: `{summary['objective']}` ({summary['direction']}d) · study: `{summary['storage']}` · "
        f"{len(rows)} trials", "", f"**{best_line(summary)}**", "",
        md_table(header, rows), "",
        "The optimization history (each trial's objective and the best so far) is in report.html.", ""])


def render_html(summary: dict[str, Any], header: list[str], rows: list[list[str]], complete: list[FrozenTrial]) -> str:
    table = html_table(header, rows, check="trials")
    points = [(t.number, t.value) for t in complete if t.value is not None and math.isfinite(t.value)]
    body = (f"<h1>ragtune sweep {_e(summary['study'])}</h1><p class=muted>objective <code>{_e(summary['objective'])}"
            f"</code> ({_e(summary['direction'])}d) · study {_e(summary['storage'])}</p>"
            f"<p><strong>{_e(best_line(summary))}</strong></p><h2>Trials</h2>{table}<h2>Optimization history</h2>"
            + svg_history(points, summary["objective"], summary["direction"] == "maximize"))
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>ragtune sweep</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def svg_history(points: list[tuple[int, float]], label: str, maximize: bool) -> str:
    """Each complete trial's objective (dots) and the best so far (a step line), against the trial number."""
    width, height, left, right, top, bottom = 560, 250, 62, 20, 24, 36
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60"><text x="10" y="30">no complete trial</text></svg>'
    numbers, values = [n for n, _ in points], [v for _, v in points]
    pad = (max(values) - min(values)) * 0.08 or abs(values[0]) * 0.05 or 0.05
    lo_x, hi_x, lo_y, hi_y = min(numbers), max(numbers), min(values) - pad, max(values) + pad
    x, y = scale(lo_x, hi_x, left, width - right), scale(lo_y, hi_y, height - bottom, top)
    best, steps = None, []
    for n, v in points:
        if best is not None and (v > best if maximize else v < best):
            steps.append((n, best))  # a step, not a slope: the best changes at the trial that beat it
        best = v if best is None or (v > best if maximize else v < best) else best
        steps.append((n, best))
    line = " ".join(f"{x(n):.1f},{y(b):.1f}" for n, b in steps)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
             f'<polyline points="{line}" fill="none" stroke="{PALETTE[1]}" stroke-width="2"/>']
    for tick in (lo_y + pad, (lo_y + hi_y) / 2, hi_y - pad):
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 3:.1f}" text-anchor="end" font-size="9">{tick:.4g}</text>')
    for n, v in points:
        parts.append(f'<circle cx="{x(n):.1f}" cy="{y(v):.1f}" r="4" fill="{PALETTE[0]}"><title>trial {n}: {v:.5g}</title></circle>')
        parts.append(f'<text x="{x(n):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="9">{n}</text>')
    parts += [f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" font-size="10">trial</text>',
              f'<text x="{left}" y="14" font-size="10">{_e(label)} · <tspan fill="{PALETTE[0]}">● trial</tspan> '
              f'<tspan fill="{PALETTE[1]}">— best so far</tspan></text>', "</svg>"]
    return "".join(parts)


def _show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
