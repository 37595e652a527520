"""eval/summary.json: per model and mode, means with CIs and failure counts; against the base, paired
differences on the questions scored for both, with bootstrap CIs, win/tie/loss, a verdict and, where the
teacher is scored, the share of the teacher's lead the tuned model closed; plus the retriever's scores, the
retrieval conditions (eval/conditions.py), the judge's sanity check, warnings a reader must see first, and
timings."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import read_jsonl, write_json
from ragtune.core.run_dir import RunDir
from ragtune.eval.answer import REFERENCE_MODEL, ModelSpec
from ragtune.eval.conditions import condition_summary
from ragtune.eval.config import ANSWER_METRICS, RETRIEVAL_METRICS
from ragtune.eval.score import LLM_METRICS, REFERENCE_ANSWER_METRICS, discrimination, load_scores, reason_key
from ragtune.eval.stats import (MIN_GAP, gap_closed, mean_with_ci, paired_difference, paired_ragas_score, ragas_score,
                                spread)

if TYPE_CHECKING:
    from ragtune.app.config import RagtuneConfig

BASELINE = "base"
RETRIEVER = "retriever"
FEW_QUESTIONS = 30

Table = dict[str, dict[str, dict[str, Any]]]  # {question_id: {metric: score row}}


def summarize(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], questions: list[dict[str, Any]],
              dropped: dict[str, int], retrieval: dict[str, dict[str, Any]], timings: dict[str, Any],
              source: dict[str, Any]) -> dict[str, Any]:
    """The whole summary; each part is built by one function below. `source` says whose questions these are
    (`eval.golden.question_source`)."""
    ev = config.eval
    boot = {"n_resamples": ev.n_resamples, "confidence_level": ev.confidence_level}
    qids = [q["id"] for q in questions]
    golden_qids = [q["id"] for q in questions if q.get("reference")]
    answer_metrics = [m for m in ev.metrics if m in ANSWER_METRICS]
    files: dict[str, Any] = {"answers": {}, "scores": {}}
    results, comparisons, health, warnings = model_results(config, run_dir, specs, qids, golden_qids, boot, files)
    retrieval_summary = retriever_results(config, run_dir, qids, retrieval, boot, files)
    sanity_rows = read_jsonl(run_dir.judge_sanity) if run_dir.judge_sanity.exists() else []
    sanity = discrimination(sanity_rows, ev.confidence_level)
    if sanity_rows:
        files["judge_sanity"] = str(run_dir.judge_sanity.relative_to(run_dir.root))
    warnings = judge_warnings(config, sanity, bool(sanity_rows)) + warnings
    warnings += result_warnings(config, run_dir, specs, qids, golden_qids, results, source)
    return {
        "run": {"name": config.name, "run_dir": str(run_dir.root), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "questions": {"evaluated": len(qids), "dropped": dropped, "source": source,
                      "golden_references": {q["id"]: q["reference"] for q in questions if q.get("reference")}},
        "modes": list(ev.modes),
        "metrics": answer_metrics,
        "retrieval_metrics": [m for m in ev.metrics if m in RETRIEVAL_METRICS],
        "baseline": BASELINE,
        "reference": REFERENCE_MODEL,
        "models": [{"name": s.name, "kind": s.kind, "model": s.model, "adapter": s.adapter, "fingerprint": s.fingerprint}
                   for s in specs],
        "files": files,
        "answers": health,
        "results": results,
        "comparisons": comparisons,
        "retrieval": retrieval_summary,
        **({"retrieval_conditions": condition_summary(config, run_dir, specs, questions, retrieval, boot)}
           if ev.retrieval_conditions else {}),
        "judge": {"backend": config.judge.backend, "model": config.judge.model, "sanity": sanity},
        "stats": {**boot, "seed": config.seed, "method": "percentile bootstrap (scipy.stats.bootstrap), paired over questions",
                  "tie_tolerance": ev.tie_tolerance},
        "timings": timing_breakdown(timings, len(qids)),
        "warnings": warnings,
        "notes": notes(config, answer_metrics, source),
    }


def model_results(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], qids: list[str],
                  golden_qids: list[str], boot: dict[str, Any], files: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
    """(results, comparisons vs the base, answer health, warnings) per mode and model; fills `files`. The teacher is
    scored on reference-based metrics over `golden_qids` only: elsewhere its own answer is the reference."""
    answer_metrics = [m for m in config.eval.metrics if m in ANSWER_METRICS]
    results: dict[str, Any] = {}
    comparisons: dict[str, Any] = {}
    health: dict[str, Any] = {}
    warnings: list[str] = []
    for mode in config.eval.modes:
        tables: dict[str, Table] = {}
        for spec in specs:
            answers_path, scores_path = run_dir.answers(spec.name, mode), run_dir.scores(spec.name, mode)
            if not answers_path.exists():
                continue
            files["answers"].setdefault(spec.name, {})[mode] = str(answers_path.relative_to(run_dir.root))
            files["scores"].setdefault(spec.name, {})[mode] = str(scores_path.relative_to(run_dir.root))
            answers = {r["question_id"]: r for r in read_jsonl(answers_path)}
            errors = sum(1 for q in qids if answers.get(q, {}).get("error"))
            empty = sum(1 for q in qids if answers.get(q, {}).get("answer") == "")
            health.setdefault(spec.name, {})[mode] = {"answers": len(answers), "errors": errors, "empty": empty}
            if errors or empty:
                warnings.append(f"{spec.name}/{mode}: {errors} failed and {empty} empty answers out of {len(qids)} "
                                "(their answer metrics are recorded failures)")
            tables[spec.name] = load_scores(scores_path)
            metrics = [m for m in answer_metrics if not (spec.kind == "teacher" and m in REFERENCE_ANSWER_METRICS)]
            results.setdefault(mode, {})[spec.name] = _model_result(tables[spec.name], qids, metrics, config.seed, boot)
            if spec.kind == "teacher" and golden_qids:
                results[mode][spec.name].update({m: _metric_summary(tables[spec.name], golden_qids, m, config.seed, boot)
                                                 for m in answer_metrics if m in REFERENCE_ANSWER_METRICS})
        if BASELINE not in tables:
            continue
        for spec in specs:
            if spec.name != BASELINE and spec.name in tables:
                compared = [m for m in results[mode][spec.name] if m in answer_metrics]
                on_golden = [m for m in compared if spec.kind == "teacher" and m in REFERENCE_ANSWER_METRICS]
                comparisons.setdefault(mode, {})[spec.name] = {
                    **_compare(tables[BASELINE], tables[spec.name], qids, [m for m in compared if m not in on_golden],
                               config.seed, config.eval.tie_tolerance, boot),
                    **_compare(tables[BASELINE], tables[spec.name], golden_qids, on_golden, config.seed,
                               config.eval.tie_tolerance, boot)}
                if spec.kind != "teacher":
                    for metric, entry in comparisons[mode][spec.name].items():
                        entry.update(gap_to_teacher(tables[BASELINE], tables[spec.name], tables.get(REFERENCE_MODEL),
                                                    qids, metric))
    return results, comparisons, health, warnings


def _model_result(table: Table, qids: list[str], metrics: list[str], seed: int, boot: dict[str, Any]) -> dict[str, Any]:
    result = {m: _metric_summary(table, qids, m, seed, boot) for m in metrics}
    if {"faithfulness", "answer_relevancy"} <= set(metrics):
        both = _scored(table, qids, "faithfulness", "answer_relevancy")
        result["ragas_score"] = {
            "n": len(both),
            "value": ragas_score(_mean(table, both, "faithfulness"), _mean(table, both, "answer_relevancy")) if both else None,
        }
    return result


def retriever_results(config: "RagtuneConfig", run_dir: RunDir, qids: list[str], retrieval: dict[str, dict[str, Any]],
                      boot: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    """The oracle hit rate and the retrieval metrics (the same retriever for every model: scored once)."""
    known = [retrieval[q]["oracle_in_context"] for q in qids if retrieval.get(q, {}).get("oracle_in_context") is not None]
    summary: dict[str, Any] = {  # None for golden questions: they have no source chunk in the index
        "oracle_hit_rate": sum(known) / len(known) if known else None,
        "similarity_top_k": config.data_prep.similarity_top_k,
    }
    table = load_scores(run_dir.scores(RETRIEVER, "rag"))
    for metric in [m for m in config.eval.metrics if m in RETRIEVAL_METRICS]:
        summary[metric] = _metric_summary(table, qids, metric, config.seed, boot)
    if table:
        files["retrieval_scores"] = str(run_dir.scores(RETRIEVER, "rag").relative_to(run_dir.root))
    return summary


def judge_warnings(config: "RagtuneConfig", sanity: dict[str, Any], checked: bool) -> list[str]:
    """What the reader must see first about the judge: near chance, or not checked at all."""
    if sanity["warning"]:
        return [sanity["warning"]]
    if not checked and any(m in LLM_METRICS for m in config.eval.metrics):
        return ["JUDGE NOT CHECKED: no sanity pairs were scored (eval.judge_sanity_pairs is 0, or fewer than two "
                "questions have a teacher answer): nothing shows the LLM-judged scores mean anything."]
    return []


def result_warnings(config: "RagtuneConfig", run_dir: RunDir, specs: list[ModelSpec], qids: list[str],
                    golden_qids: list[str], results: dict[str, Any], source: dict[str, Any]) -> list[str]:
    """Failed scores, teacher references that equal the base's answers or failed the gates, no tuned model, too few
    questions, golden references found in training rows."""
    warnings = []
    for mode, models in results.items():
        for model, metrics in models.items():
            for metric, entry in metrics.items():
                if entry.get("failures"):
                    top = ", ".join(f"{k} ×{v}" for k, v in list(entry["failure_reasons"].items())[:2])
                    warnings.append(f"{model}/{mode} {metric}: {entry['failures']} of {len(qids)} samples failed ({top})")
    base_rag, teacher_rag = run_dir.answers(BASELINE, "rag"), run_dir.answers(REFERENCE_MODEL, "rag")
    answer_metrics = {m for m in config.eval.metrics if m in ANSWER_METRICS}
    teacher_referenced = set(qids) - set(golden_qids)  # the questions whose reference is the teacher's answer
    teacher_rows = [r for r in read_jsonl(teacher_rag) if r["question_id"] in teacher_referenced] \
        if teacher_rag.exists() else []
    if base_rag.exists() and teacher_rows and answer_metrics & REFERENCE_ANSWER_METRICS:
        base_answers = {r["question_id"]: r["answer"] for r in read_jsonl(base_rag)}
        same = sum(1 for r in teacher_rows if r["answer"] and r["answer"] == base_answers.get(r["question_id"]))
        if same >= len(teacher_referenced) / 2:
            warnings.append(f"the teacher's reference answers equal the base model's for {same} of "
                            f"{len(teacher_referenced)} questions (is the teacher the student model?): reference-based "
                            "metrics then measure distance from the base's own answers and favour the base by construction")
    if teacher_rows and answer_metrics & REFERENCE_ANSWER_METRICS:
        gated = [r for r in teacher_rows if "gate" in r]
        failed = sum(1 for r in gated if r["gate"] is not None)
        if gated and failed > len(gated) / 2:
            warnings.append(f"{failed} of {len(gated)} reference answers failed the answer gates (the teacher wrote no "
                            f"candidate prep would train on): reference-based metrics compare with weak references; "
                            "raise teacher.num_candidates or use a stronger teacher")
    if not any(s.kind in ("adapter", "merged") for s in specs):
        warnings.append(f"no fine-tuned model found ({run_dir.adapter} and {run_dir.merged} are missing, no --adapters): "
                        "only the teacher is compared to the base")
    golden = source["kind"] == "golden"
    if len(qids) < FEW_QUESTIONS:
        warnings.append(f"only {len(qids)} {'golden' if golden else 'held-out'} questions: confidence intervals are "
                        "wide and a real change of a few points will usually read as 'no difference'; "
                        + (f"add questions to {source['file']}" if golden else "raise data_prep.num_eval_questions"))
    if golden and source["leaked"]:
        named = ", ".join(f"{leak['question_id']} (in {leak['train_rows'][0]}"
                          + (f" and {len(leak['train_rows']) - 1} more" if len(leak["train_rows"]) > 1 else "") + ")"
                          for leak in source["leaked"][:5])
        warnings.append(f"{len(source['leaked'])} of {len(golden_qids)} golden references are in training rows of "
                        f"data/train.jsonl, as contexts or answers: {named}"
                        + (" …" if len(source["leaked"]) > 5 else "") + ". The tuned model may have learned them: "
                        "a closed_book gain on those questions shows memory of the documents, not reading")
    return warnings


def notes(config: "RagtuneConfig", answer_metrics: list[str], source: dict[str, Any]) -> list[str]:
    out = ["Every comparison is paired over the questions scored for both models (their intersection); 'excluded' "
           "counts questions left out because a score failed for one or both."]
    teacher_reference = (
        f"the teacher's rag answers (model '{REFERENCE_MODEL}'), written with the question's source chunk among the "
        f"contexts and chosen as prep chooses a training row: of teacher.num_candidates "
        f"({config.teacher.num_candidates}), the one that passes the answer gates and the others agree with most, "
        "else the first (its row in answers.teacher.rag.jsonl names the gate it failed)")
    if source["kind"] == "golden":
        golden, by_teacher = source["references"]["golden"], source["references"]["teacher"]
        text = f"The questions are the golden set {source['file']} (eval.questions_file), not prep's held-out questions. "
        if golden:
            text += (f"{golden} of them give a reference, which reference-based metrics use for every model, the "
                     "teacher included: its scores there say how close the teacher comes to the golden answers, and "
                     "gap closed is measured against them. ")
        if by_teacher:
            text += (f"For the {by_teacher} without one, the reference is {teacher_reference}; the teacher is not "
                     "scored against its own answers.")
        out.append(text.strip())
    else:
        out.append(f"Reference answers are {teacher_reference}; reference-based metrics are not computed for the "
                   "teacher itself.")
    out.append("Gap closed = (tuned − base) / (teacher − base), means over the questions scored for all three: "
               "1 is the teacher's level, 0 the base's. It exists only where the teacher is scored, so not for the "
               "reference-based metrics where the teacher wrote the references, and is left out when the teacher does "
               f"not lead the base by at least {MIN_GAP}.")
    if "grounding" in answer_metrics:
        out.append("grounding (ragtune's own, no LLM) is the share of the answer's content-word pairs, beyond those of "
                   "the question, found in the contexts the model was shown (rag; the teacher's include the question's source chunk) or, in closed_book, "
                   "retrieved for the question: how much of what it says the documents support.")
    if "closed_book" in config.eval.modes and "faithfulness" in answer_metrics:
        out.append("closed_book faithfulness is judged against the contexts retrieved for the question, which the "
                   "model did not see: does the knowledge it baked in agree with the documents?")
    if any(m in RETRIEVAL_METRICS for m in config.eval.metrics):
        out.append("Context precision/recall measure the retriever, which is the same for every model: they are "
                   "scored once per question, against the reference answer and "
                   + ("the golden row's `contexts`." if source["kind"] == "golden" else "the question's source chunk."))
    prep = config.data_prep
    if source["kind"] == "prep" and prep.roundtrip_top_k and "eval" in prep.roundtrip_splits:
        out.append(f"Held-out questions were kept only where retrieval ranks their source chunk in the top "
                   f"{prep.roundtrip_top_k} (data_prep.roundtrip_top_k): context recall is high by construction; "
                   "data/questions.rejected.jsonl counts the questions left out as 'not retrievable'.")
    return out


def _scored(table: Table, qids: list[str], *metrics: str) -> list[str]:
    return [q for q in qids if all(table.get(q, {}).get(m, {}).get("value") is not None for m in metrics)]


def _mean(table: Table, qids: list[str], metric: str) -> float:
    return sum(table[q][metric]["value"] for q in qids) / len(qids)


def _metric_summary(table: Table, qids: list[str], metric: str, seed: int,
                    boot: dict[str, Any]) -> dict[str, Any]:
    values = [table[q][metric]["value"] for q in _scored(table, qids, metric)]
    reasons: dict[str, int] = {}
    for q in qids:
        row = table.get(q, {}).get(metric)
        if row is None:
            reasons["not scored yet"] = reasons.get("not scored yet", 0) + 1
        elif row["value"] is None:
            key = reason_key(row["error"] or "unknown")
            reasons[key] = reasons.get(key, 0) + 1
    return {**mean_with_ci(values, seed=seed, **boot), "failures": sum(reasons.values()),
            "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def _compare(base: Table, tuned: Table, qids: list[str], metrics: list[str], seed: int,
             tie_tolerance: float, boot: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in metrics:
        common = [q for q in qids if base.get(q, {}).get(metric, {}).get("value") is not None
                  and tuned.get(q, {}).get(metric, {}).get("value") is not None]
        entry = paired_difference([base[q][metric]["value"] for q in common], [tuned[q][metric]["value"] for q in common],
                                  seed=seed, tie_tolerance=tie_tolerance, **boot)
        out[metric] = {**entry, "excluded": len(qids) - len(common)}
    if {"faithfulness", "answer_relevancy"} <= set(metrics):
        common = [q for q in _scored(base, qids, "faithfulness", "answer_relevancy")
                  if q in set(_scored(tuned, qids, "faithfulness", "answer_relevancy"))]
        entry = paired_ragas_score(
            *[[table[q][m]["value"] for q in common] for table in (base, tuned) for m in ("faithfulness", "answer_relevancy")],
            seed=seed, tie_tolerance=tie_tolerance, **boot)
        out["ragas_score"] = {**entry, "excluded": len(qids) - len(common)}
    return out


def gap_to_teacher(base: Table, tuned: Table, teacher: Table | None, qids: list[str], metric: str) -> dict[str, Any]:
    """`gap_closed` on the questions scored for base, tuned and teacher (`gap_n` of them), with the teacher's
    mean there; None where the teacher is not scored on the metric (reference-based: it wrote the references)."""
    parts = ("faithfulness", "answer_relevancy") if metric == "ragas_score" else (metric,)
    if teacher is None:
        return {"teacher": None, "gap_closed": None, "gap_n": 0}
    others = set(_scored(tuned, qids, *parts)) & set(_scored(teacher, qids, *parts))
    common = [q for q in _scored(base, qids, *parts) if q in others]
    if not common:
        return {"teacher": None, "gap_closed": None, "gap_n": 0}

    def value(table: Table) -> float:
        if metric == "ragas_score":
            return ragas_score(_mean(table, common, "faithfulness"), _mean(table, common, "answer_relevancy"))
        return _mean(table, common, metric)

    teacher_mean = value(teacher)
    return {"teacher": teacher_mean, "gap_closed": gap_closed(value(base), value(tuned), teacher_mean), "gap_n": len(common)}


def timing_breakdown(timings: dict[str, Any], n_questions: int) -> dict[str, Any]:
    """Seconds per question per model, split into generation, judge and embeddings."""
    generation = timings.get("generation", {})
    per_model = {}
    for model, facts in generation.items():
        for mode, entry in facts.items():
            if isinstance(entry, dict) and entry.get("generated"):
                per_model[f"{model}/{mode}"] = round(entry["seconds"] / entry["generated"], 3)
    judge = timings.get("judge", {})
    scored = timings.get("llm_scored", 0)
    return {
        **timings,
        "generation_seconds_per_question": per_model,
        "judge_seconds_per_llm_scored_sample": round(judge.get("seconds", 0) / scored, 3) if scored else None,
        "questions": n_questions,
    }


def write_summary(run_dir: RunDir, summary: dict[str, Any]) -> None:
    write_json(run_dir.summary, summary, default=str)


# --- repeats of one config (seeds), pooled ------------------------------------------------------------------------

POOLED_METHOD = ("each question's score averaged over the runs, then the paired percentile bootstrap over questions; "
                 "better/worse only when that interval excludes 0 and every run's own delta has the same sign")


def pool_runs(run_dirs: list[RunDir]) -> dict[str, Any]:
    """Runs of one config that differ only in the training seed (same prep, same held-out questions), pooled per
    comparison vs the base: the spread of the runs' deltas, and one verdict from the seed-averaged scores."""
    summaries = [json.loads(r.summary.read_text(encoding="utf-8")) for r in run_dirs]
    first = summaries[0]
    boot = {"n_resamples": first["stats"]["n_resamples"], "confidence_level": first["stats"]["confidence_level"]}
    kinds = {m["name"]: m["kind"] for m in first["models"]}
    rows = []
    for mode, models in first.get("comparisons", {}).items():
        for model, metrics in models.items():
            if kinds.get(model) == "teacher":  # the same teacher answers in every run: nothing to pool
                continue
            for metric in metrics:
                per_run = [s.get("comparisons", {}).get(mode, {}).get(model, {}).get(metric) for s in summaries]
                if any(c is None for c in per_run):
                    continue
                pooled = _pooled_difference(run_dirs, summaries, mode, model, metric, first["stats"], boot)
                deltas = [c["delta"] for c in per_run]
                verdicts = [c["verdict"] for c in per_run]
                rows.append({"mode": mode, "model": model, "metric": metric, "deltas": deltas, "verdicts": verdicts,
                             "spread": spread(deltas), "pooled": pooled,
                             "verdict": pooled_verdict(pooled["verdict"], deltas, verdicts)})
    return {"runs": [str(r.root) for r in run_dirs], "method": POOLED_METHOD, "stats": {**boot, "seed": first["stats"]["seed"]},
            "comparisons": rows}


