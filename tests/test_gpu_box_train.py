"""Training as the GPU box runs it, checked on CPU: FSDP early stopping (gloo, 2 processes), ZeRO-3 + QLoRA, each
rank's own device, DDP's unused-parameter search, both names of activation checkpointing, the embedder's window
against the chunk size, and a schedule that holds when the GPU count changes (issue 25)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from ragtune.app.config import ConfigError, load_config
from ragtune.core.run_dir import RunDir
from test_train import make_config  # noqa: F401  (the fixture: the tiny Llama's train config)

FSDP_BEST = """
import json, sys, types, torch, torch.distributed as dist
from pathlib import Path
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from peft.utils.other import fsdp_auto_wrap_policy
from transformers import AutoModelForCausalLM
from ragtune.core.models import adapter_weight_names
from ragtune.train.adapter import FSDPAdapterCheckpoints, nested_wrappers_spliced_out

class Accelerator:
    # what accelerate's Accelerator does for FSDP1 in get_state_dict and unwrap_model; offload_to_cpu is off: on CPU
    # there is nowhere to offload to, and with 2 gloo ranks it frees the storage the gather reads
    is_fsdp2 = False
    is_main_process = None
    def get_state_dict(self, model):
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            return model.state_dict()
    def unwrap_model(self, model):
        return model.module
    def wait_for_everyone(self):
        dist.barrier()

def lora():
    with FSDP.summon_full_params(wrapped), nested_wrappers_spliced_out(wrapped.module) as model:
        return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

def train_to(seed):
    # stands in for optimizer steps: every rank writes the same new LoRA weights into its shard
    with FSDP.summon_full_params(wrapped, writeback=True), nested_wrappers_spliced_out(wrapped.module) as model, torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return lora()

student, checkpoints = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(student), LoraConfig(target_modules="all-linear", r=8))
wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=False, auto_wrap_policy=fsdp_auto_wrap_policy(model))
accelerator = Accelerator()
accelerator.is_main_process = dist.get_rank() == 0
trainer = FSDPAdapterCheckpoints()  # the trainer's FSDP checkpoint methods, with the state the Trainer gives them
trainer.is_fsdp_enabled, trainer.accelerator, trainer.model = True, accelerator, wrapped
trainer.args = types.SimpleNamespace(output_dir=str(checkpoints), metric_for_best_model="eval_loss")

best = train_to(1)
trainer.save_model(str(checkpoints / "checkpoint-1"), _internal_call=True)  # the best eval loss
last = train_to(2)
trainer.save_model(str(checkpoints / "checkpoint-2"), _internal_call=True)  # then worse ones: early stopping
dist.barrier()
saved = [len(adapter_weight_names(checkpoints / f"checkpoint-{step}")) for step in (1, 2)]
# what transformers' PEFT path does with the best checkpoint: PEFT's key matching under nested FSDP units
unmatched = len(set_peft_model_state_dict(wrapped.module, load_peft_weights(str(checkpoints / "checkpoint-1"))).unexpected_keys)
still_last = sum(torch.equal(last[k], v) for k, v in lora().items())
trainer.state = types.SimpleNamespace(best_model_checkpoint=str(checkpoints / "checkpoint-1"), best_metric=0.1)
trainer._load_best_model()
reloaded = lora()
facts = {"rank": dist.get_rank(), "tensors": len(best), "saved": saved, "peft_unmatched": unmatched,
         "peft_kept_last": still_last, "best": sum(torch.equal(best[k], v) for k, v in reloaded.items())}
