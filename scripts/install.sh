#!/usr/bin/env bash
# Create .venv and install the project: torch first (so pip does not pick another build), then the rest.
# Usage: bash scripts/install.sh [--dev]    (--dev adds the test tools and Chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# Keep an existing torch (e.g. a CUDA build); otherwise install the pinned one.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  python -m pip install --quiet -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
python -c "import torch, diffusers, gradio; print(f'installed: torch {torch.__version__}, diffusers {diffusers.__version__}, gradio {gradio.__version__}')"
