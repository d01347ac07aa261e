"""`python -m stem evaluate MANIFEST`: the paper's comparison over many clips, on one device or many.

The manifest (JSON, or YAML when PyYAML is installed) is a list of clips:

    [{"video": "ball.mp4", "source_prompt": "a red ball bouncing", "target_prompts": ["a golden ball bouncing"],
      "frames": 24, "stride": 1, "size": 512, "name": "ball"}]        # the last four are optional

Video paths are relative to the manifest's folder. For each clip x method there is one
`reconstruction` job (inversion + reconstruction: PSNR, SSIM, warp error); for each clip x method x
editor x target prompt one `edit` job (CLIP text alignment, Frame-Acc, Tem-Con, warp error with the
source's flow). The jobs that share one inversion form a group that runs on one process, its
reconstruction first, so its edits take the inversion from the cache and no two processes ever
invert the same video with the same settings.

Under `accelerate launch` the groups are split between the processes with
`PartialState.split_between_processes`, each process runs one `Engine` on its own device over the
shared latent cache, and the main process gathers the rows (`gather_object`) and writes the tables.
Output folder:

    rows/<job>.json     one per finished job, written atomically the moment it finishes
    videos/<job>.mp4    the reconstructions and edits
    results.json, results.csv, summary.md, summary.png    the gathered table, written last

A rerun skips every job whose row (made with the same settings) and video exist, so a killed run
loses only the jobs it was running.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from difflib import get_close_matches
from pathlib import Path

import numpy as np

from .cli import EXIT_ERROR, TqdmProgress, add_inversion_options, make_engine, settings_from, write_json
from .editing_cli import EDITOR_OPTIONS, add_edit_options, edit_settings_for, slug
from .errors import StemError
from .files import atomic_output, check_output_folder

RECONSTRUCTION, EDIT = "reconstruction", "edit"
DEFAULT_METHODS = "ddim,stem"
NONE = "none"  # --editors none, --clip-model none
MANIFEST_FIELDS = ("video", "source_prompt", "target_prompts", "frames", "stride", "size", "name")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# the processes finish at different times; the gather at the end must outwait the slowest one
GATHER_TIMEOUT = timedelta(hours=48)

RESULT_FILES = ("results.json", "results.csv", "summary.md", "summary.png")  # written last, by the main process
# the columns of results.csv, in order (a row has the ones that apply to its kind)
COLUMNS = (
    "id", "clip", "video", "kind", "method", "editor", "prompt", "source_prompt", "num_frames", "width", "height",
    "psnr", "ssim", "psnr_vae", "ssim_vae", "psnr_vs_vae", "ssim_vs_vae", "warp_error", "warp_error_source",
    "clip_text", "frame_acc", "tem_con", "clip_model", "seconds", "seconds_job", "cache_hit", "process_index",
    "device", "file", "skipped", "error", "fingerprint",
)
RECONSTRUCTION_METRICS = ("psnr", "ssim", "psnr_vae", "ssim_vae", "psnr_vs_vae", "ssim_vs_vae", "warp_error",
                          "warp_error_source")
# summary tables: (row key, column title, +1 if higher is better else -1, number format)
RECONSTRUCTION_TABLE = (("psnr", "PSNR (dB)", 1, "{:.2f}"), ("ssim", "SSIM", 1, "{:.4f}"),
                        ("psnr_vs_vae", "PSNR vs VAE (dB)", 1, "{:.2f}"), ("warp_error", "warp error", -1, "{:.5f}"),
                        ("seconds", "seconds", -1, "{:.1f}"))
EDIT_TABLE = (("clip_text", "CLIP text", 1, "{:.4f}"), ("frame_acc", "Frame-Acc", 1, "{:.3f}"),
              ("tem_con", "Tem-Con", 1, "{:.4f}"), ("warp_error", "warp error", -1, "{:.5f}"),
              ("seconds", "seconds", -1, "{:.1f}"))


# -- the manifest ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """One manifest entry, checked."""

    name: str                       # unique; names its jobs and files
    video: str                      # as written in the manifest
    path: Path                      # resolved against the manifest's folder
    source_prompt: str
    target_prompts: tuple[str, ...]
    frames: int | None = None       # None: the command's --frames (likewise stride and size)
    stride: int | None = None
    size: int | None = None
    where: str = ""                 # "manifest.json line 3 (entry 1)", for messages


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
        raise StemError(f"Cannot read the manifest '{path}' ({type(error).__name__}); pass a UTF-8 JSON or YAML file.") from error
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
        raise StemError(f"{name} is YAML but PyYAML is not installed; `pip install pyyaml` or write the manifest as JSON.") from error
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise StemError(f"{name}{where}: not valid YAML ({getattr(error, 'problem', None) or error}); fix the manifest.") from error
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

    for key in value:
        if key not in MANIFEST_FIELDS:
            close = get_close_matches(str(key), MANIFEST_FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"the fields are {', '.join(MANIFEST_FIELDS)}"
            raise StemError(f"{at(key)}: unknown field '{key}'; {hint}")
    video = value.get("video")
    if not isinstance(video, str) or not video.strip():
        raise StemError(f"{at('video')}: field 'video' must be the path of a video file or a folder of frames, got {video!r}.")
    resolved = (folder / Path(video).expanduser()).resolve()
    if not resolved.exists():
        raise StemError(f"{at('video')}: the video '{video}' does not exist (looked for '{resolved}'); fix the path, "
                        "which is relative to the manifest's folder.")
    source_prompt = value.get("source_prompt", default_source_prompt)
    if not isinstance(source_prompt, str):
        raise StemError(f"{at('source_prompt')}: field 'source_prompt' must be a text, got {source_prompt!r}.")
    prompts = value.get("target_prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise StemError(f"{at('target_prompts')}: field 'target_prompts' must be a list of non-empty texts "
                        f'such as ["a golden ball"], got {prompts!r}.')
    numbers = {key: value.get(key) for key in ("frames", "stride", "size")}
    for key, n in numbers.items():
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise StemError(f"{at(key)}: field '{key}' must be a whole number of 1 or more, got {n!r}.")
    name = value.get("name", slug(Path(video).stem))
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StemError(f"{at('name')}: field 'name' names the clip's files, so it must be letters, digits, '.', '_' "
                        f"or '-', got {name!r}.")
    return Clip(name, video, resolved, source_prompt, tuple(prompts), where=where, **numbers)


# -- jobs --------------------------------------------------------------------------------------

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
    """Every job of the evaluation, every setting checked (nothing is read or loaded but the manifest)."""
    from .attention import METHODS

    if args.method is not None or args.editor is not None:
        raise StemError("evaluate takes --methods and --editors (comma-separated lists), not --method or --editor.")
    methods = parse_names(args.methods, METHODS, "--methods", "method")
    if not methods:
        raise StemError("--methods is empty; give at least one of " + ", ".join(METHODS) + ".")
    editors = parse_names(args.editors, list(EDITOR_OPTIONS), "--editors", "editor")
    clips = read_manifest(args.video, args.source_prompt)
    if editors:
        bare = next((c for c in clips if not c.target_prompts), None)
        if bare is not None:
            raise StemError(f"{bare.where} ({bare.video}) has no 'target_prompts', but --editors {','.join(editors)} "
                            "asks for edits; add target prompts, or pass --editors none for reconstructions only.")
    groups: dict[tuple, list[Job]] = {}  # one inversion -> its jobs
    for clip in clips:
        overrides = {k: getattr(clip, k) if getattr(clip, k) is not None else getattr(args, k)
                     for k in ("frames", "stride", "size")}
        clip_args = argparse.Namespace(**{**vars(args), **overrides, "source_prompt": clip.source_prompt})
        for method in methods:
            inversion = _checked(clip, lambda: settings_from(clip_args, method))
            jobs = groups.setdefault((clip.path, inversion), [])
            jobs.append(Job(clip, RECONSTRUCTION, inversion))
            for editor in editors:
                editor_args = argparse.Namespace(**{**vars(clip_args), "editor": editor})
                for number, prompt in enumerate(clip.target_prompts, start=1):
                    edit = _checked(clip, lambda: edit_settings_for(editor_args, prompt))
                    jobs.append(Job(clip, EDIT, inversion, edit, number))
    clip_model = None if args.clip_model == NONE or not editors else args.clip_model
    return Plan(clips, methods, editors, clip_model, [Group(tuple(jobs)) for jobs in groups.values()])


def _checked(clip: Clip, make):
    """Settings built for a clip; a setting out of range names the clip too."""
    try:
        return make()
    except StemError as error:
        raise StemError(f"{clip.where} ({clip.video}): {error}") from error


# -- running -----------------------------------------------------------------------------------

def process_state():
    """accelerate's PartialState; without a GPU, processes started by a launcher share the CPU (gloo)."""
    import torch
    from accelerate import PartialState

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    launched = "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=forced_cpu or (launched and not torch.cuda.is_available()), timeout=GATHER_TIMEOUT)


