"""`ragtune run`: prep → train → merge → eval → report, doing no work twice.

Each stage's fingerprint hashes what it consumes: its config sections, the fingerprints of the stages
it reads from, the input documents (prep) and the source code of the stage package. A stage whose
recorded fingerprint matches is skipped; a stage whose fingerprint changed retires its own stale
outputs first; a stage that was interrupted with the same fingerprint resumes from its partial files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from ragtune.app.config import RagtuneConfig, load_config
from ragtune.core import engine, roofline, servers
from ragtune.core.errors import UserFacingError
from ragtune.core.run_dir import Manifest, RunDir, sha256_file, short_hash
from ragtune.eval.config import EvalConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How stages are run, whoever runs them (`ragtune run`, `ragtune STAGE`, repeats, sweep trials)."""

    start: str | None = None  # `--from`: this stage and every later one run
    only: str | None = None  # `--only`: just this stage, decided as in a full run
    force: bool = False  # rerun what is up to date
    adapters: tuple[Path, ...] = ()  # `ragtune eval --adapters`: more adapter folders to score
    before_work: Callable[[RagtuneConfig], None] | None = None  # the CLI's preflight, only when some stage runs


StageEntry = Callable[[RagtuneConfig, RunDir, RunOptions], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageEntry  # the stage's entry point (imported when called, so `--help` and validation stay fast)
    code: tuple[str, ...]  # packages whose source is part of the fingerprint (every stage runs on the core)
    config_keys: tuple[str, ...]  # config sections the stage consumes
    upstream: tuple[str, ...]
    outputs: Callable[[RunDir], list[Path]]  # retired to stale/ when the fingerprint changes


def _prep(config: RagtuneConfig, run_dir: RunDir, options: RunOptions) -> dict[str, Any]:
    from ragtune.data_prep.prep import run

    return run(config, run_dir)


def _train(config: RagtuneConfig, run_dir: RunDir, options: RunOptions) -> dict[str, Any]:
    from ragtune.train.sft import run

    return run(config, run_dir)


def _merge(config: RagtuneConfig, run_dir: RunDir, options: RunOptions) -> dict[str, Any]:
    from ragtune.train.merge import run

    return run(config, run_dir)


def _eval(config: RagtuneConfig, run_dir: RunDir, options: RunOptions) -> dict[str, Any]:
    from ragtune.eval.evaluate import run

    return run(config, run_dir, list(options.adapters))


def _report(config: RagtuneConfig, run_dir: RunDir, options: RunOptions) -> dict[str, Any]:
    from ragtune.eval.report import run

    return run([run_dir.root], None)


# prep retires its own outputs step by step (data/prep_state.json): a changed eval-question count keeps every
# chunk, the index and the training questions.
PIPELINE = (
    Stage("prep", _prep, ("ragtune.data_prep", "ragtune.core"), ("documents", "embedding", "teacher", "data_prep", "seed"),
          (), lambda r: []),
    Stage("train", _train, ("ragtune.train", "ragtune.core"), ("student", "train", "seed"), ("prep",),
          lambda r: [r.checkpoints, r.adapter, r.logs]),
    Stage("merge", _merge, ("ragtune.train", "ragtune.core"), ("student", "train"), ("train",), lambda r: [r.merged]),
    Stage("eval", _eval, ("ragtune.eval", "ragtune.core"), ("student", "teacher", "judge", "embedding", "eval", "seed"),
          ("prep", "train", "merge"), lambda r: []),
    Stage("report", _report, ("ragtune.eval", "ragtune.core"), ("eval", "cost"), ("eval",),
          lambda r: [r.report_html, r.report_md]),
)

STAGES = tuple(stage.name for stage in PIPELINE)

def stage_named(name: str) -> Stage:
    return next(stage for stage in PIPELINE if stage.name == name)


def code_hash(package: str) -> str:
    """The package's source, wherever it is installed (a checkout's folder or site-packages)."""
    digest = hashlib.sha256()
    folder = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def input_hashes(config: RagtuneConfig) -> dict[str, str]:
    """The documents' contents, or your own index's nodes (`retriever:`): either changed re-runs prep."""
    hashes = {str(p): sha256_file(p) for p in config.document_paths}
    if config.retriever is not None:
        from ragtune.core.retriever import store_fingerprint

        hashes["retriever"] = store_fingerprint(config.retriever)
    return hashes


# How a model is reached or paced, never what it writes: changing one must not throw finished work away.
OPERATIONAL_KEYS = frozenset({
    "timeout", "max_concurrency", "max_retries", "batch_size", "device_map", "base_url", "api_key_env", "api_version",
    "embed_batch_size", "price_per_million_input_tokens", "price_per_million_output_tokens", "max_consecutive_failures",
    "engine_args", "max_failure_fraction",
})


def output_settings(section: Any) -> Any:
    """A resolved config section without its operational keys (top-level keys of a role or stage section)."""
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in OPERATIONAL_KEYS}
    return section


