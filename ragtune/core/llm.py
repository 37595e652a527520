"""LLM backends for the teacher and judge roles (and `ragtune serve`), behind one small interface.

`hf` runs a transformers model in-process with batched, left-padded generation and the model's chat
template; `openai` talks to any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, OpenAI,
Azure) through the official `openai` SDK; `vllm` is `openai` against a vLLM server that ragtune starts
and stops itself (`ragtune.core.engine`), or against the user's own vLLM when `base_url` is set.
All return one `Completion` per conversation: a failed request is a Completion with `error` set, so
callers record failures instead of dropping samples; only an endpoint that stops answering raises
(`BackendUnavailable`), and it does so once, quickly, naming the URL.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import httpx

from ragtune.core.errors import UserFacingError
from ragtune.core.roles import LLMRole

log = logging.getLogger(__name__)

Message = dict[str, str]
FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One conversation's answer. `finish_reason` is "stop" (EOS or a stop condition), "length" (cut at
    max_new_tokens) or None for a failed request, as in the OpenAI API."""

    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class BackendUnavailable(UserFacingError):
    """The endpoint stopped answering: stop the stage, keep what is saved. `done` holds the Completions of
    the failing `chat()` call that finished before (None where not), in conversation order."""

    def __init__(self, message: str, done: list[Completion | None] | None = None):
        super().__init__(message)
        self.done = done or []


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


def make_backend(role: LLMRole, log_dir: str | Path | None = None) -> ChatBackend:
    """The backend a role asks for. `backend: vllm` without `base_url` starts (or reuses) the process-wide
    managed vLLM server for `role.model`, logging to `log_dir`; the caller ends it with
    `ragtune.core.engine.shutdown_all()` (it also ends at exit)."""
    if role.backend == "hf":
        return HFChatBackend(
            role.model, torch_dtype=role.torch_dtype, device_map=role.device_map, batch_size=role.batch_size,
            max_new_tokens=role.max_new_tokens, temperature=role.temperature,
            trust_remote_code=role.trust_remote_code,
        )
    if role.backend == "vllm" and not role.base_url:
        from ragtune.core.engine import get_server

        server = get_server(role.model, log_dir=log_dir, dtype=role.torch_dtype, max_model_len=role.max_model_len,
                            trust_remote_code=role.trust_remote_code)
        return openai_backend(role, model=server.served_model_name, base_url=server.base_url,
                              unavailable_hint=server.describe_failure)
    return openai_backend(role)


def openai_backend(role: LLMRole, *, model: str | None = None, base_url: str | None = None,
                   unavailable_hint: Callable[[], str] | None = None) -> OpenAIChatBackend:
    """An OpenAIChatBackend with the role's client settings; `model`/`base_url` override the role's."""
    return OpenAIChatBackend(
        model=model or role.model, base_url=base_url or role.base_url or "https://api.openai.com/v1",
        api_key_env=role.api_key_env, api_version=role.api_version, max_concurrency=role.max_concurrency,
        timeout=role.timeout, max_retries=role.max_retries, max_consecutive_failures=role.max_consecutive_failures,
        max_new_tokens=role.max_new_tokens, temperature=role.temperature,
        structured_output=role.structured_output, unavailable_hint=unavailable_hint,
    )


def json_error(text: str, finish_reason: str | None, max_new_tokens: int) -> str | None:
    """Why `text` is not the JSON object a schema asked for, or None when it parses."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        if finish_reason == "length":
            return f"output is not complete JSON after {max_new_tokens} new tokens (raise max_new_tokens)"
        return f"output is not valid JSON ({err.msg} at char {err.pos})"
    return None


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
        from ragtune.core.models import load_causal_lm, load_tokenizer

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
        self.eos_token_ids = self._eos_token_ids()
        self._lock = threading.Lock()
        self._grammar_compiler: Any = None
        self._grammars: dict[str, Any] = {}

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def _eos_token_ids(self) -> set[int]:
        """Every token that ends generation: the generation config's EOS (an int or a list) and the tokenizer's."""
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

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
        return [self._completion(row[prompt_len:], int(mask.sum()), max_new_tokens, json_schema, stop_when)
                for row, mask in zip(output, inputs["attention_mask"])]

    def _completion(self, new_tokens: Any, prompt_tokens: int, max_new_tokens: int,
                    json_schema: dict[str, Any] | None, stop_when: Callable[[str], bool] | None) -> Completion:
        """A row of generate()'s output as a Completion. A row that ended early holds EOS or met `stop_when`
        (generation then pads it); one that did neither ran into max_new_tokens."""
        tokens = new_tokens.tolist()
        pad = self.tokenizer.pad_token_id
        n_new = sum(t != pad for t in tokens) if pad is not None else len(tokens)
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        stopped = any(t in self.eos_token_ids for t in tokens) or (stop_when is not None and stop_when(text))
        finish_reason: FinishReason = "stop" if stopped else "length"
        error = json_error(text, finish_reason, max_new_tokens) if json_schema is not None else None
        return Completion(text if error is None else None, error, prompt_tokens, n_new, finish_reason)

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


def _circuit_open_error() -> type[Exception]:
    """An `openai.APIConnectionError` subclass: the SDK re-raises its own errors from a transport at once
    instead of retrying them, so an open circuit ends a request without the SDK's backoff."""
    import openai

    class CircuitOpen(openai.APIConnectionError):
        pass

    return CircuitOpen


