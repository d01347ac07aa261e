"""Video I/O at the edges: read a clip (file, GIF or folder of frames) into RGB frames, write H.264 mp4s."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image, ImageSequence

from .errors import StemError
from .files import atomic_output

DEFAULT_MAX_FRAMES = 120  # cap on frames read when the caller does not choose a number (--frames)
FOLDER_FPS = 10.0  # fps for sources without fps metadata (a folder of frames, a GIF without durations)
# for file pickers; read_video takes anything ffmpeg reads
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WRITE_EXTENSIONS = (".mp4", ".mov", ".mkv")  # containers that hold H.264
MIN_SIZE, MAX_SIZE = 64, 2048
WRITE_CRF = 18  # x264 constant rate factor: visually lossless, so the metrics measure the method, not the codec


@dataclass(frozen=True, eq=False)  # eq=False: frames are an array, compare them with np.array_equal
class Video:
    """A clip in memory, ready for the VAE."""

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB, H and W multiples of 8
    fps: float  # the source's fps (kept even when frames were skipped with a stride)
    source: str  # the path it was read from

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]


def _imageio_ffmpeg():
    """imageio-ffmpeg, imported on first use: the engine and the benchmarks import this module without it."""
    import imageio_ffmpeg

    return imageio_ffmpeg


def fit_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Long side = size, aspect kept, both sides rounded to multiples of 8 (>= 8); returns (width, height)."""
    if width <= 0 or height <= 0 or size <= 0:
        raise ValueError(f"fit_size needs positive sizes, got {width}x{height} at {size}")
    scale = size / max(width, height)
    return _round8(width * scale), _round8(height * scale)


def _round8(x: float) -> int:
    """Nearest multiple of 8 (halves round up), at least 8."""
    return max(8, int(x / 8 + 0.5) * 8)


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    stride: int = 1,
    size: int = 512,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    fps: float | None = None,
) -> Video:
    """Read a video file, a GIF or a folder of frames into resized RGB frames.

    Frames 0, stride, 2*stride, ... are kept, at most `num_frames` of them. Decoding streams, so only
    the frames up to the last one kept are decoded. A truncated file that still decodes some frames
    gives those frames (with a warning if decoding failed midway); one that decodes none is an error.

    Args:
        path: an .mp4/.webm/.mov/.mkv/.avi/.gif file (anything ffmpeg reads), or a folder of
            .png/.jpg/.jpeg/.webp/.bmp frames taken in natural filename order (frame2 before frame10).
        num_frames: how many frames to keep; None keeps all of them up to `max_frames`
            (with a warning when that cap drops frames).
        stride: keep every `stride`-th frame.
        size: long side of the output frames in pixels (64..2048); the aspect ratio is kept and both
            sides are rounded to multiples of 8 (see `fit_size`).
        max_frames: the cap used when `num_frames` is None; None means no cap.
        fps: overrides the source's fps (needed for a folder, which has none; default FOLDER_FPS).

    Returns:
        A `Video` with frames (N, H, W, 3) uint8 RGB and the source's fps (not divided by the stride).

    Raises:
        StemError: a missing, empty or undecodable source, or an option out of range.
    """
    _check_options(num_frames, stride, size, fps)
    path = Path(path).expanduser()
    if not path.exists():
        raise StemError(f"'{path}' does not exist; pass the path of a video file or a folder of frames.")

    items, decode, source_fps = _open_source(path)
    limit = num_frames if num_frames is not None else max_frames
    try:
        frames, capped = _take_frames(path, items, decode, stride, limit, size, report_cap=num_frames is None)
    finally:
        if hasattr(items, "close"):
            items.close()  # stops ffmpeg when we leave before the end of the stream
    if capped:
        warnings.warn(
            f"'{path}' has more than {max_frames} frames at stride {stride}; kept the first {max_frames} "
            f"(pass --frames / num_frames to choose how many to read).",
            stacklevel=2,
        )
    return Video(frames=np.stack(frames), fps=float(fps if fps is not None else source_fps()), source=str(path))


