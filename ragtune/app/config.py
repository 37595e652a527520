"""One YAML per domain, validated whole before any work starts.

A config may start from another (`base: demo.yaml`, resolved next to the file) and override keys;
`--set a.b=c` overrides any key from the command line. Every error names the file, the key path
(and YAML line where known) and, for typos, the closest valid key.

Stage sections are owned by their stage (`data_prep.config`, `train.config`, `eval.config`);
this module only composes them with the model roles every stage relies on.
"""

from __future__ import annotations

import copy
import difflib
import glob
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ragtune.core.artifacts import NotUtf8Error, read_text
from ragtune.core.gpu_plan import GpusConfig
from ragtune.core.gates import AnswerGates
from ragtune.core.retriever import RetrieverConfig, retriever_errors
from ragtune.core.roles import ConfigError, EmbeddingConfig, LLMRole, Strict, StudentConfig, TeacherRole
from ragtune.data_prep.config import DOCUMENT_SUFFIXES, DataPrepConfig
from ragtune.eval.config import EvalConfig
from ragtune.train.config import TrainConfig, library_key_errors


class CostConfig(Strict):
    """Prices of machine time for the report's cost and benefit section (USD; unset: that cost is not priced).
    The teacher's per-token prices are `teacher.price_per_million_input_tokens` / `…_output_tokens`: the report
    prices prep's teacher calls and every query sent to the teacher with them."""

    price_per_gpu_hour: float | None = Field(None, ge=0)  # per GPU: training on N GPUs costs N GPU-hours per hour
    price_per_cpu_hour: float | None = Field(None, ge=0)  # per hour of the CPU machine (training or serving on CPU)


class SweepParam(Strict):
    """One searched key: Optuna's `trial.suggest_float` / `suggest_int` (`low`, `high`, `step`, `log`) or
    `suggest_categorical` (`choices`), with Optuna's argument names."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _arguments(self) -> "SweepParam":
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("`type: categorical` takes `choices: [...]` only (no low/high/step/log)")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"`type: {self.type}` takes `low` and `high` (and optionally `step` or `log`), no `choices`")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("`log: true` needs low > 0 and no `step` (Optuna samples the logarithm)")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("`type: int` takes whole numbers for low, high and step")
        return self

    def suggest_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `trial.suggest_<type>(key, ...)`."""
        if self.type == "categorical":
            return {"choices": list(self.choices or [])}
        number = int if self.type == "int" else float
        kwargs: dict[str, Any] = {"low": number(self.low), "high": number(self.high), "log": self.log}
        if self.step is not None:
            kwargs["step"] = number(self.step)
        return kwargs

    def edge_values(self) -> list[Any]:
        """Every choice, or low and high: the values checked against TRL/PEFT at config load."""
        kwargs = self.suggest_kwargs()
        return kwargs["choices"] if self.type == "categorical" else [kwargs["low"], kwargs["high"]]


# The eval summary's numbers a sweep can optimize: a mean of one model, or its paired delta vs the base.
SUMMARY_OBJECTIVES = ("results.", "comparisons.")


