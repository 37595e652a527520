"""Which number format trains (and generates) fastest on this machine: measured, not assumed.

CPUs disagree. On an AMD EPYC with avx512_bf16 a bf16 GEMM of SmolLM2-135M's training shape ran 4x fp32;
on an AVX2-only AMD EPYC (no avx512, no AMX) the same bf16 GEMM ran at 1/40 of fp32, because oneDNN has no
bf16 kernel there and torch falls back to a reference loop. A constant is wrong on one of them, so a short
probe times the GEMMs the training does (every linear layer's shape: forward and input-gradient, the work of
LoRA over a frozen base) in each candidate format, and the fastest wins. The result is cached per machine in
ragtune's cache folder (`<cache>/precision/`), keyed by CPU model, CPU flags, torch version, thread count and
the shapes, so a machine probes once (~0.1-0.3 s); a lock keeps launcher ranks from probing at the same time
and so from choosing differently, and in a process the other threads' heavy steps (`busy()`: a PDF page read, a
batch embedded) pause while it measures: a probe timed beside prep's document reading once chose fp32 for the
demo's teacher, and the cache kept that choice.

Formats (`MODES`):
- `fp32`: fp32 weights and activations.
- `bf16_autocast`: fp32 weights, matmuls in bf16 under `torch.autocast` (TrainingArguments `bf16=True`);
  the frozen weights are cast again on every call.
- `bf16_weights`: the frozen base stored in bf16 (LoRA adapters stay fp32, PEFT's `autocast_adapter_dtype`),
  activations in bf16, no per-call weight casts. Only for a frozen, unquantized base. Training runs it under
  bf16 autocast too (`bf16=True`), so the adapters' own GEMMs run in bf16 while the optimizer keeps their fp32
  weights: without it PEFT casts every adapted layer's input to fp32 and its rank-16 GEMMs ran at 57 GFLOP/s,
  13% of a demo epoch (torch.profiler, avx512_bf16 EPYC).

CUDA/XPU are not probed: bf16 where the device supports it (`choose_dtype`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from ragtune.core.artifacts import write_json
from ragtune.core.models import cache_dir

log = logging.getLogger(__name__)

FP32, BF16_AUTOCAST, BF16_WEIGHTS = "fp32", "bf16_autocast", "bf16_weights"
MODES = (FP32, BF16_AUTOCAST, BF16_WEIGHTS)
# Rows of each probe GEMM: a slice of a training batch (4 x 768 tokens), large enough to run the kernels a
# batch runs, small enough that a pass stays near PASS_FLOPS (~40 ms at fp32's 60 GFLOP/s on a 2-core EPYC).
# Wide models get fewer rows (down to 16), so an 8B model's probe stays under a second too.
PROBE_ROWS = 256
PASS_FLOPS = 2.5e9
# A bf16 format must beat fp32 by this much to be chosen: fp32 rounds less, and probes on a busy machine
# vary by ~5%.
MARGIN = 1.1
# A format whose screening pass takes this many times the best one's is out (and its probe stops early):
# on the AVX2 EPYC bf16 ran 40x slower, and finishing its pass would take seconds.
SCREEN_OUT = 3.0
# SmolLM2-135M's layer shapes, for callers that have no model config at hand.
DEFAULT_SHAPES = ((576, 576), (576, 1536), (1536, 576))
# The interpreter's thread switch interval while a probe times its GEMMs. A probe shares its process with other
# threads (prep reads the documents while the teacher's server starts, and that start probes): at Python's default
# 5 ms each op of the probe waited for the GIL behind the reading thread, its rates fell 5-20x at random, and the
# demo's teacher was served in fp32 (bf16 88.7 vs fp32 105 GFLOP/s; alone 335 vs 149; 2026-12-06, avx512_bf16
# EPYC), prep and eval 1.5x slower. Steps that wrap themselves in `busy()` wait for the probe; for other threads'
# Python, at 0.1 ms bf16 won each of 11 probes beside the reading thread, at 2.0-5.7x fp32.
PROBE_SWITCH_INTERVAL = 1e-4
# Interleaved passes per format: at least MIN_ROUNDS, then until each format's two best passes agree to AGREE (a
# quiet machine: 3), at most MAX_ROUNDS: contention only slows a pass, and more passes find its quiet windows.
# Beside the reading thread, 3 passes at 0.1 ms still gave bf16 = fp32 (95.7) in 1 of 6 probes.
MIN_ROUNDS, MAX_ROUNDS, AGREE = 3, 12, 0.1
# Part of every cache entry's key: an earlier probe's entry, which may have been timed behind another thread, is
# measured again.
PROBE_VERSION = 2


class _Gate:
    """A probe measures alone in its process. Other threads' heavy steps run inside `busy()` (a PDF page read, a
    batch embedded: ~0.1 s each); a new step waits while a probe measures, and the probe waits for the steps under
    way (the caller's own are suspended with it). Prep reads the documents and embeds them while the teacher's
    server starts, and that start probes the server's format."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy, self._probing = 0, False
        self._mine = threading.local()

    @contextmanager
    def busy(self) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        with self._cond:
            if not depth:  # a probe inside this thread's own step (a model loaded lazily) must not wait for it
                self._cond.wait_for(lambda: not self._probing)
            self._busy += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        mine = getattr(self._mine, "depth", 0)  # this thread's own steps, suspended while it probes
        with self._cond:
            self._busy -= mine
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._probing)
            self._probing = True
            self._cond.wait_for(lambda: self._busy == 0)
        try:
            yield
        finally:
            with self._cond:
                self._probing = False
                self._busy += mine
                self._cond.notify_all()


