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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from ragtune.core.artifacts import JsonlAppender

HOLDER_NAME = ".ragtune.lock.json"  # ragtune.core.lock.HOLDER_NAME, spelled out: the file is the interface


def ragtune(log: Path, *args: str) -> subprocess.Popen:
    """A ragtune process writing its output to `log` (a pipe nobody reads would fill up and stall it)."""
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "ragtune.app.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
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
            second = subprocess.run([sys.executable, "-m", "ragtune.app.cli", "run", str(config)], capture_output=True,
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
    dead = run / "data" / f"train.jsonl.0a1b2c3d.{_dead_pid()}.ragtune-tmp"  # tmp_path's name
    live = run / "data" / f"manifest.json.0a1b2c3d.{os.getpid()}.ragtune-tmp"  # a live process's write in flight
    not_ours = run / "data" / "eval.csv.tmp"  # not a name ragtune writes: never removed
    kept = run / "data" / "train.jsonl"
    for path in (dead, live, not_ours, kept):
        path.write_text("x")
    with RunLock(run):
        pass
    remaining = sorted(p.name for p in run.rglob("*") if p.is_file())
    # the (empty) lock file and the run marker stay
    assert remaining == sorted([".ragtune.lock", ".ragtune-run", live.name, not_ours.name, kept.name])
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


# --------------------------------------------------------------------------------------- per-process tmp names


def test_two_writers_of_one_file_never_share_a_tmp_file(tmp_path: Path):
    """Before, write_jsonl wrote every file through `name.tmp`: a second writer truncated the first one's half-written
    tmp and renamed it into place, the first then wrote its rows into the renamed file and died on its own rename."""
    from ragtune.core.artifacts import write_jsonl

    path = tmp_path / "rows.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from ragtune.core.artifacts import write_jsonl
        def rows():
            yield {{"writer": "slow", "n": 0}}
            print("halfway", flush=True)
            sys.stdin.readline()
            yield {{"writer": "slow", "n": 1}}
        write_jsonl({str(path)!r}, rows())
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "halfway"
    write_jsonl(path, [{"writer": "fast", "n": n} for n in range(3)])
    assert [json.loads(line)["writer"] for line in path.read_text().splitlines()] == ["fast"] * 3
    _, stderr = writer.communicate("go\n", timeout=60)
    assert writer.returncode == 0, stderr
    assert path.read_text() == '{"writer": "slow", "n": 0}\n{"writer": "slow", "n": 1}\n'  # the last rename, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path: Path):
    from ragtune.core.artifacts import write_json, write_jsonl

    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"id": 1}])

    def rows():
        yield {"id": 2}
        raise ValueError("the producer failed")

    with pytest.raises(ValueError, match="the producer failed"):
        write_jsonl(path, rows())
    with pytest.raises(TypeError):
        write_json(tmp_path / "facts.json", {"not JSON": object()})
    assert path.read_text() == '{"id": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


# ------------------------------------------------------------------- `run --only` resumes, a no-op run writes nothing


def _fake_stages(run_dir: Path, calls: list[str], fail: str | None = None) -> tuple:
    """The pipeline's stages with small real entry points: each writes a file where the real stage writes its output;
    `fail` is killed (an exception) after writing a checkpoint, as a training killed mid-run leaves one."""
    from dataclasses import replace

    from ragtune.app.pipeline import PIPELINE

    def stage(name: str) -> Callable[..., dict]:
        def run(config: object, run_dir_: object, options: object) -> dict:
            calls.append(name)
            if name == "train":
                found = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
                (run_dir / "checkpoints" / f"checkpoint-{len(found) + 1}").mkdir(parents=True)
                if name == fail:
                    raise RuntimeError("killed")
                return {"resumed_from": found[-1] if found else None}
            (run_dir / f"{name}.out").write_text(name)
            return {}
        return run

    return tuple(replace(s, run=stage(s.name)) for s in PIPELINE)


def _run_fake(monkeypatch: pytest.MonkeyPatch, config: object, calls: list[str], fail: str | None = None,
              **options: object) -> dict[str, str]:
    """`run_pipeline` on the fake stages, with `options` as RunOptions."""
    from ragtune.app import pipeline

    monkeypatch.setattr(pipeline, "PIPELINE", _fake_stages(Path(config.output_dir), calls, fail))
    return pipeline.run_pipeline(config, pipeline.RunOptions(**options))


