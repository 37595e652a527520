"""The backend a role's config asks for (`make_backend`), and the managed vLLM server's backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ragtune.core.gpu_plan import ServerPlan
from ragtune.core.llm.hf import HFChatBackend
from ragtune.core.llm.openai import OpenAIChatBackend
from ragtune.core.llm.replicas import ReplicaBackend
from ragtune.core.llm.types import ChatBackend, Completion, Message
from ragtune.core.roles import LLMRole


def make_backend(role: LLMRole, log_dir: str | Path | None = None, server: ServerPlan | None = None) -> ChatBackend:
    """The backend a role asks for. `backend: vllm` without `base_url` starts (or reuses) the process-wide
    managed vLLM server for `role.model`, logging to `log_dir`, placed as `server` says (the run's GPU plan:
    `gpu_plan(config).teacher`; None: the role's own settings on this machine's default device); the caller ends it
    with `ragtune.core.servers.shutdown_all()` (it also ends at exit)."""
    if role.backend == "hf":
        return HFChatBackend(
            role.model, torch_dtype=role.torch_dtype, device_map=role.device_map, batch_size=role.batch_size,
            max_new_tokens=role.max_new_tokens, temperature=role.temperature,
            trust_remote_code=role.trust_remote_code,
        )
    if role.backend == "vllm" and not role.base_url:
        from ragtune.core.servers import get_server

        place = server or ServerPlan(gpus=(), dtype=role.torch_dtype, engine_args=role.engine_args)
        return ManagedServerBackend(
            lambda: get_server(role.model, log_dir=log_dir, dtype=place.dtype, engine_args=place.engine_args,
                               gpus=place.gpus, trust_remote_code=role.trust_remote_code), role)
    if len(role.base_urls) > 1:
        return ReplicaBackend([openai_backend(role, base_url=url) for url in role.base_urls])
    return openai_backend(role)


class ManagedServerBackend:
    """An `OpenAIChatBackend` on ragtune's managed vLLM server for one model. One managed server runs at a time,
    so another model's (a judge between teacher batches) may have replaced this one, or its weights, since the last
    call: the next call starts it again, or swaps its weights back; a call in flight keeps them (`claim`). A server
    that died is not restarted here: its calls fail with the reason.
    `served` is the model name requested (a LoRA adapter's), by default the server's own model."""

    def __init__(self, start: Callable[[], Any], role: LLMRole, served: str | None = None):
        self._start, self._role, self._served = start, role, served
        self._server = start()
        self._model = self._server.loaded  # the model whose weights this backend's answers must come from
        self._backend = self._connect()

    def _connect(self) -> "OpenAIChatBackend":
        return openai_backend(self._role, model=self._served or self._server.served_model_name,
                              base_url=self._server.base_url, unavailable_hint=self._server.describe_failure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def chat(self, conversations: list[list[Message]], **kwargs: Any) -> list[Completion]:
        while not self._server.claim(self._model):  # handed over, or now holding another model's weights
            self._server = self._start()
            self._backend = self._connect()
        server = self._server
        try:
            return self._backend.chat(conversations, **kwargs)
        finally:
            server.release()


def openai_backend(role: LLMRole, *, model: str | None = None, base_url: str | None = None,
                   unavailable_hint: Callable[[], str] | None = None) -> OpenAIChatBackend:
    """An OpenAIChatBackend with the role's client settings; `model`/`base_url` override the role's."""
    return OpenAIChatBackend(
        model=model or role.model, base_url=base_url or next(iter(role.base_urls), "https://api.openai.com/v1"),
        api_key_env=role.api_key_env, api_version=role.api_version, max_concurrency=role.max_concurrency,
        timeout=role.timeout, max_retries=role.max_retries, max_consecutive_failures=role.max_consecutive_failures,
        max_new_tokens=role.max_new_tokens, temperature=role.temperature,
        structured_output=role.structured_output, unavailable_hint=unavailable_hint,
        token_ids_in_logprobs=role.backend == "vllm",
    )
