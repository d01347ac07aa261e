#!/usr/bin/env bash
# Install everything the tests need (venv, torch, requirements, Chromium) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
.venv/bin/ruff check .  # lint first: pyproject.toml [tool.ruff] (line length 120, pycodestyle, pyflakes, bugbear)
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests -q "$@"
