"""`ragtune serve` under hostile traffic: a real server process on 127.0.0.1 over the tiny Llama (random weights,
so it never says EOS and a request runs to its max_tokens), raw sockets for clients that hang up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import free_port

HELLO = [{"role": "user", "content": "Say hello."}]
# The tiny Llama's context (tests/conftest.py): every long request below asks for nearly all of it.
CONTEXT = 2048
LONG = 1900


def start_server(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="ragtune-serve-")) / "server.log"  # a pipe nobody reads could fill up
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "ragtune.app.cli", "serve", "--model", str(model_dir), "--port", str(port), *flags],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"ragtune serve did not start: {log.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


def chat(url: str, timeout: float = 60, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, **body}, timeout=timeout)


def open_request(url: str, **body: object) -> socket.socket:
    """Send a chat request on a raw socket and leave it waiting: closing the socket is a client hanging up."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({"messages": HELLO, **body}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def answered(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over(pid: int, seconds: float) -> float:
    start = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - start


def wait_busy(pid: int, timeout: float = 60) -> None:
    """Until the server burns CPU, i.e. the request under test is generating."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cpu_over(pid, 0.5) > 0.075:  # 0.15 CPU-s/s; a generating server measured 0.37 on 2 loaded cores
            return
    pytest.fail("the server never started generating")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """Only flags the server has always had, so the same test shows the behaviour before and after."""
    process, url = start_server(tiny_llama_dir, "--max-tokens", "16", "--batch-size", "4")
    yield process, url
    stop_server(process)


def test_max_tokens_beyond_the_context_or_below_one_is_400_at_once(server):
    _, url = server
    huge = chat(url, max_tokens=1_000_000_000, timeout=20)
    assert huge.status_code == 400
    message = huge.json()["error"]["message"]
    assert f"maximum context length is {CONTEXT} tokens" in message and "1000000000 in the completion" in message
    prompt_tokens = chat(url, max_tokens=1).json()["usage"]["prompt_tokens"]
    over_by_one = chat(url, max_tokens=CONTEXT - prompt_tokens + 1)
    assert over_by_one.status_code == 400
    assert f"at most {CONTEXT - prompt_tokens} " in over_by_one.json()["error"]["message"]
    for bad in (0, -5):
        response = chat(url, max_tokens=bad)
        assert response.status_code == 400 and "at least 1" in response.json()["error"]["message"]


def test_unknown_role_and_bad_content_are_400(server):
    _, url = server
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert response.status_code == 400
    assert "messages[0].role 'wizard'" in response.json()["error"]["message"]
    bad_content = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": 7}]})
    assert bad_content.status_code == 400


def test_finish_reason_is_length_when_cut_at_max_tokens(server):
    _, url = server
    body = chat(url, max_tokens=3).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_finish_reason_is_stop_when_the_json_is_complete(server):
    """The grammar forces `{"ok":true}` or `{"ok":false}` then EOS: the model stopped before max_tokens."""
    _, url = server
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = chat(url, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"schema": schema}}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert set(json.loads(body["choices"][0]["message"]["content"])) == {"ok"}
    assert body["usage"]["completion_tokens"] < 40


@pytest.mark.slow
def test_a_long_request_does_not_block_a_short_one(server):
    process, url = server
    long_request = open_request(url, max_tokens=LONG)
    try:
        wait_busy(process.pid)
        start = time.monotonic()
        short = chat(url, max_tokens=4, timeout=90)
        waited = time.monotonic() - start
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
        assert not answered(long_request), "the long request finished first: nothing was shown"
        print(f"short request answered in {waited:.1f} s while a {LONG}-token request was generating")
    finally:
        long_request.close()


@pytest.mark.slow
def test_a_client_that_hangs_up_stops_its_generation(server):
    process, url = server
    request = open_request(url, max_tokens=LONG)
    wait_busy(process.pid)
    busy = cpu_over(process.pid, 2.0)
    request.close()
    time.sleep(1.5)  # the server polls its clients every 0.25 s, then stops at the next token
    idle = cpu_over(process.pid, 3.0)
    print(f"server CPU: {busy / 2:.2f} s/s while generating, {idle / 3:.2f} s/s after the client left")
    assert busy / 2 > 0.15
    assert idle / 3 < 0.05  # measured 0.00 (0.37 while generating, 2 loaded cores)


@pytest.fixture(scope="module")
def small_server(tiny_llama_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """One request at a time, two live at most, 5 s per request, 4 tokens per round."""
    process, url = start_server(tiny_llama_dir, "--batch-size", "1", "--max-queue", "2", "--request-timeout", "5",
                                "--step-tokens", "4")
    yield process, url
    stop_server(process)


@pytest.mark.slow
def test_a_full_queue_answers_503_at_once(small_server):
    process, url = small_server
    held = [open_request(url, max_tokens=LONG) for _ in range(2)]
    try:
        wait_busy(process.pid)
        refused = chat(url, max_tokens=4, timeout=20)
        assert refused.status_code == 503
        assert "--max-queue 2" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
    finally:
        for sock in held:
            sock.close()
    time.sleep(1.5)
    assert chat(url, max_tokens=4).status_code == 200  # the hung-up requests left the queue


@pytest.mark.slow
def test_a_request_past_the_timeout_gets_504_and_stops_generating(small_server):
    process, url = small_server
    start = time.monotonic()
    response = chat(url, max_tokens=LONG, timeout=60)
    assert response.status_code == 504 and time.monotonic() - start >= 5
    assert "--request-timeout" in response.json()["error"]["message"]
    time.sleep(1.0)
    assert cpu_over(process.pid, 2.0) / 2 < 0.05


def test_json_schema_holds_across_rounds(small_server):
    """With 4 tokens per round the JSON spans several rounds: each row's grammar state carries over."""
    _, url = small_server
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    body = chat(url, max_tokens=60, response_format={"type": "json_schema", "json_schema": {"schema": schema}}).json()
    assert body["usage"]["completion_tokens"] > 4
    assert body["choices"][0]["finish_reason"] == "stop"
    assert set(json.loads(body["choices"][0]["message"]["content"])) == {"name", "ok"}


