"""One ragtune per run folder: `RunLock(output_dir)` is held for a whole command that writes into the folder.

Two commands on one folder would both do the teacher's work, resume each other's live stage and rename each
other's files. The lock is `filelock`'s OS lock (`flock` on Linux), so the kernel releases it when its holder
dies, even by kill -9: a dead holder's lock is taken over without a stale-lock timeout. A sidecar JSON names the
holder (pid, start time, command) for the message the second command prints at once instead of waiting.

Holding the lock also makes the folder's leftovers safe to remove: no live ragtune writes there, so any
temporary file of ragtune's is debris of a killed one (`clean_temporaries`). Before it locks, the folder must be
ragtune's (`run_dir.check_run_folder`: new, empty, or a run; never `/` or the home folder); once locked it is
marked as a run (`.ragtune-run`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ragtune.core.artifacts import TMP_SUFFIX, write_json
from ragtune.core.errors import UserFacingError
from ragtune.core.run_dir import RunDir, check_run_folder, mark_run_folder

log = logging.getLogger(__name__)

LOCK_NAME = ".ragtune.lock"
HOLDER_NAME = ".ragtune.lock.json"
# The holder writes its sidecar right after it takes the lock; a loser that reads in between waits this long.
HOLDER_READ_SECONDS = 1.0


class RunFolderInUse(UserFacingError):
    """Another live ragtune holds the run folder's lock."""


class RunLock:
    """Exclusive, non-blocking lock on a run folder; use as `with RunLock(config.output_dir): ...`.

    A folder this process cannot write to is not locked (a process that cannot write cannot corrupt it);
    the stage that needs to write reports the folder itself.
    """

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.lock_path = self.root / LOCK_NAME
        self.holder_path = self.root / HOLDER_NAME
        self._lock: Any = None

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        check_run_folder(self.root)  # before anything is written: `/`, home and foreign folders are refused
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.lock_path, timeout=0)
            lock.acquire()
        except Timeout:
            raise RunFolderInUse(self._in_use_message()) from None
        except PermissionError as err:
            log.info("not locking %s: %s (read-only folder)", self.root, err)
            return
        except OSError as err:
            if err.errno == errno.EROFS:
                log.info("not locking %s: read-only file system", self.root)
                return
            if err.errno not in (errno.ENOSYS, errno.ENOLCK):
                raise
            log.warning("cannot lock %s (%s: a file system without flock, e.g. some NFS mounts); running unlocked: "
                        "start only one ragtune on this folder", self.root, err.strerror)
            return
        self._lock = lock
        mark_run_folder(self.root)
        write_json(self.holder_path, {"pid": os.getpid(), "started": datetime.now().isoformat(timespec="seconds"),
                                      "command": " ".join(["ragtune", *sys.argv[1:]])})
        removed = clean_temporaries(self.root)
        if removed:
            log.warning("removed %d temporary file(s) left by a killed ragtune in %s: %s", len(removed), self.root,
                        ", ".join(str(p.relative_to(self.root)) for p in removed[:5]))

    def release(self) -> None:
        if self._lock is None:
            return
        self.holder_path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def _in_use_message(self) -> str:
        holder = _read_holder(self.holder_path)
        who = (f"pid {holder.get('pid')}, started {holder.get('started')}: `{holder.get('command')}`" if holder
               else f"its pid is not recorded yet in {self.holder_path}")
        pid = holder.get("pid", "PID")
        return (f"{self.root} is in use by another ragtune ({who}). Two commands on one output_dir overwrite each "
                f"other's files: wait for it to finish, or stop it (kill {pid}) and run again.")

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + HOLDER_READ_SECONDS
    while True:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.05)


# What a killed ragtune leaves, and all that `clean_temporaries` removes: `tmp_path`'s `name.<random>.<pid>.ragtune-tmp`
# (JSON, JSONL, the report's CSV, the index folder) in the run's own folders, and safetensors' `.tmpXXXXXX` (Rust
# tempfile, renamed into place when complete) directly in the folders that hold weights: adapter/, merged/ and the
# Trainer's checkpoints/checkpoint-N/ (a kill during merge leaves a 538 MB one). Older versions' `name.<pid>.tmp`
# leftovers are left alone: that name is not ragtune's alone.
_RAGTUNE_TMP = re.compile(r"\.(\d+)" + re.escape(TMP_SUFFIX) + "$")
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
_NESTED_RUNS = ("repeats", "sweep")  # `--repeats` and `sweep` put whole run folders in these


def clean_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporaries killed ragtune runs left in `run_dir`'s own folders; returns what was removed.

    Only ragtune's names, only in the run's layout (`_run_folders`), never through a symbolic link: a user's
    `notes.tmp`, a `build.tmp/` folder or a link named like a temporary stay. Call it only while holding the
    folder's `RunLock` (RunLock.acquire does): a `.<pid>.ragtune-tmp` of a live process is kept anyway, for
    launcher ranks that write beside the lock holder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        return []
    removed = []
    for folder, holds_weights in _run_folders(root):
        for entry in _entries(folder):
            if entry.is_symlink() or not _is_leftover(entry.name, holds_weights and entry.is_file()):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError as err:
                log.warning("could not remove the temporary %s: %s", entry.path, err)
                continue
            removed.append(Path(entry.path))
    return sorted(removed)


def _run_folders(root: Path, nested: bool = True) -> list[tuple[Path, bool]]:
    """(folder, holds safetensors weights) for each folder of the run where ragtune writes: the run folder,
    RunDir's data/, eval/, logs/, checkpoints/ and its checkpoint folders, adapter/, merged/, a report's compare/,
    and the run folders of `--repeats` and `sweep` with theirs. Links (a repeat's data/ is one) are not entered."""
    run = RunDir(root)
    folders = [(root, False), (run.data, False), (run.eval, False), (run.logs, False), (run.checkpoints, False),
               (run.adapter, True), (run.merged, True), (root / "compare", False)]
    folders += [(Path(e.path), True) for e in _entries(run.checkpoints) if e.is_dir(follow_symlinks=False)]
    for name in _NESTED_RUNS if nested else ():
        folders.append((root / name, False))
        for child in _entries(root / name):
            if child.is_dir(follow_symlinks=False):
                folders += _run_folders(Path(child.path), nested=False)
    return [(folder, weights) for folder, weights in folders if folder.is_dir() and not folder.is_symlink()]


def _entries(folder: Path) -> list[os.DirEntry]:
    if folder.is_symlink() or not folder.is_dir():
        return []
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _is_leftover(name: str, weights_file: bool) -> bool:
    pid = _RAGTUNE_TMP.search(name)
    if pid:
        return not _alive(int(pid.group(1)))
    return weights_file and bool(_SAFETENSORS_TMP.match(name))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