def finished_row(out: Path, job: Job, clip_model: str | None, model: str) -> dict | None:
    """The stored row of a job already done with these settings and this model (its video present), else None."""
    try:
        row = json.loads((out / "rows" / f"{job.id}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("fingerprint") != job.fingerprint(clip_model, model) \
            or not (out / str(row.get("file", ""))).is_file():
        return None
    return {**row, "skipped": True}


def run_group(group: Group, engine, scorer, out: Path, skip: set[str], process_index: int, progress, log,
              debug: bool = False, chunk_size: int | None = None) -> list[dict]:
    """Run the jobs of one group that are not in `skip`, writing each row and video as it finishes."""
    from .metrics import source_motion
    from .video import read_video

    todo = [job for job in group.jobs if job.id not in skip]
    if not todo:
        return []
    inversion = group.jobs[0].inversion
    try:
        video = read_video(group.jobs[0].clip.path, num_frames=inversion.num_frames, stride=inversion.stride,
                           size=inversion.size, max_frames=inversion.max_frames)
    except Exception as error:  # noqa: BLE001 - recorded in the job's row; the other groups go on
        if debug:
            raise
        return [_failed(job, error, process_index, log) for job in todo]
    motion = source_motion(video.frames)  # every job's warp error is judged against the clip's motion
    rows = []
    for job in todo:
        try:
            rows.append(run_job(job, video, engine, scorer, out, process_index, progress, motion, chunk_size))
        except Exception as error:  # noqa: BLE001 - as above
            if debug:
                raise
            rows.append(_failed(job, error, process_index, log))
            continue
        log(f"{job.id}: {rows[-1]['seconds_job']:.1f} s" + (" (inversion from the cache)" if rows[-1]["cache_hit"] else ""))
    return rows


def run_job(job: Job, video, engine, scorer, out: Path, process_index: int, progress=None, motion=None,
            chunk_size: int | None = None) -> dict:
    """Run one job; its video and row are written before it returns (the row last, atomically).

    `motion`: `stem.metrics.source_motion(video.frames)`, shared by the jobs of a clip (else estimated here).
    """
    from .editing import edit_video
    from .engine import inversion_metrics
    from .metrics import warp_error
    from .video import write_video

    start = time.perf_counter()
    if job.kind == RECONSTRUCTION:
        result = engine.invert(video, job.inversion, engine.plan(video, job.inversion, chunk_size=chunk_size), progress)
        frames, cache_hit, seconds = result.reconstruction, result.cache_hit, result.seconds
        block = inversion_metrics(video, result, motion=motion)
        metrics = {k: block[k] for k in RECONSTRUCTION_METRICS}
    else:
        result = edit_video(engine, video, job.inversion, job.edit, engine.plan(video, job.inversion, job.edit, chunk_size),
                            progress)
        frames, cache_hit, seconds = result.frames, result.inversion_cache_hit, result.seconds_editing
        metrics = {"warp_error": warp_error(video.frames, frames, motion)}
        if scorer is not None:
            metrics.update(scorer.edit_metrics(frames, job.inversion.prompt, job.prompt))
    file = f"videos/{job.id}.mp4"
    write_video(out / file, frames, video.fps)
    row = {
        "id": job.id, "clip": job.clip.name, "video": job.clip.video, "kind": job.kind, "method": job.inversion.method,
        "editor": job.editor, "prompt": job.prompt, "source_prompt": job.inversion.prompt,
        "num_frames": video.num_frames, "width": video.width, "height": video.height, **metrics,
        "seconds": round(seconds, 3), "seconds_job": round(time.perf_counter() - start, 3), "cache_hit": cache_hit,
        "process_index": process_index, "device": str(engine.parts.device), "file": file, "skipped": False,
        "fingerprint": job.fingerprint(scorer.name if scorer is not None else None, engine.model_identity()),
    }
    write_json(out / "rows" / f"{job.id}.json", row)
    return row


def _failed(job: Job, error: Exception, process_index: int, log) -> dict:
    """The row of a job that failed (not stored in rows/, so a rerun tries it again)."""
    message = str(error) if isinstance(error, StemError) else f"{type(error).__name__}: {error}"
    log(f"{job.id} failed: {message}")
    return {"id": job.id, "clip": job.clip.name, "video": job.clip.video, "kind": job.kind,
            "method": job.inversion.method, "editor": job.editor, "prompt": job.prompt,
            "source_prompt": job.inversion.prompt, "process_index": process_index, "error": message}


def cmd_evaluate(args) -> dict:
    from accelerate.utils import broadcast_object_list, gather_object

    from .cli import parse_device
    from .metrics import load_clip

    state = process_state()
    main, index, count = state.is_main_process, state.process_index, state.num_processes
    try:
        plan = make_plan(args)
        if args.device is not None and count > 1:
            raise StemError("--device does not combine with several processes (accelerate gives each its own device); "
                            "leave --device out.")
        device = parse_device(args.device) if args.device is not None else state.device
        out = Path(args.out) if args.out else Path("stem-eval") / Path(args.video).stem
        check_output_folder(out, RESULT_FILES)  # a file or a read-only folder is refused before any job
        engine = make_engine(argparse.Namespace(**{**vars(args), "device": str(device)}))  # loads nothing yet
        model = engine.model_identity() if main else ""  # the weights' fingerprint: no weights loaded for it
    except StemError:
        if not main:  # every process finds the same problem; the main one says it
            raise SystemExit(EXIT_ERROR)
        raise

    # which jobs are done: the main process looks, every process gets its answer (the same view for all)
    done = {job.id: row for job in plan.jobs if (row := finished_row(out, job, plan.clip_model, model))} if main else {}
    pending = [i for i, g in enumerate(plan.groups) if any(job.id not in done for job in g.jobs)] if main else []
    pending, done_ids = broadcast_object_list([pending, set(done)])

    def log(message: str) -> None:
        print(f"[process {index}/{count}] {message}" if count > 1 else message, file=sys.stderr, flush=True)

    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    rows = []
    if mine:
        needs_clip = any(job.kind == EDIT and job.id not in done_ids for i in mine for job in plan.groups[i].jobs)
        scorer = load_clip(plan.clip_model, device) if plan.clip_model and needs_clip else None  # the smaller download first
        progress = TqdmProgress() if count == 1 else None
        engine.load(progress)
        todo = sum(job.id not in done_ids for i in mine for job in plan.groups[i].jobs)
        log(f"{todo} jobs in {len(mine)} groups on {engine.parts.device}")
        for i in mine:
            rows += run_group(plan.groups[i], engine, scorer, out, done_ids, index, progress, log, args.debug, args.chunk_size)
            if progress is not None:
                progress.close()
    rows = gather_object(rows)
    if not main:
        if count > 1:
            state.destroy_process_group()
        raise SystemExit(0)  # the main process reports

    by_id = {**done, **{row["id"]: row for row in rows}}
    table = [by_id[job.id] for job in plan.jobs]
    write_results(out, plan, args, table, count)
    if count > 1:
        state.destroy_process_group()
    failed = [row for row in table if row.get("error")]
    if failed:
        raise StemError(f"{len(failed)} of {len(table)} jobs failed (the first: {failed[0]['id']}: {failed[0]['error']}); "
                        f"every row is in {out / 'results.json'}; rerun the same command to retry the failed ones.")
    return {"out": str(out), "jobs": len(table), "ran": len(rows), "skipped": len(table) - len(rows),
            "processes": count, "summary": str(out / "summary.md")}


# -- results -----------------------------------------------------------------------------------

def write_results(out: Path, plan: Plan, args, rows: list[dict], num_processes: int) -> None:
    """results.json, results.csv, summary.md and summary.png of the gathered rows (each written atomically)."""
    header = {"manifest": str(args.video), "model": args.model, "methods": plan.methods, "editors": plan.editors,
              "clip_model": plan.clip_model, "num_steps": args.steps, "num_bases": args.bases,
              "num_iters": args.iters, "seed": args.seed, "num_processes": num_processes}
    write_json(out / "results.json", {**header, "rows": rows})
    buffer = io.StringIO()
    columns = list(COLUMNS) + sorted({k for row in rows for k in row} - set(COLUMNS))
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("results.csv", buffer.getvalue()), ("summary.md", summary_markdown(header, rows))):
        with atomic_output(out / name) as tmp:
            tmp.write_text(text)
    with atomic_output(out / "summary.png") as tmp:
        plot_summary(rows, tmp)


def table_groups(rows: list[dict], kind: str) -> dict[str, list[dict]]:
    """Rows of one kind without errors, by method (reconstruction) or 'editor / method' (edit), in order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == kind and not row.get("error"):
            label = row["method"] if kind == RECONSTRUCTION else f"{row['editor']} / {row['method']}"
            groups.setdefault(label, []).append(row)
    return groups


def mean_std(rows: list[dict], key: str) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count of a metric; None when no row has it.

    The seconds of a reconstruction count only when it really inverted (not when it came from the cache).
    """
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
              and not (key == "seconds" and row["kind"] == RECONSTRUCTION and row.get("cache_hit"))]
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std, len(values)