@pytest.mark.slow
def test_sigterm_stops_the_server_within_seconds_mid_generation(tiny_llama_dir: Path):
    process, url = start_server(tiny_llama_dir)
    request = open_request(url, max_tokens=LONG)
    try:
        wait_busy(process.pid)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("ragtune serve still runs 30 s after SIGTERM")
        elapsed = time.monotonic() - start
        print(f"exited {elapsed:.1f} s after SIGTERM")
        assert request.recv(64).startswith(b"HTTP/1.1 503")
    finally:
        request.close()
        if process.poll() is None:
            stop_server(process)


# --- size limits, the API key, OpenAI's field rules ----------------------------------------------

BIG = 10 * 1024 * 1024  # the 10 MB body: 10.6 s and 2.5 GB before it was refused, /health waiting 9.1 s


def prose(size: int) -> str:
    """Text of `size` characters that tokenizes as prose does (a run of one letter is one huge BPE word)."""
    return ("hello world " * (size // 12 + 1))[:size]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM): what a request cost, even after it was freed."""
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def test_a_10_mb_body_is_413_before_it_is_parsed_and_health_answers_meanwhile(server):
    """With Content-Length the header alone refuses it; chunked, the bytes read so far do. Between the chunks the
    server answers /health: reading the body holds nothing up. Nothing is tokenized: the peak memory stays."""
    process, url = server
    peak = peak_rss_mb(process.pid)
    payload = json.dumps({"messages": [{"role": "user", "content": prose(BIG)}], "max_tokens": 1}).encode()
    sized = httpx.post(f"{url}/v1/chat/completions", content=payload, timeout=300,
                       headers={"Content-Type": "application/json"})
    assert sized.status_code == 413, sized.text[:300]
    error = sized.json()["error"]
    assert f"is {len(payload)} bytes" in error["message"] and "--max-request-bytes" in error["message"]
    assert error["type"] == "invalid_request_error"

    host, port = url.removeprefix("http://").split(":")
    health = []
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        step = 1024 * 1024
        try:
            for start in range(0, len(payload), step):
                piece = payload[start:start + step]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                health.append(httpx.get(f"{url}/health", timeout=60).status_code)
                if answered(sock):
                    break
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the server may close on a body it will not read
            pass
        sock.settimeout(300)
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:300]
    assert health and set(health) == {200}
    grown = peak_rss_mb(process.pid) - peak
    print(f"413 after {len(health)} chunks of 1 MiB; peak RSS grew {grown:.0f} MB")
    assert grown < 300  # tokenizing the 10 MB grew it by 1.3 GB (SmolLM2's tokenizer, as here)


def test_a_prompt_that_cannot_fit_the_context_is_400_before_it_is_tokenized(server, tiny_llama_dir: Path):
    """1 MB of text (under the byte limit) is refused from its length in characters; a prompt one token over the
    context is refused from its exact token count; one token under it is answered."""
    from transformers import AutoTokenizer

    _, url = server
    huge = chat(url, messages=[{"role": "user", "content": prose(1_000_000)}], timeout=300)
    assert huge.status_code == 400
    error = huge.json()["error"]
    assert "is 1000" in error["message"] and "characters" in error["message"], error["message"]
    assert f"context is {CONTEXT} tokens" in error["message"] and error["param"] == "messages"

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)

    def prompt_tokens(content: str) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def words(n: int) -> str:
        return " ".join(["hi"] * n)  # " hi" is one token: each word is one more

    n = CONTEXT - prompt_tokens("") - 5
    while prompt_tokens(words(n)) <= CONTEXT:
        n += 1
    assert prompt_tokens(words(n)) == CONTEXT + 1
    over = chat(url, messages=[{"role": "user", "content": words(n)}])
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "messages"
    assert f"the prompt is {CONTEXT + 1} tokens" in over.json()["error"]["message"]
    fits = chat(url, messages=[{"role": "user", "content": words(n - 2)}], max_tokens=1)
    assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] == CONTEXT - 1


