"""Benchmark: peak memory of a FateZero edit against the number of frames N and of steps T.

    python -m benchmarks fatezero --frames 4,8,16 --steps 2,4 --size 128 --json out.json --md out.md --plot out.png
    python -m benchmarks fatezero --device cuda --dtype float16 --size 512 --frames 8,16,32,48 \
        --steps 10,50 --json gpu.json

One row per (mode, N, T): a whole FateZero edit (`stem.editing.fatezero.edit_latents`, T denoising
steps over N frames, the three-group batch, with blend words so that the self-attention mask pass
and the latent blending run too) of SD-1.5's UNet architecture with random weights on a random
trajectory (what the cache would hold; it lives on the CPU, as a cached one does). `mode` is the
inversion method the edit fuses under (stem: in the space of the K bases; ddim: per-frame maps).
FateZero keeps every step's attention maps (100 GB of host RAM for 8 frames at 50 steps); here
nothing is kept per step, so `peak_mb` should not change with T and should grow linearly with N.

Row: {"bench": "fatezero-memory", "mode", "frames", "size", "steps", "seconds", "peak_mb", "device",
"dtype", ...}: `seconds` the wall time of the edit (one run), `peak_mb` its peak memory above the level
just before it (see `benchmarks.measure.PEAK_MEMORY`). --json merges rows into the file.

On the CPU, glibc's mmap threshold is fixed at 1 MiB first (`mallopt`), so that a freed activation
buffer leaves the resident set. With glibc's default, dynamic threshold, freed buffers stay on the heap
and a row's resident peak depends on what the rows before it left there (measured: N = 2, T = 4 right
after N = 8 read 379 MiB, N = 2, T = 2 246 MiB; with the fixed threshold T = 2 and 6 read alike).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
from pathlib import Path

import torch

from stem.report import Column, read_doc, save_figure
from stem.report import markdown_table as columns_table
from stem.report import merge_rows as merged

from .measure import PEAK_MEMORY, machine_info, measure
from .report import machine_summary, write_reports

BENCH = "fatezero-memory"
MODES = ("stem", "ddim", "inflated")
SOURCE_PROMPT = "a silver jeep driving down a curvy road in the countryside"   # FateZero's teaser
TARGET_PROMPT = "a porsche car driving down a curvy road in the countryside"
BLEND_WORDS = "jeep,car"
MMAP_THRESHOLD = 1 << 20  # bytes; glibc's M_MMAP_THRESHOLD is mallopt parameter -3
PUBLISHED = ("FateZero (its docs/EditingGuidance.md): 8 frames, 50 steps, 512 px, fp16 on an RTX 3090: "
             "100 GB host RAM, 12 GB GPU")


def model_parts(device: torch.device, dtype: torch.dtype, unet_kind: str):
    """SD-1.5's UNet with random weights (or the tiny one, for tests), a DDIM scheduler and a tokenizer."""
    from .models import unet_only_parts

    return unet_only_parts(unet_kind, device, dtype, f"{unet_kind}-random")


def fix_mmap_threshold() -> bool:
    """Make glibc serve every allocation of MMAP_THRESHOLD bytes or more by mmap (returned to the OS on free)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def run_edit(parts, mode: str, frames: int, size: int, steps: int, chunk_size: int | None, seed: int = 0):
    """One FateZero edit of `frames` random latents over `steps` steps; returns (seconds, peak MiB, memory method)."""
    from stem.attention import AttentionState
    from stem.editing.common import NUM_GROUPS
    from stem.editing.fatezero import FateZeroSettings, edit_latents
    from stem.inversion import ddim_schedule

    generator = torch.Generator().manual_seed(seed)
    side = size // 8
    trajectory = torch.randn(steps + 1, frames, parts.unet.config.in_channels, side, side, generator=generator)
    text = torch.randn(NUM_GROUPS, 77, parts.unet.config.cross_attention_dim, generator=generator)
    text = text.to(device=parts.device, dtype=parts.dtype)
    timesteps, alphas = ddim_schedule(parts.scheduler, steps)
    edit = FateZeroSettings(TARGET_PROMPT, source_prompt=SOURCE_PROMPT, blend_words=BLEND_WORDS).validate()
    attention = AttentionState(method=mode, num_groups=NUM_GROUPS)
    with torch.inference_mode():
        return measure(
            {
                mode: (
                    contextlib.nullcontext,
                    lambda: edit_latents(parts, trajectory, timesteps, alphas, text, edit, attention, chunk_size),
                )
            },
            parts.device,
            repeats=1,
            warmup=0,
        )[mode]


def _key(row: dict) -> tuple:
    return row["mode"], row["frames"], row["size"], row["steps"], row["device"], row["dtype"], row.get("chunk_size")


def merge_rows(path: Path, rows: list[dict]) -> dict:
    """The rows of `path` (if any) updated with `rows`, sorted; the document to write back."""
    ordered = merged(read_doc(path)["rows"], rows, _key,
                     lambda r: (r["device"], r["dtype"], MODES.index(r["mode"]), r["size"], r["steps"], r["frames"]))
    return {"machine": machine_info(), "bench": BENCH, "seconds": "wall time of one whole edit",
            "peak_mb": PEAK_MEMORY, "published": PUBLISHED, "rows": ordered}


COLUMNS = [
    Column("mode", lambda r: r["mode"]), Column("N", lambda r: r["frames"], right=True),
    Column("px", lambda r: r["size"], right=True), Column("T", lambda r: r["steps"], right=True),
    Column("peak MiB", lambda r: f"{r['peak_mb']:.0f}", right=True),
    Column("seconds", lambda r: f"{r['seconds']:.1f}", right=True),
    Column("s / step", lambda r: f"{r['seconds'] / r['steps']:.1f}", right=True),
    Column("device", lambda r: r["device"]), Column("dtype", lambda r: r["dtype"]),
]


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, with the time per step."""
    return columns_table(COLUMNS, rows)


