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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import httpx

from ragtune.core.errors import UserFacingError
from ragtune.core.gpu_plan import ServerPlan
from ragtune.core.roles import LLMRole

log = logging.getLogger(__name__)

Message = dict[str, str]
FinishReason = Literal["stop", "length"]
# A generated token: its id (hf; vLLM with `return_tokens_as_token_ids`) or its text (other endpoints).
Token = int | str
# A JSON schema for every conversation of a `chat` call, or a list of them, one per conversation (prep's extractive
# teacher chooses among each question's own context sentences).
Schema = dict[str, Any]
Schemas = Schema | list[Schema]


def schema_rows(schema: Schemas | None, start: int, stop: int) -> Schemas | None:
    """The schema(s) of conversations `start:stop`: a per-conversation list is sliced, one schema stands for all."""
    return schema[start:stop] if isinstance(schema, list) else schema


@dataclass
class Completion:
    """One conversation's answer. `finish_reason` is "stop" (EOS or a stop condition), "length" (cut at
    max_new_tokens) or None for a failed request, as in the OpenAI API. With `chat(top_logprobs=k)`, `tokens` are
    the generated tokens and `logprobs[i]` the k most likely tokens at token i with their log-probabilities, best
    first (the teacher's distribution for soft-label distillation); `text` may end before `tokens` do (a sentence
    cut, `ragtune.core.rag.cut_sentences`)."""

    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    tokens: list[Token] | None = None
    logprobs: list[list[tuple[Token, float]]] | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class TokenizerMismatch(UserFacingError, ValueError):
    """Teacher and student do not share a tokenizer, so the teacher's token log-probabilities mean nothing to the
    student (soft-label distillation)."""


def check_same_tokenizer(teacher: str, student: str, trust_remote_code: bool = False) -> None:
    """Raise TokenizerMismatch unless `teacher` and `student` (model ids, paths or ragtune aliases) have the same
    vocabulary: every token string maps to the same id, added tokens included."""
    from ragtune.core.models import load_tokenizer

    try:
        teacher_vocab = load_tokenizer(teacher, trust_remote_code).get_vocab()
    except Exception as err:  # noqa: BLE001 - any load failure means "cannot check"
        raise TokenizerMismatch(
            f"soft-label distillation needs the teacher's tokenizer to check it is the student's, and the tokenizer "
            f"of {teacher!r} does not load ({type(err).__name__}: {err}). Set train.distillation.teacher_tokenizer "
            "to the teacher's Hugging Face id or folder (an endpoint's served name is not one).") from None
    student_vocab = load_tokenizer(student, trust_remote_code).get_vocab()
    if teacher_vocab == student_vocab:
        return
    differ = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])[:3]
    raise TokenizerMismatch(
        f"the teacher {teacher!r} and the student {student!r} do not share a tokenizer ({len(teacher_vocab)} vs "
        f"{len(student_vocab)} tokens; e.g. {', '.join(f'{t!r}={i}' for t, i in differ)} is in one only): the "
        "teacher's token log-probabilities cannot teach this student. Use a teacher of the student's family (e.g. "
        "a larger model of the same series), or remove train.distillation and train on the teacher's text alone.")


class BackendUnavailable(UserFacingError):
    """The endpoint stopped answering: stop the stage, keep what is saved. `done` holds the Completions of
    the failing `chat()` call that finished before (None where not), in conversation order."""

    def __init__(self, message: str, done: list[Completion | None] | None = None):
        super().__init__(message)
        self.done = done or []


class RowLost(Exception):
    """A row an endpoint lost without an HTTP answer (dropped connection, broken stream): one endpoint records it
    as the row's failure; a replica set sends it to another replica."""


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


class ChatBackend(Protocol):
    model_name: str
    batch_size: int

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
        """One Completion per conversation; `json_schema` constrains every answer (one schema) or each its own
        (a list, one per conversation). `stop_when(text_so_far)` lets a backend end a conversation early
        once the caller has what it needs; a caller must parse the full text the same way (hf honours it,
        an endpoint cannot and generates until its own stop). `top_logprobs=k` fills `Completion.tokens` and
        `Completion.logprobs`."""
        ...


