"""The model roles every stage relies on (teacher, judge, student, embedding), and the config error type.

Stage sections are owned by their stage (`ragtune.data_prep.config`, …); `ragtune.app.config` composes them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ragtune.core.errors import UserFacingError


class ConfigError(UserFacingError, ValueError):
    """A config problem, phrased for the user: where it is and what to do."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# vLLM engine arguments ragtune sets on a managed server itself, and the key that says each instead
OWNED_ENGINE_ARGS = {
    "model": "the role's `model`", "model_tag": "the role's `model`", "served_model_name": "the role's `model`",
    "dtype": "the role's `torch_dtype`", "trust_remote_code": "the role's `trust_remote_code`",
    "host": "ragtune (127.0.0.1)", "port": "ragtune (a free port)", "api_key": "ragtune (a local server)",
    "enable_lora": "eval (its adapters)", "lora_modules": "eval (its adapters)",
}


def refuse_owned_engine_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """`engine_args` by vLLM's own (EngineArgs) names; those ragtune sets itself are refused, naming their key.
    The names themselves are checked against the installed vLLM's parser before a server starts
    (`engine.check_engine_args`), which costs seconds of importing vLLM, so not here."""
    for name in engine_args:
        if name in OWNED_ENGINE_ARGS:
            raise ValueError(f"`{name}` is set by {OWNED_ENGINE_ARGS[name]}, not by engine_args")
    return engine_args


class LLMRole(Strict):
    """A teacher or judge: `hf` runs the model in-process, `openai` calls any OpenAI-compatible endpoint,
    `vllm` calls a vLLM server: ragtune's own managed one for `model`, or the user's at `base_url`."""

    backend: Literal["hf", "openai", "vllm"] = "hf"
    model: str
    # hf backend (torch_dtype is also the managed vLLM server's --dtype; its `auto` on CPU is the faster of fp32 and
    # bf16 as ragtune's precision probe measures this machine: engine.cpu_dtype; left unset, a server on GPUs
    # gets vLLM's `auto`, the checkpoint's dtype, not float32)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device_map: str | None = None
    trust_remote_code: bool = False
    batch_size: int = Field(8, ge=1)
    # openai and vllm backends
    # one endpoint, or a list of replicas serving the same model (data-parallel vLLM servers without a router):
    # rows are spread over the live ones and a replica that stops answering is left out (llm.ReplicaBackend);
    # `max_concurrency` is per replica
    base_url: str | list[str] | None = None
    api_key_env: str | None = None
    api_version: str | None = None  # set for Azure OpenAI (then base_url is the azure_endpoint, model the deployment)
    max_concurrency: int = Field(8, ge=1)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    # attempts in a row without any HTTP answer before the stage stops with "not answering"
    max_consecutive_failures: int = Field(3, ge=1)
    structured_output: bool = True
    # managed vllm server: any vLLM engine argument by its EngineArgs name (tensor_parallel_size, max_num_seqs,
    # max_model_len, enforce_eager, ...), passed as `--kebab-case` flags over the GPU plan's (ragtune.core.gpu_plan)
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # generation
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, engine_args: dict[str, Any]) -> dict[str, Any]:
        return refuse_owned_engine_args(engine_args)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, base_url: str | list[str] | None) -> str | list[str] | None:
        if isinstance(base_url, list):
            if not base_url:
                raise ValueError("an empty list: give one endpoint URL or several replicas, or leave base_url unset")
            if len(set(base_url)) != len(base_url):
                raise ValueError("a replica is listed twice: each URL once (raise max_concurrency to send it more)")
        return base_url

    @property
    def base_urls(self) -> list[str]:
        """The endpoints: [] (OpenAI's API, or ragtune's managed server), one, or the replicas."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "max_model_len" in raw:
            raise ValueError("`max_model_len` is now a vLLM engine argument: write `engine_args: {max_model_len: "
                             f"{raw['max_model_len']}}}` (unset on a GPU, the plan sizes it from the config)")
        return raw


class TeacherRole(LLMRole):
    """The teacher: an LLM role plus what only the teacher has, best-of-N answers and the prices the report's cost
    section charges for its tokens (the judge carries neither)."""

    # best-of-N teacher answers (prep): the answer at `temperature` plus num_candidates - 1 samples at
    # candidate_temperature; of those the answer gates pass, the one the others agree with most is kept
    num_candidates: int = Field(1, ge=1)
    candidate_temperature: float = Field(0.7, gt=0)
    # cost estimate (USD per million tokens), optional
    price_per_million_input_tokens: float | None = None
    price_per_million_output_tokens: float | None = None


class StudentConfig(Strict):
    """The model being tuned; loading options map to `from_pretrained` arguments."""

    model: str
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device_map: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class EmbeddingConfig(Strict):
    model: str = "all-minilm-l6-v2"
    embed_batch_size: int = Field(64, ge=1)
    # sentence-transformers' `model_kwargs={"torch_dtype": ...}`. `auto`: the faster of fp32 and bf16 weights at the
    # model's shapes in ragtune's precision probe on CPU, bf16 on a GPU that supports it. A constant is wrong on one
    # CPU or the other: at MiniLM's shapes a 2-core AVX2 EPYC ran bf16 weights at 0.53x fp32 (7.7 vs 14.4 GFLOP/s,
    # 2026-12-05); a Xeon with AMX runs bf16 GEMMs 4-6x fp32 (issue #29)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
