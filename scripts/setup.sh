#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv in .venv with torch and the project installed.
# On a CPU machine torch==2.13.0 is installed first (a local wheel on the project machines);
# an existing torch (e.g. a CUDA build >= 2.6 in the python used to create the venv) is kept.
set -euo pipefail
case "${1:-}" in
  "") ;;
  -h|--help)
    echo "usage: bash scripts/setup.sh   (PYTHON=python3.11 to choose the interpreter; takes no arguments)"
    echo "Creates .venv (keeping an existing torch), installs torch==2.13.0 if none, then this project with [dev,examples]."
    exit 0 ;;
  *) echo "scripts/setup.sh: unexpected argument '$1' (see --help)" >&2; exit 2 ;;
esac
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
