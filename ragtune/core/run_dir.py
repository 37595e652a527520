"""The run directory: every artifact a run makes, under one `output_dir`, with stable names.

Stages talk to each other only through these files, so each stage can be cached, resumed and
inspected on its own. `manifest.json` records the resolved config, package versions, git commit,
input hashes and per-stage timings and fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from ragtune.core.artifacts import TMP_SUFFIX, write_json
from ragtune.core.errors import UserFacingError

log = logging.getLogger(__name__)

# Written into every run folder ragtune locks (`mark_run_folder`): the folder is ragtune's, and ragtune may remove
# its own temporaries there. Run folders of older versions have manifest.json or .ragtune.lock instead.
RUN_MARKER = ".ragtune-run"
RUN_SIGNS = (RUN_MARKER, "manifest.json", ".ragtune.lock")
# Every name ragtune writes at the top of a run folder: RunDir's layout, the lock and its holder, `--repeats`'
# and `sweep`'s folders and study, a report's `compare/`, the config.yaml of a repeat or trial.
RUN_LAYOUT = frozenset({
    "data", "checkpoints", "adapter", "merged", "logs", "eval", "stale", "repeats", "sweep", "compare",
    "manifest.json", "report.html", "report.md", "config.yaml", "sweep.db", "sweep.db-journal", "sweep.db-wal",
    "sweep.db-shm", ".ragtune.lock", ".ragtune.lock.json", RUN_MARKER,
})


class NotARunFolder(UserFacingError):
    """`output_dir` is a folder ragtune must not fill: the file system's root, the home folder, or someone else's."""


def check_run_folder(output_dir: str | Path) -> None:
    """Refuse an `output_dir` that is not ragtune's to write in, before anything is written there.

    Allowed: a folder that does not exist yet, an empty one, a ragtune run (RUN_SIGNS), or one that holds only
    names of ragtune's layout (RUN_LAYOUT): a `data/train.jsonl` of your own put where `ragtune train` reads it is
    such a folder. Refused, whatever they hold: `/` and the home folder. Anything else is a foreign folder.
    """
    root = Path(output_dir).expanduser()
    resolved = root.resolve()
    if resolved == Path(resolved.anchor):
        raise NotARunFolder(f"output_dir: {root} is the file system's root; a run writes data/, eval/, adapter/ and "
                            "more into its folder. Point `output_dir` at a new folder, e.g. ~/ragtune-runs/NAME.")
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no password entry: no home folder to protect
        home = None
    if resolved == home:
        raise NotARunFolder(f"output_dir: {root} is your home folder; a run writes data/, eval/, adapter/ and more "
                            f"into its folder. Point `output_dir` at a new folder, e.g. {home}/ragtune-runs/NAME.")
    if not root.is_dir():
        return  # new (made by the lock), or a path the lock reports as impossible to create
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return  # unreadable: the write check (dry run, preflight) or the lock names the folder and the reason
    if any(sign in names for sign in RUN_SIGNS):
        return
    foreign = [name for name in names if name not in RUN_LAYOUT and not name.endswith(TMP_SUFFIX)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise NotARunFolder(f"output_dir: {root} is a non-empty folder that is not a ragtune run (it holds {shown}; a "
                            f"run has {RUN_MARKER} or manifest.json). Point `output_dir` at a new or empty folder, "
                            f"e.g. {root / 'ragtune-run'}.")


def mark_run_folder(output_dir: str | Path) -> None:
    """Write RUN_MARKER into a run folder that lacks it (a read-only folder stays unmarked: nothing is written)."""
    marker = Path(output_dir) / RUN_MARKER
    if marker.exists():
        return
    try:
        marker.write_text("This folder is a ragtune run: ragtune writes here and removes only its own temporaries "
                          f"(*{TMP_SUFFIX}, safetensors' .tmpXXXXXX in adapter/, merged/, checkpoints/*/).\n",
                          encoding="utf-8")
    except OSError as err:
        log.info("cannot mark %s as a ragtune run: %s", output_dir, err)

class NotSharedFolder(UserFacingError):
    """Training processes that do not all see one run folder (multi-node without a shared filesystem)."""


def check_shared_folder(output_dir: str | Path) -> None:
    """Every training process must see the same run folder: rank 0 alone writes adapter/, checkpoints' trainer state
    and the manifest, and every rank reads data/ and resumes from checkpoints/. On several nodes that needs a
    shared filesystem; a node with a folder of its own would train on its own copy of the data and resume from
    nothing. Rank 0 writes a random token into the folder and every rank reads it back; any rank that cannot
    raises, on all ranks alike, naming the hosts. One process (or no process group yet): nothing to check."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    # a temporary of rank 0's pid: the next run's cleanup removes it if this process dies before it does
    shared: list[Any] = [f".ragtune-ranks.{os.getpid()}{TMP_SUFFIX}", os.urandom(8).hex()]
    if dist.get_rank() == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / shared[0]).write_text(shared[1], encoding="utf-8")
    dist.broadcast_object_list(shared, src=0)
    probe = Path(output_dir) / shared[0]
    try:
        seen = probe.read_text(encoding="utf-8") == shared[1]
    except OSError:
        seen = False
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (socket.gethostname(), str(Path(output_dir).resolve()), seen))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host} ({folder})" for rank, (host, folder, ok) in enumerate(ranks) if not ok]
    if blind:
        raise NotSharedFolder(
            f"{len(blind)} of {len(ranks)} training processes do not see the run folder rank 0 writes "
            f"({ranks[0][1]} on {ranks[0][0]}): {'; '.join(blind)}. Put output_dir on a filesystem every node mounts "
            "at the same path (NFS, Lustre, a cloud file share), then launch again.")


