"""`python -m stem edit`: text-guided editing of a video, one inversion shared by every prompt."""

from __future__ import annotations

import re

from .cli import TqdmProgress, add_inversion_options, load_video, make_engine, out_dir, settings_from, write_json
from .errors import StemError

SLUG_CHARS = 40


def add_edit_command(subparsers) -> None:
    """Register the `edit` command on the `python -m stem` subparsers."""
    edit = subparsers.add_parser(
        "edit", help="edit a video with a text prompt (TokenFlow or FateZero on its inversion); writes edited.mp4 and metrics.json")
    add_inversion_options(edit, prompt_flags=("--source-prompt",),  # one --seed drives both
                          seed_help="seed of the EM initialisation and of the keyframe choice")
    edit.add_argument("--prompt", dest="prompts", action="append", default=None, metavar="TEXT",
                      help="target prompt; repeat it for several edits of the same inversion (one video each)")
    add_edit_options(edit)
    edit.set_defaults(run=cmd_edit)


def add_edit_options(parser) -> None:
    """The options of an edit but its target prompt: the editor's choice, the shared ones, each editor's own."""
    from .editing import TokenFlowSettings

    d = TokenFlowSettings(prompt="")
    parser.add_argument("--editor", default="tokenflow", choices=list(EDITOR_OPTIONS),
                        help="the editing method (default: %(default)s)")
    parser.add_argument("--negative-prompt", default=d.negative_prompt, help="unconditional text of the guidance (default: %(default)r)")
    parser.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale, >= 1 (default: %(default)s)")
    for name, (add_options, _) in EDITOR_OPTIONS.items():
        add_options(parser.add_argument_group(f"{name} options"))


def add_tokenflow_options(group) -> None:
    from .editing import EDIT_ATTENTION, TokenFlowSettings

    d = TokenFlowSettings(prompt="")
    group.add_argument("--pnp-attn", type=float, default=d.pnp_attn,
                       help="fraction of steps that inject the source's self-attention queries/keys (default: %(default)s)")
    group.add_argument("--pnp-conv", type=float, default=d.pnp_conv,
                       help="fraction of steps that inject the source's conv features (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=d.batch_size, help="frames per TokenFlow batch, one keyframe each (default: %(default)s)")
    group.add_argument("--edit-attention", default=d.attention,
                       help=f"keyframe attention while editing: {' or '.join(EDIT_ATTENTION)} (default: %(default)s)")


def tokenflow_settings(args, prompt: str):
    from .editing import TokenFlowSettings

    return TokenFlowSettings(
        prompt=prompt, negative_prompt=args.negative_prompt, guidance=args.guidance, pnp_attn=args.pnp_attn,
        pnp_conv=args.pnp_conv, batch_size=args.batch_size, attention=args.edit_attention, seed=args.seed,
    )


def add_fatezero_options(group) -> None:
    from .editing import WORD_MAPS, FateZeroSettings

    d = FateZeroSettings(prompt="")
    group.add_argument("--self-replace", type=float, default=d.self_replace,
                       help="fraction of steps whose self-attention (layers of <= 32x32 tokens) is the source's (default: %(default)s)")
    group.add_argument("--cross-replace", type=float, default=d.cross_replace,
                       help="fraction of steps whose cross-attention maps come from the source's (default: %(default)s)")
    group.add_argument("--word-map", default=d.word_map,
                       help=f"how target tokens take the source's maps: {', '.join(WORD_MAPS)} (auto: replace when the "
                            "prompts have as many tokens, else refine) (default: %(default)s)")
    group.add_argument("--reweight", action="append", default=None, metavar="WORD=SCALE",
                       help="scale the cross-attention of a target word while the maps are fused; repeatable")
    group.add_argument("--blend-words", default=d.blend_words, metavar="SRC[,TGT]",
                       help="local edit: the source (and target) words whose attention masks where the edit may change the video")
    group.add_argument("--blend-threshold", type=float, default=d.blend_threshold,
                       help="mask threshold on the per-frame normalised word maps, in (0, 1] (default: %(default)s)")


def fatezero_settings(args, prompt: str):
    from .editing import FateZeroSettings, parse_reweight

    return FateZeroSettings(
        prompt=prompt, source_prompt=args.source_prompt, negative_prompt=args.negative_prompt, guidance=args.guidance,
        self_replace=args.self_replace, cross_replace=args.cross_replace, word_map=args.word_map,
        reweight=parse_reweight(args.reweight), blend_words=args.blend_words, blend_threshold=args.blend_threshold,
        seed=args.seed,
    )


# editor name -> (add its options to an argument group, its settings for parsed arguments and one prompt)
EDITOR_OPTIONS = {"tokenflow": (add_tokenflow_options, tokenflow_settings),
                  "fatezero": (add_fatezero_options, fatezero_settings)}


def edit_settings_for(args, prompt: str):
    """The validated settings of one edit towards `prompt` with the parsed options."""
    return EDITOR_OPTIONS[args.editor][1](args, prompt).validate()


def edit_settings_from(args) -> list:
    """One validated settings object per --prompt."""
    if not args.prompts:
        raise StemError("Give the target prompt with --prompt (repeat it for several edits of the same video).")
    return [edit_settings_for(args, prompt) for prompt in args.prompts]


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
    engine = make_engine(args)
    video = load_video(args, settings)
    progress = TqdmProgress()
    results = []
    for edit in edits:
        results.append(edit_video(engine, video, settings, edit, progress))
        progress.close()
    out = out_dir(args)
    blocks = []
    for name, result in zip(video_names(edits), results):
        write_video(out / name, result.frames, video.fps)
        blocks.append({"file": name, **edit_metrics(video, result)})
    write_json(out / "metrics.json", blocks[0] if len(blocks) == 1 else {"video": str(args.video), "edits": blocks})
    return {"out": str(out), "edits": [{k: b[k] for k in ("file", "prompt", "warp_error", "inversion_cache_hit",
                                                         "seconds_inversion", "seconds_editing")} for b in blocks]}
