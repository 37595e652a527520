"""The teacher/judge backends against real models: in-process batching, and an OpenAI-style server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ragtune.llm import BackendUnavailable, HFChatBackend, OpenAIChatBackend, make_backend
from ragtune.config import LLMRole

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 2+2?",
    "Who wrote Hamlet?", "What does a CPU do?", "Give a synonym of happy.",
    "Translate 'hello' to Spanish.", "At what temperature does water boil at sea level?",
]


@pytest.fixture(scope="module")
def smollm2_backend(smollm2_dir: Path) -> HFChatBackend:
    return HFChatBackend(str(smollm2_dir), batch_size=8, max_new_tokens=32)


def test_embedded_smollm2_loads_offline_and_answers():
    backend = make_backend(LLMRole(model="smollm2-135m-instruct", max_new_tokens=16))
    [answer] = backend.chat([[{"role": "user", "content": "What is the capital of France?"}]])
    assert answer.error is None
    assert "Paris" in answer.text
    assert answer.completion_tokens > 0


def test_batched_generation_equals_one_by_one_greedy(smollm2_backend):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    batched = smollm2_backend.chat(conversations)
    single = [smollm2_backend.chat([c])[0] for c in conversations]
    assert len(batched) == 8
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.text for c in batched)


def test_json_schema_output_is_valid_by_construction(smollm2_backend):
    schema = {"title": "Verdict", "type": "object",
              "properties": {"reason": {"type": "string", "maxLength": 40}, "verdict": {"type": "integer"}},
              "required": ["reason", "verdict"], "additionalProperties": False}
    results = smollm2_backend.chat([[{"role": "user", "content": "Is Paris in France? Give a verdict 1 or 0."}]],
                                   json_schema=schema, max_new_tokens=48)
    parsed = json.loads(results[0].text)
    assert set(parsed) == {"reason", "verdict"} and isinstance(parsed["verdict"], int)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ragtune.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--served-model-name", "student", "--max-tokens", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture(scope="module")
def server(smollm2_dir: Path):
    port = _free_port()
    process = _start_server(smollm2_dir, port)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"ragtune serve did not start: {process.stdout.read().decode()[-2000:]}")
    yield base_url
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_openai_backend_talks_to_ragtune_serve(server, smollm2_backend):
    backend = OpenAIChatBackend(model="student", base_url=server, max_concurrency=4, max_new_tokens=32, timeout=120)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    remote = backend.chat(conversations)
    local = smollm2_backend.chat(conversations)
    assert [c.error for c in remote] == [None] * 4
    assert [c.text for c in remote] == [c.text for c in local]  # same model, greedy, micro-batched server-side
    assert all(c.prompt_tokens > 0 and c.completion_tokens > 0 for c in remote)
    models = httpx.get(f"{server}/models").json()
    assert models["data"][0]["id"] == "student"


@pytest.mark.slow
def test_openai_backend_structured_output_through_serve(server):
    backend = OpenAIChatBackend(model="student", base_url=server, max_new_tokens=48)
    schema = {"title": "Answer", "type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}},
              "required": ["answer"], "additionalProperties": False}
    [result] = backend.chat([[{"role": "user", "content": "Capital of France?"}]], json_schema=schema)
    assert set(json.loads(result.text)) == {"answer"}


@pytest.mark.slow
def test_openai_backend_retries_until_a_late_server_is_up(smollm2_dir):
    port = _free_port()
    backend = OpenAIChatBackend(model="student", base_url=f"http://127.0.0.1:{port}/v1", max_retries=8,
                                backoff_seconds=1.0, max_new_tokens=8)
    results: list = []
    client = threading.Thread(target=lambda: results.extend(backend.chat([[{"role": "user", "content": "Hi"}]])))
    client.start()
    time.sleep(1.0)  # the first attempts hit a closed port
    process = _start_server(smollm2_dir, port)
    try:
        client.join(timeout=300)
        assert results and results[0].error is None and results[0].text
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_openai_backend_reports_one_clear_error_when_server_stays_down():
    port = _free_port()
    backend = OpenAIChatBackend(model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_seconds=0.05)
    with pytest.raises(BackendUnavailable) as err:
        backend.chat([[{"role": "user", "content": "Hi"}]] * 3)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "unreachable after 3 attempts" in message


def test_openai_backend_records_http_errors_per_request():
    """A server that answers 400 yields a Completion with the error, not an exception or a dropped row."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Reject(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server API)
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "context length exceeded"}')

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Reject)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        backend = OpenAIChatBackend(model="m", base_url=f"http://127.0.0.1:{httpd.server_port}/v1")
        [result] = backend.chat([[{"role": "user", "content": "Hi"}]])
        assert result.text is None and "HTTP 400" in result.error and "context length" in result.error
    finally:
        httpd.shutdown()


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.delenv("RAGTUNE_TEST_KEY", raising=False)
    with pytest.raises(BackendUnavailable, match="RAGTUNE_TEST_KEY"):
        OpenAIChatBackend(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="RAGTUNE_TEST_KEY")