class SweepConfig(Strict):
    """`ragtune sweep`: Optuna searches `params` (keys under `train:`) for the best `objective`. Every trial is a
    run folder under `output_dir/sweep/` that reuses this run's prep; the study is `output_dir/sweep.db`."""

    params: dict[str, SweepParam] = Field(min_length=1)
    # `eval_loss`: the train stage's last eval loss (logs/loss_curve.json; a trial then only trains). Or a number in
    # eval/summary.json by its path, e.g. `comparisons.rag.adapter.rouge_score.delta` (a trial then runs merge, eval).
    objective: str = "eval_loss"
    # Optuna's `direction`; eval_loss is minimized, a summary objective must say which way is better.
    direction: Literal["minimize", "maximize"] | None = None
    # Optuna's `n_trials`: complete trials the study holds at the end (a rerun only adds the missing ones);
    # `ragtune sweep --trials N` overrides it.
    n_trials: int = Field(10, ge=1)

    @field_validator("params")
    @classmethod
    def _train_keys(cls, params: dict[str, SweepParam]) -> dict[str, SweepParam]:
        for key in params:
            if not key.startswith("train.") or key == "train.":
                raise ValueError(f"`{key}`: a sweep searches `train.*` keys only (every trial reuses the run's prep)")
        return params

    @model_validator(mode="after")
    def _objective(self) -> "SweepConfig":
        if self.objective != "eval_loss" and not self.objective.startswith(SUMMARY_OBJECTIVES):
            raise ValueError(f"objective `{self.objective}`: use `eval_loss`, or a path in eval/summary.json starting "
                             "with `results.` or `comparisons.` (e.g. comparisons.rag.adapter.rouge_score.delta)")
        if self.objective != "eval_loss" and self.direction is None:
            raise ValueError(f"objective `{self.objective}`: set `direction: maximize` or `direction: minimize`")
        return self

    def study_direction(self) -> str:
        return self.direction or "minimize"


class RagtuneConfig(Strict):
    name: str
    output_dir: Path
    documents: list[str] = Field(default_factory=list)  # required unless `retriever:` is set (`retriever_errors`)
    teacher: TeacherRole
    student: StudentConfig
    judge: LLMRole
    embedding: EmbeddingConfig = EmbeddingConfig()
    # your own LlamaIndex index instead of `documents:` (ragtune.core.retriever)
    retriever: RetrieverConfig | None = None
    seed: int = 42
    data_prep: DataPrepConfig = DataPrepConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cost: CostConfig = CostConfig()
    sweep: SweepConfig | None = None
    gpus: GpusConfig = GpusConfig()

    # Filled by load_config, not by the user.
    config_path: Path | None = Field(default=None, exclude=True)
    document_paths: list[Path] = Field(default_factory=list, exclude=True)

    @field_validator("documents", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def resolved(self) -> dict[str, Any]:
        """The config as the run used it (JSON-friendly), for the manifest and fingerprints."""
        return self.model_dump(mode="json")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RagtuneConfig:
    """Load, merge (`base:`), override (`--set`) and validate a config; raise ConfigError on any problem."""
    path = Path(path)
    raw, lines = _load_with_bases(path, seen=())
    for item in overrides:
        _apply_override(raw, item, lines)
    raw = _yaml12_floats(raw)
    secret_keys = [k for k in _flat_keys(raw) if k.split(".")[-1] in ("api_key", "token", "password")]
    if secret_keys:
        secret_key = secret_keys[0]
        raise ConfigError(
            f"{_where(path, secret_key, lines)}: secrets do not belong in config files. "
            "Put the key in an environment variable and name it with `api_key_env: MY_VAR`."
        )
    try:
        config = RagtuneConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain_validation(path, err, raw, lines)) from None
    for key_path, message in library_key_errors(config.train):
        raise ConfigError(f"{_where(path, key_path, lines)}: {message}")
    explicit_embedding = "embedding" in config.model_fields_set
    for key_path, message in retriever_errors(config.retriever, config.documents, explicit_embedding):
        raise ConfigError(f"{_where(path, key_path, lines)}: {message}")
    for key_path, message in shared_server_errors(config):
        raise ConfigError(f"{_where(path, key_path, lines)}: {message}")
    for key_path, message in sweep_key_errors(config):
        raise ConfigError(f"{_where(path, key_path, lines)}: {message}")
    config.config_path = path.resolve()
    config.document_paths = _resolve_documents(path, config.documents, lines)
    return config


def embedding_window(model: str) -> int | None:
    """How many word pieces the sentence-transformers embedder reads (its `max_seq_length`), where its folder is on
    this machine (the packaged MiniLM: 256); None where it cannot be read here."""
    import json

    from ragtune.core.models import ModelLoadError, resolve_embedding

    try:
        folder = Path(resolve_embedding(model))
    except ModelLoadError:
        return None
    settings = folder / "sentence_bert_config.json"
    if not settings.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "sentence_bert_config.json")
        settings = Path(cached) if isinstance(cached, str) else settings
    if not settings.is_file():
        return None
    window = json.loads(settings.read_text(encoding="utf-8")).get("max_seq_length")
    return window if isinstance(window, int) else None


