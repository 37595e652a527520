"""The Ragas judge: Ragas's structured-output LLM interface over ragtune's chat backends.

Ragas 0.4 collections metrics call `llm.agenerate(prompt, response_model)` with the pydantic model the
answer must fit. We pass that model's JSON schema to the backend, which decodes under it (xgrammar for
`hf`, `response_format` for `openai`), so even a 135M judge returns parseable output by construction —
whether the content is any good is what the judge sanity check measures.

Ragas issues its calls one coroutine per sample; `BatchedJudge` queues them and sends up to
`backend.batch_size` same-schema prompts per `backend.chat()` call from a worker thread. At
temperature 0 an identical prompt is generated once (the reference answer's statements, repeated
AnswerRelevancy questions).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")  # ragtune runs offline: no usage analytics from Ragas

from ragas.llms.base import InstructorBaseRagasLLM  # noqa: E402

from ragtune.core.llm import BackendUnavailable, ChatBackend

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

# Integer fields Ragas describes as "0/1" verdicts; constrained to exactly 0 or 1.
BINARY_FIELDS = frozenset({"verdict", "attributed", "noncommittal"})


class JudgeError(RuntimeError):
    """One judge call failed (backend error, truncated or invalid output); recorded against its sample."""


def bounded_schema(schema: dict[str, Any], max_length: int, max_items: int) -> dict[str, Any]:
    """Ragas's schema plus bounds that let constrained decoding always finish: strings of at most
    `max_length` printable characters, `maxItems` on lists, `enum: [0, 1]` on binary verdicts.
    Every output valid here is valid for Ragas's pydantic model."""
    schema = copy.deepcopy(schema)

    def visit(node: Any, name: str | None = None) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "string" and not {"pattern", "enum", "format", "const"} & node.keys():
                # a pattern, not maxLength: xgrammar 0.2.8 lets raw control characters into maxLength
                # strings, which no JSON parser accepts; this excludes them (and escapes) by construction
                node["pattern"] = f"^[^\\u0000-\\u001f\"\\\\]{{0,{max_length}}}$"
            elif kind == "array":
                node.setdefault("maxItems", max_items)
            elif kind == "integer" and name in BINARY_FIELDS:
                node["enum"] = [0, 1]
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    for prop, sub in value.items():
                        visit(sub, prop)
                elif key != "enum":
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(schema)
    return schema


@dataclass
class JudgeUsage:
    """Where judge time goes: wall seconds inside backend calls, and how much was asked."""

    seconds: float = 0.0
    calls: int = 0
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class _Request:
    prompt: str
    schema_key: str
    future: asyncio.Future


