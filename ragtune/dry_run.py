"""`ragtune run --dry-run`: check everything that can be checked without a GPU or a download, print the plan."""

from __future__ import annotations

import os
from pathlib import Path

from ragtune.config import ConfigError, LLMRole, RagtuneConfig
from ragtune.pipeline import PIPELINE


def _model_check(role: str, ref: str) -> tuple[str, str]:
    """('ok'|'warn'|'error', message) for a model reference, without loading weights."""
    from ragtune.core.models import ModelLoadError, resolve_model

    try:
        model_ref = resolve_model(ref)
    except ModelLoadError as err:
        return "error", f"{role}: {err}"
    if Path(model_ref.name_or_path).exists():
        return "ok", f"{role}: {ref} (local: {model_ref.name_or_path}{', ' + model_ref.gguf_file if model_ref.gguf_file else ''})"
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(ref, "config.json"), str)
    where = "in the local HF cache" if cached else "not in the local HF cache: downloaded on first use"
    level = "ok" if cached or os.environ.get("HF_HUB_OFFLINE") != "1" else "error"
    return level, f"{role}: hub id {ref} ({where})"


def _endpoint_check(role: str, llm: LLMRole) -> tuple[str, str]:
    import httpx

    if llm.api_key_env and not os.environ.get(llm.api_key_env):
        return "warn", f"{role}: environment variable {llm.api_key_env} (api_key_env) is not set here"
    try:
        httpx.get(f"{(llm.base_url or '').rstrip('/')}/models", timeout=3.0)
    except httpx.HTTPError as err:
        return "warn", f"{role}: {llm.base_url} not reachable from here ({type(err).__name__}); start it before `run`"
    return "ok", f"{role}: {llm.model} at {llm.base_url} (reachable)"


def _training_check(config: RagtuneConfig) -> list[tuple[str, str]]:
    import torch
    from trl import SFTConfig

    from ragtune.train.config import peft_config_class

    checks: list[tuple[str, str]] = []
    kwargs = config.train.sft_kwargs()
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # GPU-only flags (bf16, fused optimizers) are checked as far as a CPU can
    try:
        SFTConfig(output_dir=str(config.output_dir / "checkpoints"), **kwargs)
        checks.append(("ok", f"train: SFTConfig accepts {sorted(config.train.sft_kwargs())}"))
    except Exception as err:  # report TRL's own words
        checks.append(("error", f"train: SFTConfig rejects the `train:` keys: {err}"))
    if config.train.method != "full":
        try:
            peft_config_class(config.train.method)(**config.train.peft_kwargs())
            checks.append(("ok", f"train: {config.train.method} with {config.train.peft_kwargs()}"))
        except Exception as err:
            checks.append(("error", f"train.peft: {err}"))
    if config.train.method == "qlora" and not torch.cuda.is_available():
        checks.append(("warn", "train: qlora on a machine without CUDA: 4-bit runs on bitsandbytes' CPU backend here (slow); "
                               "on the GPU box it runs as configured"))
    return checks


def _device_name(device_map: str | None) -> str:
    """Where `inference_device_map` puts an in-process model on this machine, in words."""
    from ragtune.core.models import inference_device_map

    placed = inference_device_map(device_map)
    return "CPU" if placed in (None, "cpu") else f"GPU (device_map={placed!r})"


def placement_checks(config: RagtuneConfig) -> list[tuple[str, str]]:
    """Where each inference role runs on this machine (the one device policy: CUDA when present, else CPU, unless a
    role sets `device_map`), so a GPU box that would generate on its CPU is seen before the run."""
    from ragtune.train.merge import merge_device_map, merge_dtype

    lines = []
    for role in ("teacher", "judge"):
        llm: LLMRole = getattr(config, role)
        if llm.backend == "openai" or llm.base_url:
            where = f"the endpoint at {llm.base_url or 'the OpenAI API'}"
        elif llm.backend == "vllm":
            where = "a managed vLLM server (on the GPU when its vLLM is a CUDA build)"
        else:
            where = f"in-process on the {_device_name(llm.device_map)}"
        lines.append(("ok", f"device: {role} answers through {where}"))
    student = config.student
    answers = ("a managed vLLM server (on the GPU when its vLLM is a CUDA build)" if config.eval.backend == "vllm"
               else f"in-process on the {_device_name(student.device_map)}")
    merge = merge_device_map(student, merge_dtype(student.torch_dtype))
    lines += [("ok", f"device: eval's student answers through {answers}; `ragtune serve` on the "
                     f"{_device_name(student.device_map)}"),
              ("ok", f"device: merge on the {'CPU' if merge in (None, 'cpu') else f'GPU (device_map={merge!r})'}"),
              ("ok", "device: training places the student where accelerate puts each process (`accelerate launch`: "
                     "one GPU per process; a single process: the GPU when CUDA is present, else the CPU)")]
    return lines


