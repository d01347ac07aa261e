"""The app's parameters, derived from the settings dataclasses: names, order, defaults, labels, help, ranges.

Every setting with the "app" (or "api") face of `InversionSettings` and of the editors' settings is one
parameter of the app's endpoints and one control on the page, named by its spec's `api_name`
("bases" for `num_bases`, "freeu_b1" for a nested FreeU's b1). A setting two editors share ("guidance")
is one parameter; the inversion's seed is the edit's too. The app adds three of its own: the video, the
editor and FreeU's three-way switch (the editor's default, on, off). Each endpoint keeps its released
positional order (`RELEASED`) and takes a new setting after it, so scripts written against an older app
keep working. `inversion_settings` and `edit_settings` turn the page's values (sliders give floats, boxes
may be emptied) back into validated settings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from .editing import FateZeroSettings, FreeUSettings, TokenFlowSettings
from .editing.fatezero import WORD_VALUE_PARSERS
from .engine import InversionSettings
from .errors import StemError
from .settings import Spec, sentence_case, spec, specs

EDIT_SETTINGS = {"tokenflow": TokenFlowSettings, "fatezero": FateZeroSettings}
EDITOR_LABELS = {"tokenflow": "TokenFlow", "fatezero": "FateZero"}
FREEU_CHOICES = {"default": "The editor's default (on for TokenFlow, off for FateZero)", "on": "On", "off": "Off"}


@dataclass(frozen=True)
class Parameter:
    """One endpoint parameter and page control."""

    name: str                     # the API's and the page's name
    label: str
    help: str                     # one line: what it changes for the result
    default: object               # the page's starting value
    kind: str                     # "video", "text", "choice", "switch", "slider" or "number"
    whole: bool = False           # a whole number (an int setting)
    choices: tuple = ()           # (label, value) pairs of a choice
    low: object = None            # a slider's range, a number box's bounds
    high: object = None
    step: object = None
    spec: Spec | None = None      # the setting it comes from (None for the app's own)
    owners: tuple[type, ...] = ()  # the settings classes that have it
    nested: str = ""              # the field of the owners' settings it sits in ("freeu"), "" if none
    visible: bool = True          # False: an API parameter without a control on the page


class ParameterError(StemError):
    """A page or API value that is not a value of its control (an emptied box, text for a number)."""


def _from_spec(s: Spec, owner: type, nested: str = "") -> Parameter:
    kind = s.base_type
    default = s.default
    if s.choices is not None:
        widget, choices = "choice", tuple((s.choice_labels.get(c, str(c)), c) for c in s.choices)
    elif kind is bool:
        widget, choices = "switch", ()
    elif kind in (int, float):
        widget, choices = ("slider" if s.page_range else "number"), ()
    else:
        widget, choices = "text", ()
    if typing.get_origin(kind) is tuple:  # word pairs, typed as text: "golden=2, gold=1.5"
        default = ", ".join(f"{word}={number:g}" for word, number in default)
    zero_is_all = s.optional and bool(s.page_range) and s.page_range[0] == 0  # 0 on the page: None (all)
    if zero_is_all and default is None:
        default = 0
    low, high = (s.page_range or (s.minimum, s.maximum)) if kind in (int, float) else (None, None)
    label = s.label + (" (0 = all)" if zero_is_all else "")
    return Parameter(name=s.api_name, label=label, help=sentence_case(s.help) + ".", default=default, kind=widget,
                     whole=kind is int, choices=choices, low=low, high=high, step=s.step, spec=s, owners=(owner,),
                     nested=nested, visible="app" in s.faces)


def _collect() -> dict[str, Parameter]:
    found: dict[str, Parameter] = {}

    def add(p: Parameter):
        if p.name in found:  # shared by two settings classes: one parameter, the first's label and help
            old = found[p.name]
            p = dataclasses.replace(old, owners=(*old.owners, *(o for o in p.owners if o not in old.owners)))
        found[p.name] = p

    found["video"] = Parameter("video", "Input video", "The input video file (mp4, webm, mov or gif).", None, "video")
    source = spec(InversionSettings, "prompt")
    add(_from_spec(source, InversionSettings))
    for cls in (TokenFlowSettings, FateZeroSettings):  # the target prompt after the source prompt
        add(_from_spec(spec(cls, "prompt"), cls))
    for s in specs(InversionSettings):
        if {"app", "api"} & s.faces:
            add(_from_spec(s, InversionSettings))
    add(Parameter("editor", "Editor", "TokenFlow: global edits (style, appearance), as the STEM authors ran it. "
                  "FateZero: attention fusion; with blend words, local edits that keep the rest.", "tokenflow",
                  "choice", choices=tuple((EDITOR_LABELS[n], n) for n in EDIT_SETTINGS)))
    for cls in EDIT_SETTINGS.values():
        for s in specs(cls):
            if not {"app", "api"} & s.faces:
                continue
            if s.nested:  # FreeU: the page's three-way switch, then its constants
                switch = spec(s.base_type, "enabled")
                add(Parameter(switch.api_name, switch.label, sentence_case(switch.help) + ".", "default", "choice",
                              choices=tuple((label, value) for value, label in FREEU_CHOICES.items()), spec=switch,
                              owners=(cls,), nested=s.name))
                for inner in specs(s.base_type):
                    if inner.name != "enabled" and {"app", "api"} & inner.faces:
                        add(_from_spec(inner, cls, nested=s.name))
            else:
                add(_from_spec(s, cls))
    return found


PARAMETERS = _collect()

# The endpoints' parameters in the order the app was released with (gradio_client calls by position keep
# working); a parameter added later comes after them.
_INVERSION = ("method", "bases", "iters", "steps", "frames", "stride", "size", "seed")
_EDIT = ("editor", "guidance", "negative_prompt", "pnp_attn", "pnp_conv", "batch_size", "propagation", "self_replace",
         "cross_replace", "blend_words", "blend_threshold", "reweight", "freeu", "freeu_b1", "freeu_b2", "freeu_s1",
         "freeu_s2")
RELEASED = {
    "invert": ("video", "source_prompt", *_INVERSION, "control", "control_scale"),
    "edit": ("video", "source_prompt", "target_prompt", *_INVERSION, *_EDIT, "control", "control_scale"),
    "compare": ("video", "source_prompt", *_INVERSION[1:], "control", "control_scale"),
}


def _endpoint_inputs(kind: str) -> tuple[str, ...]:
    """The endpoint's parameters: its released ones, then every later setting it takes."""
    def takes(p: Parameter) -> bool:
        if p.name in ("video", "source_prompt"):
            return True
        if kind == "compare" and p.name == "method":  # /compare runs both methods
            return False
        if InversionSettings in p.owners:
            return True
        return kind == "edit" and (p.name == "editor" or any(o in EDIT_SETTINGS.values() for o in p.owners))

    names = [n for n in PARAMETERS if takes(PARAMETERS[n])]
    return tuple([n for n in RELEASED[kind] if n in names] + [n for n in names if n not in RELEASED[kind]])


