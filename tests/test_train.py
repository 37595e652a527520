"""The train stage on real components: TRL SFTTrainer + PEFT on a tiny Llama (SmolLM2 tokenizer/template)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from ragtune.app.config import ConfigError, load_config
from ragtune.core.run_dir import RunDir

# The shape of data_prep's rows (system prompt, RAG user turn with context + question, teacher answer).
SYSTEM_PROMPT = "You are an expert Q&A system. Answer the query using the provided context information."
USER_TEMPLATE = "Context information is below.\n---------------------\n{context}\n---------------------\nQuery: {question}\nAnswer: "

FACTS = [
    ("Uber's ridesharing products are offered in over 70 countries.", "In how many countries are ridesharing products offered?", "Over 70 countries."),
    ("Uber Eats lets consumers order food from restaurants for delivery.", "What does Uber Eats let consumers do?", "Order food from restaurants for delivery."),
    ("Freight connects shippers with carriers in the trucking industry.", "Whom does Freight connect?", "Shippers with carriers in trucking."),
    ("The company had 1.3 million drivers and couriers in the quarter.", "How many drivers and couriers were there?", "1.3 million drivers and couriers."),
    ("Gross Bookings grew 56% year-over-year to $90.4 billion in 2021.", "How much did Gross Bookings grow?", "56% year-over-year, to $90.4 billion."),
    ("Mobility trips were lower due to COVID-19 restrictions.", "Why were Mobility trips lower?", "Because of COVID-19 restrictions."),
]


def chat_row(context: str, question: str, answer: str) -> dict[str, Any]:
    """A row shaped like data_prep's data/train.jsonl output."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(context=context, question=question)},
            {"role": "assistant", "content": answer},
        ],
        "meta": {"question_id": question[:12], "source": "uber_10k_excerpt.pdf"},
    }


def write_rows(run_root: Path, rows: list[dict[str, Any]]) -> Path:
    path = RunDir(run_root).train_jsonl
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def default_rows(n: int = 12) -> list[dict[str, Any]]:
    return [chat_row(*FACTS[i % len(FACTS)]) for i in range(n)]


@pytest.fixture
def make_config(write_config, tiny_llama_dir: Path, tmp_path: Path):
    """A config training the tiny Llama for a few steps; `train` keys override, `rows` go to data/train.jsonl."""

    def _make(rows: list[dict[str, Any]] | None = None, name: str = "config.yaml", run: str = "run", **train: Any):
        train_section = {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                         "logging_steps": 1, "save_steps": 2,
                         "save_strategy": "steps", "eval_strategy": "no", "report_to": "none", "disable_tqdm": True, **train}
        path = write_config(name=name, output_dir=str(tmp_path / run), student={"model": str(tiny_llama_dir)},
                            train=train_section)
        config = load_config(path)
        write_rows(config.output_dir, default_rows() if rows is None else rows)
        return config

    return _make


def test_label_check_trains_answer_and_end_of_turn_only(make_config, capsys):
    from ragtune.train import sft

    config = make_config()
    facts = sft.run(config, RunDir(config.output_dir), check_only=True)

    example = capsys.readouterr().out.split(":\n", 1)[1]
    trained_spans = [part.split("]]")[0] for part in example.split("[[")[1:]]
    # Exactly one trained span per row, and it is the assistant answer followed by the end-of-turn token.
    assert len(trained_spans) == 1
    assert trained_spans[0].rstrip("\n").endswith("<|im_end|>")
    assert trained_spans[0].replace("<|im_end|>", "").strip() in {a for _, _, a in FACTS}
    assert "<|im_start|>assistant" not in trained_spans[0]
    check = facts["label_check"]
    assert check["rows_checked"] == 12 and check["end_of_turn_tokens"] == ["<|im_end|>"]
    assert 0 < check["trained_tokens"] < check["tokens"] / 4


def test_label_check_sees_rows_through_packing(make_config):
    from ragtune.train import label_check, sft

    rows = default_rows(6)
    rows[4]["messages"][-1]["content"] = " "
    config = make_config(rows=rows, packing=True, max_length=512, validation_split=0.0)
    with pytest.raises(label_check.LabelCheckError, match=r"1 of 6 rows:\n  \S+train\.jsonl:5: no answer token"):
        sft.run(config, RunDir(config.output_dir), check_only=True)


