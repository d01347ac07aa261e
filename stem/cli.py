"""`python -m stem ...`: invert, compare and edit videos from the command line.

Every bad input ends in one sentence on stderr and a non-zero exit (a traceback only with
--debug). The output folder is checked before the model loads; a run writes its outputs into a
staging folder and moves them into place together at the end, so a failed run leaves the output
folder as it was (and the next run removes what a killed one left).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
import weakref
from pathlib import Path

from .errors import StemError
from .files import atomic_output, check_output_folder, output_lock, remove_dead_stages, staged_outputs

EXIT_ERROR = 2


# -- shared options ---------------------------------------------------------------------------

def whole_number(text: str) -> int:
    """argparse type of a count or seed: '3' and '3.0' are 3; '1.5' is refused, never truncated to 1."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():  # also NaN and inf
        raise argparse.ArgumentTypeError(f"must be a whole number such as 2, got {text!r}")
    return int(value)


def option_adder(parser, overrides: dict[str, dict] | None = None):
    """`parser.add_argument`, with `overrides[dest]` (help, metavar, default, ...) merged into that option's keywords.

    `add.check()` raises if an override named no option that was added.
    """
    overrides, used = overrides or {}, set()

    def add(*flags, **kwargs):
        long = [f for f in flags if f.startswith("--")]
        dest = kwargs.get("dest") or (long or flags)[0].lstrip("-").replace("-", "_")  # argparse's rule
        used.add(dest)
        return parser.add_argument(*flags, **{**kwargs, **overrides.get(dest, {})})

    def check():
        unused = set(overrides) - used
        if unused:
            raise ValueError(f"overrides for options that do not exist here: {', '.join(sorted(unused))}")

    add.check = check
    return add


def add_inversion_options(parser: argparse.ArgumentParser, prompt_flags=("--prompt",),
                          seed_help="seed of the EM initialisation", overrides: dict[str, dict] | None = None) -> None:
    """Options that define an inversion job (they are its cache key); `overrides` rewords some by dest."""
    from .engine import InversionSettings
    from .models import DEFAULT_MODEL

    d = InversionSettings()
    add = option_adder(parser, overrides)
    add("video", help="video file (mp4/webm/mov/gif) or folder of frames")
    add("--model", default=os.environ.get("STEM_MODEL", DEFAULT_MODEL),
        help=f"diffusers SD 1.x/2.x hub id or local folder, or tiny-random (default: $STEM_MODEL or {DEFAULT_MODEL})")
    add("--method", default=d.method, help="self-attention during inversion: stem, ddim or inflated (default: %(default)s)")
    add("--frames", type=whole_number, default=None, help=f"number of frames to use (default: all, at most {d.max_frames})")
    add("--stride", type=whole_number, default=d.stride, help="use every S-th frame (default: %(default)s)")
    add("--size", type=whole_number, default=d.size, help="pixels on the long side, rounded to multiples of 8 (default: %(default)s)")
    add("--steps", type=whole_number, default=d.num_steps, help="DDIM steps (default: %(default)s)")
    add("--bases", type=whole_number, default=d.num_bases, help="STEM: K bases per layer (default: %(default)s)")
    add("--iters", type=whole_number, default=d.num_iters, help="STEM: R EM iterations (default: %(default)s)")
    add(*prompt_flags, dest="source_prompt", default="", help="text describing the video; conditions the inversion")
    add("--seed", type=whole_number, default=d.seed, help=seed_help + " (default: %(default)s)")
    add("--control", default=d.control, help="structure guidance: none, canny or depth, a ControlNet in every UNet call "
        "(default: %(default)s)")
    add("--control-model", default=d.control_model, help="ControlNet hub id or folder (default: lllyasviel's SD 1.5 "
        "v1.1 canny / depth ControlNet; tiny-random's own for --model tiny-random)")
    add("--control-scale", type=float, default=d.control_scale, help="ControlNet conditioning scale (default: %(default)s)")
    add("--canny-low", type=whole_number, default=d.canny_low, help="canny: lower cv2.Canny threshold (default: %(default)s)")
    add("--canny-high", type=whole_number, default=d.canny_high, help="canny: upper cv2.Canny threshold (default: %(default)s)")
    add("--depth-model", default=d.depth_model, help="depth: transformers depth-estimation hub id or folder "
        "(default: depth-anything/Depth-Anything-V2-Small-hf; tiny-random's own for --model tiny-random)")
    add("--fps", type=float, default=None,
        help="frame rate of the outputs (default: the source's; 10 for a folder of frames)")
    add("--out", default=None, help="output folder (default: stem-out/<video name>)")
    add("--cache-dir", default=None, help="latent cache folder (default: $STEM_CACHE_DIR or ~/.cache/stem)")
    add("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add("--chunk-size", type=whole_number, default=None,
        help="frames per UNet call (default: as many as fit in the GPU's free memory, all at once on a CPU); "
             "STEM still uses all frames for its bases")
    add("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
        help="model precision (default: float16 on a GPU, float32 on the CPU); EM statistics and softmax stay float32")
    add("--em-kernel", default="auto", choices=("auto", "fused", "torch"),
        help="STEM's EM: fused (one Triton pass per iteration, CUDA with Triton; not yet measured on a GPU), "
             "torch (streamed, any device) or auto (default: torch until the fused kernel is measured on a GPU)")
    add("--offload", action="store_true",
        help="keep the model on the CPU and move each part to the GPU when it runs (for small GPUs)")
    add("--debug", action="store_true", help="show full tracebacks")
    add.check()


