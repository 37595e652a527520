"""What every LLM backend shares: messages, schemas, the `Completion` a conversation gets, the errors a call
raises, and the `ChatBackend` protocol the stages program against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

from ragtune.core.errors import UserFacingError

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
    cut, `ragtune.core.teacher.cut_sentences`)."""

    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    tokens: list[Token] | None = None
    logprobs: list[list[tuple[Token, float]]] | None = None
    # the text of a JSON reply cut at max_new_tokens (`error` says so): an extractive teacher reads its choice off it
    cut_json: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class BackendUnavailable(UserFacingError):
    """The endpoint stopped answering: stop the stage, keep what is saved. `done` holds the Completions of
    the failing `chat()` call that finished before (None where not), in conversation order."""

    def __init__(self, message: str, done: list[Completion | None] | None = None):
        super().__init__(message)
        self.done = done or []


class RowLost(Exception):
    """A row an endpoint lost without an HTTP answer (dropped connection, broken stream): one endpoint records it
    as the row's failure; a replica set sends it to another replica."""


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


def json_error(text: str, finish_reason: str | None, max_new_tokens: int) -> str | None:
    """Why `text` is not the JSON object a schema asked for, or None when it parses."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        if finish_reason == "length":
            return f"output is not complete JSON after {max_new_tokens} new tokens (raise max_new_tokens)"
        return f"output is not valid JSON ({err.msg} at char {err.pos})"
    return None