_GATE = _Gate()


def busy() -> AbstractContextManager[None]:
    """Wrap a heavy step of a thread that may run beside a probe: the probe waits for it, and it for the probe."""
    return _GATE.busy()


def linear_shapes(model_config: Any) -> list[tuple[int, int]]:
    """(in_features, out_features) of a decoder layer's distinct linear layers: attention, MLP up, MLP down."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(text, "hidden_size", None)
    inner = getattr(text, "intermediate_size", None) or (4 * hidden if hidden else None)
    if not hidden:
        return list(DEFAULT_SHAPES)
    return sorted({(hidden, hidden), (hidden, inner), (inner, hidden)})


def machine() -> dict[str, Any]:
    """What decides the probe's answer: CPU model and flags, torch version, intra-op threads."""
    import torch

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    # Without /proc/cpuinfo, the instruction-set level torch detected stands in for the flag list.
    flags = info.get("flags") or info.get("Features") or torch.backends.cpu.get_cpu_capability()
    return {"cpu": cpu, "flags": " ".join(sorted(flags.split())), "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def probe_rows(shapes: list[tuple[int, int]], backward: bool) -> int:
    """Rows per probe GEMM: PROBE_ROWS, fewer for wide layers (a pass near PASS_FLOPS), at least 16."""
    return max(16, min(PROBE_ROWS, int(PASS_FLOPS / _flops(shapes, 1, backward))))


def cache_file(shapes: list[tuple[int, int]], modes: Iterable[str], backward: bool) -> Path:
    """The cache entry of one probe on this machine."""
    identity = {**machine(), "shapes": [list(s) for s in shapes], "modes": list(modes), "backward": backward,
                "rows": probe_rows(shapes, backward), "probe": PROBE_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "precision" / f"{key}.json"


def _operands(mode: str, rows: int, k: int, n: int) -> tuple[Any, Any, Any]:
    import torch

    act = torch.float32 if mode in (FP32, BF16_AUTOCAST) else torch.bfloat16
    out = torch.float32 if mode == FP32 else torch.bfloat16
    weight = (torch.randn(n, k) * 0.02).to(act)
    return torch.randn(rows, k, dtype=act), weight, torch.randn(rows, n, dtype=out)


def _timed_pass(mode: str, operands: list[tuple[Any, Any, Any]], backward: bool, stop_after: float
                ) -> tuple[float, float, bool]:
    """One forward (+ input-gradient) pass over the shapes: (seconds, FLOPs done, complete). It stops at the
    first GEMM that ends past `stop_after` seconds, so a format far slower than the best costs one GEMM."""
    import torch
    import torch.nn.functional as F

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == BF16_AUTOCAST)
    flops, start = 0.0, time.perf_counter()
    for x, weight, grad in operands:
        gemm = 2 * x.shape[0] * x.shape[1] * weight.shape[0]
        x = x.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward), autocast:
            y = F.linear(x, weight)
        flops += gemm
        if time.perf_counter() - start > stop_after:
            return time.perf_counter() - start, flops, False
        if backward:
            y.backward(grad)
            flops += gemm
            if time.perf_counter() - start > stop_after:
                return time.perf_counter() - start, flops, False
    return time.perf_counter() - start, flops, True