def settings_from(args, method: str | None = None):
    """The frozen InversionSettings of parsed arguments, validated."""
    from .engine import InversionSettings
    from .video import check_fps

    check_fps(args.fps)  # before any work: the outputs' rate must be one an mp4 can hold
    return InversionSettings(
        model=args.model, method=method or args.method, num_bases=args.bases, num_iters=args.iters,
        num_steps=args.steps, num_frames=args.frames, stride=args.stride, size=args.size,
        prompt=args.source_prompt, seed=args.seed, control=args.control, control_model=args.control_model,
        control_scale=args.control_scale, canny_low=args.canny_low, canny_high=args.canny_high, depth_model=args.depth_model,
    ).validate()


def control_names(settings) -> list[str]:
    """The extra output files of a job with structure guidance: the condition video."""
    return [] if settings.control == "none" else ["control.mp4"]


def write_control(stage: Path, engine, video, settings) -> None:
    """control.mp4: the condition frames (edges or depth) of a job with structure guidance."""
    from .video import write_video

    if settings.control != "none":
        cond = engine.conditions(video, settings)  # (N, 3, H, W) in [0, 1]
        write_video(stage / "control.mp4", (cond * 255).round().byte().permute(0, 2, 3, 1).numpy(), video.fps)


def make_engine(args):
    """An Engine for the parsed arguments (the model loads on first use)."""
    from .cache import LatentCache
    from .engine import Engine

    if args.chunk_size is not None and args.chunk_size < 1:
        raise StemError(f"--chunk-size must be 1 or more, got {args.chunk_size}.")
    return Engine(args.model, device=parse_device(args.device), dtype=args.dtype, cache=LatentCache(args.cache_dir),
                  offload=args.offload, em_kernel=args.em_kernel)


def parse_device(name: str | None):
    """--device as a torch.device, refused in one sentence when it is unknown or not present here."""
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise StemError(f"--device {name!r} is not a device; use cuda, mps or cpu.") from error
    present = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not present.get(device.type, False):
        raise StemError(f"--device {name} is not available on this machine; leave --device out to use the best available one.")
    return device


def load_video(args, settings):
    from .video import read_video

    return read_video(args.video, num_frames=settings.num_frames, stride=settings.stride, size=settings.size,
                      max_frames=settings.max_frames, fps=args.fps)


def out_dir(args) -> Path:
    return Path(args.out) if args.out else Path("stem-out") / Path(args.video).stem


