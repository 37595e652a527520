"""`ragtune serve`: an OpenAI-compatible `/v1/chat/completions` server over a base model or base+adapter.

Deploys a tuned student behind the API every RAG stack already speaks, and gives the `openai` backend
a real local endpoint to test against. Concurrent requests are micro-batched into one `generate` call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from ragtune.llm import ChatBackend, Completion

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float
    json_schema: dict[str, Any] | None
    future: Future = field(default_factory=Future)

    def group_key(self) -> tuple[Any, ...]:
        return (self.max_new_tokens, self.temperature, repr(self.json_schema))


class MicroBatcher:
    """Collects requests for up to `wait_seconds` (or `batch_size` of them) and generates them together."""

    def __init__(self, backend: ChatBackend, batch_size: int, wait_seconds: float = 0.02):
        self.backend = backend
        self.batch_size = batch_size
        self.wait_seconds = wait_seconds
        self._queue: queue.Queue[_Pending] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="ragtune-batcher").start()

    def submit(self, pending: _Pending) -> Completion:
        self._queue.put(pending)
        return pending.future.result()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.wait_seconds
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple[Any, ...], list[_Pending]] = {}
            for item in batch:
                groups.setdefault(item.group_key(), []).append(item)
            for items in groups.values():
                first = items[0]
                try:
                    results = self.backend.chat([i.messages for i in items], max_new_tokens=first.max_new_tokens,
                                                temperature=first.temperature, json_schema=first.json_schema)
                except Exception as err:
                    results = [Completion(None, f"{type(err).__name__}: {err}") for _ in items]
                for item, result in zip(items, results):
                    item.future.set_result(result)


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that ragtune serve honours."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 0.0
    response_format: dict[str, Any] | None = None
    stream: bool = False


def create_app(backend: ChatBackend, served_model_name: str, batch_size: int = 8, default_max_tokens: int = 256) -> Any:
    from fastapi import FastAPI, HTTPException

    batcher = MicroBatcher(backend, batch_size)
    app = FastAPI(title="ragtune serve")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "owned_by": "ragtune"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> dict[str, Any]:
        if request.stream:
            raise HTTPException(400, "stream=true is not supported by ragtune serve; send stream=false.")
        if not request.messages:
            raise HTTPException(400, "messages must be a non-empty list.")
        schema = None
        if request.response_format and request.response_format.get("type") == "json_schema":
            schema = (request.response_format.get("json_schema") or {}).get("schema")
        messages = [{"role": m.get("role", "user"), "content": str(m.get("content", ""))} for m in request.messages]
        result = batcher.submit(_Pending(
            messages, request.max_completion_tokens or request.max_tokens or default_max_tokens,
            request.temperature, schema,
        ))
        if result.error is not None:
            raise HTTPException(500, result.error)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    return app


def serve(backend: ChatBackend, *, host: str, port: int, served_model_name: str, batch_size: int,
          default_max_tokens: int = 256) -> None:
    import uvicorn

    app = create_app(backend, served_model_name, batch_size, default_max_tokens)
    log.warning("serving %s on http://%s:%d/v1", served_model_name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
