"""`python -m stem invert` and `compare`: invert a video and reconstruct it, with one method or each."""

from __future__ import annotations

from ..engine import inversion_metrics
from ..files import staged_outputs
from ..metrics import source_motion
from ..video import side_by_side, write_video
from .common import TqdmProgress, claimed_out_dir, control_names, load_video, make_engine, write_control, write_json
from .options import add_inversion_options, settings_from

PROMPT_FLAGS = ("--source-prompt", "--prompt")  # --prompt: the source prompt's old name here, kept as an alias


def add_invert_commands(subparsers) -> None:
    """Register `invert` and `compare` on the `python -m stem` subparsers."""
    invert = subparsers.add_parser("invert", help="invert a video and reconstruct it; writes reconstruction.mp4 and "
                                   "metrics.json")
    add_inversion_options(invert, prompt_flags=PROMPT_FLAGS)
    invert.set_defaults(run=cmd_invert)

    compare = subparsers.add_parser("compare", help="invert with DDIM and STEM (and inflated DDIM with --all); writes "
                                    "comparison.mp4 and metrics.json")
    add_inversion_options(compare, prompt_flags=PROMPT_FLAGS)
    compare.add_argument(
        "--all", action="store_true", help="also run the inflated DDIM baseline (slow: quadratic in frames)"
    )
    compare.set_defaults(run=cmd_compare)


def cmd_invert(args) -> dict:
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
    methods = ["ddim", "stem"] + (["inflated"] if args.all else [])
    jobs = [settings_from(args, method) for method in methods]
    names = ["comparison.mp4", "metrics.json"] + control_names(jobs[0])
    with claimed_out_dir(args, names) as out:
        engine = make_engine(args)
        video = load_video(args, jobs[0])
        progress = TqdmProgress()
        results = {}
        for settings in jobs:
            results[settings.method] = engine.invert(
                video, settings, engine.plan(video, settings, chunk_size=args.chunk_size), progress
            )
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
        return {
            "out": str(out),
            **{m: {k: b[k] for k in ("psnr", "ssim", "warp_error", "cache_hit")} for m, b in blocks.items()},
        }
