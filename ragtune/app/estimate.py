"""`--dry-run`'s minutes: each stage's recorded work (manifest.json's `roofline`, `ragtune.core.roofline`) at this
machine's GEMM rates now, times the gap to the floor the stage had when it ran. A stage that has not run in this
folder has no work on record, so no estimate: the first `ragtune run` records it."""

from __future__ import annotations

from typing import Any

from ragtune.core import roofline
from ragtune.core.run_dir import Manifest, RunDir


def rescaled_seconds(roof: dict[str, Any]) -> tuple[float, str]:
    """The recorded seconds, with the part spent on floor-bound work rescaled by this machine's rates now against
    the rates it ran at (the same machine: about the recorded seconds; a faster one: fewer)."""
    then = now = 0.0
    for item in roof.get("work") or []:
        if not item.get("gflops") or not item.get("shapes"):
            continue
        rate = roofline.cpu_rate(item["shapes"], item["mode"], item["backward"]) or item["gflops"]
        then += item["flops"] / (item["gflops"] * 1e9)
        now += item["flops"] / (rate * 1e9)
    if not then:
        return roof["seconds"], f"as recorded ({roof['seconds']:.0f} s)"
    gap = roof["seconds"] / then
    return gap * now, f"its floor here {now:.0f} s × {gap:.1f} (the gap it ran at)"


def stage_estimates(run_dir: RunDir, decisions: dict[str, str]) -> tuple[dict[str, str], float | None]:
    """Per stage a line for the plan, and the minutes of the stages that will run (None when one has no record)."""
    stages = Manifest(run_dir).data.get("stages", {}) if run_dir.manifest.exists() else {}
    lines, total, known = {}, 0.0, True
    for name, decision in decisions.items():
        if decision == "skip":
            lines[name] = ""
            continue
        roof = (stages.get(name) or {}).get("roofline")
        if not roof:
            lines[name] = "no recorded work here yet: no estimate"
            known = False
            continue
        seconds, how = rescaled_seconds(roof)
        total += seconds
        lines[name] = f"~{seconds / 60:.1f} min ({how})"
    return lines, total / 60 if known else None