def embedding_window_warnings(config: RagtuneConfig) -> list[tuple[str, str]]:
    """Chunks longer than the embedder reads: it truncates each to its window, so retrieval, the round-trip, leakage
    and near-duplicate checks see only the chunk's beginning (the packaged MiniLM reads 256 word pieces). A warning,
    not an error: a longer chunk still gives the teacher and the student the whole text."""
    if config.retriever is not None:  # your index's nodes are the chunks: ragtune splits nothing
        return []
    window = embedding_window(config.embedding.model)
    size = config.data_prep.chunk_size
    if window is None or size <= window:
        return []
    return [("data_prep.chunk_size", f"{size} tokens, but embedding.model {config.embedding.model} reads "
             f"{window} word pieces (its max_seq_length): retrieval and the leakage, near-duplicate and round-trip "
             f"checks see only the first ~{window} of each chunk. Set data_prep.chunk_size: {window} or lower, or an "
             "embedding model with a longer window (e.g. BAAI/bge-base-en-v1.5, 512).")]


def answer_gates_from_overrides(overrides: list[str] | tuple[str, ...]) -> AnswerGates:
    """ragtune's default `data_prep.answer_gates` with `--set data_prep.answer_gates.KEY=VALUE` applied, parsed as
    `load_config` parses them: `ragtune gates` without a config file."""
    prefix = "data_prep.answer_gates."
    raw: dict[str, Any] = {}
    for item in overrides:
        if not item.startswith(prefix):
            raise ConfigError(f"--set {item!r}: without --config only {prefix}KEY=VALUE can be set")
        _apply_override(raw, item, {})
    try:
        return AnswerGates.model_validate(_yaml12_floats(raw).get("data_prep", {}).get("answer_gates", {}))
    except ValidationError as err:
        problem = err.errors()[0]
        raise ConfigError(f"--set {prefix}{'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None


def shared_server_errors(config: RagtuneConfig) -> list[tuple[str, str]]:
    """A judge on the teacher's model runs on the teacher's managed server (`gpu_plan`); engine arguments of its own
    would mean another server, restarted (a 70B load) between every teacher batch and judge call."""
    teacher, judge = config.teacher, config.judge
    managed = all(r.backend == "vllm" and not r.base_url for r in (teacher, judge))
    if managed and judge.model == teacher.model and judge.engine_args and judge.engine_args != teacher.engine_args:
        return [("judge.engine_args", "the judge runs on the teacher's model, so on the teacher's managed server: "
                                      "set its engine arguments once, under teacher.engine_args")]
    return []


def sweep_key_errors(config: RagtuneConfig) -> list[tuple[str, str]]:
    """Each searched key at its edge values (low and high, or every choice) through the `train:` section's own
    checks (TRL's SFTConfig, PEFT): a typo or an impossible range fails at load, not after hours of trials."""
    if config.sweep is None:
        return []
    for key, param in config.sweep.params.items():
        for value in param.edge_values():
            raw = config.train.model_dump()
            section = raw
            *parents, leaf = key.split(".")[1:]
            for part in parents:
                section = section.setdefault(part, {})
                if not isinstance(section, dict):
                    return [(f"sweep.params.{key}", f"`train.{part}` is not a section, it has no keys to search")]
            section[leaf] = value
            try:
                problems = library_key_errors(TrainConfig.model_validate(raw))
            except ValidationError as err:
                problems = [(key, err.errors()[0]["msg"])]
            if problems:
                return [(f"sweep.params.{key}", f"{value!r} fails the train checks: {problems[0][1]}")]
    return []


def _load_with_bases(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, tuple[Path, int]]]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found. Pass the path to a YAML config (see configs/).")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to this file.")
    try:
        text = read_text(path)
    except NotUtf8Error as err:
        raise ConfigError(str(err)) from None
    try:
        raw = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: malformed YAML ({problem}). Check indentation and `key: value` syntax on that line.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}.")
    lines: dict[str, tuple[Path, int]] = {}
    _collect_lines(node, "", path, lines)
    base = raw.pop("base", None)
    if base is None:
        return raw, lines
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    base_raw, base_lines = _load_with_bases(base_path, seen + (path.resolve(),))
    return _deep_merge(base_raw, raw), {**base_lines, **lines}