class CircuitBreaker(httpx.BaseTransport):
    """An httpx transport that counts consecutive attempts without any HTTP answer (timeouts, refused or
    dropped connections) across all threads; at `threshold` it opens and every later attempt fails at once.
    It sits below the SDK's retries, so a hung endpoint costs about one timeout, not timeout x retries per row.
    Before opening on read timeouts it asks `probe_url` once: a server that answers that is alive but slow,
    so its rows keep failing as timeouts (raise `timeout`) instead of the stage stopping. Any HTTP response
    (an error status included) resets the count."""

    def __init__(self, inner: httpx.BaseTransport, threshold: int, probe_url: str, probe_timeout: float):
        self.inner, self.threshold = inner, threshold
        self.probe_url, self.probe_timeout = probe_url, probe_timeout
        self.failures, self.opened, self.last_error = 0, False, ""
        self.attempts = 0  # requests passed to the network, the SDK's retries included
        self._lock = threading.Lock()
        self._open_error = _circuit_open_error()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.opened:
            raise self._open_error(message=f"circuit open: {self.last_error}", request=request)
        with self._lock:
            self.attempts += 1
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError as err:
            with self._lock:
                self.failures += 1
                self.last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                if self.failures >= self.threshold and not self.opened:
                    self.opened = not (isinstance(err, httpx.ReadTimeout) and self._answers(request))
                    self.failures = self.failures if self.opened else 0
            if self.opened:
                raise self._open_error(message=f"circuit open: {self.last_error}", request=request) from err
            raise
        with self._lock:
            self.failures = 0
        return response

    def _answers(self, like: httpx.Request) -> bool:
        """Whether GET probe_url gets any HTTP response within probe_timeout (same auth headers as `like`)."""
        headers = {k: v for k, v in like.headers.items() if k.lower() in ("authorization", "api-key")}
        probe = httpx.Request("GET", self.probe_url, headers=headers,
                              extensions={"timeout": httpx.Timeout(self.probe_timeout).as_dict()})
        try:
            self.inner.handle_request(probe).close()
        except httpx.TransportError:
            return False
        return True

    def close(self) -> None:
        self.inner.close()