def markdown_document(doc: dict) -> str:
    return "\n".join([
        "# Benchmark: peak memory of a FateZero edit against frames N and steps T", "",
        f"Machine: {machine_summary(doc['machine'])}.", "",
        "SD-1.5 UNet architecture, random weights, random trajectory, blend words (mask pass and latent blending on), "
        "no UNet chunking. On the CPU glibc's mmap threshold is fixed at 1 MiB, so freed activation buffers leave "
        "the resident set (see `benchmarks/fatezero.py`).", "",
        f"`seconds`: {doc['seconds']}. `peak MiB`: {doc['peak_mb']}", "",
        markdown_table(doc["rows"]), "",
        f"For comparison, {doc['published']}.", "",
    ])


def plot(rows: list[dict], path: Path) -> None:
    """Peak memory and seconds per step against N, one line per (mode, T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in MODES:
        for steps in sorted({r["steps"] for r in rows if r["mode"] == mode}):
            line = sorted((r["frames"], r["peak_mb"], r["seconds"] / r["steps"]) for r in rows
                          if r["mode"] == mode and r["steps"] == steps)
            n, peak, per_step = zip(*line)
            ax_mem.plot(n, peak, marker="o", label=f"{mode}, T = {steps}")
            ax_time.plot(n, per_step, marker="o", label=f"{mode}, T = {steps}")
    where = f"{rows[0]['device']} {rows[0]['dtype']}, {rows[0]['size']} px"
    ax_mem.set(title=f"FateZero edit: peak memory ({where})", xlabel="frames N", ylabel="MiB above baseline")
    ax_time.set(title="FateZero edit: time per step", xlabel="frames N", ylabel="seconds / step")
    for ax in (ax_mem, ax_time):
        ax.set_xticks(sorted({r["frames"] for r in rows}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks fatezero", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="4,8,16", help="comma-separated N (default: %(default)s)")
    parser.add_argument("--steps", default="2,4", help="comma-separated T (default: %(default)s)")
    parser.add_argument(
        "--modes",
        default="stem",
        help=f"comma-separated inversion methods of {', '.join(MODES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--size", type=int, default=None, help="frame side in pixels (default: 128 on cpu, 512 on cuda)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--chunk-size", type=int, default=None, help="frames per UNet call (default: all at once)")
    parser.add_argument("--json", type=Path, default=None, help="merge the rows into this JSON file")
    parser.add_argument(
        "--md", type=Path, default=None, help="write the JSON file's rows as a markdown page (needs --json)"
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="write a PNG of peak memory and time per step against N"
    )
    parser.add_argument(
        "--report", action="store_true", help="run nothing: re-render --md/--plot from the rows of --json"
    )
    parser.add_argument("--unet", default="sd15", choices=("sd15", "tiny"), help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    args.frames = [int(n) for n in args.frames.split(",") if n]
    args.steps = [int(t) for t in args.steps.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(MODES):
        parser.error(
            f"unknown mode(s) {', '.join(sorted(set(args.modes) - set(MODES)))}; choose from {', '.join(MODES)}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.md and not args.json:
        parser.error("--md writes the rows of the --json file; pass --json too")
    if args.report and not (args.json and args.json.exists()):
        parser.error("--report reads the rows of an existing --json file")
    if args.size is None:
        args.size = 512 if args.device == "cuda" else 128
    return args


def measure_rows(args) -> list[dict]:
    """One row per (mode, T, N) of the parsed arguments, printed as they come."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    allocator = None  # what the CPU's resident-set figures depend on
    if device.type == "cpu":
        allocator = f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB" if fix_mmap_threshold() else "allocator default"
    parts = model_parts(device, dtype, args.unet)
    rows = []
    for mode in args.modes:
        run_edit(parts, mode, 1, args.size, 1, args.chunk_size)  # warm-up: one-time allocations are not the edit's
        for steps in args.steps:
            for frames in args.frames:
                seconds, peak, how = run_edit(parts, mode, frames, args.size, steps, args.chunk_size)
                rows.append({"bench": BENCH, "mode": mode, "frames": frames, "size": args.size, "steps": steps,
                             "seconds": seconds, "peak_mb": peak, "device": args.device, "dtype": args.dtype,
                             "memory": how, "allocator": allocator, "chunk_size": args.chunk_size,
                             "blend_words": BLEND_WORDS})
                print(f"{BENCH} {mode} N={frames:<3} T={steps:<3} {args.size} px: {seconds:.1f} s, "
                      f"peak +{peak:.0f} MiB", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = [] if args.report else measure_rows(args)
    write_reports(rows, args.json, args.md, args.plot, args.report, merge=merge_rows, table=markdown_table,
                  document=markdown_document, draw=plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