@pytest.mark.parametrize(("change", "param"), [
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user"}]}, "messages[1].content"),
    ({"temperature": -5}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 5}, "n"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_fields_outside_openais_rules_are_400_naming_the_field(server, change, param):
    _, url = server
    response = chat(url, **{"max_tokens": 1, **change})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param), error["message"]


def test_fields_within_openais_rules_are_answered(server):
    """null means the default for the sampling fields, as in OpenAI's API."""
    _, url = server
    for allowed in ({"temperature": None, "top_p": None, "n": None}, {"temperature": 2, "top_p": 0.5, "n": 1}):
        assert chat(url, max_tokens=1, **allowed).status_code == 200


def test_top_p_applies_when_sampling(server):
    """top_p 0 keeps only the likeliest token: sampling at temperature 2 then answers what greedy does (it used to be
    accepted and ignored: random text)."""
    _, url = server
    greedy = chat(url, max_tokens=8).json()["choices"][0]["message"]["content"]
    narrowed = chat(url, max_tokens=8, temperature=2, top_p=0).json()["choices"][0]["message"]["content"]
    assert narrowed == greedy


KEY = "rt-test-9f8e7d"


@pytest.fixture(scope="module")
def key_server(tiny_llama_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """The key from the environment, as the README advises (a --api-key flag shows in `ps`)."""
    process, url = start_server(tiny_llama_dir, "--max-tokens", "4", env={"RAGTUNE_SERVE_API_KEY": KEY})
    yield process, url
    stop_server(process)


def test_a_key_is_required_on_v1_but_not_on_health(key_server):
    import openai

    _, url = key_server
    bare = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, timeout=60)
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert "no API key" in bare.json()["error"]["message"]
    wrong = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}x"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "incorrect API key provided."
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Basic " + KEY}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200

    with pytest.raises(openai.AuthenticationError):
        openai_client(url).chat.completions.create(model="served", messages=HELLO, max_tokens=1)
    client = openai_client(url, api_key=KEY)
    answer = client.chat.completions.create(model="served", messages=HELLO, max_tokens=2)
    assert answer.usage.completion_tokens == 2
    assert [m.id for m in client.models.list()] == [answer.model]


