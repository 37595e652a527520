"""`accelerate launch [--config_file configs/accelerate/ddp.yaml] -m ragtune.train CONFIG [--set k=v ...]`.

The launcher's entry point: `ragtune train CONFIG` on every rank. Every rank trains; only rank 0 writes
adapter/, the loss curve and the stage record in manifest.json, so a later `ragtune run` skips train.
"""

import sys

from ragtune.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
