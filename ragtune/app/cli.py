"""The `ragtune` command: one sub-command per stage, plus `run` (all stages), `validate` and `serve`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ragtune.app.config import ConfigError, RagtuneConfig, load_config
from ragtune.app.pipeline import STAGES, RunOptions, plan, run_one, run_pipeline, stage_named
from ragtune.core.lock import RunLock
from ragtune.core.errors import UserFacingError
from ragtune.core.run_dir import RunDir

log = logging.getLogger("ragtune")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config for the domain (see configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.num_train_epochs=1 (repeatable)")


def _count(text: str) -> int:
    """argparse type of a count (--repeats, --trials, --max-length): a whole number of at least 1, so `--repeats 0`
    is refused at once instead of running nothing, or everything once, without a word."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragtune",
        description="Fine-tune a small open student on a teacher's RAG answers, then score it against its base with Ragas.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_stage_commands(sub)
    _add_file_commands(sub)
    _add_serve_command(sub)
    return parser


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """`run`, `sweep` and one command per stage."""
    p = sub.add_parser("run", help="all stages: prep → train → merge → eval → report (skips up-to-date stages)")
    _add_config(p)
    p.add_argument("--from", dest="start", choices=STAGES, help="rerun from this stage on")
    p.add_argument("--only", choices=STAGES,
                   help="just this stage: resumed when interrupted, skipped when up to date (with --force: rerun)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if up to date")
    p.add_argument("--dry-run", action="store_true", help="validate everything checkable without running; print the plan")
    p.add_argument("--repeats", type=_count, default=1, metavar="N",
                   help="train and evaluate with N seeds (train.seed, +1 each) on the same prep, in output_dir/repeats/; "
                        "the report pools them")

    p = sub.add_parser("sweep", help="Optuna search over the config's `sweep:` train.* keys, one run folder per trial")
    _add_config(p)
    p.add_argument("--trials", type=_count, metavar="N",
                   help="complete trials the study should hold (default sweep.n_trials); a rerun continues the study")

    p = sub.add_parser("prep", help="documents → chunks + index → questions → teacher answers (data/)")
    _add_config(p)
    p = sub.add_parser("train", help="SFT the student on data/train.jsonl (LoRA/QLoRA/DoRA/full/prompt tuning)")
    _add_config(p)
    p.add_argument("--check", action="store_true", help="only run the label check (which tokens are trained) and exit")
    p = sub.add_parser("merge", help="merge adapter/ into a 16-bit/fp32 copy of the base (merged/) and verify it")
    _add_config(p)
    p = sub.add_parser("eval", help="answer held-out questions with base/adapters/merged/teacher; score with Ragas")
    _add_config(p)
    p.add_argument("--adapters", nargs="*", type=Path, default=[], metavar="DIR", help="extra adapter folders to compare")
    p.add_argument("--questions", type=Path, metavar="FILE",
                   help='your golden set instead of prep\'s held-out questions (sets eval.questions_file): one '
                        '{"question", "reference"?, "contexts"?, "id"?} per line')