@contextlib.contextmanager
def claimed_out_dir(args, names):
    """The output folder for the files `names`: checked before any work, held against other runs while
    the command works, and cleared of what killed runs left (a move they began is finished)."""
    out = out_dir(args)
    check_output_folder(out, names)
    with output_lock(out):
        remove_dead_stages(out)
        yield out


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename)."""
    text = json.dumps(data, indent=2, allow_nan=False)  # fails before anything is written
    with atomic_output(path) as tmp:
        tmp.write_text(text)


class TqdmProgress:
    """The engine's callback({"phase", "i", "total", ...}) -> one tqdm bar per phase on stderr."""

    shown: "weakref.WeakSet[TqdmProgress]" = weakref.WeakSet()  # closed by main() before it reports an error

    def __init__(self):
        self.phase, self.bar = None, None
        TqdmProgress.shown.add(self)

    def __call__(self, info: dict) -> None:
        from tqdm.auto import tqdm

        phase, done, total = info["phase"], info["i"], info["total"]
        if phase == "loading":
            if done == 0:
                print("loading the model...", file=sys.stderr, flush=True)
            return
        if phase != self.phase:
            self.close()
            self.phase, self.bar = phase, tqdm(total=total, desc=phase, unit="step", leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.phase, self.bar = None, None


# -- commands ---------------------------------------------------------------------------------

def cmd_invert(args) -> dict:
    from .engine import inversion_metrics
    from .video import write_video

    settings = settings_from(args)
    names = ["reconstruction.mp4", "metrics.json"] + control_names(settings)
    with claimed_out_dir(args, names) as out:
        engine = make_engine(args)
        video = load_video(args, settings)
        progress = TqdmProgress()
        result = engine.invert(video, settings, engine.plan(video, settings, chunk_size=args.chunk_size), progress)
        progress.close()
        metrics = inversion_metrics(video, result, engine)
        with staged_outputs(out, names) as stage:
            write_video(stage / "reconstruction.mp4", result.reconstruction, video.fps)
            write_json(stage / "metrics.json", metrics)
            write_control(stage, engine, video, settings)
        return {"out": str(out), **{k: metrics[k] for k in ("psnr", "ssim", "warp_error", "cache_hit", "seconds")}}


def cmd_compare(args) -> dict:
    from .engine import inversion_metrics
    from .metrics import source_motion
    from .video import side_by_side, write_video

    methods = ["ddim", "stem"] + (["inflated"] if args.all else [])
    jobs = [settings_from(args, method) for method in methods]
    names = ["comparison.mp4", "metrics.json"] + control_names(jobs[0])
    with claimed_out_dir(args, names) as out:
        engine = make_engine(args)
        video = load_video(args, jobs[0])
        progress = TqdmProgress()
        results = {}
        for settings in jobs:
            results[settings.method] = engine.invert(video, settings, engine.plan(video, settings, chunk_size=args.chunk_size),
                                                     progress)
            progress.close()
        motion = source_motion(video.frames)  # every reconstruction is judged against the clip's motion
        blocks = {m: inversion_metrics(video, r, engine, motion) for m, r in results.items()}
        labels = {"ddim": "DDIM", "stem": f"STEM (K={args.bases}, R={args.iters})", "inflated": "Inflated DDIM"}
        panel = side_by_side([video.frames] + [results[m].reconstruction for m in methods],
                             ["Input"] + [labels[m] for m in methods])
        with staged_outputs(out, names) as stage:
            write_video(stage / "comparison.mp4", panel, video.fps)
            write_control(stage, engine, video, jobs[0])
            write_json(stage / "metrics.json", {"video": str(args.video), "methods": blocks})
        return {"out": str(out), **{m: {k: b[k] for k in ("psnr", "ssim", "warp_error", "cache_hit")} for m, b in blocks.items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stem", description="STEM inversion and text-guided editing of videos with Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    invert = sub.add_parser("invert", help="invert a video and reconstruct it; writes reconstruction.mp4 and metrics.json")
    add_inversion_options(invert)
    invert.set_defaults(run=cmd_invert)

    compare = sub.add_parser("compare", help="invert with DDIM and STEM (and inflated DDIM with --all); writes comparison.mp4 and metrics.json")
    add_inversion_options(compare)
    compare.add_argument("--all", action="store_true", help="also run the inflated DDIM baseline (slow: quadratic in frames)")
    compare.set_defaults(run=cmd_compare)

    try:
        from .editing_cli import add_edit_command
    except ImportError:  # editing not installed in this build
        pass
    else:
        add_edit_command(sub)
        from .evaluate import add_evaluate_command

        add_evaluate_command(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    try:
        try:
            summary = args.run(args)
        finally:
            for progress in list(TqdmProgress.shown):  # an error starts its own line, not the end of a bar
                progress.close()
    except StemError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug or an environment failure: one line unless --debug
        if debug:
            raise
        hint = ""
        if "out of memory" in str(error).lower():
            hint = " Try fewer --frames, a smaller --size, --chunk-size or --offload."
        print(f"error: {type(error).__name__}: {error}.{hint} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