def _flops(shapes: list[tuple[int, int]], rows: int, backward: bool) -> float:
    return sum(2 * rows * k * n for k, n in shapes) * (2 if backward else 1)


def run_probe(shapes: list[tuple[int, int]], modes: Iterable[str], backward: bool = True) -> dict[str, Any]:
    """GFLOP/s of each format on these shapes, now: the best of interleaved passes (`MIN_ROUNDS`-`MAX_ROUNDS`).

    Every pass stops once it has run `SCREEN_OUT` x the best complete pass so far; such a format is out
    (its GFLOP/s is the rate of the GEMMs it finished) on its second stop, or on its first when it ran at
    under a tenth of the best rate, so a format 40x slower costs one GEMM, not seconds. It measures alone in its
    process (`busy`), and the process's other threads give up the GIL within `PROBE_SWITCH_INTERVAL`
    (scripts/bench_probe.py).
    """
    with _GATE.alone():
        interval = sys.getswitchinterval()
        sys.setswitchinterval(PROBE_SWITCH_INTERVAL)
        try:
            return _run_probe(shapes, list(modes), backward)
        finally:
            sys.setswitchinterval(interval)


def _run_probe(shapes: list[tuple[int, int]], modes: list[str], backward: bool,
               rounds: tuple[int, int] = (MIN_ROUNDS, MAX_ROUNDS)) -> dict[str, Any]:
    rows = probe_rows(shapes, backward)
    start = time.perf_counter()
    for mode in modes:  # the first call of each kind initialises oneDNN and the thread pool
        _timed_pass(mode, [_operands(mode, 8, *shapes[0])], backward, float("inf"))
    operands = {m: [_operands(m, rows, k, n) for k, n in shapes] for m in modes}
    best, stops, alive = float("inf"), {m: 0 for m in modes}, list(modes)
    rates: dict[str, list[float]] = {m: [0.0] for m in modes}
    for passes in range(1, rounds[1] + 1):
        for mode in list(alive):
            seconds, flops, complete = _timed_pass(mode, operands[mode], backward, SCREEN_OUT * best)
            rates[mode].append(flops / seconds / 1e9)
            if complete:
                best = min(best, seconds)
                continue
            stops[mode] += 1
            if stops[mode] == 2 or max(rates[mode]) < max(max(r) for r in rates.values()) / 10:
                alive.remove(mode)
        settled = all(_agree(rates[m]) for m in alive)
        if passes >= rounds[0] and settled:
            break
    return {"gflops": {m: round(max(r), 1) for m, r in rates.items()},
            "stopped_early": [m for m in modes if m not in alive], "rows": rows,
            "shapes": [list(s) for s in shapes], "backward": backward, "passes": passes, "settled": settled,
            "seconds": round(time.perf_counter() - start, 3)}


def _agree(rates: list[float]) -> bool:
    """Whether the two best passes agree to `AGREE`: then the best one is the rate, not a lucky window."""
    first, second = sorted(rates, reverse=True)[:2]
    return second >= (1 - AGREE) * first