def make_backend(role: LLMRole, log_dir: str | Path | None = None, server: ServerPlan | None = None) -> ChatBackend:
    """The backend a role asks for. `backend: vllm` without `base_url` starts (or reuses) the process-wide
    managed vLLM server for `role.model`, logging to `log_dir`, placed as `server` says (the run's GPU plan:
    `gpu_plan(config).teacher`; None: the role's own settings on this machine's default device); the caller ends it
    with `ragtune.core.engine.shutdown_all()` (it also ends at exit)."""
    if role.backend == "hf":
        return HFChatBackend(
            role.model, torch_dtype=role.torch_dtype, device_map=role.device_map, batch_size=role.batch_size,
            max_new_tokens=role.max_new_tokens, temperature=role.temperature,
            trust_remote_code=role.trust_remote_code,
        )
    if role.backend == "vllm" and not role.base_url:
        from ragtune.core.engine import get_server

        place = server or ServerPlan(gpus=(), dtype=role.torch_dtype, engine_args=role.engine_args)
        return ManagedServerBackend(
            lambda: get_server(role.model, log_dir=log_dir, dtype=place.dtype, engine_args=place.engine_args,
                               gpus=place.gpus, trust_remote_code=role.trust_remote_code), role)
    if len(role.base_urls) > 1:
        return ReplicaBackend([openai_backend(role, base_url=url) for url in role.base_urls])
    return openai_backend(role)


