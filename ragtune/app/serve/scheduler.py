"""The one thread that runs the model: rounds of `step_tokens` over a FIFO of live requests, each row stoppable
after every token (cancellation, streaming) and constrained by its own xgrammar matcher (JSON across rounds)."""

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragtune.core.llm import HFChatBackend

log = logging.getLogger(__name__)

# Re-reading the rows is the price of rounds. SmolLM2-135M fp32, batch 8, 300-token rows, on the shared 2-core
# box: generate() of 1 token took 43 s, of 32 tokens 173 s (a loaded machine: the ratio, not the seconds,
# carries over), so at 32 the re-read is about a quarter of a round. Larger steps waste less, smaller ones
# answer a short request sooner.
STEP_TOKENS = 32
# Eight full batches of 8: ragtune's own openai backend (max_concurrency 8 by default) never meets a 503; a
# crowd of other clients is told to retry instead of waiting behind eight rounds of answers.
MAX_QUEUE = 64


class ServerBusy(Exception):
    """The queue is full or the server is shutting down: answered 503."""


@dataclass(eq=False)
class Job:
    """One request from admission to answer: its prompt, the tokens generated so far, and the future its handler
    waits on."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    grammar: Any = None  # an xgrammar GrammarMatcher when the request asked for JSON
    top_p: float | None = None  # None: the model's generation_config decides, as without the field
    generated: list[int] = field(default_factory=list)
    accepted: int = 0  # tokens of `generated` (and of the running round) the grammar has consumed
    finish_reason: str | None = None
    cancelled: bool = False
    future: Future = field(default_factory=Future)
    notify: Callable[[], None] | None = None  # streaming: wakes the handler when tokens arrive or the job ends
    so_far: list[int] = field(default_factory=list)  # streaming: the tokens so far, replaced whole (read by the handler)

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    def feed_grammar(self, round_tokens: list[int]) -> None:
        """Advance the matcher over this round's tokens it has not seen yet."""
        if self.grammar is None:
            return
        for token in round_tokens[max(0, self.accepted - len(self.generated)):]:
            if self.grammar.is_terminated() or not self.grammar.accept_token(token):
                break
            self.accepted += 1

    def publish(self, tokens: list[int]) -> None:
        """Streaming: the tokens generated so far, for the handler to decode and send."""
        self.so_far = tokens
        if self.notify is not None:
            self.notify()

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        except InvalidStateError:  # already answered (cancelled by shutdown while its round ran)
            pass
        if self.notify is not None:
            self.notify()


class _RowStop:
    """StoppingCriteria: a row stops as soon as its request is cancelled (checked after every token); a streaming
    row's tokens so far are published at the same moment, so its text goes out token by token."""

    def __init__(self, jobs: list[Job], start: int, eos_ids: list[int]):
        self.jobs, self.start, self.eos_ids = jobs, start, eos_ids

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        for i, job in enumerate(self.jobs):
            if job.notify is not None and not job.cancelled:
                job.publish(job.generated + _until_eos(input_ids[i, self.start :].tolist(), self.eos_ids))
        return torch.tensor([job.cancelled for job in self.jobs], dtype=torch.bool, device=input_ids.device)


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """The tokens before the first EOS (a finished row goes on with padding until its batch ends)."""
    stop_at = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
    return tokens if stop_at is None else tokens[:stop_at]


class _RowGrammar:
    """LogitsProcessor: xgrammar's token mask for the rows whose job holds a matcher."""

    def __init__(self, jobs: list[Job], start: int, vocab_size: int):
        import xgrammar as xgr

        self.jobs, self.start = jobs, start
        self.bitmask = xgr.allocate_token_bitmask(len(jobs), vocab_size)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import xgrammar as xgr

        rows = []
        for i, job in enumerate(self.jobs):
            if job.grammar is None:
                continue
            job.feed_grammar(input_ids[i, self.start :].tolist())
            if not job.grammar.is_terminated():
                job.grammar.fill_next_token_bitmask(self.bitmask, i)
                rows.append(i)
        if rows:
            masked = scores.to("cpu") if scores.device.type != "cuda" else scores
            xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device), indices=rows)
            scores = masked.to(scores.device)
        return scores


