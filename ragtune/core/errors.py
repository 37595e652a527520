"""The one exception type the CLI prints as a plain message (no traceback): bad input, named and explained."""

from __future__ import annotations

from collections.abc import Iterable


class UserFacingError(RuntimeError):
    """Raise (or subclass) for problems the user fixes: say what was wrong, where, and what to do."""


class TooManyFailures(UserFacingError):
    """More of a stage's rows failed than `max_failure_fraction` allows: the stage stops non-zero instead of
    "completing" with every answer an error (a CUDA OOM or a dead server fails every row alike)."""


def check_failures(what: str, failed: int, total: int, errors: Iterable[str | None], max_fraction: float,
                   where: object) -> None:
    """Raise `TooManyFailures` when more than `max_fraction` of `total` rows failed, naming the first distinct
    errors and the file that keeps the rows (saved rows stay; a rerun retries only the failed ones)."""
    if not total or failed / total <= max_fraction:
        return
    distinct = list(dict.fromkeys(e.splitlines()[0][:160] for e in errors if e))[:3]
    raise TooManyFailures(
        f"{what}: {failed} of {total} failed (more than max_failure_fraction {max_fraction}); first errors: "
        f"{'; '.join(distinct) or 'none recorded'}. The rows are in {where}; fix the cause and run again: "
        "saved rows are kept and only the failed ones are retried.")
