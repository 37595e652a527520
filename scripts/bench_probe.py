"""The precision probe's choice beside another thread of its process: does it still pick what it picks alone?

`ragtune.core.precision` times fp32 and bf16 GEMMs at a model's layer shapes and serves or trains in the faster
format, cached per machine. Prep starts the teacher's server (and so probes) while another thread reads the
documents; on 2026-12-06 that probe chose fp32 for the demo's teacher (bf16 88.7 vs fp32 105 GFLOP/s, against 335 vs
149 alone), and prep and eval ran 1.5x slower. A Python thread holds the GIL for the interpreter's switch interval
(5 ms by default) before a waiting thread gets it back, and every op of the probe waits for it.

One run, alternating arms so both see the same machine:
- `quiet`: the probe alone (the reference choice);
- `busy, before`: beside a thread reading the PDF (pypdf, pure Python), both as they were until 2026-12-06: the
  probe at Python's 5 ms switch interval, 3 passes per format, the pages read regardless;
- `busy, ragtune`: beside the same thread, both as prep runs them now: each page read in `precision.busy()` (the
  probe waits for the page under way, the next page for the probe), the probe at `PROBE_SWITCH_INTERVAL`, passing
  until each format's two best passes agree (`MIN_ROUNDS`-`MAX_ROUNDS`).

JSON: per arm, each probe's GFLOP/s, passes and seconds, the choice, and `agree`: the share of probes whose choice is
the quiet arm's (target 1.0 for ragtune's arm).

    python scripts/bench_probe.py                 # SmolLM2-135M's shapes, inference probe, 20 probes per arm
    python scripts/bench_probe.py --backward --probes 20 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PDF = REPO / "data" / "uber_2021.pdf"
PYTHON_DEFAULT_INTERVAL = 0.005


class Reader:
    """A thread reading the PDF page by page until stopped, as prep reads documents beside the teacher's start: each
    page through prep's own `_extract_page` (which waits for a probe, `precision.busy`) or, `gated` off, as before."""

    def __init__(self, pdf: Path) -> None:
        self.pdf, self.running, self.gated, self.pages = pdf, False, True, 0
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        from pypdf import PdfReader

        from ragtune.data_prep.documents import _extract_page

        while self.running:
            for page in PdfReader(self.pdf).pages:
                if not self.running:
                    return
                _extract_page(page) if self.gated else page.extract_text(extraction_mode="layout")
                self.pages += 1

    def __enter__(self) -> "Reader":
        self.running = True
        self.thread.start()
        time.sleep(1.0)  # past pypdf's import and the file's first parse
        return self

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()


def one_probe(shapes: list[tuple[int, int]], backward: bool, before: bool = False) -> dict[str, Any]:
    """One inference (or training) probe of fp32 against bf16 weights, as ragtune runs it or as it ran `before`."""
    from ragtune.core import precision

    modes = (precision.FP32, precision.BF16_WEIGHTS)
    if before:  # the measuring loop alone: no gate, Python's switch interval, 3 passes
        assert sys.getswitchinterval() == PYTHON_DEFAULT_INTERVAL
        result = precision._run_probe(shapes, list(modes), backward, rounds=(3, 3))
    else:
        result = precision.run_probe(shapes, modes, backward)
    return {"gflops": result["gflops"], "passes": result["passes"], "seconds": result["seconds"],
            "choice": precision.pick(result["gflops"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=20, help="probes per arm")
    parser.add_argument("--backward", action="store_true", help="the training probe (forward + input gradient)")
    parser.add_argument("--pdf", type=Path, default=PDF, help="the document the busy thread reads")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    from ragtune.core import precision

    shapes = list(precision.DEFAULT_SHAPES)
    load_before = os.getloadavg()
    arms: dict[str, list[dict[str, Any]]] = {"quiet": [], "busy, before": [], "busy, ragtune": []}
    for _ in range(args.probes):
        arms["quiet"].append(one_probe(shapes, args.backward))
    with Reader(args.pdf) as reader:
        for _ in range(args.probes):
            reader.gated = False
            arms["busy, before"].append(one_probe(shapes, args.backward, before=True))
            reader.gated = True
            arms["busy, ragtune"].append(one_probe(shapes, args.backward))
        pages = reader.pages
    quiet = statistics.mode(p["choice"] for p in arms["quiet"])
    report = {
        "machine": precision.machine() | {"flags": None}, "shapes": shapes, "backward": args.backward,
        "probe_switch_interval": precision.PROBE_SWITCH_INTERVAL, "pages_read_beside": pages,
        "quiet_choice": quiet,
        "agree": {name: sum(p["choice"] == quiet for p in probes) / len(probes) for name, probes in arms.items()},
        "median_seconds": {name: statistics.median(p["seconds"] for p in probes) for name, probes in arms.items()},
        "arms": arms, "load_before": load_before, "load_after": os.getloadavg(),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