class Scheduler:
    """The one thread that runs the model: rounds of `step_tokens` over a FIFO of live requests."""

    def __init__(self, backend: "HFChatBackend", *, batch_size: int, step_tokens: int, max_queue: int):
        self.model, self.tokenizer = backend.model, backend.tokenizer
        self.device = backend.device
        self.batch_size, self.step_tokens, self.max_queue = batch_size, step_tokens, max_queue
        self.tokenizer_lock = threading.Lock()  # the request handlers encode while this thread decodes
        self.eos_ids = list(backend.eos_token_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._fifo: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.rounds = 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="ragtune-scheduler")
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise ServerBusy("the server is shutting down")
            live = sum(not j.cancelled for j in [*self._fifo, *self._running])
            if live >= self.max_queue:
                raise ServerBusy(f"the server is busy: {live} requests queued or running (--max-queue "
                                 f"{self.max_queue}); retry later")
            self._fifo.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Cancel everything: waiting handlers get 503, the running round stops at its next token."""
        with self._cond:
            self._closed = True
            for job in [*self._fifo, *self._running]:
                job.cancelled = True
                job.resolve(error=ServerBusy("the server is shutting down"))
            self._fifo.clear()
            self._cond.notify()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._round(batch)
            except Exception as err:  # a failed round answers its requests with the error, the server goes on
                log.warning("generation failed for %d requests: %s", len(batch), err)
                for job in batch:
                    job.resolve(error=RuntimeError(f"{type(err).__name__}: {err}"))
            with self._cond:
                self._running = []
                self._fifo.extend(j for j in batch if not j.cancelled and not j.future.done())

    def _next_batch(self) -> list[Job] | None:
        """The head of the FIFO and the requests behind it that sample the same way, up to batch_size."""
        with self._cond:
            was_idle = False
            while not self._closed and not any(not j.cancelled for j in self._fifo):
                self._fifo.clear()
                self._cond.wait()
                was_idle = True
            if was_idle and len(self._fifo) < self.batch_size:
                self._cond.wait(0.02)  # requests sent together arrive a few ms apart: batch them
            if self._closed:
                return None
            live = [j for j in self._fifo if not j.cancelled]
            batch = [j for j in live if (j.temperature, j.top_p) == (live[0].temperature, live[0].top_p)]
            batch = batch[: self.batch_size]
            self._fifo = deque(j for j in live if j not in batch)
            self._running = batch
            return batch

    def _round(self, batch: list[Job]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        rows = [job.prompt_ids + job.generated for job in batch]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        # The round ends when its shortest request is due: that answer goes out now, not after the longest row.
        budget = min(self.step_tokens, *(job.remaining for job in batch))
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": self.pad_id,
                                  "stopping_criteria": StoppingCriteriaList([_RowStop(batch, width, self.eos_ids)])}
        if batch[0].temperature > 0:
            kwargs.update(do_sample=True, temperature=batch[0].temperature)
            if batch[0].top_p is not None:
                kwargs["top_p"] = batch[0].top_p
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if any(job.grammar is not None for job in batch):
            kwargs["logits_processor"] = LogitsProcessorList(
                [_RowGrammar(batch, width, self.model.config.vocab_size)])
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.rounds += 1
        for job, row in zip(batch, output[:, width:].tolist()):
            if not job.cancelled:
                self._settle(job, row)

    def _settle(self, job: Job, new_tokens: list[int]) -> None:
        """Add a round's tokens to the job; answer it when it met EOS or its max_tokens."""
        job.feed_grammar(new_tokens)
        kept = _until_eos(new_tokens, self.eos_ids)
        job.generated.extend(kept)
        if len(kept) < len(new_tokens):
            job.finish_reason = "stop"
        elif job.remaining <= 0:
            job.finish_reason = "length"
        else:
            return
        job.resolve(self.text(job.generated))

    def text(self, tokens: list[int]) -> str:
        """The answer's text (the request handlers decode streamed tokens with the same call)."""
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
