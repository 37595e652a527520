"""`ragtune serve`: an OpenAI-compatible `/v1/chat/completions` server over a base model or base+adapter.

Deploys a tuned student behind the API every RAG stack already speaks, and gives the `openai` backend
a real local endpoint to test against.

How one request cannot stall the others:

- **Rounds.** One scheduler thread owns the model. Each round it takes up to `batch_size` live requests from
  the head of a FIFO, left-pads `prompt + tokens generated so far` and calls `generate` for `step_tokens` new
  tokens, fewer when a request in the batch is due sooner (its answer goes out at once). A request that is not
  finished goes to the back of the FIFO, behind anything that arrived meanwhile, so a new short request waits
  at most one round, whatever `max_tokens` others asked for. Each round re-reads the whole rows (no KV cache
  is kept between rounds): simple, at the measured cost below (STEP_TOKENS).
- **Cancellation.** A transformers `StoppingCriteria` checks each row's cancel flag after every token, so a
  client that disconnects, a request past `request_timeout` and SIGTERM stop that row's generation within one
  token. A cancelled request is dropped from the FIFO.
- **Admission.** At most `max_queue` requests are queued or running; one more is answered 503 at once.
  `max_tokens` is checked before queueing: ≥ 1 and, with the prompt, within the model's context (400
  otherwise; when absent it is the server default, cut to what the context leaves).
- **Size.** A body over `max_request_bytes` is answered 413 before it is parsed (from Content-Length, or as soon
  as a chunked body passes the limit), and a prompt whose length in characters cannot fit the context is answered
  400 before it is tokenized: a 10 MB body used to be tokenized first, 10 s with the event loop blocked. The exact
  token count runs in a worker thread, so /health and other requests never wait on it.
- **Key (`api_key`).** Every `/v1/*` request needs `Authorization: Bearer KEY` (401 otherwise, as OpenAI
  answers); /health stays open for probes.
- **Structured output.** A `json_schema` row carries its own xgrammar matcher from round to round, so the
  JSON constraint survives the splitting into rounds; rows with and without a schema share a batch.
- **Streaming.** `stream: true` answers with server-sent events as OpenAI does: the stopping criterion that checks
  cancellation after every token also publishes a streaming row's tokens so far, so text goes out token by token
  inside a round, and the last event carries the `finish_reason` (`stop` at EOS, `length` at max_tokens).
- **RAG (`--rag`).** The last user message retrieves from the run's index and the request becomes the prompt the
  student was trained on (`ragtune.core.rag.build_rag_messages`, as eval sends it); the answer carries the chunks
  it was given in an extra `retrieved` field.
- **Shutdown.** SIGTERM cancels every request (503 to those still waiting), then uvicorn exits.
"""

# No `from __future__ import annotations`: FastAPI reads the handler's annotations (`Request`, imported
# lazily inside create_app) at runtime.
import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ragtune.core.rag import Chunk, build_rag_messages, load_index, retrieve

if TYPE_CHECKING:
    from llama_index.core import VectorStoreIndex

    from ragtune.app.config import RagtuneConfig
    from ragtune.core.llm import HFChatBackend
    from ragtune.core.rag import RagPrompts

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Re-reading the rows is the price of rounds. SmolLM2-135M fp32, batch 8, 300-token rows, on the shared 2-core
# box: generate() of 1 token took 43 s, of 32 tokens 173 s (a loaded machine: the ratio, not the seconds,
# carries over), so at 32 the re-read is about a quarter of a round. Larger steps waste less, smaller ones
# answer a short request sooner.
STEP_TOKENS = 32
# Eight full batches of 8: ragtune's own openai backend (max_concurrency 8 by default) never meets a 503; a
# crowd of other clients is told to retry instead of waiting behind eight rounds of answers.
MAX_QUEUE = 64
# Above the openai backend's 120 s client timeout, so ragtune's own clients give up (and disconnect) first.
REQUEST_TIMEOUT = 600.0
# How often a waiting request checks whether its client is still connected.
DISCONNECT_POLL_SECONDS = 0.25
# A 128k-token prompt is about 0.5 MB of English as JSON, about 1.1 MB of CJK text escaped as \uXXXX: 2 MiB holds
# any prompt a current model's context takes. SmolLM2 on the shared 2-core box: a 10 MB body is refused 413 in
# 0.08 s, peak RSS unchanged (it was a 400 after 9.7 s, /health waiting 9.5 s, +1.3 GB); a 2 MiB prompt, 400 in 0.11 s
# from its length in characters (it was 1.65 s of tokenizing).
MAX_REQUEST_BYTES = 2 * 1024 * 1024


