"""Plumbing of prep's resumable steps: what each step consumed and finished, and a teacher built only when used."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ragtune.core.artifacts import write_json
from ragtune.core.run_dir import RunDir

if TYPE_CHECKING:
    from ragtune.core.llm import ChatBackend

log = logging.getLogger(__name__)

STEPS = ("chunks", "index", "questions", "answers")
T = TypeVar("T")


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


class LazyBackend:
    """Builds the teacher on first use, so a rerun with nothing left to generate never loads it."""

    def __init__(self, factory: Callable[[], "ChatBackend"]):
        self._factory = factory
        self._value: "ChatBackend | None" = None
        self._lock = threading.Lock()  # batches in flight together (`overlapped`) build it once

    def get(self) -> "ChatBackend":
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value

    def build_during(self, work: Callable[[], T], when: bool = True) -> T:
        """`work()`'s result, the backend being built meanwhile (`when`): `work` runs in another thread, the build
        in this one (where a managed vLLM server installs its signal handlers). Reading the demo's 307-page PDF
        keeps one core busy for 35 s and a vLLM start mostly one core for 27 s: side by side on 2 cores. If the
        build fails, `work` still finishes (what it made is kept) before the error is raised."""
        if not when:
            return work()
        done: dict[str, Any] = {}

        def run() -> None:
            try:
                done["value"] = work()
            except BaseException as err:  # raised again in this thread
                done["error"] = err

        worker = threading.Thread(target=run, name="prep", daemon=True)  # daemon: Ctrl-C does not wait for it
        worker.start()
        failure = None
        try:
            self.get()
        except Exception as err:
            failure = err
        worker.join()
        if "error" in done:
            raise done["error"]
        if failure is not None:
            raise failure
        return done["value"]