def test_binding_beyond_loopback_without_a_key_warns_what_is_exposed():
    from ragtune.app.serve import exposure_warning

    for private in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"):
        assert exposure_warning(private, 8000, None, rag=True) is None
    assert exposure_warning("0.0.0.0", 8000, KEY, rag=True) is None
    plain = exposure_warning("0.0.0.0", 8000, None, rag=False)
    assert plain and "anyone who reaches port 8000 can use the model" in plain and "--api-key" in plain
    assert "documents' text" not in plain
    for exposed in ("::", "192.168.1.5", "myhost.example"):
        assert "indexed documents' text" in exposure_warning(exposed, 8000, None, rag=True)


# --- streaming and --rag ------------------------------------------------------------------------

FACTS = [  # (chunk id, text): the run's index for --rag
    ("c1", "Uber operates a ridesharing platform connecting riders with drivers in over 70 countries."),
    ("c2", "Uber Eats lets consumers order food from restaurants and have it delivered by couriers."),
    ("c3", "Uber Freight connects shippers with carriers and provides logistics services for trucking."),
    ("c4", "In 2021 Uber's revenue was 17.5 billion dollars, up 57 percent year over year."),
]
EATS = "What does Uber Eats let consumers do?"


def openai_client(url: str, api_key: str = "unused"):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def stream_chunks(url: str, **body: object) -> list[object]:
    """Every chunk of a streamed answer, read with the openai SDK."""
    return list(openai_client(url).chat.completions.create(model="served", stream=True, **body))