def writable_check(output_dir: Path) -> tuple[str, str]:
    """Whether the run folder can be written (created if missing), tried with a real file."""
    folder = output_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".ragtune-write-test-{os.getpid()}"
    try:
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        return "error", (f"output_dir: {output_dir} is not writable ({err.strerror} at {folder}). "
                         "Point `output_dir` at a folder you can write.")
    return "ok", f"output_dir: {output_dir} is writable"


def max_length_check(config: RagtuneConfig) -> tuple[str, str]:
    """A training row is the system prompt + template + `similarity_top_k` chunks of `chunk_size` tokens + the
    question + the teacher's answer; a `max_length` below that truncates every answer away."""
    from ragtune.core.models import load_tokenizer
    from ragtune.train.data_stats import sft_setting

    prep = config.data_prep
    level, where = _model_check("student", config.student.model)
    if level != "ok" or "not in the local HF cache" in where:
        return "warn", "train.max_length: not checked here: the student's tokenizer is not on this machine"
    tokenizer = load_tokenizer(config.student.model, config.student.trust_remote_code)
    frame = prep.system_prompt + prep.text_qa_template.replace("{context_str}", "").replace("{query_str}", "")
    contexts = prep.raft_contexts if prep.raft.enabled else prep.similarity_top_k
    question_tokens = 48  # the longest generated questions seen on the sample 10-K run about 40 tokens
    fixed = len(tokenizer(frame)["input_ids"]) + question_tokens + config.teacher.max_new_tokens
    expected = fixed + contexts * prep.chunk_size
    max_length = sft_setting(config, "max_length")
    # SentenceSplitter cuts at sentence ends, so chunks run shorter than chunk_size (the demo's average ~60 %):
    # rows that cannot fit even with half-full chunks are an error, full-size ones only a warning
    if max_length is not None and fixed + contexts * prep.chunk_size // 2 > max_length:
        return "error", (f"train.max_length: {max_length} tokens cannot hold a training row (~{expected} tokens with "
                         f"{contexts} full chunks of data_prep.chunk_size {prep.chunk_size}, the prompt, the question "
                         f"and teacher.max_new_tokens {config.teacher.max_new_tokens}; over {max_length} even with "
                         "half-full chunks). Raise train.max_length or lower data_prep.chunk_size / similarity_top_k.")
    if max_length is not None and expected > max_length:
        return "warn", (f"train.max_length: {max_length} tokens is below a row with {contexts} full chunks (~{expected}); "
                        "rows over it are counted by `ragtune train` (logs/data_stats.json)")
    return "ok", f"train.max_length: {max_length} ≥ ~{expected} tokens expected per training row"


def preflight(config: RagtuneConfig) -> None:
    """The checks a command runs before any work starts: each failure is one ConfigError line."""
    for level, message in (writable_check(config.output_dir), max_length_check(config)):
        if level == "error":
            raise ConfigError(message)


def dry_run(config: RagtuneConfig, decisions: dict[str, str]) -> int:
    """Print every check and the stage plan; exit status 1 when any check is an error."""
    checks: list[tuple[str, str]] = [("ok", f"config: {config.config_path} is valid")]
    for path in config.document_paths:
        checks.append(("ok", f"documents: {path} ({path.stat().st_size / 1e6:.1f} MB)"))
    checks.append(_model_check("student", config.student.model))
    for role in ("teacher", "judge"):
        llm: LLMRole = getattr(config, role)
        remote = llm.backend == "openai" or (llm.backend == "vllm" and llm.base_url)
        checks.append(_endpoint_check(role, llm) if remote else _model_check(role, llm.model))
    from ragtune.core.models import resolve_embedding

    checks.append(("ok", f"embedding: {resolve_embedding(config.embedding.model)}"))
    checks.extend(_training_check(config))
    checks.extend(placement_checks(config))
    checks += [writable_check(config.output_dir), max_length_check(config)]
    for level, message in checks:
        print(f"[{level:5}] {message}")
    print(f"\nplan for {config.output_dir}:")
    for stage in PIPELINE:
        print(f"  {stage.name:7} {decisions[stage.name]}")
    return 1 if any(level == "error" for level, _ in checks) else 0