def probe(shapes: list[tuple[int, int]], modes: Iterable[str], backward: bool = True) -> dict[str, Any]:
    """`run_probe`, once per machine: the cached result when there is one (`cached: true`). A probe whose passes never
    agreed (`settled: false`: the cores were busy throughout) is not cached: one busy moment must not decide every
    later run on the machine."""
    from filelock import FileLock

    modes = list(modes)
    path = cache_file(shapes, modes, backward)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return {**json.loads(path.read_text(encoding="utf-8")), "cached": True, "cache_file": str(path)}
            except (OSError, ValueError):
                pass  # a damaged entry is measured again
        result = {**run_probe(shapes, modes, backward), **machine()}
        if result["settled"]:
            write_json(path, result)
        else:
            log.warning("precision probe: %d passes at %s did not agree to %.0f%% (another job is using the cores?): "
                        "its best rates %s decide this run, and the next run measures again", result["passes"],
                        shapes, AGREE * 100, result["gflops"])
    return {**result, "cached": False, "cache_file": str(path)}


def pick(gflops: dict[str, float]) -> str:
    """The fastest format; a bf16 one only when it beats fp32 by `MARGIN`."""
    if not gflops:
        return FP32
    fastest = max(gflops, key=gflops.__getitem__)
    if FP32 in gflops and fastest != FP32 and gflops[fastest] < MARGIN * gflops[FP32]:
        return FP32
    return fastest


def device_bf16(device_type: str) -> bool:
    """Whether a CUDA/XPU device runs bf16 natively (Ampere and newer, every XPU)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "xpu"


def choose_dtype(device: str | None = None, model_config: Any = None) -> str:
    """The torch dtype name (`float32`/`bfloat16`/`float16`) for in-process generation on `device`.

    CUDA: bfloat16 where supported, else float16. XPU: bfloat16. CPU: the faster of fp32 and bf16 weights in a
    forward-only probe of the model's shapes (`model_config`, else SmolLM2-135M's), cached per machine.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = device.split(":")[0]
    if device_type in ("cuda", "xpu"):
        return "bfloat16" if device_bf16(device_type) else "float16"
    if device_type != "cpu":
        return "float32"
    shapes = linear_shapes(model_config) if model_config is not None else list(DEFAULT_SHAPES)
    return "bfloat16" if pick(probe(shapes, (FP32, BF16_WEIGHTS), backward=False)["gflops"]) == BF16_WEIGHTS else "float32"


# --- threads -----------------------------------------------------------------------------------------


def busy_cores(window: float = 0.5) -> float:
    """How many cores other jobs keep busy now: /proc/stat's non-idle share over `window` seconds while this process
    sleeps (the load average lags by a minute: right after prep's generation it still counts prep), else the
    1-minute load average."""
    import os

    def snapshot() -> tuple[float, float]:
        with open("/proc/stat", encoding="ascii") as handle:
            ticks = [float(x) for x in handle.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total, idle = snapshot()
        time.sleep(window)
        total2, idle2 = snapshot()
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1 - (idle2 - idle) / max(total2 - total, 1e-9))


def free_cpu_threads(processes: int = 1, busy: float | None = None) -> int:
    """Intra-op threads for this process: the cores other jobs leave free (`busy_cores`), shared among the
    `processes` of a launch, at least 1. Measured on a 2-core AVX2 EPYC with other jobs at load 5-10
    (scripts/bench_train.py, 4 rows): torch's default of 2 threads trained at 2.4 tokens/s, 1 thread at 18.5: a
    thread waiting at an OpenMP barrier for a core another job holds spins instead of computing. On an idle
    machine every core is used."""
    import os

    cores = os.cpu_count() or 1
    busy = busy_cores() if busy is None else busy
    return max(1, round(max(cores - busy, 0)) // max(processes, 1))


def set_cpu_threads(processes: int = 1) -> dict[str, Any]:
    """Set torch's intra-op threads to `free_cpu_threads` unless the user fixed them (OMP_NUM_THREADS); the facts
    say what was chosen and from what."""
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return {"threads": torch.get_num_threads(), "choice": "OMP_NUM_THREADS"}
    busy = busy_cores()
    threads = free_cpu_threads(processes, busy)
    torch.set_num_threads(threads)
    return {"threads": threads, "choice": "free cores", "cores": os.cpu_count(), "busy_cores": round(busy, 2),
            "processes": processes}