@pytest.fixture(scope="module")
def rag_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A run folder whose index prep's own `build_index` persisted, its config, and an untied tiny student (a tied
    random model echoes newlines: every answer would be empty)."""
    import yaml
    from llama_index.core.schema import TextNode

    from conftest import EXCERPT_PDF, untied_tiny_model
    from ragtune.app.config import load_config
    from ragtune.core.rag import build_index, embedding_model
    from ragtune.core.run_dir import RunDir

    root = tmp_path_factory.mktemp("rag_run")
    student = untied_tiny_model(tiny_llama_dir, root / "student", seed=0)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "name": "serve-rag", "output_dir": str(root / "run"), "documents": [str(EXCERPT_PDF)],
        "teacher": {"backend": "hf", "model": str(student)}, "student": {"model": str(student)},
        "judge": {"backend": "hf", "model": str(student)}, "data_prep": {"similarity_top_k": 2},
    }))
    config = load_config(path)
    nodes = [TextNode(id_=cid, text=text, metadata={"file": "uber.pdf", "page": i + 1})
             for i, (cid, text) in enumerate(FACTS)]
    build_index(nodes, embedding_model(config.embedding), RunDir(config.output_dir).index)
    return {"config": config, "path": path, "student": student}


@pytest.fixture(scope="module")
def rag_server(rag_run: dict[str, object]) -> Iterator[tuple[subprocess.Popen, str]]:
    process, url = start_server(rag_run["student"], "--config", str(rag_run["path"]), "--rag", "--step-tokens", "8")
    yield process, url
    stop_server(process)


def test_plain_server_streams_with_finish_reason_and_usage(server):
    """Without --rag: the same server as before, now with `stream: true` (it answered 400 before)."""
    _, url = server
    chunks = stream_chunks(url, messages=HELLO, max_tokens=5, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(getattr(c, "retrieved", None) is None for c in chunks)  # no RAG, no chunks named
    raw = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2, "stream": True},
                     timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_rag_prompt_is_the_training_prompt_and_names_its_chunks(rag_run, rag_server):
    """The last user message is the query; earlier turns and the client's system prompt are not sent: the prompt
    is `build_rag_messages` over the retrieved chunks, token for token."""
    from transformers import AutoTokenizer

    from ragtune.core.rag import build_rag_messages

    _, url = rag_server
    history = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi there."},
               {"role": "assistant", "content": "Ahoy."}, {"role": "user", "content": EATS}]
    response = openai_client(url).chat.completions.create(model="served", messages=history, max_tokens=4)
    retrieved = response.retrieved  # the extra field; the SDK keeps unknown fields
    assert retrieved[0]["id"] == "c2" and len(retrieved) == 2
    assert retrieved[0]["text"] == FACTS[1][1] and retrieved[0]["metadata"]["page"] == 2
    assert retrieved[0]["score"] >= retrieved[1]["score"]
    tokenizer = AutoTokenizer.from_pretrained(rag_run["student"])
    prompt = tokenizer.apply_chat_template(build_rag_messages(EATS, [c["text"] for c in retrieved],
                                                              rag_run["config"].data_prep),
                                           add_generation_prompt=True, tokenize=False)
    assert response.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 4


def test_rag_stream_is_the_plain_answer_token_by_token(rag_server):
    """Greedy: the streamed text is the non-streamed answer, sent in several pieces within rounds of 8 tokens; the
    first chunk names the retrieved chunks, the last choice says `length`, the usage chunk counts the tokens."""
    _, url = rag_server
    question = [{"role": "user", "content": EATS}]
    whole = openai_client(url).chat.completions.create(model="served", messages=question, max_tokens=24)
    chunks = stream_chunks(url, messages=question, max_tokens=24, stream_options={"include_usage": True})
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert whole.choices[0].message.content and "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1
    assert [c["id"] for c in chunks[0].retrieved] == [c["id"] for c in whole.retrieved]
    assert all(getattr(c, "retrieved", None) is None for c in chunks[1:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_rag_stream_says_stop_when_the_model_ends(rag_server):
    """A JSON schema ends the answer with EOS before max_tokens: the streamed finish_reason is `stop`."""
    _, url = rag_server
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    chunks = stream_chunks(url, messages=[{"role": "user", "content": EATS}], max_tokens=40,
                           response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert set(json.loads(text)) == {"ok"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_rag_refuses_a_query_that_cannot_fit_before_embedding_it(rag_server):
    _, url = rag_server
    response = chat(url, messages=[{"role": "user", "content": prose(1_000_000)}], timeout=300)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("the last user message is 1000000 characters")


def test_rag_needs_a_config_and_an_index(rag_run, tmp_path: Path, capsys):
    import yaml

    from ragtune.app.cli import main

    assert main(["serve", "--rag", "--model", str(rag_run["student"])]) == 2
    assert "--rag retrieves from a run's index: pass --config CONFIG" in capsys.readouterr().err
    bare = yaml.safe_load(rag_run["path"].read_text()) | {"output_dir": str(tmp_path / "no-prep")}
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare))
    assert main(["serve", "--config", str(tmp_path / "bare.yaml"), "--rag"]) == 2
    assert "no persisted index. Run `ragtune prep CONFIG` first." in capsys.readouterr().err


@pytest.mark.slow
def test_a_streaming_client_that_hangs_up_stops_its_generation(server):
    process, url = server
    request = open_request(url, max_tokens=LONG, stream=True)
    wait_busy(process.pid)
    assert request.recv(64).startswith(b"HTTP/1.1 200")  # the stream had begun
    request.close()
    time.sleep(1.5)
    idle = cpu_over(process.pid, 3.0)
    print(f"server CPU after the streaming client left: {idle / 3:.2f} s/s")
    assert idle / 3 < 0.05
