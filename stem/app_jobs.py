"""The jobs behind the app's buttons and endpoints: page values in, the stem API, result files and a status out.

`Jobs.endpoint(kind)` is the Gradio function of /invert, /edit or /compare. A job runs in a worker
thread, one on the model at a time, and checks at every denoising step whether it was stopped (the
Stop button, a cancelled client call, a closed page). Also here: the endpoints' parameters and the
page's defaults, one cost model of a job (the progress bar's weights and ZeroGPU's duration), the
per-process result folder, and the sentences a visitor reads. `app.py` lays out the page and wires it
to these; everything here is tested without a browser.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import inspect
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import unicodedata
import uuid
import weakref
from pathlib import Path
from typing import Callable

import anyio
import av
import gradio as gr
import torch

from stem import Engine, InversionSettings, StemError, inversion_metrics, read_video, write_video
from stem.app_settings import (
    DEFAULTS, EDITOR_LABELS, ENDPOINT_INPUTS, PARAMETERS, app_label,
    edit_settings, inversion_settings, parse_number,
)
from stem.editing import FateZeroSettings, TokenFlowSettings, edit_metrics, edit_video
from stem.files import pid_alive
from stem.settings import SettingError, for_face
from stem.models import TINY_MODEL, default_device
from stem.video import DEFAULT_MAX_FRAMES, SourceTooLarge, Video, copy_audio, open_image, side_by_side

GPU_LIMIT, CPU_LIMIT = "48x512", "16x256"  # per job: frames x size, i.e. frames * size**2 pixels at most
OUTPUT_TTL_SECONDS = 3600  # result files older than this are deleted
RESULTS_PREFIX = "stem-app-"  # the per-process result folder in the temp folder: stem-app-<pid>-<random>

# The endpoints' parameters (ENDPOINT_INPUTS), their defaults, labels and help come from the settings
# dataclasses' specs: see stem.app_settings.
STOPPED = "**Stopped.** Press a button to start again."
NOT_A_VIDEO = "'{name}' is not a video this app can read; upload an mp4, webm, mov or gif clip."
SAME_EDIT = ("♻️ **The same edit as before** (the same clip, inversion and edit settings), from the result cache: "
             "nothing was recomputed.")
SERVER_PROBLEM = ("This server cannot run jobs right now ({what}); please try again later or tell the person who "
                  "runs it (the server log says what to fix).")
log = logging.getLogger("stem.app")


# -- the work of a job: one model of its cost drives the progress bar and ZeroGPU's duration ------------

# One frame through the VAE, in UNet calls of one frame at the same size (from SD 1.5's multiply-adds).
VAE_ENCODE_COST, VAE_DECODE_COST = 0.7, 1.5
METHOD_COST = {"ddim": 1.0, "stem": 1.1, "inflated": 1.5}  # inversion UNet calls, relative to per-frame attention
# UNet frame-calls per denoising step of an edit of n frames with m keyframes.
EDITOR_STEP_COST = {"tokenflow": lambda n, m: 3 * (n + m),  # 3 groups (source, negative, target) x (keyframes + all)
                    "fatezero": lambda n, m: 3 * n}  # 3 groups x all frames, once
# ZeroGPU: seconds of one frame through the SD-1.5 UNet at 512 px on its GPU slice in fp16, with a margin
# of about 2x over published throughput, plus a fixed part for text encoding, moving data and writing the
# videos. On a whole H200 (assets/bench-gpu.md) a 48-frame STEM inversion estimated at 125 s took 40.7 s.
GPU_SECONDS_PER_UNIT, GPU_FIXED_SECONDS = 0.02, 15
# A CPU: seconds of one frame through the SD-1.5 UNet at 512 px with 2 threads (assets/bench-cpu.md: a DDIM
# inversion step of 16 frames at 256 px took 11.8 s on 2 AMD EPYC cores, i.e. 0.74 s a frame at 256 px).
CPU_SECONDS_PER_UNIT, CPU_THREADS_MEASURED = 2.9, 2
PHASE_NAMES = {"loading": ("Loading the model", ""), "encoding": ("Encoding", "frame"),
               "inverting": ("Inverting", "step"), "reconstructing": ("Reconstructing", "step"),
               "decoding": ("Decoding", "frame"), "editing": ("Editing", "step")}
COMPARED = ("DDIM", "STEM")  # the inversions of /compare, in order
DEPTH_COST = 0.5  # one frame through the depth estimator (DPT at 384 px), in UNet calls of one frame at 512 px


def job_phases(kind: str, frames: int, steps: int, method: str = "stem", batch_size: int = 8,
               editor: str = "tokenflow") -> list[tuple[str, float]]:
    """The phases a job reports, in order, each with its work in UNet calls of one frame.

    An inversion encodes, inverts, reconstructs and decodes twice (the reconstruction and the VAE
    round trip); an edit adds the editing steps and one decoding; /compare inverts with DDIM, then STEM.
    """
    def inversion(method: str) -> list[tuple[str, float]]:
        unet = steps * frames * METHOD_COST[method]
        return [("encoding", VAE_ENCODE_COST * frames), ("inverting", unet), ("reconstructing", unet),
                ("decoding", VAE_DECODE_COST * frames), ("decoding", VAE_DECODE_COST * frames)]

    if kind == "invert":
        return inversion(method)
    if kind == "conditions":  # the structure guidance's preview: its condition frames only
        return [("conditions", DEPTH_COST * frames)]
    if kind == "compare":
        return [(f"{label} · {phase}", work) for label in COMPARED for phase, work in inversion(label.lower())]
    keyframes = math.ceil(frames / max(batch_size, 1))
    step_cost = EDITOR_STEP_COST.get(editor, EDITOR_STEP_COST["tokenflow"])
    return inversion(method) + [("editing", steps * step_cost(frames, keyframes)),
                                ("decoding", VAE_DECODE_COST * frames)]


def job_work(kind: str, frames: int, size: int, steps: int, method: str = "stem", batch_size: int = 8,
             editor: str = "tokenflow") -> float:
    """A job's work in UNet calls of one frame at 512 px: its phases' work scaled by the pixels per frame."""
    return sum(w for _, w in job_phases(kind, frames, steps, method, batch_size, editor)) * (size / 512) ** 2


def estimate_gpu_seconds(kind: str, frames: int, size: int, steps: int, method: str = "stem", batch_size: int = 8,
                         editor: str = "tokenflow") -> int:
    """Seconds of GPU a job may take on ZeroGPU (its `duration`): all its work, scaled by the pixels per frame."""
    work = job_work(kind, frames, size, steps, method, batch_size, editor)
    return math.ceil(GPU_FIXED_SECONDS + work * GPU_SECONDS_PER_UNIT)


def estimate_cpu_seconds(work: float, threads: int) -> float:
    """Seconds a job of `work` (see job_work) takes with SD 1.5 on `threads` CPU threads, about."""
    return work * CPU_SECONDS_PER_UNIT * CPU_THREADS_MEASURED / max(threads, 1)


def on_gpu(fn: Callable, duration: Callable[..., int]) -> Callable:
    """`fn` under ZeroGPU's `spaces.GPU`, which holds a GPU only while it runs, for `duration(*args)` seconds.

    Without the `spaces` package (anywhere but Hugging Face Spaces) `fn` runs as it is.
    """
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


class Stopped(Exception):
    """The job was stopped: its Stop button was pressed, its client cancelled it, or its page was closed."""


class JobProgress:
    """The engine's `callback({"phase", "i", "total", ...})` as one bar for the whole job; raises Stopped when asked to.

    The bar is the share of the planned work done (see `job_phases`); its text names the phase, the
    step and the time left at the pace so far. Phases a job skips (an inversion found in the cache)
    leave the plan when a later phase starts. A job of groups of phases ('DDIM · …', then 'STEM · …' in
    /compare) times each group on its own once it has run a second: the cost model's ratio between
    groups is a guess (STEM's EM costs 1.1 DDIMs on a CPU with SD 1.5, 2.8 on an H200, far more on a tiny
    model), so the group being run is timed at its own pace.
    """

    def __init__(self, bar: Callable, phases: list[tuple[str, float]], stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.bar, self.stop, self.clock = bar, stop, clock
        self.names = [name for name, _ in phases]
        self.work = [float(w) for _, w in phases]
        self.current, self.last = -1, (0, 0)  # the phase being run; its last (done, total)
        self.start: tuple[float, float] | None = None  # (time, work done) at the first report
        self.group_start: dict[str, tuple[float, float]] = {}  # the same, per group of phases
        self.fraction = 0.0  # the bar as last shown

    def __call__(self, info: dict) -> None:
        phase, done, total = info["phase"], info["i"], info["total"]
        if self.stop is not None and self.stop.is_set():
            raise Stopped()
        self._follow(phase, done)
        self.last = (done, total)
        name, unit = _phase_name(phase)
        if self.current < 0 or phase != self.names[self.current]:  # not in the plan (e.g. loading)
            self.bar(self.fraction, desc=f"{name}…")
            return
        work_done = sum(self.work[:self.current]) + self.work[self.current] * done / max(total, 1)
        now = self.clock()
        if self.start is None:
            self.start = (now, work_done)
        self.group_start.setdefault(_group(phase), (now, work_done))
        desc = f"{name}: {unit} {done} of {total}" if unit else name
        left = self._seconds_left(now, work_done)
        self.fraction = min(1.0, work_done / max(sum(self.work), 1e-9))
        self.bar(self.fraction, desc=desc + (f" · about {_duration_text(left)} left" if left else ""))

    def _follow(self, phase: str, done: int) -> None:
        """Move to the phase being reported: the current one, or the next planned one of that name."""
        if self.current >= 0 and phase == self.names[self.current]:
            last_done, last_total = self.last
            if done >= last_done and last_done < last_total:
                return  # the same phase, going on
        later = [i for i in range(self.current + 1, len(self.names)) if self.names[i] == phase]
        if not later:
            return
        for skipped in range(self.current + 1, later[0]):
            self.work[skipped] = 0.0  # not run (e.g. the inversion came from the cache)
        self.current = later[0]

    def _seconds_left(self, now: float, work_done: float) -> float | None:
        """The current group's work left at its own pace, the rest at the pace since the first report; None
        until there is a pace to go by."""
        pace = _pace(self.start, now, work_done)
        if pace is None:
            return None
        group = _group(self.names[self.current])
        own = _pace(self.group_start[group], now, work_done) or pace
        left = [(self.work[i] * (1.0 if i > self.current else 1.0 - self.last[0] / max(self.last[1], 1)),
                 own if _group(self.names[i]) == group else pace) for i in range(self.current, len(self.work))]
        return sum(work * seconds for work, seconds in left)


def _pace(start: tuple[float, float], now: float, work_done: float) -> float | None:
    """Seconds per unit of work since `start` (time, work done), after a second of progress."""
    start_time, start_work = start
    if now - start_time < 1.0 or work_done <= start_work:
        return None
    return (now - start_time) / (work_done - start_work)


def _group(phase: str) -> str:
    """'STEM · inverting' -> 'STEM'; a phase of no group -> ''."""
    return phase.rpartition(" · ")[0]


def _phase_name(phase: str) -> tuple[str, str]:
    """'DDIM · inverting' -> ('DDIM · Inverting', 'step')."""
    prefix, _, base = phase.rpartition(" · ")
    name, unit = PHASE_NAMES.get(base, (base.capitalize(), "step"))
    return (f"{prefix} · {name}" if prefix else name), unit


def _duration_text(seconds: float) -> str:
    """42.3 -> '42 s', 125 -> '2 min 5 s'."""
    seconds = max(1, round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


# -- what the page says ------------------------------------------------------------------------------

def parse_limit(text: str) -> int:
    """'48x512' (frames x size) or a plain pixel count -> the most frames * size**2 pixels per job."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise StemError(f"The frames x size limit {text!r} is not valid; write it as FRAMESxSIZE, e.g. 48x512.")
    return parts[0] * parts[1] ** 2 if len(parts) == 2 else parts[0]