def _check_options(num_frames: int | None, stride: int, size: int, fps: float | None) -> None:
    """Reject out-of-range reading options with a sentence naming the option."""
    if num_frames is not None and num_frames < 1:
        raise StemError(f"--frames must be at least 1 (got {num_frames}).")
    if stride < 1:
        raise StemError(f"--stride must be at least 1 (got {stride}).")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise StemError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels (got {size}).")
    if fps is not None and not fps > 0:
        raise StemError(f"--fps must be a positive number (got {fps}).")


def _open_source(path: Path) -> tuple[Iterator, Callable[[object], np.ndarray], Callable[[], float]]:
    """Lazy items of a source, how to decode one item to an RGB frame, and a function giving its fps.

    The fps is a function because a GIF's is known only once its frames have been read.
    """
    if path.is_dir():
        return iter(_folder_frames(path)), _load_image, lambda: FOLDER_FPS
    if path.stat().st_size == 0:
        raise StemError(f"'{path}' is empty (0 bytes); pass a complete video file.")
    if path.suffix.lower() == ".gif":
        durations: list[float] = []
        return _gif_frames(path, durations), lambda frame: frame, lambda: _gif_fps(durations)
    return _ffmpeg_frames(path)


def _take_frames(path, items, decode, stride, limit, size, report_cap) -> tuple[list[np.ndarray], bool]:
    """Decode and resize frames 0, stride, 2*stride, ... (at most `limit`); also say whether the limit cut frames."""
    selected = itertools.islice(items, 0, None, stride)  # a folder's skipped files are never opened
    if limit is not None:
        # one item past the limit tells whether the cap dropped frames; it is not decoded
        selected = itertools.islice(selected, limit + 1 if report_cap else limit)
    frames, target = [], None
    while True:
        try:
            item = next(selected)
        except StopIteration:
            break
        except (OSError, EOFError, SyntaxError, ValueError) as err:  # what pillow / a cut PPM raise
            if not frames:
                raise _unreadable(path) from err
            warnings.warn(f"'{path}' stopped decoding after {len(frames)} kept frames (truncated?); using those.")
            break
        if len(frames) == limit:
            return frames, True
        frame = decode(item)  # (H, W, 3) uint8 RGB: every reader converts gray/RGBA/palette to RGB
        if target is None:
            target = fit_size(frame.shape[1], frame.shape[0], size)  # every frame gets the first one's size
        frames.append(cv2.resize(frame, target, interpolation=cv2.INTER_AREA))
    if not frames:
        raise StemError(
            f"'{path}' decodes to zero frames (it may be truncated or corrupt); re-export it or pass another video."
        )
    return frames, False


def _unreadable(path: Path) -> StemError:
    """The error for a file ffmpeg / pillow cannot decode."""
    what = "pillow" if path.suffix.lower() == ".gif" else "ffmpeg"
    return StemError(
        f"'{path}' is not a readable video ({what} could not decode it); "
        f"pass an mp4/webm/mov/gif file or a folder of frames."
    )


def _ffmpeg_frames(path: Path) -> tuple[Iterator[np.ndarray], Callable, Callable[[], float]]:
    """A video file as a lazy stream of RGB frames decoded by ffmpeg, with its fps."""
    fps = _snap_ntsc(_probe_fps(path))
    if not fps > 0:
        warnings.warn(f"'{path}' has no fps metadata; using {FOLDER_FPS} fps (pass --fps to set it).")
        fps = FOLDER_FPS
    return _ffmpeg_stream(path), lambda frame: frame, lambda: fps


def _ffmpeg_input(path: Path) -> str:
    """An absolute file: URL, so names with ':' or a leading '-' are not read as ffmpeg options or protocols."""
    return "file:" + os.path.abspath(path)