def _add_file_commands(sub: argparse._SubParsersAction) -> None:
    """Commands over files a run (or the user) made: `report`, `validate`, `gates`."""
    p = sub.add_parser("report", help="build report.html/report.md from saved eval files (no model is loaded)")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="where to write the comparison report (default: the first run dir)")
    p.add_argument("--config", type=Path, help="price the cost and benefit section with this config's "
                   "teacher.price_per_million_* and cost.* (default: the config each run recorded in manifest.json)")

    p = sub.add_parser("validate", help="check a chat-format training JSONL and print its token statistics; "
                       "exit 1 when rows are longer than max_length, 2 when a row is malformed")
    p.add_argument("file", type=Path, metavar="FILE.jsonl")
    p.add_argument("--config", type=Path, help="take tokenizer, max_length, epochs and prices from this config")
    p.add_argument("--tokenizer", help="model reference whose tokenizer counts tokens")
    p.add_argument("--max-length", type=_count, help="flag rows longer than this many tokens")

    p = sub.add_parser("gates", help="run the answer gates over answers you labelled (good/bad/...): what they keep of "
                       "your teacher, the grounding score's AUROC and the min_grounding that keeps 90%%/95%% of good")
    p.add_argument("file", type=Path, metavar="FILE.jsonl",
                   help='one {"question", "contexts": [...], "answer", "label", "finish_reason"?} per line')
    p.add_argument("--config", type=Path, help="use this config's data_prep.answer_gates (default: ragtune's defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data_prep.answer_gates.measure=bigram (repeatable)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    """`serve`: an OpenAI-compatible server over the tuned student."""
    p = sub.add_parser("serve", help="OpenAI-compatible /v1/chat/completions server over a model or model+adapter")
    p.add_argument("--config", type=Path, help="serve this run's merged/ model (or student + adapter/)")
    p.add_argument("--model", help="model reference (hub id, folder, .gguf, smollm2-135m-instruct)")
    p.add_argument("--adapter", help="PEFT adapter folder to apply on the model")
    p.add_argument("--rag", action="store_true",
                   help="answer the last user message from the run's index with the prompt the student was trained "
                        "on (needs --config); the response lists the chunks used in `retrieved`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=8, help="requests generated together")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens when a request gives none")
    p.add_argument("--served-model-name", help="the `model` name clients send (default: the model reference)")
    p.add_argument("--torch-dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    from ragtune.app.serve import MAX_QUEUE, MAX_REQUEST_BYTES, REQUEST_TIMEOUT, STEP_TOKENS

    p.add_argument("--step-tokens", type=int, default=STEP_TOKENS,
                   help="new tokens per request per scheduling round: a short request waits at most one round")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests queued or running; one more gets 503")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                   help="seconds a request may take; past it, generation stops and the answer is 504")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help="largest request body; a larger one gets 413 before it is parsed")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (401 otherwise); prefer the "
                                     "RAGTUNE_SERVE_API_KEY environment variable, which `ps` does not show")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbosity == 0:
        import warnings

        # on an avx512_bf16 CPU bitsandbytes tries the hub's kernels-community 4-bit kernel at import and warns when it
        # cannot (offline, or `kernels` not installed), then uses its own: nothing for the user to do. `kernels` >= 0.19
        # also warns, offline, that it skips the publisher trust check of the kernel it then does not load
        for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
            logging.getLogger(name).setLevel(logging.ERROR)

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        try:
            import transformers

            transformers.logging.set_verbosity_error()
        except ImportError:
            pass


def print_verdict(run_dir: RunDir) -> None:
    if not run_dir.summary.exists():
        return
    from ragtune.eval.report import verdict_table

    print(verdict_table(json.loads(run_dir.summary.read_text(encoding="utf-8"))))
    print(f"\nreport: {run_dir.report_html}")


def main(argv: list[str] | None = None) -> int:
    """argv → the command's function → the stage. Every error a user can fix is one line and exit code 2."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    command = {"run": _run, "prep": _stage, "train": _stage, "merge": _stage, "eval": _stage, "report": _report,
               "validate": _validate, "gates": _gates, "serve": _serve, "sweep": _sweep}[args.command]
    try:
        return command(args)
    except UserFacingError as err:
        print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows are saved; run the same command again to resume.", file=sys.stderr)
        return 130


def _options(args: argparse.Namespace) -> RunOptions:
    """`--from`, `--only`, `--force` of `ragtune run` (and sweep's defaults), with the preflight before any work."""
    from ragtune.app.dry_run import preflight

    return RunOptions(start=getattr(args, "start", None), only=getattr(args, "only", None),
                      force=getattr(args, "force", False), before_work=preflight)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    run_dir = RunDir(config.output_dir)
    if args.dry_run:
        from ragtune.app.dry_run import dry_run

        return dry_run(config, plan(config, run_dir, _options(args)))
    if args.repeats > 1:
        return _run_repeats(args, config)
    with _locked(config):  # one ragtune per run folder; a second one fails here, naming this one
        # preflight (seconds: it loads the student's tokenizer) runs under the lock, and only when a stage will run
        run_pipeline(config, _options(args))
    print_verdict(run_dir)
    return 0


