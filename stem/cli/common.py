"""What every command shares: the engine of the options, the output folder, progress bars, JSON files.

The output folder is checked before the model loads; a run writes its outputs into a staging
folder and moves them into place together at the end, so a failed run leaves the output folder as
it was (and the next run removes what a killed one left).
"""

from __future__ import annotations

import contextlib
import re
import sys
import weakref
from pathlib import Path

import torch

from .. import report
from ..cache import LatentCache
from ..engine import Engine
from ..errors import StemError
from ..files import check_output_folder, output_lock, remove_dead_stages
from ..video import read_video, write_video

EXIT_ERROR = 2


def control_names(settings) -> list[str]:
    """The extra output files of a job with structure guidance: the condition video."""
    return [] if settings.control == "none" else ["control.mp4"]


def write_control(stage: Path, engine, video, settings) -> None:
    """control.mp4: the condition frames (edges or depth) of a job with structure guidance."""
    if settings.control != "none":
        cond = engine.conditions(video, settings)  # (N, 3, H, W) in [0, 1]
        write_video(stage / "control.mp4", (cond * 255).round().byte().permute(0, 2, 3, 1).numpy(), video.fps)


def make_engine(args):
    """An Engine for the parsed arguments (the model loads on first use)."""
    if args.chunk_size is not None and args.chunk_size < 1:
        raise StemError(f"--chunk-size must be 1 or more, got {args.chunk_size}.")  # an option of the command line
    return Engine(args.model, device=parse_device(args.device), dtype=args.dtype, cache=LatentCache(args.cache_dir),
                  offload=args.offload, em_kernel=args.em_kernel)


def parse_device(name: str | None):
    """--device as a torch.device, refused in one sentence when it is unknown or not present here."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise StemError(f"--device {name!r} is not a device; use cuda, mps or cpu.") from error
    present = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not present.get(device.type, False):
        raise StemError(
            f"--device {name} is not available on this machine; leave --device out to use the best available one."
        )
    return device


def load_video(args, settings):
    return read_video(args.video, num_frames=settings.num_frames, stride=settings.stride, size=settings.size,
                      max_frames=settings.max_frames, fps=args.fps)


def out_dir(args) -> Path:
    return Path(args.out) if args.out else Path("stem-out") / Path(args.video).stem


@contextlib.contextmanager
def claimed_out_dir(args, names):
    """The output folder for the files `names`: checked before any work, held against other runs while
    the command works, and cleared of what killed runs left (a move they began is finished)."""
    out = out_dir(args)
    check_output_folder(out, names)
    with output_lock(out):
        remove_dead_stages(out)
        yield out


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename); a NaN fails before anything is written."""
    report.write_json(path, data, indent=2, allow_nan=False, final_newline=False)


class TqdmProgress:
    """The engine's callback({"phase", "i", "total", ...}) -> one tqdm bar per phase on stderr."""

    shown: "weakref.WeakSet[TqdmProgress]" = weakref.WeakSet()  # closed by main() before it reports an error

    def __init__(self):
        self.phase, self.bar = None, None
        TqdmProgress.shown.add(self)

    def __call__(self, info: dict) -> None:
        from tqdm.auto import tqdm

        phase, done, total = info["phase"], info["i"], info["total"]
        if phase == "loading":
            if done == 0:
                print("loading the model...", file=sys.stderr, flush=True)
            return
        if phase != self.phase:
            self.close()
            self.phase, self.bar = phase, tqdm(total=total, desc=phase, unit="step", leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.phase, self.bar = None, None




SLUG_CHARS = 40


def slug(text: str) -> str:
    """A short file-name-safe form of a prompt: 'A red car!' -> 'a-red-car'."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:SLUG_CHARS].rstrip("-") or "prompt"
