"""The `hf` backend: a transformers model in-process, batched with left padding and the model's chat template.
Its `grammar` and `eos_token_ids` are also `ragtune serve`'s: one rule for both."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from typing import Any, Callable

from ragtune.core.llm.types import Completion, FinishReason, Message, Schema, Schemas, json_error, schema_rows

log = logging.getLogger(__name__)


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
        self.count_work(results)
        return results

    def count_work(self, results: list[Completion]) -> None:
        """This call's prompt and generated tokens, for the stage's roofline (`ragtune.core.roofline`)."""
        from ragtune.core import roofline

        done = [c for c in results if c.error is None]
        if done:
            dtype = str(self.model.dtype).removeprefix("torch.")
            roofline.count_generation(self.model.config, self.model_name, cached_tokens=0, requests=len(done),
                                      prompt_tokens=sum(c.prompt_tokens for c in done),
                                      generated_tokens=sum(c.completion_tokens for c in done), dtype=dtype,
                                      device=self.device.type, where=f"transformers {self.device.type} {dtype}")

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
        return Completion(text if error is None else None, error, prompt_tokens, n_new, finish_reason,
                          cut_json=text if error is not None and finish_reason == "length" else None)

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
