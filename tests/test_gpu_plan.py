"""The GPU plan and vLLM engine arguments (issue #25): which GPUs each part uses, the exact `vllm serve` command
a managed server runs, engine arguments checked against the installed vLLM, and `--dry-run` printing it all.
Nothing here needs a GPU or starts vLLM: the plan is computed for a declared GPU count."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ragtune.app.cli import main
from ragtune.app.config import ConfigError, load_config
from ragtune.core import engine
from ragtune.core.gpu_plan import gpu_plan, visible_devices

REPO = Path(__file__).resolve().parents[1]
MANAGED = {"backend": "vllm", "model": "smollm2-135m-instruct", "max_new_tokens": 512}


def test_plan_for_eight_declared_gpus_splits_teacher_and_training(write_config) -> None:
    """Unset parts on 8 GPUs: the teacher (and the judge on its model: one server) on 4-7 with tensor parallelism 4,
    training on 0-3, eval's student on 0; each managed server starts on its own GPUs with a memory share and a
    context length from the config, not the model's."""
    path = write_config(teacher=MANAGED, judge={**MANAGED, "max_new_tokens": 1024}, eval={"backend": "vllm"},
                        gpus={"count": 8})
    plan = gpu_plan(load_config(path), available=0)

    assert (plan.teacher.gpus, plan.train, plan.eval.gpus) == ((4, 5, 6, 7), (0, 1, 2, 3), (0,))
    assert plan.judge is plan.teacher
    assert plan.teacher.engine_args == {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.9,
                                        "max_model_len": 5120}  # 2048 judge prompt + 2x512 contexts + 512 + 1024
    assert plan.eval.engine_args["tensor_parallel_size"] == 1
    assert plan.eval.engine_args["gpu_memory_utilization"] == 0.8  # GPU 0 is shared with ragtune's own process
    assert plan.teacher.dtype == "auto"  # the unset torch_dtype (float32 on CPU) is vLLM's auto on a GPU
    assert plan.missing() == list(range(8))
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 accelerate launch" in plan.train_command(path)
    assert "--num_processes 4" in plan.train_command(path)

    teacher = engine.VLLMServer("smollm2-135m-instruct", dtype=plan.teacher.dtype, gpus=plan.teacher.gpus,
                                engine_args=plan.teacher.engine_args)
    shown = teacher.shown_command("python", "/models/teacher", on_cpu=False)
    assert shown.startswith("CUDA_VISIBLE_DEVICES=4,5,6,7 python -m vllm.entrypoints.openai.api_server ")
    assert "--tensor-parallel-size 4 --gpu-memory-utilization 0.9 --max-model-len 5120" in shown

    six = gpu_plan(load_config(path, ["gpus.count=6"]), available=0)  # tensor parallelism stays a power of two
    assert (six.teacher.gpus, six.train) == ((4, 5), (0, 1, 2, 3))
    cpu = gpu_plan(load_config(path, ["gpus.count=0"]), available=0)
    assert (cpu.teacher.gpus, cpu.teacher.engine_args, cpu.teacher.dtype) == ((), {}, "float32")  # as before


