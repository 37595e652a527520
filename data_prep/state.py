"""Plumbing of prep's resumable steps: what each step consumed and finished."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ragtune.core.artifacts import write_json
from ragtune.core.run_dir import RunDir

log = logging.getLogger(__name__)

STEPS = ("chunks", "index", "questions", "answers")


class StepState:
    """data/prep_state.json: per step, the fingerprint of its inputs, whether it finished, and its facts;
    `skipped` lists the steps this run found done."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.path = run_dir.prep_state
        self.steps: dict[str, dict[str, Any]] = json.loads(self.path.read_text("utf-8")) if self.path.exists() else {}
        self.skipped: list[str] = []

    def fingerprint(self, step: str) -> str | None:
        return self.steps.get(step, {}).get("fingerprint")

    def facts(self, step: str) -> dict[str, Any]:
        return self.steps.get(step, {}).get("facts", {})

    def is_done(self, step: str, fingerprint: str, output: Path) -> bool:
        entry = self.steps.get(step, {})
        done = entry.get("fingerprint") == fingerprint and entry.get("done", False) and output.exists()
        if done:
            self.skipped.append(step)
        return done

    def start(self, step: str, fingerprint: str, outputs: list[Path]) -> None:
        """Begin (or resume) a step; outputs made under other inputs are moved to stale/ first."""
        if self.fingerprint(step) != fingerprint:
            self.run_dir.retire(outputs)
            if step in self.steps:
                log.info("prep step %s: inputs changed, starting it over", step)
        self.steps[step] = {"fingerprint": fingerprint, "done": False}
        self._save()

    def finish(self, step: str, **facts: Any) -> None:
        self.steps[step].update(done=True, facts=facts)
        self._save()

    def all_done(self) -> bool:
        """Whether every step finished last time (then a rerun likely generates nothing: its inputs unchanged)."""
        return all(self.steps.get(step, {}).get("done") for step in STEPS)

    def _save(self) -> None:
        write_json(self.path, self.steps)
