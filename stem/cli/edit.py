"""`python -m stem edit`: text-guided editing of a video, one inversion shared by every prompt."""

from __future__ import annotations

from ..editing import edit_metrics, edit_video
from ..errors import StemError
from ..files import staged_outputs
from ..metrics import load_clip
from ..video import write_video
from .common import (
    TqdmProgress, claimed_out_dir, control_names, load_video, make_engine, slug, write_control, write_json,
)
from .options import add_edit_options, add_inversion_options, edit_settings_for, settings_from



def add_edit_command(subparsers) -> None:
    """Register the `edit` command on the `python -m stem` subparsers."""
    edit = subparsers.add_parser(
        "edit",
        help="edit a video with a text prompt (TokenFlow or FateZero on its inversion); writes edited.mp4 and "
        "metrics.json",
    )
    add_inversion_options(edit, prompt_flags=("--source-prompt",),  # one --seed drives both
                          seed_help="seed of the EM initialisation and of the keyframe choice")
    edit.add_argument("--prompt", dest="prompts", action="append", default=None, metavar="TEXT",
                      help="target prompt; repeat it for several edits of the same inversion (one video each)")
    add_edit_options(edit)
    edit.add_argument(
        "--clip-model",
        default=None,
        metavar="NAME",
        help="also score each edit with this CLIP model (e.g. openai/clip-vit-base-patch32, or tiny-random): "
        "clip_text, frame_acc and tem_con in metrics.json (default: off)",
    )
    edit.set_defaults(run=cmd_edit)


def edit_settings_from(args) -> list:
    """One validated settings object per --prompt."""
    if not args.prompts:
        raise StemError("Give the target prompt with --prompt (repeat it for several edits of the same video).")
    return [edit_settings_for(args, prompt) for prompt in args.prompts]


def video_names(edits) -> list[str]:
    """edited.mp4 for one prompt; edited-1-<slug>.mp4, edited-2-<slug>.mp4, ... for several."""
    if len(edits) == 1:
        return ["edited.mp4"]
    return [f"edited-{i}-{slug(e.prompt)}.mp4" for i, e in enumerate(edits, start=1)]


def cmd_edit(args) -> dict:
    edits = edit_settings_from(args)  # every setting is checked before the video or the model is touched
    settings = settings_from(args)
    names = video_names(edits) + ["metrics.json"] + control_names(settings)
    with claimed_out_dir(args, names) as out:  # checked before the model loads
        engine = make_engine(args)
        scorer = load_clip(args.clip_model, engine.device) if args.clip_model else None
        video = load_video(args, settings)
        progress = TqdmProgress()
        results = []
        for edit in edits:
            results.append(
                edit_video(engine, video, settings, edit, engine.plan(video, settings, edit, args.chunk_size), progress)
            )
            progress.close()
        blocks = []
        with staged_outputs(out, names) as stage:  # all outputs move into `out` together, or none
            for name, result in zip(video_names(edits), results):
                write_video(stage / name, result.frames, video.fps)
                clip = scorer.edit_metrics(result.frames, settings.prompt, result.settings.prompt) if scorer else {}
                blocks.append({"file": name, **edit_metrics(video, result), **clip})
            write_json(
                stage / "metrics.json", blocks[0] if len(blocks) == 1 else {"video": str(args.video), "edits": blocks}
            )
            write_control(stage, engine, video, settings)
        return {"out": str(out), "edits": [{k: b[k] for k in ("file", "prompt", "warp_error", "inversion_cache_hit",
                                                             "seconds_inversion", "seconds_editing")} for b in blocks]}
