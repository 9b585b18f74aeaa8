#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv in .venv with torch and the project installed.
# On a CPU machine torch==2.13.0 is installed first (a local wheel on the project machines);
# an existing torch (e.g. a CUDA build >= 2.6 in the python used to create the venv) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==2.13.0"
fi
"$VPY" -m pip install -q -e ".[dev,examples]"
echo "setup done: $("$VPY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
