"""Supervised fine-tuning of the student on `data/train.jsonl` with TRL's `SFTTrainer`.

`build_trainer` and `run` tell the recipe top to bottom (alignment-handbook `sft.py` style), one call per step into
the module that holds it:

1. Data (`rows`). data_prep's chat rows `{"messages": [system, user, assistant], "meta": ...}` become TRL's
   conversational prompt-completion rows (`prompt`: every message before the final assistant turn, `completion`:
   that turn), so TRL trains the answer, its end-of-turn token and the template's trailing newline. Validation
   rows: `train.validation_file`, or a seeded `train.validation_split` fraction.
2. Method and precision (`student`): `qlora` needs a working 4-bit backend; `train.bf16: auto` picks the format.
3. `SFTConfig(**config.train.sft_kwargs(), output_dir=checkpoints/, ...)` (`arguments`): the YAML's `train:` keys
   are SFTConfig's names; ragtune's defaults (`SFT_DEFAULTS`) fill in the rest.
4. Model (`student`): the student (4-bit NF4 for `qlora`, then `prepare_model_for_kbit_training`) and the PEFT
   config of `train.method` (`train.peft` over `PEFT_DEFAULTS`).
5. Trainer (`trainer`): TRL's SFTTrainer, scoring only the labelled positions through the LM head.
6. Label check (`label_check`) on TRL's own tokenized rows and collator: every row must train at least one answer
   token and the end-of-turn token; one example is printed with trained tokens in `[[...]]`. Rows the trainer
   would cut stop the run here too (`data_stats.check_lengths`).
7. Train, resuming from the latest checkpoint when `auto_resume` (`checkpoints`).
8. Save `adapter/` (adapter + tokenizer; gathered under FSDP, `adapter`) and the loss curve
   (`logs/loss_curve.json`).

`train.distillation` (soft labels, `DistillationConfig`): offline, each training row's stored teacher top-k
log-probs (data/teacher_logprobs.jsonl) are matched to its trained tokens by token id and the loss adds
alpha * T^2 * KL(teacher || student) on them (`offline_distillation`); online, the student answers the prompts
itself and TRL's DistillationTrainer (GKDTrainer on older TRL) teaches it on its own answers
(`online_distillation`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import write_json
from ragtune.core.llm import check_same_tokenizer
from ragtune.core.models import load_tokenizer
from ragtune.core.run_dir import RunDir, check_shared_folder
from ragtune.train.adapter import save_adapter
from ragtune.train.arguments import sft_config, world_size
from ragtune.train.checkpoints import auto_resume
from ragtune.train.data_stats import check_lengths
from ragtune.train.distillation_config import GKD_TRAINER
from ragtune.train.label_check import check_labels
from ragtune.train.offline_distillation import load_teacher_logprobs
from ragtune.train.online_distillation import build_online_trainer
from ragtune.train.rows import train_and_eval_rows
from ragtune.train.student import load_student, method_and_precision, peft_config
from ragtune.train.trainer import LabelledPositionsSFTTrainer

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

log = logging.getLogger(__name__)


def build_trainer(config: "RagtuneConfig", run_dir: RunDir
                  ) -> tuple[Any, dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The SFTTrainer for this config, facts about the choices made (method, warnings), and the train/eval rows."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    train, distillation = config.train, config.train.distillation
    # 1. Data
    train_rows, eval_rows = train_and_eval_rows(config, run_dir)
    teacher_logprobs = None
    if distillation is not None:  # before any model loads: a wrong teacher or missing log-probs fail in seconds
        check_same_tokenizer(distillation.teacher_tokenizer or config.teacher.model, config.student.model,
                             config.student.trust_remote_code)
        if distillation.mode == "offline":
            teacher_logprobs = load_teacher_logprobs(run_dir)

    # 2. Method and precision
    facts: dict[str, Any] = {"requested_method": train.method, "warnings": [], "batch": train.batch(world_size())}
    facts.update(method_and_precision(config))
    method = facts["method"]

    # 3. Training arguments
    args = sft_config(config, run_dir, has_eval=bool(eval_rows), bf16=facts["precision"]["bf16"])
    # TensorBoard's writer reads its folder from this variable (transformers' TensorBoardCallback).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir.logs / "tensorboard")

    # 4. Model, tokenizer and PEFT config
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:  # transformers before the rename (train.config.OLD_SFT_NAMES)
        checkpointing = args.gradient_checkpointing
    model = load_student(config, method, checkpointing, facts["precision"]["torch_dtype"])
    tokenizer = load_tokenizer(config.student.model, trust_remote_code=config.student.trust_remote_code)
    peft = peft_config(method, train.peft_kwargs())

    # 5. Trainer
    callbacks = [EarlyStoppingCallback(train.early_stopping_patience)] if train.early_stopping_patience else []
    if distillation is not None and distillation.mode == "online":
        trainer, facts["distillation"] = build_online_trainer(config, args, model, tokenizer, train_rows, eval_rows,
                                                              peft, callbacks)
        log.info("online distillation: %s (%s)", facts["distillation"]["trainer"], facts["distillation"]["why"])
    else:
        trainer = LabelledPositionsSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=callbacks,
            distillation=distillation,
            teacher_logprobs=teacher_logprobs,
        )
        if distillation is not None:
            facts["distillation"] = {**distillation.model_dump(mode="json", exclude={"gkd"}),
                                     **trainer.distillation_facts}
    facts.update(train_rows=len(train_rows), eval_rows=len(eval_rows),
                 loaded_in_4bit=bool(getattr(model, "is_loaded_in_4bit", False)))
    return trainer, facts, {"train": train_rows, "eval": eval_rows}


def run(config: "RagtuneConfig", run_dir: RunDir, check_only: bool = False) -> dict[str, Any]:
    """Fine-tune the student on data/train.jsonl; returns facts for the manifest.

    Writes checkpoints/ (resumable), adapter/ (PEFT adapter or full model, plus tokenizer),
    logs/tensorboard/ and logs/loss_curve.json. `check_only` stops after the label check.
    """
    trainer, facts, rows = build_trainer(config, run_dir)  # steps 1-5
    check_shared_folder(run_dir.root)  # several nodes: every rank must see the folder rank 0 writes

    # 6. Label check and row lengths
    distillation = config.train.distillation
    online = distillation is not None and distillation.mode == "online"
    if not online:  # the online trainers tokenize in their collators (or generate the answers): nothing to check
        label_check = check_labels(trainer, rows)  # first: it names the row whose answer or end of turn is lost
        facts["label_check"] = {k: v for k, v in label_check.items() if k != "example"}
    # DistillationTrainer cuts no row (no max_length): its answers are the student's own, max_completion_length long
    cuts_rows = not online or facts["distillation"]["trainer"] == GKD_TRAINER
    facts["data"] = check_lengths(config, run_dir, trainer.is_world_process_zero(), cuts_rows)
    if check_only:
        return facts

    # 7. Train
    resume = (config.train.model_extra or {}).get("resume_from_checkpoint")
    if resume is None and config.train.auto_resume:
        resume, warning = auto_resume(config, run_dir, trainer, facts["method"])
        if warning:
            facts["warnings"].append(warning)
            log.warning(warning)
    if resume:
        log.info("resuming from %s", resume)
    facts["resumed_from"] = resume
    result = trainer.train(resume_from_checkpoint=resume)

    # 8. Save
    save_adapter(trainer, run_dir, facts["method"])
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(run_dir.adapter))
        write_loss_curve(trainer.state.log_history, run_dir.loss_curve)
    facts.update(training_facts(trainer, result, run_dir))
    count_training_work(trainer, facts)
    return facts


def count_training_work(trainer: Any, facts: dict[str, Any]) -> None:
    """This process's training work for the stage's roofline (`ragtune.core.roofline`): the steps it ran (a resumed
    run counts from its checkpoint) over the trainer's own tokenized rows, and its eval-loss passes."""
    from ragtune.core import roofline

    state, dataset = trainer.state, trainer.train_dataset
    if not state.global_step or dataset is None or "input_ids" not in dataset.column_names:
        return
    start = int(str(facts.get("resumed_from") or "-0").rsplit("-", 1)[-1] or 0)
    share = (state.epoch or 0) * (state.global_step - start) / max(state.global_step, 1)  # epochs this process ran
    lengths = [len(ids) for ids in dataset["input_ids"]]
    if "labels" in dataset.column_names:  # TRL's labels: -100 where no loss is taken
        labelled = sum(sum(1 for token in row if token != -100) for row in dataset["labels"])
    else:  # labels made by the collator (e.g. DataCollatorForCompletionOnlyLM): logits at every position
        labelled = sum(lengths)
    precision = facts["precision"]
    mode = roofline.precision_mode(precision["torch_dtype"] or "float32", autocast=bool(precision["bf16"]))
    where = f"{precision['device']} {mode}"
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    name = str(getattr(model, "name_or_path", "student"))
    roofline.count_training(model.config, name, tokens=round(sum(lengths) * share), labelled=round(labelled * share),
                            sequence=sum(lengths) / len(lengths), full=facts["method"] == "full", mode=mode,
                            device=precision["device"], where=where)
    evals = [e for e in state.log_history if "eval_loss" in e and e.get("step", 0) > start]
    eval_set = trainer.eval_dataset
    if evals and eval_set is not None and "input_ids" in eval_set.column_names:
        eval_lengths = [len(ids) for ids in eval_set["input_ids"]]
        roofline.count_forward("eval_forward", model.config, name, tokens=sum(eval_lengths) * len(evals),
                               sequence=sum(eval_lengths) / len(eval_lengths), logits=0, dtype=mode,
                               device=precision["device"], where=where)