def test_label_check_names_the_row_with_an_empty_answer(make_config):
    from ragtune.train import label_check, sft

    rows = default_rows(6)
    rows[2]["messages"][-1]["content"] = ""
    config = make_config(rows=rows, validation_split=0.0)
    with pytest.raises(label_check.LabelCheckError) as err:
        sft.run(config, RunDir(config.output_dir), check_only=True)
    message = str(err.value)
    assert "train.jsonl:3" in message and "no answer token is trained" in message
    assert "train.jsonl:1:" not in message and "1 of 6 rows" in message


def test_label_check_fails_when_max_length_cuts_the_end_of_turn(make_config):
    from ragtune.train import label_check, sft

    rows = default_rows(4)
    rows[1]["messages"][-1]["content"] = "a long answer " * 200
    config = make_config(rows=rows, validation_split=0.0, max_length=300)
    with pytest.raises(label_check.LabelCheckError, match=r"train\.jsonl:2: the end-of-turn token \['<\|im_end\|>'\] is not trained"):
        sft.run(config, RunDir(config.output_dir), check_only=True)


def test_bad_row_is_reported_with_file_and_line(make_config):
    from ragtune.train import sft
    from ragtune.train.rows import TrainDataError

    rows = default_rows(3)
    rows[1] = {"messages": [{"role": "user", "content": "no answer turn"}]}
    config = make_config(rows=rows)
    with pytest.raises(TrainDataError, match=r"train\.jsonl:2: the last message must be the assistant"):
        sft.run(config, RunDir(config.output_dir), check_only=True)


def test_validation_holds_out_whole_questions_with_their_closed_book_twins(tmp_path):
    from ragtune.train.rows import load_rows, split_rows

    rows = []
    for q in range(20):
        answer = {"role": "assistant", "content": f"answer {q}"}
        rows.append({"messages": [{"role": "user", "content": f"question {q}"}, answer],
                     "meta": {"question_id": f"q{q}", "mode": "closed_book"}})
        rows.append({"messages": [{"role": "user", "content": f"context\nquestion {q}"}, answer],
                     "meta": {"question_id": f"q{q}", "mode": "rag"}})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    train, held = split_rows(load_rows(path), 0.1, None, seed=3)
    held_questions = {row["question"] for row in held}
    assert len(held_questions) == 2 and len(held) == 4  # 10% of 20 questions, both rows of each
    assert held_questions.isdisjoint(row["question"] for row in train) and len(train) == 36


def test_eval_batches_take_the_training_batch_size_unless_set(write_config):
    assert load_config(write_config(train={"per_device_train_batch_size": 2})).train.sft_kwargs()[
        "per_device_eval_batch_size"] == 2
    assert load_config(write_config(train={"per_device_train_batch_size": 2, "per_device_eval_batch_size": 8})
                       ).train.sft_kwargs()["per_device_eval_batch_size"] == 8


def test_peft_defaults_follow_the_method(write_config):
    prompt = load_config(write_config(train={"method": "prompt_tuning"}))
    assert prompt.train.peft_kwargs() == {"num_virtual_tokens": 20}
    dora = load_config(write_config(train={"method": "dora", "peft": {"r": 8}}))
    assert dora.train.peft_kwargs()["use_dora"] is True and dora.train.peft_kwargs()["r"] == 8
    with pytest.raises(ConfigError, match="train.peft.r"):
        load_config(write_config(train={"method": "prefix_tuning", "peft": {"r": 8}}))
    with pytest.raises(ConfigError, match="method: full"):
        load_config(write_config(train={"method": "full", "peft": {"r": 8}}))


