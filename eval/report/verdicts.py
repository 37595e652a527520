"""eval/summary.json as table rows, for report.md, report.html and the terminal: the verdicts vs the base, the
mean scores, the retrieval, the judge's sanity check, the timings and the spread of deltas across runs."""

from __future__ import annotations

from typing import Any

from ragtune.eval.stats import MIN_QUESTIONS, spread
from ragtune.core.render import text_table

VERDICT_COLUMNS = ("mode", "model", "metric", "n", "base", "tuned", "delta (95% CI)", "verdict", "teacher", "gap closed")
DECLARED = (f"A difference is declared only when its 95% CI excludes 0 and the two models' scores differ on at least "
            f"{MIN_QUESTIONS} questions.")
GAP_NOTE = ("Gap closed = (tuned − base) / (teacher − base) on the questions scored for all three; '–' where the "
            "teacher is not scored (reference-based metrics where the teacher wrote the references) or does not "
            "lead the base.")


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


CONDITION_COLUMNS = ("condition", "model", "metric", "n", "base", "tuned", "delta (95% CI)", "verdict")
CONDITION_FACT_COLUMNS = ("condition", "contexts given", "questions", "skipped", "contexts per question",
                          "source in context")
CONDITIONS_NOTE = ("The rag questions answered again by every student under other contexts (eval.retrieval_conditions), "
                   "scored on the metrics that need no judge, against the same references as rag mode. A student that "
                   "learned to read the context gains with the oracle and falls back with distractors only; one that "
                   "memorised its answers keeps its lead over the base without the source chunk.")


def comparison_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """Every comparison vs the base: one row per (mode, model, metric), columns `VERDICT_COLUMNS`."""
    rows = []
    for mode, models in summary.get("comparisons", {}).items():
        for model, metrics in models.items():
            for metric, c in metrics.items():
                n = str(c["n"]) + (f" ({c['excluded']} excl.)" if c.get("excluded") else "")
                rows.append(dict(zip(VERDICT_COLUMNS, (mode, model, metric, n, fmt(c["base"]), fmt(c["tuned"]),
                                                       _delta(c), c["verdict"], fmt(c.get("teacher")),
                                                       _gap(c.get("gap_closed"))))))
    return rows


