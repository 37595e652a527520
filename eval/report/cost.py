"""Cost and benefit from a run's own files: what the tuned student cost to make (prep's teacher tokens, training
time), what a rag query costs from the teacher's API and from the student, the break-even query count, and
their table rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ragtune.core.artifacts import read_jsonl
from ragtune.core.run_dir import RunDir

# Query volumes of the break-even table: a pilot to a busy product.
QUERY_VOLUMES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
PRICE_KEYS = {"teacher_input_per_million": ("teacher", "price_per_million_input_tokens"),
              "teacher_output_per_million": ("teacher", "price_per_million_output_tokens"),
              "gpu_hour": ("cost", "price_per_gpu_hour"), "cpu_hour": ("cost", "price_per_cpu_hour")}


def prices_from(config: dict[str, Any]) -> dict[str, float | None]:
    """The four prices of a resolved config (the run's, from manifest.json, or `ragtune report --config`)."""
    return {name: (config.get(section) or {}).get(key) for name, (section, key) in PRICE_KEYS.items()}


def _usd(tokens_in: float, tokens_out: float, prices: dict[str, float | None]) -> float | None:
    p_in, p_out = prices["teacher_input_per_million"], prices["teacher_output_per_million"]
    if p_in is None and p_out is None:
        return None
    return (tokens_in * (p_in or 0.0) + tokens_out * (p_out or 0.0)) / 1e6


def teacher_usage(run_dir: RunDir, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """prep's teacher calls: {"answers_kept", "answers_rejected", "questions"} → calls, tokens in and out, how
    counted. Kept rows carry the backend's counts (meta.usage, all candidates); rejected answers and question
    generations carry only text, so their tokens are estimated at the characters per token measured on the kept
    rows' prompts (None when no kept row has counts)."""
    calls = prompt_tokens = completion_tokens = prompt_chars = 0
    for row in read_jsonl(run_dir.train_jsonl) if run_dir.train_jsonl.exists() else []:
        meta = row.get("meta") or {}
        usage = meta.get("usage")
        if not usage:  # closed-book rows reuse their rag row's answer: no call of their own
            continue
        n = int(meta.get("candidates") or 1)
        calls += n
        prompt_tokens += usage.get("prompt_tokens") or 0
        completion_tokens += usage.get("completion_tokens") or 0
        prompt_chars += n * sum(len(m["content"]) for m in row["messages"] if m["role"] != "assistant")
    out: dict[str, dict[str, Any]] = {"answers_kept": {"calls": calls, "tokens_in": prompt_tokens,
                                                       "tokens_out": completion_tokens, "counted": "exact"}}
    chars_per_token = prompt_chars / prompt_tokens if prompt_tokens else None
    prompt_per_call = prompt_tokens / calls if calls else None

    def estimate(n_calls: int, in_chars: float | None, out_chars: int) -> dict[str, Any]:
        if chars_per_token is None:
            return {"calls": n_calls, "tokens_in": None, "tokens_out": None, "counted": "not countable"}
        tokens_in = in_chars / chars_per_token if in_chars is not None else n_calls * (prompt_per_call or 0)
        return {"calls": n_calls, "tokens_in": round(tokens_in), "tokens_out": round(out_chars / chars_per_token),
                "counted": f"estimated ({chars_per_token:.1f} characters per token)"}

    rejected = read_jsonl(run_dir.answers_rejected) if run_dir.answers_rejected.exists() else []
    candidates = [c for row in rejected for c in row.get("candidates", [])]
    # same template and top_k as the kept rows: their mean prompt per call
    out["answers_rejected"] = estimate(len(candidates), None, sum(len(c.get("text") or "") for c in candidates))
    raw = read_jsonl(run_dir.questions_raw) if run_dir.questions_raw.exists() else []
    chunks = {c["id"]: c["text"] for c in read_jsonl(run_dir.chunks)} if raw and run_dir.chunks.exists() else {}
    template = (config.get("data_prep") or {}).get("question_prompt") or "{context_str}"
    in_chars = sum(len(template) + len(chunks.get(r.get("chunk_id"), "")) for r in raw)
    out["questions"] = estimate(len(raw), in_chars, sum(len(r.get("completion") or "") for r in raw))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _machine_hour(device: str | None, prices: dict[str, float | None]) -> tuple[str, float | None]:
    """("GPU"|"CPU", the price of one hour of it) for the device the train stage recorded."""
    if device and device != "cpu":
        return "GPU", prices["gpu_hour"]
    return "CPU", prices["cpu_hour"]


def serving_per_query(run_dir: RunDir, summary: dict[str, Any], prices: dict[str, float | None],
                      device: str | None) -> dict[str, dict[str, Any]]:
    """Per rag query, from eval's own measurements: the teacher's mean tokens in and out (its answers' usage) at
    the API prices, and the tuned student's throughput (merged, else adapter) at the hourly price. Retrieval is the
    same for both and left out."""
    out: dict[str, dict[str, Any]] = {}
    reference = summary.get("reference")
    teacher = _mean_tokens(run_dir, summary, reference)
    if teacher is not None:
        usd = _usd(teacher["tokens_in"], teacher["tokens_out"], prices)
        out["teacher"] = {"model": reference, **teacher, "usd_per_1k": None if usd is None else usd * 1000}
    tuned = [m["name"] for m in summary.get("models", []) if m["kind"] in ("merged", "adapter")]
    tuned.sort(key=lambda name: name != "merged")
    generation = summary.get("timings", {}).get("generation", {})
    for name in tuned:
        measured = generation.get(name, {}).get("rag") or {}
        if measured.get("generated") and measured.get("seconds"):
            kind, hourly = _machine_hour(device, prices)
            per_query = measured["seconds"] / measured["generated"]
            out["student"] = {"model": name, **(_mean_tokens(run_dir, summary, name) or {}),
                              "queries": measured["generated"], "device": kind,
                              "tokens_per_second": round(measured.get("completion_tokens", 0) / measured["seconds"], 1),
                              "seconds_per_query": round(per_query, 3),
                              "usd_per_1k": None if hourly is None else per_query * 1000 / 3600 * hourly}
            break
    return out


def _mean_tokens(run_dir: RunDir, summary: dict[str, Any], model: str | None) -> dict[str, Any] | None:
    """A model's rag answers in eval: how many, and their mean prompt and completion tokens (the backend's counts)."""
    path = summary.get("files", {}).get("answers", {}).get(model, {}).get("rag")
    if not path or not (run_dir.root / path).exists():
        return None
    rows = [r for r in read_jsonl(run_dir.root / path) if r.get("error") is None]
    if not rows:
        return None
    return {"queries": len(rows), "tokens_in": round(sum(r.get("prompt_tokens") or 0 for r in rows) / len(rows), 1),
            "tokens_out": round(sum(r.get("completion_tokens") or 0 for r in rows) / len(rows), 1)}


def cost_benefit(run_dir: RunDir, summary: dict[str, Any], prices: dict[str, float | None] | None = None) -> dict[str, Any]:
    """What the tuned student cost (teacher tokens in prep, training time), what a rag query costs from the
    teacher's API and from the student, and after how many queries the student is the cheaper; `missing` says
    which price or measurement is absent. Prices default to the config the run recorded in manifest.json."""
    manifest = _read_json(run_dir.manifest)
    config, stages = manifest.get("config") or {}, manifest.get("stages") or {}
    prices = prices if prices is not None else prices_from(config)
    train = stages.get("train") or {}
    device = (train.get("precision") or {}).get("device")
    kind, hourly = _machine_hour(device, prices)
    missing = [] if manifest else ["manifest.json is missing: no stage times or prices"]

    teacher = teacher_usage(run_dir, config)
    for entry in teacher.values():
        usd = None if entry["tokens_in"] is None else _usd(entry["tokens_in"], entry["tokens_out"], prices)
        entry["usd"] = None if usd is None else round(usd, 4)
    counted = [e for e in teacher.values() if e["tokens_in"] is not None]
    teacher_total = {"calls": sum(e["calls"] for e in teacher.values()),
                     "tokens_in": sum(e["tokens_in"] for e in counted), "tokens_out": sum(e["tokens_out"] for e in counted),
                     "usd": None if any(e["usd"] is None for e in teacher.values()) else
                     round(sum(e["usd"] for e in teacher.values()), 4)}
    tokens = _read_json(run_dir.data_stats)
    seconds = train.get("seconds")
    gpus = (train.get("world_size") or 1) if kind == "GPU" else 1
    machine_hours = None if seconds is None else seconds / 3600 * gpus
    training = {"device": device, "priced_as": f"{kind}-hours", "seconds": seconds,
                "hours": None if machine_hours is None else round(machine_hours, 4),
                "training_tokens": tokens.get("training_tokens"), "tokens_seen": train.get("tokens_seen"),
                "usd": None if machine_hours is None or hourly is None else round(machine_hours * hourly, 4)}
    per_query = serving_per_query(run_dir, summary, prices, device)
    fixed = None if teacher_total["usd"] is None or training["usd"] is None else teacher_total["usd"] + training["usd"]

    if prices["teacher_input_per_million"] is None and prices["teacher_output_per_million"] is None:
        missing.append("teacher.price_per_million_input_tokens / …_output_tokens are not set: teacher tokens are not priced")
    if hourly is None:
        missing.append(f"cost.price_per_{kind.lower()}_hour is not set: training and serving time are not priced")
    if seconds is None:
        missing.append("no train stage in manifest.json: training time unknown")
    for who, what in (("teacher", "the teacher's rag answers in eval"), ("student", "a tuned model's rag answers in eval")):
        if who not in per_query:
            missing.append(f"no measurement of {what}: per-query cost unknown")
    teacher_q = (per_query.get("teacher") or {}).get("usd_per_1k")
    student_q = (per_query.get("student") or {}).get("usd_per_1k")
    break_even: dict[str, Any] = {"fixed_usd": None if fixed is None else round(fixed, 4), "queries": None, "table": []}
    if None not in (fixed, teacher_q, student_q):
        saving = (teacher_q - student_q) / 1000
        break_even["queries"] = math.ceil(fixed / saving) if saving > 0 else None
        break_even["never"] = saving <= 0
        break_even["table"] = [{"queries": n, "teacher_usd": round(n * teacher_q / 1000, 4),
                                "student_usd": round(fixed + n * student_q / 1000, 4)} for n in QUERY_VOLUMES]
    return {"prices": prices, "teacher": {**teacher, "total": teacher_total}, "train": training,
            "prep_seconds": (stages.get("prep") or {}).get("seconds"), "eval_seconds": (stages.get("eval") or {}).get("seconds"),
            "per_query": per_query, "break_even": break_even, "missing": missing}


def _n(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _money(value: float | None) -> str:
    return "not priced" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


COST_COLUMNS = ("what", "calls", "tokens in", "tokens out", "time", "USD", "counted")
PER_QUERY_COLUMNS = ("per rag query", "model", "measured on", "tokens in", "tokens out", "throughput", "USD per 1k queries")
BREAK_EVEN_COLUMNS = ("queries", "teacher API with RAG", "tuned student (tuning + serving)", "cheaper")


def cost_rows(cost: dict[str, Any]) -> list[list[str]]:
    """What tuning the student cost: prep's teacher calls by kind, their total, training, and the stage times."""
    labels = {"answers_kept": "teacher: answers kept", "answers_rejected": "teacher: answers rejected",
              "questions": "teacher: question generation", "total": "teacher: total"}
    rows = [[labels[k], _n(e["calls"]), _n(e["tokens_in"]), _n(e["tokens_out"]), "", _money(e["usd"]), e.get("counted", "")]
            for k, e in cost["teacher"].items()]
    t = cost["train"]
    rows.append([f"training ({t['device'] or 'device unknown'})", "", _n(t["training_tokens"]), "",
                 "–" if t["seconds"] is None else f"{t['seconds']:.0f} s = {t['hours']:.3f} {t['priced_as']}",
                 _money(t["usd"]), "training tokens × epochs (logs/data_stats.json); stage wall time"])
    for stage in ("prep", "eval"):
        seconds = cost[f"{stage}_seconds"]
        rows.append([f"{stage} stage", "", "", "", "–" if seconds is None else f"{seconds:.0f} s", "", "wall time, not priced"])
    return rows


def per_query_rows(cost: dict[str, Any]) -> list[list[str]]:
    rows = []
    teacher, student = cost["per_query"].get("teacher"), cost["per_query"].get("student")
    if teacher:
        rows.append(["teacher API", teacher["model"], f"{teacher['queries']} eval answers", _n(teacher["tokens_in"]),
                     _n(teacher["tokens_out"]), "", _money(teacher["usd_per_1k"])])
    if student:
        rows.append(["tuned student", student["model"], f"{student['queries']} eval answers ({student['device']})",
                     _n(student.get("tokens_in")), _n(student.get("tokens_out")),
                     f"{student['tokens_per_second']} tokens/s, {student['seconds_per_query']} s/query",
                     _money(student["usd_per_1k"])])
    return rows


def break_even_rows(cost: dict[str, Any]) -> list[list[str]]:
    return [[_n(r["queries"]), _money(r["teacher_usd"]), _money(r["student_usd"]),
             "student" if r["student_usd"] < r["teacher_usd"] else "teacher"] for r in cost["break_even"]["table"]]


def break_even_line(cost: dict[str, Any]) -> str:
    b = cost["break_even"]
    if not b["table"]:
        return "Break-even: not computed (" + "; ".join(cost["missing"]) + ")."
    if b.get("never"):
        return "Break-even: never: a query costs more on the student than through the teacher's API."
    return (f"Break-even: after {b['queries']:,} queries the tuned student ({_money(b['fixed_usd'])} to make) "
            "is cheaper than sending every query to the teacher's API with RAG.")


COST_NOTE = ("Teacher tokens of kept answers are the backend's counts; rejected answers and question generations are "
             "estimated from their text (the answerability checks are not counted). The student's cost per query is "
             "its eval throughput (batched, so at full load) at the hourly price of the training device; retrieval "
             "costs the same on both sides and is left out.")
