"""Settings defined once: each field of a settings dataclass carries its label, help, range and faces.

A settings dataclass (`InversionSettings`, the editors' settings, `FreeUSettings`) declares every
setting with `setting(...)`, the way `transformers.HfArgumentParser` reads a dataclass: the CLI
builds its options from `specs(cls)`, the app its controls and API parameters, and metrics.json
records `metrics(settings)`. The core names a setting in words (`SettingError`); each face puts
its own name in front with `for_face` (the CLI its flag, the app its label), so no face's names
reach the core and adding a field makes it appear everywhere with no other edit.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Callable

from .errors import StemError

FACES = frozenset({"cli", "app", "api", "metrics"})
METADATA_KEY = "stem.setting"


def setting(default=MISSING, *, label: str, help: str, words: str | None = None, flag: str | None = None,
            minimum=None, maximum=None, choices: tuple | None = None, step=None, faces: frozenset[str] = FACES,
            default_factory=MISSING, note: str | None = None, when: Callable[[object], bool] | None = None,
            api_name: str | None = None, page_range: tuple | None = None,
            choice_labels: dict | None = None) -> dataclasses.Field:
    """A settings dataclass field with its metadata.

    Args:
        default / default_factory: as `dataclasses.field`.
        label: the app's label ("Bases K").
        help: one line saying what the setting changes for the result (CLI --help, the app's info line, the API).
        words: how a core error names it ("the number of bases K"; default: the label in lower case).
        flag: the CLI flag (default "--" + the name with dashes).
        minimum / maximum: inclusive bounds; choices: the allowed values; step: the app slider's step.
        faces: where the setting appears, a subset of {"cli", "app", "api", "metrics"}.
        note: a hint added to an out-of-range error in brackets ("the paper uses 256").
        when: `when(settings)` is False where the setting does nothing (e.g. K outside STEM): not recorded then.
        api_name: the app's and the API's parameter name (default: the flag without its dashes, "--bases" ->
            "bases"; "freeu_b1" for a nested FreeU's --freeu-b1).
        page_range: (low, high) of the app's slider, where the page offers less than the allowed range (K up
            to 1024 of 4096); the app shows a number box for a setting with neither this nor both bounds.
            low 0 for an optional count is "0 = all" (None).
        choice_labels: the app's words for the choices ({"ddim": "DDIM"}; default: the choice itself).
    """
    meta = dict(label=label, help=help, words=words, flag=flag, minimum=minimum, maximum=maximum, choices=choices,
                step=step, faces=frozenset(faces), note=note, when=when, api_name=api_name, page_range=page_range,
                choice_labels=dict(choice_labels or {}))
    return dataclasses.field(default=default, default_factory=default_factory, metadata={METADATA_KEY: meta})


@dataclass(frozen=True)
class Spec:
    """One setting, read from a field's metadata."""

    name: str
    type: object        # the resolved annotation, e.g. int, int | None, FreeUSettings
    default: object
    label: str
    help: str
    words: str
    flag: str
    minimum: object
    maximum: object
    choices: tuple | None
    step: object
    faces: frozenset[str]
    note: str | None = None
    when: Callable[[object], bool] | None = None
    api_name: str = ""              # the app's and the API's name ("bases")
    page_range: tuple | None = None  # the app slider's (low, high) where narrower than the allowed range
    choice_labels: dict = dataclasses.field(default_factory=dict, hash=False)  # the app's words for the choices

    @property
    def base_type(self) -> object:
        """The type without `| None`: int for `int | None`."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        if _is_union(self.type) and len(args) == 1:
            return args[0]
        return self.type

    @property
    def optional(self) -> bool:
        """None is allowed (`int | None`)."""
        return _is_union(self.type) and type(None) in typing.get_args(self.type)

    @property
    def nested(self) -> bool:
        """The setting is itself a settings dataclass (FreeU inside an editor's settings)."""
        return dataclasses.is_dataclass(self.base_type)


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def specs(cls) -> tuple[Spec, ...]:
    """The settings of a settings dataclass (or of an instance's class), in field order."""
    cls = cls if isinstance(cls, type) else type(cls)
    return _specs(cls)


_CACHE: dict[type, tuple[Spec, ...]] = {}


def _specs(cls: type) -> tuple[Spec, ...]:
    if cls not in _CACHE:
        hints = typing.get_type_hints(cls)
        found = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get(METADATA_KEY)
            if meta is None:
                continue
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else MISSING)
            found.append(Spec(
                name=f.name, type=hints[f.name], default=default, label=meta["label"], help=meta["help"],
                words=meta["words"] or meta["label"].lower(), flag=meta["flag"] or "--" + f.name.replace("_", "-"),
                minimum=meta["minimum"], maximum=meta["maximum"], choices=meta["choices"], step=meta["step"],
                faces=meta["faces"], note=meta["note"], when=meta["when"],
                api_name=meta["api_name"] or (meta["flag"] or f.name).removeprefix("--").replace("-", "_"),
                page_range=meta["page_range"], choice_labels=meta["choice_labels"]))
        _CACHE[cls] = tuple(found)
    return _CACHE[cls]


def spec(cls, name: str) -> Spec:
    """The setting `name` of a settings dataclass."""
    for s in specs(cls):
        if s.name == name:
            return s
    raise KeyError(f"{name!r} is not a setting of {cls.__name__ if isinstance(cls, type) else type(cls).__name__}")


class SettingError(StemError):
    """A core error about one setting, worded without any face's names: "The number of bases K must be ...".

    `setting` is the field name ("num_bases"), "" for advice about several. A sentence that names other
    settings or options writes each as "{name}" and gives its words in `mentions` ({"offload": "offloading"}):
    `str(error)` reads the words, `for_face(error, ..., names)` puts each face's own name there.
    """

    def __init__(self, setting: str, message: str, owner: type | None = None, mentions: dict[str, str] | None = None):
        self.template, self.mentions = message, dict(mentions or {})
        super().__init__(self.worded(lambda name: None))
        self.setting = setting  # the field name, e.g. "num_bases"
        self.owner = owner      # the settings dataclass it belongs to, where known

    def worded(self, names) -> str:
        """The sentence with `names(setting)` (or, where that is None, the words) for each mentioned setting."""
        text = self.template
        for name, words in self.mentions.items():
            text = text.replace("{" + name + "}", names(name) or words)
        return sentence_case(text)


def for_face(error: SettingError, name: str, names=None) -> str:
    """The error's sentence after the face's name of the setting: "--bases: the number of bases K must ...".

    `names(setting)`: the face's name of each setting the sentence mentions (None: keep the words); no
    prefix where `name` is empty (advice about several settings).
    """
    message = error.worded(names) if names is not None else str(error)
    if not name:
        return message
    first = message.split(" ", 1)[0]
    if first[1:].islower():  # "The ..." -> "the ...", but "FreeU ..." and "K ..." stay
        message = message[0].lower() + message[1:]
    return f"{name}: {message}"


def sentence_case(words: str) -> str:
    """"the number of bases K" -> "The number of bases K" (only the first letter changes)."""
    return words[:1].upper() + words[1:]


def shown(value) -> str:
    """A bound as an error shows it (2**63 - 1 rather than its 19 digits)."""
    return "2**63 - 1" if value == 2**63 - 1 else str(value)


def check(settings) -> None:
    """Check every setting's type, choices and range from its metadata; `SettingError` for the first bad one.

    A whole number is an int (not 1.5, 2.0 or True: 2.0 would split the cache key from 2), a number an
    int or a finite float, text a str, a switch a bool. Nested settings are checked in turn.
    """
    owner = type(settings)
    for s in specs(owner):
        value = getattr(settings, s.name)
        problem = _problem(s, value)
        if problem is not None:
            raise SettingError(s.name, f"{sentence_case(s.words)} {problem}, got {value!r}.", owner)
        if s.nested and value is not None:
            check(value)


def _problem(s: Spec, value) -> str | None:
    """What is wrong with `value` for the setting `s` (a sentence part), or None."""
    if value is None and s.optional:
        return None
    kind = s.base_type
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        return "must be a whole number (an int)"
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        return "must be a finite number"
    if kind is str and not isinstance(value, str):
        return "must be text"
    if kind is bool and not isinstance(value, bool):
        return "is a switch (True or False)"
    if s.nested and not isinstance(value, kind):
        return f"must be a {kind.__name__}"
    if s.choices is not None and value not in s.choices:
        return f"must be one of: {', '.join(map(str, s.choices))}"
    low, high = s.minimum, s.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        note = f" ({s.note})" if s.note else ""
        if low is not None and high is not None:
            return f"must be between {shown(low)} and {shown(high)}{note}"
        return f"must be {shown(low)} or more{note}" if low is not None else f"must be at most {shown(high)}{note}"
    return None


def metrics(settings, prefix: str = "") -> dict:
    """The settings metrics.json records: the fields whose faces include "metrics" and that apply (`when`).

    A nested settings dataclass is flattened under its field's name (FreeU: freeu, freeu_b1, ...: its
    `enabled` field is the name itself); (word, number) pairs are recorded as a {word: number} dict.
    """
    block = {}
    for s in specs(settings):
        if "metrics" not in s.faces or (s.when is not None and not s.when(settings)):
            continue
        value = getattr(settings, s.name)
        name = prefix + s.name
        if s.nested:
            block.update(flattened(name, metrics(value)))
        elif isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value) and \
                typing.get_origin(s.base_type) is tuple:
            block[name] = {word: number for word, number in value}
        else:
            block[name] = value
    return block


def flattened(name: str, block: dict) -> dict:
    """A nested settings block under its field's name: {"enabled": x, "b1": y} -> {name: x, name_b1: y}."""
    return {(name if key == "enabled" else f"{name}_{key}"): v for key, v in block.items()}
