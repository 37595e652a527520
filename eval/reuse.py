"""What a finished eval can lend another run of the same data and questions: the rows of the models that run does
not change. Repeats (other training seeds) and sweep trials copy these files into their empty eval/, and eval reuses
every row whose fingerprint still matches, so N runs answer and judge the base and the teacher once, not N times."""

from __future__ import annotations

from pathlib import Path

from ragtune.core.run_dir import RunDir
from ragtune.eval.answer import REFERENCE_MODEL, contexts_file
from ragtune.eval.conditions import condition_modes
from ragtune.eval.config import EvalConfig
from ragtune.eval.summary import BASELINE, RETRIEVER


def reusable_files(source: RunDir, ev: EvalConfig) -> list[Path]:
    """The base's and the teacher's answers and scores in `ev.modes`, the base's under each retrieval condition with
    its contexts, the retrieval and the judge sanity rows of `source` that exist (none before its eval has
    finished: a half-written summary is not lent)."""
    if not source.summary.exists():
        return []
    conditions = condition_modes(ev)
    files = [source.retrieval, source.judge_sanity, source.scores(RETRIEVER, "rag")]
    files += [path(model, mode) for model in (BASELINE, REFERENCE_MODEL) for mode in ev.modes
              for path in (source.answers, source.scores)]
    files += [path(BASELINE, mode) for mode in conditions for path in (source.answers, source.scores)]
    files += [contexts_file(source, mode) for mode in conditions]
    return [f for f in files if f.exists()]