def markdown_table(groups: dict[str, list[dict]], columns, first: str) -> list[str]:
    """A paper-style table: mean ± std per row, the best mean of each column in bold."""
    stats = {label: {key: mean_std(rows, key) for key, *_ in columns} for label, rows in groups.items()}
    best = {}
    for key, _, sign, _ in columns:
        means = [s[key][0] for s in stats.values() if s[key] is not None]
        best[key] = max(means, key=lambda m: sign * m) if len(means) > 1 else None
    arrows = {1: "↑", -1: "↓"}
    lines = [f"| {first} | n | " + " | ".join(f"{title} {arrows[sign]}" for _, title, sign, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for label, row_stats in stats.items():
        cells = []
        for key, _, _, fmt in columns:
            s = row_stats[key]
            cell = "–" if s is None else f"{fmt.format(s[0])} ± {fmt.format(s[1])}"
            cells.append(f"**{cell}**" if s is not None and s[0] == best[key] else cell)
        lines.append(f"| {label} | {len(groups[label])} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(header: dict, rows: list[dict]) -> str:
    """summary.md: what was run, the reconstruction table and the editing table, failures."""
    from .metrics import TINY_CLIP
    from .models import TINY_MODEL

    clips = sorted({row["clip"] for row in rows})
    lines = [f"# Evaluation of {header['manifest']}", "",
             f"Model `{header['model']}`, {len(clips)} clips, methods {', '.join(header['methods'])}, "
             f"{header['num_steps']} DDIM steps (STEM: K = {header['num_bases']}, R = {header['num_iters']}), "
             f"{header['num_processes']} process(es)."]
    if header["model"] == TINY_MODEL:
        lines.append("The model is the built-in `tiny-random` (random weights): every number here is noise.")
    lines += ["", "## Reconstruction", "",
              "Mean ± standard deviation over clips. PSNR and SSIM against the input frames, PSNR vs VAE against "
              "the VAE round trip (the best any latent method can do), warp error with the input's optical flow "
              "(lower is steadier), seconds of inversion + reconstruction (inversions from the cache left out).", ""]
    lines += markdown_table(table_groups(rows, RECONSTRUCTION), RECONSTRUCTION_TABLE, "method")
    edits = table_groups(rows, EDIT)
    if edits:
        clip = header["clip_model"]
        lines += ["", "## Editing", "",
                  "Mean ± standard deviation over edits (clip × target prompt). "
                  + (f"CLIP `{clip}`: CLIP text = mean cosine similarity of each edited frame to the target prompt "
                     "(TokenFlow), Frame-Acc = share of frames closer to the target prompt than to the source prompt "
                     "(FateZero), Tem-Con = mean cosine similarity of consecutive frames (FateZero). "
                     if clip else "No CLIP model (--clip-model none). ")
                  + "Warp error of the edit with the source's optical flow; seconds of editing (denoising + decoding).", ""]
        if clip == TINY_CLIP:
            lines += ["The CLIP model is the built-in `tiny-random` (random weights): its scores mean nothing.", ""]
        lines += markdown_table(edits, EDIT_TABLE, "editor / method")
    failed = [row for row in rows if row.get("error")]
    if failed:
        lines += ["", f"## Failed jobs ({len(failed)})", ""] + [f"- `{row['id']}`: {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict], path: Path) -> None:
    """summary.png: one bar chart per metric, mean with the standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(RECONSTRUCTION, key, title, sign) for key, title, sign, _ in RECONSTRUCTION_TABLE[:4]]
    panels += [(EDIT, key, title, sign) for key, title, sign, _ in EDIT_TABLE[:4]]
    panels = [p for p in panels if any(mean_std(g, p[1]) for g in table_groups(rows, p[0]).values())]
    columns = 4
    fig, axes = plt.subplots(max(1, -(-len(panels) // columns)), columns, figsize=(4 * columns, 3.4), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (kind, key, title, sign) in zip(axes.flat, panels):
        groups = table_groups(rows, kind)
        labels = [label for label, g in groups.items() if mean_std(g, key)]
        stats = [mean_std(groups[label], key) for label in labels]
        ax.bar(range(len(labels)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4,
               color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{kind}: {title} {'↑' if sign > 0 else '↓'}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------

def add_evaluate_command(subparsers) -> None:
    """Register the `evaluate` command on the `python -m stem` subparsers."""
    from .metrics import DEFAULT_CLIP_MODEL

    evaluate = subparsers.add_parser(
        "evaluate", help="invert and edit every clip of a manifest with several methods, on one or many GPUs "
                         "(accelerate launch); writes results.json/.csv, summary.md/.png and the videos")
    add_inversion_options(evaluate, prompt_flags=("--source-prompt",),
                          seed_help="seed of the EM initialisation and of the keyframe choice", overrides=dict(
        video=dict(metavar="MANIFEST", help="a .json (or .yaml) list of clips: "
                   '[{"video": ..., "source_prompt": ..., "target_prompts": [...]}], '
                   "optionally with frames, stride, size and name per clip"),
        source_prompt=dict(help="source prompt of the clips whose entry has none"),
        out=dict(help="output folder (default: stem-eval/<manifest name>)"),
        method=dict(default=None, help=argparse.SUPPRESS)))
    add_edit_options(evaluate, overrides=dict(editor=dict(default=None, help=argparse.SUPPRESS)))
    evaluate.add_argument("--methods", default=DEFAULT_METHODS,
                          help="comma-separated inversion methods: stem, ddim, inflated (default: %(default)s)")
    evaluate.add_argument("--editors", default="tokenflow",
                          help=f"comma-separated editors ({', '.join(EDITOR_OPTIONS)}), or none for reconstructions only "
                               "(default: %(default)s, the editor of the paper's main results)")
    evaluate.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, metavar="NAME",
                          help="CLIP for the edit metrics: hub id, local folder, tiny-random, or none (default: %(default)s)")
    evaluate.set_defaults(run=cmd_evaluate)