class OpenAIChatBackend:
    """Any OpenAI-compatible `/chat/completions` endpoint through the `openai` SDK, called concurrently.

    The SDK retries 408/409/429/5xx, timeouts and connection errors with exponential backoff and honours
    `Retry-After` (up to two minutes). Per row, an HTTP error or a malformed body becomes a Completion with
    `error`; `max_consecutive_failures` attempts in a row without any answer raise BackendUnavailable.
    """

    PROBE_TIMEOUT = 10.0  # seconds for GET /models: a live server lists its models in milliseconds

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        api_key_env: str | None = None,
        api_version: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 4,
        max_consecutive_failures: int = 3,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        structured_output: bool = True,
        unavailable_hint: Callable[[], str] | None = None,
    ):
        import openai

        self.model_name = model
        self.base_url = base_url.rstrip("/")
        self.batch_size = max_concurrency
        self.timeout = timeout
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.structured_output = structured_output
        self.unavailable_hint = unavailable_hint
        api_key = "unused"  # the SDK insists on a key; a local server without --api-key ignores it
        if api_key_env:
            api_key = os.environ.get(api_key_env) or ""
            if not api_key:
                raise BackendUnavailable(f"environment variable {api_key_env} (named by api_key_env) is not set.")
        self.breaker = CircuitBreaker(httpx.HTTPTransport(), max_consecutive_failures, f"{self.base_url}/models",
                                      min(self.PROBE_TIMEOUT, timeout))
        common = {"api_key": api_key, "max_retries": max_retries,
                  "http_client": openai.DefaultHttpxClient(transport=self.breaker),
                  # connect: a listening server accepts in milliseconds; 10 s covers a slow TLS handshake
                  "timeout": httpx.Timeout(timeout, connect=min(timeout, 10.0))}
        if api_version:
            self.client: Any = openai.AzureOpenAI(azure_endpoint=self.base_url, api_version=api_version, **common)
        else:
            self.client = openai.OpenAI(base_url=self.base_url, **common)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency)
        self._probed = False

    def probe(self, timeout: float | None = None) -> None:
        """GET /models with a short timeout: an endpoint that gives no HTTP answer raises BackendUnavailable
        before a stage starts (any answer counts, even 401 or 404: the server is there)."""
        import openai

        limit = timeout or min(self.PROBE_TIMEOUT, self.timeout)
        try:
            self.client.with_options(timeout=limit).models.list()
        except openai.APIStatusError:
            pass
        except openai.APIConnectionError as err:
            raise self._unavailable(err, limit) from None
        self._probed = True

    def chat(
        self,
        conversations: list[list[Message]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        json_schema: dict[str, Any] | None = None,
        stop_when: Callable[[str], bool] | None = None,
    ) -> list[Completion]:
        if not self._probed:
            self.probe()
        params: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature if temperature is None else temperature,
        }
        if json_schema is not None and self.structured_output:
            params["response_format"] = {"type": "json_schema", "json_schema": {
                "name": json_schema.get("title", "response"), "schema": json_schema}}
        streamed = stop_when if "response_format" not in params else None
        futures = [self._pool.submit(self._request, c, params, streamed) for c in conversations]
        done: list[Completion | None] = []
        failure: BackendUnavailable | None = None
        for future in futures:
            try:
                done.append(future.result())
            except BackendUnavailable as err:
                failure = failure or err
                done.append(None)
                for pending in futures:
                    pending.cancel()
            except Exception as err:  # noqa: BLE001 - includes CancelledError of a row we cancelled
                done.append(None if failure else Completion(None, f"{type(err).__name__}: {err}"))
        if failure is not None:
            raise BackendUnavailable(str(failure), done)
        return [c for c in done if c is not None]

    def _request(self, messages: list[Message], params: dict[str, Any],
                 stop_when: Callable[[str], bool] | None = None) -> Completion:
        import openai

        try:
            if stop_when is not None:
                return self._streamed(messages, params, stop_when)
            response = self.client.chat.completions.create(messages=messages, **params)
        except openai.APIStatusError as err:
            return Completion(None, f"HTTP {err.status_code}: {err.response.text[:500]}")
        except openai.APIConnectionError as err:
            if self.breaker.opened:
                raise self._unavailable(err, self.timeout) from None
            if isinstance(err, openai.APITimeoutError):
                return Completion(None, f"timed out after {self.timeout:g}s on every retry ({self._cause(err)}; the "
                                        "server answers /models: it is slow; raise `timeout`)")
            return Completion(None, f"no answer after retries: {self._cause(err)}")
        except httpx.HTTPError as err:  # a stream that broke after its headers: this row's failure
            return Completion(None, f"stream broken: {type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - a body the SDK cannot parse is this row's failure
            return Completion(None, f"malformed response: {type(err).__name__}: {err}")
        return self._completion(response, params)

    def _streamed(self, messages: list[Message], params: dict[str, Any], stop_when: Callable[[str], bool]) -> Completion:
        """Stream the answer and hang up once `stop_when(text)` holds, as the hf backend's stopping criterion
        does: vLLM aborts a request whose client left, so a loop costs the tokens up to its detection, not
        max_tokens. Without the closing usage chunk, completion tokens are counted as streamed chunks."""
        stream = self.client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **params)
        parts: list[str] = []
        finish, usage, chunks = None, None, 0
        with stream:
            for chunk in stream:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish = choice.finish_reason or finish
                if choice.delta is not None and choice.delta.content:
                    parts.append(choice.delta.content)
                    chunks += 1
                    if finish is None and stop_when("".join(parts).strip()):
                        finish = "stop"
                        break
        text = "".join(parts).strip()
        prompt_tokens, completion_tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, chunks)
        return Completion(text, None, prompt_tokens, completion_tokens, "length" if finish == "length" else "stop")

    def _completion(self, response: Any, params: dict[str, Any]) -> Completion:
        """The first choice as a Completion; a body without one is recorded as malformed, never raised."""
        try:
            choice = response.choices[0]
            # stripped like the hf backend's text, so both backends give the same string for the same tokens
            text, finish_reason = (choice.message.content or "").strip(), choice.finish_reason
            usage = response.usage
            prompt_tokens, completion_tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        except (AttributeError, IndexError, KeyError, TypeError) as err:
            return Completion(None, f"malformed response ({type(err).__name__}: {err}): {str(response)[:200]}")
        finish = finish_reason if finish_reason in ("stop", "length") else "stop"
        error = json_error(text, finish, params["max_tokens"]) if "response_format" in params else None
        return Completion(text if error is None else None, error, prompt_tokens or 0, completion_tokens or 0, finish)

    @staticmethod
    def _cause(err: BaseException) -> str:
        cause = err.__cause__ or err
        return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__

    def _unavailable(self, err: BaseException, timeout: float) -> BackendUnavailable:
        last = self.breaker.last_error or self._cause(err)
        hint = self.unavailable_hint() if self.unavailable_hint else ""
        return BackendUnavailable(
            f"{self.base_url} is not answering ({last}; timeout {timeout:g} s, "
            f"{self.breaker.failures} attempts in a row without a response). Rows finished so far are saved: "
            f"start or fix the server (or `base_url`), then rerun to continue.{(' ' + hint) if hint else ''}"
        )
