"""The command line's options, generated from the settings dataclasses' fields, and the settings they give.

Each `setting(...)` field with the "cli" face becomes one option: its flag, its help, its default,
`whole_number` for an int, a switch for a bool, a repeatable WORD=NUMBER for word pairs. The
parsed options give the settings back through the same specs (`settings_for`), and an error about
a setting is printed with its flag first (`cli_message`). Options that are not a job's settings
(the output folder, the device, ...) are written here by hand.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace

from ..editing import DEFAULT_NEGATIVE_PROMPT, FateZeroSettings, FreeUSettings, TokenFlowSettings
from ..editing.fatezero import WORD_VALUE_PARSERS
from ..engine import EM_KERNELS, InversionSettings
from ..errors import StemError
from ..models import DEFAULT_MODEL
from ..settings import SettingError, Spec, for_face, spec, specs
from ..video import check_fps

# editor name -> its settings dataclass; the edit command's --editor choices, in this order
EDITOR_SETTINGS = {"tokenflow": TokenFlowSettings, "fatezero": FateZeroSettings}
SETTINGS_CLASSES = (InversionSettings, TokenFlowSettings, FateZeroSettings, FreeUSettings)
METAVARS = {"reweight": "WORD=SCALE", "cross_replace_words": "WORD=FRACTION", "blend_words": "SRC[,TGT]"}


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
        dest = kwargs.get("dest") or dest_of(flags)
        used.add(dest)
        return parser.add_argument(*flags, **{**kwargs, **overrides.get(dest, {})})

    def check():
        unused = set(overrides) - used
        if unused:
            raise ValueError(f"overrides for options that do not exist here: {', '.join(sorted(unused))}")

    add.check = check
    return add


def dest_of(flags) -> str:
    """argparse's dest of an option: its first long flag without dashes, '-' as '_'."""
    long = [f for f in flags if f.startswith("--")]
    return (long or list(flags))[0].lstrip("-").replace("-", "_")


# -- options from specs ----------------------------------------------------------------------------

def option_keywords(s: Spec) -> dict:
    """add_argument's keywords of one setting: type, default, action and help from its spec."""
    kind, default = s.base_type, s.default
    shown = "" if default in (None, "", ()) else " (default: %(default)s)"
    words = {"default": default, "help": s.help + shown}
    if kind is bool:
        return {**words, "action": argparse.BooleanOptionalAction,
                "help": s.help + ("" if default is None else f" (default: {'on' if default else 'off'})")}
    if s.name in WORD_VALUE_PARSERS:
        return {"action": "append", "default": None, "metavar": METAVARS[s.name], "help": s.help + "; repeatable"}
    if s.name in METAVARS:
        words["metavar"] = METAVARS[s.name]
    if kind is int:
        words["type"] = whole_number
    elif kind is float:
        words["type"] = float
    return words


def add_setting_options(add, cls, skip=()) -> None:
    """One option per "cli" setting of `cls` (not those in `skip`), added with `add` (an `add_argument`)."""
    for s in specs(cls):
        if "cli" in s.faces and s.name not in skip and not s.nested:
            add(s.flag, **option_keywords(s))


def given_settings(cls, args, skip=()) -> dict:
    """The values of the "cli" settings of `cls` that `args` holds (None: not given, the default applies)."""
    values = {}
    for s in specs(cls):
        if "cli" not in s.faces or s.nested or s.name in skip:
            continue
        value = getattr(args, dest_of([s.flag]), None)
        if s.name in WORD_VALUE_PARSERS:
            value = WORD_VALUE_PARSERS[s.name](value) if value is not None else None
        if value is not None:
            values[s.name] = value
    return values


def cli_message(error: StemError) -> str:
    """The error's sentence; one about a setting names its flag first ("--bases: the number of bases K ...")."""
    if not isinstance(error, SettingError):
        return str(error)
    flag = flag_of(error.setting, error.owner) if error.setting else ""
    return for_face(error, flag, lambda name: flag_of(name, error.owner))


def flag_of(name: str, owner: type | None = None) -> str:
    """The CLI flag of a setting: its class's, else the first settings class's that has it, else --name."""
    for cls in (owner, *SETTINGS_CLASSES):
        if cls is not None and name in {s.name for s in specs(cls)}:
            return spec(cls, name).flag
    return "--" + name.replace("_", "-")


# -- inversion -------------------------------------------------------------------------------------

def add_inversion_options(parser: argparse.ArgumentParser, prompt_flags=("--source-prompt",),
                          seed_help: str | None = None, overrides: dict[str, dict] | None = None) -> None:
    """Options that define an inversion job (they are its cache key) and how it runs; `overrides` rewords by dest."""
    d = InversionSettings()
    model = spec(InversionSettings, "model")
    seed = spec(InversionSettings, "seed")
    overrides = {
        "model": {"default": os.environ.get("STEM_MODEL", DEFAULT_MODEL),
                  "help": f"{model.help} (default: $STEM_MODEL or {DEFAULT_MODEL})"},
        "frames": {"help": f"number of frames to use (default: all, at most {d.max_frames})"},
        "seed": {"help": (seed_help or seed.help) + " (default: %(default)s)"},
        **(overrides or {}),
    }
    add = option_adder(parser, overrides)
    add("video", help="video file (mp4/webm/mov/gif) or folder of frames")
    add_setting_options(add, InversionSettings, skip=("prompt",))
    add(*prompt_flags, dest="source_prompt", default="", help=spec(InversionSettings, "prompt").help)
    add("--fps", type=float, default=None,
        help="frame rate of the outputs (default: the source's; 10 for a folder of frames)")
    add("--out", default=None, help="output folder (default: stem-out/<video name>)")
    add("--cache-dir", default=None, help="latent cache folder (default: $STEM_CACHE_DIR or ~/.cache/stem)")
    add("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add("--chunk-size", type=whole_number, default=None,
        help="frames per UNet call (default: as many as fit in the GPU's free memory, all at once on a CPU); "
             "STEM still uses all frames for its bases")
    add("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
        help="model precision: float16, bfloat16 (GPUs with bf16 support) or float32 (default: float16 on a GPU, "
             "float32 on the CPU); EM statistics and softmax stay float32")
    add("--em-kernel", default="auto", choices=EM_KERNELS,
        help="STEM's EM: fused (one Triton pass per iteration, CUDA with Triton; not yet measured on a GPU), "
             "torch (streamed, any device) or auto (default: torch until the fused kernel is measured on a GPU)")
    add("--offload", action="store_true",
        help="keep the model on the CPU and move each part to the GPU when it runs (for small GPUs)")
    add("--debug", action="store_true", help="show full tracebacks")
    add.check()


