"""Running an evaluation: the groups split between the processes, each job's row and video written as it
finishes, the rows gathered by the main process, which writes the tables (`report`).

Under `accelerate launch` the groups are split between the processes with
`PartialState.split_between_processes`, each process runs one `Engine` on its own device over the
shared latent cache, and the main process gathers the rows (`gather_object`). A rerun skips every
job whose row (made with the same settings) and video exist, so a killed run loses only the jobs
it was running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from ...editing import edit_video
from ...engine import inversion_metrics
from ...errors import StemError
from ...files import check_output_folder
from ...metrics import load_clip, source_motion, warp_error
from ...video import read_video, write_video
from ..common import EXIT_ERROR, TqdmProgress, make_engine, parse_device, write_json
from .plan import EDIT, RECONSTRUCTION, Group, Job, make_plan
from .report import RECONSTRUCTION_METRICS, RESULT_FILES, write_results

# the processes finish at different times; the gather at the end must outwait the slowest one
GATHER_TIMEOUT = timedelta(hours=48)


def process_state():
    """accelerate's PartialState; without a GPU, processes started by a launcher share the CPU (gloo)."""
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
        log(
            f"{job.id}: {rows[-1]['seconds_job']:.1f} s"
            + (" (inversion from the cache)" if rows[-1]["cache_hit"] else "")
        )
    return rows


def run_job(job: Job, video, engine, scorer, out: Path, process_index: int, progress=None, motion=None,
            chunk_size: int | None = None) -> dict:
    """Run one job; its video and row are written before it returns (the row last, atomically).

    `motion`: `stem.metrics.source_motion(video.frames)`, shared by the jobs of a clip (else estimated here).
    """
    start = time.perf_counter()
    if job.kind == RECONSTRUCTION:
        result = engine.invert(video, job.inversion, engine.plan(video, job.inversion, chunk_size=chunk_size), progress)
        frames, cache_hit, seconds = result.reconstruction, result.cache_hit, result.seconds
        block = inversion_metrics(video, result, motion=motion)
        metrics = {k: block[k] for k in RECONSTRUCTION_METRICS}
    else:
        result = edit_video(engine, video, job.inversion, job.edit,
                            engine.plan(video, job.inversion, job.edit, chunk_size), progress)
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
    from accelerate.utils import broadcast_object_list, gather_object  # accelerate starts up slowly: on use

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
            raise SystemExit(EXIT_ERROR) from None
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
        scorer = (
            load_clip(plan.clip_model, device) if plan.clip_model and needs_clip else None
        )  # the smaller download first
        progress = TqdmProgress() if count == 1 else None
        engine.load(progress)
        todo = sum(job.id not in done_ids for i in mine for job in plan.groups[i].jobs)
        log(f"{todo} jobs in {len(mine)} groups on {engine.parts.device}")
        for i in mine:
            rows += run_group(
                plan.groups[i], engine, scorer, out, done_ids, index, progress, log, args.debug, args.chunk_size
            )
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
        raise StemError(
            f"{len(failed)} of {len(table)} jobs failed (the first: {failed[0]['id']}: {failed[0]['error']}); "
            f"every row is in {out / 'results.json'}; rerun the same command to retry the failed ones."
        )
    return {"out": str(out), "jobs": len(table), "ran": len(rows), "skipped": len(table) - len(rows),
            "processes": count, "summary": str(out / "summary.md")}