def _pooled_difference(run_dirs: list[RunDir], summaries: list[dict[str, Any]], mode: str, model: str, metric: str,
                       stats: dict[str, Any], boot: dict[str, Any]) -> dict[str, Any]:
    """The paired comparison on the questions every run scored for both models, each score averaged over runs."""
    parts = ("faithfulness", "answer_relevancy") if metric == "ragas_score" else (metric,)
    tables = [(load_scores(r.root / s["files"]["scores"][BASELINE][mode]), load_scores(r.root / s["files"]["scores"][model][mode]))
              for r, s in zip(run_dirs, summaries)]
    qids = list(tables[0][0])
    common = [q for q in qids if all(table.get(q, {}).get(p, {}).get("value") is not None
                                     for pair in tables for table in pair for p in parts)]

    def averaged(side: int, part: str) -> list[float]:
        return [sum(pair[side][q][part]["value"] for pair in tables) / len(tables) for q in common]

    options = {"seed": stats["seed"], "tie_tolerance": stats.get("tie_tolerance", 0.0), **boot}
    if metric == "ragas_score":
        entry = paired_ragas_score(*[averaged(side, p) for side in (0, 1) for p in parts], **options)
    else:
        entry = paired_difference(averaged(0, metric), averaged(1, metric), **options)
    return {**entry, "excluded": len(qids) - len(common)}


def pooled_verdict(pooled: str, deltas: list[float | None], verdicts: list[str]) -> str:
    """The pooled verdict, kept only when every run's delta points the same way; a 'better' (or 'worse') that some
    runs show and the others do not is named as what it is: not a result."""
    if pooled in ("better", "worse"):
        sign = 1 if pooled == "better" else -1
        if all(d is not None and d * sign > 0 for d in deltas):
            return f"{pooled} (every run)"
        return f"not a result: pooled {pooled}, but the runs' deltas disagree in sign"
    for word in ("better", "worse"):
        count = verdicts.count(word)
        if count:
            return f"{pooled}; '{word}' in {count} of {len(verdicts)} runs only: not a result"
    return pooled
