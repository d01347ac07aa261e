"""`python -m stem edit`: text-guided editing of a video, one inversion shared by every prompt."""

from __future__ import annotations

import re

from .cli import TqdmProgress, add_inversion_options, checked_out_dir, load_video, make_engine, settings_from, write_json
from .errors import StemError
from .files import staged_outputs

SLUG_CHARS = 40


def add_edit_command(subparsers) -> None:
    """Register the `edit` command on the `python -m stem` subparsers."""
    from .editing import EDIT_ATTENTION, EditSettings

    d = EditSettings(prompt="")
    edit = subparsers.add_parser(
        "edit", help="edit a video with a text prompt (TokenFlow plug-and-play on its inversion); writes edited.mp4 and metrics.json")
    add_inversion_options(edit, prompt_flags=("--source-prompt",),  # one --seed drives both
                          seed_help="seed of the EM initialisation and of the keyframe choice")
    edit.add_argument("--prompt", dest="prompts", action="append", default=None, metavar="TEXT",
                      help="target prompt; repeat it for several edits of the same inversion (one video each)")
    edit.add_argument("--negative-prompt", default=d.negative_prompt, help="unconditional text of the guidance (default: empty)")
    edit.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale, >= 1 (default: %(default)s)")
    edit.add_argument("--pnp-attn", type=float, default=d.pnp_attn,
                      help="fraction of steps that inject the source's self-attention queries/keys (default: %(default)s)")
    edit.add_argument("--pnp-conv", type=float, default=d.pnp_conv,
                      help="fraction of steps that inject the source's conv features (default: %(default)s)")
    edit.add_argument("--batch-size", type=int, default=d.batch_size, help="frames per TokenFlow batch, one keyframe each (default: %(default)s)")
    edit.add_argument("--edit-attention", default=d.attention,
                      help=f"keyframe attention while editing: {' or '.join(EDIT_ATTENTION)} (default: %(default)s)")
    edit.set_defaults(run=cmd_edit)


def edit_settings_from(args) -> list:
    """One validated EditSettings per --prompt."""
    from .editing import EditSettings

    if not args.prompts:
        raise StemError("Give the target prompt with --prompt (repeat it for several edits of the same video).")
    return [EditSettings(
        prompt=prompt, negative_prompt=args.negative_prompt, guidance=args.guidance, pnp_attn=args.pnp_attn,
        pnp_conv=args.pnp_conv, batch_size=args.batch_size, attention=args.edit_attention, seed=args.seed,
    ).validate() for prompt in args.prompts]


def slug(text: str) -> str:
    """A short file-name-safe form of a prompt: 'A red car!' -> 'a-red-car'."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:SLUG_CHARS].rstrip("-") or "prompt"


def video_names(edits) -> list[str]:
    """edited.mp4 for one prompt; edited-1-<slug>.mp4, edited-2-<slug>.mp4, ... for several."""
    if len(edits) == 1:
        return ["edited.mp4"]
    return [f"edited-{i}-{slug(e.prompt)}.mp4" for i, e in enumerate(edits, start=1)]


def cmd_edit(args) -> dict:
    from .editing import edit_metrics, edit_video
    from .video import write_video

    edits = edit_settings_from(args)  # every setting is checked before the video or the model is touched
    settings = settings_from(args)
    names = video_names(edits) + ["metrics.json"]
    out = checked_out_dir(args, names)  # before the model loads
    engine = make_engine(args)
    video = load_video(args, settings)
    progress = TqdmProgress()
    results = []
    for edit in edits:
        results.append(edit_video(engine, video, settings, edit, progress))
        progress.close()
    blocks = []
    with staged_outputs(out, names) as stage:  # all outputs move into `out` together, or none
        for name, result in zip(video_names(edits), results):
            write_video(stage / name, result.frames, video.fps)
            blocks.append({"file": name, **edit_metrics(video, result)})
        write_json(stage / "metrics.json", blocks[0] if len(blocks) == 1 else {"video": str(args.video), "edits": blocks})
    return {"out": str(out), "edits": [{k: b[k] for k in ("file", "prompt", "warp_error", "inversion_cache_hit",
                                                         "seconds_inversion", "seconds_editing")} for b in blocks]}