def test_plan_refuses_tensor_parallelism_that_does_not_fill_the_gpus(write_config) -> None:
    path = write_config(teacher={**MANAGED, "engine_args": {"tensor_parallel_size": 2}}, judge=MANAGED,
                        gpus={"teacher": [4, 5, 6, 7], "train": [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match=r"teacher.engine_args: tensor_parallel_size 2 .* gpus.teacher gives this "
                                          r"server 4"):
        gpu_plan(load_config(path), available=0)


def test_engine_args_reach_the_exact_command_line() -> None:
    """Engine arguments by vLLM's names become its flags after ragtune's own, and override ragtune's CPU defaults."""
    server = engine.VLLMServer("m", dtype="bfloat16", gpus=(2, 3), engine_args={
        "tensor_parallel_size": 2, "max_num_seqs": 32, "enable_prefix_caching": False,
        "hf_overrides": {"rope_scaling": None}, "max_model_len": 4096})
    assert server.command("py", "/models/m", on_cpu=False) == [
        "py", "-c", engine.WATCHDOG, str(os.getpid()), "--model", "/models/m", "--served-model-name", "m",
        "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", "0", "--tensor-parallel-size", "2",
        "--max-num-seqs", "32", "--no-enable-prefix-caching", "--hf-overrides", '{"rope_scaling": null}',
        "--max-model-len", "4096"]

    on_cpu = engine.VLLMServer("m", engine_args={"enforce_eager": False}).server_args("/models/m", on_cpu=True)
    assert "--no-enforce-eager" in on_cpu and "--enforce-eager" not in on_cpu
    assert on_cpu[on_cpu.index("--block-size") + 1] == str(engine.CPU_BLOCK_SIZE)  # prefix-cache sharing on CPU
    assert json.loads(on_cpu[on_cpu.index("--structured-outputs-config") + 1]) == {"backend": "guidance"}
    own_blocks = engine.VLLMServer("m", engine_args={"block_size": 128}).server_args("/models/m", on_cpu=True)
    assert own_blocks[own_blocks.index("--block-size") + 1] == "128" and own_blocks.count("--block-size") == 1


def test_server_gpus_follow_ragtunes_own_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert visible_devices((2, 3)) == "5,7"


def test_engine_args_ragtune_sets_itself_are_refused_at_load(write_config) -> None:
    path = write_config(teacher={**MANAGED, "engine_args": {"dtype": "half"}})
    with pytest.raises(ConfigError, match=r"teacher.engine_args.*`dtype` is set by the role's `torch_dtype`"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"teacher.*engine_args: \{max_model_len: 4096\}"):
        load_config(write_config(teacher={**MANAGED, "max_model_len": 4096}))


def test_unknown_engine_arg_is_refused_with_the_closest_name() -> None:
    """Checked against the installed vLLM's own `vllm serve` parser (.venv-vllm), not a list of ours."""
    try:
        python = engine.find_engine_python()
    except engine.EngineError:
        pytest.skip("no vLLM: .venv-vllm is absent (bash scripts/setup.sh installs it) and RAGTUNE_VLLM_PYTHON is unset")
    engine.check_engine_args(python, {"tensor_parallel_size": 4, "enforce_eager": False, "max_num_seqs": 8})
    with pytest.raises(ConfigError, match=r"^teacher.engine_args.tensor_paralel_size: not an engine argument of "
                                          r"vLLM .*; did you mean `tensor_parallel_size`\?$"):
        engine.check_engine_args(python, {"tensor_paralel_size": 4}, "teacher.engine_args")


def test_dry_run_prints_the_gpu_plan_of_gpu_qlora(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`ragtune run configs/gpu-qlora.yaml --dry-run` on this CPU machine: exit 0, the plan for the GPU box, and a
    warning that this machine lacks its GPUs."""
    monkeypatch.chdir(REPO)  # the config names data/uber_2021.pdf
    monkeypatch.delenv("HF_HUB_OFFLINE")  # the 70B and 8B are not cached here: "downloaded on first use", no error
    assert main(["run", "configs/gpu-qlora.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out

    teacher = next(line for line in out.splitlines() if line.strip().startswith("CUDA_VISIBLE_DEVICES=4,5,6,7 "))
    assert "--model meta-llama/Llama-3.3-70B-Instruct" in teacher
    assert "--tensor-parallel-size 4 --gpu-memory-utilization 0.9" in teacher and "--dtype auto" in teacher
    assert ("CUDA_VISIBLE_DEVICES=0,1,2,3 accelerate launch --config_file configs/accelerate/ddp.yaml "
            "--num_processes 4 -m ragtune.train configs/gpu-qlora.yaml") in out
    evaluate = next(line for line in out.splitlines() if line.strip().startswith("CUDA_VISIBLE_DEVICES=0 "))
    assert "--model meta-llama/Llama-3.1-8B-Instruct" in evaluate and "--lora-modules adapter=" in evaluate
    assert "which this machine lacks" in out


def test_a_cpu_server_eval_can_take_outlives_its_stage_and_none_on_gpus(write_config, smollm2_dir: Path,
                                                                        tiny_llama_dir: Path) -> None:
    """`ragtune run` leaves prep's CPU server up for eval when eval serves the students in its settings, its model or
    one of the same shape; another dtype or shape, a server on GPUs, a GPU plan and an eval of adapters (LoRA modules:
    a server of their own) end it with the stage."""
    from ragtune.app.pipeline import servers_eval_takes

    config = load_config(write_config(student={"model": str(smollm2_dir)},
                                      eval={"backend": "vllm", "tuned_models": ["merged"]}))
    takes = servers_eval_takes(config)
    plan = gpu_plan(config).eval
    served = engine.VLLMServer(str(smollm2_dir), dtype=plan.dtype)
    assert takes(served)
    alike = engine.VLLMServer("smollm2-135m-instruct", dtype=plan.dtype)
    alike.model_path = str(smollm2_dir)
    assert takes(alike)  # prep's teacher, by its alias: the student's own weights
    other_shape = engine.VLLMServer(str(tiny_llama_dir), dtype=plan.dtype)
    other_shape.model_path = str(tiny_llama_dir)
    assert not takes(other_shape)
    assert not takes(engine.VLLMServer(str(smollm2_dir), dtype="bfloat16" if plan.dtype != "bfloat16" else "float32"))
    on_gpus = engine.VLLMServer(str(smollm2_dir), dtype=plan.dtype)
    on_gpus.on_cpu = False
    assert not takes(on_gpus)
    merged_only = {"backend": "vllm", "tuned_models": ["merged"]}
    assert servers_eval_takes(load_config(write_config(eval=merged_only, gpus={"count": 2}))) is None
    assert servers_eval_takes(load_config(write_config())) is None  # in-process eval: no server to keep
    assert servers_eval_takes(load_config(write_config(eval={"backend": "vllm"}))) is None  # the adapter too: LoRA


def test_weights_swap_only_between_models_that_differ_in_weights_alone(smollm2_dir: Path, tiny_llama_dir: Path,
                                                                     tmp_path: Path) -> None:
    """A saved copy with other weights, dtype and name is the same server; another shape, tokenizer or chat template
    is not, nor a hub id this machine has no files of."""
    copy = Path(shutil.copytree(smollm2_dir, tmp_path / "merged"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": "merged", "dtype": "bfloat16"}))
    assert engine.same_but_weights(str(smollm2_dir), str(copy))
    assert not engine.same_but_weights(str(smollm2_dir), str(tiny_llama_dir))
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert not engine.same_but_weights(str(smollm2_dir), str(copy))
    assert not engine.same_but_weights(str(smollm2_dir), "no-such-org/no-such-model")