class ManagedServerBackend:
    """An `OpenAIChatBackend` on ragtune's managed vLLM server for one model. One managed server runs at a time,
    so another model's (a judge between teacher batches) may have replaced this one since the last call: the
    next call starts it again. A server that died is not restarted here: its calls fail with the reason.
    `served` is the model name requested (a LoRA adapter's), by default the server's own model."""

    def __init__(self, start: Callable[[], Any], role: LLMRole, served: str | None = None):
        self._start, self._role, self._served = start, role, served
        self._server = start()
        self._backend = self._connect()

    def _connect(self) -> "OpenAIChatBackend":
        return openai_backend(self._role, model=self._served or self._server.served_model_name,
                              base_url=self._server.base_url, unavailable_hint=self._server.describe_failure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def chat(self, conversations: list[list[Message]], **kwargs: Any) -> list[Completion]:
        if self._server.handed_over:
            self._server = self._start()
            self._backend = self._connect()
        return self._backend.chat(conversations, **kwargs)


class ReplicaBackend:
    """One role on several OpenAI-compatible endpoints that serve the same model (`base_url` as a list: vLLM
    servers started alike, with no router in front). Each row goes to the live replica with the fewest rows in
    flight, each holding up to the role's `max_concurrency`, so every endpoint stays busy. A replica that loses a
    row and then does not answer `/models` is left out for the rest of this backend's life (a rerun tries it again)
    and the row goes to another one: rows come back in order, each answered once. Only with every replica out does
    a call raise BackendUnavailable, as one endpoint does."""

    def __init__(self, replicas: list[OpenAIChatBackend]):
        self.replicas = replicas
        self.model_name = replicas[0].model_name
        self.base_url = ", ".join(r.base_url for r in replicas)
        self.batch_size = sum(r.batch_size for r in replicas)
        self.in_flight = [0] * len(replicas)
        self.answered = [0] * len(replicas)  # rows each replica answered: how the work was spread
        self.left_out: dict[int, str] = {}  # replica index -> why
        self._free = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=self.batch_size)
        self._probed = False

    def probe(self, timeout: float | None = None) -> None:
        """Every replica's GET /models; those that give no answer are left out, and with none left this raises."""
        for index, replica in enumerate(self.replicas):
            try:
                replica.probe(timeout)
            except BackendUnavailable as err:
                self._leave_out(index, str(err))
        self._probed = True
        if len(self.left_out) == len(self.replicas):
            raise self._none_left()

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
        params = self.replicas[0].params(max_new_tokens, temperature, top_logprobs)
        return fan_out(self._pool, lambda c, schema: self._row(c, params, schema, stop_when), conversations,
                       json_schema)

    def _row(self, messages: list[Message], params: dict[str, Any], schema: Schema | None,
             stop_when: Callable[[str], bool] | None) -> Completion:
        lost = ""
        for _ in range(2 * len(self.replicas)):  # a row every replica loses while answering /models is failed
            index = self._take()
            replica = self.replicas[index]
            try:
                completion = replica._request(messages, replica._with_schema(params, schema), stop_when)
            except (RowLost, BackendUnavailable) as err:
                lost = str(err)
                if isinstance(err, BackendUnavailable) or not self._answers(replica):
                    self._leave_out(index, lost)
                continue
            finally:
                self._give_back(index)
            with self._free:
                self.answered[index] += 1
            return completion
        return Completion(None, f"no answer after retries on every replica: {lost}")

    def _take(self) -> int:
        """A slot on the live replica with the fewest rows in flight (waiting while all are full)."""
        with self._free:
            while True:
                live = [i for i in range(len(self.replicas)) if i not in self.left_out]
                if not live:
                    raise self._none_left()
                open_ = [i for i in live if self.in_flight[i] < self.replicas[i].batch_size]
                if open_:
                    index = min(open_, key=lambda i: self.in_flight[i])
                    self.in_flight[index] += 1
                    return index
                self._free.wait()

    def _give_back(self, index: int) -> None:
        with self._free:
            self.in_flight[index] -= 1
            self._free.notify_all()

    @staticmethod
    def _answers(replica: OpenAIChatBackend) -> bool:
        try:
            replica.probe()
        except BackendUnavailable:
            return False
        return True

    def _leave_out(self, index: int, why: str) -> None:
        with self._free:
            if index not in self.left_out:
                self.left_out[index] = why
                log.warning("replica %s left out: %s", self.replicas[index].base_url, why.splitlines()[0][:300])
            self._free.notify_all()

    def _none_left(self) -> BackendUnavailable:
        reasons = "; ".join(f"{self.replicas[i].base_url}: {why.split('. ')[0]}" for i, why in self.left_out.items())
        return BackendUnavailable(f"no replica of {self.model_name} is answering ({reasons}). Rows finished so far "
                                  "are saved: start or fix the servers (or `base_url`), then rerun to continue.")


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
        from ragtune.core.models import inference_device_map, load_causal_lm, load_tokenizer

        self.model_name = model_name or (f"{model}+{adapter}" if adapter else model)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        # the base model's tokenizer: a PEFT adapter folder has no config.json, so resolve_model rejects it
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.model = load_causal_lm(model, dtype=torch_dtype, device_map=inference_device_map(device_map),
                                    trust_remote_code=trust_remote_code)
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

    def _eos_token_ids(self) -> tuple[int, ...]:
        """Every token that ends generation, the one rule for this backend and `ragtune serve`: the generation
        config's EOS (an int or a list), then the tokenizer's."""
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [*(configured if isinstance(configured, (list, tuple)) else [configured]), self.tokenizer.eos_token_id]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

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
        results: list[Completion] = []
        start = 0
        while start < len(conversations):  # batch_size may shrink on the way (out of memory)
            batch = conversations[start : start + self.batch_size]
            schema = schema_rows(json_schema, start, start + len(batch))
            start += len(batch)
            try:
                results.extend(self._generate_fitting(batch, max_new_tokens or self.max_new_tokens,
                                                      self.temperature if temperature is None else temperature,
                                                      schema, stop_when, top_logprobs))
            except Exception as err:  # a failed batch is recorded per conversation, never dropped
                log.warning("generation failed for %d conversations: %s", len(batch), err)
                results.extend(Completion(None, f"{type(err).__name__}: {err}") for _ in batch)
        return results

    def _generate_fitting(self, batch: list[list[Message]], max_new_tokens: int, temperature: float,
                          json_schema: Schemas | None, *args: Any) -> list[Completion]:
        """`_generate`, halving the batch on an out-of-memory error until it fits (one conversation that does not
        fit alone is the error); later batches start at the size that fitted."""
        import torch

        try:
            return self._generate(batch, max_new_tokens, temperature, json_schema, *args)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = (len(batch) + 1) // 2
            self.batch_size = min(self.batch_size, half)
            log.warning("out of memory at batch %d: retrying as %d + %d (batch_size now %d)", len(batch), half,
                        len(batch) - half, self.batch_size)
            return (self._generate_fitting(batch[:half], max_new_tokens, temperature,
                                           schema_rows(json_schema, 0, half), *args)
                    + self._generate_fitting(batch[half:], max_new_tokens, temperature,
                                             schema_rows(json_schema, half, len(batch)), *args))

    def _generate(self, batch: list[list[Message]], max_new_tokens: int, temperature: float,
                  json_schema: Schemas | None, stop_when: Callable[[str], bool] | None = None,
                  top_logprobs: int | None = None) -> list[Completion]:
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
        if top_logprobs:
            # the model's own logits, before sampling's temperature or any processor reshapes them
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        with self._lock, torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
            top = self._top_logprobs(output.logits, top_logprobs) if top_logprobs else None
        sequences = output.sequences if top_logprobs else output
        prompt_len = inputs["input_ids"].shape[1]
        completions = [self._completion(row[prompt_len:], int(mask.sum()), max_new_tokens, json_schema, stop_when)
                       for row, mask in zip(sequences, inputs["attention_mask"])]
        if top is None:
            return completions
        return [self._with_logprobs(c, row[prompt_len:].tolist(), [step[b] for step in top])
                for b, (c, row) in enumerate(zip(completions, sequences))]

    @staticmethod
    def _top_logprobs(logits: tuple[Any, ...], k: int) -> list[list[list[tuple[int, float]]]]:
        """Per generation step, per row: the k most likely tokens and their log-probabilities (full softmax)."""
        steps = []
        for step_logits in logits:
            values, ids = step_logits.float().log_softmax(-1).topk(k, dim=-1)
            steps.append([list(zip(row_ids, row_values)) for row_ids, row_values
                          in zip(ids.tolist(), [[round(v, 5) for v in row] for row in values.tolist()])])
        return steps

    def _with_logprobs(self, completion: Completion, tokens: list[int],
                       top: list[list[tuple[int, float]]]) -> Completion:
        """The row's generated tokens up to and including its first EOS (later ones are padding) with their top-k."""
        end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_token_ids), len(tokens))
        pad = self.tokenizer.pad_token_id
        while end > 0 and tokens[end - 1] == pad and pad not in self.eos_token_ids:
            end -= 1
        return replace(completion, tokens=tokens[:end], logprobs=top[:end])

    def _completion(self, new_tokens: Any, prompt_tokens: int, max_new_tokens: int,
                    json_schema: Schemas | None, stop_when: Callable[[str], bool] | None) -> Completion:
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

    def _json_logits_processor(self, schema: Schemas) -> Any:
        """xgrammar constrains decoding so the output is valid JSON for `schema` (or each row's) by construction."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor([self.grammar(s) for s in schema] if isinstance(schema, list) else self.grammar(schema))

    def grammar(self, schema: Schema | None) -> Any:
        """The compiled xgrammar grammar of one schema (None: any JSON object), cached for this backend and
        `ragtune serve`: a judge sends the same few schemas thousands of times."""
        import xgrammar as xgr

        if self._grammar_compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
            self._grammar_compiler = xgr.GrammarCompiler(info)
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            # Compile the schema as given: property order is generation order (a `reason` before its `verdict`).
            self._grammars[key] = (self._grammar_compiler.compile_builtin_json_grammar() if schema is None else
                                   self._grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
        return self._grammars[key]


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
                          *self._logprobs(content if "logprobs" in params else None))

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
