"""The `openai` backend: any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, OpenAI, Azure) through
the official `openai` SDK, rows sent concurrently (`fan_out`), behind a circuit breaker."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx

from ragtune.core.llm.breaker import CircuitBreaker
from ragtune.core.llm.types import BackendUnavailable, Completion, Message, RowLost, Schema, Schemas, Token, json_error


def fan_out(pool: ThreadPoolExecutor, row: Callable[[list[Message], Schema | None], Completion],
            conversations: list[list[Message]], json_schema: Schemas | None) -> list[Completion]:
    """One `chat` call: `row(conversation, schema)` for every conversation on `pool`, the Completions in order.
    An endpoint that stops answering cancels the rows not started and raises BackendUnavailable carrying the rows
    finished before it."""
    schemas = json_schema if isinstance(json_schema, list) else [json_schema] * len(conversations)
    futures = [pool.submit(row, c, schema) for c, schema in zip(conversations, schemas)]
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
        token_ids_in_logprobs: bool = False,
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
        # vLLM's `return_tokens_as_token_ids`: log-prob tokens come as "token_id:123", not as text (other endpoints
        # reject the unknown parameter)
        self.token_ids_in_logprobs = token_ids_in_logprobs
        api_key = "unused"  # the SDK insists on a key; a local server without --api-key ignores it
        if api_key_env:
            api_key = os.environ.get(api_key_env) or ""
            if not api_key:
                raise BackendUnavailable(f"environment variable {api_key_env} (named by api_key_env) is not set.")
        # httpx's default pool holds 100 connections: more rows in flight than that would queue for one
        limits = httpx.Limits(max_connections=max_concurrency + 1, max_keepalive_connections=max_concurrency + 1)
        self.breaker = CircuitBreaker(httpx.HTTPTransport(limits=limits), max_consecutive_failures,
                                      f"{self.base_url}/models", min(self.PROBE_TIMEOUT, timeout))
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
        json_schema: Schemas | None = None,
        stop_when: Callable[[str], bool] | None = None,
        top_logprobs: int | None = None,
    ) -> list[Completion]:
        if not self._probed:
            self.probe()
        params = self.params(max_new_tokens, temperature, top_logprobs)
        return fan_out(self._pool, lambda c, schema: self._row(c, self._with_schema(params, schema), stop_when),
                       conversations, json_schema)

    def _row(self, messages: list[Message], params: dict[str, Any],
             stop_when: Callable[[str], bool] | None) -> Completion:
        """One row on this endpoint alone: a row it lost is that row's failure."""
        try:
            return self._request(messages, params, stop_when)
        except RowLost as err:
            return Completion(None, str(err))

    def params(self, max_new_tokens: int | None, temperature: float | None, top_logprobs: int | None) -> dict[str, Any]:
        """The request's sampling parameters, the role's defaults where the call gives none."""
        params: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature if temperature is None else temperature,
        }
        if top_logprobs:  # vLLM allows up to its --max-logprobs (20 by default); OpenAI up to 20
            params.update(logprobs=True, top_logprobs=top_logprobs)
            if self.token_ids_in_logprobs:
                params["extra_body"] = {"return_tokens_as_token_ids": True}
        return params

    def _with_schema(self, params: dict[str, Any], schema: Schema | None) -> dict[str, Any]:
        """`params` with `response_format` json_schema (vLLM's structured outputs), when the endpoint has them."""
        if schema is None or not self.structured_output:
            return params
        return {**params, "response_format": {"type": "json_schema", "json_schema": {
            "name": schema.get("title", "response"), "schema": schema}}}

    def _request(self, messages: list[Message], params: dict[str, Any],
                 stop_when: Callable[[str], bool] | None = None) -> Completion:
        """One row; a row the endpoint lost (no answer after retries, a broken stream) raises `RowLost`."""
        import openai

        try:
            if stop_when is not None and "response_format" not in params:  # a constrained answer is never streamed
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
            raise RowLost(f"no answer after retries: {self._cause(err)}") from None
        except httpx.HTTPError as err:  # a stream that broke after its headers
            raise RowLost(f"stream broken: {type(err).__name__}: {err}") from None
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
        token_logprobs: list[Any] = []
        finish, usage, chunks = None, None, 0
        with stream:
            for chunk in stream:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish = choice.finish_reason or finish
                if getattr(choice, "logprobs", None) is not None and choice.logprobs.content:
                    token_logprobs.extend(choice.logprobs.content)
                if choice.delta is not None and choice.delta.content:
                    parts.append(choice.delta.content)
                    chunks += 1
                    if finish is None and stop_when("".join(parts).strip()):
                        finish = "stop"
                        break
        text = "".join(parts).strip()
        prompt_tokens, completion_tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, chunks)
        return Completion(text, None, prompt_tokens, completion_tokens, "length" if finish == "length" else "stop",
                          *self._logprobs(token_logprobs if "logprobs" in params else None))

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
        logprobs = getattr(choice, "logprobs", None)
        content = (logprobs.content or []) if logprobs is not None else []
        return Completion(text if error is None else None, error, prompt_tokens or 0, completion_tokens or 0, finish,
                          *self._logprobs(content if "logprobs" in params else None),
                          cut_json=text if error is not None and finish == "length" else None)

    @staticmethod
    def _logprobs(content: list[Any] | None) -> tuple[list[Token] | None, list[list[tuple[Token, float]]] | None]:
        """`choices[0].logprobs.content` as (tokens, top-k per token); vLLM's "token_id:123" becomes the id 123."""
        if content is None:
            return None, None

        def token(text: str) -> Token:
            return int(text[9:]) if text.startswith("token_id:") and text[9:].isdigit() else text

        return ([token(c.token) for c in content],
                [[(token(t.token), round(t.logprob, 5)) for t in (c.top_logprobs or [])] for c in content])

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