def describe_limit(max_pixels: int) -> str:
    """E.g. 'frames × size² ≤ 12,582,912: 48 frames at 512 px, 192 at 256 px'."""
    return (f"frames × size² ≤ {max_pixels:,}: {max_pixels // 512**2} frames at 512 px, "
            f"{max_pixels // 256**2} at 256 px")


def frames_note(used: int, available: int | None, stride: int, requested: int, cap: int, size: int) -> str:
    """The status's note when frames were left out, e.g. ' Used 16 of 50 frames (the limit at 256 px).'"""
    if available is None:
        return ""
    usable = math.ceil(available / stride)
    if used >= usable:
        return ""
    of = f"{usable} frames (every {_ordinal(stride)} of {available})" if stride > 1 else f"{available} frames"
    reason = f"the limit at {size} px" if used == cap else f"Frames is set to {requested}; 0 uses all, up to the limit"
    return f" Used {used} of {of} ({reason})."


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def output_name(source: str | os.PathLike, kind: str, detail: str = "") -> str:
    """A result's file name after its clip and what was done, e.g. 'city-edited-golden-skyscrapers.mp4'."""
    def slug(text: str, limit: int) -> str:  # ASCII words joined by '-': 'Café au lait!' -> 'cafe-au-lait'
        ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
        words = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
        if len(words) > limit:  # cut at a word's end where there is one
            words = words[:limit + 1].rsplit("-", 1)[0] if "-" in words[:limit + 1] else words[:limit]
        return words

    parts = [slug(Path(source).stem, 40) or "clip", kind, slug(detail, 48)]
    return "-".join(p for p in parts if p) + ".mp4"