def test_train_saves_adapter_and_loss_curve_and_resumes(make_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ragtune.train import sft

    config = make_config(report_to=["tensorboard"])
    run_dir = RunDir(config.output_dir)
    first = sft.run(config, run_dir)
    assert first["global_step"] == 2 and first["resumed_from"] is None
    # 12 rows of 6 questions asked twice: the held-out question takes both its rows (no answer on both sides)
    assert first["method"] == "lora" and first["train_rows"] == 10 and first["eval_rows"] == 2
    assert (run_dir.adapter / "adapter_model.safetensors").exists() and (run_dir.adapter / "tokenizer.json").exists()
    assert list((run_dir.logs / "tensorboard").glob("events.out.tfevents.*"))
    curve = json.loads(run_dir.loss_curve.read_text())
    assert [p["step"] for p in curve["train"]] == [1, 2] and all(math.isfinite(p["loss"]) for p in curve["train"])

    # "Interrupted" after step 2: a longer run picks up checkpoint-2 instead of starting over.
    longer = make_config(max_steps=4)
    second = sft.run(longer, run_dir)
    assert second["resumed_from"].endswith("checkpoint-2")
    assert second["global_step"] == 4
    curve = json.loads(run_dir.loss_curve.read_text())
    assert [p["step"] for p in curve["train"]] == [1, 2, 3, 4]

    base = AutoModelForCausalLM.from_pretrained(config.student.model)
    assert isinstance(PeftModel.from_pretrained(base, str(run_dir.adapter)), PeftModel)

    # New rows: the old checkpoints belong to another training, so they are set aside, not resumed.
    write_rows(config.output_dir, default_rows(10))
    fresh = sft.run(longer, run_dir)
    assert fresh["resumed_from"] is None and fresh["global_step"] == 4
    assert len(list(run_dir.stale.glob("*/checkpoints/checkpoint-4"))) == 1  # retired, not deleted


def test_same_seed_same_loss_curve(make_config):
    from ragtune.train import sft

    curves = []
    for run in ("a", "b"):
        config = make_config(run=run, name=f"{run}.yaml", max_steps=3, learning_rate=1e-2)
        sft.run(config, RunDir(config.output_dir))
        curves.append([p["loss"] for p in json.loads(RunDir(config.output_dir).loss_curve.read_text())["train"]])
    assert curves[0] == curves[1] and len(curves[0]) == 3
    assert curves[0][0] != curves[0][-1]


def test_merged_and_adapter_load_in_plain_libraries_and_agree(make_config):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.train import merge, sft

    config = make_config(max_steps=3, learning_rate=5e-2)
    run_dir = RunDir(config.output_dir)
    sft.run(config, run_dir)
    facts = merge.run(config, run_dir)
    assert facts["merged"] is True and facts["max_abs_logit_diff"] <= facts["tolerance"] == 1e-3

    tokenizer = AutoTokenizer.from_pretrained(run_dir.merged)
    assert "<|im_start|>" in tokenizer.chat_template
    merged = AutoModelForCausalLM.from_pretrained(run_dir.merged)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.student.model), str(run_dir.adapter))
    plain = AutoModelForCausalLM.from_pretrained(config.student.model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How many countries?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged, with_adapter, plain))
    assert (merged_logits - adapter_logits).abs().max() < 1e-3
    # The adapter really changed the model, so agreeing is not trivial.
    assert (merged_logits - base_logits).abs().max() > 1e-2


def test_merge_refuses_an_adapter_saved_without_its_weights(make_config):
    """What FSDP's save gave on the H200 box: a valid adapter folder whose weights file holds no tensor. PEFT loads
    it with a warning and merged/ would be the base model, verified against itself; merge must stop instead."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.train import merge

    config = make_config()
    run_dir = RunDir(config.output_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(config.student.model), LoraConfig(target_modules="all-linear"))
    model.save_pretrained(str(run_dir.adapter), state_dict={})
    assert (run_dir.adapter / "adapter_model.safetensors").exists()
    with pytest.raises(merge.MergeError, match="holds no adapter weights"):
        merge.run(config, run_dir)
    assert not run_dir.merged.exists()


FSDP_SAVE = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from transformers import AutoModelForCausalLM
from ragtune.core.models import adapter_weight_names
from ragtune.train.adapter import save_fsdp_adapter

class OneProcessFSDP:
    # what accelerate's Accelerator does for FSDP1 in get_state_dict and unwrap_model, on one gloo process
    is_main_process = True
    def get_state_dict(self, model):
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            return model.state_dict()
    def unwrap_model(self, model):
        return model.module

student, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(student), LoraConfig(target_modules="all-linear", r=8))
with torch.no_grad():
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.02)
trained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=False, auto_wrap_policy=fsdp_auto_wrap_policy(model))
nested_before = sum("_fsdp_wrapped_module" in n for n, _ in wrapped.module.named_modules())
said = save_fsdp_adapter(OneProcessFSDP(), wrapped, out)
reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), out).state_dict()
print(json.dumps({"said": said, "trained": len(trained), "saved": len(adapter_weight_names(out)),
                  "equal": sum(torch.equal(v, reloaded[k]) for k, v in trained.items()),
                  "nested_before": nested_before,
                  "nested_after": sum("_fsdp_wrapped_module" in n for n, _ in wrapped.module.named_modules())}))
dist.destroy_process_group()
"""


