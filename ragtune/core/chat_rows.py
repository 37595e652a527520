"""Chat-format training rows: the one set of rules every reader applies (prep, train, `ragtune validate`).

The rules are OpenAI's fine-tuning format checks (every row a `messages` list of system/user/assistant
messages with non-empty string content, the last one from the assistant) plus ragtune's own: every
row starts with a system message, because the student is served with one. With a tokenizer it also
counts tokens per row the way the student sees them (its chat template), flags rows longer than
`max_length` (SFTConfig truncates them), totals the training tokens x epochs, and estimates the
teacher's cost when a price is configured.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from ragtune.core.artifacts import iter_jsonl
from ragtune.core.errors import UserFacingError

ROLES = {"system", "user", "assistant"}
MESSAGE_KEYS = {"role", "content", "name", "weight"}
MAX_LISTED = 20


class DatasetError(UserFacingError, ValueError):
    """A training file with bad rows; the message lists them as `file:line: problem`."""


def row_problems(row: Any) -> list[str]:
    """What is wrong with one training row, as short phrases (empty when the row is valid)."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["missing or empty `messages` list"]
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{i}] is not an object")
            continue
        extra = set(message) - MESSAGE_KEYS
        if extra:
            problems.append(f"messages[{i}] has unknown key(s) {sorted(extra)}")
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"messages[{i}].role is {role!r}, expected one of {sorted(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"messages[{i}] ({role}) has empty or non-string content")
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if roles and roles[0] != "system":
        problems.append("no system message first (the student is trained and served with one)")
    if "user" not in roles:
        problems.append("no user message")
    if roles and roles[-1] != "assistant":
        problems.append(f"last message is from {roles[-1]!r}, expected 'assistant' (the target the student learns)")
    return problems


def read_chat_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every row; DatasetError lists every bad line (not only the first) and what to do."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found. Run `ragtune prep CONFIG` first (it writes the training data).")
    bad: list[str] = []
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, row in iter_jsonl(path, on_error=lambda number, problem: bad.append(f"{path}:{number}: {problem}")):
        problems = row_problems(row)
        if problems:
            bad.append(f"{path}:{number}: " + "; ".join(problems))
        else:
            rows.append((number, row))
    if len(bad) == 1:  # one line, like every other user error
        raise DatasetError(f"{bad[0]} — fix or delete the row and run again.")
    if bad:
        listed = "\n".join(bad[:MAX_LISTED]) + (f"\n... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        raise DatasetError(f"{path}: {len(bad)} bad rows — fix or delete them and run again:\n{listed}")
    if not rows:
        raise DatasetError(f"{path}: no training rows (the file is empty). Run `ragtune prep CONFIG` to produce them.")
    return rows


def validate_chat_jsonl(
    path: str | Path,
    tokenizer: Any = None,
    max_length: int | None = None,
    epochs: float = 1,
    prices: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Check every row of a chat JSONL file and return its statistics; raise DatasetError listing bad rows.

    tokenizer: the student's tokenizer (token counts use its chat template); without one, counts are skipped.
    max_length: rows longer than this many tokens are reported (SFTConfig would truncate them).
    epochs: training epochs, for the total training tokens.
    prices: (USD per million input tokens, USD per million output tokens) of the teacher, for a cost estimate;
        uses the teacher's own token counts from `meta.usage` when rows carry them.
    """
    rows = read_chat_rows(path)
    stats: dict[str, Any] = {"file": str(path), "rows": len(rows), "epochs": epochs,
                             "rows_by_mode": dict(Counter(row.get("meta", {}).get("mode", "unknown") for _, row in rows))}
    if tokenizer is not None:
        counts = [_token_counts(tokenizer, row["messages"]) for _, row in rows]
        lengths = [total for total, _ in counts]
        ordered = sorted(lengths)
        stats.update(
            tokens_total=sum(lengths),
            tokens_per_row={"min": ordered[0], "mean": round(statistics.fmean(lengths), 1),
                            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]},
            assistant_tokens_total=sum(total - prompt for total, prompt in counts),
            training_tokens=int(sum(lengths) * epochs),
        )
        if max_length is not None:
            over = [number for (number, _), n in zip(rows, lengths) if n > max_length]
            stats.update(max_length=max_length, rows_over_max_length=len(over), lines_over_max_length=over[:MAX_LISTED])
    if prices is not None:
        stats["teacher_cost_usd"] = _teacher_cost(rows, prices, tokenizer)
    return stats


def _token_counts(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[int, int]:
    """(tokens of the whole conversation, tokens before the assistant's answer) with the chat template."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return (len(tokenizer(full, add_special_tokens=False)["input_ids"]),
            len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))


def _teacher_cost(rows: list[tuple[int, dict[str, Any]]], prices: tuple[float, float], tokenizer: Any) -> dict[str, Any]:
    """Teacher cost from its own usage counts when recorded, else from the student's token counts."""
    input_price, output_price = prices
    prompt_tokens = completion_tokens = 0
    estimated = 0
    for _, row in rows:
        if row.get("meta", {}).get("mode") == "closed_book":
            continue  # reuses the RAG row's answer: no teacher call of its own
        usage = row.get("meta", {}).get("usage")
        if usage:
            prompt_tokens += int(usage.get("prompt_tokens", 0))
            completion_tokens += int(usage.get("completion_tokens", 0))
            continue
        estimated += 1
        if tokenizer is not None:
            total, prompt = _token_counts(tokenizer, row["messages"])
            prompt_tokens += prompt
            completion_tokens += total - prompt
        else:  # ~4 characters per token
            prompt_tokens += sum(len(m["content"]) for m in row["messages"][:-1]) // 4
            completion_tokens += len(row["messages"][-1]["content"]) // 4
    usd = prompt_tokens / 1e6 * input_price + completion_tokens / 1e6 * output_price
    return {"usd": round(usd, 4), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "rows_estimated_without_usage": estimated}
