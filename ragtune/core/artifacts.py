"""Plain-file artifacts that flow between stages: JSONL rows, appended as they arrive.

A stage killed with -9 may leave a half-written last line; `read_jsonl(..., tolerate_torn_tail=True)`
drops only that torn line so a resumed stage redoes exactly that one row.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ragtune.core.errors import UserFacingError


class ArtifactError(UserFacingError, ValueError):
    """A JSONL artifact cannot be read; the message names the file and line."""


class NotUtf8Error(UserFacingError, ValueError):
    """A file ragtune reads (config, JSONL, document) is not UTF-8; the message names the file and line."""


def decode_utf8(data: bytes, path: str | Path) -> str:
    """`data` as UTF-8 text, or NotUtf8Error naming `path:line` and the byte: a file saved as UTF-16 or Latin-1
    must fail in one line the user can act on, not in a UnicodeDecodeError traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        guess = " (a UTF-16 byte-order mark: the file was saved as UTF-16)" if utf16 else ""
        raise NotUtf8Error(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}{guess}). "
                           "Re-save the file as UTF-8 and run again.") from None


def read_text(path: str | Path) -> str:
    """The whole file as UTF-8 text; bad bytes raise NotUtf8Error naming the line."""
    return decode_utf8(Path(path).read_bytes(), path)


def iter_jsonl(path: str | Path, *, tolerate_torn_tail: bool = False,
               on_error: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, row) for every non-empty line; line numbers are 1-based. A bad line raises
    ArtifactError naming it, or, with `on_error(line_number, problem)`, is reported there and skipped (to list
    every bad line at once)."""
    path = Path(path)
    data = path.read_bytes()
    if tolerate_torn_tail and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            data[cut:].decode("utf-8")
        except UnicodeDecodeError:  # a kill cut a multi-byte character: the torn line, dropped like any other
            data = data[:cut]
    lines = io.StringIO(decode_utf8(data, path), newline=None).readlines()  # split as open() does, not at U+2028
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            is_last = number == len(lines) and not line.endswith("\n")
            if tolerate_torn_tail and is_last:
                return
            problem = f"not valid JSON ({err.msg} at column {err.colno})"
        else:
            if isinstance(row, dict):
                yield number, row
                continue
            problem = f"expected a JSON object per line, got {type(row).__name__}"
        if on_error is None:
            raise ArtifactError(f"{path}:{number}: {problem}. Fix or delete that line and run again.")
        on_error(number, problem)


def read_jsonl(path: str | Path, *, tolerate_torn_tail: bool = False) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path, tolerate_torn_tail=tolerate_torn_tail)]


# The suffix of every temporary ragtune writes itself: `clean_temporaries` removes only names that end in it, so a
# user's `notes.tmp` is never taken for a killed run's leftover.
TMP_SUFFIX = ".ragtune-tmp"


def tmp_path(path: Path) -> Path:
    """A temporary name beside `path` that no other writer uses: `name.<random>.<pid>.ragtune-tmp`. Two processes
    (or two threads) writing one file at once each fill their own tmp file, and the last rename wins whole; with
    one shared `name.tmp` the second writer truncated the first's file, which then renamed half of it into place
    and failed to find its tmp. The pid comes last so `ragtune.core.lock.clean_temporaries` can tell a live
    writer's; the suffix (TMP_SUFFIX) is ragtune's own, so that cleanup never takes a user's file for one."""
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}.{os.getpid()}{TMP_SUFFIX}")


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Fill a fresh tmp file through `write(handle)` and rename it over `path`; a failed write leaves no tmp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with tmp.open("x", encoding="utf-8") as handle:  # "x": never reuse a file another writer has open
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows atomically (tmp file + rename), so a reader never sees half a file."""
    _write_atomically(Path(path), lambda handle: handle.writelines(json.dumps(row, ensure_ascii=False) + "\n"
                                                                   for row in rows))


def write_json(path: str | Path, data: Any, *, indent: int = 2, default: Any = None) -> None:
    """Write one JSON document atomically, through a tmp name of its own (`tmp_path`)."""
    _write_atomically(Path(path), lambda handle: handle.write(json.dumps(data, indent=indent, default=default)))


class JsonlAppender:
    """Append rows to a JSONL file as they are produced, for resumable stages.

    On open it drops a torn last line left by a killed run (rewriting the file without it),
    and exposes the rows already there so the caller can skip finished work by key.
    """

    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.rows = read_jsonl(self.path, tolerate_torn_tail=True)
            self._drop_torn_tail()
        self.done_keys = {row[key] for row in self.rows if key in row}
        self._handle = self.path.open("a", encoding="utf-8")

    def _drop_torn_tail(self) -> None:
        """Rewrite the file as its complete rows when it does not end in a newline (a killed run's torn line),
        through a tmp name of its own: two processes opening one file must not rename each other's tmp away."""
        size = self.path.stat().st_size
        with self.path.open("rb") as handle:
            handle.seek(max(size - 1, 0))
            if size == 0 or handle.read(1) == b"\n":
                return
        write_jsonl(self.path, self.rows)

    def append(self, row: dict[str, Any]) -> None:
        if row.get(self.key) in self.done_keys:
            return
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done_keys.add(row.get(self.key))
        self.rows.append(row)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