def _gap(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _delta(c: dict[str, Any]) -> str:
    text = fmt(c["delta"], signed=True)
    if c["ci_low"] is not None:
        text += f" [{fmt(c['ci_low'], True)}, {fmt(c['ci_high'], True)}]"
    return text


def verdict_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """The short verdict table for the terminal: (metric, base, tuned, delta with 95% CI, verdict, gap closed)
    for each fine-tuned model (adapters, merged) vs the base; the metric reads `faithfulness (adapter, rag)`."""
    tuned = {m["name"] for m in summary.get("models", []) if m["kind"] in ("adapter", "merged")}
    return [(f"{r['metric']} ({r['model']}, {r['mode']})", r["base"], r["tuned"], r["delta (95% CI)"], r["verdict"],
             r["gap closed"]) for r in comparison_rows(summary) if r["model"] in tuned]


def verdict_table(summary: dict[str, Any]) -> str:
    """`verdict_rows` as aligned plain text."""
    return text_table(("metric", "base", "tuned", "delta (95% CI)", "verdict", "gap closed"),
                      [list(r) for r in verdict_rows(summary)])


def results_rows(summary: dict[str, Any], mode: str) -> tuple[list[str], list[list[str]]]:
    """Metrics as rows, models as columns: mean [95% CI] and the count of failed samples."""
    models = summary["results"].get(mode, {})
    metrics = list(dict.fromkeys(m for entry in models.values() for m in entry))
    rows = []
    for metric in metrics:
        cells = [metric]
        for entry in models.values():
            e = entry.get(metric)
            if e is None:
                cells.append("n/a")
            elif metric == "ragas_score":
                cells.append(fmt(e["value"]) + f" (n={e['n']})")
            else:
                ci = f" [{fmt(e['ci_low'])}, {fmt(e['ci_high'])}]" if e["ci_low"] is not None else ""
                cells.append(fmt(e["mean"]) + ci + (f", {e['failures']} failed" if e["failures"] else ""))
        rows.append(cells)
    return ["metric", *models], rows


def sanity_rows(summary: dict[str, Any]) -> list[list[str]]:
    sanity = summary["judge"]["sanity"]
    rows = []
    for metric, s in {**sanity["metrics"], "overall": sanity["overall"]}.items():
        rate = "–" if s["rate"] is None else f"{s['rate']:.0%}"
        ci = "–" if s["ci_low"] is None else f"{s['ci_low']:.0%}–{s['ci_high']:.0%}"
        rows.append([metric, str(s["pairs"]), str(s["failed_pairs"]), rate, ci])
    return rows


def timing_lines(summary: dict[str, Any]) -> list[str]:
    t = summary["timings"]
    lines = [f"total {t.get('total_seconds', 0):.0f}s for {t.get('questions')} questions"]
    for key, value in t.get("generation_seconds_per_question", {}).items():
        lines.append(f"generation {key}: {value:.2f} s/question")
    if t.get("judge"):
        lines.append(f"judge: {t['judge']['seconds']:.0f}s in {t['judge']['calls']} batched calls "
                     f"({t['judge']['requests']} requests, {t['judge']['cached']} answered from cache), "
                     f"{t.get('judge_seconds_per_llm_scored_sample') or 0:.2f} s per LLM-scored sample")
    if "embeddings_seconds" in t:
        lines.append(f"embeddings: {t['embeddings_seconds']:.1f}s in {t.get('embedding_calls', 0)} calls")
    if "scoring_seconds" in t:
        lines.append(f"scoring wall time {t['scoring_seconds']:.1f}s (judge and embeddings overlap; the rest is "
                     "string metrics and Ragas itself)")
    return lines


def oracle_line(retrieval: dict[str, Any]) -> str:
    top_k, rate = retrieval["similarity_top_k"], retrieval["oracle_hit_rate"]
    if rate is None:
        return (f"Oracle chunk among the top {top_k}: not known (golden questions have no source chunk; the "
                "string-matched context metrics compare the retrieved chunks with a golden row's `contexts`)")
    return f"Oracle chunk among the top {top_k}: {rate:.0%}"


def spread_rows(labels: list[str], summaries: list[dict[str, Any]]) -> list[list[str]]:
    keys: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for summary in summaries:
        for mode, models in summary.get("comparisons", {}).items():
            for model, metrics in models.items():
                for metric, c in metrics.items():
                    keys.setdefault((mode, model, metric), []).append(c)
    rows = []
    for (mode, model, metric), comparisons in keys.items():
        if len(comparisons) < 2:
            continue
        s = spread([c["delta"] for c in comparisons])
        better = sum(c["verdict"] == "better" for c in comparisons)
        rows.append([mode, model, metric, str(s["runs"]), fmt(s.get("mean"), True), fmt(s.get("std")),
                     fmt(s.get("min"), True), fmt(s.get("max"), True), f"{better}/{len(comparisons)}"])
    return rows


def condition_fact_rows(part: dict[str, Any]) -> list[list[str]]:
    """What each retrieval condition gave the students (summary.json's `retrieval_conditions`)."""
    rows = []
    for c in part["conditions"]:
        per_question = "–" if c["contexts_per_question"] is None else f"{c['contexts_per_question']:.1f}"
        source = "–" if c["source_in_context"] is None else f"{c['source_in_context']:.0%}" + (
            f" of {c['source_known']} with a known source" if c["source_known"] < c["questions"] else "")
        rows.append([c["name"], c["description"], str(c["questions"]), str(c["skipped"]), per_question, source])
    return rows


def condition_rows(part: dict[str, Any]) -> list[list[str]]:
    """One row per (condition, compared model, metric), columns `CONDITION_COLUMNS`; the base's means alone where no
    model is compared with it."""
    rows = []
    for condition in part["conditions"]:
        name = condition["name"]
        compared = part["comparisons"].get(name, {})
        for model, metrics in compared.items():
            for metric, c in metrics.items():
                n = str(c["n"]) + (f" ({c['excluded']} excl.)" if c.get("excluded") else "")
                rows.append([name, model, metric, n, fmt(c["base"]), fmt(c["tuned"]), _delta(c), c["verdict"]])
        if not compared:
            rows += [[name, model, metric, str(e["n"]), fmt(e["mean"]), "–", "–", "no model to compare"]
                     for model, metrics in part["results"].get(name, {}).items() for metric, e in metrics.items()]
    return rows


def skip_lines(part: dict[str, Any]) -> list[str]:
    """Each condition's skipped questions, by reason (a skipped question is left out of that condition's rows)."""
    return [f"{c['name']}: {n} of {c['questions'] + c['skipped']} questions skipped ({reason})"
            for c in part["conditions"] for reason, n in c["skip_reasons"].items()]