def fingerprints(config: RagtuneConfig) -> dict[str, dict[str, str]]:
    """Per stage: the hash of each thing it consumes (so the manifest can say what changed). Model ids, prompts,
    generation settings, documents and chunking count; timeouts, concurrency, batch sizes and device placement
    do not."""
    resolved = {key: output_settings(value) for key, value in config.resolved().items()}
    docs = input_hashes(config)
    golden = Path(config.eval.questions_file) if config.eval.questions_file else None
    result: dict[str, dict[str, str]] = {}
    for stage in PIPELINE:
        parts = {f"config.{key}": short_hash(resolved.get(key)) for key in stage.config_keys}
        parts.update({f"code.{pkg}": code_hash(pkg) for pkg in stage.code})
        if stage.name == "prep":
            parts["documents"] = short_hash(docs)
        if stage.name == "eval" and golden is not None and golden.is_file():  # an edited golden set is new questions
            parts["questions_file"] = sha256_file(golden)
        parts.update({f"stage.{up}": result[up]["fingerprint"] for up in stage.upstream})
        parts["fingerprint"] = short_hash(parts)
        result[stage.name] = parts
    return result


def plan(config: RagtuneConfig, run_dir: RunDir, options: RunOptions = RunOptions()) -> dict[str, str]:
    """Decide for every stage: `run`, `resume` (same fingerprint, interrupted) or `skip` (done, unchanged).

    `only` narrows the plan to one stage, decided like in a full run: a killed training resumes from its
    checkpoints (before, `--only train` ran it afresh and retired them), an up-to-date one is skipped unless `force`.
    """
    manifest = Manifest(run_dir)
    prints = fingerprints(config)
    decisions: dict[str, str] = {}
    start, only, force = options.start, options.only, options.force
    forced_from = STAGES.index(start) if start else None
    for i, name in enumerate(STAGES):
        recorded = manifest.data["stages"].get(name, {})
        same = recorded.get("fingerprint") == prints[name]["fingerprint"]
        if only and name != only:
            decisions[name] = "skip"
        elif force or (forced_from is not None and i >= forced_from):
            decisions[name] = "run"
        elif same and recorded.get("status") == "done":
            decisions[name] = "skip"
        elif same:
            decisions[name] = "resume"
        else:
            decisions[name] = "run"
    return decisions


