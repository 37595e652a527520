"""Offline distillation (`train.distillation`, mode offline): the teacher's stored top-k log-probs as soft labels.

Each training row's stored teacher top-k log-probs (data/teacher_logprobs.jsonl, written by prep) are matched to its
trained tokens by token id, and the loss adds alpha * T^2 * KL(teacher || student) on them (`top_k_kl`, logged as
`kd_loss`, in `trainer.LabelledPositionsSFTTrainer`). Online distillation is `online_distillation`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ragtune.core.artifacts import ArtifactError, iter_jsonl
from ragtune.core.run_dir import RunDir
from ragtune.train.label_check import end_of_turn_ids
from ragtune.train.rows import TrainDataError

log = logging.getLogger(__name__)


TEACHER_COLUMNS = ("teacher_ids", "teacher_logprobs")


def top_k_kl(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) at `temperature` over the teacher's top-k tokens, summed over the positions that have
    a teacher (a row of -inf has none), and the number of those positions. As axolotl's kd plugin: the teacher's
    top-k are renormalised over themselves, the student's log-probs are over the whole vocabulary (so mass it puts
    outside the teacher's top-k costs too). `logits`: [N, vocab]; `teacher_*`: [N, k], -inf where there is none."""
    has = torch.isfinite(teacher_logprobs).any(-1)
    valid = torch.isfinite(teacher_logprobs[has])
    student = (logits[has] / temperature).log_softmax(-1).gather(-1, teacher_ids[has])
    teacher = (teacher_logprobs[has].float() / temperature).log_softmax(-1)
    kl = torch.where(valid, teacher.exp() * (teacher - student), torch.zeros_like(student))
    return kl.sum(), has.sum()


class TeacherLogprobsCollator:
    """TRL's collator, plus the rows' teacher top-k as `teacher_ids`/`teacher_logprobs` tensors of shape [trained
    tokens of the batch, k] in the order of the labels (-inf: no teacher at that token). Rows without the
    columns (validation, the label check) collate as before."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator([{k: v for k, v in e.items() if k not in TEACHER_COLUMNS} for e in examples])
        if not all(TEACHER_COLUMNS[0] in e for e in examples):
            return batch
        ids = [position for e in examples for position in e["teacher_ids"]]
        logprobs = [position for e in examples for position in e["teacher_logprobs"]]
        k = max((len(position) for position in ids), default=1) or 1
        batch["teacher_ids"] = torch.zeros(len(ids), k, dtype=torch.long)
        batch["teacher_logprobs"] = torch.full((len(ids), k), float("-inf"))
        for row, (position_ids, position_logprobs) in enumerate(zip(ids, logprobs)):
            batch["teacher_ids"][row, : len(position_ids)] = torch.tensor(position_ids, dtype=torch.long)
            batch["teacher_logprobs"][row, : len(position_logprobs)] = torch.tensor(position_logprobs)
        return batch


def load_teacher_logprobs(run_dir: RunDir) -> dict[str, dict[str, Any]]:
    """Prep's teacher records by the `source` (`train.jsonl:line`) of the row they belong to."""
    path = run_dir.teacher_logprobs
    if not path.is_file():
        raise TrainDataError(f"{path}: not found. Offline train.distillation learns from the teacher's top-k "
                             "log-probs that prep stores: set data_prep.teacher_top_logprobs (e.g. 20) and run prep "
                             "again (its teacher answers are redone), or use train.distillation.mode: online.")
    try:
        by_id = {record["id"]: record for _, record in iter_jsonl(path)}
        return {f"{run_dir.train_jsonl}:{number}": by_id[row["id"]] for number, row in iter_jsonl(run_dir.train_jsonl)
                if row.get("id") in by_id}
    except (ArtifactError, KeyError) as err:
        raise TrainDataError(f"{path}: unreadable teacher log-probs ({err}). Run prep again.") from None