ENDPOINT_INPUTS = {kind: _endpoint_inputs(kind) for kind in RELEASED}
# The page's defaults: the settings' own, but for the page's choices (16 frames rather than all);
# build_app(defaults=...) overrides them.
PAGE_CHOICES = dict(frames=16)
DEFAULTS = {name: PAGE_CHOICES.get(name, p.default) for name, p in PARAMETERS.items()
            if name not in ("video", "source_prompt", "target_prompt")}
# On a CPU the page starts with less work, so a visitor's first job ends in minutes (a GPU keeps DEFAULTS).
CPU_DEFAULTS = dict(steps=10, frames=8, size=256)
# On ZeroGPU the first edit fits the daily GPU quota of a visitor who is not logged in (2 minutes in Hugging
# Face's ZeroGPU docs, 2026; `spaces` asks for 1.5x the app's duration on its half RTX Pro 6000 card):
# 8 frames at 512 px, 50 steps, estimated at 61 s, asks for 92 s.
ZERO_GPU_DEFAULTS = dict(frames=8)
ZERO_GPU_ANONYMOUS_SECONDS, ZERO_GPU_DURATION_FACTOR = 120, 1.5  # the documented quota; `spaces`' stretch


def label_of(name: str) -> str:
    """The page's label of a parameter (its name if it has none)."""
    return PARAMETERS[name].label if name in PARAMETERS else name


def app_label(setting: str, owner: type | None = None) -> str | None:
    """The page's label of the field `setting` of `owner` (else of any settings class the app uses); None if none."""
    for p in PARAMETERS.values():
        if p.spec is not None and p.spec.name == setting and (owner is None or owner in p.owners or (
                p.nested and owner is FreeUSettings)):
            return p.label
    return None


