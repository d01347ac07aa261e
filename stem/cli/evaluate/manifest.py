"""The evaluate manifest: a JSON or YAML list of clips, checked by a pydantic schema.

    [{"video": "ball.mp4", "source_prompt": "a red ball bouncing", "target_prompts": ["a golden ball bouncing"],
      "frames": 24, "stride": 1, "size": 512, "control": "canny", "control_scale": 0.8, "name": "ball"}]

Video paths are relative to the manifest's folder. Besides the video, its prompts and its name, an
entry may set the per-clip inversion settings (`PER_CLIP`, named as the command's options without
dashes); the others come from the command line. Every error is one sentence naming the file, the
line and entry number, and the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from difflib import get_close_matches
from pathlib import Path

from pydantic import ConfigDict, ValidationError, create_model

from ...engine import InversionSettings
from ...errors import StemError
from ...settings import SettingError, for_face, spec
from ..common import slug
from ..options import dest_of

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# the InversionSettings an entry may set for its clip, by manifest field (the option's name: "frames" for num_frames)
PER_CLIP = {dest_of([spec(InversionSettings, name).flag]): name for name in (
    "num_frames", "stride", "size", "control", "control_model", "control_scale", "canny_low", "canny_high",
    "depth_model")}
TEXTS = 'a list of non-empty texts such as ["a golden ball"]'


def _optional(kind):
    return kind | None, None


# an entry's fields and types (strict: 2.0 is not a whole number, "2" not a number); ranges are the settings'
Entry = create_model(
    "Entry", __config__=ConfigDict(extra="forbid", strict=True),
    video=(str, ...), source_prompt=_optional(str), target_prompts=(list[str], []), name=_optional(str),
    **{key: _optional(spec(InversionSettings, name).base_type) for key, name in PER_CLIP.items()})
MANIFEST_FIELDS = tuple(Entry.model_fields)
WHAT = {"video": "the path of a video file or a folder of frames", "source_prompt": "a text",
        "target_prompts": TEXTS, "name": "a text", **{
            key: {int: "a whole number", float: "a number", str: "a text"}[spec(InversionSettings, name).base_type]
            for key, name in PER_CLIP.items()}}


@dataclass(frozen=True)
class Clip:
    """One manifest entry, checked."""

    name: str                       # unique; names its jobs and files
    video: str                      # as written in the manifest
    path: Path                      # resolved against the manifest's folder
    source_prompt: str
    target_prompts: tuple[str, ...]
    settings: tuple[tuple[str, object], ...] = ()  # (InversionSettings field, value) the entry sets for its clip
    where: str = ""                 # "manifest.json line 3 (entry 1)", for messages
    places: tuple[tuple[str, str], ...] = ()  # (manifest field, where it is: "manifest.json line 4 (entry 1)")

    def inversion(self, base: InversionSettings) -> InversionSettings:
        """`base` with this clip's source prompt and settings, validated; an error names the entry and field."""
        settings = dict(self.settings)
        try:
            return replace(base, prompt=self.source_prompt, **settings).validate()
        except SettingError as error:
            key = next((k for k, name in PER_CLIP.items() if name == error.setting and name in settings), None)
            if key is None:  # the command line's value, with this clip's other settings
                raise StemError(f"{self.where} ({self.video}): {error}") from error
            where = dict(self.places).get(key, self.where)
            raise StemError(f"{where}: {for_face(error, f'field {key!r}')}") from error


def read_manifest(path: str | os.PathLike, default_source_prompt: str = "") -> list[Clip]:
    """The clips of a JSON or YAML manifest, every field checked.

    Raises:
        StemError: one sentence naming the file, line, entry and field of the first problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise StemError(f"The manifest '{path}' does not exist; pass a .json (or .yaml) file listing the clips.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StemError(
            f"Cannot read the manifest '{path}' ({type(error).__name__}); pass a UTF-8 JSON or YAML file."
        ) from error
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    entries = _yaml_entries(text, path.name) if is_yaml else _json_entries(text, path.name)
    if not entries:
        raise StemError(f"The manifest '{path}' lists no clips; add entries like "
                        '{"video": "clip.mp4", "source_prompt": "...", "target_prompts": ["..."]}.')
    clips = [_clip(value, path.name, i, line, lines, path.parent, default_source_prompt)
             for i, (value, line, lines) in enumerate(entries, start=1)]
    seen: dict[str, Clip] = {}
    for clip in clips:
        if clip.name in seen:
            raise StemError(f"{clip.where}: the name '{clip.name}' is taken by {seen[clip.name].where}; "
                            "give one of them a different 'name'.")
        seen[clip.name] = clip
    return clips


def _json_entries(text: str, name: str) -> list[tuple[object, int, dict[str, int]]]:
    """(entry, its line, each key's line) of a JSON list of objects."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise StemError(f"{name} line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}); "
                        "fix the manifest.") from error
    _check_list(data, name)
    # the text is valid JSON: walk the list and each object with raw_decode to find where things are
    decoder, line = json.JSONDecoder(), lambda i: text.count("\n", 0, i) + 1
    entries, i = [], _skip_space(text, _skip_space(text, 0) + 1)
    while text[i] != "]":
        value, end = decoder.raw_decode(text, i)
        keys = _json_keys(text, i, decoder) if isinstance(value, dict) else {}
        entries.append((value, line(i), {k: line(at) for k, at in keys.items()}))
        i = _skip_space(text, end)
        i = _skip_space(text, i + 1) if text[i] == "," else i
    return entries


