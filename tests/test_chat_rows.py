"""`validate_chat_jsonl` (ragtune.core.chat_rows) on real files with the student's (SmolLM2) tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.core.chat_rows import DatasetError, validate_chat_jsonl


def row(answer: str = "Uber operates in about 72 countries.", **meta: Any) -> dict[str, Any]:
    return {"messages": [
        {"role": "system", "content": "Answer from the context."},
        {"role": "user", "content": "Context: Uber is available in approximately 72 countries.\nQuery: Where does Uber operate?"},
        {"role": "assistant", "content": answer},
    ], "meta": meta}


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from ragtune.core.models import load_tokenizer

    return load_tokenizer(str(tiny_llama_dir))


def test_stats_with_tokenizer_max_length_epochs_and_cost(tmp_path: Path, tokenizer: Any) -> None:
    long_answer = "Uber operates in many countries. " * 40
    path = write(tmp_path / "train.jsonl", [
        row(mode="rag", usage={"prompt_tokens": 1000, "completion_tokens": 200}),
        row(long_answer, mode="rag"),
        row(mode="closed_book"),
    ])
    full = tokenizer.apply_chat_template(row()["messages"], tokenize=False)
    short_tokens = len(tokenizer(full, add_special_tokens=False)["input_ids"])
    stats = validate_chat_jsonl(path, tokenizer=tokenizer, max_length=short_tokens + 10, epochs=2, prices=(1.0, 4.0))

    assert stats["rows"] == 3 and stats["rows_by_mode"] == {"rag": 2, "closed_book": 1}
    assert stats["tokens_per_row"]["min"] == short_tokens
    assert stats["tokens_per_row"]["max"] > short_tokens + 200
    assert stats["training_tokens"] == 2 * stats["tokens_total"]
    assert stats["rows_over_max_length"] == 1 and stats["lines_over_max_length"] == [2]
    assert 0 < stats["assistant_tokens_total"] < stats["tokens_total"]
    cost = stats["teacher_cost_usd"]
    # row 1 from the teacher's own usage; row 2 estimated with the tokenizer; row 3 (closed-book) made no call
    assert cost["rows_estimated_without_usage"] == 1
    assert cost["prompt_tokens"] > 1000 and cost["completion_tokens"] > 200 + 200
    assert cost["usd"] == pytest.approx(cost["prompt_tokens"] / 1e6 * 1.0 + cost["completion_tokens"] / 1e6 * 4.0, abs=1e-4)


def test_without_tokenizer_only_checks_and_counts(tmp_path: Path) -> None:
    stats = validate_chat_jsonl(write(tmp_path / "train.jsonl", [row(), row()]))
    assert stats["rows"] == 2 and "tokens_total" not in stats


def test_malformed_rows_are_listed_with_line_numbers(tmp_path: Path) -> None:
    no_system = row()
    no_system["messages"] = no_system["messages"][1:]
    ends_with_user = row()
    ends_with_user["messages"] = ends_with_user["messages"][:2]
    empty_answer = row("  ")
    bad_role = row()
    bad_role["messages"][1]["role"] = "human"
    path = write(tmp_path / "train.jsonl", [
        row(), '{"messages": [', no_system, ends_with_user, row(), empty_answer, bad_role, {"text": "hi"}, "[1, 2]",
    ])
    with pytest.raises(DatasetError) as err:
        validate_chat_jsonl(path)
    message = str(err.value)
    assert f"{path}: 7 bad rows" in message
    expected = {
        2: "not valid JSON",
        3: "no system message first",
        4: "last message is from 'user'",
        6: "(assistant) has empty or non-string content",
        7: "messages[1].role is 'human'",
        8: "missing or empty `messages` list",
        9: "expected a JSON object",
    }
    for line, problem in expected.items():
        (listed,) = [entry for entry in message.splitlines() if entry.startswith(f"{path}:{line}: ")]
        assert problem in listed
    assert f"{path}:1:" not in message and f"{path}:5:" not in message


def test_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        validate_chat_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no training rows"):
        validate_chat_jsonl(write(tmp_path / "empty.jsonl", []))