def _probe_fps(path: Path) -> float:
    """The fps ffmpeg reports for the first video stream (0.0 if none); a StemError if it finds no video stream."""
    command = [_imageio_ffmpeg().get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", _ffmpeg_input(path)]
    try:
        # with no output file ffmpeg only prints what it found in the input, then exits
        log = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=60).stderr
    except subprocess.TimeoutExpired as err:
        raise _unreadable(path) from err
    stream = re.search(r"Stream #\S+.*?: Video: .*", log)
    if stream is None:
        raise _unreadable(path)
    rate = re.search(r" ([0-9.]+) fps", stream.group(0)) or re.search(r" ([0-9.]+) tbr", stream.group(0))
    return float(rate.group(1)) if rate else 0.0


def _ffmpeg_stream(path: Path) -> Iterator[np.ndarray]:
    """Yield the first video stream's frames, rotated as the file says, as (H, W, 3) uint8 RGB.

    ffmpeg writes binary PPMs, which carry their own size, so no log parsing is needed to cut the
    stream into frames. Decoding stops where the stream stops (e.g. at a truncated file's cut).
    """
    command = [
        _imageio_ffmpeg().get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
        "-i", _ffmpeg_input(path), "-map", "0:v:0",
        "-fps_mode", "passthrough",  # every decoded frame exactly once: no frames repeated to fill timestamp gaps
        "-pix_fmt", "rgb24", "-f", "image2pipe", "-vcodec", "ppm", "-",
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        while (frame := _read_ppm(process.stdout)) is not None:
            yield frame
    finally:  # also runs when the caller stops early: don't leave ffmpeg decoding the rest
        process.kill()
        process.wait()
        process.stdout.close()


def _read_ppm(stream) -> np.ndarray | None:
    """Read one 8-bit binary PPM (header lines "P6", "W H", "255", then the pixels); None at the end or a cut frame."""
    if stream.readline().strip() != b"P6":
        return None
    width, height = map(int, stream.readline().split())
    stream.readline()  # maxval: 255 for rgb24
    data = stream.read(width * height * 3)
    if len(data) < width * height * 3:
        return None
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


def _snap_ntsc(fps: float) -> float:
    """ffmpeg prints fps to two decimals; restore NTSC rates like 30000/1001 that it rounded to 29.97."""
    rate = round(fps * 1.001)
    if rate > 0 and abs(fps - rate / 1.001) < 0.006 and abs(fps - rate) > 0.006:
        return rate * 1000 / 1001
    return fps


def _gif_frames(path: Path, durations: list[float]) -> Iterator[np.ndarray]:
    """Yield a GIF's frames as RGB, appending each frame's duration (ms) to `durations`."""
    try:
        image = Image.open(path)
    except OSError as err:
        raise _unreadable(path) from err
    with image:
        for frame in ImageSequence.Iterator(image):
            durations.append(float(frame.info.get("duration") or 0))
            yield np.asarray(frame.convert("RGB"))


def _gif_fps(durations: list[float]) -> float:
    """fps from the mean frame duration; browsers show a 0 ms frame for 100 ms, which is FOLDER_FPS."""
    durations = [d for d in durations if d > 0]
    return 1000.0 / float(np.mean(durations)) if durations else FOLDER_FPS


def _folder_frames(folder: Path) -> list[Path]:
    """The image files in a folder, in natural filename order."""
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not files:
        exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        raise StemError(f"'{folder}' contains no image frames ({exts}); put the frames there or pass a video file.")
    return sorted(files, key=_natural_key)


def _natural_key(path: Path) -> list:
    """Sort key that puts frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name.lower())]


def _load_image(path: Path) -> np.ndarray:
    """One image file as an RGB array."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise StemError(f"'{path}' is not a readable image; remove it from the folder or replace it.") from err


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write frames as an H.264 (yuv420p, crf 18) video, atomically.

    The file is written to a temporary name in the same folder and renamed into place, so a reader
    never sees half a file. Every frame is written once (no frame dropped or repeated, whatever the
    fps). Odd heights/widths are padded to even by repeating the last row/column, as yuv420p needs.

    Args:
        path: output file, .mp4 (or .mov/.mkv); missing parent folders are created.
        frames: (N, H, W, 3) uint8 RGB.
        fps: frames per second, e.g. 24 or 30000/1001.
    """
    path = Path(path)
    frames = _check_frames(frames)
    if path.suffix.lower() not in WRITE_EXTENSIONS:
        raise StemError(f"Cannot write '{path}': videos are written as H.264, so name the output '.mp4'.")
    if not fps > 0:
        raise StemError(f"Cannot write '{path}' at {fps} fps; the fps must be positive.")
    frames = _pad_to_even(frames)
    with atomic_output(path) as tmp:
        _encode(str(tmp), frames, fps, shown_as=path)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    """Frames must be a non-empty (N, H, W, 3) uint8 array."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0 or frames.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    return frames


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row/column so H and W are even."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _encode(filename: str, frames: np.ndarray, fps: float, shown_as: Path) -> None:
    """Pipe frames into ffmpeg/libx264."""
    _, h, w, _ = frames.shape
    writer = _imageio_ffmpeg().write_frames(
        filename,
        (w, h),
        fps=Fraction(fps).limit_denominator(100_000),  # passed as a rational, so 30000/1001 stays exact
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        output_params=["-crf", str(WRITE_CRF), "-movflags", "+faststart"],  # moov atom first: plays while loading
        macro_block_size=1,  # dims are already even; don't let imageio resize
        ffmpeg_log_level="error",
    )
    try:
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame).tobytes())
        writer.close()  # waits for ffmpeg to finish the file
    except OSError as err:
        raise _write_failed(shown_as) from err
    finally:
        writer.close()
    if os.path.getsize(filename) == 0:  # imageio does not check ffmpeg's exit status
        raise _write_failed(shown_as)


