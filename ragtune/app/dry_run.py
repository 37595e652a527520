"""`ragtune run --dry-run`: check everything that can be checked without a GPU or a download, print the plan."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ragtune.app.config import ConfigError, LLMRole, RagtuneConfig, embedding_window_warnings
from ragtune.app.estimate import stage_estimates
from ragtune.core import engine
from ragtune.core.errors import UserFacingError
from ragtune.core.run_dir import NotARunFolder, RunDir, check_run_folder
from ragtune.app.pipeline import PIPELINE

if TYPE_CHECKING:
    from ragtune.core.gpu_plan import ServerPlan

log = logging.getLogger(__name__)


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
    down, urls = [], llm.base_urls or ["https://api.openai.com/v1"]
    for url in urls:
        try:
            httpx.get(f"{url.rstrip('/')}/models", timeout=3.0)
        except httpx.HTTPError as err:
            down.append(f"{url} ({type(err).__name__})")
    if down:
        return "warn", f"{role}: {', '.join(down)} not reachable from here; start it before `run`"
    return "ok", f"{role}: {llm.model} at {', '.join(urls)} (reachable)"


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


def _training_rows(config: RagtuneConfig) -> tuple[int, str]:
    """How many rows training will see: data/train.jsonl's when prep wrote it, else what `data_prep` asks for."""
    from ragtune.core.run_dir import RunDir

    path = RunDir(config.output_dir).train_jsonl
    if path.is_file():
        with path.open("rb") as rows:
            return sum(1 for line in rows if line.strip()), str(path)
    prep = config.data_prep
    rows = prep.num_train_questions * (2 if prep.closed_book_rows else 1)
    return rows, f"at most, data_prep.num_train_questions{' x 2 (closed_book_rows)' if prep.closed_book_rows else ''}"


