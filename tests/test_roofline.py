"""Each stage's work against this machine's floor (`ragtune.core.roofline`): counted where it happens, from the
real models, and rescaled by `--dry-run`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragtune.app.estimate import rescaled_seconds
from ragtune.core import roofline
from ragtune.core.llm.hf import HFChatBackend
from ragtune.core.models import resolve_embedding
from ragtune.core.precision import DEFAULT_SHAPES
from ragtune.core.rag import embedding_model
from ragtune.core.roles import EmbeddingConfig


def _linear_params(layers: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))


def test_shape_counts_the_linear_weights_the_models_really_have(tiny_llama_dir: Path):
    """The FLOPs follow from config.json; the counts must be the weights the real modules hold (a decoder's gated
    MLP, grouped KV heads; an encoder's two-matrix MLP)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert roofline.model_shape(decoder.config).linear_params == _linear_params(decoder.model.layers)
    encoder = SentenceTransformer(resolve_embedding("all-minilm-l6-v2"), device="cpu")[0].auto_model
    shape = roofline.model_shape(encoder.config)
    assert shape.encoder and not shape.gated
    assert shape.linear_params == _linear_params(encoder.encoder.layer)


def test_in_process_generation_and_embedding_are_counted_at_this_cpus_rate(tiny_llama_dir: Path):
    backend = HFChatBackend(str(tiny_llama_dir), batch_size=2, max_new_tokens=8)
    embed = embedding_model(EmbeddingConfig())
    texts = ["Revenue grew 57% year over year.", "The company operates in 70 countries and 10,000 cities."]
    with roofline.metered() as meter:
        done = backend.chat([[{"role": "user", "content": t}] for t in texts])
        embed.get_text_embedding_batch(texts)
    work = {w.kind: w for w in meter.work}
    assert work["prefill"].tokens == sum(c.prompt_tokens for c in done)
    assert work["decode"].tokens == sum(c.completion_tokens for c in done) > 0
    st = embed._model
    assert work["embed"].tokens == int(st.tokenize(texts)["attention_mask"].sum())
    assert all(w.gflops and w.floor_s > 0 and w.shapes for w in work.values())
    summary = meter.summary(seconds=1.0)
    assert summary["floor_s"] == pytest.approx(sum(w.floor_s for w in work.values()), abs=0.02)
    assert summary["rss_peak_gb"] > 0.1 and summary["rss_peak_process"] == "ragtune"


def test_dry_run_rescales_a_recorded_stage_by_this_machines_rate_now():
    """A stage recorded on a machine half as fast (its GEMM rate half of this one's) takes half its seconds here;
    work without a floor (a GPU's) keeps its seconds."""
    shapes = [list(s) for s in DEFAULT_SHAPES]
    rate = roofline.cpu_rate(shapes, "fp32", False)
    item = {"flops": 4e12, "gflops": rate / 2, "shapes": shapes, "mode": "fp32", "backward": False}
    seconds, how = rescaled_seconds({"seconds": 300.0, "work": [item]})
    assert seconds == pytest.approx(150.0) and "floor here" in how
    assert rescaled_seconds({"seconds": 300.0, "work": [{**item, "gflops": None}]})[0] == 300.0


def test_weights_and_autocast_map_to_the_probe_format_that_runs_them():
    """fp32 weights under bf16 autocast (`train.bf16: true`) run the probe's bf16_autocast GEMMs, not fp32's."""
    assert roofline.precision_mode("float32", autocast=True) == "bf16_autocast"
    assert roofline.precision_mode("float32") == "fp32"
    assert roofline.precision_mode("bfloat16", autocast=True) == "bf16_weights"
    assert roofline.precision_mode("bf16_weights") == "bf16_weights"