class ServerBusy(Exception):
    """The queue is full or the server is shutting down: answered 503."""


@dataclass(eq=False)
class _Job:
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

    def __init__(self, jobs: list[_Job], start: int, eos_ids: list[int]):
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

    def __init__(self, jobs: list[_Job], start: int, vocab_size: int):
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
        self._fifo: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.rounds = 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="ragtune-scheduler")
        self.thread.start()

    def submit(self, job: _Job) -> None:
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

    def _next_batch(self) -> list[_Job] | None:
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

    def _round(self, batch: list[_Job]) -> None:
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

    def _settle(self, job: _Job, new_tokens: list[int]) -> None:
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


def context_length(model: Any, tokenizer: Any) -> int | None:
    """The model's context in tokens (positions it was built for), or None when neither config nor tokenizer
    says."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None and 0 < getattr(tokenizer, "model_max_length", 0) < 10**7:
        limit = tokenizer.model_max_length
    return limit


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that ragtune serve honours."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's range; absent or null: greedy
    top_p: float | None = Field(None, ge=0, le=1)  # OpenAI's range; applies when temperature > 0
    n: int | None = None
    response_format: dict[str, Any] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int | None) -> int | None:
        """OpenAI's n asks for several answers; answering one of them with 200 would hide that."""
        if n not in (None, 1):
            raise PydanticCustomError("one_choice", "ragtune serve returns one choice per request: n must be 1")
        return n


class BadRequest(Exception):
    """A request the server will not run: answered 400 with this message, naming the field in `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def chat_messages(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template takes them; unknown roles and missing or non-text content are a 400
    (OpenAI allows null content only beside tool calls, which this server does not take)."""
    if not raw:
        raise BadRequest("messages must be a non-empty list.", param="messages")
    messages = []
    for i, message in enumerate(raw):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not supported; use one of {', '.join(ROLES)}.",
                             param=f"messages[{i}].role")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise BadRequest(f"messages[{i}].content: only parts of type 'text' with a string `text` are "
                                 "supported.", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            raise BadRequest(f"messages[{i}].content is null or missing: a {role} message needs a string or a list "
                             "of text parts.", param=f"messages[{i}].content")
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts.",
                             param=f"messages[{i}].content")
        messages.append({"role": role, "content": content})
    return messages


def token_budget(requested: int | None, prompt_tokens: int, context: int | None, default: int,
                 field: str = "max_tokens") -> int:
    """max_tokens as the request asked (≥ 1, within the context with the prompt), else the default cut to fit."""
    if requested is not None and requested < 1:
        raise BadRequest(f"{field} must be at least 1, got {requested}.", param=field)
    if context is None:
        return requested or default
    room = context - prompt_tokens
    if requested is None:
        if room < 1:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens and the model's context is {context}: "
                             "shorten the messages.", param="messages")
        return min(default, room)
    if requested > room:
        raise BadRequest(f"This model's maximum context length is {context} tokens. However, you requested "
                         f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the "
                         f"completion). Set {field} to at most {max(room, 0)} or shorten the messages.", param=field)
    return requested


def longest_token(tokenizer: Any) -> int:
    """The most characters of text one token can stand for: its vocabulary's longest entry. Byte-level BPE spells
    each byte as one character and SentencePiece a space as '▁', so an entry is never shorter than its text
    (SmolLM2's longest is 81 characters, a newline and 80 spaces)."""
    return max(len(entry) for entry in tokenizer.get_vocab())


def _matcher(backend: "HFChatBackend", response_format: dict[str, Any] | None) -> Any:
    """A request's own xgrammar matcher over the backend's compiled (cached) grammar, or None without JSON."""
    kind = (response_format or {}).get("type")
    if kind not in ("json_schema", "json_object"):
        return None
    import xgrammar as xgr

    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    try:
        return xgr.GrammarMatcher(backend.grammar(schema))
    except Exception as err:
        raise BadRequest(f"response_format.json_schema.schema cannot be compiled: {err}") from None


