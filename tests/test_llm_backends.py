"""The teacher/judge backends against real models and real servers on 127.0.0.1: in-process batching, the
OpenAI SDK client (retries, Retry-After, Azure requests, malformed bodies) and its circuit breaker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port
from ragtune.core.llm import BackendUnavailable, HFChatBackend, OpenAIChatBackend, make_backend
from ragtune.app.config import LLMRole

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


def test_out_of_memory_halves_the_batch_and_still_answers_every_conversation(smollm2_dir, smollm2_backend):
    """A device that holds at most two conversations at once (the fault is injected; generation is real): the batch
    is halved until it fits, later batches start at the size that fitted, and the answers are the unsplit ones."""
    import torch

    backend = HFChatBackend(str(smollm2_dir), batch_size=8, max_new_tokens=32)
    generate, sizes = backend._generate, []

    def two_fit(batch, *args):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(batch, *args)

    backend._generate = two_fit
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:7]]
    answers = backend.chat(conversations)
    assert [a.text for a in answers] == [a.text for a in smollm2_backend.chat(conversations)]
    assert all(a.error is None for a in answers) and backend.batch_size == 2
    assert sizes == [7, 4, 2, 2, 3, 2, 1]
    assert [a.error is None for a in backend.chat(conversations[:3])] == [True] * 3 and sizes[7:] == [2, 1]
    # one conversation that does not fit alone is that row's recorded error, not a crash
    def nothing_fits(batch, *args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    backend._generate = nothing_fits
    [failed] = backend.chat(conversations[:1])
    assert failed.text is None and failed.error.startswith("OutOfMemoryError: CUDA out of memory")


def test_inference_roles_go_to_the_gpu_when_there_is_one_else_the_cpu(smollm2_backend):
    import torch

    from ragtune.core.models import inference_device_map

    assert inference_device_map("cpu") == "cpu" and inference_device_map("cuda:1") == "cuda:1"
    expected = "auto" if torch.cuda.is_available() else None
    assert inference_device_map(None) == expected and inference_device_map("auto") == expected
    assert smollm2_backend.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_json_schema_output_is_valid_by_construction(smollm2_backend):
    schema = {"title": "Verdict", "type": "object",
              "properties": {"reason": {"type": "string", "maxLength": 40}, "verdict": {"type": "integer"}},
              "required": ["reason", "verdict"], "additionalProperties": False}
    results = smollm2_backend.chat([[{"role": "user", "content": "Is Paris in France? Give a verdict 1 or 0."}]],
                                   json_schema=schema, max_new_tokens=48)
    parsed = json.loads(results[0].text)
    assert set(parsed) == {"reason", "verdict"} and isinstance(parsed["verdict"], int)


def _start_server(model_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ragtune.app.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--served-model-name", "student", "--max-tokens", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture(scope="module")
def server(smollm2_dir: Path):
    port = free_port()
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
    # serve answers 4 rows in one batch; on this shared 2-core box that took up to ~200 s under load
    backend = OpenAIChatBackend(model="student", base_url=server, max_concurrency=4, max_new_tokens=32, timeout=600)
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
    """With the breaker set high, the SDK's retries (0.5 s doubling to 8 s, 12 retries: ~55-70 s) wait out a
    server that starts late."""
    port = free_port()
    backend = OpenAIChatBackend(model="student", base_url=f"http://127.0.0.1:{port}/v1", max_retries=12,
                                max_consecutive_failures=20, max_new_tokens=8)
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
    port = free_port()
    backend = OpenAIChatBackend(model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=10)
    with pytest.raises(BackendUnavailable) as err:
        backend.chat([[{"role": "user", "content": "Hi"}]] * 3)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "not answering" in message and "3 attempts in a row" in message
    # three refused connections (the /models probe and its retries) open the circuit: not the SDK's 11 attempts
    # for the probe, nor 11 per row
    assert backend.breaker.attempts == 3


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


def test_hf_backend_reports_finish_reason_and_usage(smollm2_backend):
    """"stop" when the model ends its answer (EOS) or stop_when holds, "length" when max_new_tokens cuts it."""
    short = [{"role": "user", "content": "What is the capital of France?"}]
    poem = [{"role": "user", "content": "Write a long poem about the sea."}]
    ended, cut = smollm2_backend.chat([short, poem], max_new_tokens=24)
    assert ended.finish_reason == "stop" and ended.completion_tokens < 24
    assert cut.finish_reason == "length" and cut.completion_tokens == 24
    assert ended.prompt_tokens > 0 and cut.usage == {"prompt_tokens": cut.prompt_tokens, "completion_tokens": 24}
    [stopped] = smollm2_backend.chat([poem], max_new_tokens=24, stop_when=lambda text: "," in text)
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 24


class _Server:
    """A real HTTP server on 127.0.0.1 whose handler class decides every answer; it records the requests."""

    def __init__(self, handler: type):
        from http.server import ThreadingHTTPServer

        self.requests: list[tuple[str, str, dict[str, str]]] = []
        handler.record = self.requests
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(post: Any, get: Any = None) -> type:
    """An OpenAI-style handler: POST calls `post(handler, n)` with the 1-based POST count; GET lists one model,
    or calls `get(handler, n)` with the POST count so far."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        record: list
        lock = threading.Lock()

        def do_GET(self):  # noqa: N802 (http.server API)
            if get is not None:
                get(self, len(self.record))
            else:
                self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            with self.lock:
                self.record.append((self.path, body, dict(self.headers)))
                n = len(self.record)
            post(self, n)

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def _answer(text: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def test_openai_backend_records_finish_reason_usage_and_malformed_bodies_per_row():
    bodies = {1: _answer("Paris.", "stop"), 2: _answer("A long", "length"), 3: b"<html>proxy error</html>",
              4: {"choices": []}}
    server = _Server(_handler(lambda h, n: h._send(200, bodies[n])))
    try:
        backend = OpenAIChatBackend(model="m", base_url=server.url, max_concurrency=1)
        results = backend.chat([[{"role": "user", "content": f"q{i}"}] for i in range(4)])
    finally:
        server.close()
    assert [(r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens) for r in results[:2]] == [
        ("Paris.", "stop", 7, 3), ("A long", "length", 7, 3)]
    assert [r.text for r in results[2:]] == [None, None]
    assert all(r.error.startswith("malformed response") for r in results[2:])


def test_openai_backend_honours_retry_after():
    """429 with `Retry-After: 2`: the SDK waits the 2 s the server asked for (its own backoff starts at 0.5 s)."""
    def post(handler, n):
        if n == 1:
            handler._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
        else:
            handler._send(200, _answer("ok"))

    server = _Server(_handler(post))
    try:
        backend = OpenAIChatBackend(model="m", base_url=server.url)
        started = time.monotonic()
        [result] = backend.chat([[{"role": "user", "content": "Hi"}]])
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert result.text == "ok" and len(server.requests) == 2
    assert elapsed >= 2.0  # the server's 2 s, not the SDK's 0.5 s backoff (a lower bound: load cannot shorten it)


def test_azure_requests_use_the_deployment_path_api_version_and_api_key_header(monkeypatch):
    """Only the request's shape is checked here (a local server); no real Azure endpoint is reachable."""
    monkeypatch.setenv("RAGTUNE_TEST_AZURE_KEY", "secret-123")
    server = _Server(_handler(lambda h, n: h._send(200, _answer("hi"))))
    try:
        backend = make_backend(LLMRole(backend="openai", model="my-deployment", base_url=server.url.removesuffix("/v1"),
                                       api_key_env="RAGTUNE_TEST_AZURE_KEY", api_version="2024-10-21"))
        [result] = backend.chat([[{"role": "user", "content": "Hi"}]])
    finally:
        server.close()
    path, _, headers = server.requests[0]
    assert result.text == "hi"
    assert path == "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
    assert {k.lower(): v for k, v in headers.items()}["api-key"] == "secret-123"


def _silent_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A real socket on 127.0.0.1 that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return listener, accepted


def test_hung_endpoint_is_reported_as_not_answering_within_seconds():
    listener, accepted = _silent_listener()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        backend = OpenAIChatBackend(model="m", base_url=url, timeout=1.0, max_retries=4)
        with pytest.raises(BackendUnavailable) as err:
            backend.chat([[{"role": "user", "content": "Hi"}]] * 4)
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
    message = str(err.value)
    assert url in message and "not answering" in message and "timeout 1 s" in message
    # the /models probe's 3 timeouts open the circuit: not timeout x (retries + 1) for each of the 4 rows
    assert backend.breaker.attempts == 3


def test_endpoint_that_hangs_mid_stage_trips_the_breaker_and_keeps_finished_rows():
    """The probe passes, two rows are answered, then the server goes silent (POST and GET): three timeouts and
    a silent /models open the breaker, the fourth row fails at once, and the exception carries the finished rows."""
    release = threading.Event()

    def post(handler, n):
        if n <= 2:
            handler._send(200, _answer(f"answer {n}"))
        else:
            release.wait(30)

    def get(handler, posts):
        if posts >= 2:
            release.wait(30)
        else:
            handler._send(200, {"object": "list", "data": []})

    server = _Server(_handler(post, get))
    try:
        backend = OpenAIChatBackend(model="m", base_url=server.url, max_concurrency=1, timeout=1.0, max_retries=4)
        with pytest.raises(BackendUnavailable) as err:
            backend.chat([[{"role": "user", "content": f"q{i}"}] for i in range(4)])
    finally:
        release.set()
        server.close()
    assert [c.text if c else None for c in err.value.done] == ["answer 1", "answer 2", None, None]
    assert "not answering" in str(err.value) and "ReadTimeout" in str(err.value)
    # 2 answered + 3 timed-out attempts, then the circuit is open (plus the first /models probe)
    assert len(server.requests) == 5 and backend.breaker.attempts == 6


def test_slow_server_that_still_answers_models_fails_rows_not_the_stage():
    """Timeouts from a server that is busy but alive (it answers /models) are per-row failures with a hint,
    never BackendUnavailable: the breaker's probe tells slow from hung."""
    release = threading.Event()
    server = _Server(_handler(lambda handler, n: release.wait(30)))
    try:
        backend = OpenAIChatBackend(model="m", base_url=server.url, max_concurrency=3, timeout=1.0, max_retries=1)
        results = backend.chat([[{"role": "user", "content": f"q{i}"}] for i in range(3)])
    finally:
        release.set()
        server.close()
    assert [r.text for r in results] == [None] * 3
    assert all("ReadTimeout" in r.error and "raise `timeout`" in r.error for r in results)


def test_managed_vllm_auto_dtype_on_cpu_is_the_precision_probes_choice(smollm2_dir: Path) -> None:
    """`torch_dtype: auto` starts a CPU vLLM server in the format the probe measured faster for this model's shapes
    (vLLM's own `auto` would take the checkpoint's dtype whatever the CPU); on a GPU vLLM's `auto` is kept."""
    from transformers import AutoConfig

    from ragtune.core import engine
    from ragtune.core.precision import BF16_WEIGHTS, FP32, linear_shapes, pick, probe

    def dtype_arg(on_cpu: bool) -> str:
        args = engine.VLLMServer("smollm2-135m-instruct", dtype="auto").command("python", str(smollm2_dir), on_cpu=on_cpu)
        return args[args.index("--dtype") + 1]

    shapes = linear_shapes(AutoConfig.from_pretrained(smollm2_dir))
    measured = pick(probe(shapes, (FP32, BF16_WEIGHTS), backward=False)["gflops"])
    assert dtype_arg(on_cpu=True) == ("bfloat16" if measured == BF16_WEIGHTS else "float32")
    assert dtype_arg(on_cpu=False) == "auto"


def _echo(handler, n, who: str = "") -> None:
    """Answer with the request's own question, so each row can be matched to its answer."""
    question = json.loads(handler.record[n - 1][1])["messages"][-1]["content"]
    handler._send(200, _answer(f"{who}{question}"))


def _counting(answer: Any) -> tuple[_Server, dict[str, int]]:
    """A server that holds each POST a second before `answer(handler, n)`, counting the most requests in flight."""
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def post(handler, n):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(1.0)
        with lock:
            state["now"] -= 1
        answer(handler, n)

    server = _Server(_handler(post))
    server.httpd.socket.listen(256)  # http.server's backlog of 5 would refuse a burst of connections
    return server, state


def test_more_rows_in_flight_than_httpx_pools_by_default():
    """max_concurrency 120: all 120 rows are in flight at once (httpx's own pool would hold 100 of them back)."""
    server, state = _counting(_echo)
    try:
        backend = OpenAIChatBackend(model="m", base_url=server.url, max_concurrency=120)
        results = backend.chat([[{"role": "user", "content": f"q{i}"}] for i in range(120)])
    finally:
        server.close()
    assert [r.text for r in results] == [f"q{i}" for i in range(120)]
    assert state["most"] > 100, state


def test_replicas_share_the_rows_and_one_that_dies_is_left_out_with_every_row_answered_once():
    """`base_url` as two endpoints: rows go to both; the second dies after answering two (it drops the third
    connection and stops listening); its lost rows go to the first, every row comes back once, in order."""
    died = threading.Event()

    def dying(handler, n):
        if n <= 2:
            _echo(handler, n, "B:")
            return
        if not died.is_set():
            died.set()
            threading.Thread(target=replicas[1].close, daemon=True).start()
        handler.close_connection = True
        handler.connection.close()

    replicas = [_Server(_handler(lambda h, n: (time.sleep(0.05), _echo(h, n, "A:")))), _Server(_handler(dying))]
    try:
        role = LLMRole(backend="openai", model="m", base_url=[r.url for r in replicas], max_concurrency=2,
                       max_retries=1, timeout=10)
        backend = make_backend(role)
        results = backend.chat([[{"role": "user", "content": f"q{i}"}] for i in range(20)])
    finally:
        for replica in replicas:
            replica.close()
    assert [r.text.split(":", 1)[1] for r in results] == [f"q{i}" for i in range(20)]
    assert [r.text.split(":")[0] for r in results].count("B") == 2 and died.is_set()
    assert backend.left_out.keys() == {1} and backend.answered == [18, 2]
    answered_by_a = sorted(json.loads(body)["messages"][-1]["content"] for _, body, _ in replicas[0].requests)
    assert len(answered_by_a) == 18 and len(set(answered_by_a)) == 18  # each lost row re-sent once, to A
    with pytest.raises(ValueError, match="listed twice"):
        LLMRole(backend="openai", model="m", base_url=[replicas[0].url] * 2)


def test_an_endpoint_judge_keeps_max_concurrency_calls_in_flight():
    """Ragas's judge calls through BatchedJudge: 40 in flight at once (asyncio's default thread pool held 6 on a
    2-core machine)."""
    import asyncio

    from pydantic import BaseModel

    from ragtune.eval.judge import BatchedJudge

    class Verdict(BaseModel):
        verdict: int

    server, state = _counting(lambda handler, n: handler._send(200, _answer('{"verdict": 1}')))
    try:
        backend = OpenAIChatBackend(model="m", base_url=server.url, max_concurrency=40)
        judge = BatchedJudge(backend, max_new_tokens=8, constrain=False, batch_size=1, concurrent_calls=40)

        async def judge_all() -> list[Verdict]:
            return await asyncio.gather(*(judge.agenerate(f"statement {i}", Verdict) for i in range(40)))

        verdicts = asyncio.run(judge_all())
    finally:
        server.close()
    assert [v.verdict for v in verdicts] == [1] * 40 and state["most"] == 40, state


def test_overlapped_batches_come_back_in_order_with_the_next_one_already_in_flight():
    """Batch k+1 runs while batch k is still working (the engine never sees only a batch's tail), results come back
    in batch order, the batches are read one ahead of the results, and an error surfaces at its own batch's turn."""
    from ragtune.core.llm import overlapped

    running, most, lock, read = [0], [0], threading.Lock(), []

    def work(batch: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2 if batch % 2 == 0 else 0.05)  # even batches have a long tail
        with lock:
            running[0] -= 1
        if batch == 4:
            raise RuntimeError("batch 4 failed")
        return batch * 10

    def batches():
        for k in range(6):
            read.append(k)
            yield k

    results = []
    with pytest.raises(RuntimeError, match="batch 4 failed"):
        for batch, result in overlapped(batches(), work):
            results.append((batch, result))
            assert max(read) <= batch + 2  # read at most one batch beyond the one in flight
    assert results == [(0, 0), (1, 10), (2, 20), (3, 30)]
    assert most[0] == 2  # two batches were in flight together, never more


def test_overlapped_asks_ahead_only_when_the_batch_in_flight_is_not_enough():
    """`ahead()` False: the batch in flight is written before the next one is read (a count it may meet stops the
    loop without a wasted batch); True: the next one starts beside it."""
    from ragtune.core.llm import overlapped

    written: list[int] = []

    def batches():
        k = 0
        while sum(written) < 5:
            yield k
            k += 1

    def run(**kwargs: Any) -> list[int]:
        written.clear()
        for batch, _ in overlapped(batches(), lambda b: b, **kwargs):
            written.append(1)  # the batch's results are written: one unit of the need
        return list(range(len(written)))

    assert run(ahead=lambda: sum(written) + 1 < 5) == [0, 1, 2, 3, 4]  # 5 batches for a need of 5: none in vain
    assert run() == [0, 1, 2, 3, 4, 5]  # without `ahead`, one batch is read past the need
