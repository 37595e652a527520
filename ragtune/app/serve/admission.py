"""What a request may ask and what it becomes: OpenAI's request body checked (roles, content, sampling fields,
max_tokens within the context, the prompt's length before it is tokenized) and turned into a scheduler `Job`."""

import threading
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ragtune.app.serve.scheduler import Job

if TYPE_CHECKING:
    from ragtune.core.llm import HFChatBackend

ROLES = ("system", "user", "assistant")


def context_length(model: Any, tokenizer: Any) -> int | None:
    """The model's context in tokens (positions it was built for), or None when neither config nor tokenizer
    says."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None and 0 < getattr(tokenizer, "model_max_length", 0) < 10**7:
        limit = tokenizer.model_max_length
    return limit


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that ragtune serve honours."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's range; absent or null: greedy
    top_p: float | None = Field(None, ge=0, le=1)  # OpenAI's range; applies when temperature > 0
    n: int | None = None
    response_format: dict[str, Any] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int | None) -> int | None:
        """OpenAI's n asks for several answers; answering one of them with 200 would hide that."""
        if n not in (None, 1):
            raise PydanticCustomError("one_choice", "ragtune serve returns one choice per request: n must be 1")
        return n


class BadRequest(Exception):
    """A request the server will not run: answered 400 with this message, naming the field in `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def chat_messages(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template takes them; unknown roles and missing or non-text content are a 400
    (OpenAI allows null content only beside tool calls, which this server does not take)."""
    if not raw:
        raise BadRequest("messages must be a non-empty list.", param="messages")
    messages = []
    for i, message in enumerate(raw):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not supported; use one of {', '.join(ROLES)}.",
                             param=f"messages[{i}].role")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise BadRequest(f"messages[{i}].content: only parts of type 'text' with a string `text` are "
                                 "supported.", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            raise BadRequest(f"messages[{i}].content is null or missing: a {role} message needs a string or a list "
                             "of text parts.", param=f"messages[{i}].content")
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts.",
                             param=f"messages[{i}].content")
        messages.append({"role": role, "content": content})
    return messages


def token_budget(requested: int | None, prompt_tokens: int, context: int | None, default: int,
                 field: str = "max_tokens") -> int:
    """max_tokens as the request asked (≥ 1, within the context with the prompt), else the default cut to fit."""
    if requested is not None and requested < 1:
        raise BadRequest(f"{field} must be at least 1, got {requested}.", param=field)
    if context is None:
        return requested or default
    room = context - prompt_tokens
    if requested is None:
        if room < 1:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens and the model's context is {context}: "
                             "shorten the messages.", param="messages")
        return min(default, room)
    if requested > room:
        raise BadRequest(f"This model's maximum context length is {context} tokens. However, you requested "
                         f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the "
                         f"completion). Set {field} to at most {max(room, 0)} or shorten the messages.", param=field)
    return requested


def longest_token(tokenizer: Any) -> int:
    """The most characters of text one token can stand for: its vocabulary's longest entry. Byte-level BPE spells
    each byte as one character and SentencePiece a space as '▁', so an entry is never shorter than its text
    (SmolLM2's longest is 81 characters, a newline and 80 spaces)."""
    return max(len(entry) for entry in tokenizer.get_vocab())


def _matcher(backend: "HFChatBackend", response_format: dict[str, Any] | None) -> Any:
    """A request's own xgrammar matcher over the backend's compiled (cached) grammar, or None without JSON."""
    kind = (response_format or {}).get("type")
    if kind not in ("json_schema", "json_object"):
        return None
    import xgrammar as xgr

    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    try:
        return xgr.GrammarMatcher(backend.grammar(schema))
    except Exception as err:
        raise BadRequest(f"response_format.json_schema.schema cannot be compiled: {err}") from None


class Admission:
    """Turns a request body into a job, or a BadRequest: roles, content, prompt length, max_tokens, schema."""

    def __init__(self, backend: "HFChatBackend", tokenizer_lock: threading.Lock, default_max_tokens: int):
        self.tokenizer, self.tokenizer_lock = backend.tokenizer, tokenizer_lock
        self.context = context_length(backend.model, backend.tokenizer)
        self.chars_per_token = longest_token(backend.tokenizer)
        self.default_max_tokens = default_max_tokens
        self.backend = backend

    def check_length(self, text: str, what: str = "the prompt") -> None:
        """Refuse text that cannot fit the context from its length alone, so nobody tokenizes megabytes to count
        them: it is at least len/chars_per_token tokens."""
        if self.context is None:
            return
        at_least = -(-len(text) // self.chars_per_token)
        if at_least >= self.context:  # not even one token would be left for the answer
            raise BadRequest(f"{what} is {len(text)} characters, at least {at_least} tokens (one token of this model "
                             f"is at most {self.chars_per_token} characters), and the model's context is "
                             f"{self.context} tokens: shorten the messages.", param="messages")

    def job(self, body: ChatRequest, messages: list[dict[str, str]]) -> Job:
        """Tokenizes (up to seconds for a long prompt): the handler runs it in a worker thread."""
        with self.tokenizer_lock:
            try:
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # the template's own rules, e.g. "roles must alternate"
                raise BadRequest(f"the model's chat template rejected the messages: {err}", param="messages") from None
            self.check_length(prompt)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = token_budget(getattr(body, field), len(prompt_ids), self.context, self.default_max_tokens, field)
        temperature = body.temperature if body.temperature is not None else 0.0
        return Job(prompt_ids, max_tokens, temperature, _matcher(self.backend, body.response_format), top_p=body.top_p)
