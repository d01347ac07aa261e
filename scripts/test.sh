#!/usr/bin/env bash
# Install everything the tests need (venv, torch, requirements, Chromium) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests -q "$@"
