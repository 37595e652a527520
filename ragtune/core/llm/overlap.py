"""Batches of chat calls that overlap: the next batch's requests reach the server while the last ones of the batch
before are still generating.

A stage that sends a batch and waits for all of it leaves the engine a tail of a few long requests: vLLM batches
every running request into one forward, so during the tail it runs at a fraction of its throughput, and between
two batches it idles while the stage parses, gates and writes. In the demo's prep (2026-12-05, vLLM on a 2-core EPYC,
batches of 32) 58 of 158 ten-second log intervals ran fewer than 8 requests, at 54 tokens/s against 255 with 24-31
running. Results still come back, and are written, in batch order; the backend's own pool (`max_concurrency`) still
caps the requests in flight, so the server sees no more at once than before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

B = TypeVar("B")
R = TypeVar("R")

DEPTH = 2  # batches in flight: one finishing, the next starting; more only queues in the backend's pool


def depth_for(backend: Any) -> int:
    """DEPTH for an endpoint, whose server batches every request in flight (continuous batching); 1 for an in-process
    model (`hf`), which generates one batch at a time anyway: overlapping would only reorder its batches, and a
    killed run would lose two batches instead of one."""
    from ragtune.core.llm.hf import HFChatBackend

    return 1 if isinstance(backend, HFChatBackend) else DEPTH


def overlapped(batches: Iterable[B], work: Callable[[B], R], depth: int = DEPTH,
               ahead: Callable[[], bool] | None = None) -> Iterator[tuple[B, R]]:
    """`(batch, work(batch))` in order, up to `depth` batches in flight. `batches` is read one batch ahead of the
    results; `ahead()`, when given, is asked before each batch that would start beside one in flight, and False
    waits for that one's results first (a loop that stops on a count need not ask a batch it will not use). An
    error is raised at its batch's turn, after the batches before it were yielded; the batch still in flight is not
    waited for."""
    lanes = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="ragtune-batch")
    pending: deque[tuple[B, Future[R]]] = deque()
    source = iter(batches)
    finished = False
    try:
        while True:
            if pending and (len(pending) >= depth or (ahead is not None and not ahead())):
                done, future = pending.popleft()
                yield done, future.result()
                continue
            batch = next(source, _END)
            if batch is _END:
                break
            pending.append((batch, lanes.submit(work, batch)))
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
        finished = True
    finally:
        lanes.shutdown(wait=finished, cancel_futures=not finished)


_END: Any = object()
