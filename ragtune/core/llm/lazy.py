"""A backend built on first use, and built while other work runs: a rerun with nothing left to generate never loads
it, and a stage that must read or retrieve first starts its model server meanwhile."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from ragtune.core.llm.types import ChatBackend

T = TypeVar("T")


class LazyBackend:
    """Builds the backend on first use, so a rerun with nothing left to generate never loads it."""

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

        worker = threading.Thread(target=run, name="build-during", daemon=True)  # daemon: Ctrl-C does not wait for it
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