def _every(strategy: str | None, steps: float | None, max_steps: int, steps_per_epoch: int) -> tuple[str, int]:
    """An eval or save schedule in words, and how many times it runs in `max_steps` (TrainerState's rule: a fraction
    below 1 is ceil(fraction x max_steps))."""
    if strategy == "epoch":
        return "every epoch", max(max_steps // steps_per_epoch, 1)
    if strategy != "steps" or not steps:
        return "never", 0
    interval = math.ceil(steps * max_steps) if steps < 1 else int(steps)
    return f"every {interval} steps{f' ({steps:g} of the run)' if steps < 1 else ''}", max_steps // max(interval, 1)


def schedule_checks(config: RagtuneConfig, processes: int) -> list[tuple[str, str]]:
    """Steps per epoch on the planned training processes, and how often evaluation and checkpoints run (a warning
    where they never do, or too rarely for early stopping to act): on the GPU box an integer eval_steps above the
    run's length never evaluated."""
    from ragtune.train.config import SFT_DEFAULTS, held_out_count

    train = config.train
    kwargs = train.sft_kwargs()
    try:
        batch = train.batch(processes)
    except ConfigError as err:
        return [("error", str(err))]
    rows, source = _training_rows(config)
    held = 0 if train.validation_file else held_out_count(rows, train.validation_split)
    per_step = batch["per_device_train_batch_size"] * processes
    steps_per_epoch = max(math.ceil(math.ceil((rows - held) / per_step) / batch["gradient_accumulation_steps"]), 1)
    epochs = kwargs.get("num_train_epochs", SFT_DEFAULTS["num_train_epochs"])
    max_steps = kwargs.get("max_steps") or -1
    total = max_steps if max_steps > 0 else math.ceil(epochs * steps_per_epoch)
    has_eval = bool(held or train.validation_file)
    evals, n_evals = _every(kwargs.get("eval_strategy") if has_eval else "no", kwargs.get("eval_steps"), total,
                            steps_per_epoch)
    save_strategy = kwargs.get("save_strategy")
    if train.early_stopping_patience and "save_strategy" not in (train.model_extra or {}):
        save_strategy = kwargs.get("eval_strategy")  # train.arguments.sft_config: checkpoints follow evaluations
    saves, n_saves = _every(save_strategy, kwargs.get("save_steps"), total, steps_per_epoch)
    checks = [("ok", f"train schedule: {rows - held} training rows ({rows} {source}; {held} held out) on {processes} "
                     f"process{'es' * (processes > 1)}: global batch {batch['global_batch_size']} = "
                     f"{batch['per_device_train_batch_size']} per device x {batch['gradient_accumulation_steps']} "
                     f"accumulation steps ({batch['from']}) x {processes}: {steps_per_epoch} steps per epoch, {total} "
                     f"steps; evaluation {evals} ({n_evals}x), checkpoint {saves} ({n_saves}x)")]
    if has_eval and kwargs.get("eval_strategy") not in (None, "no") and n_evals == 0:
        checks.append(("warn", f"train.eval_steps: evaluation {evals} never runs in {total} steps; use a fraction "
                               "(0.1: ten evaluations per run) or fewer steps"))
    if save_strategy not in (None, "no") and n_saves == 0:
        checks.append(("warn", f"train.save_steps: a checkpoint {saves} is never written in {total} steps; use a "
                               "fraction (0.1: ten per run)"))
    if train.early_stopping_patience and n_evals <= train.early_stopping_patience:
        checks.append(("warn", f"train.early_stopping_patience: {train.early_stopping_patience} evaluations without "
                               f"improvement, but the run evaluates {n_evals}x: early stopping cannot act. Evaluate "
                               "more often (a smaller eval_steps fraction) or lower the patience"))
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
            where = f"the endpoint at {', '.join(llm.base_urls) or 'the OpenAI API'}"
        elif llm.backend == "vllm":
            where = "a managed vLLM server (where the GPU plan below puts it)"
        else:
            where = f"in-process on the {_device_name(llm.device_map)}"
        lines.append(("ok", f"device: {role} answers through {where}"))
    student = config.student
    answers = ("a managed vLLM server (where the GPU plan below puts it)" if config.eval.backend == "vllm"
               else f"in-process on the {_device_name(student.device_map)}")
    merge = merge_device_map(student, merge_dtype(student.torch_dtype))
    lines += [("ok", f"device: eval's student answers through {answers}; `ragtune serve` on the "
                     f"{_device_name(student.device_map)}"),
              ("ok", f"device: merge on the {'CPU' if merge in (None, 'cpu') else f'GPU (device_map={merge!r})'}"),
              ("ok", "device: training places the student where accelerate puts each process (`accelerate launch`: "
                     "one GPU per process; a single process: the GPU when CUDA is present, else the CPU)")]
    return lines


def _training_processes(config: RagtuneConfig) -> int:
    """Training's processes in the GPU plan (one per GPU), 1 without GPUs or with a plan that does not build."""
    from ragtune.core.gpu_plan import gpu_plan

    try:
        plan = gpu_plan(config)
    except ConfigError:
        return 1
    return max(len(plan.train), 1) if plan.count else 1


def gpu_plan_report(config: RagtuneConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """The GPU plan's checks (GPUs this machine lacks, engine arguments against the installed vLLM) and its lines:
    every managed server's command line and GPUs, training's processes, eval's placement."""
    from ragtune.core.gpu_plan import gpu_plan

    try:
        plan = gpu_plan(config)
    except ConfigError as err:
        return [("error", f"gpus: {err}")], []
    checks = engine_args_checks(config)
    if plan.count == 0:
        return checks, ["GPU plan: none (no GPU here, no gpus.count): managed vLLM servers and training use the CPU"]
    missing = plan.missing()
    if missing:
        checks.append(("warn", f"gpus: the plan uses GPUs {_gpu_list(missing)}, which this machine lacks (it has "
                               f"{plan.available}): the plan below is for the GPU box; `run` refuses it here"))
    source = "gpus.count" if config.gpus.count is not None else "this machine's" if not missing else "the GPUs `gpus:` names"
    lines = [f"GPU plan ({plan.count} GPUs: {source}):"]
    if plan.teacher is not None:
        shared = "teacher + judge" if plan.judge is plan.teacher else "teacher"
        lines += _server_lines(shared, f"managed vLLM server for {config.teacher.model}", plan.teacher,
                               config.teacher.model, config.teacher.trust_remote_code)
    if plan.judge is not None and plan.judge is not plan.teacher:
        lines += _server_lines("judge", f"managed vLLM server for {config.judge.model}", plan.judge,
                               config.judge.model, config.judge.trust_remote_code)
    for part in ("teacher", "judge"):
        role: LLMRole = getattr(config, part)
        if getattr(plan, part) is None:
            where = (", ".join(role.base_urls) or "the OpenAI API") if role.backend != "hf" else \
                "in-process (hf, `device:` above)"
            lines.append(f"  {part:15} not a managed server: {where}")
    processes = len(plan.train)
    lines += [f"  {'train':15} {_gpus(plan.train)}: {processes} process{'es' * (processes > 1)} of "
              f"`accelerate launch` ({'DDP' if processes > 1 else 'one GPU'})",
              f"    {plan.train_command(config.config_path or 'CONFIG')}",
              "    (`ragtune run` alone trains in one process on the first GPU it sees; run this line first and "
              "`ragtune run` finds train up to date)"]
    if plan.eval is not None:
        from ragtune.core.run_dir import RunDir

        r = config.train.peft_kwargs().get("r")  # a LoRA method's rank: the adapter eval serves as a LoRA module
        adapter = {"adapter": str(RunDir(config.output_dir).adapter)} if r else {}
        rank = {"max_lora_rank": next((x for x in engine.LORA_RANKS if x >= r), engine.LORA_RANKS[-1])} if r else {}
        lines += _server_lines("eval", "the student's managed vLLM server (base + this run's adapter as a LoRA module; "
                               "then merged/ as its own model)", plan.eval, config.student.model,
                               config.student.trust_remote_code, adapter, rank)
    else:
        lines.append(f"  {'eval':15} the student in-process (hf, `device:` above); `eval.backend: vllm` puts it on "
                     f"{_gpus(plan.eval_gpus)}")
    return checks, lines


def engine_args_checks(config: RagtuneConfig) -> list[tuple[str, str]]:
    """The config's engine arguments against the installed vLLM's own parser (the names cached per install), or a
    warning that they pass unchecked where this machine has no vLLM."""
    given = {f"{part}.engine_args": args for part, args in (
        ("teacher", config.teacher.engine_args), ("judge", config.judge.engine_args),
        ("eval", config.eval.engine_args)) if args}
    if not given:
        return []
    try:
        python = engine.find_engine_python()
    except engine.EngineError:
        return [("warn", f"{', '.join(given)}: not checked, no vLLM on this machine: passed to `vllm serve` as given")]
    checks = []
    for key, args in given.items():
        try:
            checked = engine.check_engine_args(python, args, key)
        except ConfigError as err:
            checks.append(("error", str(err)))
            continue
        checks.append(("ok", f"{key}: {', '.join(args)} are engine arguments of the vLLM at {python}") if checked else
                      ("warn", f"{key}: not checked, vLLM's arguments could not be read from {python}"))
    return checks


def _server_lines(parts: str, what: str, server: "ServerPlan", model: str, trust_remote_code: bool,
                  lora_modules: dict[str, str] | None = None, shown_args: dict[str, object] | None = None) -> list[str]:
    """A managed server's plan line and the command line it starts with."""
    from ragtune.core.models import ModelLoadError, resolve_model

    try:
        python = engine.find_engine_python()
    except engine.EngineError:
        python = "python"  # no vLLM here: the GPU box's engine Python
    try:
        model_path = resolve_model(model).name_or_path
    except ModelLoadError:
        model_path = model
    shown = engine.VLLMServer(model, dtype=server.dtype, trust_remote_code=trust_remote_code, gpus=server.gpus,
                              engine_args={**server.engine_args, **(shown_args or {})})
    shown.lora_modules = dict(lora_modules or {})  # the adapter is not trained yet: its rank is in shown_args
    where = (f"{_gpus(server.gpus)} (tensor parallelism {server.engine_args.get('tensor_parallel_size', 1)})"
             if server.gpus else "the CPU")
    return [f"  {parts:15} {where}: {what}", f"    {shown.shown_command(python, model_path, on_cpu=not server.gpus)}"]


def _gpu_list(gpus: "tuple[int, ...] | list[int]") -> str:
    return ",".join(map(str, gpus))


def _gpus(gpus: "tuple[int, ...] | list[int]") -> str:
    return f"GPU{'s' * (len(gpus) > 1)} {_gpu_list(gpus)}"


def document_checks(paths: list[Path]) -> list[tuple[str, str]]:
    """Each document opened as far as prep needs to read it (a PDF's pages, a text file's UTF-8). Prep skips an
    unreadable file with a warning and fails only when none is left, and so does this check."""
    from ragtune.data_prep.documents import DocumentError, check_readable

    checks: list[tuple[str, str]] = []
    for path in paths:
        try:
            seen = check_readable(path)
        except DocumentError as err:
            checks.append(("warn", f"documents: {err} `prep` skips it."))
            continue
        checks.append(("ok", f"documents: {path} ({path.stat().st_size / 1e6:.1f} MB, {seen})"))
    if paths and all(level != "ok" for level, _ in checks):
        checks.append(("error", "documents: none of them can be read; fix or replace them (see above)."))
    return checks


def writable_check(output_dir: Path) -> tuple[str, str]:
    """Whether the run folder is ragtune's to fill (`check_run_folder`: not `/`, home or a foreign non-empty
    folder) and can be written (created if missing), tried with a real file."""
    try:
        check_run_folder(output_dir)
    except NotARunFolder as err:
        return "error", str(err)
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
    from ragtune.core.gpu_plan import gpu_plan

    plan = gpu_plan(config)  # a tensor parallelism that does not fill its GPUs fails here
    # Under the plan's own `CUDA_VISIBLE_DEVICES=0,1,2,3 accelerate launch` the process sees training's GPUs only, not
    # the teacher's it does not use; there a server's start checks its GPUs against what it sees (VLLMServer.start).
    missing = plan.missing() if not os.environ.get("CUDA_VISIBLE_DEVICES") else []
    if missing:
        raise ConfigError(f"gpus: the plan uses GPUs {_gpu_list(missing)}, which this machine lacks: change `gpus:` "
                          "(or remove gpus.count, which plans for a box with that many) or run on the GPU box.")
    for level, message in engine_args_checks(config):
        if level == "error":
            raise ConfigError(message)
        if level == "warn":
            log.warning(message)


def _retriever_check(config: RagtuneConfig) -> tuple[str, str]:
    """Your own index opens with the named embedding model (its vectors' size checked) and holds nodes."""
    from ragtune.core.rag import embedding_model
    from ragtune.core.retriever import open_index, stored_nodes

    try:
        open_index(config.retriever, embedding_model(config.embedding))
        nodes = stored_nodes(config.retriever)
    except UserFacingError as err:
        return "error", f"retriever: {err}"
    if not nodes:
        return "error", f"retriever: {config.retriever.describe()} holds no nodes; index your documents first"
    return "ok", f"retriever: {config.retriever.describe()}, {len(nodes)} nodes"


def dry_run(config: RagtuneConfig, decisions: dict[str, str]) -> int:
    """Print every check and the stage plan; exit status 1 when any check is an error."""
    checks: list[tuple[str, str]] = [("ok", f"config: {config.config_path} is valid")]
    checks.extend(document_checks(config.document_paths))
    checks.append(_model_check("student", config.student.model))
    for role in ("teacher", "judge"):
        llm: LLMRole = getattr(config, role)
        remote = llm.backend == "openai" or (llm.backend == "vllm" and llm.base_url)
        checks.append(_endpoint_check(role, llm) if remote else _model_check(role, llm.model))
    from ragtune.core.models import resolve_embedding

    checks.append(("ok", f"embedding: {resolve_embedding(config.embedding.model)}"))
    if config.retriever is not None:
        checks.append(_retriever_check(config))
    checks.extend(_training_check(config))
    checks.extend(placement_checks(config))
    checks += [writable_check(config.output_dir), max_length_check(config)]
    gpu_checks, gpu_lines = gpu_plan_report(config)
    checks += gpu_checks
    checks += schedule_checks(config, _training_processes(config))
    checks += [("warn", f"{key}: {message}") for key, message in embedding_window_warnings(config)]
    for level, message in checks:
        print(f"[{level:5}] {message}")
    print(f"\nplan for {config.output_dir}:")
    estimates, minutes = stage_estimates(RunDir(config.output_dir), decisions)
    for stage in PIPELINE:
        print(f"  {stage.name:7} {decisions[stage.name]:7} {estimates[stage.name]}".rstrip())
    if minutes is not None:
        print(f"  about {minutes:.0f} min on this machine (each stage's recorded work at its recorded gap to the floor)")
    print("\n" + "\n".join(gpu_lines))
    return 1 if any(level == "error" for level, _ in checks) else 0
