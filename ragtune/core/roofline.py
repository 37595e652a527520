"""Each stage's work beside the floor that work has on this machine: where the minutes go, and how far from the machine.

A stage's work is counted where it happens: tokens trained (train), the prompt, cached and generated tokens of every
managed vLLM server (its Prometheus `/metrics`, read before the server stops), in-process generation, texts embedded.
Its floor is the FLOPs of that work at the GEMM rate ragtune's precision probe measures at the model's own layer
shapes, in the format the work runs in (`ragtune.core.precision`, cached per machine). `seconds / floor` is how far a
stage is from the machine; `ragtune run` records it per stage in manifest.json (`roofline`), the report shows it and
`--dry-run` estimates minutes from it. The floor counts linear layers, attention and the LM head where logits are
made; a decode step at small batch is bound by memory bandwidth instead, so its gap is larger by nature.
Work on a GPU is counted without a floor (this CPU's peak says nothing of it); endpoints ragtune does not start
(`base_url`) are not counted. Server starts are listed apart: time with no work in it.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

from ragtune.core.run_dir import short_hash

# Encoders attend both ways (every position sees the whole text) and have a two-matrix MLP.
ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "nomic_bert", "new"})
RSS_INTERVAL = 0.5  # s between memory samples: a vLLM server's KV cache is allocated once, so peaks last seconds


@dataclass(frozen=True)
class Shape:
    """What a model's FLOPs per token follow from (its config.json)."""

    layers: int
    hidden: int
    q_dim: int  # attention heads x head dim
    kv_dim: int
    inner: int  # MLP width
    vocab: int
    gated: bool  # three MLP matrices (Llama's gate/up/down) instead of two
    encoder: bool

    @classmethod
    def of(cls, model_config: Any) -> "Shape":
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        hidden, heads = text.hidden_size, text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        encoder = getattr(text, "model_type", "") in ENCODERS
        return cls(layers=text.num_hidden_layers, hidden=hidden, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
                   inner=getattr(text, "intermediate_size", None) or 4 * hidden, vocab=text.vocab_size,
                   gated=not encoder, encoder=encoder)

    @property
    def linear_params(self) -> int:
        attention = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim
        return self.layers * (attention + (3 if self.gated else 2) * self.hidden * self.inner)

    def forward_flops(self, tokens: float, context: float, logits: float = 0.0) -> float:
        """Forward FLOPs of `tokens` positions that each attend to `context` positions on average, with LM-head
        logits at `logits` positions."""
        return 2 * self.linear_params * tokens + 4 * self.layers * self.q_dim * context * tokens \
            + 2 * self.hidden * self.vocab * logits


def model_shape(model: Any) -> Shape | None:
    """The shape of a model given by its config object or a local folder holding config.json; None if unreadable."""
    try:
        return Shape.of(_config(model))
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


def _config(model: Any) -> Any:
    """A model config from a config object or a local folder holding config.json; None if unreadable."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(model))
        except (OSError, ValueError):
            return None
    return model


def precision_mode(dtype: str, autocast: bool = False) -> str:
    """The precision probe's format for weights in `dtype` (or a probe format, kept), under bf16 `autocast` or not."""
    from ragtune.core.precision import BF16_AUTOCAST, BF16_WEIGHTS, FP32, MODES

    if dtype in MODES:
        return dtype
    return BF16_WEIGHTS if dtype in ("bfloat16", "bf16") else BF16_AUTOCAST if autocast else FP32


def cpu_rate(shapes: list[list[int]], mode: str, backward: bool) -> float | None:
    """GFLOP/s of this machine's CPU at these layer shapes in the probe format `mode`, forward only or forward +
    input gradient (LoRA's training work), on every core this process may use: the best the precision probe has
    measured here. Measured once per process and kept as the maximum over runs (`cache/roofline/`): a probe on a
    busy machine reads low (at MiniLM's shapes 17 GFLOP/s beside a vLLM server, 2026-12-05), and a floor must be
    the machine's, not the moment's."""
    key = (tuple(tuple(s) for s in shapes), mode, backward)
    with _RATES_LOCK:
        if key not in _RATES:
            _RATES[key] = _best_rate(key)
        return _RATES[key]