def run_pipeline(config: RagtuneConfig, options: RunOptions = RunOptions()) -> dict[str, str]:
    """Run the planned stages in order; returns the decision taken for each stage.

    `options.before_work` (the CLI's preflight checks) runs only when some stage will run. A run with nothing to do
    writes nothing: manifest.json keeps its bytes and mtime, and an up-to-date run on a read-only folder succeeds.
    """
    run_dir = RunDir(config.output_dir)
    decisions = plan(config, run_dir, options)
    if all(decision == "skip" for decision in decisions.values()):
        print(f"[ragtune] nothing to do: {'`' + options.only + '` is' if options.only else 'every stage is'} up to date "
              "(--force reruns)", flush=True)
        return decisions
    if options.before_work is not None:
        options.before_work(config)
    prints = fingerprints(config)
    Manifest(run_dir).record_run(config.resolved(), input_hashes(config))
    eval_takes = servers_eval_takes(config)
    for i, stage in enumerate(PIPELINE):
        decision = decisions[stage.name]
        evaluates_later = any(decisions[later.name] != "skip" for later in PIPELINE[i + 1:] if later.name == "eval")
        if decision == "skip":
            log.info("%s: up to date, skipped", stage.name)
            continue
        recorded = dict(Manifest(run_dir).data["stages"].get(stage.name, {}))
        changed = sorted(k for k, v in prints[stage.name].items()
                         if k != "fingerprint" and recorded.get("inputs", {}).get(k) != v) if recorded else []
        reason = f" (changed: {', '.join(changed)})" if changed and decision == "run" else ""
        if decision == "run" and recorded:
            run_dir.retire(stage.outputs(run_dir))  # no stale artifact is reused by a resume
        print(f"[ragtune] {stage.name}: {'resuming' if decision == 'resume' else 'running'}{reason}", flush=True)
        started = time.time()
        keep = eval_takes if evaluates_later else None
        roof = run_stage(config, stage, options, prints[stage.name], keep).get("roofline") or {}
        floor = f" (its work's floor here: {roof['floor_s']:.0f}s, {roof['x_floor']}x)" if roof.get("x_floor") else ""
        print(f"[ragtune] {stage.name}: done in {time.time() - started:.1f}s{floor}", flush=True)
    return decisions