def _token_id(token: int | str, vocab: dict[str, int], tokenizer: Any) -> int | None:
    """A stored teacher token as an id: ids as they are; an endpoint's token text through the vocabulary, or when
    it encodes to exactly one token."""
    if isinstance(token, int):
        return token
    if token in vocab:
        return vocab[token]
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def teacher_targets(trained: list[int], record: dict[str, Any], stop_ids: set[int], top_k: int | None,
                    vocab: dict[str, int], tokenizer: Any) -> tuple[list[list[int]], list[list[float]]] | None:
    """Per trained token of a row, its teacher's top-k ids and log-probs, where the teacher generated that very
    token at that place: the teacher's tokens must equal the row's trained tokens (by id) at least up to the
    answer's end-of-turn token. None when they do not (another tokenization of the text, a cut answer). Prep strips
    the answer's text, so a first teacher token that differs only by its whitespace (" The" for "The") is allowed,
    without a teacher there."""
    tokens = [_token_id(t, vocab, tokenizer) for t in record["tokens"]]
    start = 0
    if (trained and tokens and tokens[0] is not None and trained[0] != tokens[0]
            and tokenizer.decode([tokens[0]]).strip() == tokenizer.decode([trained[0]]).strip()):
        start = 1
    common = start
    while common < min(len(trained), len(tokens)) and trained[common] == tokens[common]:
        common += 1
    answer = next((i for i, t in enumerate(trained) if t in stop_ids), len(trained))
    if common < answer:
        return None
    ids, logprobs = [], []
    for position in range(len(trained)):
        pairs = []
        if start <= position < common:
            top = zip(record["top_tokens"][position][:top_k], record["top_logprobs"][position][:top_k])
            pairs = [(i, lp) for i, lp in ((_token_id(t, vocab, tokenizer), lp) for t, lp in top) if i is not None]
        ids.append([i for i, _ in pairs])
        logprobs.append([lp for _, lp in pairs])
    return ids, logprobs


def attach_teacher_logprobs(dataset: Any, records: dict[str, dict[str, Any]], tokenizer: Any, top_k: int | None
                            ) -> tuple[Any, dict[str, Any]]:
    """TRL's tokenized training rows with `teacher_ids`/`teacher_logprobs` columns (one entry per trained token),
    and counts: rows whose teacher tokens do not align are trained without the KL term and named, never dropped
    silently; with none aligned, distillation has nothing to learn from and stops."""
    stop_ids, vocab = end_of_turn_ids(tokenizer), tokenizer.get_vocab()
    ids_column, logprobs_column = [], []
    aligned, misaligned, without, positions = 0, [], 0, 0
    for row in dataset:
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        record = records.get(row["source"])
        targets = teacher_targets(trained, record, stop_ids, top_k, vocab, tokenizer) if record else None
        if record is None:
            without += 1
        elif targets is None:
            misaligned.append(row["source"])
        else:
            aligned += 1
            positions += sum(1 for ids in targets[0] if ids)
        ids, logprobs = targets or ([[] for _ in trained], [[] for _ in trained])
        ids_column.append(ids)
        logprobs_column.append(logprobs)
    facts = {"rows": len(ids_column), "aligned_rows": aligned, "misaligned_rows": len(misaligned),
             "rows_without_logprobs": without, "teacher_positions": positions, "misaligned": misaligned[:20]}
    if misaligned:
        log.warning("distillation: %d of %d rows' teacher tokens do not match their tokenized answers (trained "
                    "without the KL term): %s", len(misaligned), len(ids_column), ", ".join(misaligned[:5]))
    if without:
        log.info("distillation: %d rows have no teacher log-probs (closed-book rows, or prep without them)", without)
    if not aligned:
        raise TrainDataError(f"train.distillation: no training row's teacher tokens align with its tokenized answer "
                             f"({len(misaligned)} misaligned, {without} without log-probs, e.g. "
                             f"{(misaligned or ['-'])[0]}). Check that prep ran with this teacher and "
                             "data_prep.teacher_top_logprobs, then run prep again.")
    dataset = dataset.add_column(TEACHER_COLUMNS[0], ids_column).add_column(TEACHER_COLUMNS[1], logprobs_column)
    return dataset, facts
