#!/usr/bin/env bash
# The one-command GPU check: the gpu-marked tests, the attention/inversion benches at 512 px fp16,
# whole 48-frame STEM and DDIM inversions, a 48-frame TokenFlow edit (see benchmarks/gpu.py).
# Writes OUTDIR/bench-gpu.json (after every row), .md and .png; prints a summary table at the end.
# Usage: bash scripts/gpu_check.sh [--dry] [OUTDIR] [more options of `python -m benchmarks gpu`]
#   OUTDIR defaults to assets; --dry runs it on the CPU with the tiny model in seconds.
# Wheels of packages the machine lacks (diffusers, greenlet, ...) may be carried in .whl/ at the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; fi
PYTHON=${PYTHON:-python3}
DRY=()
if [ "${1:-}" = "--dry" ]; then DRY=(--dry); shift; fi
OUTDIR=${1:-assets}
[ $# -gt 0 ] && shift
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PYTHON" -m benchmarks gpu --out "$OUTDIR" "${DRY[@]}" "$@"
