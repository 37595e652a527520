"""`ragtune run CONFIG --repeats N`: the same data trained and evaluated with N training seeds, one pooled verdict.

On a small student, a LoRA's random init and the data order can move the scores by as much as tuning does: a
'better' that one seed shows may be that seed's luck. The first run is the config's own (`output_dir`); the others
set SFTConfig's `seed` (`train.seed`) one higher each, in `output_dir/repeats/seed-<seed>/`, on the first run's prep
(shared through the stage cache, never redone), and with its base and teacher answers and scores (eval reuses
them: the same models, the same questions). `output_dir/repeats/` gets the report over all of them (the spread
of each delta: `ragtune report`'s) and the pooled verdicts (pooled.md, pooled.json: eval/summary.py's `pool_runs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragtune.app.config import RagtuneConfig
from ragtune.core.artifacts import write_json
from ragtune.app.pipeline import RunOptions, child_config, run_on_shared_prep, run_pipeline, share_eval_rows
from ragtune.core.render import md_table, text_table
from ragtune.core.run_dir import RunDir

REPEATS_DIR = "repeats"
POOLED_COLUMNS = ("mode", "model", "metric", "deltas per run", "mean ± std", "pooled delta (95% CI)", "runs better",
                  "pooled verdict")


def seeds(config: RagtuneConfig, repeats: int) -> list[int]:
    """The training seeds: the config's own (`train.seed`, else the top-level `seed`), then one higher each."""
    first = int((config.train.model_extra or {}).get("seed", config.seed))
    return [first + i for i in range(repeats)]


def run_repeats(config: RagtuneConfig, overrides: Sequence[str], repeats: int,
                options: RunOptions = RunOptions()) -> list[RunDir]:
    """Run the config, then each further seed on its prep; returns the run folders, the config's own first."""
    root = RunDir(config.output_dir)
    run_pipeline(config, options)
    runs = [root]
    for seed in seeds(config, repeats)[1:]:
        folder = root.root / REPEATS_DIR / f"seed-{seed}"
        child = child_config(config, overrides, folder, {"train.seed": seed},
                             comment=f"repeat of {config.config_path} with train.seed {seed} (ragtune run --repeats)")
        print(f"[ragtune] repeat train.seed={seed}: {folder}", flush=True)
        share_eval_rows(root, RunDir(child.output_dir), child.eval)
        run_on_shared_prep(child, root, options)
        runs.append(RunDir(child.output_dir))
    return runs


def pooled_report(runs: list[RunDir], out: Path) -> dict[str, Any]:
    """`ragtune report` over the runs (into `out`), plus pooled.json and pooled.md: the pooled verdicts."""
    from ragtune.eval.report import run as report
    from ragtune.eval.summary import pool_runs

    pooled = pool_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pooled.json", pooled)
    (out / "pooled.md").write_text(pooled_markdown(pooled), encoding="utf-8")
    written = report([run.root for run in runs], out)
    return {**written, "pooled": pooled, "pooled_md": str(out / "pooled.md"), "pooled_json": str(out / "pooled.json")}


def pooled_rows(pooled: dict[str, Any]) -> list[list[str]]:
    """One row per comparison vs the base, columns `POOLED_COLUMNS`."""
    rows = []
    for c in pooled["comparisons"]:
        s, p = c["spread"], c["pooled"]
        spread = f"{s['mean']:+.3f} ± {s['std']:.3f}" if s.get("std") is not None else "–"
        interval = f" [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if p["ci_low"] is not None else ""
        delta = "–" if p["delta"] is None else f"{p['delta']:+.3f}{interval} (n={p['n']})"
        deltas = ", ".join("–" if d is None else f"{d:+.3f}" for d in c["deltas"])
        rows.append([c["mode"], c["model"], c["metric"], deltas, spread, delta,
                     f"{c['verdicts'].count('better')}/{len(c['verdicts'])}", c["verdict"]])
    return rows


def pooled_markdown(pooled: dict[str, Any]) -> str:
    rows = pooled_rows(pooled)
    lines = ["# Pooled over seeds", "",
             f"{len(pooled['runs'])} runs on the same data, differing only in the training seed: "
             + ", ".join(f"`{r}`" for r in pooled["runs"]) + ".", "",
             f"Pooled: {pooled['method']}. A 'better' that one seed shows and the others do not is not a result: "
             "it is that seed's luck until the other seeds agree.", "",
             md_table(POOLED_COLUMNS, rows or [["–"] * len(POOLED_COLUMNS)]),
             "", "The runs one by one, and the spread of each delta: report.md / report.html in this folder.", ""]
    return "\n".join(lines)


def pooled_table(pooled: dict[str, Any]) -> str:
    """The pooled verdicts as aligned plain text (the terminal's view of pooled.md)."""
    rows = [[r[2] + f" ({r[1]}, {r[0]})", r[3], r[5], r[6], r[7]] for r in pooled_rows(pooled)]
    header = ["metric", "deltas per run", "pooled delta (95% CI)", "runs better", "pooled verdict"]
    return text_table(header, rows)
