"""Video I/O at the edges: read a clip (file, GIF or folder of frames) into RGB frames, write H.264 mp4s.

Video files are decoded and encoded with PyAV (FFmpeg's libraries, shipped inside its wheel, whose
FFmpeg includes libx264): frame rates come as exact fractions, the display matrix turns phone
videos upright, FFmpeg converts every pixel format (10/16-bit, gray, alpha) to 8-bit RGB, and the
decoder's errors are counted so a truncated or damaged file is reported. A file's rate is checked
against its frames' timestamps: a variable-rate file whose container declares an absurd rate (1000 fps)
is read at the rate its frames are shown at. GIFs and folders of frames are read with Pillow.
"""

from __future__ import annotations

import errno
import itertools
import numbers
import os
import re
import statistics
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps, ImageSequence

from .errors import StemError
from .files import atomic_output
from .settings import SettingError

try:
    import av
except ImportError:  # the engine and the GPU check run without PyAV; only reading and writing video files need it
    av = None

DEFAULT_MAX_FRAMES = 120  # cap on frames read when the caller does not choose a number (--frames)
FOLDER_FPS = 10.0  # fps for sources without a frame rate (a folder of frames, a GIF without durations)
# the rates accepted and written: an mp4 holds any of them exactly (below 1/100000 fps the fraction is 0, and
# FFmpeg then writes its default 24 fps); a source whose rate is outside is written at the nearest bound, with a warning
MIN_FPS, MAX_FPS = 0.01, 1000.0
RATE_DENOMINATOR = 100_000  # an fps float comes back as the exact fraction it was made from (30000/1001)
RATE_SAMPLE = 9  # frame timestamps a file's rate is checked against (read past the last kept frame if need be)
# frames above this many pixels are refused before they are decoded: Pillow's own decompression-bomb bound
# (2 x Image.MAX_IMAGE_PIXELS), about 13377 x 13377, 540 MB of RGB per frame
MAX_SOURCE_PIXELS = 178_956_970
# for file pickers; read_video takes anything FFmpeg reads
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WRITE_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}  # containers that hold H.264
WRITE_EXTENSIONS = tuple(WRITE_FORMATS)
MIN_SIZE, MAX_SIZE = 64, 2048
WRITE_CRF = 18  # x264 constant rate factor: visually lossless, so the metrics measure the method, not the codec
BT601 = 6  # AVCOL_*_SMPTE170M: the matrix swscale converts RGB with, tagged so players decode it the same way


class SourceTooLarge(StemError):
    """A source whose frames have more than MAX_SOURCE_PIXELS pixels (a decompression bomb or a huge scan)."""

    def __init__(self, path: Path, pixels: int, width: int | None = None, height: int | None = None):
        self.path, self.pixels, self.width, self.height = path, pixels, width, height
        super().__init__(
            f"'{path}' has {self.frame_size} frames, more than the {MAX_SOURCE_PIXELS:,} pixels read here; "
            "scale it down (to 2048 pixels on the long side at most) and pass it again."
        )

    @property
    def frame_size(self) -> str:
        """E.g. '20000×20000' or, when only the pixel count is known, '400,000,000-pixel'."""
        return f"{self.width}×{self.height}" if self.width and self.height else f"{self.pixels:,}-pixel"


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

    @property
    def rate(self) -> Fraction:
        """The fps as an exact fraction, e.g. 30000/1001 (what `write_video` stores)."""
        return as_rate(self.fps)