def training_facts(trainer: Any, result: Any, run_dir: RunDir) -> dict[str, Any]:
    """What the training did, for the manifest: steps, losses, time, tokens, and where its outputs are."""
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    return dict(
        global_step=trainer.state.global_step,
        epochs=round(trainer.state.epoch or 0, 3),
        train_loss=round(result.training_loss, 5),
        eval_loss=round(eval_losses[-1], 5) if eval_losses else None,
        best_eval_loss=round(min(eval_losses), 5) if eval_losses else None,
        train_seconds=round(result.metrics.get("train_runtime", 0.0), 2),
        # TRL's running count of non-padding input tokens, summed over processes.
        tokens_seen=int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0)),
        world_size=trainer.args.world_size,
        adapter=str(run_dir.adapter),
        loss_curve=str(run_dir.loss_curve),
    )


def write_loss_curve(log_history: list[dict[str, Any]], path: Path) -> None:
    """The Trainer's log history (train loss per logging step, eval loss per evaluation) as plain JSON."""
    def points(key: str) -> list[dict[str, Any]]:
        return [{"step": e["step"], "epoch": e.get("epoch"), "loss": e[key]} for e in log_history if key in e]

    write_json(path, {"train": points("loss"), "eval": points("eval_loss"), "log_history": log_history}, indent=1)