def _too_large(path: Path, error: SourceTooLarge) -> gr.Error:
    """The sentence for an upload whose frames are too large to decode."""
    return _bad(f"'{path.name}' has {error.frame_size} frames, too large for this app to read; scale it down "
                "(to 2048 pixels on the long side at most) and upload it again.")


def _bad(message: str) -> gr.Error:
    """An error for the page: the sentence in a toast (and the status line), no traceback in the server log."""
    return gr.Error(message, print_exception=False)


def _for_the_page(error: Exception) -> gr.Error:
    """An exception as a sentence a person at the page can act on; the rest goes to the server log."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, Stopped):
        return _bad("The job was stopped.")
    if isinstance(error, SettingError):  # the core's words after this page's label: "Seed: the seed must be ..."
        return _bad(for_face(error, app_label(error.setting, error.owner), app_label))
    if isinstance(error, StemError):
        return _bad(str(error))
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return _bad("The GPU ran out of memory; choose fewer frames, a smaller size or a smaller batch size.")
    log.error("job failed", exc_info=error)  # a bug or the environment
    return _bad(f"The job failed unexpectedly ({type(error).__name__}); try fewer frames or a smaller size, "
                "or tell the person who runs this app (the server log has the details).")


def _how(cache_hit: bool, seconds: float) -> str:
    return (f"reused from the cache ({seconds:.1f} s, no inversion)" if cache_hit
            else f"computed in {seconds:.1f} s (now cached)")


def _jsonable(metrics: dict) -> dict:
    """inf/nan (e.g. the PSNR of identical frames) -> None, so the JSON output stays valid."""
    fix = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    return {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in metrics.items()}


def _describe(settings: InversionSettings, clip: Video, with_method: bool = True) -> str:
    """E.g. 'STEM, K=256, R=5, 50 steps, 16 frames at 512×344'."""
    method = {"stem": f"STEM, K={settings.num_bases}, R={settings.num_iters}, ", "ddim": "DDIM, ",
              "inflated": "inflated DDIM, "}[settings.method] if with_method else ""
    return f"{method}{settings.num_steps} steps, {clip.num_frames} frames at {clip.width}×{clip.height}"


def made_visible(value) -> dict:
    """A result component's new value, made visible (results stay hidden until a job makes them)."""
    return gr.update(value=value, visible=True)


def shown_if_any(value) -> dict:
    """A result component's new value, visible only when there is one (a condition video without guidance: none)."""
    return gr.update(value=value, visible=not _empty(value))


def job_condition(path) -> dict:
    """The condition player after a job: the frames its ControlNet followed; a job without guidance leaves the
    player as it is (the preview of a guidance chosen while that job ran stays)."""
    return gr.skip() if _empty(path) else shown_if_any(path)


# -- media at the edges ---------------------------------------------------------------------------------

def has_audio(path: str | os.PathLike) -> bool:
    """Whether the file has a sound stream (the container's streams only; nothing is decoded or counted)."""
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except (av.error.FFmpegError, OSError):
        return False