class Admission:
    """Turns a request body into a job, or a BadRequest: roles, content, prompt length, max_tokens, schema."""

    def __init__(self, backend: "HFChatBackend", tokenizer_lock: threading.Lock, default_max_tokens: int):
        self.tokenizer, self.tokenizer_lock = backend.tokenizer, tokenizer_lock
        self.context = context_length(backend.model, backend.tokenizer)
        self.chars_per_token = longest_token(backend.tokenizer)
        self.default_max_tokens = default_max_tokens
        self.backend = backend

    def check_length(self, text: str, what: str = "the prompt") -> None:
        """Refuse text that cannot fit the context from its length alone, so nobody tokenizes megabytes to count
        them: it is at least len/chars_per_token tokens."""
        if self.context is None:
            return
        at_least = -(-len(text) // self.chars_per_token)
        if at_least >= self.context:  # not even one token would be left for the answer
            raise BadRequest(f"{what} is {len(text)} characters, at least {at_least} tokens (one token of this model "
                             f"is at most {self.chars_per_token} characters), and the model's context is "
                             f"{self.context} tokens: shorten the messages.", param="messages")

    def job(self, body: ChatRequest, messages: list[dict[str, str]]) -> _Job:
        """Tokenizes (up to seconds for a long prompt): the handler runs it in a worker thread."""
        with self.tokenizer_lock:
            try:
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # the template's own rules, e.g. "roles must alternate"
                raise BadRequest(f"the model's chat template rejected the messages: {err}", param="messages") from None
            self.check_length(prompt)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = token_budget(getattr(body, field), len(prompt_ids), self.context, self.default_max_tokens, field)
        temperature = body.temperature if body.temperature is not None else 0.0
        return _Job(prompt_ids, max_tokens, temperature, _matcher(self.backend, body.response_format), top_p=body.top_p)


class RagPrompt:
    """`--rag`: a request becomes the prompt the student was trained on. The last user message is the query; it
    retrieves `similarity_top_k` chunks from the index prep persisted, and `build_rag_messages` puts them in prep's
    template, as eval does. Other messages are dropped: every training row is one system and one user turn."""

    def __init__(self, index: "VectorStoreIndex", top_k: int, prompts: "RagPrompts"):
        self.index, self.top_k, self.prompts = index, top_k, prompts
        self.lock = threading.Lock()  # handlers retrieve from a thread pool; one query embeds at a time

    @classmethod
    def for_run(cls, config: "RagtuneConfig") -> "RagPrompt":
        """The run's index (output_dir/data/index) with its embedding model, top_k and prompts."""
        from ragtune.core.run_dir import RunDir

        index = load_index(config.embedding, RunDir(config.output_dir).index)
        return cls(index, config.data_prep.similarity_top_k, config.data_prep)

    @staticmethod
    def query(messages: list[dict[str, str]]) -> str:
        """The last user message: what is retrieved for, and all of the client's text the prompt keeps."""
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not query.strip():
            raise BadRequest("ragtune serve --rag answers the last user message from the documents; "
                             "this request has no user message with text.", param="messages")
        return query

    def __call__(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[Chunk]]:
        query = self.query(messages)
        with self.lock:
            chunks = retrieve(self.index, [query], self.top_k)[0]
        return build_rag_messages(query, [c["text"] for c in chunks], self.prompts), chunks


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def _error(status: int, message: str, param: str | None = None, **headers: str) -> Any:
    """An error body in OpenAI's shape, which the openai SDK and ragtune's openai backend read."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers or None)


class Gate:
    """ASGI middleware in front of the app, before any byte of the body is parsed: the API key on /v1/*, then the
    body's size. A body is read here, up to `max_request_bytes`, and handed on whole; past the limit the answer is
    413 at once and uvicorn discards the rest of what the client sends."""

    def __init__(self, app: Any, *, api_key: str | None, max_request_bytes: int):
        self.app, self.max_request_bytes = app, max_request_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(headers):
            message = ("incorrect API key provided." if b"authorization" in headers else
                       "no API key provided: send `Authorization: Bearer KEY` with the key ragtune serve was "
                       "started with (--api-key or RAGTUNE_SERVE_API_KEY).")
            return await _error(401, message, **{"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return await self._too_large(f"is {int(length)} bytes", scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_request_bytes:
                return await self._too_large(f"passed {self.max_request_bytes} bytes", scope, receive, send)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:  # later calls are the app waiting for a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key or b"")

    async def _too_large(self, size: str, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        message = (f"the request body {size}: this server takes at most {self.max_request_bytes} bytes "
                   "(ragtune serve --max-request-bytes).")
        await _error(413, message)(scope, receive, send)


def exposure_warning(host: str, port: int, api_key: str | None, rag: bool) -> str | None:
    """What to tell the user who binds beyond this machine without a key; None when the server is not exposed."""
    if api_key or is_loopback(host):
        return None
    return (f"--host {host} reaches beyond this machine and no --api-key (or RAGTUNE_SERVE_API_KEY) is set: anyone "
            f"who reaches port {port} can use the model" +
            (" and read the indexed documents' text (each answer's `retrieved` chunks)" if rag else "") +
            ". Set a key, or bind 127.0.0.1.")


def is_loopback(host: str) -> bool:
    """Whether `host` binds to this machine only: localhost, 127.0.0.0/8, ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def create_app(backend: "HFChatBackend", served_model_name: str, batch_size: int = 8, default_max_tokens: int = 256,
               *, step_tokens: int = STEP_TOKENS, max_queue: int = MAX_QUEUE,
               request_timeout: float = REQUEST_TIMEOUT, rag: RagPrompt | None = None, api_key: str | None = None,
               max_request_bytes: int = MAX_REQUEST_BYTES) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response, StreamingResponse

    scheduler = Scheduler(backend, batch_size=batch_size, step_tokens=step_tokens, max_queue=max_queue)
    admission = Admission(backend, scheduler.tokenizer_lock, default_max_tokens)
    app = FastAPI(title="ragtune serve")
    app.state.scheduler = scheduler
    app.add_middleware(Gate, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> Any:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request body')}", param=where or None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "rounds": scheduler.rounds}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "owned_by": "ragtune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        try:
            messages, chunks = chat_messages(body.messages), None
            if rag is not None:  # embedding the query takes milliseconds to seconds: off the event loop
                admission.check_length(rag.query(messages), "the last user message")  # before it is embedded
                messages, chunks = await asyncio.to_thread(rag, messages)
            job = await asyncio.to_thread(admission.job, body, messages)  # tokenizing: off the event loop too
            reply = _Reply(served_model_name, chunks)
            if body.stream:
                wake = _wake_on_progress(job)
                scheduler.submit(job)
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                return StreamingResponse(_events(job, reply, wake, scheduler, request, request_timeout, include_usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            scheduler.submit(job)
            text = await _wait(job, request, request_timeout)
        except BadRequest as err:
            return _error(400, str(err), param=err.param)
        except ServerBusy as err:
            return _error(503, str(err), **{"Retry-After": "1"})
        except TimeoutError:
            return _error(504, f"generation took longer than the server's request timeout ({request_timeout:g} s; "
                               "ragtune serve --request-timeout); lower max_tokens or raise it.")
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except RuntimeError as err:
            return _error(500, str(err))
        return reply.completion(job, text)

    return app


@dataclass
class _Reply:
    """What one answer's body, or every chunk of its stream, shares: id, time, model, and with --rag the chunks
    the prompt held (`retrieved`: id, score, metadata, text; an extra field OpenAI clients keep)."""

    model: str
    chunks: list[Chunk] | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, kind: str) -> dict[str, Any]:
        head: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.chunks is not None:
            head["retrieved"] = self.chunks
        return head

    def completion(self, job: _Job, text: str) -> dict[str, Any]:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": job.finish_reason}],
                "usage": _usage(job)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One `chat.completion.chunk`; `retrieved` rides on the first one only."""
        head = self._head("chat.completion.chunk")
        if not first:
            head.pop("retrieved", None)
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def usage_chunk(self, job: _Job) -> dict[str, Any]:
        """`stream_options.include_usage`: the last chunk, with no choices and the token counts."""
        head = self._head("chat.completion.chunk")
        head.pop("retrieved", None)
        return {**head, "choices": [], "usage": _usage(job)}


def _usage(job: _Job) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(job.prompt_ids), len(job.generated)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _wake_on_progress(job: _Job) -> asyncio.Event:
    """An event the scheduler thread sets (through the loop) whenever the job has new tokens or ends."""
    loop, event = asyncio.get_running_loop(), asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop has closed (shutdown): nobody is waiting, and the scheduler must go on
            pass

    job.notify = wake
    return event


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _events(job: _Job, reply: _Reply, wake: asyncio.Event, scheduler: Scheduler, request: Any,
                  timeout: float, include_usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events: a role chunk, the text as it grows, a chunk with the finish_reason, the
    usage when asked, `[DONE]`. An error after the first byte (timeout, shutdown, a failed round) can no longer
    change the status: it is sent as an `error` event, which the openai SDK raises. A client that leaves, or the
    response being dropped, cancels the generation as for a plain request."""
    sent, deadline = "", time.monotonic() + timeout
    try:
        yield _sse(reply.chunk({"role": "assistant", "content": ""}, first=True))
        while True:
            wake.clear()
            done = job.future.done()
            if done:
                try:
                    text = job.future.result()
                except ServerBusy as err:
                    yield _sse({"error": {"message": str(err), "type": "server_error", "code": 503}})
                    return
                except RuntimeError as err:
                    yield _sse({"error": {"message": str(err), "type": "server_error", "code": 500}})
                    return
            else:  # a token cut inside a UTF-8 character decodes to U+FFFD: it waits for the next token
                text = scheduler.text(job.so_far).rstrip("\ufffd").rstrip()
            if len(text) > len(sent) and text.startswith(sent):
                yield _sse(reply.chunk({"content": text[len(sent):]}))
                sent = text
            if done:
                break
            try:
                await asyncio.wait_for(wake.wait(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            if await request.is_disconnected():
                return
            if time.monotonic() > deadline:
                yield _sse({"error": {"message": f"generation took longer than the server's request timeout "
                                                 f"({timeout:g} s; ragtune serve --request-timeout).",
                                      "type": "server_error", "code": 504}})
                return
        yield _sse(reply.chunk({}, finish_reason=job.finish_reason))
        if include_usage:
            yield _sse(reply.usage_chunk(job))
        yield "data: [DONE]\n\n"
    finally:  # also on GeneratorExit/CancelledError: the server dropped the stream of a client that left
        if not job.future.done():
            job.cancelled = True


async def _wait(job: _Job, request: Any, timeout: float) -> str:
    """The job's text; cancels the job when the client disconnects or `timeout` seconds pass."""
    future = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout
    while not future.done():
        await asyncio.wait([future], timeout=DISCONNECT_POLL_SECONDS)
        if future.done():
            break
        if await request.is_disconnected():
            job.cancelled = True
            raise ClientGone()
        if time.monotonic() > deadline:
            job.cancelled = True
            raise TimeoutError()
    return future.result()


def serve(backend: "HFChatBackend", *, host: str, port: int, served_model_name: str, batch_size: int,
          default_max_tokens: int = 256, step_tokens: int = STEP_TOKENS, max_queue: int = MAX_QUEUE,
          request_timeout: float = REQUEST_TIMEOUT, rag: RagPrompt | None = None, api_key: str | None = None,
          max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
    import uvicorn

    app = create_app(backend, served_model_name, batch_size, default_max_tokens, step_tokens=step_tokens,
                     max_queue=max_queue, request_timeout=request_timeout, rag=rag, api_key=api_key,
                     max_request_bytes=max_request_bytes)
    scheduler: Scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            scheduler.close()  # before uvicorn waits for open requests: they end now, with 503
            super().handle_exit(sig, frame)

    log.warning("serving %s on http://%s:%d/v1%s%s", served_model_name, host, port,
                " (answers through the run's RAG index)" if rag is not None else "",
                " (requests need its API key)" if api_key else "")
    if (warning := exposure_warning(host, port, api_key, rag is not None)) is not None:
        log.warning(warning)
    # uvicorn waits this long for open connections after SIGTERM (all requests end at once above)
    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()
    scheduler.thread.join(timeout=5)