def _write_failed(path: Path) -> StemError:
    """The error for an ffmpeg write failure."""
    return StemError(f"ffmpeg could not write '{path}'; check that its folder is writable and has free space.")


def side_by_side(videos: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """Put same-length videos next to each other, each under a label, for comparison.

    Panels whose height differs from the first one's are resized to it (aspect kept).

    Args:
        videos: K arrays (N, H_k, W_k, 3) uint8, same N.
        labels: K strings, drawn in white on a dark strip above each panel.

    Returns:
        (N, H + strip, sum of W_k, 3) uint8, both sides padded to even so it can be written as yuv420p.
    """
    if len(videos) != len(labels) or not videos:
        raise ValueError(f"need one label per video, got {len(videos)} videos and {len(labels)} labels")
    videos = [_check_frames(v) for v in videos]
    if len({v.shape[0] for v in videos}) != 1:
        raise ValueError(f"videos must have the same number of frames, got {[v.shape[0] for v in videos]}")
    height = videos[0].shape[1]
    strip_h = _even(max(16, height // 12))
    panels = []
    for video, label in zip(videos, labels):
        video = _resize_height(video, height)
        strip = _label_strip(label, video.shape[2], strip_h)  # (strip_h, W, 3), drawn once
        strips = np.broadcast_to(strip, (video.shape[0], *strip.shape))
        panels.append(np.concatenate([strips, video], axis=1))
    return _pad_to_even(np.concatenate(panels, axis=2))


def _even(x: int) -> int:
    """Round up to even."""
    return x + x % 2


def _resize_height(video: np.ndarray, height: int) -> np.ndarray:
    """Resize every frame to `height`, keeping the aspect ratio."""
    n, h, w, _ = video.shape
    if h == height:
        return video
    width = max(1, round(w * height / h))
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in video])


def _label_strip(label: str, width: int, height: int) -> np.ndarray:
    """A dark strip with the label in white, shrunk to fit the width."""
    strip = np.full((height, width, 3), 32, np.uint8)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    (tw, th), _ = cv2.getTextSize(label, font, 1.0, thickness)
    scale = min(0.6 * height / th, (width - 8) / max(tw, 1))  # text 60% of the strip high, never wider than the panel
    (tw, th), _ = cv2.getTextSize(label, font, scale, thickness)
    origin = (4, (height + th) // 2)
    cv2.putText(strip, label, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return strip