# a file per rank: two ranks printing to one pipe can interleave their lines
(checkpoints.parent / f"rank{dist.get_rank()}.json").write_text(json.dumps(facts))
dist.destroy_process_group()
"""


@pytest.mark.slow  # ~28 s on the 2-core box: two torch.distributed processes each load torch, peft and the model
def test_fsdp_early_stopping_reloads_the_best_adapter(tiny_llama_dir, tmp_path):
    """`load_best_model_at_end` (early stopping) under FSDP1 with PEFT's per-layer wrap policy, 2 gloo ranks on CPU:
    each checkpoint holds its adapter, and the best one is what every rank trains on afterwards. PEFT's own loader
    (transformers' path) matched none of the keys and kept the last weights silently."""
    script = tmp_path / "fsdp_best.py"
    script.write_text(FSDP_BEST, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), str(tiny_llama_dir), str(tmp_path / "checkpoints")],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for facts in ranks:
        tensors = facts["tensors"]
        assert tensors > 0 and facts["saved"] == [tensors, tensors], facts  # every checkpoint holds the adapter
        assert facts["peft_unmatched"] == tensors and facts["peft_kept_last"] == tensors, facts  # why ragtune loads
        assert facts["best"] == tensors, facts


def test_qlora_under_deepspeed_zero3_is_refused_with_the_reason(write_config, tiny_llama_dir, monkeypatch):
    """ZeRO-3 partitions every parameter, not bitsandbytes' packed 4-bit ones: refused at config load, whether
    `accelerate launch` says ZeRO-3 (its environment) or the YAML does (SFTConfig's `deepspeed`)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    path = write_config(student={"model": str(tiny_llama_dir)}, train={"method": "qlora"})
    with pytest.raises(ConfigError, match=r"train\.method.*qlora is not supported under DeepSpeed ZeRO-3.*fsdp_qlora"):
        load_config(path)
    from ragtune.train.config import TrainConfig
    from ragtune.train.parallelism import parallel_errors

    assert parallel_errors(TrainConfig(method="lora")) == []  # ZeRO-3 shards LoRA (SFTConfig then needs deepspeed)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert parallel_errors(TrainConfig(method="qlora")) == []  # stage 2 does not partition parameters

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    in_yaml = write_config(name="ds.yaml", student={"model": str(tiny_llama_dir)},
                           train={"method": "qlora", "deepspeed": {"zero_optimization": {"stage": 3}}})
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(in_yaml)


def test_4bit_probe_runs_on_the_ranks_own_device(monkeypatch):
    """Each rank probes bitsandbytes on the GPU of its LOCAL_RANK, not on `cuda` (GPU 0, before accelerate sets the
    rank's device: 8 CUDA contexts on one GPU); without an accelerator, on the CPU, where the probe really runs."""
    from ragtune.train import student

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert student.rank_device("cuda") == "cuda:3" and student.rank_device("xpu") == "xpu:3"
    monkeypatch.delenv("LOCAL_RANK")
    assert student.rank_device("cuda") == "cuda:0"
    assert student.rank_device() == "cpu"  # this machine: no accelerator
    assert student.bnb_4bit_works() is None and student.bnb_4bit_works("cpu") is None


def test_ddp_does_not_search_for_unused_parameters_of_a_peft_model(make_config):  # noqa: F811
    """transformers asks DDP for `find_unused_parameters=True` whenever the model is no PreTrainedModel, as a PeftModel
    is not: a graph search after every forward. ragtune turns it off for PEFT methods, with or without activation
    checkpointing; full fine-tuning keeps transformers' rule, and the YAML's value wins."""
    from ragtune.train import arguments, sft

    cases = [({}, False), ({"activation_checkpointing": True}, False), ({"ddp_find_unused_parameters": True}, True)]
    for i, (train, expected) in enumerate(cases):
        config = make_config(name=f"c{i}.yaml", run=f"c{i}", **train)
        trainer, _, _ = sft.build_trainer(config, RunDir(config.output_dir))
        assert trainer.args.ddp_find_unused_parameters is expected, train
        assert trainer.accelerator.ddp_handler.find_unused_parameters is expected, train
    full = make_config(name="full.yaml", run="full", method="full")
    assert arguments.sft_config(full, RunDir(full.output_dir), has_eval=False, bf16=False).ddp_find_unused_parameters is None


def test_either_name_of_activation_checkpointing_reaches_sftconfig(make_config, monkeypatch):  # noqa: F811
    """`gradient_checkpointing` (the old name) in a user's YAML on this transformers: it is a deprecated alias that
    ragtune's default `activation_checkpointing: false` overrode, so it trained without checkpointing. On a
    transformers before the rename, `activation_checkpointing` in the YAML was an unknown key."""
    from ragtune.train import config as train_config
    from ragtune.train import arguments

    old = make_config(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    args = arguments.sft_config(old, RunDir(old.output_dir), has_eval=False, bf16=False)
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}

    fields = {k: v for k, v in train_config.sft_config_fields().items() if not k.startswith("activation_checkpointing")}
    monkeypatch.setattr(train_config, "sft_config_fields", lambda: fields)  # transformers 5.17's SFTConfig names
    new = make_config(name="new.yaml", activation_checkpointing=True).train
    assert new.sft_kwargs()["gradient_checkpointing"] is True and "activation_checkpointing" not in new.sft_kwargs()
    assert not [e for e in train_config.library_key_errors(new) if "activation_checkpointing" in e[0]]

    monkeypatch.undo()
    with pytest.raises(ConfigError, match="one setting"):
        make_config(name="both.yaml", activation_checkpointing=True, gradient_checkpointing=False)


def test_a_chunk_longer_than_the_embedder_reads_is_a_dry_run_warning_naming_the_key(write_config, capsys):
    """The packaged MiniLM reads 256 word pieces: a 512-token chunk is embedded only in part. `--dry-run` says so
    (prep logs it too); loading the config stays silent, so every command's stderr is not one line longer.
    gpu-qlora.yaml chunks within the window."""
    from ragtune.app.dry_run import dry_run

    stages = {stage: "run" for stage in ("prep", "train", "merge", "eval", "report")}
    config = load_config(write_config(data_prep={"chunk_size": 512, "chunk_overlap": 64}))
    assert config.data_prep.chunk_size == 512 and not capsys.readouterr().err  # a warning, not an error
    dry_run(config, stages)
    assert "[warn ] data_prep.chunk_size: 512 tokens, but embedding.model all-minilm-l6-v2 reads 256 word pieces" \
        in capsys.readouterr().out
    dry_run(load_config(write_config(name="fits.yaml", data_prep={"chunk_size": 256, "chunk_overlap": 32})), stages)
    assert "data_prep.chunk_size:" not in capsys.readouterr().out
    gpu = yaml.safe_load((REPO / "configs" / "gpu-qlora.yaml").read_text())
    assert gpu["data_prep"]["chunk_size"] <= 256 and gpu["embedding"]["model"] == "all-minilm-l6-v2"


def test_global_batch_size_keeps_the_schedule_when_the_world_size_changes(write_config, make_config, tiny_llama_dir,  # noqa: F811
                                                                          monkeypatch):
    """`train.global_batch_size` is split into accumulation steps per world size (recorded in the facts); a split
    that is not whole is an error naming the process counts that work; and eval/save steps are fractions."""
    from ragtune.train import arguments, sft
    from test_train import default_rows, write_rows

    config = load_config(write_config(student={"model": str(tiny_llama_dir)}, train={
        "global_batch_size": 8, "per_device_train_batch_size": 2, "max_steps": 1, "report_to": "none"}))
    write_rows(config.output_dir, default_rows())
    batches = {n: config.train.batch(n) for n in (1, 2, 4)}
    assert [batches[n]["gradient_accumulation_steps"] for n in (1, 2, 4)] == [4, 2, 1]
    assert {b["global_batch_size"] for b in batches.values()} == {8}
    with pytest.raises(ConfigError, match=r"Run on 1, 2, 4 processes"):
        config.train.batch(3)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what `accelerate launch --num_processes 2` sets in each process
    assert arguments.world_size() == 2
    monkeypatch.delenv("WORLD_SIZE")
    trainer, facts, _ = sft.build_trainer(config, RunDir(config.output_dir))
    assert trainer.args.gradient_accumulation_steps == 4
    assert facts["batch"] == {"global_batch_size": 8, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                              "world_size": 1, "from": "train.global_batch_size"}

    with pytest.raises(ConfigError, match="either global_batch_size"):
        make_config(name="both.yaml", global_batch_size=8, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="not a multiple of per_device_train_batch_size 3"):
        load_config(write_config(name="odd.yaml", train={"global_batch_size": 8, "per_device_train_batch_size": 3}))
    defaults = load_config(write_config(name="defaults.yaml")).train.sft_kwargs()
    assert defaults["eval_steps"] == defaults["save_steps"] == 0.1 and defaults["logging_steps"] == 0.02
    alone = load_config(write_config(name="alone.yaml", train={"eval_steps": 3})).train.sft_kwargs()
    assert alone["eval_steps"] == alone["save_steps"] == 3  # one given alone sets the other


def test_dry_run_prints_steps_per_epoch_and_warns_when_eval_never_runs(write_config):
    """On 8 GPUs gpu-qlora.yaml's old integer eval_steps/save_steps (50) were never reached: --dry-run says so, and
    with fractions it prints the evaluations the run gets. gpu-qlora.yaml asks for questions the sample can give."""
    from ragtune.app.dry_run import schedule_checks

    train = {"validation_split": 0.05, "early_stopping_patience": 3, "per_device_train_batch_size": 4,
             "global_batch_size": 128, "num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 50,
             "save_strategy": "steps", "save_steps": 50}
    config = load_config(write_config(data_prep={"num_train_questions": 600}, train=train))
    levels = dict((message.split(":")[0], level) for level, message in schedule_checks(config, processes=8))
    lines = " ".join(message for _, message in schedule_checks(config, processes=8))
    assert "5 steps per epoch, 10 steps" in lines and "global batch 128" in lines
    assert levels["train.eval_steps"] == levels["train.save_steps"] == levels["train.early_stopping_patience"] == "warn"

    fractions = load_config(write_config(name="fractions.yaml", data_prep={"num_train_questions": 600},
                                         train={**train, "global_batch_size": 32, "eval_steps": 0.1, "save_steps": 0.1}))
    checks = schedule_checks(fractions, processes=8)
    assert [level for level, _ in checks] == ["ok"], checks
    assert "18 steps per epoch, 36 steps" in checks[0][1] and "evaluation every 4 steps" in checks[0][1]

    gpu = yaml.safe_load((REPO / "configs" / "gpu-qlora.yaml").read_text())
    # 307 pages at chunk_size 256: 1,305 chunks, ~650 on the training pages, 2 questions each
    assert gpu["data_prep"]["num_train_questions"] <= 650 and gpu["train"]["eval_steps"] < 1


RANK_SEES = """
import sys, torch.distributed as dist
from ragtune.core.run_dir import NotSharedFolder, check_shared_folder
rank, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
try:
    check_shared_folder(folder)
    print("ok")
except NotSharedFolder as err:
    print(err)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("shared", [True, False])
def test_every_rank_must_see_the_run_folder_rank_0_writes(shared: bool, tmp_path: Path) -> None:
    """Two gloo processes: one folder passes; a rank with a folder of its own (a node without the shared
    filesystem) fails on both ranks, naming the rank, host and folder."""
    folders = [tmp_path / "run", tmp_path / ("run" if shared else "elsewhere")]
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SEES, str(rank), port, str(folders[rank])],
                              stdout=subprocess.PIPE, text=True, cwd=REPO) for rank in (0, 1)]
    said = [rank.communicate(timeout=120)[0].strip() for rank in ranks]
    if shared:
        assert said == ["ok", "ok"]
    else:
        assert all("1 of 2 training processes" in s and "rank 1 on" in s and "elsewhere" in s for s in said), said
    assert not [p for p in folders[0].iterdir() if "ragtune-ranks" in p.name]
