"""ragtune never deletes what it did not write, refuses folders that are not its own, and names bad input in one
line: real files and folders, a real lock, the real CLI, a real server process that dies (issue #28)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest
import yaml

from ragtune.app.cli import main
from ragtune.core.lock import RunLock
from ragtune.core.run_dir import NotARunFolder, check_run_folder
from ragtune.app.dry_run import document_checks, writable_check


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _files(root: Path) -> set[str]:
    """Every path under `root`, links included and not followed, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------------------------- only ragtune's temporaries


def test_a_locked_run_removes_only_its_own_temporaries_and_no_decoy(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Before, RunLock.acquire removed every `*.tmp`, `.tmpXXXXXX` and `*.<dead pid>.tmp` anywhere under the run
    folder (the user's notes.tmp and a whole projects/build.tmp/ folder) and listed a link it had left."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    for folder in ("data", "merged", "adapter", "checkpoints/checkpoint-2", "projects/build.tmp"):
        (run / folder).mkdir(parents=True)
    (run / ".ragtune-run").write_text("")
    dead = _dead_pid()
    decoys = ["notes.tmp", "projects/build.tmp/src.py", ".tmpAbCdEf", "data/.tmpAbCdEf", "x.99999999.tmp",
              f"data/train.jsonl.{dead}.tmp", "data/eval.csv.tmp", f"projects/out.0a1b2c3d.{dead}.ragtune-tmp"]
    for name in decoys:
        (run / name).write_text("the user's")
    (run / "evil.tmp").symlink_to(outside, target_is_directory=True)
    (run / "data" / f"link.0a1b2c3d.{dead}.ragtune-tmp").symlink_to(outside / "precious.txt")
    (run / "adapter" / ".tmpZyXwVu").symlink_to(outside / "precious.txt")
    leftovers = [f"data/train.jsonl.0a1b2c3d.{dead}.ragtune-tmp", f"manifest.json.0a1b2c3d.{dead}.ragtune-tmp",
                 "merged/.tmpAbCdEf", "adapter/.tmp123456", "checkpoints/checkpoint-2/.tmpQwErTy"]
    for name in leftovers:
        (run / name).write_text("a killed ragtune's")
    index = run / "data" / f"index.0a1b2c3d.{dead}.ragtune-tmp"  # a half-persisted index folder
    index.mkdir()
    (index / "docstore.json").write_text("{}")
    live = run / "data" / f"stats.json.0a1b2c3d.{os.getpid()}.ragtune-tmp"  # a live writer's: kept
    live.write_text("in flight")
    before = _files(run)

    with caplog.at_level(logging.WARNING, logger="ragtune.core.lock"), RunLock(run):
        pass

    removed = set(leftovers) | {str(index.relative_to(run)), str(index.relative_to(run) / "docstore.json")}
    assert _files(run) == (before - removed) | {".ragtune.lock"}
    assert (outside / "precious.txt").read_text() == "keep"
    [warning] = [r.getMessage() for r in caplog.records]
    listed = warning.split(": ", 1)[1].split(", ")
    assert warning.startswith(f"removed 6 temporary file(s) left by a killed ragtune in {run}")
    assert set(listed) <= removed and not any("evil" in name or "link" in name for name in listed)


# ------------------------------------------------------------------------------------- whose folder output_dir is


def test_the_home_folder_and_a_foreign_folder_are_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Before, both were locked and "cleaned": the home folder's notes.tmp was deleted."""
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "notes.tmp").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("mine")
    for folder, expected in ((home, "is your home folder"), (foreign, "is a non-empty folder that is not a ragtune run")):
        before = _files(folder)
        with pytest.raises(NotARunFolder) as err:
            RunLock(folder).acquire()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"output_dir: {folder} {expected}")
        assert "Point `output_dir` at a new" in message
        assert _files(folder) == before


