#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment at .venv with the pinned JAX stack,
# the PyTorch reference extra (CPU torch 2.13.0; see setup.py) and pytest. Idempotent: it
# reinstalls only when setup.py changed. Needs Python 3.11 and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 required, found {sys.version.split()[0]}"'
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
STAMP=.venv/.mobileclip2_jax-setup.sha
WANT="$(sha256sum setup.py | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing mobileclip2_jax[torch,test] (pinned; first run takes a few minutes)"
  .venv/bin/pip install --disable-pip-version-check -q -e '.[torch,test]'
  .venv/bin/python -c 'import torch; v = torch.__version__; assert v.endswith("+cpu"), f"expected the CPU torch wheel, got {v}"'
  echo "$WANT" > "$STAMP"
fi