def _run_repeats(args: argparse.Namespace, config: RagtuneConfig) -> int:
    """`ragtune run CONFIG --repeats N`: the run, N−1 more seeds on its prep, and the pooled verdicts."""
    from ragtune.app.repeats import REPEATS_DIR, pooled_report, pooled_table, run_repeats

    with _locked(config):
        runs = run_repeats(config, args.overrides, args.repeats, _options(args))
        if not all(run.summary.exists() for run in runs):
            print("[ragtune] repeats: no pooled report until every repeat is evaluated", flush=True)
            return 0
        written = pooled_report(runs, RunDir(config.output_dir).root / REPEATS_DIR)
    print(pooled_table(written["pooled"]))
    print(f"\npooled: {written['pooled_md']}\nreport: {written['report_html']}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """`ragtune sweep CONFIG --trials N`: prep once, then an Optuna study of trial run folders on it."""
    from ragtune.app.sweep import best_line, run_sweep

    config = load_config(args.config, args.overrides)
    with _locked(config):
        summary = run_sweep(config, args.overrides, args.trials, _options(args))
    print(summary["table"])
    print(f"\n{best_line(summary)}\nreport: {summary['report_html']}")
    return 0


@contextmanager
def _locked(config: RagtuneConfig) -> Iterator[None]:
    """`RunLock(output_dir)`, with a folder that cannot even be made (under a file, on /proc) reported in one line.
    A read-only folder is not locked (RunLock): an up-to-date run there still succeeds, as it writes nothing."""
    lock = RunLock(config.output_dir)
    try:
        lock.acquire()
    except OSError as err:
        raise ConfigError(f"output_dir: {config.output_dir} cannot be created ({err.strerror or err}). "
                          "Point `output_dir` at a folder you can write.") from None
    try:
        yield
    finally:
        lock.release()


def _stage(args: argparse.Namespace) -> int:
    """`ragtune prep|train|merge|eval CONFIG`: one stage, recorded in the manifest like `ragtune run` does."""
    overrides = list(args.overrides)
    if getattr(args, "questions", None):  # `eval --questions FILE` is `--set eval.questions_file=FILE`, JSON-quoted
        overrides.append(f"eval.questions_file={json.dumps(str(args.questions.resolve()))}")
    config = load_config(args.config, overrides)
    run_dir = RunDir(config.output_dir)
    name = args.command
    options = RunOptions(adapters=tuple(getattr(args, "adapters", None) or ()))
    from ragtune.app.dry_run import preflight

    unlocked = name == "train" and (args.check or os.environ.get("RANK", "0") != "0")
    if unlocked:
        # The label check only reads. Under torchrun/accelerate every rank trains and rank 0 alone locks the folder
        # and records the stage (accelerate's PartialState cannot tell before the Trainer joins the gloo group on
        # CPU: every rank would call itself main); every rank runs the preflight, so all stop on its error.
        preflight(config)
        from ragtune.train.sft import run

        run(config, run_dir, check_only=args.check)
        return 0
    with _locked(config):  # before the preflight: a second ragtune on this folder is refused at once
        if name in ("prep", "train"):
            preflight(config)
        facts = run_one(config, name, options)
        if name == "eval":
            stage_named("report").run(config, run_dir, options)
    if name == "train":
        print(json.dumps(facts, indent=2, default=str))
    if name == "eval":
        print_verdict(run_dir)
    return 0


def _report(args: argparse.Namespace) -> int:
    from ragtune.eval.report import break_even_line, prices_from, run

    prices = prices_from(load_config(args.config).resolved()) if args.config else None
    result = run(args.run_dirs, args.out, prices)
    print_verdict(RunDir(args.out or args.run_dirs[0]))
    if len(args.run_dirs) == 1:
        print(break_even_line(result["cost_benefit"]))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ragtune.core.chat_rows import validate_chat_jsonl

    tokenizer_ref, max_length, epochs, prices = args.tokenizer, args.max_length, 1.0, None
    if args.config:
        config = load_config(args.config)
        tokenizer_ref = tokenizer_ref or config.student.model
        from ragtune.train.data_stats import sft_setting

        max_length = max_length or sft_setting(config, "max_length")
        epochs = float(sft_setting(config, "num_train_epochs"))
        if config.teacher.price_per_million_input_tokens is not None:
            prices = (config.teacher.price_per_million_input_tokens, config.teacher.price_per_million_output_tokens or 0.0)
    tokenizer = None
    if tokenizer_ref:
        from ragtune.core.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_ref)
    stats = validate_chat_jsonl(args.file, tokenizer=tokenizer, max_length=max_length, epochs=epochs, prices=prices)
    print(json.dumps(stats, indent=2))
    if stats.get("rows_over_max_length"):  # SFTTrainer would cut these rows' ends: the answers it should teach
        lines = ", ".join(map(str, stats["lines_over_max_length"]))
        print(f"error: {args.file}: {stats['rows_over_max_length']} row(s) longer than max_length {max_length} tokens "
              f"(lines {lines}{', ...' if stats['rows_over_max_length'] > len(stats['lines_over_max_length']) else ''}); "
              "training would cut off their answers. Shorten those rows or raise train.max_length (--max-length).",
              file=sys.stderr)
        return 1
    return 0


def _gates(args: argparse.Namespace) -> int:
    from ragtune.app.calibrate import calibrate, read_labelled, render
    from ragtune.app.config import answer_gates_from_overrides

    gates = (load_config(args.config, args.overrides).data_prep.answer_gates if args.config
             else answer_gates_from_overrides(args.overrides))
    report = calibrate(read_labelled(args.file), gates)
    print(json.dumps(report) if args.json else render(report, args.file))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ragtune.core.llm import HFChatBackend
    from ragtune.app.serve import serve

    model, adapter, rag = args.model, args.adapter, None
    if args.rag and not args.config:
        print("error: --rag retrieves from a run's index: pass --config CONFIG too.", file=sys.stderr)
        return 2
    if args.config:
        config = load_config(args.config)
        run_dir = RunDir(config.output_dir)
        if model is None and run_dir.merged.exists():
            model = str(run_dir.merged)
        elif model is None:
            model = config.student.model
            adapter = adapter or (str(run_dir.adapter) if run_dir.adapter.exists() else None)
        if args.rag:
            from ragtune.app.serve import RagPrompt

            rag = RagPrompt.for_run(config)  # before the model loads: a run without an index fails at once
    if model is None:
        print("error: pass --model REF (or --config CONFIG to serve that run's model).", file=sys.stderr)
        return 2
    backend = HFChatBackend(model, adapter=adapter, batch_size=args.batch_size, torch_dtype=args.torch_dtype,
                            max_new_tokens=args.max_tokens)
    serve(backend, host=args.host, port=args.port, served_model_name=args.served_model_name or model,
          batch_size=args.batch_size, default_max_tokens=args.max_tokens, step_tokens=args.step_tokens,
          max_queue=args.max_queue, request_timeout=args.request_timeout, rag=rag,
          api_key=args.api_key or os.environ.get("RAGTUNE_SERVE_API_KEY") or None,
          max_request_bytes=args.max_request_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
