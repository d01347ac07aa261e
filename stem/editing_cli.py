"""`python -m stem edit`: text-guided editing of a video, one inversion shared by every prompt."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

from .cli import (
    TqdmProgress, add_inversion_options, claimed_out_dir, control_names, load_video, make_engine, settings_from,
    whole_number, write_control, write_json,
)
from .errors import StemError
from .files import staged_outputs

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
    edit.add_argument("--clip-model", default=None, metavar="NAME",
                      help="also score each edit with this CLIP model (e.g. openai/clip-vit-base-patch32, or tiny-random): "
                           "clip_text, frame_acc and tem_con in metrics.json (default: off)")
    edit.set_defaults(run=cmd_edit)


def add_edit_options(parser, overrides: dict[str, dict] | None = None) -> None:
    """The options of an edit but its target prompt: the editor's choice, the shared ones, each editor's own;
    `overrides` rewords the first three by dest."""
    from .cli import option_adder
    from .editing import DEFAULT_NEGATIVE_PROMPT, TokenFlowSettings

    d = TokenFlowSettings(prompt="")
    add = option_adder(parser, overrides)
    add("--editor", default="tokenflow", choices=list(EDITOR_OPTIONS), help="the editing method (default: %(default)s)")
    add("--negative-prompt", default=None,
        help=f'unconditional text of the guidance; "" for none (default: the editor\'s: {DEFAULT_NEGATIVE_PROMPT!r} '
             'for tokenflow, as the STEM authors ran it; empty for fatezero, as FateZero ran it)')
    add("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale, >= 1 (default: %(default)s)")
    add.check()
    add_freeu_options(parser.add_argument_group("FreeU in the editing UNet (any editor with FreeU settings)"))
    for name, (add_options, _) in EDITOR_OPTIONS.items():
        add_options(parser.add_argument_group(f"{name} options"))


FREEU_OPTIONS = {"freeu": "enabled", "freeu_b1": "b1", "freeu_b2": "b2", "freeu_s1": "s1", "freeu_s2": "s2"}  # dest -> field


def add_freeu_options(group) -> None:
    """--freeu/--no-freeu and the four constants; left out, each editor's own default applies."""
    from .editing import FreeUSettings

    d = FreeUSettings()
    group.add_argument("--freeu", action=argparse.BooleanOptionalAction, default=None,
                       help="FreeU in the editing UNet (default: the editor's; on for tokenflow, as the STEM authors ran it)")
    for dest, what in (("freeu_b1", "backbone scale at the widest up-block width"), ("freeu_b2", "backbone scale at the second width"),
                       ("freeu_s1", "skip low-frequency scale at the widest width"), ("freeu_s2", "skip low-frequency scale at the second width")):
        group.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=float, default=None, metavar="X",
                           help=f"FreeU {what} (default: {getattr(d, FREEU_OPTIONS[dest])})")


def with_freeu_options(settings, args):
    """`settings` with the FreeU options given on the command line (an editor without FreeU refuses them)."""
    given = {field: getattr(args, dest) for dest, field in FREEU_OPTIONS.items() if getattr(args, dest, None) is not None}
    if not given:
        return settings
    if not hasattr(settings, "freeu"):
        flags = ", ".join("--no-freeu" if getattr(args, dest) is False else f"--{dest.replace('_', '-')}"
                          for dest in FREEU_OPTIONS if getattr(args, dest, None) is not None)
        raise StemError(f"The {settings.editor} editor has no FreeU; leave out {flags}.")
    return replace(settings, freeu=replace(settings.freeu, **given))