def number(name: str, value, whole: bool) -> int | float:
    """A page or API value as an int (`whole`) or a float; an emptied box, text or a list is one sentence naming
    the control (sliders and number boxes give floats such as 256.0, which are whole)."""
    label = label_of(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ParameterError(f"The {label} box is empty; type a number in it.")
    wrong = ParameterError(f"{label} must be {'a whole number' if whole else 'a number'}, got {value!r}.")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong
    if isinstance(value, int):  # exact, however large (the settings say which range is allowed)
        return value if whole else float(value)
    try:
        parsed = parse_number(value, whole) if isinstance(value, str) else value
    except ValueError:
        raise wrong from None
    if not whole:
        return float(parsed)
    if isinstance(parsed, float) and not parsed.is_integer():
        raise wrong
    return int(parsed)


def parse_number(text: str, whole: bool = False) -> int | float:
    """A number typed as text ("7.5", "256"); digits alone stay an exact int. ValueError if it is not one."""
    return int(text) if whole and text.strip().lstrip("+-").isdigit() else float(text)


def _value(p: Parameter, value):
    """A page value as its setting's field value."""
    kind = p.spec.base_type
    if kind in (int, float):
        got = number(p.name, value, whole=kind is int)
        return None if p.spec.optional and got == 0 and p.low == 0 else got
    if typing.get_origin(kind) is tuple:  # word pairs typed as text, by commas or spaces
        items = [item for item in str(value or "").replace(",", " ").split() if item]
        return WORD_VALUE_PARSERS[p.spec.name](items)
    if kind is bool:
        return bool(value)
    if kind is str and p.spec.choices is None:
        return str(value or "").strip()
    return value


def _fields(cls: type, values: dict) -> dict:
    """The field values of `cls`'s settings among `values` (by parameter name); nested ones stay out."""
    return {p.spec.name: _value(p, values[name]) for name, p in PARAMETERS.items()
            if cls in p.owners and not p.nested and p.spec is not None and name in values}


def inversion_settings(values: dict, model: str, method: str | None = None,
                       prompt_needed: bool = True) -> InversionSettings:
    """The page's values as validated InversionSettings (the cache key); `method` for /compare's runs; without
    `prompt_needed`, an empty source prompt passes (the structure guidance's preview needs none)."""
    prompt = str(values.get("source_prompt") or "").strip()
    if not prompt and prompt_needed:
        raise ParameterError("Describe the input video in the source prompt, e.g. 'a red ball bouncing on a "
                             "wooden floor'; it conditions the inversion.")
    fields = _fields(InversionSettings, {name: v for name, v in values.items() if name != "method" or not method})
    return InversionSettings(model=model, **fields, **({"method": method} if method else {})).validate()


def edit_settings(values: dict) -> TokenFlowSettings | FateZeroSettings:
    """The page's values as the chosen editor's validated settings (FreeU "default": the editor's own)."""
    if not str(values.get("target_prompt") or "").strip():
        raise ParameterError("Type a target prompt that describes the edited video, "
                             "e.g. 'a shiny golden ball bouncing on a marble floor'.")
    editor = values.get("editor") or "tokenflow"
    if editor not in EDIT_SETTINGS:
        raise ParameterError(f"Unknown editor {editor!r}; choose one of: {', '.join(EDIT_SETTINGS)}.")
    cls = EDIT_SETTINGS[editor]
    fields = _fields(cls, values)
    if "source_prompt" in cls.__dataclass_fields__:  # FateZero's word maps need the inversion's prompt
        fields["source_prompt"] = str(values.get("source_prompt") or "").strip()
    for field in {p.nested for p in PARAMETERS.values() if p.nested and cls in p.owners}:
        default = cls.__dataclass_fields__[field].default
        inner = {p.spec.name: _value(p, values[name]) for name, p in PARAMETERS.items()
                 if p.nested == field and cls in p.owners and p.kind != "choice" and name in values}
        switch = next(name for name, p in PARAMETERS.items() if p.nested == field and p.kind == "choice")
        choice = values.get(switch)
        enabled = default.enabled if choice in (None, "", "default") else choice in ("on", True)
        fields[field] = dataclasses.replace(default, enabled=enabled, **inner)
    return cls(**fields).validate()


def editor_default(editor: str, name: str):
    """The editor's own default of a parameter both editors take (the negative prompt: the STEM authors' for
    TokenFlow, none for FateZero)."""
    return spec(EDIT_SETTINGS[editor], PARAMETERS[name].spec.name).default