def probe_clip(path: str | os.PathLike) -> tuple[int | None, bool]:
    """(frames in the file's first video stream, whether it has sound), from its container; (None, False) if
    unreadable."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            return frames, bool(container.streams.audio)
    except (av.error.FFmpegError, IndexError, OSError):
        return None, False


class ResultFolder:
    """This process's result files: `stem-app-<pid>-*` in the temp folder, made on first use, removed at exit.

    Files older than OUTPUT_TTL_SECONDS are deleted as new ones come; folders left by processes that
    are gone (a crash, a kill) are swept when the next app starts.
    """

    def __init__(self, parent: str | os.PathLike | None = None):
        self.parent = Path(parent or tempfile.gettempdir())
        self.root: Path | None = None
        sweep_result_folders(self.parent)

    def new_path(self, name: str) -> Path:
        """A fresh path `<folder>/<random>/name` for a result file."""
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix=f"{RESULTS_PREFIX}{os.getpid()}-", dir=self.parent))
            atexit.register(self.close)
        now = time.time()
        for old in self.root.iterdir():
            if now - old.stat().st_mtime > OUTPUT_TTL_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        return self.root / uuid.uuid4().hex / name

    def close(self) -> None:
        """Remove the folder and everything in it."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def sweep_result_folders(parent: Path) -> list[Path]:
    """Remove this user's result folders whose process has ended (older unnamed ones after the TTL)."""
    removed = []
    for folder in parent.glob(f"{RESULTS_PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            owner = re.match(rf"{RESULTS_PREFIX}(\d+)-", folder.name)
            stale = (not pid_alive(int(owner.group(1))) if owner
                     else time.time() - folder.stat().st_mtime > OUTPUT_TTL_SECONDS)
        except OSError:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


# -- the jobs behind the buttons and endpoints ----------------------------------------------------------

class Jobs:
    """The handlers behind the buttons and endpoints: page values in, the stem API, files and a status out.

    `endpoint(kind)` is the Gradio function of /invert, /edit or /compare. It runs the job in a worker
    thread, one job on the model at a time; the job's progress callback raises Stopped at the next
    step once the job is cancelled (Stop, a client's cancel, a closed page), so the thread ends within
    one denoising step and the next job starts.
    """

    def __init__(
        self,
        engine: Engine,
        max_pixels: int,
        defaults: dict | None = None,
        results: ResultFolder | None = None,
        clip_scorer=None,
    ):
        self.engine, self.max_pixels = engine, max_pixels
        self.clip_scorer = clip_scorer  # a stem.metrics.ClipScorer: edits also get CLIP metrics
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.results = results or ResultFolder()
        self._model_lock = threading.Lock()  # a stopped job may still finish its step while the next one starts
        self._running: dict[str, set[threading.Event]] = {}  # session -> stop flags of its jobs
        self._errors: dict[str, str] = {}  # session -> the status line of its last failed or stopped job
        self._edits: dict[tuple, tuple] = {}  # (clip's sha256, inversion and edit settings) -> an edit's outputs
        self._previews: dict[str, str] = {}  # session -> the id of its last structure preview (see `previewing`)
        self._local = threading.local()  # the worker thread's stop flag
        self._on_gpu = on_gpu(self._compute, duration=self.gpu_seconds)
        _LIVE_JOBS.add(self)

    # - the Gradio-facing functions -

    def endpoint(self, kind: str) -> Callable:
        """The Gradio function of `kind`: parameters ENDPOINT_INPUTS[kind] (the API's names), then progress and
        request."""
        names = ENDPOINT_INPUTS[kind]
        plain = inspect.Parameter.POSITIONAL_OR_KEYWORD
        signature = inspect.Signature(
            [inspect.Parameter(name, plain) for name in names]
            + [inspect.Parameter("progress", plain, default=gr.Progress()),
               inspect.Parameter("request", plain, default=None, annotation=gr.Request)])

        async def handler(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            progress, request = values.pop("progress"), values.pop("request")
            return await self.run(kind, values, progress, request)

        handler.__signature__ = signature
        handler.__annotations__ = {"request": gr.Request}
        handler.__name__ = handler.__qualname__ = kind
        summary = getattr(self, f"_{kind}").__doc__.strip().splitlines()[0]
        handler.__doc__ = summary + "\n\nArgs:\n" + "".join(f"    {name}: {PARAMETERS[name].help}\n" for name in names)
        return handler

    async def example(self, video, source_prompt, target_prompt, progress=gr.Progress(), request: gr.Request = None):
        """An edit of an example with the page's default settings (cached lazily on Spaces)."""
        values = {**{n: self.defaults[n] for n in ENDPOINT_INPUTS["edit"] if n in self.defaults},
                  "video": video, "source_prompt": source_prompt, "target_prompt": target_prompt}
        return (await self.run("edit", values, progress, request))[:3]

    async def run(self, kind: str, values: dict, progress, request) -> tuple:
        """Run a job in a worker thread; if this call is cancelled, stop the thread at its next step."""
        session = _session(request)
        stop = threading.Event()
        self._running.setdefault(session, set()).add(stop)
        try:
            self.check(kind, values)  # an API call's bad input: refused before the model or a GPU is asked for
            key = await anyio.to_thread.run_sync(self._edit_key, values) if kind == "edit" else None
            if key is not None and key in self._edits and _files_kept(self._edits[key]):
                path, status, metrics, *rest = self._edits[key]
                return (path, f"{SAME_EDIT} {status}", {**metrics, "result_cache_hit": True}, *rest)
            result = await anyio.to_thread.run_sync(
                functools.partial(self._in_worker, kind, values, progress, stop), abandon_on_cancel=True)
            if key is not None:
                self._edits[key] = result
                while len(self._edits) > 256:  # the oldest first
                    self._edits.pop(next(iter(self._edits)))
            return result
        except anyio.get_cancelled_exc_class():
            stop.set()
            self._remember(session, STOPPED)
            raise
        except gr.Error as error:
            self._remember(session, f"⚠️ {error.message}")
            raise
        finally:
            self._running[session].discard(stop)
            if not self._running[session]:
                del self._running[session]

    def _edit_key(self, values: dict) -> tuple:
        """What makes two edits the same: the clip's bytes, the inversion settings and the edit settings."""
        digest = hashlib.sha256()
        with open(values["video"], "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest(), self._settings(values), self._edit_settings(values)

    def check(self, kind: str, values: dict) -> None:
        """Refuse what the job `kind` would refuse, before any work: prompts, settings, the clip's file (its
        container only). Cheap: the page runs it unqueued, so bad input is answered while other jobs run."""
        try:
            settings = self._settings(values, method=None if "method" in values else "stem")
            if kind == "edit":
                self._edit_settings(values)
            self._check_file(values["video"], settings)
        except StemError as error:
            raise _for_the_page(error) from error

    def validator(self, kind: str) -> Callable:
        """The Gradio `validator=` of the job `kind`'s event: `check` before the call joins the queue, so a script's
        bad input is refused at once even while another job holds the model (the page's own calls pass `starting`
        first). It takes the endpoint's parameters and returns one `gr.validate` per parameter: Gradio answers a
        refusal with HTTP 422 naming the parameter and the sentence, which gradio_client raises as a
        ValidationError (a raised gr.Error would reach the client as a bare HTTP 400 without its words)."""
        names = ENDPOINT_INPUTS[kind]

        def validate(*args):
            values = dict(zip(names, args))
            try:
                refused = self.refusal(kind, values)
            except Exception:  # noqa: BLE001 - not a sentence: the job's own check reports it, as before
                refused = None
            name, sentence = refused or (None, "")
            return [gr.validate(n != name, sentence if n == name else "") for n in names]

        validate.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])
        validate.__name__ = validate.__qualname__ = f"check_{kind}"
        return validate

    def refusal(self, kind: str, values: dict) -> tuple[str, str] | None:
        """What `check` refuses, as (the parameter it is about, the sentence); None when the input is fine.

        The parameter is the first whose page default (any text, for a prompt) changes the sentence, the clip
        when the sentence is about the file; the checks that find it never open the file."""
        def sentence(values: dict) -> str | None:
            try:
                self.check(kind, values)
            except gr.Error as error:
                return error.message
            return None

        refused = sentence(values)
        if refused is None:
            return None
        unfiled = {**values, "video": None}  # every check but the file's; then "Upload a video" is the sentence
        if sentence(unfiled) != refused:
            return "video", refused
        for name in ENDPOINT_INPUTS[kind][1:]:
            good = "a clip" if name.endswith("_prompt") else self.defaults[name]
            if sentence({**unfiled, name: good}) != refused:
                return name, refused
        return "video", refused

    def starting(self, kind: str, names: dict) -> Callable:
        """The page's unqueued step before a job: check its input, pick the seed, say it started, show the
        result's player (for the progress bar) and disable the job buttons, enable Stop, until the job ends.

        Its input is {component: value} (Gradio's set of inputs); `names` maps each component to its parameter
        name, and the seed's 'randomise' checkbox to 'randomize'."""
        what = {"invert": "Inverting and reconstructing", "edit": "Editing", "compare": "Comparing DDIM and STEM"}[kind]

        def start(inputs: dict, request: gr.Request = None):
            values, session = {names[component]: value for component, value in inputs.items()}, _session(request)
            randomize = values.pop("randomize")
            self._errors.pop(session, None)  # a job that ended without asking for its last words (e.g. stopped)
            try:
                self.check(kind, values)
            except gr.Error as error:
                self._remember(session, f"⚠️ {error.message}")
                raise
            editor = f" with {_editor_name(values['editor'])}" if kind == "edit" else ""
            status = f"**{what}**{editor}… Press Stop to end it.{self.slow_job_note(kind, values)}"
            shown = (gr.update(visible=True),) * (2 if kind == "compare" else 1)
            return pick_seed(values["seed"], randomize), status, *shown, *button_states(running=True)
        return start

    def previewing(self, names: dict) -> Callable:
        """The page's step (queued apart from the jobs, waiting for none) when the structure guidance is chosen or
        a clip arrives: the edges at once; for depth a request for `preview_depth` on the GPU slot (the player
        shown, empty, for its progress); the player hidden without guidance or without a clip a job would take.
        Never an error: a bad value or a missing clip just shows no preview (a job's own check says why).

        Its input is {component: value}; `names` maps each component to its parameter name. Its outputs: the
        condition player, the depth request (a gr.State whose change starts `preview_depth`)."""
        hidden = gr.update(value=None, visible=False)

        def preview(inputs: dict, request: gr.Request = None) -> tuple:
            values = {names[component]: value for component, value in inputs.items()}
            asked = self._previews[_session(request)] = uuid.uuid4().hex  # what this page asked for last
            while len(self._previews) > 1000:  # pages that have gone
                self._previews.pop(next(iter(self._previews)))
            try:
                settings = self._settings(values, prompt_needed=False)
                if settings.control == "none":
                    return hidden, gr.skip()
                if settings.control == "depth":  # a fresh request each time, so the State changes
                    self._check_file(values.get("video"), settings)
                    return gr.update(value=None, visible=True), {**values, "request": asked}
                return shown_if_any(self._conditions(values, settings=settings)), gr.skip()
            except (gr.Error, StemError):
                return hidden, gr.skip()
        return preview

    async def preview_depth(self, values: dict | None, progress=gr.Progress(), request: gr.Request = None) -> dict:
        """The depth preview `previewing` asked for, computed in the worker (the depth model runs on the GPU, one
        job at a time): the condition player's update; hidden if it cannot be made (the server log says why),
        nothing once the page has asked for another preview (another guidance or clip) meanwhile."""
        def superseded() -> bool:
            return self._previews.get(_session(request)) != values["request"]

        if not values or superseded():
            return gr.skip()
        settings = {name: value for name, value in values.items() if name != "request"}
        try:
            path = await anyio.to_thread.run_sync(functools.partial(
                self._in_worker, "conditions", settings, progress, threading.Event()), abandon_on_cancel=True)
        except gr.Error as error:
            log.warning("no depth preview: %s", error.message)
            path = None
        return gr.skip() if superseded() else shown_if_any(path)

    def stop(self, edited, reconstruction, comparison, table, request: gr.Request = None) -> tuple:
        """The Stop button: stop this page's jobs (the queue drops them at once); hide results left empty."""
        self.page_closed(request)
        self._remember(_session(request), STOPPED)  # for `failed`, which follows a job stopped in the queue
        return (STOPPED, *(gr.update(visible=not _empty(r)) for r in (edited, reconstruction, comparison, table)),
                *button_states(running=False))

    def uploaded(self, video) -> tuple:
        """A new clip: no results of the previous one on screen, and at once the reason if the file is unusable."""
        hidden = gr.update(value=None, visible=False)
        status = "New clip: describe it in the source prompt, then **Invert** or **Edit**."
        if video:
            try:
                self._check_file(video, None)
            except gr.Error as error:
                status = f"⚠️ {error.message}"
        return status, hidden, hidden, hidden, hidden, None, [], hidden, hidden, hidden

    def page_closed(self, request: gr.Request = None) -> None:
        """A page was closed (or its Stop pressed): stop its jobs."""
        for flag in list(self._running.get(_session(request), ())):  # a copy: jobs end on another thread
            flag.set()

    def stop_all(self) -> None:
        """Stop every running job (the server is shutting down)."""
        for flags in list(self._running.values()):
            for flag in list(flags):
                flag.set()

    def failed(self, player, table, request: gr.Request = None) -> tuple:
        """After a failed or stopped job: its sentence stays in the status line; what it revealed hides if empty."""
        status = self._errors.pop(_session(request), "⚠️ The job did not run; press its button again.")
        return (status, gr.update(visible=not _empty(player)), gr.update(visible=not _empty(table)),
                *button_states(running=False))

    def _remember(self, session: str, status: str) -> None:
        """Keep a job's last words for `failed`, which runs next on its page."""
        self._errors[session] = status
        while len(self._errors) > 1000:  # sessions that never ask (API clients)
            self._errors.pop(next(iter(self._errors)))

    def gif_to_video(self, upload) -> str:
        """A GIF from the upload button as an mp4 for the player (the page's video box takes videos only)."""
        if not upload:
            raise _bad("Choose a GIF file to upload.")
        path = Path(upload)
        try:
            with open_image(path) as image:  # a 20000x20000 GIF is refused from its header
                long_side = max(image.size)
            clip = read_video(path, size=min(1024, max(64, long_side)), max_frames=DEFAULT_MAX_FRAMES * 8)
        except SourceTooLarge as error:
            raise _too_large(path, error) from error
        except (OSError, StemError) as error:
            raise _bad(f"'{path.name}' is not a GIF this app can read; upload another GIF or a video.") from error
        target = self.results.new_path(output_name(path, ""))
        write_video(target, clip.frames, clip.fps)
        return str(target)

    # - in the worker thread -

    def _in_worker(self, kind: str, values: dict, progress, stop: threading.Event) -> tuple:
        """Wait for the model (a stopped job may be ending its step), then run the job; errors become sentences."""
        try:
            if not self._model_lock.acquire(blocking=False):
                progress(0.0, desc="Waiting for the previous job to end its step…")
                while not self._model_lock.acquire(timeout=0.1):
                    if stop.is_set():
                        raise Stopped()
            try:
                self._local.stop = stop
                return self._on_gpu(kind, values, progress)
            finally:
                self._local.stop = None
                self._model_lock.release()
        except Exception as error:  # noqa: BLE001 - every failure reaches the page as one sentence
            raise _for_the_page(error) from error

    def _compute(self, kind: str, values: dict, progress) -> tuple:
        """The job itself (on the GPU under ZeroGPU): check the server, then invert, edit, compare or make the
        depth preview (`conditions`)."""
        self._check_server(progress)
        return getattr(self, f"_{kind}")(values, progress)

    def gpu_seconds(self, kind: str, values: dict, progress=None) -> int:
        """ZeroGPU's duration for `_compute(kind, values, progress)`: estimate_gpu_seconds for the frames it will
        use."""
        return estimate_gpu_seconds(kind, *self._job_size(values))

    def slow_job_note(self, kind: str, values: dict) -> str:
        """On a CPU with a real model, the status's warning of a job that takes more than a minute, with the time."""
        on_cpu = torch.device(self.engine.device or default_device()).type == "cpu"
        if not on_cpu or self.engine.model == TINY_MODEL:
            return ""
        seconds = estimate_cpu_seconds(job_work(kind, *self._job_size(values)), torch.get_num_threads())
        if seconds < 60:
            return ""
        return (f" On this CPU it takes about {_duration_text(seconds)} (less if the inversion is cached); fewer "
                "frames or steps or a smaller size in Advanced go faster.")

    def _job_size(self, values: dict) -> tuple:
        """(frames it will use, size, steps, method, batch size, editor) of a job's checked values."""
        size, stride = int(values["size"]), max(1, int(values["stride"]))
        cap = min(self.max_pixels // size**2, DEFAULT_MAX_FRAMES)
        frames = int(values.get("frames") or 0) or cap
        available, _ = probe_clip(values["video"]) if values.get("video") else (None, False)
        if available:
            frames = min(frames, math.ceil(available / stride))
        return (max(1, min(frames, cap)), size, int(values["steps"]), values.get("method", "stem"),
                int(values.get("batch_size", 8)), values.get("editor", "tokenflow"))

    def _check_server(self, progress) -> None:
        """Load the model and check the cache folder; what the operator must fix goes to the log, not the page.

        A cache that cannot store results costs reuse, never the result: that is a warning, and the job runs.
        """
        try:
            self.engine.load(lambda *_: progress(0.0, desc="Loading the model (the first job only)…"))
        except StemError as error:
            log.error("cannot load the model: %s", error)
            raise _bad(SERVER_PROBLEM.format(what="its model could not be loaded")) from error
        try:
            self.engine.cache.ensure_writable()
        except (StemError, OSError) as error:
            log.warning("%s", error)  # the engine warns too, and runs the job

    def _tracker(self, progress, phases) -> JobProgress:
        return JobProgress(progress, phases, getattr(self._local, "stop", None))

    def _invert(self, values: dict, progress) -> tuple:
        """Invert the clip (or reuse its cached inversion) and reconstruct it."""
        settings = self._settings(values)
        clip, note = self._clip(values["video"], settings)
        report = self._tracker(progress, job_phases("invert", clip.num_frames, settings.num_steps, settings.method))
        result = self.engine.invert(clip, settings, callback=report)
        metrics = inversion_metrics(clip, result, self.engine)
        path, sound = self._write(output_name(clip.source, "reconstruction", settings.method),
                                  result.reconstruction, clip, settings)
        status = (f"**Inversion** ({_describe(settings, clip)}): {_how(result.cache_hit, result.seconds)}. "
                  f"Reconstruction PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
                  f"warp error {metrics['warp_error']:.4f}.{note}{sound}")
        return (path, status, _jsonable({"inversion_cache_hit": result.cache_hit, **metrics}),
                self._condition_video(clip, settings))

    def _edit(self, values: dict, progress) -> tuple:
        """Edit the clip towards the target prompt, inverting it first unless its inversion is cached.

        (edited video, status, metrics, then for the page only: the reconstruction, the condition video or None,
        and the "Input | Edited" video).
        """
        settings = self._settings(values)
        edit = self._edit_settings(values)
        clip, note = self._clip(values["video"], settings)
        report = self._tracker(progress, job_phases("edit", clip.num_frames, settings.num_steps, settings.method,
                                                    getattr(edit, "batch_size", 8), edit.editor))
        result = edit_video(self.engine, clip, settings, edit, callback=report)
        path, sound = self._write(output_name(clip.source, "edited", edit.prompt), result.frames, clip, settings)
        reconstruction, _ = self._write(output_name(clip.source, "reconstruction", settings.method),
                                        result.inversion.reconstruction, clip, settings)
        # the frames that were inverted beside their edit, in one video: they play in step, download together
        both, _ = self._write(output_name(clip.source, "input-vs-edited", edit.prompt),
                              side_by_side([clip.frames, result.frames], ["Input", "Edited"]), clip, settings)
        status = (f"**Edit** with {_editor_name(edit.editor)} to “{edit.prompt}” ({_describe(settings, clip)}): "
                  "inversion "
                  f"{_how(result.inversion_cache_hit, result.seconds_inversion)}; "
                  f"editing took {result.seconds_editing:.1f} s.{note}{sound}")
        metrics = edit_metrics(clip, result)
        if self.clip_scorer is not None:
            scores = self.clip_scorer.edit_metrics(result.frames, settings.prompt, edit.prompt)
            metrics.update(scores)
            status += (f" CLIP text alignment {scores['clip_text']:.3f}, Frame-Acc {scores['frame_acc']:.2f}, "
                       f"Tem-Con {scores['tem_con']:.3f} ({scores['clip_model']}).")
        return (path, status, {**_jsonable(metrics), "result_cache_hit": False}, reconstruction,
                self._condition_video(clip, settings), both)

    def _compare(self, values: dict, progress) -> tuple:
        """Invert the clip with DDIM and with STEM; a side-by-side video and a table of metrics."""
        from stem.metrics import source_motion

        jobs = {label: self._settings(values, method=label.lower()) for label in COMPARED}
        clip, note = self._clip(values["video"], jobs["DDIM"])
        report = self._tracker(progress, job_phases("compare", clip.num_frames, jobs["DDIM"].num_steps))
        results = {label: self.engine.invert(clip, s, callback=lambda info, label=label:
                                             report({**info, "phase": f"{label} · {info['phase']}"}))
                   for label, s in jobs.items()}
        stem = jobs["STEM"]
        labels = {"DDIM": "DDIM", "STEM": f"STEM (K={stem.num_bases}, R={stem.num_iters})"}
        motion = source_motion(clip.frames)  # both reconstructions are judged against the clip's motion
        metrics = {labels[k]: inversion_metrics(clip, r, self.engine, motion) for k, r in results.items()}
        panel = side_by_side([clip.frames, *(r.reconstruction for r in results.values())], ["Input", *metrics])
        path, sound = self._write(output_name(clip.source, "ddim-vs-stem"), panel, clip, stem)
        first = next(iter(metrics.values()))
        table = [[label, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['warp_error']:.5f}",
                  "yes" if m["cache_hit"] else "no", f"{m['seconds']:.1f}"] for label, m in metrics.items()]
        table += [["VAE only (reference)", f"{first['psnr_vae']:.2f}", f"{first['ssim_vae']:.4f}", "", "", ""],
                  ["Input video (warp floor)", "", "", f"{first['warp_error_source']:.5f}", "", ""]]
        status = (f"**Compare** ({_describe(stem, clip, with_method=False)}): "
                  + "; ".join(f"{labels[k]} {_how(r.cache_hit, r.seconds)}" for k, r in results.items())
                  + ". Higher PSNR/SSIM is a more faithful reconstruction; lower warp error is steadier. "
                    "“VAE only” is the VAE's own reconstruction (encode → decode), the reference for latent "
                    f"methods, not a ceiling: a method can score above it in pixel space.{note}{sound}")
        return (path, table, status, {label: _jsonable(m) for label, m in metrics.items()},
                self._condition_video(clip, stem))

    # - page values -> settings, clip, files -

    def _settings(self, values: dict, method: str | None = None, prompt_needed: bool = True) -> InversionSettings:
        """The page's values as validated InversionSettings (the cache key)."""
        return inversion_settings(_refused(values), self.engine.model, method, prompt_needed)

    def _edit_settings(self, values: dict) -> TokenFlowSettings | FateZeroSettings:
        """The page's values and prompts as the chosen editor's validated settings."""
        return edit_settings(_refused(values))

    def _check_file(self, video, settings: InversionSettings | None) -> None:
        """The cheap checks of a clip: there is one, within the per-job limit (given settings), not empty, a
        container with a video stream (nothing decoded)."""
        if not video:
            raise _bad("Upload a video (or click one of the examples) first.")
        path = Path(video)
        if settings is not None:
            size = settings.size
            cap = min(self.max_pixels // size**2, DEFAULT_MAX_FRAMES)
            if cap < 1:
                raise _bad(f"A size of {size} px is over this app's limit ({describe_limit(self.max_pixels)}) "
                           "even for one frame; choose a smaller size.")
            if settings.num_frames and settings.num_frames > cap:
                raise _bad(f"{settings.num_frames} frames at {size} px is over this app's limit of {cap} frames at "
                           "that size; choose fewer frames or a smaller size.")
        if path.is_file() and path.stat().st_size == 0:
            raise _bad(f"'{path.name}' is empty (0 bytes); upload the complete video file again.")
        if path.is_file() and probe_clip(path)[0] is None:
            raise _bad(NOT_A_VIDEO.format(name=path.name))

    def _clip(self, video, settings: InversionSettings) -> tuple[Video, str]:
        """Read the uploaded clip within the per-job limit; also a note when frames were left out."""
        self._check_file(video, settings)
        path, size = Path(video), settings.size
        cap = min(self.max_pixels // size**2, DEFAULT_MAX_FRAMES)
        wanted = settings.num_frames or cap + 1  # one past the limit tells whether it left frames out
        try:
            clip = read_video(path, num_frames=wanted, stride=settings.stride, size=size)
        except SourceTooLarge as error:
            raise _too_large(path, error) from error
        except StemError as error:
            raise _bad(NOT_A_VIDEO.format(name=path.name)) from error
        if clip.num_frames < wanted:
            return clip, ""  # the clip ended first: every frame is used
        clip = Video(clip.frames[:cap], clip.fps, clip.source)
        available, _ = probe_clip(path)
        return clip, frames_note(clip.num_frames, available, settings.stride, settings.num_frames or 0, cap, size)

    def _conditions(self, values: dict, progress=None, settings: InversionSettings | None = None) -> str | None:
        """The structure guidance's preview: the clip's condition frames for the page's frames, stride and size, as
        a video (None without guidance); no source prompt needed (`settings`: the values' own, if made already)."""
        settings = settings or self._settings(values, prompt_needed=False)
        clip, _ = self._clip(values["video"], settings)  # checks the file first
        if progress is not None and settings.control == "depth":
            progress(0.0, desc="Estimating depth…")
        return self._condition_video(clip, settings)

    def _condition_video(self, clip: Video, settings: InversionSettings) -> str | None:
        """The job's condition frames (edges or depth, as the ControlNet saw them) as a video; None without guidance."""
        if settings.control == "none":
            return None
        cond = self.engine.conditions(clip, settings)  # (N, 3, H, W) in [0, 1], computed once per clip by the job
        path = self.results.new_path(output_name(clip.source, "control", settings.control))
        write_video(path, (cond * 255).round().byte().permute(0, 2, 3, 1).numpy(), clip.fps)
        return str(path)

    def _write(self, name: str, frames, clip: Video, settings: InversionSettings) -> tuple[str, str]:
        """Write a result video at the source fps with the source's sound where it fits; (path, status note)."""
        path = self.results.new_path(name)
        write_video(path, frames, clip.fps)
        return str(path), self._sound(clip, path, settings.stride)

    @staticmethod
    def _sound(clip: Video, path: Path, stride: int) -> str:
        """Copy the source's sound into the result when the frames keep its timing; the status's note."""
        if stride > 1:
            return (f" No sound: at stride {stride} the result plays {stride}× faster than the source."
                    if has_audio(clip.source) else "")
        try:
            if not copy_audio(clip.source, path):
                return ""
        except StemError as error:
            log.warning("%s", error)
            return " No sound: the source's sound could not be copied."
        return f" With the source's sound ({clip.num_frames / clip.fps:.1f} s)."


_LIVE_JOBS: weakref.WeakSet[Jobs] = weakref.WeakSet()  # for stopping every job at shutdown


def _empty(value) -> bool:
    """A result component's value holds nothing (no video; a table without rows)."""
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def _files_kept(edit: tuple) -> bool:
    """Whether the result files of a stored edit's outputs (see `Jobs._edit`) are all still there."""
    path, _status, _metrics, *files = edit
    return all(Path(p).is_file() for p in (path, *files) if p is not None)  # no condition video without guidance


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def pick_seed(seed, randomize: bool) -> int:
    """A fresh random seed when the box is ticked, else the seed as typed."""
    return random.randint(0, 2**31 - 1) if randomize else int(seed or 0)


class Refused(str):
    """A control's value that Gradio's own check refused, as the sentence to show: the handler raises it (see
    `_number`), so the refusal reaches the status line of the page it came from, not only a fading toast."""


def _refused(values: dict) -> dict:
    """The values, unless a control refused one (`Refused`): then its sentence, for the page it came from."""
    for value in values.values():
        if isinstance(value, Refused):
            raise _bad(value)
    return values


def check_numbers(control) -> None:
    """Make a slider's or number box's bad values (text, a list, an emptied box, out of range) one sentence that
    names the control; Gradio's own words name a component index, or nothing at all."""
    if not isinstance(control, (gr.Slider, gr.Number)):
        return
    preprocess, label = control.preprocess, control.label

    def checked(payload):
        if payload is None:
            return Refused(f"The {label} box is empty; type a number in it.")
        if isinstance(payload, str):  # "7.5" from a script is a number
            try:
                payload = parse_number(payload, whole=True)
            except ValueError:
                return Refused(f"{label} must be a number, got {payload!r}.")
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            return Refused(f"{label} must be a number, got {payload!r}.")
        try:
            return preprocess(payload)
        except gr.Error as error:  # out of the control's range
            return Refused(f"{label}: {error.message}")
        except (TypeError, ValueError, OverflowError):  # nan, inf
            return Refused(f"{label} must be a finite number, got {payload!r}.")

    control.preprocess = checked


def add_to_history(history: list, edited, details) -> tuple:
    """An edit joins this clip's history (newest first, each with its prompt and settings): (history, gallery)."""
    if not edited or not isinstance(details, dict) or any(path == edited for path, _ in history):
        return history, gr.update(value=history, visible=bool(history))
    d = details
    caption = " · ".join(part for part in (
        f"“{d.get('prompt', '')}”", _editor_name(d.get("editor", "")), f"{d.get('method', '')} inversion",
        f"{d.get('num_steps', '?')} steps", f"seed {d.get('seed', '?')}", f"guidance {d.get('guidance', '?')}") if part)
    history = [(edited, caption), *history]
    return history, gr.update(value=history, visible=True)


def button_states(running: bool) -> tuple:
    """The updates of the Invert, Edit, Compare and Stop buttons: the job buttons while nothing of this page runs,
    Stop while something does."""
    return (*(gr.update(interactive=not running),) * 3, gr.update(interactive=running))


def _editor_name(editor: str) -> str:
    return EDITOR_LABELS.get(editor, str(editor))


def stop_all_jobs() -> None:
    """Stop every running job of every page (the server is shutting down)."""
    for jobs in list(_LIVE_JOBS):
        jobs.stop_all()
