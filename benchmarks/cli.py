"""The `python -m benchmarks` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .gpu import DEADLINE
from .measure import load_average, machine_info
from .report import (
    ALL_MODES, MODES, machine_summary, write_reports,
)

DESCRIPTION = ("Benchmarks of the self-attention modes, of editing, and the GPU check: time and peak memory "
               "against N (each bench is described in benchmarks/__init__.py).")
COMMANDS = ("attention", "inversion", "edit", "report", "memory", "gpu", "fatezero")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=DESCRIPTION)
    parser.add_argument("bench", choices=COMMANDS,
                        help="what to run; `report` only re-renders --md/--plot from the rows of --json; `memory` "
                             "measures stem.memory's constants; `gpu` is the whole GPU check (scripts/gpu_check.sh); "
                             "`fatezero` is the FateZero memory bench, with options of its own "
                             "(python -m benchmarks fatezero --help)")
    parser.add_argument("--frames", default=None, help="comma-separated N (default: 4,8,16; edit: 16)")
    parser.add_argument("--modes", default=None, help="comma-separated modes (default: ddim,inflated,stem,stem-naive "
                        "for attention; ddim,stem,inflated for inversion)")
    parser.add_argument(
        "--editors",
        default="tokenflow",
        help="edit: comma-separated editors compared with 3N per-frame "
        "UNet evaluations, tokenflow and/or fatezero (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="edit: TokenFlow frames per keyframe (default: %(default)s)"
    )
    parser.add_argument(
        "--tokens", type=int, default=4096, help="attention: tokens per frame (default: %(default)s, a 64x64 latent)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="inversion, edit: frame side in pixels (default: 256 on cpu, 512 on cuda)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls; the median is reported (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--bases", type=int, default=256, help="STEM: K (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=5, help="STEM: R (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="merge the rows into this JSON file")
    parser.add_argument(
        "--md", type=Path, default=None, help="write the JSON file's rows as a markdown page (needs --json)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of seconds and peak memory against N")
    parser.add_argument("--unet", default="sd15", choices=("sd15", "tiny"), help=argparse.SUPPRESS)  # tests
    gpu = parser.add_argument_group("gpu")
    gpu.add_argument(
        "--out", type=Path, default=Path("assets"), help="gpu: folder of bench-gpu.{json,md,png} (default: %(default)s)"
    )
    gpu.add_argument("--dry", action="store_true", help="gpu: the tiny dry run on the CPU (seconds)")
    gpu.add_argument("--sections", default=None, help="gpu: comma-separated sections (default: all, in order)")
    gpu.add_argument(
        "--deadline", type=float, default=None, help=f"gpu: seconds for the whole check (default: {DEADLINE})"
    )
    gpu.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                     help="gpu: each section in its own process (default: yes, except --dry)")
    gpu.add_argument("--section", default=None, help=argparse.SUPPRESS)  # the orchestrator's child processes
    gpu.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    gpu.add_argument("--status-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.frames = [int(n) for n in (args.frames or ("16" if args.bench == "edit" else "4,8,16")).split(",") if n]
    args.modes = args.modes.split(",") if args.modes else list(MODES.get(args.bench, ()))
    args.editors = [e for e in args.editors.split(",") if e]
    unknown = set(args.modes) - set(ALL_MODES) | set(args.editors) - {"tokenflow", "fatezero"}
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_MODES)}")
    if args.bench == "fatezero":
        parser.error("fatezero takes options of its own; put it first: python -m benchmarks fatezero [options]")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.md and not args.json:
        parser.error("--md writes the rows of the --json file; pass --json too")
    if args.bench == "report" and not (args.json and args.json.exists()):
        parser.error("report reads the rows of an existing --json file")
    if args.sections:
        from .gpu import SECTIONS

        args.sections = args.sections.split(",")
        if set(args.sections) - set(SECTIONS):
            parser.error(f"unknown section(s); choose from {', '.join(SECTIONS)}")
    if args.size is None:
        args.size = 512 if args.device == "cuda" else 256
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fatezero"]:  # its own rows and options (steps, chunk size); see fatezero.py
        from .fatezero import main as fatezero_main

        return fatezero_main(argv[1:])
    args = parse_args(argv)
    if args.bench == "gpu":
        return gpu_main(args)
    if args.bench == "memory":
        from .calibrate import calibrate

        print(json.dumps(calibrate(args.device), indent=1))
        return 0
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    machine = machine_summary(machine_info())

    def report(row):
        row.update(device=args.device, dtype=args.dtype, repeats=args.repeats, loadavg=load_average(), machine=machine)
        rows.append(row)
        shape = f"tokens={row['tokens']}" if "tokens" in row else f"size={row['size']}"
        print(f"{row['bench']} {row['mode']:>10} N={row['frames']:<3} {shape}: {row['seconds']:.3f} s, "
              f"peak +{row['peak_mb']:.0f} MiB", flush=True)

    common = dict(
        frames=args.frames, device=device, dtype=dtype, repeats=args.repeats, warmup=args.warmup, report=report
    )
    if args.bench == "attention":
        from .benches import bench_attention

        bench_attention(args.modes, tokens=args.tokens, num_bases=args.bases, num_iters=args.iters, **common)
    elif args.bench == "inversion":
        from .benches import bench_inversion

        bench_inversion(
            args.modes, size=args.size, unet_kind=args.unet, num_bases=args.bases, num_iters=args.iters, **common
        )
    elif args.bench == "edit":
        from .benches import bench_edit

        bench_edit(args.editors, size=args.size, batch_size=args.batch_size, unet_kind=args.unet, **common)
    write_reports(rows, args.json, args.md, args.plot, reread=args.bench == "report")
    return 0


def gpu_main(args) -> int:
    from .gpu import CheckConfig, run_check, section_main

    if args.section:  # a child of the orchestrator
        cfg = CheckConfig(out=args.out, cache_dir=args.cache_dir, dry=args.dry)
        return section_main(args.section, cfg, args.status_file)
    return run_check(args.out, dry=args.dry, sections=args.sections, isolate=args.isolate,
                     deadline=args.deadline if args.deadline is not None else DEADLINE)
