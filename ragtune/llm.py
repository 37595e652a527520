"""LLM backends for the teacher and judge roles (and `ragtune serve`), behind one small interface.

`hf` runs a transformers model in-process with batched, left-padded generation and the model's chat
template; `openai` talks to any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, OpenAI,
Azure) with a concurrency limit, timeouts and retries with exponential backoff. Both return one
`Completion` per conversation: a failed request is a Completion with `error` set, so callers record
failures instead of dropping samples; only an endpoint that stays unreachable raises.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ragtune.config import LLMRole
from ragtune.errors import UserFacingError

log = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass
class Completion:
    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BackendUnavailable(UserFacingError):
    """The endpoint could not be reached after every retry: stop the stage, keep what is saved."""


class ChatBackend(Protocol):
    model_name: str
    batch_size: int

    def chat(
        self,
        conversations: list[list[Message]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        json_schema: dict[str, Any] | None = None,
        stop_when: Callable[[str], bool] | None = None,
    ) -> list[Completion]:
        """One Completion per conversation. `stop_when(text_so_far)` lets a backend end a conversation early
        once the caller has what it needs; a caller must parse the full text the same way (hf honours it,
        an endpoint cannot and generates until its own stop)."""
        ...


def make_backend(role: LLMRole) -> ChatBackend:
    if role.backend == "openai":
        return OpenAIChatBackend(
            model=role.model, base_url=role.base_url or "https://api.openai.com/v1", api_key_env=role.api_key_env,
            max_concurrency=role.max_concurrency, timeout=role.timeout, max_retries=role.max_retries,
            max_new_tokens=role.max_new_tokens, temperature=role.temperature,
            structured_output=role.structured_output,
        )
    return HFChatBackend(
        role.model, torch_dtype=role.torch_dtype, device_map=role.device_map, batch_size=role.batch_size,
        max_new_tokens=role.max_new_tokens, temperature=role.temperature, trust_remote_code=role.trust_remote_code,
    )


class HFChatBackend:
    """In-process transformers generation: batches share one forward pass (left padding)."""

    def __init__(
        self,
        model: str,
        *,
        adapter: str | None = None,
        torch_dtype: str = "float32",
        device_map: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        trust_remote_code: bool = False,
        model_name: str | None = None,
    ):
        from train.models import load_causal_lm, load_tokenizer

        self.model_name = model_name or (f"{model}+{adapter}" if adapter else model)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        # the base model's tokenizer: a PEFT adapter folder has no config.json, so resolve_model rejects it
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.model = load_causal_lm(model, dtype=torch_dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        if adapter:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval()
        self._lock = threading.Lock()
        self._grammar_compiler: Any = None
        self._grammars: dict[str, Any] = {}

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def chat(
        self,
        conversations: list[list[Message]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        json_schema: dict[str, Any] | None = None,
        stop_when: Callable[[str], bool] | None = None,
    ) -> list[Completion]:
        results: list[Completion] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            try:
                results.extend(self._generate(batch, max_new_tokens or self.max_new_tokens,
                                              self.temperature if temperature is None else temperature, json_schema,
                                              stop_when))
            except Exception as err:  # a failed batch is recorded per conversation, never dropped
                log.warning("generation failed for %d conversations: %s", len(batch), err)
                results.extend(Completion(None, f"{type(err).__name__}: {err}") for _ in batch)
        return results

    def _generate(self, batch: list[list[Message]], max_new_tokens: int, temperature: float,
                  json_schema: dict[str, Any] | None, stop_when: Callable[[str], bool] | None = None
                  ) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in batch]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if json_schema is not None:
            kwargs["logits_processor"] = [self._json_logits_processor(json_schema)]
        if stop_when is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [StopWhen(self.tokenizer, inputs["input_ids"].shape[1], stop_when)])
        with self._lock, torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        completions = []
        for row, mask in zip(output, inputs["attention_mask"]):
            new_tokens = row[prompt_len:]
            n_new = int((new_tokens != self.tokenizer.pad_token_id).sum()) if self.tokenizer.pad_token_id is not None else len(new_tokens)
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            error = None
            if json_schema is not None:
                try:
                    json.loads(text)
                except json.JSONDecodeError as err:
                    truncated = n_new >= max_new_tokens
                    error = (f"output is not complete JSON after {max_new_tokens} new tokens (raise max_new_tokens)"
                             if truncated else f"output is not valid JSON ({err.msg} at char {err.pos})")
            completions.append(Completion(text if error is None else None, error, int(mask.sum()), n_new))
        return completions

    def _json_logits_processor(self, schema: dict[str, Any]) -> Any:
        """xgrammar constrains decoding so the output is valid JSON for `schema` by construction."""
        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor

        if self._grammar_compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
            self._grammar_compiler = xgr.GrammarCompiler(info)
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            # Compile the schema as given: property order is generation order (a `reason` before its `verdict`).
            self._grammars[key] = self._grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return LogitsProcessor(self._grammars[key])


class StopWhen:
    """A transformers stopping criterion: a row is finished once its decoded new text satisfies `predicate`
    (the batch goes on for the other rows; finished rows only get padding)."""

    def __init__(self, tokenizer: Any, prompt_len: int, predicate: Callable[[str], bool]):
        self.tokenizer, self.prompt_len, self.predicate = tokenizer, prompt_len, predicate

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([self.predicate(text) for text in texts], dtype=torch.bool, device=input_ids.device)


class OpenAIChatBackend:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint, called concurrently with retries."""

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 4,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        structured_output: bool = True,
        backoff_seconds: float = 0.5,
    ):
        import httpx

        self.model_name = model
        self.base_url = base_url.rstrip("/")
        self.batch_size = max_concurrency
        self.max_retries = max_retries
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.structured_output = structured_output
        self.backoff_seconds = backoff_seconds
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise BackendUnavailable(f"environment variable {api_key_env} (named by api_key_env) is not set.")
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency)

    def chat(
        self,
        conversations: list[list[Message]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        json_schema: dict[str, Any] | None = None,
        stop_when: Callable[[str], bool] | None = None,
    ) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature if temperature is None else temperature,
        }
        if json_schema is not None and self.structured_output:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": json_schema.get("title", "response"), "schema": json_schema}}
        futures = [self._pool.submit(self._request, {**body, "messages": c}) for c in conversations]
        return [f.result() for f in futures]

    def _request(self, body: dict[str, Any]) -> Completion:
        import httpx

        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                response = self._client.post("/chat/completions", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                last_error = f"cannot connect: {err}"
                continue
            except httpx.TimeoutException:
                last_error = f"timed out after {self._client.timeout.read}s"
                continue
            if response.status_code in self.RETRY_STATUS:
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:
                return Completion(None, f"HTTP {response.status_code}: {response.text[:500]}")
            data = response.json()
            usage = data.get("usage") or {}
            return Completion(
                data["choices"][0]["message"].get("content") or "", None,
                usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
            )
        if last_error.startswith("cannot connect"):
            raise BackendUnavailable(
                f"{self.base_url} stayed unreachable after {self.max_retries + 1} attempts ({last_error}). "
                "Start the server (e.g. `ragtune serve` or vLLM) or fix `base_url` in the config."
            )
        return Completion(None, f"failed after {self.max_retries + 1} attempts: {last_error}")
