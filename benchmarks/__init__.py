"""Benchmarks of the self-attention modes, of editing, and the GPU check: time and peak memory against N.

    python -m benchmarks attention --frames 4,8,16 --tokens 4096 --json bench.json --plot bench.png
    python -m benchmarks inversion --frames 4,8,16 --size 256 --json bench.json --md bench.md
    python -m benchmarks edit --frames 16 --size 256 --repeats 1 --json bench.json   # --editors tokenflow,fatezero
    python -m benchmarks fatezero --frames 4,8,16 --steps 2,4 --json fz.json         # FateZero memory (fatezero.py)
    python -m benchmarks gpu [--out assets] [--dry]                                   # scripts/gpu_check.sh
    python -m benchmarks memory [--device cuda]                                       # stem.memory's constants

A folder of the repository beside the library, not part of the `stem` package (nor of its wheel):
run it from the repository root, where `python -m` finds both `benchmarks` and `stem`.

`attention`: one self-attention layer at SD-1.5's highest resolution, a diffusers
`Attention(query_dim=320, heads=8, dim_head=40)` with random weights, on (N, tokens, 320) hidden
states, for the modes ddim, inflated, stem and stem-naive (the reference in `modes.py`).
`inversion`: one inversion step, i.e. one UNet call over all N frames with the mode's processors,
of SD-1.5's UNet architecture with random weights (same cost as the real model).
`edit`: one editing step (TokenFlow: keyframe pass and propagation, through `stem.editing.tokenflow.edit_latents`
on a one-step schedule) against 3·N plain per-frame UNet evaluations (mode "ddim") at the same size.
`fatezero`: a whole FateZero edit's peak memory against N and the steps T (`fatezero.py`).
`gpu`: the one-command GPU check (`gpu.py`).

Every row: {"bench", "mode", "frames", "tokens" | "size", "seconds", "peak_mb", "device", "dtype", ...}
with `seconds` the median over --repeats timed calls after --warmup untimed ones, and `peak_mb` the
peak memory of a call above the baseline just before it (see PEAK_MEMORY). The timed calls of the
modes are interleaved, so a change in the machine's load hits every mode alike. --json merges the
rows into the file (a row replaces one with the same bench/mode/N/shape/device/dtype), so separate
runs (fast modes with more repeats, inflated with one) build one table.

On a GPU: `--device cuda --dtype float16` (CUDA is synchronised around each timed call; memory is
torch.cuda.max_memory_allocated above the allocation before the call).
"""

from .benches import EDITORS, bench_attention, bench_edit, bench_inversion
from .cli import main, parse_args
from .measure import PEAK_MEMORY, PeakMemory, machine_info, measure
from .models import attention_layer, sd15_parts, sd15_unet
from .modes import NaiveStemAttnProcessor, install, processor, using_processor
from .report import ALL_MODES, BENCHES, MODES, markdown_document, markdown_table, merge_rows, plot

__all__ = [
    "EDITORS", "bench_attention", "bench_edit", "bench_inversion", "main", "parse_args", "PEAK_MEMORY", "PeakMemory",
    "machine_info", "measure", "attention_layer", "sd15_parts", "sd15_unet", "NaiveStemAttnProcessor", "install",
    "processor", "using_processor", "ALL_MODES", "BENCHES", "MODES", "markdown_document", "markdown_table",
    "merge_rows", "plot",
]