@pytest.mark.parametrize("folder", ["/", "~", "foreign"])
def test_dry_run_calls_root_home_and_a_foreign_folder_errors_not_writable(folder: str, tmp_path: Path):
    """Before, `--dry-run` printed `[ok] output_dir: / is writable` (and so for ~ and a foreign folder)."""
    if folder == "foreign":
        (tmp_path / "foreign" / "src").mkdir(parents=True)
        (tmp_path / "foreign" / "Makefile").write_text("all:\n")
        folder = str(tmp_path / "foreign")
    level, message = writable_check(Path(folder))
    print(message)
    assert level == "error" and "\n" not in message
    assert message.startswith(f"output_dir: {Path(folder).expanduser()} is ")
    with pytest.raises(NotARunFolder):
        check_run_folder(folder)


def test_new_empty_layout_only_and_older_run_folders_are_accepted_and_marked(tmp_path: Path):
    """A folder of ragtune's own layout (your data/train.jsonl for `ragtune train`) and a run of an older version
    (manifest.json, no marker) stay usable; the lock marks them as runs."""
    layout_only, older = tmp_path / "byo", tmp_path / "older"
    (layout_only / "data").mkdir(parents=True)
    (layout_only / "data" / "train.jsonl").write_text("{}\n")
    older.mkdir()
    (older / "manifest.json").write_text("{}")
    (older / "my-notes.md").write_text("about this run")
    for folder in (tmp_path / "new", tmp_path / "empty", layout_only, older):
        if folder.name == "empty":
            folder.mkdir()
        with RunLock(folder):
            pass
        assert (folder / ".ragtune-run").exists()
    assert (older / "my-notes.md").exists() and (layout_only / "data" / "train.jsonl").exists()


# ------------------------------------------------------------------------------------------- bad bytes, counts