def test_fsdp_adapter_save_keeps_every_lora_tensor(tiny_llama_dir, tmp_path):
    """FSDP1 with PEFT's per-layer wrap policy (what the Trainer picks for a PEFT model), on CPU with gloo: the
    gathered state dict holds the LoRA tensors, but PEFT matched none of them to the wrapped module names and saved
    an empty adapter (seen on the H200 box). adapter/ must hold every trained tensor, equal after a reload."""
    import os
    import subprocess
    import sys

    script = tmp_path / "fsdp_save.py"
    script.write_text(FSDP_SAVE, encoding="utf-8")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tiny_llama_dir), str(tmp_path / "adapter")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["trained"] > 0 and facts["saved"] == facts["equal"] == facts["trained"], facts
    assert facts["nested_before"] > 0 and facts["nested_after"] == facts["nested_before"]  # the wrappers are back


def test_defaults_take_the_installed_transformers_name_for_activation_checkpointing(make_config, monkeypatch):
    """transformers 5.17 (the H200 image) has only `gradient_checkpointing`; ragtune's default must not be an
    unknown key there, and a user's own key still wins."""
    from ragtune.train import config as train_config

    fields = {k: v for k, v in train_config.sft_config_fields().items() if k != "activation_checkpointing"}
    monkeypatch.setattr(train_config, "sft_config_fields", lambda: fields)
    kwargs = make_config().train.sft_kwargs()
    assert kwargs["gradient_checkpointing"] is False and "activation_checkpointing" not in kwargs
    assert make_config(gradient_checkpointing=True).train.sft_kwargs()["gradient_checkpointing"] is True