@pytest.fixture
def cheap_config(write_config):
    """A valid config whose preflight needs no model (the student is not on this machine: a warning, not an error)."""
    from ragtune.app.config import load_config

    path = write_config(student={"model": "no-such-org/no-such-student"})
    return path, load_config(path)


def test_run_only_a_killed_stage_resumes_from_its_checkpoints(cheap_config, monkeypatch):
    """Before, `--only train` planned `run`, and `run` retires a recorded stage's outputs: the checkpoints went to
    stale/ and training started over."""
    _, config = cheap_config
    run_dir, calls = Path(config.output_dir), []
    with pytest.raises(RuntimeError, match="killed"):
        _run_fake(monkeypatch, config, calls, fail="train")
    assert calls == ["prep", "train"]
    decisions = _run_fake(monkeypatch, config, calls, only="train")
    assert decisions["train"] == "resume" and calls == ["prep", "train", "train"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["resumed_from"] == "checkpoint-1"
    assert not (run_dir / "stale").exists()
    again = _run_fake(monkeypatch, config, calls, only="train")
    assert again["train"] == "skip" and len(calls) == 3
    forced = _run_fake(monkeypatch, config, calls, only="train", force=True)
    assert forced == {"prep": "skip", "train": "run", "merge": "skip", "eval": "skip", "report": "skip"}


def test_a_run_with_nothing_to_do_writes_nothing(cheap_config, tmp_path: Path, monkeypatch):
    """Before, every `ragtune run` rewrote manifest.json (versions, git commit), so an up-to-date run failed on a
    read-only folder; now neither the pipeline nor the CLI touches it, and the preflight is skipped."""
    path, config = cheap_config
    run_dir, calls, preflights = Path(config.output_dir), [], []
    _run_fake(monkeypatch, config, calls, before_work=lambda c: preflights.append(1))
    assert len(calls) == 5 and preflights == [1]
    manifest = run_dir / "manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    time.sleep(0.05)  # so that a rewrite would show in the mtime
    for only in (None, "train"):
        decisions = _run_fake(monkeypatch, config, calls, only=only, before_work=lambda c: preflights.append(1))
        assert set(decisions.values()) == {"skip"}
    result = subprocess.run([sys.executable, "-m", "ragtune.app.cli", "run", str(path)], capture_output=True, text=True,
                            timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "nothing to do: every stage is up to date" in result.stdout
    assert len(calls) == 5 and preflights == [1]
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before


# ------------------------------------------------------------------------------- every user error is one line

CHAT_ROW = {"messages": [{"role": "user", "content": "What does Uber do?"},
                         {"role": "assistant", "content": "It runs a ride-hailing platform."}]}


def _setup_bad_key(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    return ["train", str(write_config(teachr={}))]


def _setup_missing_document(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    return ["prep", str(write_config(documents=[str(tmp / "missing.pdf")]))]


def _setup_negative_learning_rate(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    return ["run", str(write_config(train={"learning_rate": -1.0})), "--dry-run"]


def _setup_bad_set(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    return ["train", str(write_config()), "--set", "train.num_train_epochs"]


def _cheap(write_config: Callable[..., Path], **overrides: Any) -> str:
    """A config whose preflight loads no model (the student is not on this machine: a warning only)."""
    return str(write_config(student={"model": "no-such-org/no-such-student"}, **overrides))


def _setup_output_dir_under_a_file(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    (tmp / "a_file").write_text("")
    return ["prep", _cheap(write_config, output_dir=str(tmp / "a_file" / "run"))]


def _setup_read_only_output_dir(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    folder = Path("/sys/ragtune-test-run")  # read-only even for root, unlike a chmod-ed folder
    try:
        folder.mkdir()
    except OSError:
        return ["prep", _cheap(write_config, output_dir=str(folder))]
    folder.rmdir()
    pytest.skip("/sys is writable here")


def _setup_missing_train_jsonl(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    return ["train", _cheap(write_config)]


def _setup_malformed_train_jsonl(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    (tmp / "run" / "data").mkdir(parents=True)
    (tmp / "run" / "data" / "train.jsonl").write_text(json.dumps(CHAT_ROW) + '\n{"messages": [\n')
    return ["train", _cheap(write_config)]


def _setup_no_adapter(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    return ["merge", _cheap(write_config)]


def _setup_no_eval_questions(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    return ["eval", _cheap(write_config)]


def _setup_no_summary(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    (tmp / "run").mkdir()
    return ["report", str(tmp / "run")]


def _setup_malformed_dataset(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    (tmp / "rows.jsonl").write_text('{"messages": "not a list"}\n')
    return ["validate", str(tmp / "rows.jsonl")]


def _setup_tokenizer_not_a_model(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    (tmp / "rows.jsonl").write_text(json.dumps(CHAT_ROW) + "\n")
    (tmp / "not_a_model").mkdir()
    return ["validate", str(tmp / "rows.jsonl"), "--tokenizer", str(tmp / "not_a_model")]


def _setup_folder_in_use(tmp: Path, write_config: Callable[..., Path], held: ExitStack) -> list[str]:
    """The lock is taken before the preflight: this config's preflight would fail (max_length 8 holds no row), yet
    the answer is the lock's."""
    from ragtune.core.lock import RunLock

    config = write_config(train={"max_length": 8})
    held.enter_context(RunLock(tmp / "run"))
    return ["prep", str(config)]


SLOW = pytest.mark.slow
USER_ERRORS = [
    pytest.param(_setup_bad_key, "Did you mean `teacher`?", id="ConfigError-unknown-key"),
    pytest.param(_setup_missing_document, "no document found", id="ConfigError-missing-document"),
    pytest.param(_setup_negative_learning_rate, "train.learning_rate: must be > 0", id="ConfigError-learning-rate"),
    pytest.param(_setup_bad_set, "KEY.PATH=VALUE", id="ConfigError-set"),
    pytest.param(_setup_output_dir_under_a_file, "cannot be created (Not a directory)", id="ConfigError-output-dir-file"),
    pytest.param(_setup_read_only_output_dir, "is not writable", id="ConfigError-output-dir-read-only"),
    # the stage commands import their stage's libraries (TRL's trainer, PEFT, Ragas): 20-40 s each on 2 busy cores
    pytest.param(_setup_missing_train_jsonl, "training data not found", id="TrainDataError-missing", marks=SLOW),
    pytest.param(_setup_malformed_train_jsonl, "train.jsonl:2: not valid JSON", id="TrainDataError-malformed-line",
                 marks=SLOW),
    pytest.param(_setup_no_adapter, "no trained adapter found", id="MergeError-no-adapter", marks=SLOW),
    pytest.param(_setup_no_eval_questions, "no held-out questions", id="EvalError-no-questions", marks=SLOW),
    pytest.param(_setup_no_summary, "no evaluation summary", id="ReportError-no-summary"),
    pytest.param(_setup_malformed_dataset, "rows.jsonl:1", id="DatasetError-validate"),
    pytest.param(_setup_tokenizer_not_a_model, "holds no config.json", id="ModelLoadError-tokenizer"),
    pytest.param(_setup_folder_in_use, f"is in use by another ragtune (pid {os.getpid()}", id="RunFolderInUse"),
]


@pytest.mark.parametrize("setup, expected", USER_ERRORS)
def test_every_user_error_is_one_line_and_exit_2(setup, expected, write_config, tmp_path: Path):
    with ExitStack() as held:
        argv = setup(tmp_path, write_config, held)
        result = subprocess.run([sys.executable, "-m", "ragtune.app.cli", *argv], capture_output=True, text=True,
                                timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(("error: ", "config error: ")) and expected in line


def test_memory_a_stage_freed_goes_back_to_the_os_between_stages() -> None:
    """glibc keeps freed heap pages below a live allocation; `release_freed_memory` (run after every stage) returns
    them, so eval's vLLM server does not sit beside training's leftovers."""
    script = textwrap.dedent("""
        from ragtune.app.pipeline import release_freed_memory

        def rss_mb():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))

        blocks = [bytes(1024) + bytes([i % 256]) for i in range(300_000)]  # ~300 MB of malloc'd 1 KiB objects
        sentinel = bytes(2048)  # allocated last: the heap's top stays in use, so free() alone trims nothing
        del blocks
        before = rss_mb()
        release_freed_memory()
        print(before, rss_mb())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    before, after = map(int, result.stdout.split())
    assert before - after > 150, (before, after)