_RATES: dict[tuple[Any, ...], float | None] = {}
_RATES_LOCK = threading.Lock()


def _best_rate(key: tuple[Any, ...]) -> float | None:
    """A fresh probe at every core, folded into the best one this machine recorded."""
    import json

    import torch

    from ragtune.core.artifacts import write_json
    from ragtune.core.models import cache_dir
    from ragtune.core.precision import FP32, machine, run_probe

    shapes, mode, backward = key
    identity = {**machine(), "threads": len(os.sched_getaffinity(0)), "key": repr(key)}
    path = cache_dir() / "roofline" / f"{short_hash(identity)}.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(identity["threads"])
    try:
        fresh = run_probe(list(shapes), tuple(dict.fromkeys((FP32, mode))), backward)["gflops"].get(mode) or 0.0
    finally:
        torch.set_num_threads(threads)
    try:
        stored = float(json.loads(path.read_text(encoding="utf-8"))["gflops"])
    except (OSError, ValueError, KeyError, TypeError):
        stored = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**identity, "gflops": max(fresh, stored)})
    return max(fresh, stored) or None


@dataclass
class Work:
    """One kind of work of one model in a stage."""

    kind: str  # prefill, decode, train, eval_forward, embed
    model: str
    tokens: int
    flops: float
    gflops: float | None  # the probe's rate for this work here; None: not on this machine's CPU
    where: str
    shapes: list[list[int]] = field(default_factory=list)  # the model's layer shapes the rate was probed at
    mode: str = ""  # the probe's format
    backward: bool = False

    @property
    def floor_s(self) -> float | None:
        return self.flops / (self.gflops * 1e9) if self.gflops else None


@dataclass
class Meter:
    """The work, server starts and memory peak of the stage that is running (one per process: `METER`)."""

    work: list[Work] = field(default_factory=list)
    starts: list[tuple[str, float]] = field(default_factory=list)
    rss_peak: int = 0  # bytes, the largest single process among ragtune and its children
    rss_peak_process: str = ""

    def add(self, work: Work) -> None:
        if work.tokens > 0:
            self.work.append(work)

    def server_started(self, model: str, seconds: float) -> None:
        self.starts.append((model, seconds))

    def summary(self, seconds: float) -> dict[str, Any]:
        """The manifest's `roofline` entry: work merged by (kind, model, where), floors and the gap."""
        merged: dict[tuple[str, str, str], Work] = {}
        for item in self.work:
            key = (item.kind, item.model, item.where)
            if key in merged:
                old = merged[key]
                merged[key] = replace(old, tokens=old.tokens + item.tokens, flops=old.flops + item.flops)
            else:
                merged[key] = item
        rows = [{**asdict(w), "flops": round(w.flops), "floor_s": None if w.floor_s is None else round(w.floor_s, 2)}
                for w in merged.values()]
        floors = [w.floor_s for w in merged.values() if w.floor_s is not None]
        floor = sum(floors) if floors else None
        return {"seconds": round(seconds, 2), "work": rows, "floor_s": None if floor is None else round(floor, 2),
                "x_floor": round(seconds / floor, 1) if floor else None,
                "server_starts": {"count": len(self.starts), "seconds": round(sum(s for _, s in self.starts), 1)},
                "rss_peak_gb": round(self.rss_peak / 2**30, 2), "rss_peak_process": self.rss_peak_process}


METER = Meter()