def add_tokenflow_options(group) -> None:
    from .editing import EDIT_ATTENTION, PROPAGATION, TokenFlowSettings

    d = TokenFlowSettings(prompt="")
    group.add_argument("--pnp-attn", type=float, default=d.pnp_attn,
                       help="fraction of steps that inject the source's self-attention queries/keys (default: %(default)s)")
    group.add_argument("--pnp-conv", type=float, default=d.pnp_conv,
                       help="fraction of steps that inject the source's conv features (default: %(default)s)")
    group.add_argument("--batch-size", type=whole_number, default=d.batch_size, help="frames per TokenFlow batch, one keyframe each (default: %(default)s)")
    group.add_argument("--edit-attention", default=d.attention,
                       help=f"the edit groups' keyframe attention: {' or '.join(EDIT_ATTENTION)} (default: %(default)s)")
    group.add_argument("--propagation", default=d.propagation,
                       help=f"which two keyframes each frame's attention comes from: {' or '.join(PROPAGATION)} "
                            "(previous: its batch's and the previous batch's, as the STEM authors ran it; "
                            "nearest: the two nearest) (default: %(default)s)")


def shared_options(args) -> dict:
    """The options every editor's settings take; a negative prompt left out is the editor's own default."""
    given = {"guidance": args.guidance, "seed": args.seed}
    if args.negative_prompt is not None:
        given["negative_prompt"] = args.negative_prompt
    return given


def tokenflow_settings(args, prompt: str):
    from .editing import TokenFlowSettings

    return TokenFlowSettings(
        prompt=prompt, **shared_options(args), pnp_attn=args.pnp_attn,
        pnp_conv=args.pnp_conv, batch_size=args.batch_size, attention=args.edit_attention, propagation=args.propagation,
    )


def add_fatezero_options(group) -> None:
    from .editing import WORD_MAPS, FateZeroSettings

    d = FateZeroSettings(prompt="")
    group.add_argument("--self-replace", type=float, default=d.self_replace,
                       help="fraction of steps whose self-attention (layers of <= 32x32 tokens) is the source's (default: %(default)s)")
    group.add_argument("--cross-replace", type=float, default=d.cross_replace,
                       help="fraction of steps whose cross-attention maps come from the source's (default: %(default)s)")
    group.add_argument("--word-map", default=d.word_map,
                       help=f"how target tokens take the source's maps: {', '.join(WORD_MAPS)} (auto, FateZero's: replace "
                            "when the prompts have as many space-separated words, else refine; tokens: replace token by "
                            "token when they have as many tokens, else refine) (default: %(default)s)")
    group.add_argument("--cross-replace-word", action="append", default=None, metavar="WORD=FRACTION",
                       help="a target word's own --cross-replace (FateZero's cross_replace_steps {word: fraction}); repeatable")
    group.add_argument("--reweight", action="append", default=None, metavar="WORD=SCALE",
                       help="scale the cross-attention of a target word while the maps are fused; repeatable")
    group.add_argument("--blend-words", default=d.blend_words, metavar="SRC[,TGT]",
                       help="local edit: the source (and target) words whose attention masks where the edit may change the video")
    group.add_argument("--blend-threshold", type=float, default=d.blend_threshold,
                       help="mask threshold on the per-frame normalised word maps, in (0, 1] (default: %(default)s)")
    group.add_argument("--blend-self-attention", action=argparse.BooleanOptionalAction, default=d.blend_self_attention,
                       help="with --blend-words: keep the edit's own self-attention inside the source words' mask "
                            "(FateZero's blend_self_attention) (default: on)")
    group.add_argument("--blend-latents", action=argparse.BooleanOptionalAction, default=d.blend_latents,
                       help="with --blend-words: blend the latents with the source's outside the masks "
                            "(FateZero's blend_latents) (default: off, as FateZero's configs)")
    group.add_argument("--source-maps", default=d.source_maps,
                       help="the source's attention maps at step i: inversion (FateZero's: x_(i-1) at t_i, as its "
                            "inversion stores them) or editing (x_i at t_i) (default: %(default)s)")
    group.add_argument("--blend-level", default=d.blend_level,
                       help="the source latents the blend keeps outside the mask after step i: input (FateZero's "
                            "LocalBlend: x_i) or output (x_(i-1), the edit's level) (default: %(default)s)")