def _json_keys(text: str, start: int, decoder: json.JSONDecoder) -> dict[str, int]:
    """The offset of each key of the (valid) JSON object that starts at `start`."""
    keys, i = {}, _skip_space(text, start + 1)
    while text[i] != "}":
        key, end = decoder.raw_decode(text, i)
        keys[key] = i
        _, end = decoder.raw_decode(text, _skip_space(text, _skip_space(text, end) + 1))  # past ':' and the value
        i = _skip_space(text, end)
        i = _skip_space(text, i + 1) if text[i] == "," else i
    return keys


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _yaml_entries(text: str, name: str) -> list[tuple[object, int, dict[str, int]]]:
    """(entry, its line, each key's line) of a YAML list of mappings."""
    try:
        import yaml
    except ImportError as error:
        raise StemError(
            f"{name} is YAML but PyYAML is not installed; `pip install pyyaml` or write the manifest as JSON."
        ) from error
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise StemError(
            f"{name}{where}: not valid YAML ({getattr(error, 'problem', None) or error}); fix the manifest."
        ) from error
    _check_list(data, name)
    entries = []
    for value, node in zip(data, root.value):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
        entries.append((value, node.start_mark.line + 1, lines))
    return entries


def _check_list(data, name: str) -> None:
    if not isinstance(data, list):
        raise StemError(f"{name} line 1: the manifest must be a list of clips "
                        '([{"video": ..., "source_prompt": ..., "target_prompts": [...]}, ...]), '
                        f"not a {type(data).__name__}.")


def _clip(value, file: str, number: int, line: int, lines: dict[str, int], folder: Path,
          default_source_prompt: str) -> Clip:
    """Check the `number`-th manifest entry, at `line`; `lines` gives each field's line for the messages."""
    where = f"{file} line {line} (entry {number})"
    if not isinstance(value, dict):
        raise StemError(f"{where}: each clip must be an object with 'video', 'source_prompt' and 'target_prompts', "
                        f"not a {type(value).__name__}.")

    def at(key: str) -> str:
        return f"{file} line {lines.get(key, line)} (entry {number})"

    try:
        entry = Entry.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "video"
        if first["type"] == "extra_forbidden":
            close = get_close_matches(key, MANIFEST_FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"the fields are {', '.join(MANIFEST_FIELDS)}"
            raise StemError(f"{at(key)}: unknown field '{key}'; {hint}") from None
        raise StemError(f"{at(key)}: field '{key}' must be {WHAT[key]}, got {value.get(key)!r}.") from None
    if not entry.video.strip():
        raise StemError(f"{at('video')}: field 'video' must be {WHAT['video']}, got {entry.video!r}.")
    resolved = (folder / Path(entry.video).expanduser()).resolve()
    if not resolved.exists():
        raise StemError(f"{at('video')}: the video '{entry.video}' does not exist (looked for '{resolved}'); fix the "
                        "path, which is relative to the manifest's folder.")
    if not all(p.strip() for p in entry.target_prompts):
        raise StemError(
            f"{at('target_prompts')}: field 'target_prompts' must be {TEXTS}, got {entry.target_prompts!r}."
        )
    name = entry.name if entry.name is not None else slug(Path(entry.video).stem)
    if not NAME_RE.fullmatch(name):
        raise StemError(f"{at('name')}: field 'name' names the clip's files, so it must be letters, digits, '.', '_' "
                        f"or '-', got {name!r}.")
    settings = tuple((PER_CLIP[key], getattr(entry, key)) for key in PER_CLIP if getattr(entry, key) is not None)
    source_prompt = entry.source_prompt if entry.source_prompt is not None else default_source_prompt
    return Clip(name, entry.video, resolved, source_prompt, tuple(entry.target_prompts), settings, where,
                tuple((key, at(key)) for key in value))