def as_rate(fps: float | Fraction) -> Fraction:
    """An fps as the fraction it stands for: 29.97002997... -> 30000/1001, 24.0 -> 24."""
    return Fraction(fps).limit_denominator(RATE_DENOMINATOR)


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

    Frames 0, stride, 2*stride, ... are kept, at most `num_frames` of them. Decoding is lazy: it
    stops at the last frame kept, and only kept frames are converted to RGB. A file that decodes
    only partly (truncated, or with damaged packets) gives the frames that decoded, with a warning
    such as "decoded 15 of 40 frames; the file looks truncated"; one that decodes none is an error.

    Args:
        path: an .mp4/.webm/.mov/.mkv/.avi/.gif file (anything FFmpeg reads), or a folder of
            .png/.jpg/.jpeg/.webp/.bmp frames taken in natural filename order (frame2 before frame10);
            16-bit frames are scaled to 8 bits.
        num_frames: how many frames to keep; None keeps all of them up to `max_frames`
            (with a warning when that cap drops frames).
        stride: keep every `stride`-th frame.
        size: long side of the output frames in pixels (64..2048); the aspect ratio is kept and both
            sides are rounded to multiples of 8 (see `fit_size`).
        max_frames: the cap used when `num_frames` is None; None means no cap.
        fps: overrides the source's frame rate (a folder has none: FOLDER_FPS unless given);
            MIN_FPS..MAX_FPS.

    Returns:
        A `Video` with frames (N, H, W, 3) uint8 RGB and the source's fps (not divided by the stride;
            bounded to MIN_FPS..MAX_FPS, with a warning),
        as the exact fraction `write_video` stores (`as_rate`): the rate written is the rate recorded.

    Raises:
        StemError: a missing, empty, truncated or undecodable source, a symlink loop, or an option out
            of range (`fps` outside MIN_FPS..MAX_FPS); `SourceTooLarge` (a StemError)
            for frames of more than MAX_SOURCE_PIXELS pixels, before any is decoded.
    """
    _check_options(num_frames, stride, size, fps)
    path = Path(path).expanduser()
    _check_exists(path)

    source = _open_source(path)
    limit = num_frames if num_frames is not None else max_frames
    try:
        frames, capped = _take_frames(
            path, source.items, source.decode, stride, limit, size, report_cap=num_frames is None
        )
        rate = source.rate()  # may decode a few frames more for their timestamps, so before the problem report
        problem = source.problem()
    finally:
        source.close()
    if problem:
        warnings.warn(problem, stacklevel=2)
    if capped:
        warnings.warn(
            f"'{path}' has more than {max_frames} frames at stride {stride}; kept the first {max_frames} "
            f"(pass --frames / num_frames to choose how many to read).",
            stacklevel=2,
        )
    if fps is None and rate is None:
        warnings.warn(f"'{path}' has no frame rate; using {FOLDER_FPS:g} fps (pass --fps to set it).", stacklevel=2)
    if fps is None and rate is not None and not MIN_FPS <= rate <= MAX_FPS:
        # the app and `evaluate` have no --fps: the outputs are written at the nearest rate in the bounds
        bounded = as_rate(min(max(float(rate), MIN_FPS), MAX_FPS))
        warnings.warn(f"'{path}' plays at {float(rate):g} fps, outside the {MIN_FPS:g} to {MAX_FPS:g} fps the "
                      f"outputs are written at; writing them at {float(bounded):g} fps (pass --fps to choose).",
                      stacklevel=2)
        rate = bounded
    # the rate as the fraction write_video stores, so metrics.json records the rate the mp4 plays at
    chosen = as_rate(fps) if fps is not None else rate or Fraction(FOLDER_FPS)
    return Video(frames=np.stack(frames), fps=float(as_rate(chosen)), source=str(path))


def check_fps(fps: float | None) -> None:
    """Refuse in one sentence a frame rate an mp4 cannot be written at (None: the source's rate)."""
    if fps is None:
        return
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not MIN_FPS <= fps <= MAX_FPS:  # NaN too
        raise SettingError("fps", f"The frame rate must be a positive number of frames per second between "
                           f"{MIN_FPS:g} and {MAX_FPS:g} (got {fps}).")


def _check_exists(path: Path) -> None:
    """Refuse a path that cannot be looked at, saying why: missing, a broken or looping symlink, no permission."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            where = "is a symlink loop" if path.is_symlink() else "goes through a symlink loop"
            raise StemError(
                f"'{path}' {where} (its links lead back to themselves); point it at the "
                "video file or folder of frames, or pass that path instead."
            ) from err
        if path.is_symlink() and err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise StemError(
                f"'{path}' is a symlink to '{os.readlink(path)}', which does not exist; point it at the "
                "video file or folder of frames, or pass that path instead."
            ) from err
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise StemError(f"'{path}' does not exist; pass the path of a video file or a folder of frames.") from err
        raise StemError(
            f"'{path}' cannot be read ({err.strerror}); check its permissions or pass another video."
        ) from err


def _check_options(num_frames: int | None, stride: int, size: int, fps: float | None) -> None:
    """Reject out-of-range reading options with a sentence naming the option."""
    if num_frames is not None and num_frames < 1:
        raise SettingError("num_frames", f"The number of frames must be at least 1 (got {num_frames}).")
    if stride < 1:
        raise SettingError("stride", f"The stride must be at least 1 (got {stride}).")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise SettingError("size", f"The size must be between {MIN_SIZE} and {MAX_SIZE} pixels (got {size}).")
    check_fps(fps)


@dataclass
class _Source:
    """An opened source: lazy items, how to turn a kept one into RGB, and what reading it found out."""

    items: Iterator
    decode: Callable[[object], np.ndarray]  # item -> (H, W, 3) uint8 RGB
    rate: Callable[[], Fraction | None]  # None: the source has no frame rate (known once read, for a GIF)
    problem: Callable[[], str | None] = lambda: None  # a warning sentence when decoding went wrong
    close: Callable[[], None] = lambda: None


def _open_source(path: Path) -> _Source:
    """Open a folder of frames, a GIF, or a video file (with PyAV)."""
    if path.is_dir():
        return _Source(iter(_folder_frames(path)), _load_image, lambda: Fraction(FOLDER_FPS))
    if not path.is_file():  # a FIFO or a device would block or never end
        raise StemError(f"'{path}' is not a regular file; pass a video file or a folder of frames.")
    if path.stat().st_size == 0:
        raise StemError(f"'{path}' is empty (0 bytes); pass a complete video file.")
    if path.suffix.lower() == ".gif":
        durations: list[float] = []
        return _Source(_gif_frames(path, durations), lambda frame: frame, lambda: _gif_rate(durations))
    if path.suffix.lower() in IMAGE_EXTENSIONS:  # one still: FFmpeg says 0x0 and "zero frames" for a huge one
        _check_image_size(path)
    decoder = _Decoder(path)
    items = decoder.frames()
    return _Source(
        items, _to_rgb, lambda: decoder.rate(items), decoder.problem, lambda: (items.close(), decoder.close())
    )


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
        except (OSError, EOFError, SyntaxError, ValueError) as err:  # what pillow raises on a cut GIF
            if not frames:
                raise _unreadable(path, str(err)) from err
            warnings.warn(
                f"'{path}' stopped decoding after {len(frames)} kept frames; the file looks truncated, so only "
                "those are used.",
                stacklevel=2,
            )
            break
        if len(frames) == limit:
            return frames, True
        frame = decode(item)  # (H, W, 3) uint8 RGB: every reader converts gray/RGBA/palette/16-bit to RGB
        if target is None:
            target = fit_size(frame.shape[1], frame.shape[0], size)  # every frame gets the first one's size
        frames.append(cv2.resize(frame, target, interpolation=cv2.INTER_AREA))
    if not frames:
        raise StemError(
            f"'{path}' decodes to zero frames (it may be truncated or corrupt); re-export it or pass another video."
        )
    return frames, False


def _unreadable(path: Path, reason: str) -> StemError:
    """The error for a file FFmpeg / Pillow cannot open."""
    return StemError(
        f"'{path}' is not a readable video ({reason}); if it is truncated or damaged re-export it, "
        f"else pass an mp4/webm/mov/gif file or a folder of frames."
    )


ISO_TOP_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"meta", b"pdin", b"moof", b"mfra",
                 b"sidx", b"styp", b"prft"}  # what an mp4 / mov holds at its top level


def _truncated(path: Path) -> StemError | None:
    """The error for an mp4/mov cut short (a top-level box runs past the end, or the index is missing), else None.

    FFmpeg reports such a file as invalid data, or opens it with no streams when the cut falls inside
    the index (which is written last unless the file was made with faststart).
    """
    end = path.stat().st_size
    boxes, offset = set(), 0
    with open(path, "rb") as f:
        while offset + 8 <= end:
            f.seek(offset)
            header = f.read(16)
            size, kind = struct.unpack(">I4s", header[:8])
            if kind not in ISO_TOP_BOXES:
                return None  # not an mp4 (or one this walk does not know): FFmpeg's words stand
            if size == 1:  # a 64-bit size follows
                if len(header) < 16:
                    break
                size = struct.unpack(">Q", header[8:])[0]
            elif size == 0:  # runs to the end of the file
                size = end - offset
            if size < 8:
                return None
            boxes.add(kind)
            if offset + size > end:
                return _cut(path, f"it ends inside its '{kind.decode()}' box, {offset + size - end:,} bytes short")
            offset += size
    if offset < end:
        return _cut(path, "it ends inside a box header")
    if b"moov" not in boxes and b"moof" not in boxes:
        return _cut(path, "it has no 'moov' index")
    return None


def _cut(path: Path, how: str) -> StemError:
    return StemError(f"'{path}' is truncated or damaged and cannot be read ({how}); copy or export the whole "
                     "file again, or pass another video.")


def _need_av() -> None:
    """Refuse in one sentence when PyAV is missing (video files are read and written with it)."""
    if av is None:
        raise StemError("Reading and writing video files needs PyAV; install it with `pip install av`.")


def _av_url(path: str | os.PathLike) -> str:
    """An absolute file: URL, so names with ':' are not read as FFmpeg protocols."""
    return "file:" + os.path.abspath(path)


class _Decoder:
    """The first video stream of a file, decoded by PyAV, counting what failed to decode."""

    def __init__(self, path: Path):
        self.path = path
        _need_av()
        try:
            self.container = av.open(_av_url(path))
        except (av.FFmpegError, OSError, ValueError) as err:
            raise _truncated(path) or _unreadable(path, _ffmpeg_reason(err)) from err
        if not self.container.streams.video:
            self.container.close()
            # an mp4 cut inside its index (written last without faststart) opens with no streams at all
            raise _truncated(path) or StemError(
                f"'{path}' has no video stream; pass a video file (mp4/webm/mov/gif) or a folder of frames.")
        self.stream = self.container.streams.video[0]
        width, height = self.stream.codec_context.width, self.stream.codec_context.height
        if width * height > MAX_SOURCE_PIXELS:  # before a frame is decoded: one would take width*height*3 bytes
            self.container.close()
            raise SourceTooLarge(path, width * height, width, height)
        self.declared = self.stream.frames or 0  # the container's frame count; 0 when it does not say
        self.decoded = 0  # frames out of the decoder
        self.damaged = 0  # of those, frames the decoder marked corrupt (errors concealed)
        self.errors = 0  # packets the decoder refused, or the demuxer's failure
        self.packets = 0  # packets with data read from the container
        self.cut = False  # the demuxer failed: the container ends or breaks early
        self.finished = False  # the whole stream was read
        self.stamps: list[int] = []  # the decoded frames' pts, in the stream's time base

    def frames(self) -> Iterator[av.VideoFrame]:
        """Every decoded frame; packets that fail to decode are counted and skipped."""
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets)  # the last one is empty: it flushes the decoder
            except StopIteration:
                break
            except av.FFmpegError:  # the container itself is cut or broken here: nothing more to read
                self.errors, self.cut = self.errors + 1, True
                break
            self.packets += packet.size > 0
            try:
                decoded = packet.decode()
            except av.FFmpegError:
                self.errors += 1
                continue
            for frame in decoded:
                self.decoded += 1
                self.damaged += bool(frame.is_corrupt)
                if frame.pts is not None:
                    self.stamps.append(frame.pts)
                yield frame
        self.finished = True

    def rate(self, frames: Iterator | None = None) -> Fraction | None:
        """The stream's frame rate as an exact fraction: the declared rate when the frames' timestamps agree.

        The declared rate is the container's average rate, else FFmpeg's guess. It is kept when one
        frame at that rate lasts the median interval between the frames' timestamps, to one tick of
        the time base (a 29.97 fps webm has 33 and 34 ms intervals); else the median interval gives the
        rate, so a variable-rate file declaring 1000 fps whose frames come every 40 ms is read at 25 fps.
        `frames` (this decoder's `frames()`) is read on, undecoded to RGB, until RATE_SAMPLE timestamps are known.
        """
        for _ in itertools.islice(frames or (), max(0, RATE_SAMPLE - len(self.stamps))):
            pass
        declared = None
        for rate in (self.stream.average_rate, self.stream.guessed_rate):  # a Fraction, None, or (PyAV 19) 0/1
            if rate and rate.numerator > 0 and rate.denominator > 0:
                declared = Fraction(rate.numerator, rate.denominator)
                break
        tick = self.stream.time_base
        stamps = sorted(set(self.stamps))
        if tick is None or len(stamps) < 2:
            return declared
        tick = Fraction(tick.numerator, tick.denominator)
        interval = statistics.median_low(b - a for a, b in zip(stamps, stamps[1:])) * tick  # seconds per frame
        if declared is not None and abs(1 / declared - interval) <= tick:
            return declared
        return as_rate(1 / interval)

    def problem(self) -> str | None:
        """A warning sentence when frames failed to decode or are missing, else None."""
        missing = self.finished and self.declared > self.decoded
        if not (self.errors or self.damaged or missing):
            return None
        # fewer packets than the index lists, or a failing demuxer: the file ends early
        kind = "truncated" if self.cut or (self.finished and self.declared > self.packets) else "damaged"
        if self.finished and self.declared:
            head = f"decoded {self.decoded} of {self.declared} frames"
        else:
            head = f"{self.errors} packet(s) failed to decode among the first {self.decoded} frames"
        if self.damaged:
            head += f" ({self.damaged} with concealed errors)"
        return f"'{self.path}': {head}; the file looks {kind}, so only what decoded is used."

    def close(self) -> None:
        self.container.close()


def _ffmpeg_reason(error: Exception) -> str:
    """FFmpeg's own words for an error, without the errno and file name PyAV adds."""
    reason = getattr(error, "strerror", None) or str(error)
    log = getattr(error, "log", None)  # (level, name, message) of FFmpeg's last log line, when PyAV kept it
    if log and len(log) == 3 and log[2]:
        reason = f"{reason}: {log[2].strip()}"
    return f"FFmpeg: {reason}"


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame, turned as its display matrix says (as ffmpeg shows it)."""
    rgb = frame.to_ndarray(format="rgb24")  # FFmpeg converts any pixel format: 10/16-bit, gray, alpha, palette
    turns = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _gif_frames(path: Path, durations: list[float]) -> Iterator[np.ndarray]:
    """Yield a GIF's frames as RGB, appending each frame's duration (ms) to `durations`."""
    try:
        image = open_image(path)
    except OSError as err:
        raise _unreadable(path, f"Pillow: {err}") from err
    with image:
        try:
            for frame in ImageSequence.Iterator(image):
                durations.append(float(frame.info.get("duration") or 0))
                yield np.asarray(frame.convert("RGB"))
        except Image.DecompressionBombError as err:  # a later frame larger than the first
            raise _too_large(path, err) from err


def open_image(path: Path) -> Image.Image:
    """Image.open, refusing (before any pixel is decoded) an image of more than MAX_SOURCE_PIXELS pixels."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:  # Pillow refuses it from the header, with the pixel count
        raise _too_large(path, err) from err
    width, height = image.size
    if width * height > MAX_SOURCE_PIXELS:
        image.close()
        raise SourceTooLarge(path, width * height, width, height)
    return image


def _check_image_size(path: Path) -> None:
    """Refuse an image file of more than MAX_SOURCE_PIXELS pixels from its header; one Pillow cannot read passes."""
    try:
        open_image(path).close()
    except (OSError, SyntaxError, ValueError):  # not an image Pillow knows: FFmpeg's words stand
        pass


def _too_large(path: Path, error: Exception) -> SourceTooLarge:
    """SourceTooLarge for Pillow's DecompressionBombError, with the pixel count its message gives."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return SourceTooLarge(path, int(found.group(1)) if found else MAX_SOURCE_PIXELS + 1)


def _gif_rate(durations: list[float]) -> Fraction:
    """The rate from the mean frame duration; browsers show a 0 ms frame for 100 ms, which is FOLDER_FPS."""
    durations = [d for d in durations if d > 0]
    return as_rate(1000.0 / float(np.mean(durations))) if durations else Fraction(FOLDER_FPS)


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
    """One image file as an RGB array, turned as its EXIF orientation says."""
    try:
        with open_image(path) as image:
            return _image_to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as err:
        raise StemError(f"'{path}' is not a readable image; remove it from the folder or replace it.") from err


def _image_to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB; 16-bit gray (Pillow's modes I;16* and I) is scaled to 8 bits, not clipped."""
    if image.mode.startswith("I;16") or image.mode == "I":
        gray = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray8[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write frames as an H.264 (yuv420p, crf 18) video with PyAV's libx264, atomically.

    The file is written to a temporary name in the same folder and renamed into place, so a reader
    never sees half a file. Every frame is written once (no frame dropped or repeated, whatever the
    fps). Odd heights/widths are padded to even by repeating the last row/column, as yuv420p needs.

    Args:
        path: output file, .mp4 (or .mov/.mkv); missing parent folders are created.
        frames: (N, H, W, 3) uint8 RGB.
        fps: frames per second, e.g. 24 or 30000/1001 (a float or a Fraction, MIN_FPS..MAX_FPS; stored as
            the exact fraction, see `as_rate`, which is what `read_video` gives as `Video.fps`).
    """
    _need_av()
    path = Path(path)
    frames = _check_frames(frames)
    if path.suffix.lower() not in WRITE_EXTENSIONS:
        raise StemError(f"Cannot write '{path}': videos are written as H.264, so name the output '.mp4'.")
    if not MIN_FPS <= fps <= MAX_FPS:  # also NaN; below, the fraction would be 0 and FFmpeg would write 24 fps
        raise StemError(f"Cannot write '{path}' at {fps} fps; the fps must be between {MIN_FPS:g} and {MAX_FPS:g}.")
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
    """Encode frames with libx264 into the container the file name's suffix names."""
    _, h, w, _ = frames.shape
    container_format = WRITE_FORMATS[Path(filename).suffix.lower()]
    options = {"movflags": "+faststart"} if container_format != "matroska" else {}  # index first: plays while loading
    try:
        with av.open(_av_url(filename), "w", format=container_format, options=options) as container:
            stream = container.add_stream("libx264", rate=as_rate(fps))  # a rational, so 30000/1001 stays exact
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(WRITE_CRF)}
            context = stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = BT601
            context.color_range = 1  # limited ("tv") range, as swscale's RGB -> yuv420p gives
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
    except (av.FFmpegError, OSError) as err:
        raise _write_failed(shown_as) from err


def _write_failed(path: Path) -> StemError:
    """The error for a failed encode or write."""
    return StemError(f"Could not write the video '{path}'; check that its folder is writable and has free space.")


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


# -- sound: the source's audio track muxed into a result video (PyAV) ---------------------------

AUDIO_REMUX_CODECS = ("aac", "mp3")  # audio an mp4 holds and browsers play as they are; others become AAC


def copy_audio(source: str | os.PathLike, video_path: str | os.PathLike) -> bool:
    """Add the first audio track of `source` to the video file `video_path`, cut to the video's length.

    The video stream is copied as it is (no re-encoding); the audio is copied as well when it is AAC
    or MP3, else re-encoded to AAC. Audio time 0 is the source's first video frame, so a result made
    from the source's frames 0..N-1 (stride 1) plays in sync. The file is replaced atomically.

    Args:
        source: the clip the video was made from (any container PyAV reads).
        video_path: an mp4/mov/mkv video written by `write_video`, replaced in place.

    Returns:
        True if a track was added; False if the source has no audio (the video is left as it was).

    Raises:
        StemError: the source's audio cannot be decoded or the result cannot be written.
    """
    _need_av()

    video_path = Path(video_path)
    try:
        with av.open(_av_url(source)) as src:
            if not src.streams.audio:
                return False
            with av.open(_av_url(video_path)) as video, atomic_output(video_path) as tmp:
                with av.open(_av_url(tmp), "w", options={"movflags": "+faststart"}) as out:
                    _mux_with_audio(video, src, out)
    except av.error.FFmpegError as err:
        raise StemError(f"Could not copy the sound of '{source}' into '{video_path.name}' ({err}); "
                        "the video itself is fine without it.") from err
    return True


def _mux_with_audio(video, src, out) -> None:
    """Copy `video`'s video stream and `src`'s first audio stream (cut to the video's length) into `out`."""
    video_in, audio_in = video.streams.video[0], src.streams.audio[0]
    video_out = out.add_stream_from_template(video_in)
    remux = audio_in.codec_context.codec.canonical_name in AUDIO_REMUX_CODECS
    if remux:
        audio_out = out.add_stream_from_template(audio_in)
    else:
        layout = audio_in.codec_context.layout.name if audio_in.codec_context.layout.nb_channels <= 2 else "stereo"
        audio_out = out.add_stream("aac", rate=audio_in.codec_context.sample_rate, layout=layout)
    packets = [p for p in video.demux(video_in) if p.dts is not None]  # the last, empty packet only flushes
    end = max(float((p.pts + p.duration) * p.time_base) for p in packets)  # the video's length in seconds
    source_video = src.streams.video[0] if src.streams.video else None
    start = float(source_video.start_time * source_video.time_base) if source_video and source_video.start_time else 0.0

    timed = [(float(p.dts * p.time_base), 0, p, video_out) for p in packets]

    def plays(begin: float, seconds: float) -> bool:  # overlaps the video's [0, end) in video time
        return begin < end and begin + seconds > 0

    if remux:
        for p in src.demux(audio_in):
            if (
                p.pts is None
                or p.dts is None
                or not plays(float(p.pts * p.time_base) - start, float(p.duration * p.time_base))
            ):
                continue
            shift = round(start / p.time_base)
            p.pts, p.dts = p.pts - shift, p.dts - shift
            timed.append((float(p.dts * p.time_base), 1, p, audio_out))
    else:
        codec = audio_out.codec_context
        resampler = av.AudioResampler(format=codec.format.name, layout=codec.layout.name, rate=codec.sample_rate)
        kept = (f for f in src.decode(audio_in) if plays(float(f.time or 0) - start, f.samples / f.sample_rate))
        written = 0  # samples so far: the kept sound is re-timed from 0
        for frame in [*kept, None]:  # None flushes the resampler, then the encoder
            if frame is not None:
                frame.pts = None
            encoded = []
            for resampled in resampler.resample(frame):
                resampled.pts, resampled.time_base = written, Fraction(1, codec.sample_rate)
                written += resampled.samples
                encoded += audio_out.encode(resampled)
            if frame is None:
                encoded += audio_out.encode(None)
            timed += [(float(p.dts * p.time_base), 1, p, audio_out) for p in encoded]
    for _, _, packet, stream in sorted(timed, key=lambda item: item[:2]):
        packet.stream = stream
        out.mux(packet)
