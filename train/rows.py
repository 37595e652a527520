"""The training rows: data_prep's chat rows as TRL's conversational prompt-completion rows, split for the eval loss.

data_prep writes chat rows `{"messages": [system, user, assistant], "meta": ...}`. SmolLM2's chat template has no
`{% generation %}` markers, so TRL's `assistant_only_loss` refuses it; instead each row becomes TRL's
conversational prompt-completion form (`prompt`: every message before the final assistant turn, `completion`: that
turn). TRL then tokenizes `prompt` with the generation prompt and `prompt + completion` in full, and trains every
token after the prompt: the answer, its end-of-turn token (`<|im_end|>`) and the template's trailing newline
(trl/trainer/sft_trainer.py, `tokenize_fn`). Validation rows: `train.validation_file`, or a seeded
`train.validation_split` fraction.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import ArtifactError, iter_jsonl
from ragtune.core.errors import UserFacingError
from ragtune.core.run_dir import RunDir
from ragtune.train.config import held_out_count

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig


class TrainDataError(UserFacingError, ValueError):
    """A training row that cannot be trained on; names the file and line."""


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read chat rows and turn them into TRL prompt-completion rows; `source` keeps `file:line` for errors, `question`
    the row's `meta.question_id` (a RAG row and its closed-book twin share it), else its `source`."""
    if not path.is_file():
        raise TrainDataError(f"{path}: training data not found. Run `ragtune prep CONFIG` first (it writes this file).")
    rows = []
    try:
        for number, row in iter_jsonl(path):
            rows.append(to_prompt_completion(row, f"{path}:{number}"))
    except ArtifactError as err:
        raise TrainDataError(str(err)) from None
    if not rows:
        raise TrainDataError(f"{path}: no rows. Run `ragtune prep CONFIG` to produce training rows.")
    return rows


def to_prompt_completion(row: dict[str, Any], source: str) -> dict[str, Any]:
    """`messages` -> `prompt` (all turns before the last) + `completion` ([last assistant turn]); `meta` dropped."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TrainDataError(f"{source}: expected `messages`, a list of chat turns; got {type(messages).__name__}.")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
                and isinstance(message.get("content"), str)):
            raise TrainDataError(
                f"{source}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}; got {message!r:.120}.")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise TrainDataError(f"{source}: the last message must be the assistant's answer, after at least one prompt turn.")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    meta = row.get("meta")
    question = meta.get("question_id") if isinstance(meta, dict) else None
    return {"prompt": turns[:-1], "completion": turns[-1:], "source": source, "question": str(question or source)}


def split_rows(rows: list[dict[str, Any]], validation_split: float, validation_file: Path | None, seed: int
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Held-out rows for eval loss: the validation file when given, else a seeded fraction of the questions (at least
    one), each with all its rows: a closed-book twin (`data_prep.closed_book_rows`) trained on while its RAG row is
    held out would teach the held-out answer."""
    if validation_file is not None:
        return rows, load_rows(validation_file)
    questions = list(dict.fromkeys(row["question"] for row in rows))
    n_eval = held_out_count(len(questions), validation_split)
    if not n_eval:
        return rows, []
    random.Random(seed).shuffle(questions)
    held = set(questions[:n_eval])
    return [r for r in rows if r["question"] not in held], [r for r in rows if r["question"] in held]


def train_and_eval_rows(config: "RagtuneConfig", run_dir: RunDir) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """data/train.jsonl's rows, split into training and validation rows (`split_rows`); a relative
    `train.validation_file` is found beside the config file."""
    train = config.train
    validation_file = Path(train.validation_file) if train.validation_file else None
    if validation_file is not None and not validation_file.is_absolute() and config.config_path is not None:
        validation_file = config.config_path.parent / validation_file
    rows = load_rows(run_dir.train_jsonl)
    return split_rows(rows, train.validation_split, validation_file, config.seed)