def test_a_utf16_config_is_one_line_naming_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Before: a UnicodeDecodeError traceback from `ragtune run X --dry-run`."""
    config = tmp_path / "utf16.yaml"
    config.write_bytes("name: x\noutput_dir: run\n".encode("utf-16"))  # starts with \xff\xfe
    assert main(["run", str(config), "--dry-run"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"config error: {config}:1: not UTF-8 text (byte 0xff at column 1") and "UTF-16" in line


def test_a_latin1_byte_in_a_jsonl_is_one_line_naming_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Before: a UnicodeDecodeError traceback from `ragtune validate`."""
    rows = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    rows.write_bytes((json.dumps(good) + "\n").encode() + json.dumps(good).replace("Hello", "Caf\xe9").encode("latin-1")
                     + b"\n")
    assert main(["validate", str(rows)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {rows}:2: not UTF-8 text (byte 0xe9 at column ")


SYSTEM = {"role": "system", "content": "Answer from the context."}


def test_validate_fails_when_rows_exceed_max_length(tmp_path: Path, smollm2_dir: Path, capsys: pytest.CaptureFixture):
    """Before: `rows_over_max_length: 1` printed and exit 0."""
    rows = tmp_path / "rows.jsonl"
    short = {"messages": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    long = {"messages": [SYSTEM, {"role": "user", "content": "Tell me about Uber. " * 20},
                         {"role": "assistant", "content": "Uber runs a ride-hailing platform. " * 20}]}
    rows.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    assert main(["validate", str(rows), "--tokenizer", str(smollm2_dir), "--max-length", "100"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["rows_over_max_length"] == 1
    [line] = [line for line in err.splitlines() if line.startswith("error")]  # (the tokenizer may warn above)
    assert line.startswith(f"error: {rows}: 1 row(s) longer than max_length 100 tokens (lines 2)")


@pytest.mark.parametrize("argv", [["run", "C", "--repeats", "0"], ["run", "C", "--repeats", "-3"],
                                  ["sweep", "C", "--trials", "0"], ["sweep", "C", "--trials", "-1"]],
                         ids=["repeats-0", "repeats-negative", "trials-0", "trials-negative"])
def test_counts_below_one_are_refused(argv: list[str], capsys: pytest.CaptureFixture):
    """Before: accepted (a sweep of 0 trials, a run with --repeats 0)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f"argument {argv[2]}: {argv[3]} is not a count; give 1 or more" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- documents in a dry run


def test_dry_run_opens_each_document(tmp_path: Path, excerpt_pdf: Path):
    """Before: a text file renamed .pdf (and a Latin-1 .txt) showed `[ok]`; prep would skip them."""
    fake = tmp_path / "report.pdf"
    fake.write_text("This is not a PDF.\n")
    latin = tmp_path / "notes.txt"
    latin.write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    checks = document_checks([excerpt_pdf, fake, latin])
    assert checks[0][0] == "ok" and "pages" in checks[0][1]
    assert checks[1][0] == "warn" and checks[1][1].startswith(f"documents: {fake}: cannot read this PDF")
    assert checks[2][0] == "warn" and checks[2][1].startswith(f"documents: {latin}:3: not UTF-8 text (byte 0xe9")
    assert document_checks([fake])[-1][0] == "error"  # nothing readable: prep would fail


def test_dry_run_cli_reports_a_foreign_output_dir_and_an_unreadable_pdf(
        tmp_path: Path, write_config: Callable[..., Path]):
    """One real `ragtune run --dry-run`. Before: `[ok   ] documents: .../fake.pdf` and `output_dir ... is writable`."""
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "main.py").write_text("print('mine')\n")
    fake = tmp_path / "fake.pdf"
    fake.write_text("not a pdf")
    config = yaml.safe_load(write_config().read_text())
    config.update(output_dir=str(foreign), documents=[*config["documents"], str(fake)])
    path = tmp_path / "foreign.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "ragtune.app.cli", "run", str(path), "--dry-run"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(result.stdout, result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"[error] output_dir: {foreign} is a non-empty folder that is not a ragtune run" in result.stdout
    assert f"[warn ] documents: {fake}: cannot read this PDF" in result.stdout
    assert sorted(p.name for p in foreign.iterdir()) == ["main.py"]


# ------------------------------------------------------------------------------------- a managed server that dies

# Stands in for vLLM's API server when its engine dies: it answers GET (/health, /v1/models), holds every chat
# request, then drops them all at once and exits a moment later (vLLM shuts down after its engine core is killed).
DYING_SERVER = textwrap.dedent("""
    import http.server, os, socket, sys, threading, time
    held = []
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
        def do_POST(self):
            held.append(self.connection)
            time.sleep(600)
        def log_message(self, *args):
            pass
    def die():
        while len(held) < 8:
            time.sleep(0.05)
        server.socket.close()
        for connection in held:
            connection.shutdown(socket.SHUT_RDWR)
        print("engine died; shutting down", flush=True)
        time.sleep(1.5)
        os._exit(1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    threading.Thread(target=die, daemon=True).start()
    server.serve_forever()
""")


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_a_managed_server_that_stopped_answering_and_exits_is_reported_as_exited(tmp_path: Path):
    """Eval's student answers are 8 concurrent requests: all cut at once, they open the circuit breaker while the
    dying server is still being torn down. Before: "The managed vLLM server (pid N) is running"."""
    from ragtune.core.engine import VLLMServer, free_port
    from ragtune.core.llm import BackendUnavailable, openai_backend
    from ragtune.core.roles import LLMRole

    server = VLLMServer("dying-model", log_dir=tmp_path)
    server.port = free_port()
    with server.log_path.open("a") as log_file:
        server.process = subprocess.Popen([sys.executable, "-c", DYING_SERVER, str(server.port)], stdout=log_file,
                                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        role = LLMRole(backend="vllm", model="dying-model", max_concurrency=8, timeout=30, max_retries=2)
        backend = openai_backend(role, base_url=server.base_url, unavailable_hint=server.describe_failure)
        deadline = time.monotonic() + 30
        while not _answers(f"http://127.0.0.1:{server.port}/health") and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(BackendUnavailable) as err:
            backend.chat([[{"role": "user", "content": "Hi"}]] * 8)
    finally:
        server.stop()
    message = str(err.value)
    print(message)
    assert f"The managed vLLM server (pid {server.process.pid}) exited with code 1" in message
    assert "is running" not in message and "engine died" in message  # the log's tail says why
