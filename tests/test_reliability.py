"""One ragtune per run folder, and what killed runs leave behind: real concurrent `ragtune` processes, a real
kill -9 during a safetensors save, real concurrent appenders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ragtune.core.artifacts import JsonlAppender

HOLDER_NAME = ".ragtune.lock.json"  # ragtune.core.lock.HOLDER_NAME, spelled out: the file is the interface


def ragtune(log: Path, *args: str) -> subprocess.Popen:
    """A ragtune process writing its output to `log` (a pipe nobody reads would fill up and stall it)."""
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "ragtune.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {seconds:.0f} s waiting for {what}")
        time.sleep(0.2)


def wait_started(process: subprocess.Popen, run: Path, log: Path) -> None:
    """Until the run has begun its work in the folder (with the lock: it holds it)."""
    wait_for(lambda: (run / HOLDER_NAME).exists() or (run / "manifest.json").exists() or process.poll() is not None,
             240, "the first `ragtune prep` to start")
    assert process.poll() is None, f"`ragtune prep` stopped: {log.read_text()[-2000:]}"


def long_config(write_config: Callable[..., Path]) -> Path:
    """A config whose prep runs for minutes (the teacher answers every chunk): a holder to collide with."""
    return write_config(train={"max_length": 2048})


def holder_pid(run: Path) -> int | None:
    try:
        return json.loads((run / HOLDER_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_a_second_ragtune_on_the_same_folder_fails_at_once_naming_the_first(write_config, tmp_path: Path):
    config, run = long_config(write_config), tmp_path / "run"
    first = ragtune(tmp_path / "first.log", "prep", str(config))
    try:
        wait_started(first, run, tmp_path / "first.log")
        start = time.monotonic()
        try:
            second = subprocess.run([sys.executable, "-m", "ragtune.cli", "run", str(config)], capture_output=True,
                                    text=True, timeout=180, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        except subprocess.TimeoutExpired:
            pytest.fail("the second ragtune was still working on the same folder after 180 s")
        elapsed = time.monotonic() - start
        print(f"second ragtune refused after {elapsed:.1f} s: {second.stderr.strip()}")
        assert second.returncode != 0
        assert f"is in use by another ragtune (pid {first.pid}, started 20" in second.stderr
        assert "ragtune prep" in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(write_config, tmp_path: Path):
    config, run = long_config(write_config), tmp_path / "run"
    first = ragtune(tmp_path / "first.log", "prep", str(config))
    wait_started(first, run, tmp_path / "first.log")
    first.kill()  # SIGKILL: no clean-up, its holder file stays behind naming a dead pid
    first.wait()
    second = ragtune(tmp_path / "second.log", "prep", str(config))
    try:
        wait_for(lambda: holder_pid(run) == second.pid or second.poll() is not None, 240,
                 "the second `ragtune prep` to take the lock")
        assert second.poll() is None, f"the second run stopped: {(tmp_path / 'second.log').read_text()[-2000:]}"
    finally:
        second.kill()
        second.wait()


def test_a_held_lock_is_refused_in_another_process_and_free_after_release(tmp_path: Path):
    from ragtune.core.lock import RunLock

    run = tmp_path / "run"
    probe = textwrap.dedent(f"""
        from ragtune.core.lock import RunLock
        from ragtune.core.errors import UserFacingError
        try:
            with RunLock({str(run)!r}):
                print("acquired")
        except UserFacingError as err:
            print(err)
    """)
    with RunLock(run):
        refused = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                                 check=True).stdout
        assert f"pid {os.getpid()}" in refused
    assert not (run / HOLDER_NAME).exists()
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip() == "acquired"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_a_kill_during_a_safetensors_save_leaves_a_tmp_the_next_run_removes(tmp_path: Path):
    """`merge` saves merged/ through safetensors, which writes `.tmpXXXXXX` and renames it when complete."""
    from ragtune.core.lock import RunLock, clean_temporaries

    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    save = "import torch; from safetensors.torch import save_file; save_file({'w': torch.zeros(100_000_000)}, " \
           "'merged/model.safetensors')"
    writer = subprocess.Popen([sys.executable, "-c", save], cwd=run)
    wait_for(lambda: any(p.name.startswith(".tmp") for p in (run / "merged").iterdir()) or writer.poll() is not None,
             120, "safetensors to start writing")
    writer.kill()
    writer.wait()
    [leftover] = list((run / "merged").iterdir())
    assert leftover.name.startswith(".tmp") and not leftover.name.endswith("safetensors")
    (run / "data").mkdir()
    dead = run / "data" / f"train.jsonl.{_dead_pid()}.tmp"
    live = run / "data" / f"manifest.json.{os.getpid()}.tmp"  # a live process's write in flight is kept
    shared = run / "data" / "eval.csv.tmp"
    kept = run / "data" / "train.jsonl"
    for path in (dead, live, shared, kept):
        path.write_text("x")
    with RunLock(run):
        pass
    remaining = sorted(p.name for p in run.rglob("*") if p.is_file())
    assert remaining == sorted([".ragtune.lock", live.name, kept.name])  # the (empty) lock file stays
    assert clean_temporaries(run) == []


def test_opening_an_appender_does_not_cut_off_another_process_still_appending(tmp_path: Path):
    """Before, every open rewrote the file: a writer that had it open appended into the replaced copy."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n')
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from ragtune.core.artifacts import JsonlAppender
        with JsonlAppender({str(path)!r}, key="id") as rows:
            rows.append({{"id": 2}})
            print("ready", flush=True)
            sys.stdin.readline()
            rows.append({{"id": 3}})
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    with JsonlAppender(path, key="id") as reader:
        assert reader.done_keys == {1, 2}
    writer.communicate("go\n", timeout=60)
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_dropping_a_torn_line_writes_through_a_tmp_name_of_its_own(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "tor')
    foreign = tmp_path / "rows.jsonl.tmp"  # another process's write_jsonl in flight
    foreign.write_text('{"id": 9}\n')
    with JsonlAppender(path, key="id") as rows:
        assert rows.done_keys == {1, 2}
        rows.append({"id": 3})
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n{"id": 3}\n'
    assert foreign.read_text() == '{"id": 9}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "rows.jsonl.tmp"]
