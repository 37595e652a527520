"""The precision probe measures alone in its process (`ragtune.core.precision.busy`): prep reads and embeds the
documents in one thread while the teacher's server starts, and probes, in another."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from ragtune.core import precision

SHAPES = [(64, 64)]  # a fast probe: the gate, not the rates, is under test here


def _probe_into(results: list[dict[str, Any]]) -> None:
    results.append(precision.run_probe(SHAPES, (precision.FP32,), backward=False))


def test_a_probe_waits_for_the_step_under_way_and_a_new_step_waits_for_the_probe():
    default = sys.getswitchinterval()
    inside, release, late_started = threading.Event(), threading.Event(), threading.Event()

    def step() -> None:
        with precision.busy():
            inside.set()
            release.wait(60)

    def late_step() -> None:
        with precision.busy():
            late_started.set()

    worker = threading.Thread(target=step)
    worker.start()
    assert inside.wait(60)
    results: list[dict[str, Any]] = []
    prober = threading.Thread(target=_probe_into, args=(results,))
    prober.start()
    prober.join(0.5)  # unguarded, this probe takes well under 0.5 s
    assert prober.is_alive() and not results
    assert sys.getswitchinterval() == default  # not measuring yet
    late = threading.Thread(target=late_step)
    late.start()
    late.join(0.3)
    assert not late_started.is_set()  # the probe is waiting to measure: a new step waits behind it

    release.set()
    for thread in (worker, prober, late):
        thread.join(60)
    assert results and results[0]["gflops"]["fp32"] > 0 and late_started.is_set()
    assert sys.getswitchinterval() == default  # put back after measuring


def test_a_step_that_probes_and_a_probe_beside_it_both_finish():
    """A thread inside its own step may probe (a model loaded lazily in a batch): its step is set aside while it
    measures, so neither it nor another thread's probe waits for the other forever."""
    results: list[dict[str, Any]] = []

    def step_that_probes() -> None:
        with precision.busy():
            _probe_into(results)

    threads = [threading.Thread(target=step_that_probes), threading.Thread(target=_probe_into, args=(results,)),
               threading.Thread(target=step_that_probes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads) and len(results) == 3

    with precision.busy():  # and the gate is open again afterwards
        _probe_into(results)
    assert len(results) == 4


def test_a_probe_whose_passes_never_agree_decides_this_run_but_is_not_cached(tmp_path, monkeypatch):
    """Cores busy throughout the probe (another job): its best rates choose for this run, and the next run measures
    again instead of keeping that choice for every later run on the machine."""
    monkeypatch.setenv("RAGTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "AGREE", 0.0)  # two passes must time exactly alike: they never do
    unsettled = precision.probe(SHAPES, (precision.FP32,), backward=False)
    assert unsettled["settled"] is False and unsettled["passes"] == precision.MAX_ROUNDS
    assert unsettled["gflops"]["fp32"] > 0 and not Path(unsettled["cache_file"]).exists()

    monkeypatch.setattr(precision, "AGREE", 1.0)  # any two passes agree
    settled = precision.probe(SHAPES, (precision.FP32,), backward=False)
    assert settled["settled"] is True and settled["cached"] is False and Path(settled["cache_file"]).exists()
    assert precision.probe(SHAPES, (precision.FP32,), backward=False)["cached"] is True
