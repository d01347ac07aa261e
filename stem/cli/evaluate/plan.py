"""The jobs of an evaluation: for each clip x method a reconstruction, for each clip x method x editor x
target prompt an edit; the jobs that share one inversion form a group that runs on one process."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ...attention import METHODS
from ...errors import StemError
from ..common import slug
from ..options import EDITOR_SETTINGS, cli_message, edit_for, edit_settings, settings_from
from .manifest import Clip, read_manifest

RECONSTRUCTION, EDIT = "reconstruction", "edit"
NONE = "none"  # --editors none, --clip-model none


@dataclass(frozen=True)
class Job:
    """One row of the table: a reconstruction, or an edit towards one target prompt."""

    clip: Clip
    kind: str                   # RECONSTRUCTION or EDIT
    inversion: object           # InversionSettings (with the clip's frames, stride, size, source prompt)
    edit: object = None         # the editor's settings, for an edit
    number: int = 0             # the target prompt's place in the clip's list, from 1

    @property
    def editor(self) -> str:
        return self.edit.editor if self.edit is not None else ""

    @property
    def prompt(self) -> str:
        return self.edit.prompt if self.edit is not None else ""

    @property
    def id(self) -> str:
        """The job's name in rows/ and videos/, e.g. ball--stem--tokenflow--1-a-golden-ball."""
        base = f"{self.clip.name}--{self.inversion.method}"
        return f"{base}--{RECONSTRUCTION}" if self.kind == RECONSTRUCTION else \
            f"{base}--{self.editor}--{self.number}-{slug(self.prompt)}"

    def fingerprint(self, clip_model: str | None, model: str) -> str:
        """A hash of everything the row depends on: a stored row with another fingerprint is stale.

        `model`: `Engine.model_identity()`, the weights' fingerprint and dtype the latent cache keys on
        (the model id alone would keep the rows of weights re-saved under the same name).
        """
        stat = self.clip.path.stat()
        parts = [str(self.clip.path), stat.st_size, int(stat.st_mtime), repr(self.inversion), repr(self.edit),
                 clip_model if self.kind == EDIT else None, model]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Group:
    """The jobs that share one inversion; they run on one process, the reconstruction first."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Plan:
    """Everything an evaluation runs, in manifest order."""

    clips: list[Clip]
    methods: list[str]
    editors: list[str]
    clip_model: str | None      # None: no CLIP metrics
    groups: list[Group]

    @property
    def jobs(self) -> list[Job]:
        return [job for group in self.groups for job in group.jobs]


def parse_names(text: str, known, flag: str, kind: str) -> list[str]:
    """'ddim, stem' -> ['ddim', 'stem'], each checked against `known`; 'none' or '' -> []."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == [NONE]:
        return []
    for name in names:
        if name not in known:
            raise StemError(f"Unknown {kind} {name!r} in {flag}; choose from {', '.join(known)} (comma-separated).")
    if len(set(names)) != len(names):
        raise StemError(f"{flag} names a {kind} twice; list each once.")
    return names


def make_plan(args) -> Plan:
    """Every job of the evaluation, every setting checked (nothing is read or loaded but the manifest).

    A clip's settings are the command line's with the entry's replaced (`dataclasses.replace`).
    """
    if args.method is not None or args.editor is not None:
        raise StemError("evaluate takes --methods and --editors (comma-separated lists), not --method or --editor.")
    methods = parse_names(args.methods, METHODS, "--methods", "method")
    if not methods:
        raise StemError("--methods is empty; give at least one of " + ", ".join(METHODS) + ".")
    editors = parse_names(args.editors, list(EDITOR_SETTINGS), "--editors", "editor")
    clips = read_manifest(args.video, args.source_prompt)
    if editors:
        bare = next((c for c in clips if not c.target_prompts), None)
        if bare is not None:
            raise StemError(f"{bare.where} ({bare.video}) has no 'target_prompts', but --editors {','.join(editors)} "
                            "asks for edits; add target prompts, or pass --editors none for reconstructions only.")
    base = {method: settings_from(args, method) for method in methods}  # the command line's, checked once
    edits = {editor: edit_settings(args, editor) for editor in editors}
    groups: dict[tuple, list[Job]] = {}  # one inversion -> its jobs
    for clip in clips:
        for method in methods:
            inversion = clip.inversion(base[method])
            jobs = groups.setdefault((clip.path, inversion), [])
            jobs.append(Job(clip, RECONSTRUCTION, inversion))
            for editor in editors:
                for number, prompt in enumerate(clip.target_prompts, start=1):
                    edit = _checked(clip, lambda: edit_for(edits[editor], prompt, clip.source_prompt))
                    jobs.append(Job(clip, EDIT, inversion, edit, number))
    clip_model = None if args.clip_model == NONE or not editors else args.clip_model
    return Plan(clips, methods, editors, clip_model, [Group(tuple(jobs)) for jobs in groups.values()])


def _checked(clip: Clip, make):
    """Settings built for a clip; a setting out of range names the clip too."""
    try:
        return make()
    except StemError as error:
        raise StemError(f"{clip.where} ({clip.video}): {cli_message(error)}") from error
