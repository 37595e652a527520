"""LLM backends for the teacher and judge roles (and `ragtune serve`), behind one small interface.

`hf` runs a transformers model in-process with batched, left-padded generation and the model's chat
template; `openai` talks to any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, OpenAI,
Azure) through the official `openai` SDK; `vllm` is `openai` against a vLLM server that ragtune starts
and stops itself (`ragtune.core.engine`), or against the user's own vLLM when `base_url` is set.
All return one `Completion` per conversation: a failed request is a Completion with `error` set, so
callers record failures instead of dropping samples; only an endpoint that stops answering raises
(`BackendUnavailable`), and it does so once, quickly, naming the URL.

One concern per module: `types` (messages, Completion, errors, the ChatBackend protocol), `hf`, `openai` (with
`breaker`, its circuit breaker), `overlap` (batches of calls in flight together), `replicas`, `lazy` (a backend built on first use, or while other work runs), `factory`
(`make_backend`, the managed server's backend) and `same_tokenizer` (soft-label distillation's check). The names below are the ones the stages import from here.
"""

from ragtune.core.llm.breaker import CircuitBreaker
from ragtune.core.llm.factory import ManagedServerBackend, make_backend, openai_backend
from ragtune.core.llm.hf import HFChatBackend, StopWhen
from ragtune.core.llm.lazy import LazyBackend
from ragtune.core.llm.openai import OpenAIChatBackend, fan_out
from ragtune.core.llm.overlap import overlapped
from ragtune.core.llm.replicas import ReplicaBackend
from ragtune.core.llm.same_tokenizer import TokenizerMismatch, check_same_tokenizer
from ragtune.core.llm.types import (
    BackendUnavailable, ChatBackend, Completion, FinishReason, Message, RowLost, Schema, Schemas, Token, json_error,
    schema_rows,
)

__all__ = [
    "BackendUnavailable", "ChatBackend", "CircuitBreaker", "Completion", "FinishReason", "HFChatBackend", "LazyBackend",
    "ManagedServerBackend", "Message", "OpenAIChatBackend", "ReplicaBackend", "RowLost", "Schema", "Schemas",
    "StopWhen", "Token", "TokenizerMismatch", "check_same_tokenizer", "fan_out", "json_error", "make_backend",
    "openai_backend", "overlapped", "schema_rows",
]