def fatezero_settings(args, prompt: str):
    from .editing import FateZeroSettings, parse_reweight
    from .editing.fatezero import parse_cross_replace_words

    return FateZeroSettings(
        prompt=prompt, source_prompt=args.source_prompt, **shared_options(args),
        self_replace=args.self_replace, cross_replace=args.cross_replace, word_map=args.word_map,
        reweight=parse_reweight(args.reweight), blend_words=args.blend_words, blend_threshold=args.blend_threshold,
        source_maps=args.source_maps, blend_level=args.blend_level,
        cross_replace_words=parse_cross_replace_words(args.cross_replace_word),
        blend_self_attention=args.blend_self_attention, blend_latents=args.blend_latents,
    )


# editor name -> (add its options to an argument group, its settings for parsed arguments and one prompt)
EDITOR_OPTIONS = {"tokenflow": (add_tokenflow_options, tokenflow_settings),
                  "fatezero": (add_fatezero_options, fatezero_settings)}


# editor name -> {dest: (flag, default-settings field)} of the options only that editor takes
EDITOR_ONLY = {"tokenflow": {"pnp_attn": ("--pnp-attn", "pnp_attn"), "pnp_conv": ("--pnp-conv", "pnp_conv"),
                             "batch_size": ("--batch-size", "batch_size"), "edit_attention": ("--edit-attention", "attention"),
                             "propagation": ("--propagation", "propagation")},
               "fatezero": {"self_replace": ("--self-replace", "self_replace"), "cross_replace": ("--cross-replace", "cross_replace"),
                            "word_map": ("--word-map", "word_map"), "reweight": ("--reweight", None),
                            "blend_words": ("--blend-words", "blend_words"), "blend_threshold": ("--blend-threshold", "blend_threshold"),
                            "source_maps": ("--source-maps", "source_maps"), "blend_level": ("--blend-level", "blend_level"),
                            "cross_replace_word": ("--cross-replace-word", None),
                            "blend_self_attention": ("--blend-self-attention", "blend_self_attention"),
                            "blend_latents": ("--blend-latents", "blend_latents")}}


def refuse_other_editors_options(args) -> None:
    """Refuse, in one sentence, options that only another editor takes (they would be silently ignored)."""
    from .editing import FateZeroSettings, TokenFlowSettings

    defaults = {"tokenflow": TokenFlowSettings(prompt=""), "fatezero": FateZeroSettings(prompt="")}
    for editor, options in EDITOR_ONLY.items():
        if editor == args.editor:
            continue
        given = [flag for dest, (flag, field) in options.items()
                 if getattr(args, dest, None) is not None and (field is None or getattr(args, dest) != getattr(defaults[editor], field))]
        if given:
            raise StemError(f"{', '.join(given)} only apply to the {editor} editor, not {args.editor}; leave them out or pick --editor {editor}.")


def edit_settings_for(args, prompt: str):
    """The validated settings of one edit towards `prompt` with the parsed options."""
    refuse_other_editors_options(args)
    return with_freeu_options(EDITOR_OPTIONS[args.editor][1](args, prompt), args).validate()


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
    from .metrics import load_clip
    from .video import write_video

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
            results.append(edit_video(engine, video, settings, edit, engine.plan(video, settings, edit, args.chunk_size),
                                      progress))
            progress.close()
        blocks = []
        with staged_outputs(out, names) as stage:  # all outputs move into `out` together, or none
            for name, result in zip(video_names(edits), results):
                write_video(stage / name, result.frames, video.fps)
                clip = scorer.edit_metrics(result.frames, settings.prompt, result.settings.prompt) if scorer else {}
                blocks.append({"file": name, **edit_metrics(video, result), **clip})
            write_json(stage / "metrics.json", blocks[0] if len(blocks) == 1 else {"video": str(args.video), "edits": blocks})
            write_control(stage, engine, video, settings)
        return {"out": str(out), "edits": [{k: b[k] for k in ("file", "prompt", "warp_error", "inversion_cache_hit",
                                                             "seconds_inversion", "seconds_editing")} for b in blocks]}
