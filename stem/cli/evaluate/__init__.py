"""`python -m stem evaluate MANIFEST`: the paper's comparison over many clips, on one device or many.

The manifest (JSON, or YAML when PyYAML is installed) is a list of clips (`manifest`). For each clip x
method there is one `reconstruction` job (inversion + reconstruction: PSNR, SSIM, warp error); for each clip x method x
editor x target prompt one `edit` job (CLIP text alignment, Frame-Acc, Tem-Con, warp error with the
source's flow). The jobs that share one inversion form a group that runs on one process, its
reconstruction first, so its edits take the inversion from the cache and no two processes ever
invert the same video with the same settings.

The modules: `manifest` (the schema) -> `plan` (the jobs) -> `run` (the processes) and `report`
(the tables). Output folder:

    rows/<job>.json     one per finished job, written atomically the moment it finishes
    videos/<job>.mp4    the reconstructions and edits
    results.json, results.csv, summary.md, summary.png    the gathered table, written last

A rerun skips every job whose row (made with the same settings) and video exist.
"""

from __future__ import annotations

import argparse

from ...metrics import DEFAULT_CLIP_MODEL
from ..options import EDITOR_SETTINGS, add_edit_options, add_inversion_options
from .manifest import PER_CLIP, Clip, read_manifest
from .plan import Job, Plan, make_plan
from .report import mean_std_table, summary_markdown, write_results
from .run import cmd_evaluate, run_job

__all__ = ["Clip", "Job", "Plan", "add_evaluate_command", "cmd_evaluate", "make_plan", "mean_std_table",
           "read_manifest", "run_job", "summary_markdown", "write_results"]
DEFAULT_METHODS = "ddim,stem"


def add_evaluate_command(subparsers) -> None:
    """Register the `evaluate` command on the `python -m stem` subparsers."""
    evaluate = subparsers.add_parser(
        "evaluate", help="invert and edit every clip of a manifest with several methods, on one or many GPUs "
                         "(accelerate launch); writes results.json/.csv, summary.md/.png and the videos")
    add_inversion_options(evaluate, prompt_flags=("--source-prompt",),
                          seed_help="seed of the EM initialisation and of the keyframe choice", overrides=dict(
        video=dict(metavar="MANIFEST", help="a .json (or .yaml) list of clips: "
                   '[{"video": ..., "source_prompt": ..., "target_prompts": [...]}], '
                   f"optionally with {', '.join(PER_CLIP)} and name per clip"),
        source_prompt=dict(help="source prompt of the clips whose entry has none"),
        out=dict(help="output folder (default: stem-eval/<manifest name>)"),
        method=dict(default=None, help=argparse.SUPPRESS)))
    add_edit_options(evaluate, overrides=dict(editor=dict(default=None, help=argparse.SUPPRESS)))
    evaluate.add_argument("--methods", default=DEFAULT_METHODS,
                          help="comma-separated inversion methods: stem, ddim, inflated (default: %(default)s)")
    evaluate.add_argument(
        "--editors",
        default="tokenflow",
        help=f"comma-separated editors ({', '.join(EDITOR_SETTINGS)}), or none for reconstructions only "
        "(default: %(default)s, the editor of the paper's main results)",
    )
    evaluate.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        metavar="NAME",
        help="CLIP for the edit metrics: hub id, local folder, tiny-random, or none (default: %(default)s)",
    )
    evaluate.set_defaults(run=cmd_evaluate)