def test_qlora_runs_4bit_on_cpu_and_merges_onto_full_precision(make_config):
    from ragtune.train import merge, sft, student

    # bitsandbytes (a dependency, >= 0.45) has a CPU backend: 4-bit NF4 quantize + matmul work without a GPU.
    assert student.bnb_4bit_works() is None, f"bitsandbytes 4-bit does not run on this CPU: {student.bnb_4bit_works()}"
    config = make_config(method="qlora", learning_rate=5e-2)
    run_dir = RunDir(config.output_dir)
    facts = sft.run(config, run_dir)
    assert facts["method"] == "qlora" and facts["warnings"] == [] and facts["loaded_in_4bit"] is True
    assert "qlora_fallback" not in facts
    assert json.loads((run_dir.adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    merged = merge.run(config, run_dir)
    assert merged["merged"] is True and merged["dtype"] == "float32"


def test_qlora_without_a_4bit_backend_fails_unless_the_lora_fallback_is_asked_for(make_config, monkeypatch):
    """QLoRA never silently becomes LoRA: no 4-bit backend is an error naming cause and fix; the opt-in key
    `train.qlora_fallback: lora` trains LoRA and says so in the facts."""
    import sys

    from ragtune.train import sft, student

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # a machine without bitsandbytes: its import fails
    config = make_config(method="qlora")
    with pytest.raises(student.QLoRAUnavailableError) as err:
        sft.run(config, RunDir(config.output_dir), check_only=True)
    message = str(err.value)
    assert "train.method: qlora" in message and "ModuleNotFoundError" in message
    assert "pip install -U bitsandbytes" in message and "train.qlora_fallback: lora" in message

    fallback = make_config(method="qlora", qlora_fallback="lora", name="fallback.yaml", run="fallback")
    facts = sft.run(fallback, RunDir(fallback.output_dir), check_only=True)
    assert facts["requested_method"] == "qlora" and facts["method"] == "lora" and facts["loaded_in_4bit"] is False
    assert facts["qlora_fallback"]["ran"] == "lora" and "ModuleNotFoundError" in facts["qlora_fallback"]["cause"]
    assert "train.qlora_fallback: lora" in facts["warnings"][0]


def test_full_fine_tuning_saves_a_complete_model(make_config):
    from transformers import AutoModelForCausalLM

    from ragtune.train import merge, sft

    config = make_config(method="full", learning_rate=1e-3)
    run_dir = RunDir(config.output_dir)
    assert sft.run(config, run_dir)["global_step"] == 2
    assert AutoModelForCausalLM.from_pretrained(run_dir.adapter).config.num_hidden_layers == 2
    result = merge.run(config, run_dir)
    assert result["merged"] is False and "complete model" in result["reason"]


def test_prompt_tuning_trains_and_merge_says_there_is_nothing_to_merge(make_config):
    from ragtune.train import merge, sft

    config = make_config(method="prompt_tuning", learning_rate=1e-2)
    run_dir = RunDir(config.output_dir)
    facts = sft.run(config, run_dir)
    assert facts["global_step"] == 2
    assert json.loads((run_dir.adapter / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    result = merge.run(config, run_dir)
    assert result["merged"] is False and "virtual tokens" in result["reason"]
    assert not run_dir.merged.exists()


@pytest.mark.slow
def test_two_process_cpu_ddp_really_runs_two_ranks(make_config):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: gloo group of 2, each rank takes half the steps."""
    import os
    import subprocess
    import sys

    config = make_config(validation_split=0.0, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2,
                         save_strategy="no")
    port = free_port()
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port),
         "-m", "ragtune.train", str(config.config_path)],
        cwd=Path(__file__).parent.parent, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    assert done.returncode == 0, "\n".join(errors[-30:])
    facts = json.loads(done.stdout[done.stdout.index("{\n"):])  # printed once, by rank 0
    stage = json.loads(RunDir(config.output_dir).manifest.read_text())["stages"]["train"]
    assert stage["status"] == "done" and stage["world_size"] == 2 and facts["world_size"] == 2
    # 12 rows, 2 per device, 2 ranks: 3 optimizer steps (one process would take 6).
    assert stage["global_step"] == 3
    assert (RunDir(config.output_dir).adapter / "adapter_model.safetensors").exists()


def test_early_stopping_stops_when_eval_loss_stops_improving(make_config):
    from ragtune.train import sft

    # A learning rate this high makes the eval loss climb after the first steps; patience 1 stops the run.
    config = make_config(max_steps=12, learning_rate=3.0, warmup_steps=0, eval_strategy="steps", eval_steps=1,
                         save_steps=1, early_stopping_patience=1, validation_split=0.25)
    facts = sft.run(config, RunDir(config.output_dir))
    assert facts["global_step"] < 12
    evals = json.loads(RunDir(config.output_dir).loss_curve.read_text())["eval"]
    assert len(evals) == facts["global_step"] and min(p["loss"] for p in evals) < evals[-1]["loss"]
    assert facts["best_eval_loss"] == round(min(p["loss"] for p in evals), 5)


def test_labelled_positions_loss_equals_trl_loss(make_config):
    """ragtune's CPU loss path (LM head on trained positions only, right-padded rows without their attention mask)
    gives TRL's loss and gradients (TRL's path keeps the mask)."""
    import torch

    from ragtune.train import sft
    from ragtune.train.trainer import right_padded

    # fp32 (`bf16: false`), where the same gradients can be asked to 1e-4: with bf16 weights, which the precision probe
    # may pick for the tiny Llama, the causal and the masked attention kernels round differently (up to 1.4e-4 past
    # that tolerance, the loss still equal), and CI failed on it once
    config = make_config(bf16=False)
    trainer, _, _ = sft.build_trainer(config, RunDir(config.output_dir))
    assert trainer.score_labelled_only
    items = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator([{"input_ids": x["input_ids"], "labels": x["labels"]} for x in items])
    assert batch["input_ids"].shape[1] % 32 == 0  # SFT_DEFAULTS' pad_to_multiple_of: the loss ignores the padding
    mask = batch["attention_mask"]
    assert right_padded(mask) and not mask.all()  # so our path below runs without the mask
    assert not right_padded(mask.flip(-1)) and not right_padded(torch.cat([mask[:, 1:], mask[:, :1]], dim=-1))
    trainer.model.train()
    results = []
    for labelled_only in (True, False):
        trainer.score_labelled_only = labelled_only
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
        results.append((loss.item(), grads))
    (ours, our_grads), (trl, trl_grads) = results
    assert ours == pytest.approx(trl, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(our_grads, trl_grads))

    trainer.model.eval()  # Trainer.evaluate's step, which reads only the loss: the same eval_loss as TRL's
    losses = []
    for labelled_only in (True, False):
        trainer.score_labelled_only = labelled_only
        losses.append(trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=True)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(trl, rel=1e-5)


@pytest.mark.slow
def test_gguf_is_converted_once_and_loads_the_same_model(tmp_path, monkeypatch):
    """The embedded GGUF loads from a safetensors copy made once: same logits, same tokens, no second conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.core.models import SMOLLM2_ALIAS, dense_copy, load_causal_lm, load_tokenizer, resolve_model

    monkeypatch.setenv("RAGTUNE_CACHE_DIR", str(tmp_path))
    ref = resolve_model(SMOLLM2_ALIAS)
    copy = dense_copy(ref)
    weights = Path(copy.name_or_path) / "model.safetensors"
    assert weights.parent.parent == tmp_path / "gguf" and weights.exists()
    stamp = weights.stat().st_mtime_ns
    assert dense_copy(ref) == copy and weights.stat().st_mtime_ns == stamp

    text = "Uber's Mobility segment connects consumers with"
    direct_tokenizer = AutoTokenizer.from_pretrained(ref.name_or_path, gguf_file=ref.gguf_file)
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    assert tokenizer.chat_template == direct_tokenizer.chat_template
    ids = tokenizer(text, return_tensors="pt")
    direct = AutoModelForCausalLM.from_pretrained(ref.name_or_path, gguf_file=ref.gguf_file)
    with torch.inference_mode():
        assert torch.equal(direct(**ids).logits, load_causal_lm(SMOLLM2_ALIAS)(**ids).logits)


def test_cpu_training_takes_the_cores_other_jobs_leave_free(monkeypatch):
    """Threads from a measurement, not torch's default of every core: a thread spinning at an OpenMP barrier for a
    core another job holds made training 7.7x slower on a loaded 2-core EPYC."""
    import os
    import subprocess
    import sys
    import time

    import torch

    from ragtune.core import precision

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert precision.free_cpu_threads(1, busy=0.1) == 2  # idle: both cores
    assert precision.free_cpu_threads(1, busy=1.0) == 1 and precision.free_cpu_threads(1, busy=7.0) == 1
    assert precision.free_cpu_threads(2, busy=0.0) == 1  # two launched processes share the cores
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        assert precision.busy_cores(1.0) >= 0.8  # a real busy loop is seen as a busy core
    finally:
        spinner.kill()
        spinner.wait()
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert precision.set_cpu_threads() == {"threads": before, "choice": "OMP_NUM_THREADS"}  # the user's word wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    facts = precision.set_cpu_threads()
    assert facts["choice"] == "free cores" and torch.get_num_threads() == facts["threads"] >= 1
    torch.set_num_threads(before)


def test_bf16_auto_picks_the_faster_format_of_the_probe_and_records_it(make_config, tmp_path, monkeypatch):
    """`bf16: auto` (the CPU default) trains in the format the GEMM probe found fastest on this machine.

    The probe runs for real once (and is cached); then probe results are injected through that same cache
    entry, one case per format, and each build loads and configures the student the way the probe chose.
    """
    import torch

    from ragtune.core import precision
    from ragtune.train import sft, student

    monkeypatch.setenv("RAGTUNE_CACHE_DIR", str(tmp_path / "cache"))
    # the probe's cache is keyed by the thread count: fix it, so the builds below meet the injected entries
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    config = make_config()
    run_dir = RunDir(config.output_dir)
    measured = student.training_precision(config, "lora")
    probe = measured["probe"]
    assert measured["requested"] == "auto" and measured["device"] == "cpu" and probe["cached"] is False
    assert set(probe["gflops"]) == set(precision.MODES) and probe["gflops"]["fp32"] > 0
    assert measured["choice"] == precision.pick(probe["gflops"]) and probe["seconds"] < 30
    # cached once its passes agreed (on cores busy throughout they may not: then the next build measures again)
    assert student.training_precision(config, "lora")["probe"]["cached"] is probe["settled"]

    cache = Path(probe["cache_file"])
    entry = {k: v for k, v in probe.items() if k not in ("cached", "cache_file")}
    cases = [  # (GFLOP/s per format, expected choice, SFTConfig.bf16, dtype of the frozen base)
        ({"fp32": 60.0, "bf16_autocast": 1.5, "bf16_weights": 1.7}, "fp32", False, torch.float32),  # AVX2-only EPYC
        ({"fp32": 80.0, "bf16_autocast": 230.0, "bf16_weights": 310.0}, "bf16_weights", True, torch.bfloat16),
        ({"fp32": 80.0, "bf16_autocast": 230.0, "bf16_weights": 200.0}, "bf16_autocast", True, torch.float32),
        ({"fp32": 100.0, "bf16_autocast": 105.0, "bf16_weights": 90.0}, "fp32", False, torch.float32),  # within MARGIN
    ]
    for gflops, choice, bf16, dtype in cases:
        cache.write_text(json.dumps({**entry, "gflops": gflops}))
        trainer, facts, _ = sft.build_trainer(config, run_dir)
        assert facts["precision"]["choice"] == choice and facts["precision"]["probe"]["gflops"] == gflops
        assert trainer.args.bf16 is bf16
        base = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert base.dtype == dtype
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)

    # The bf16-weights choice trains (fp32 adapters on a bf16 base) and the run's facts record probe and choice.
    cache.write_text(json.dumps({**entry, "gflops": cases[1][0]}))
    # `student.torch_dtype: auto` (the demo's, for eval's vLLM servers) trains in the probe's choice too
    config.config_path.write_text(config.config_path.read_text().replace("student:\n", "student:\n  torch_dtype: auto\n"))
    auto = student.training_precision(load_config(config.config_path), "lora")
    assert auto["choice"] == "bf16_weights" and auto["torch_dtype"] == "bfloat16"
    facts = sft.run(make_config(max_steps=1, run="bf16", name="bf16.yaml"), RunDir(tmp_path / "bf16"))
    assert facts["precision"]["choice"] == "bf16_weights" and facts["precision"]["torch_dtype"] == "bfloat16"
    assert facts["global_step"] == 1 and math.isfinite(facts["train_loss"])


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.slow
@pytest.mark.skipif(cuda_devices() < 2,
                    reason="accelerate runs FSDP on GPUs only: on CPU, configs/accelerate/fsdp_qlora.yaml stops in "
                           "FullyShardedDataParallelPlugin ('There are currently no available devices found, must be one "
                           "of XPU, CUDA, ...'), and without sync_module_states it silently trains DDP (MULTI_CPU)")
def test_fsdp_saves_a_full_adapter_that_merges(make_config):
    """`accelerate launch` with configs/accelerate/fsdp_qlora.yaml on 2 GPUs: adapter/ holds the LoRA weights."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    from ragtune.train import merge

    config = make_config(validation_split=0.0, max_steps=2, save_strategy="no")
    config.config_path.write_text(config.config_path.read_text().replace("student:\n", "student:\n  torch_dtype: bfloat16\n"))
    port = free_port()
    repo = Path(__file__).parent.parent
    done = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(repo / "configs/accelerate/fsdp_qlora.yaml"),
         "--main_process_port", str(port), "-m", "ragtune.train", str(config.config_path)],
        cwd=repo, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = RunDir(config.output_dir)
    with safe_open(str(run_dir.adapter / "adapter_model.safetensors"), "pt") as weights:
        assert any("lora_A" in key for key in weights.keys())
    assert merge.run(load_config(config.config_path), run_dir)["merged"] is True
