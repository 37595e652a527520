"""One ragtune per run folder: `RunLock(output_dir)` is held for a whole command that writes into the folder.

Two commands on one folder would both do the teacher's work, resume each other's live stage and rename each
other's files. The lock is `filelock`'s OS lock (`flock` on Linux), so the kernel releases it when its holder
dies, even by kill -9: a dead holder's lock is taken over without a stale-lock timeout. A sidecar JSON names the
holder (pid, start time, command) for the message the second command prints at once instead of waiting.

Holding the lock also makes the folder's leftovers safe to remove: no live ragtune writes there, so any
temporary file is debris of a killed one (`clean_temporaries`).
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

from ragtune.core.artifacts import write_json
from ragtune.core.errors import UserFacingError

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
        write_json(self.holder_path, {"pid": os.getpid(), "started": datetime.now().isoformat(timespec="seconds"),
                                      "command": " ".join(["ragtune", *sys.argv[1:]])})
        removed = clean_temporaries(self.root)
        if removed:
            log.warning("removed %d temporary file(s) left by a killed run in %s: %s", len(removed), self.root,
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


# What a killed writer leaves: `tmp_path`'s `name.<random>.<pid>.tmp` (JSON, JSONL, the report's CSV, the index
# folder), an older version's `name.tmp`, and safetensors' `.tmpXXXXXX` (Rust tempfile, renamed into place when complete; merged/ and
# adapter/ saves write through it, a kill during merge leaves a 538 MB one).
_PID_TMP = re.compile(r"\.(\d+)\.tmp$")
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def clean_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files and folders killed runs left in `run_dir`; returns what was removed.

    Call it only while holding the folder's `RunLock` (RunLock.acquire does): a `.<pid>.tmp` of a live process
    is kept anyway, for launcher ranks that write beside the lock holder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.rglob("*tmp*")):
        if not os.path.lexists(path) or not _is_leftover(path):  # gone with a removed parent folder
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _is_leftover(path: Path) -> bool:
    name = path.name
    pid = _PID_TMP.search(name)
    if pid:
        return not _alive(int(pid.group(1)))
    return name.endswith(".tmp") or bool(_SAFETENSORS_TMP.match(name))


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