def run_one(config: RagtuneConfig, name: str, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """`ragtune STAGE`: the run's config and inputs, then the one stage, recorded as `ragtune run` records it."""
    Manifest(RunDir(config.output_dir)).record_run(config.resolved(), input_hashes(config))
    return run_stage(config, stage_named(name), options)


def run_stage(config: RagtuneConfig, stage: Stage, options: RunOptions, inputs: dict[str, str] | None = None,
              keep: Callable[[engine.VLLMServer], bool] | None = None) -> dict[str, Any]:
    """One stage, recorded in the manifest (fingerprint and inputs, status, seconds, the facts it returns, its work
    against this machine's floor: `roofline`): the one runner behind `ragtune run` and `ragtune STAGE`. `inputs`:
    the stage's fingerprints, when already computed; `keep`: the managed servers it leaves running, for a later
    stage (`servers_eval_takes`)."""
    run_dir = RunDir(config.output_dir)
    inputs = inputs or fingerprints(config)[stage.name]
    manifest = Manifest(run_dir)
    manifest.update_stage(stage.name, fingerprint=inputs["fingerprint"], inputs=inputs)
    try:
        with manifest.timed_stage(stage.name) as facts, roofline.metered() as meter:
            started = time.monotonic()
            facts.update(stage.run(config, run_dir, options) or {})
            servers.end_stage(keep)  # a server adds its work to the meter as it stops or is kept
            facts["roofline"] = meter.summary(time.monotonic() - started)
    except BaseException:
        servers.shutdown_all()  # on errors every server ends with its stage
        raise
    finally:
        release_freed_memory()
    return facts


def servers_eval_takes(config: RagtuneConfig) -> Callable[[engine.VLLMServer], bool] | None:
    """Which managed server a stage leaves running for eval, later in the same run: one on the CPU that serves the
    students' models in eval's settings, or can take their weights (prep's teacher when it is the student's base, as in
    the demo). It saves a start (17 s of the demo's 2 cores); idle, it used 2 % of one core and held 3.0 GB RSS
    beside training. On GPUs every server ends with its stage: training needs their memory."""
    from ragtune.core.gpu_plan import gpu_plan
    from ragtune.core.models import dense_copy, resolve_model

    plan = gpu_plan(config).eval
    if plan is None or plan.gpus or "adapter" in config.eval.tuned_models or config.eval.adapters:
        return None  # adapters need a server started with LoRA: the kept one would be replaced
    student = config.student
    settings = engine.server_settings(plan.dtype, student.trust_remote_code, plan.engine_args, plan.gpus)

    def takes(server: engine.VLLMServer) -> bool:
        if not server.on_cpu or server.settings != settings or server.lora_modules:
            return False
        if server.loaded == student.model:
            return True
        return engine.same_but_weights(server.model_path,
                                       dense_copy(resolve_model(student.model), student.trust_remote_code).name_or_path)

    return takes


# --- runs on the same prep: repeats over seeds, sweep trials --------------------------------------------------------


def child_config(config: RagtuneConfig, overrides: Sequence[str], folder: Path, settings: dict[str, Any],
                 comment: str = "") -> RagtuneConfig:
    """Write `folder/config.yaml` (`base:` the config's file, its `--set` overrides, `output_dir: folder` and the
    dotted `settings`) and load it, validated like any config: `ragtune run` on that file reproduces the child run."""
    raw: dict[str, Any] = {"base": os.path.relpath(config.config_path, folder)}
    for item in overrides:
        key, _, text = item.partition("=")
        _set_dotted(raw, key.strip(), yaml.safe_load(text))
    for key, value in settings.items():
        _set_dotted(raw, key, value)
    raw["output_dir"] = str(folder.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    (folder / "config.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_config(folder / "config.yaml")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def share_prep(parent: RunDir, child: RunDir) -> None:
    """Let `child` reuse `parent`'s prep: its data/ is a relative link to the parent's, and its manifest records the
    parent's prep stage, so the stage cache skips prep there (same fingerprint, done) and no teacher call is repeated."""
    recorded = Manifest(parent).data["stages"].get("prep")
    if not recorded or recorded.get("status") != "done":
        raise UserFacingError(f"{parent.root}: prep has not finished there, so there is no data to share. "
                              "Run `ragtune run CONFIG --only prep` first.")
    child.root.mkdir(parents=True, exist_ok=True)
    if not child.data.is_symlink():
        if child.data.exists():
            raise UserFacingError(f"{child.data} exists and is not a link to {parent.data}: this folder is not a "
                                  "repeat or trial of that run. Move it away and run the command again.")
        child.data.symlink_to(os.path.relpath(parent.data, child.root), target_is_directory=True)
    manifest = Manifest(child)
    manifest.data["stages"]["prep"] = dict(recorded)
    manifest.save()


def share_eval_rows(source: RunDir, child: RunDir, ev: EvalConfig) -> list[Path]:
    """Copy the rows `source`'s eval can lend (`eval.reuse.reusable_files`: the base's and the teacher's) into the
    child's eval/ while it is empty; returns the copied files."""
    from ragtune.eval.reuse import reusable_files

    if child.eval.exists():
        return []
    copied = []
    for path in reusable_files(source, ev):
        child.eval.mkdir(parents=True, exist_ok=True)
        copied.append(Path(shutil.copy2(path, child.eval / path.name)))
    return copied


def release_freed_memory() -> None:
    """Hand the memory a finished stage freed back to the OS (glibc's `malloc_trim`; elsewhere nothing): without it
    ragtune kept merge's 4.46 GB peak through eval, beside eval's vLLM server (demo, 2026-12-01)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, libc's among them: no library search
    except (OSError, AttributeError):
        pass


def run_on_shared_prep(config: RagtuneConfig, parent: RunDir, options: RunOptions = RunOptions()) -> dict[str, str]:
    """`run_pipeline` in a child folder whose prep is `parent`'s. Prep never runs there (it would write into the
    parent's data/ through the link): `--force` and `--from prep` start at train."""
    child = RunDir(config.output_dir)
    share_prep(parent, child)
    if options.only == "prep":
        return dict.fromkeys(STAGES, "skip")
    if options.force or options.start == "prep":
        options = replace(options, start="train", force=False)
    if plan(config, child)["prep"] != "skip":  # the recorded prep is not this config's (other settings or code)
        raise UserFacingError(f"{parent.root}: its prep was made under other settings or code than this config's. "
                              "Run `ragtune run CONFIG --only prep` to bring it up to date, then this command again.")
    return run_pipeline(config, options)