KEY_PACKAGES = (
    "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets",
    "llama-index-core", "ragas", "sentence-transformers", "xgrammar",
)


@dataclass(frozen=True)
class RunDir:
    root: Path

    # data_prep
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def chunks(self) -> Path:
        return self.data / "chunks.jsonl"

    @property
    def index(self) -> Path:
        return self.data / "index"

    @property
    def questions_train(self) -> Path:
        return self.data / "questions.train.jsonl"

    @property
    def questions_eval(self) -> Path:
        return self.data / "questions.eval.jsonl"

    @property
    def questions_raw(self) -> Path:
        """The teacher's question generations per chunk (resume log of the questions step)."""
        return self.data / "questions.raw.jsonl"

    @property
    def questions_rejected(self) -> Path:
        """Every generated question that was dropped, with its reason."""
        return self.data / "questions.rejected.jsonl"

    @property
    def teacher_failures(self) -> Path:
        """Every failed teacher call of prep (retried on the next run), with its error."""
        return self.data / "teacher_failures.jsonl"

    @property
    def teacher_logprobs(self) -> Path:
        """Per RAG training row (by `id`), the teacher's answer tokens and top-k log-probs
        (`data_prep.teacher_top_logprobs`); the train stage reads it for `train.distillation`."""
        return self.data / "teacher_logprobs.jsonl"

    @property
    def answers_rejected(self) -> Path:
        """Every teacher answer the gates rejected, with its reason and raw text (nothing is lost)."""
        return self.data / "answers.rejected.jsonl"

    @property
    def prep_state(self) -> Path:
        """Fingerprint and completion of each prep sub-step, so a rerun skips finished ones."""
        return self.data / "prep_state.json"

    @property
    def train_jsonl(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def stats(self) -> Path:
        return self.data / "stats.json"

    # train
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data_stats(self) -> Path:
        """Token statistics of the training rows with the student's tokenizer (the train stage writes them)."""
        return self.logs / "data_stats.json"

    @property
    def loss_curve(self) -> Path:
        return self.logs / "loss_curve.json"

    # eval
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def answers(self, model: str, mode: str) -> Path:
        return self.eval / f"answers.{model}.{mode}.jsonl"

    def scores(self, model: str, mode: str) -> Path:
        return self.eval / f"scores.{model}.{mode}.jsonl"

    @property
    def retrieval(self) -> Path:
        return self.eval / "retrieval.jsonl"

    @property
    def judge_sanity(self) -> Path:
        return self.eval / "judge_sanity.jsonl"

    @property
    def per_question_csv(self) -> Path:
        return self.eval / "per_question.csv"

    @property
    def summary(self) -> Path:
        return self.eval / "summary.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def stale(self) -> Path:
        """Outputs made under other inputs, moved aside by `retire` (never reused, never lost)."""
        return self.root / "stale"

    def retire(self, paths: list[Path]) -> Path | None:
        """The one policy for stale outputs, in every stage: move them to `stale/<time>/<their path in the run>`.
        Teacher answers and checkpoints cost hours; a changed setting must not delete them."""
        existing = [p for p in paths if p.exists()]
        if not existing:
            return None
        folder = self.stale / time.strftime("%Y%m%d-%H%M%S")
        for path in existing:
            try:
                relative = path.resolve().relative_to(self.root.resolve())
            except ValueError:
                relative = Path(path.name)
            target = folder / relative
            while target.exists():
                target = target.with_name(target.name + "~")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), target)
        log.info("moved %d stale output(s) to %s", len(existing), folder)
        return folder


def short_hash(*parts: Any) -> str:
    """The fingerprint of JSON-able values: 16 hex digits of their canonical JSON's SHA-256."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def git_commit(repo: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


class Manifest:
    """Reads and updates `manifest.json`; every write is atomic so a killed run never corrupts it."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.manifest
        self.data: dict[str, Any] = {}
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        self.data.setdefault("stages", {})

    def save(self) -> None:
        write_json(self.path, self.data, default=str)

    def record_run(self, resolved_config: dict[str, Any], input_hashes: dict[str, str]) -> None:
        self.data.update(
            config=resolved_config,
            versions=package_versions(),
            git_commit=git_commit(),
            inputs=input_hashes,
        )
        self.save()

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def update_stage(self, name: str, **fields: Any) -> None:
        self.stage(name).update(fields)
        self.save()

    @contextmanager
    def timed_stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the yielded dict collects stage facts (counts, warnings) for the manifest."""
        facts: dict[str, Any] = {}
        started = time.time()
        self.update_stage(name, status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            yield facts
        except BaseException as err:
            self.update_stage(name, status="failed", error=f"{type(err).__name__}: {err}",
                              seconds=round(time.time() - started, 2), **facts)
            raise
        self.update_stage(name, status="done", seconds=round(time.time() - started, 2), error=None, **facts)
