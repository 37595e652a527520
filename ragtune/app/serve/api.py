"""The HTTP side: FastAPI's `/health`, `/v1/models` and `/v1/chat/completions` (plain or server-sent events) in
front of the scheduler, and `serve`, which runs it under uvicorn and ends every request on SIGTERM."""

# No `from __future__ import annotations`: FastAPI reads the handler's annotations (`Request`, imported
# lazily inside create_app) at runtime.
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ragtune.app.serve.admission import Admission, BadRequest, ChatRequest, chat_messages
from ragtune.app.serve.gate import MAX_REQUEST_BYTES, Gate, error_response, exposure_warning
from ragtune.app.serve.rag import RagPrompt
from ragtune.app.serve.scheduler import MAX_QUEUE, STEP_TOKENS, Job, Scheduler, ServerBusy
from ragtune.core.rag import Chunk

if TYPE_CHECKING:
    from ragtune.core.llm import HFChatBackend

log = logging.getLogger(__name__)

# Above the openai backend's 120 s client timeout, so ragtune's own clients give up (and disconnect) first.
REQUEST_TIMEOUT = 600.0
# How often a waiting request checks whether its client is still connected.
DISCONNECT_POLL_SECONDS = 0.25


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


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
        return error_response(400, f"{where}: {first.get('msg', 'invalid request body')}", param=where or None)

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
            return error_response(400, str(err), param=err.param)
        except ServerBusy as err:
            return error_response(503, str(err), **{"Retry-After": "1"})
        except TimeoutError:
            return error_response(504, f"generation took longer than the server's request timeout "
                                       f"({request_timeout:g} s; ragtune serve --request-timeout); lower max_tokens "
                                       "or raise it.")
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except RuntimeError as err:
            return error_response(500, str(err))
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

    def completion(self, job: Job, text: str) -> dict[str, Any]:
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

    def usage_chunk(self, job: Job) -> dict[str, Any]:
        """`stream_options.include_usage`: the last chunk, with no choices and the token counts."""
        head = self._head("chat.completion.chunk")
        head.pop("retrieved", None)
        return {**head, "choices": [], "usage": _usage(job)}


def _usage(job: Job) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(job.prompt_ids), len(job.generated)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _wake_on_progress(job: Job) -> asyncio.Event:
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


async def _events(job: Job, reply: _Reply, wake: asyncio.Event, scheduler: Scheduler, request: Any,
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


async def _wait(job: Job, request: Any, timeout: float) -> str:
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
