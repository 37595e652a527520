"""The label check: every tokenized row must train at least one answer token and the end-of-turn token, checked on
TRL's own tokenized rows and collator; one example is printed with the trained tokens in `[[...]]`."""

from __future__ import annotations

from typing import Any

from ragtune.core.errors import UserFacingError

CHECK_OPEN, CHECK_CLOSE = "[[", "]]"


class LabelCheckError(UserFacingError, ValueError):
    """The tokenized rows would not train the answer or its end-of-turn token; names the rows."""


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an assistant turn: EOS, and the added token the chat template puts right after the answer."""
    ids = {tokenizer.eos_token_id} - {None}
    marker = "ragtune-answer"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text[text.index(marker) + len(marker):].lstrip()
    for token, token_id in tokenizer.get_added_vocab().items():
        if token and tail.startswith(token):
            ids.add(token_id)
    return ids


def mark_trained(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The decoded row with each run of trained tokens wrapped in [[...]]."""
    parts, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(input_ids[start:i])
            parts.append(f"{CHECK_OPEN}{text}{CHECK_CLOSE}" if labels[start] != -100 else text)
            start = i
    return "".join(parts)


def check_labels(trainer: Any, rows: dict[str, list[dict[str, Any]]], *, show: bool = True) -> dict[str, Any]:
    """Check the labels TRL built: every row trains an answer token and the end-of-turn token.

    Runs on `trainer.train_dataset`/`eval_dataset` (tokenized by TRL) through `trainer.data_collator`,
    so it checks exactly what training sees (with `packing`: TRL's preparation of the rows, unpacked).
    Raises LabelCheckError naming the train.jsonl lines; returns counts and one decoded example with
    trained tokens in [[...]].
    """
    from datasets import Dataset

    tokenizer = trainer.processing_class
    stop_ids = end_of_turn_ids(tokenizer)
    prepared = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    if trainer.args.packing:
        # Packed rows lose their identity; check the same TRL preparation, unpacked, row by row.
        prepared = {split: trainer._prepare_dataset(Dataset.from_list(split_rows), tokenizer, trainer.args, False, None,
                                                    f"{split} (label check)")
                    for split, split_rows in rows.items() if split_rows}
    problems: list[str] = []
    example, trained_tokens, total_tokens, checked = None, 0, 0, 0
    for split, dataset in prepared.items():
        if dataset is None:
            continue
        seen = set()
        for item in dataset:
            seen.add(item["source"])
            batch = trainer.data_collator([{"input_ids": item["input_ids"], "labels": item["labels"]}])
            input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
            trained = [t for t, label in zip(input_ids, labels) if label != -100]
            checked += 1
            total_tokens += len(input_ids)
            trained_tokens += len(trained)
            answer = tokenizer.decode([t for t in trained if t not in stop_ids], skip_special_tokens=True).strip()
            if not answer:
                problems.append(f"{item['source']}: no answer token is trained (empty assistant answer?).")
            elif not stop_ids & set(trained):
                stop_tokens = tokenizer.convert_ids_to_tokens(sorted(stop_ids))
                problems.append(f"{item['source']}: the end-of-turn token {stop_tokens} is not trained "
                                f"(answer cut by max_length={trainer.args.max_length}?).")
            if example is None and answer:
                example = mark_trained(tokenizer, input_ids, labels)
        # TRL drops rows whose labels are all masked after truncation (the prompt alone fills max_length).
        for row in rows[split]:
            if row["source"] not in seen:
                problems.append(f"{row['source']}: the prompt fills max_length={trainer.args.max_length}; "
                                "no token of it is trained (TRL dropped the row).")
    if show and example and trainer.is_world_process_zero():
        print(f"label check: one training row as the model sees it, trained tokens in {CHECK_OPEN}...{CHECK_CLOSE}:")
        print(f"{example}\n")
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise LabelCheckError(
            f"label check failed for {len(problems)} of {checked} rows:\n  {listed}\n"
            "Fix or remove these rows (or raise train.max_length), then run again."
        )
    return {"rows_checked": checked, "tokens": total_tokens, "trained_tokens": trained_tokens,
            "end_of_turn_tokens": tokenizer.convert_ids_to_tokens(sorted(stop_ids)), "example": example}