class BatchedJudge(InstructorBaseRagasLLM):
    """`InstructorBaseRagasLLM` for Ragas collections metrics, batching concurrent calls into `backend.chat()`.

    In-process (`hf`): batches of `backend.batch_size` prompts, one batch at a time, with
    `bounded_schema` bounds (`constrain=True`); generation is bounded by `max_new_tokens`, so no timeout.
    OpenAI-compatible server: one prompt per call and up to `max_concurrency` calls in flight (the
    server batches), Ragas's schema unchanged (hosted APIs reject some JSON Schema keywords), and each
    call failed after `call_timeout` seconds (measured from when it is sent, not while it waits its turn).
    """

    def __init__(self, backend: ChatBackend, *, max_new_tokens: int, temperature: float = 0.0,
                 constrain: bool = True, max_length: int = 128, max_items: int = 6,
                 batch_size: int | None = None, concurrent_calls: int = 1, cache: bool = True,
                 call_timeout: float | None = None):
        self.backend = backend
        self.batch_size = batch_size or backend.batch_size
        self.concurrent_calls = concurrent_calls
        self.cache = cache and temperature == 0  # identical greedy prompts give identical outputs
        self.call_timeout = call_timeout
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.constrain = constrain
        self.max_length = max_length
        self.max_items = max_items
        self.usage = JudgeUsage()
        self._texts: dict[tuple[str, str], str] = {}  # finished generations (temperature 0 only)
        self._pending: list[_Request] = []
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._schemas: dict[str, dict[str, Any]] = {}
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # calls block a thread each; asyncio's default pool has min(32, CPUs + 4) threads (6 on a 2-core box), which
        # capped an endpoint judge's calls in flight below `max_concurrency`
        self._threads = ThreadPoolExecutor(max_workers=concurrent_calls, thread_name_prefix="judge")

    @property
    def model_name(self) -> str:
        return self.backend.model_name

    def schema_for(self, response_model: type[BaseModel]) -> dict[str, Any]:
        schema = response_model.model_json_schema()
        return bounded_schema(schema, self.max_length, self.max_items) if self.constrain else schema

    def generate(self, prompt: str, response_model: type[T]) -> T:
        """Synchronous single call (Ragas's sync entry points); evaluation uses `agenerate`."""
        schema = self.schema_for(response_model)
        started = time.perf_counter()
        completion = self.backend.chat([[{"role": "user", "content": prompt}]], max_new_tokens=self.max_new_tokens,
                                       temperature=self.temperature, json_schema=schema)[0]
        self._account(time.perf_counter() - started, [completion])
        return self._parse(completion.text, completion.error, response_model)

    async def agenerate(self, prompt: str, response_model: type[T]) -> T:
        schema = self.schema_for(response_model)
        schema_key = json.dumps(schema, sort_keys=True)
        key = (prompt, schema_key)
        self.usage.requests += 1
        if self.cache and key in self._texts:
            self.usage.cached += 1
            return self._parse(self._texts[key], None, response_model)
        self._bind_loop()
        future = self._inflight.get(key) if self.cache else None
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._schemas[schema_key] = schema
            self._pending.append(_Request(prompt, schema_key, future))
            if self.cache:
                self._inflight[key] = future
            if self._worker is None or self._worker.done():
                self._worker = asyncio.get_running_loop().create_task(self._drain())
        else:
            self.usage.cached += 1
        text = await asyncio.shield(future)  # a cancelled caller must not cancel a result others share
        return self._parse(text, None, response_model)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # futures belong to one event loop; start afresh in a new one
            self._loop, self._pending, self._inflight, self._worker = loop, [], {}, None

    async def _drain(self) -> None:
        """Send queued prompts in batches of one schema each, oldest first, with at most
        `concurrent_calls` batches in flight, until the queue is empty."""
        in_flight: set[asyncio.Future] = set()
        while self._pending or in_flight:
            for _ in range(4):  # let the coroutines woken by the last batch queue their next calls
                await asyncio.sleep(0)
            while self._pending and len(in_flight) < self.concurrent_calls:
                in_flight.add(asyncio.ensure_future(self._send(self._take_batch())))
            if in_flight:
                _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)

    def _take_batch(self) -> list[_Request]:
        schema_key = self._pending[0].schema_key
        batch = [r for r in self._pending if r.schema_key == schema_key][: self.batch_size]
        taken = {id(r) for r in batch}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return batch

    async def _send(self, batch: list[_Request]) -> None:
        schema_key = batch[0].schema_key
        try:
            call = asyncio.get_running_loop().run_in_executor(self._threads, self._chat, [r.prompt for r in batch],
                                                              self._schemas[schema_key])
            completions = await asyncio.wait_for(call, self.call_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            for request in batch:
                self._finish(request, error=JudgeError(f"judge call timed out after {self.call_timeout:g}s "
                                                       "(eval.judge_timeout)"))
            return
        except BackendUnavailable as err:
            for request in batch:
                self._finish(request, error=err)
            return
        except Exception as err:  # a crashed batch fails its own samples, never the whole evaluation
            log.warning("judge batch failed: %s", err)
            for request in batch:
                self._finish(request, error=JudgeError(f"judge call raised {type(err).__name__}: {err}"))
            return
        for request, completion in zip(batch, completions):
            if completion.error is not None or completion.text is None:
                self._finish(request, error=JudgeError(f"judge call failed: {completion.error or 'no text'}"))
            else:
                if self.cache:
                    self._texts[(request.prompt, schema_key)] = completion.text
                self._finish(request, text=completion.text)

    def _finish(self, request: _Request, *, text: str | None = None, error: BaseException | None = None) -> None:
        self._inflight.pop((request.prompt, request.schema_key), None)
        if request.future.done():
            return
        if error is not None:
            self.usage.failures += 1
            request.future.set_exception(error)
        else:
            request.future.set_result(text)

    def _chat(self, prompts: list[str], schema: dict[str, Any]) -> list[Any]:
        started = time.perf_counter()
        completions = self.backend.chat([[{"role": "user", "content": p}] for p in prompts],
                                        max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                        json_schema=schema)
        self._account(time.perf_counter() - started, completions)
        return completions

    def _account(self, seconds: float, completions: list[Any]) -> None:
        with self.usage._lock:
            self.usage.seconds += seconds
            self.usage.calls += 1
            self.usage.prompt_tokens += sum(c.prompt_tokens for c in completions)
            self.usage.completion_tokens += sum(c.completion_tokens for c in completions)

    @staticmethod
    def _parse(text: str | None, error: str | None, response_model: type[T]) -> T:
        if error is not None or text is None:
            raise JudgeError(f"judge call failed: {error or 'no text'}")
        try:
            return response_model.model_validate_json(text)
        except ValidationError as err:
            # a server without structured output may wrap the object in prose or a ``` fence
            start, end = text.find("{"), text.rfind("}")
            if 0 < start < end or (start == 0 and end < len(text.rstrip()) - 1):
                try:
                    return response_model.model_validate_json(text[start : end + 1])
                except ValidationError:
                    pass
            raise JudgeError(
                f"judge output is not a valid {response_model.__name__} ({err.error_count()} errors, first: "
                f"{err.errors()[0]['msg']}) — output: {text[:200]!r}"
            ) from None


def timed_embeddings(model_path: str, batch_size: int, torch_dtype: str = "float32") -> Any:
    """Ragas's modern `HuggingFaceEmbeddings` (sentence-transformers, its weights in `torch_dtype`) that remembers the
    texts it has embedded (the same question and reference come back for every model and mode) and counts its
    seconds and tokens (the stage's roofline)."""
    from ragas.embeddings.huggingface_provider import HuggingFaceEmbeddings

    from ragtune.core.rag import count_embedded

    class _Timed(HuggingFaceEmbeddings):
        """One encode at a time: Ragas calls from many worker threads, which only thrash a CPU."""

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.seconds, self.calls, self.cached = 0.0, 0, 0
            self._lock = threading.Lock()
            self._vectors: dict[str, list[float]] = {}

        def _embed_text_local(self, text: str, **kwargs: Any) -> list[float]:
            return self._embed_texts_local([text], **kwargs)[0]

        def _embed_texts_local(self, texts: list[str], **kwargs: Any) -> list[list[float]]:
            with self._lock:
                todo = list(dict.fromkeys(t for t in texts if t not in self._vectors))
                self.cached += len(texts) - len(todo)
                if todo:
                    started = time.perf_counter()
                    vectors = super()._embed_texts_local(todo, **kwargs)
                    count_embedded(self.model_instance, todo)
                    self.seconds += time.perf_counter() - started
                    self.calls += 1
                    self._vectors.update(zip(todo, vectors))
                return [self._vectors[t] for t in texts]

    return _Timed(model=model_path, batch_size=batch_size, model_kwargs={"torch_dtype": torch_dtype})