def _largest_process() -> tuple[int, str]:
    """RSS (bytes) and name of the largest process among this one and its descendants (vLLM servers among them)."""
    import psutil

    me = psutil.Process()
    best, name = 0, ""
    for proc in [me, *me.children(recursive=True)]:
        try:
            rss = proc.memory_info().rss
            if rss > best:
                best, name = rss, ("ragtune" if proc.pid == me.pid else proc.name())
        except psutil.Error:
            continue
    return best, name


@contextmanager
def metered() -> Iterator[Meter]:
    """A fresh `METER` for one stage, with a thread sampling the largest process's RSS every RSS_INTERVAL."""
    global METER
    METER = meter = Meter()
    done = threading.Event()

    def sample() -> None:
        while True:
            rss, name = _largest_process()
            if rss > meter.rss_peak:
                meter.rss_peak, meter.rss_peak_process = rss, name
            if done.wait(RSS_INTERVAL):
                return

    sampler = threading.Thread(target=sample, name="ragtune-rss", daemon=True)
    sampler.start()
    try:
        yield meter
    finally:
        done.set()
        sampler.join(timeout=5)


# --- where work is counted ------------------------------------------------------------------------------------------


def _add(kind: str, model: Any, name: str, tokens: int, flops: float, *, dtype: str, device: str, where: str,
         backward: bool = False) -> None:
    from ragtune.core.precision import linear_shapes

    config = _config(model)
    shapes = [list(s) for s in linear_shapes(config)] if config is not None else []
    mode = precision_mode(dtype)
    rate = cpu_rate(shapes, mode, backward) if device == "cpu" and shapes and tokens > 0 else None
    METER.add(Work(kind, name, tokens, flops, rate, where, shapes, mode, backward))


def count_generation(model: Any, name: str, *, prompt_tokens: int, cached_tokens: int, generated_tokens: int,
                     requests: int, dtype: str, device: str, where: str) -> None:
    """A server's or in-process model's generation: prefill of the prompt tokens it computed (prefix-cache hits
    excluded), one LM-head row per request, and decode of the generated tokens."""
    model = _config(model)  # a folder's config.json read once for the shape and the rate
    shape = model_shape(model)
    if shape is None or requests <= 0:
        return
    prompt = prompt_tokens / requests
    computed = max(prompt_tokens - cached_tokens, 0)
    _add("prefill", model, name, computed, shape.forward_flops(computed, prompt / 2, logits=requests), dtype=dtype,
         device=device, where=where)
    context = prompt + generated_tokens / requests / 2
    _add("decode", model, name, generated_tokens, shape.forward_flops(generated_tokens, context, generated_tokens),
         dtype=dtype, device=device, where=where)


def count_training(model: Any, name: str, *, tokens: int, labelled: int, sequence: float, full: bool, mode: str,
                   device: str, where: str) -> None:
    """Training steps: forward, then the input gradients (LoRA, a frozen base) or input and weight gradients (full
    fine-tuning); attention's backward costs twice its forward."""
    model = _config(model)  # a folder's config.json read once for the shape and the rate
    shape = model_shape(model)
    if shape is None:
        return
    linear = 2 * shape.linear_params * tokens
    attention = 4 * shape.layers * shape.q_dim * (sequence / 2) * tokens
    head = 2 * shape.hidden * shape.vocab * labelled
    flops = (linear + head) * (3 if full else 2) + attention * 3
    _add("train", model, name, tokens, flops, dtype=mode, device=device, where=where, backward=True)


def count_forward(kind: str, model: Any, name: str, *, tokens: int, sequence: float, logits: int, dtype: str,
                  device: str, where: str) -> None:
    """Forward-only work: eval loss during training (`eval_forward`), embedding texts (`embed`)."""
    model = _config(model)  # a folder's config.json read once for the shape and the rate
    shape = model_shape(model)
    if shape is None:
        return
    context = sequence if shape.encoder else sequence / 2
    _add(kind, model, name, tokens, shape.forward_flops(tokens, context, logits), dtype=dtype, device=device,
         where=where)