def _collect_lines(node: yaml.Node | None, prefix: str, path: Path, out: dict[str, tuple[Path, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[key] = (path, key_node.start_mark.line + 1)
            _collect_lines(value_node, key, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}[{i}]"
            out[key] = (path, item.start_mark.line + 1)
            _collect_lines(item, key, path, out)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _apply_override(raw: dict[str, Any], item: str, lines: dict[str, tuple[Path, int]]) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.num_train_epochs=1")
    key_path, value_text = item.split("=", 1)
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    target = raw
    parts = key_path.strip().split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: `{part}` is not a section, cannot set a key inside it.")
    target[parts[-1]] = value
    lines[key_path.strip()] = (Path("--set"), 0)


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml12_floats(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads `2e-4` as a string; every YAML 1.2 reader and every user means a float."""
    if isinstance(value, dict):
        return {k: _yaml12_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml12_floats(v) for v in value]
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        return float(value)
    return value


def _flat_keys(raw: Any, prefix: str = "") -> list[str]:
    if not isinstance(raw, dict):
        return []
    keys = []
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        keys.append(full)
        keys.extend(_flat_keys(value, full))
    return keys


def _where(path: Path, key_path: str, lines: dict[str, tuple[Path, int]]) -> str:
    file, line = lines.get(key_path, lines.get(key_path.split("[")[0], (path, 0)))
    if str(file) == "--set":
        return f"--set {key_path}"
    return f"{file}:{line}: {key_path}" if line else f"{file}: {key_path}"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = RagtuneConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _explain_validation(path: Path, err: ValidationError, raw: dict[str, Any], lines: dict[str, tuple[Path, int]]) -> str:
    messages = []
    for issue in err.errors():
        loc = tuple(issue["loc"])
        key_path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        where = _where(path, key_path, lines)
        kind = issue["type"]
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            valid = [name for name in valid if name not in ("config_path", "document_paths")]
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else f" Valid keys here: {', '.join(valid)}."
            messages.append(f"{where}: unknown key.{hint}")
        elif kind == "missing":
            messages.append(f"{where}: required key is missing. Add it to the config.")
        else:
            got = issue.get("input")
            messages.append(f"{where}: {issue['msg']} (got {got!r}).")
    return "\n".join(messages)


def _resolve_documents(path: Path, documents: list[str], lines: dict[str, tuple[Path, int]]) -> list[Path]:
    """Expand files, globs and folders (relative to the working directory) into a sorted list of files."""
    found: list[Path] = []
    for i, entry in enumerate(documents):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True))
        files: list[Path] = []
        for match in matches:
            if match.is_dir():
                files.extend(sorted(p for p in match.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES))
            elif match.is_file() and match.suffix.lower() not in DOCUMENT_SUFFIXES:
                raise ConfigError(
                    f"{_where(path, f'documents[{i}]', lines)}: {match} is a {match.suffix or 'suffix-less'} file; "
                    f"ragtune reads {', '.join(DOCUMENT_SUFFIXES)}. Convert it or remove it from `documents:`."
                )
            elif match.is_file():
                files.append(match)
        if not files:
            raise ConfigError(
                f"{_where(path, f'documents[{i}]', lines)}: no document found at {entry!r} "
                f"(resolved against {Path.cwd()}). Point it at a file, glob or folder of "
                f"{', '.join(DOCUMENT_SUFFIXES)} files."
            )
        found.extend(p.resolve() for p in files)
    return list(dict.fromkeys(found))