def settings_from(args, method: str | None = None, **fixed) -> InversionSettings:
    """The frozen, validated InversionSettings of parsed arguments (`fixed` replaces some, e.g. per clip)."""
    check_fps(args.fps)  # before any work: the outputs' rate must be one an mp4 can hold
    given = given_settings(InversionSettings, args, skip=("prompt",))
    settings = InversionSettings(**given, prompt=args.source_prompt)
    return replace(settings, **({"method": method} if method else {}), **fixed).validate()


# -- edits -----------------------------------------------------------------------------------------

SHARED = ("prompt", "negative_prompt", "guidance", "seed")  # every editor's; --prompt and --seed are the command's


def add_edit_options(parser, overrides: dict[str, dict] | None = None) -> None:
    """The options of an edit but its target prompt: the editor's choice, the shared ones, each editor's own;
    `overrides` rewords the first three by dest."""
    add = option_adder(parser, overrides)
    add("--editor", default="tokenflow", choices=list(EDITOR_SETTINGS),
        help="the editing method: tokenflow or fatezero (default: %(default)s)")
    add("--negative-prompt", default=None,
        help=f'unconditional text of the guidance; "" for none (default: the editor\'s: {DEFAULT_NEGATIVE_PROMPT!r} '
             'for tokenflow, as the STEM authors ran it; empty for fatezero, as FateZero ran it)')
    add(spec(TokenFlowSettings, "guidance").flag, **option_keywords(spec(TokenFlowSettings, "guidance")))
    add.check()
    freeu = parser.add_argument_group("FreeU in the editing UNet (any editor with FreeU settings)")
    for s in specs(FreeUSettings):  # left out, each editor's own default applies
        if s.base_type is bool:
            freeu.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=None, help=s.help)
        else:
            freeu.add_argument(s.flag, type=float, default=None, metavar="X", help=f"{s.help} (default: {s.default})")
    for name, cls in EDITOR_SETTINGS.items():
        add_setting_options(parser.add_argument_group(f"{name} options").add_argument, cls, skip=SHARED)


def with_freeu_options(settings, args):
    """`settings` with the FreeU options given on the command line (an editor without FreeU refuses them)."""
    given = given_settings(FreeUSettings, args)
    if not given:
        return settings
    if not hasattr(settings, "freeu"):
        flags = ", ".join("--no-freeu" if value is False else spec(FreeUSettings, name).flag
                          for name, value in given.items())
        raise StemError(f"The {settings.editor} editor has no FreeU; leave out {flags}.")
    return replace(settings, freeu=replace(settings.freeu, **given))


def own_options(editor: str) -> list[Spec]:
    """The "cli" settings only `editor` takes (another editor would silently ignore them)."""
    others = {s.flag for name, cls in EDITOR_SETTINGS.items() if name != editor for s in specs(cls)}
    return [s for s in specs(EDITOR_SETTINGS[editor]) if "cli" in s.faces and not s.nested and s.name not in SHARED
            and s.flag not in others]


def refuse_other_editors_options(args) -> None:
    """Refuse, in one sentence, options that only another editor takes (they would be silently ignored)."""
    for editor in EDITOR_SETTINGS:
        if editor == args.editor:
            continue
        given = [s.flag for s in own_options(editor)
                 if (value := getattr(args, dest_of([s.flag]), None)) is not None and value != s.default]
        if given:
            raise StemError(f"{', '.join(given)} only apply to the {editor} editor, not {args.editor}; leave them out "
                            f"or pick --editor {editor}.")


def edit_settings(args, editor: str | None = None):
    """The settings of `editor` (default: --editor) with the parsed options, its target prompt still empty.

    `edit_for` gives each edit's validated settings from these (`dataclasses.replace`).
    """
    editor = editor or args.editor
    refuse_other_editors_options(argparse.Namespace(**{**vars(args), "editor": editor}))
    cls = EDITOR_SETTINGS[editor]
    own = {s.name for s in own_options(editor)} | {"guidance", "negative_prompt"}
    given = {name: value for name, value in given_settings(cls, args).items() if name in own}
    return with_freeu_options(cls(prompt="", **given, seed=args.seed), args)  # one --seed: the EM's and the editor's


def edit_for(settings, prompt: str, source_prompt: str):
    """One edit's validated settings: `settings` towards `prompt` (the word maps take the inversion's prompt too)."""
    source = {"source_prompt": source_prompt} if any(s.name == "source_prompt" for s in specs(settings)) else {}
    return replace(settings, prompt=prompt, **source).validate()


def edit_settings_for(args, prompt: str):
    """The validated settings of one edit towards `prompt` with the parsed options."""
    return edit_for(edit_settings(args), prompt, args.source_prompt)
