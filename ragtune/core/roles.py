"""The model roles every stage relies on (teacher, judge, student, embedding), and the config error type.

Stage sections are owned by their stage (`ragtune.data_prep.config`, …); `ragtune.config` composes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ragtune.core.errors import UserFacingError


class ConfigError(UserFacingError, ValueError):
    """A config problem, phrased for the user: where it is and what to do."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LLMRole(Strict):
    """A teacher or judge: `hf` runs the model in-process, `openai` calls any OpenAI-compatible endpoint,
    `vllm` calls a vLLM server: ragtune's own managed one for `model`, or the user's at `base_url`."""

    backend: Literal["hf", "openai", "vllm"] = "hf"
    model: str
    # hf backend (torch_dtype is also the managed vLLM server's --dtype; its `auto` on CPU is the faster of fp32 and
    # bf16 as ragtune's precision probe measures this machine: engine.cpu_dtype)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device_map: str | None = None
    trust_remote_code: bool = False
    batch_size: int = Field(8, ge=1)
    # openai and vllm backends
    base_url: str | None = None
    api_key_env: str | None = None
    api_version: str | None = None  # set for Azure OpenAI (then base_url is the azure_endpoint, model the deployment)
    max_concurrency: int = Field(8, ge=1)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    # attempts in a row without any HTTP answer before the stage stops with "not answering"
    max_consecutive_failures: int = Field(3, ge=1)
    structured_output: bool = True
    # managed vllm server: its --max-model-len (None: the model's own context length)
    max_model_len: int | None = Field(None, ge=1)
    # generation
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    # best-of-N teacher answers (prep): the answer at `temperature` plus num_candidates - 1 samples at
    # candidate_temperature; the answer gates keep the best grounded one, so the data is never worse than greedy
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
