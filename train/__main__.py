"""`accelerate launch [--config_file configs/accelerate/ddp.yaml] -m train CONFIG [--set k=v ...]`.

The multi-process entry point for the train stage (`ragtune train` runs the same `train.sft.run` in one
process). Every rank trains; only the main process writes adapter/, the loss curve and the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ragtune.config import ConfigError, load_config
from ragtune.run_dir import Manifest, RunDir
from train import sft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="ragtune YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.num_train_epochs=1")
    parser.add_argument("--check", action="store_true", help="only run the label check")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    run_dir = RunDir(config.output_dir)
    # The launcher's global rank (torchrun/accelerate set RANK). accelerate's PartialState cannot tell before the
    # Trainer joins the gloo group on CPU: there every rank would call itself main and race on the manifest.
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        if args.check or not is_main:
            facts = sft.run(config, run_dir, check_only=args.check)
        else:
            manifest = Manifest(run_dir)
            with manifest.timed_stage("train") as stage_facts:
                facts = sft.run(config, run_dir)
                stage_facts.update(facts)
    except (sft.TrainDataError, sft.LabelCheckError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if is_main:
        print(json.dumps(facts, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
