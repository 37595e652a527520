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

One concern per module: `scheduler` (rounds, cancellation, grammar rows), `admission` (request body -> job), `rag`
(`--rag` prompts), `gate` (API key, body size, exposure) and `api` (FastAPI, SSE, `serve`).
"""

from ragtune.app.serve.api import REQUEST_TIMEOUT, create_app, serve
from ragtune.app.serve.gate import MAX_REQUEST_BYTES, exposure_warning, is_loopback
from ragtune.app.serve.rag import RagPrompt
from ragtune.app.serve.scheduler import MAX_QUEUE, STEP_TOKENS

__all__ = [
    "MAX_QUEUE", "MAX_REQUEST_BYTES", "REQUEST_TIMEOUT", "STEP_TOKENS", "RagPrompt", "create_app", "exposure_warning",
    "is_loopback", "serve",
]
