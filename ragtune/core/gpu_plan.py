"""Which GPUs each part of a run uses: the `gpus:` config section and the plan ragtune derives from it.

The stages run one after another, yet their parts want different GPUs: a bf16 70B teacher (~132 GiB) needs tensor
parallelism over several GPUs, training wants one `accelerate launch` process per GPU of its own, eval's student
fits on one. The plan gives each managed vLLM server its GPUs (`CUDA_VISIBLE_DEVICES`) and the engine arguments to
match (`tensor_parallel_size`, `gpu_memory_utilization`, a `max_model_len` the config needs instead of the model's
128k), gives training its processes, and places eval's student. `ragtune run --dry-run` prints it; the stages start
their servers from it. Without GPUs (and without `gpus.count`) the plan is the CPU one: servers as before.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from ragtune.core.roles import ConfigError, Strict

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig
    from ragtune.core.roles import LLMRole

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
# vLLM's own default share of each GPU's memory, on GPUs a server has to itself.
GPU_MEMORY_UTILIZATION = 0.9
# On GPU 0 ragtune's own process keeps its embedding model (and an `hf` judge) beside the server; vLLM refuses to
# start when the share it asks for is not free, so a server there asks for less.
SHARED_GPU_MEMORY_UTILIZATION = 0.8
# Tokens of a prompt besides its retrieved contexts: the teacher's (and student's) system prompt, template and
# question (~150 on the demo's SmolLM2 tokenizer: 4x margin); Ragas's judge instructions with few-shot examples.
RAG_PROMPT_TOKENS = 512
JUDGE_PROMPT_TOKENS = 2048
CONTEXT_STEP = 1024  # max_model_len is rounded up to a multiple of this


class GpusConfig(Strict):
    """`gpus:` which GPUs (as this machine numbers them) each part uses; unset parts are decided by ragtune:
    the teacher gets the upper half (the largest power of two up to half the GPUs, since tensor parallelism must
    divide the model's attention heads), training the rest, eval the first of training's."""

    count: int | None = Field(None, ge=0)  # GPUs the plan is for; default: the ones this machine has
    teacher: list[int] | None = None  # the managed vLLM servers of the teacher and the judge (one runs at a time)
    train: list[int] | None = None  # one `accelerate launch` process per GPU
    eval: list[int] | None = None  # eval's student on its managed vLLM server (`eval.backend: vllm`)

    @field_validator("teacher", "train", "eval")
    @classmethod
    def _indices(cls, gpus: list[int] | None) -> list[int] | None:
        if gpus is not None and (not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0):
            raise ValueError("give distinct GPU indices (0, 1, ...), at least one")
        return gpus

    @model_validator(mode="after")
    def _within_count(self) -> "GpusConfig":
        for part in ("teacher", "train", "eval"):
            gpus = getattr(self, part)
            if self.count is not None and gpus and max(gpus) >= self.count:
                raise ValueError(f"gpus.{part} names GPU {max(gpus)}, but gpus.count is {self.count} (GPUs 0-"
                                 f"{self.count - 1}); raise gpus.count or change gpus.{part}")
        return self


@dataclass(frozen=True)
class ServerPlan:
    """One managed vLLM server's place: its GPUs (none: the CPU) and what it starts with."""

    gpus: tuple[int, ...]
    dtype: str  # --dtype
    # vLLM engine arguments by vLLM's own names: the plan's (parallelism, memory, context), then the config's
    engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuPlan:
    count: int  # GPUs the plan is for (declared by gpus.count, or this machine's)
    available: int  # GPUs this machine has
    teacher: ServerPlan | None  # None: the role is not a managed vLLM server (hf in-process, or a base_url)
    judge: ServerPlan | None
    eval: ServerPlan | None  # eval's student server (`eval.backend: vllm`)
    train: tuple[int, ...]
    eval_gpus: tuple[int, ...]

    def named(self) -> list[int]:
        """Every GPU the plan uses."""
        parts = [self.train, self.eval_gpus, *(s.gpus for s in (self.teacher, self.judge, self.eval) if s)]
        return sorted({gpu for gpus in parts for gpu in gpus})

    def missing(self) -> list[int]:
        """GPUs the plan names that this machine lacks."""
        return [gpu for gpu in self.named() if gpu >= self.available]

    def train_command(self, config_path: str | Path) -> str:
        """The `accelerate launch` line that trains on the plan's GPUs (one process per GPU)."""
        processes = max(len(self.train), 1)
        accelerate_config = ACCELERATE_CONFIGS / ("ddp.yaml" if processes > 1 else "single_gpu.yaml")
        line = (f"accelerate launch --config_file {shlex.quote(_shown(accelerate_config))} --num_processes {processes} "
                f"-m ragtune.train {shlex.quote(_shown(Path(config_path)))}")
        return f"CUDA_VISIBLE_DEVICES={visible_devices(self.train)} {line}" if self.train else line


def machine_gpus() -> int:
    """The CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count()


def visible_devices(gpus: tuple[int, ...] | list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for a child process: the plan's indices, mapped through ragtune's own
    CUDA_VISIBLE_DEVICES when it is set (index i is then the i-th GPU it lists)."""
    own = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ",".join(own[g] if own and g < len(own) else str(g) for g in gpus)


def default_split(count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(teacher, train) GPUs when `gpus:` names none: the teacher on the upper power-of-two half, training below."""
    if count <= 1:
        return tuple(range(count)), tuple(range(count))
    teacher = 1 << ((count // 2).bit_length() - 1)
    return tuple(range(count - teacher, count)), tuple(range(count - teacher))


def gpu_plan(config: "RagtuneConfig", available: int | None = None) -> GpuPlan:
    """The plan for `config` on this machine (`available`: its GPU count, probed when None)."""
    available = machine_gpus() if available is None else available
    gpus = config.gpus
    named = [g for part in (gpus.teacher, gpus.train, gpus.eval) for g in part or ()]
    count = gpus.count if gpus.count is not None else max([available, *(g + 1 for g in named)])
    teacher, train = default_split(count)
    if gpus.teacher and gpus.train:
        teacher, train = tuple(gpus.teacher), tuple(gpus.train)
    elif gpus.teacher:
        teacher, train = tuple(gpus.teacher), _rest(count, gpus.teacher)
    elif gpus.train:
        teacher, train = _rest(count, gpus.train), tuple(gpus.train)
    eval_gpus = tuple(gpus.eval) if gpus.eval else train[:1]

    needs = context_needs(config)
    # a judge on the teacher's model (a 70B teacher judging) is served by the teacher's server, sized for both
    shared = _managed(config.judge) and config.judge.model == config.teacher.model
    servers: dict[str, ServerPlan | None] = {}
    for name in ("teacher", "judge"):
        role: LLMRole = getattr(config, name)
        need = max(needs["teacher"], needs["judge"]) if shared else needs[name]
        servers[name] = _server(f"{name}.engine_args", role.engine_args, teacher, role.torch_dtype,
                                "torch_dtype" in role.model_fields_set, need, "gpus.teacher") if _managed(role) else None
    if shared and servers["teacher"]:
        servers["judge"] = servers["teacher"]
    student = config.student
    eval_server = _server("eval.engine_args", config.eval.engine_args, eval_gpus, student.torch_dtype,
                          "torch_dtype" in student.model_fields_set, needs["eval"], "gpus.eval"
                          ) if config.eval.backend == "vllm" else None
    return GpuPlan(count=count, available=available, teacher=servers["teacher"], judge=servers["judge"],
                   eval=eval_server, train=train, eval_gpus=eval_gpus)


def context_needs(config: "RagtuneConfig") -> dict[str, int]:
    """Per part, the longest prompt + answer its server sees, rounded up: the `max_model_len` a GPU server gets
    instead of the model's own (128k for Llama 3: vLLM then sizes its scheduling and warm-up for it)."""
    prep = config.data_prep
    contexts = prep.similarity_top_k * prep.chunk_size
    if prep.raft.enabled:
        contexts = max(contexts, prep.raft_contexts * prep.chunk_size)
    answer = max(config.teacher.max_new_tokens, config.eval.max_new_tokens)  # what the judge reads
    tokens = {"teacher": RAG_PROMPT_TOKENS + contexts + config.teacher.max_new_tokens,
              "judge": JUDGE_PROMPT_TOKENS + contexts + answer + config.judge.max_new_tokens,
              "eval": RAG_PROMPT_TOKENS + contexts + config.eval.max_new_tokens}
    return {part: -(-n // CONTEXT_STEP) * CONTEXT_STEP for part, n in tokens.items()}


def _managed(role: "LLMRole") -> bool:
    """Whether ragtune starts the role's vLLM server (`backend: vllm` without `base_url`)."""
    return role.backend == "vllm" and not role.base_url


def _rest(count: int, taken: list[int]) -> tuple[int, ...]:
    """The GPUs another part leaves free, or all of them when it takes every one (the stages take turns)."""
    return tuple(g for g in range(count) if g not in taken) or tuple(range(count))


def _server(key: str, engine_args: dict[str, Any], gpus: tuple[int, ...], dtype: str, dtype_set: bool,
            max_model_len: int, gpus_key: str) -> ServerPlan:
    """A managed server on `gpus`: on none, the CPU server as the engine starts it; on some, tensor parallelism over
    all of them (divided by any pipeline or data parallelism asked for), its memory share and context length."""
    if not gpus:
        return ServerPlan((), dtype, dict(engine_args))
    others = engine_args.get("pipeline_parallel_size", 1) * engine_args.get("data_parallel_size", 1)
    defaults = {"tensor_parallel_size": max(len(gpus) // others, 1),
                "gpu_memory_utilization": SHARED_GPU_MEMORY_UTILIZATION if 0 in gpus else GPU_MEMORY_UTILIZATION,
                "max_model_len": max_model_len}
    args = {**defaults, **engine_args}
    used = args["tensor_parallel_size"] * others
    if used != len(gpus):
        raise ConfigError(f"{key}: tensor_parallel_size {args['tensor_parallel_size']} x pipeline_parallel_size x "
                          f"data_parallel_size = {used} GPUs, but {gpus_key} gives this server {len(gpus)} "
                          f"({', '.join(map(str, gpus))}); make them equal (or leave tensor_parallel_size to the plan).")
    # the CPU default float32 is no GPU serving format: unset, the checkpoint's own dtype (vLLM's `auto`)
    return ServerPlan(tuple(gpus), dtype if dtype_set else "auto", args)


def _shown(path: Path) -> str:
    """A path as the user would type it here: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
