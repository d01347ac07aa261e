"""Reading, writing and laying out videos: clips are made in code, nothing is read from outside."""

import os
import warnings
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from stem import video as video_module
from stem.errors import StemError
from stem.video import FOLDER_FPS, Video, fit_size, read_video, side_by_side, write_video


def encode(path, frames, rate=24, codec="libx264", pix_fmt="yuv420p", frame_format="rgb24", faststart=True,
           rotation=None):
    """Write frames with PyAV directly (not with write_video): any codec, pixel format, rate or rotation."""
    options = {"movflags": "+faststart"} if faststart and str(path).endswith(".mp4") else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format=frame_format)))
        container.mux(stream.encode())


def make_clip(num_frames=10, width=96, height=64, seed=0):
    """A coloured square moving over a gradient, (N, H, W, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 96.0)], -1)
    frames = np.repeat(background[None], num_frames, 0).astype(np.uint8)
    side = max(4, min(width, height) // 4)
    for t in range(num_frames):
        x0 = (4 * t) % (width - side)
        frames[t, 8:8 + side, x0:x0 + side] = (255, 32, 16 * (seed + 1))
    return frames


@pytest.fixture
def clip_path(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, make_clip(12), fps=24)
    return path


# ---- sizes


@pytest.mark.parametrize(
    "width, height, size, expected",
    [
        (854, 480, 256, (256, 144)),
        (480, 854, 256, (144, 256)),
        (300, 300, 512, (512, 512)),
        (1920, 1080, 512, (512, 288)),
    ],
)
def test_fit_size(width, height, size, expected):
    assert fit_size(width, height, size) == expected


@pytest.mark.parametrize("width, height, size", [(1000, 3, 64), (7, 9, 250), (1279, 719, 333)])
def test_fit_size_gives_multiples_of_8(width, height, size):
    w, h = fit_size(width, height, size)
    assert w % 8 == 0 and h % 8 == 0 and w >= 8 and h >= 8


@pytest.mark.parametrize("width, height, expected", [(854, 480, (144, 256)), (480, 854, (256, 144))])
def test_read_resizes_keeping_aspect(tmp_path, width, height, expected):
    path = tmp_path / "clip.mp4"
    write_video(path, make_clip(4, width, height), fps=24)
    clip = read_video(path, size=256)
    assert isinstance(clip, Video)
    assert clip.frames.shape == (4, *expected, 3) and clip.frames.dtype == np.uint8
    assert (clip.height, clip.width, clip.num_frames) == (*expected, 4)
    assert clip.source == str(path)


# ---- fps and frame counts


@pytest.mark.parametrize("fps", [24.0, 30000 / 1001, 12.5])
def test_fps_and_frame_count_survive_write_and_read(tmp_path, fps):
    frames = make_clip(17)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps)
    clip = read_video(path, size=96)
    assert clip.num_frames == 17
    assert clip.fps == pytest.approx(fps, abs=0.01)
    # H.264 at crf 18 is close to lossless on this clip
    assert np.abs(clip.frames.astype(int) - frames).mean() < 3

    rewritten = tmp_path / "again.mp4"
    write_video(rewritten, clip.frames, clip.fps)
    again = read_video(rewritten, size=96)
    assert again.num_frames == 17 and again.fps == pytest.approx(fps, abs=0.01)


def test_fps_override(clip_path):
    assert read_video(clip_path, size=64, fps=8).fps == 8.0


def test_stride_and_num_frames_select_from_all_frames(clip_path):
    every = read_video(clip_path, size=64).frames
    picked = read_video(clip_path, size=64, stride=3, num_frames=3)
    np.testing.assert_array_equal(picked.frames, every[::3][:3])
    assert picked.fps == pytest.approx(24.0)  # the source fps is kept
    np.testing.assert_array_equal(read_video(clip_path, size=64, stride=5).frames, every[::5])
    np.testing.assert_array_equal(read_video(clip_path, size=64, num_frames=100).frames, every)


def test_cap_warns_only_when_it_drops_frames(clip_path):
    with pytest.warns(UserWarning, match=r"kept the first 5.*--frames"):
        clip = read_video(clip_path, size=64, max_frames=5)
    assert clip.num_frames == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_video(clip_path, size=64, max_frames=12).num_frames == 12  # exactly the cap
        assert read_video(clip_path, size=64, num_frames=12, max_frames=5).num_frames == 12  # explicit wins
        assert read_video(clip_path, size=64, stride=3, max_frames=4).num_frames == 4  # 12 / 3 = 4 selected


# ---- gif and folders


def test_gif_frames_and_fps(tmp_path):
    frames = make_clip(6)
    path = tmp_path / "clip.gif"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)
    clip = read_video(path, size=64)
    assert clip.frames.shape == (6, 40, 64, 3)  # 96x64 -> 64x42.7 -> 64x40
    assert clip.fps == pytest.approx(20.0)
    assert read_video(path, size=64, num_frames=2).num_frames == 2


def test_folder_in_natural_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):  # unpadded names: a plain sort would put frame10 before frame2
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(folder / f"frame{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    clip = read_video(folder, size=64)
    assert clip.frames.shape == (12, 64, 64, 3)
    assert clip.fps == FOLDER_FPS
    np.testing.assert_array_equal(clip.frames[:, 0, 0, 0], 20 * np.arange(12))
    assert read_video(folder, size=64, fps=25).fps == 25.0
    np.testing.assert_array_equal(read_video(folder, size=64, stride=4).frames[:, 0, 0, 0], [0, 80, 160])


def test_folder_mixed_modes_and_sizes(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / "a1.png")
    Image.fromarray(np.full((48, 64, 4), 200, np.uint8), "RGBA").save(folder / "a2.png")
    Image.fromarray(np.full((30, 30), 90, np.uint8), "L").save(folder / "a3.jpg")
    clip = read_video(folder, size=64)
    assert clip.frames.shape == (3, 48, 64, 3)  # all resized to the first frame's size
    assert np.abs(clip.frames[2].astype(int) - 90).max() <= 2


# ---- bad input


def _assert_stem_error(match, **kwargs):
    with pytest.raises(StemError, match=match):
        read_video(**kwargs)


def test_missing_path(tmp_path):
    _assert_stem_error(r"'.*nope\.mp4' does not exist", path=tmp_path / "nope.mp4")


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    _assert_stem_error(r"'.*notes\.mp4' is not a readable video", path=path)


def test_garbage_gif(tmp_path):
    path = tmp_path / "broken.gif"
    path.write_bytes(b"GIF89a" + bytes(range(256)) * 4)
    _assert_stem_error(r"broken\.gif", path=path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    _assert_stem_error(r"'.*empty\.mp4' is empty", path=path)


def test_empty_folder(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "readme.md").write_text("no frames here")
    _assert_stem_error(r"'.*frames' contains no image frames", path=tmp_path / "frames")


def test_unreadable_frame_in_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "0.png")
    (folder / "1.png").write_bytes(b"not a png")
    _assert_stem_error(r"'.*1\.png' is not a readable image", path=folder)


def _write_noise_mp4(path, faststart, num_frames=30):
    """A noisy mp4, moov atom first (our writer) or last (FFmpeg's default)."""
    frames = np.random.default_rng(0).integers(0, 256, (num_frames, 64, 96, 3), dtype=np.uint8)
    if faststart:
        write_video(path, frames, 24)
    else:
        encode(path, frames, faststart=False)


@pytest.mark.parametrize("faststart", [True, False])
@pytest.mark.parametrize("fraction", [0.005, 0.05, 0.4, 0.9])
def test_truncated_mp4_gives_fewer_frames_or_stem_error(tmp_path, faststart, fraction):
    full = tmp_path / "full.mp4"
    _write_noise_mp4(full, faststart)
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            clip = read_video(cut, size=64)
        except StemError as err:
            assert "cut.mp4" in str(err)
        else:
            assert 1 <= clip.num_frames < 30
    if not faststart:  # without an index at the start nothing can be decoded, and the sentence says why
        with pytest.raises(
            StemError, match=r"is truncated or damaged and cannot be read \(it ends inside its 'mdat' box"
        ):
            read_video(cut, size=64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=10), r"^The size must be between 64 and 2048 pixels \(got 10\)"),
        (dict(size=4096), r"^The size must be between 64 and 2048"),
        (dict(stride=0), r"^The stride must be at least 1 \(got 0\)"),
        (dict(num_frames=0), r"^The number of frames must be at least 1 \(got 0\)"),
        (dict(fps=0), r"^The frame rate must be a positive number"),
    ],
)
def test_bad_options(clip_path, kwargs, match):
    _assert_stem_error(match, path=clip_path, **kwargs)


# ---- writing


def test_write_is_atomic_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "dir" / "out.mp4"
    write_video(path, make_clip(5), 24)
    write_video(path, make_clip(7), 24)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.mp4"]
    assert read_video(path, size=64).num_frames == 7


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    write_video(path, make_clip(5), 24)
    before = path.read_bytes()

    def broken_encode(filename, frames, fps, shown_as):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise StemError("ffmpeg died")

    monkeypatch.setattr(video_module, "_encode", broken_encode)
    with pytest.raises(StemError):
        write_video(path, make_clip(5), 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert path.read_bytes() == before


def test_write_odd_size_pads_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    write_video(path, make_clip(3, width=47, height=33), 10)
    capture = cv2.VideoCapture(str(path))  # an independent reader
    size = (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    capture.release()
    assert size == (48, 34) and count == 3


def test_write_rejects_other_containers(tmp_path):
    with pytest.raises(StemError, match=r"'.*out\.gif'.*\.mp4"):
        write_video(tmp_path / "out.gif", make_clip(2), 10)


# ---- side by side


def test_side_by_side_shape_and_content():
    a, b = make_clip(5, 80, 64), make_clip(5, 46, 64, seed=1)
    grid = side_by_side([a, b], ["source", "edit"])
    n, h, w, _ = grid.shape
    assert n == 5 and w == 80 + 46 and h > 64 and h % 2 == 0 and w % 2 == 0 and grid.dtype == np.uint8
    strip = h - 64
    np.testing.assert_array_equal(grid[:, strip:, :80], a)  # panels are not altered
    np.testing.assert_array_equal(grid[:, strip:, 80:], b)
    assert grid[:, :strip].max() > 200 and grid[:, :strip].min() < 64  # white text on a dark strip


def test_side_by_side_pads_odd_and_matches_heights():
    grid = side_by_side([make_clip(2, 33, 40), make_clip(2, 40, 80)], ["a", "b"])
    assert grid.shape[1] % 2 == 0 and grid.shape[2] % 2 == 0
    assert grid.shape[2] == 34 + 20  # 33 + 20 (40x80 scaled to height 40), padded to even


def test_side_by_side_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        side_by_side([make_clip(2), make_clip(3)], ["a", "b"])
    with pytest.raises(ValueError):
        side_by_side([make_clip(2)], ["a", "b"])


# ---- decoding with PyAV: damage is reported, every pixel format and rate comes through


def _read_with_warnings(path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = read_video(path, **kwargs)
    return clip, [str(w.message) for w in caught]


def test_a_file_cut_in_half_says_how_many_frames_decoded(tmp_path):
    full = tmp_path / "full.mp4"
    _write_noise_mp4(full, faststart=True, num_frames=40)  # the index is at the start: the cut half still plays
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    clip, messages = _read_with_warnings(cut, size=64)
    assert 1 <= clip.num_frames < 40
    assert len(messages) == 1, messages
    assert f"decoded {clip.num_frames} of 40 frames; the file looks truncated" in messages[0]


def test_garbage_in_the_middle_is_reported_and_the_rest_still_decodes(tmp_path):
    path = tmp_path / "damaged.mp4"
    _write_noise_mp4(path, faststart=True, num_frames=40)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    clip, messages = _read_with_warnings(path, size=64)
    assert 20 < clip.num_frames <= 40  # frames after the damage still come out
    assert len(messages) == 1 and "of 40 frames" in messages[0] and "damaged" in messages[0], messages


def test_decoding_stops_at_the_last_frame_kept(tmp_path):
    full = tmp_path / "full.mp4"
    _write_noise_mp4(full, faststart=True, num_frames=40)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    clip, messages = _read_with_warnings(cut, size=64, num_frames=3, stride=2)
    assert clip.num_frames == 3 and messages == []  # the cut lies past frame 4: never reached, nothing to report
    every = read_video(full, size=64, num_frames=5).frames
    np.testing.assert_array_equal(clip.frames, every[::2])


def test_16_bit_gray_png_frames_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    for i, level in enumerate((16384, 32768)):  # 25% and 50% gray, then a full ramp
        Image.fromarray(np.full((64, 64), level, np.uint16)).save(folder / f"f{i}.png")
    Image.fromarray(ramp).save(folder / "f2.png")
    assert Image.open(folder / "f0.png").mode.startswith("I")  # really 16-bit on disk
    clip = read_video(folder, size=64)
    assert abs(clip.frames[0].mean() - 16384 / 257) < 1  # 63.75, not "almost white"
    assert abs(clip.frames[1].mean() - 32768 / 257) < 1
    assert clip.frames[2].min() <= 1 and clip.frames[2].max() >= 254  # the whole range maps onto 0..255
    assert (clip.frames[..., 0] == clip.frames[..., 2]).all()  # gray stays gray


@pytest.mark.parametrize("codec, pix_fmt, suffix, frame_format, level, expected", [
    ("ffv1", "gray16le", ".mkv", "gray16le", 16384, 16384 / 257),
    ("ffv1", "gray", ".mkv", "gray", 100, 100),
    ("libx264", "yuv420p10le", ".mp4", "rgb24", 100, 100),
    ("png", "rgb48be", ".mov", "rgb24", 180, 180),
])
def test_high_bit_depth_and_gray_videos_convert_to_8_bit_rgb(
    tmp_path, codec, pix_fmt, suffix, frame_format, level, expected
):
    shape = (3, 48, 64) if frame_format.startswith("gray") else (3, 48, 64, 3)
    dtype = np.uint16 if frame_format.endswith("16le") else np.uint8
    path = tmp_path / f"clip{suffix}"
    encode(path, np.full(shape, level, dtype), codec=codec, pix_fmt=pix_fmt, frame_format=frame_format)
    clip = read_video(path, size=64)
    assert clip.frames.shape == (3, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert abs(clip.frames.mean() - expected) < 3


def test_exact_rates_and_1000_fps(tmp_path):
    frames = make_clip(6)
    for rate in (Fraction(1000), Fraction(30000, 1001), Fraction(25, 2)):
        path = tmp_path / f"rate-{rate.numerator}-{rate.denominator}.mp4"
        encode(path, frames, rate=rate)
        clip, messages = _read_with_warnings(path, size=64)
        assert clip.fps == float(rate) and messages == []
        assert clip.rate == rate
        again = tmp_path / "again.mp4"
        write_video(again, clip.frames, clip.fps)  # the float fps is written as the exact fraction
        with av.open(str(again)) as container:
            assert container.streams.video[0].average_rate == rate


@pytest.mark.parametrize("rotation, turns", [(90, 1), (-90, 3), (180, 2)])
def test_display_rotation_turns_frames_upright(tmp_path, rotation, turns):
    # ffmpeg shows a stream with display rotation +90 turned a quarter counter-clockwise (np.rot90 k=1)
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[:16, :32] = 255  # a white block in the top-left corner
    path = tmp_path / "phone.mp4"
    encode(path, np.stack([frame] * 2), rotation=rotation)
    clip = read_video(path, size=96)
    expected = np.rot90(frame, turns)
    assert clip.frames.shape[1:] == expected.shape
    assert np.abs(clip.frames[0].astype(int) - expected).mean() < 8


def test_a_file_without_video_says_so(tmp_path):
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 8000
        container.mux(stream.encode(samples))
        container.mux(stream.encode())
    _assert_stem_error(r"'.*sound\.mp4' has no video stream", path=path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_is_refused_not_opened(tmp_path):
    path = tmp_path / "pipe.mp4"
    os.mkfifo(path)
    _assert_stem_error(r"'.*pipe\.mp4' is not a regular file", path=path)


def test_written_files_are_tagged_h264_yuv420p_bt601(tmp_path):
    path = tmp_path / "out.mp4"
    write_video(path, make_clip(3), 24)
    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        assert (context.name, context.pix_fmt) == ("h264", "yuv420p")
        assert context.colorspace == video_module.BT601
    assert path.read_bytes().find(b"moov") < path.read_bytes().find(b"mdat")  # index first: plays while loading


# ---- rates an mp4 can hold, recorded as written; variable-rate files read at their frames' rate


def encode_timed(path, pts_ms, declared_rate, frames=None):
    """H.264 frames at the given presentation times (ms) in a container whose stream declares `declared_rate`."""
    frames = make_clip(len(pts_ms)) if frames is None else frames
    tick = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=declared_rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = stream.time_base = tick
        for frame, pts in zip(frames, pts_ms):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = pts, tick
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


def shown_seconds(path):
    """(seconds from the first frame to the end of the last, number of frames) of a written file, from its packets."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.pts is not None]
        ends = [float((p.pts + p.duration) * p.time_base) for p in packets]
        starts = [float(p.pts * p.time_base) for p in packets]
    return max(ends) - min(starts), len(packets)


VFR_MS = [0, 40, 80, 81, 121, 161, 200, 241, 281, 321]  # ~25 fps with one doubled frame and jitter


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_a_variable_rate_file_gets_its_rate_from_the_frames_timestamps(tmp_path, suffix):
    path = tmp_path / f"vfr{suffix}"
    encode_timed(path, VFR_MS, declared_rate=1000)
    with av.open(str(path)) as container:  # the premise: what the container says is far from 25 fps
        declared = container.streams.video[0].average_rate
    assert abs(float(declared) - 25) > 4
    intervals = sorted(b - a for a, b in zip(VFR_MS, VFR_MS[1:]))
    median_ms = intervals[(len(intervals) - 1) // 2]  # the lower median: an interval that occurs
    for num_frames in (4, 1):  # one kept frame: the rate still comes from several timestamps
        clip = read_video(path, size=64, num_frames=num_frames)
        assert clip.fps == 1000 / median_ms == 25
    clip = read_video(path, size=64, num_frames=4)
    out = tmp_path / "result.mp4"
    write_video(out, clip.frames, clip.fps)
    seconds, count = shown_seconds(out)
    assert count == 4 and seconds == pytest.approx(4 * median_ms / 1000, abs=1e-3)  # 160 ms, not 4 ms


def test_a_constant_rate_file_with_a_coarse_time_base_keeps_its_exact_rate(tmp_path):
    # 29.97 fps in millisecond ticks: intervals of 33 and 34 ms, within one tick of 1001/30000 s
    rate = Fraction(30000, 1001)
    pts = [int(i / rate * 1000) for i in range(12)]
    assert {b - a for a, b in zip(pts, pts[1:])} == {33, 34}
    path = tmp_path / "ntsc.mkv"
    encode_timed(path, pts, declared_rate=rate)
    clip = read_video(path, size=64)
    assert clip.rate == rate and clip.fps == float(rate)


@pytest.mark.parametrize("fps", [1e-9, 1e-5, 0.001, 1500.0, float("inf"), float("nan")])
def test_a_rate_an_mp4_cannot_hold_is_refused_before_reading_or_writing(clip_path, tmp_path, fps):
    with pytest.raises(
        StemError, match=r"^The frame rate must be a positive number of frames per second between 0.01 and 1000"
    ):
        read_video(clip_path, size=64, fps=fps)
    with pytest.raises(
        StemError, match=r"Cannot write '.*never\.mp4' at .* fps; the fps must be between 0.01 and 1000"
    ):
        write_video(tmp_path / "never.mp4", make_clip(2), fps)
    assert not (tmp_path / "never.mp4").exists()


@pytest.mark.parametrize("fps", [0.01, 0.0123456789, 1 / 3, 23.976023976, 7.3, 1000.0])
def test_the_rate_recorded_is_the_rate_written(clip_path, tmp_path, fps):
    clip = read_video(clip_path, size=64, num_frames=4, fps=fps)
    assert clip.fps == pytest.approx(fps, rel=1e-4)
    out = tmp_path / "out.mp4"
    write_video(out, clip.frames, clip.fps)
    with av.open(str(out)) as container:
        written = container.streams.video[0].average_rate
    assert float(written) == clip.fps  # exactly: metrics.json records clip.fps
    seconds, count = shown_seconds(out)
    assert count == 4 and seconds == pytest.approx(4 / clip.fps, rel=1e-3)


@pytest.mark.parametrize("rate, bounded", [(5000, 1000.0), (Fraction(1, 1000), 0.01)])
def test_a_source_rate_outside_the_bounds_is_written_at_the_nearest_with_a_warning(tmp_path, rate, bounded):
    # the app and `evaluate` have no --fps, so such a clip is read, not refused; the rate recorded is the one written
    path = tmp_path / "odd.mkv"
    encode(path, make_clip(4), rate=rate)  # a constant rate: the timestamps agree with it
    with pytest.warns(UserWarning, match=rf"'.*odd\.mkv' plays at {float(rate):g} fps, outside the 0.01 to 1000 fps "
                                         rf"the outputs are written at; writing them at {bounded:g} fps \(pass --fps"):
        clip = read_video(path, size=64)
    assert clip.fps == bounded
    out = tmp_path / "out.mp4"
    write_video(out, clip.frames, clip.fps)
    with av.open(str(out)) as container:
        assert float(container.streams.video[0].average_rate) == bounded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_video(path, size=64, fps=25).fps == 25


# ---- paths and files that cannot be read, each said in its own words


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_a_symlink_loop_and_a_broken_symlink_say_so(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.symlink_to(b)
    b.symlink_to(a)
    _assert_stem_error(r"'.*a\.mp4' is a symlink loop", path=a)
    _assert_stem_error(r"'.*a\.mp4/frames' goes through a symlink loop", path=a / "frames")
    dangling = tmp_path / "gone.mp4"
    dangling.symlink_to(tmp_path / "deleted.mp4")
    _assert_stem_error(r"'.*gone\.mp4' is a symlink to '.*deleted\.mp4', which does not exist", path=dangling)


def test_an_mp4_cut_inside_its_index_at_the_end_says_it_is_truncated(tmp_path):
    full = tmp_path / "full.mp4"
    _write_noise_mp4(full, faststart=False)
    data = full.read_bytes()
    moov = data.rfind(b"moov") - 4  # the index, written last without faststart
    assert moov > data.find(b"mdat")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: moov + 16])  # the index's first bytes only
    with av.open(str(cut)) as container:  # the premise: FFmpeg opens it, with no stream at all
        assert len(container.streams) == 0
    _assert_stem_error(
        r"'.*cut\.mp4' is truncated or damaged and cannot be read \(it ends inside its 'moov' box", path=cut
    )
    audio = tmp_path / "sound.mp4"  # a complete file without video still says just that
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 8000
        container.mux(stream.encode(samples))
        container.mux(stream.encode())
    _assert_stem_error(r"'.*sound\.mp4' has no video stream", path=audio)


def png_claiming(path, width, height):
    """A PNG whose header says width x height (its pixels are never decoded: Pillow refuses it from the header)."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    start = data.find(b"IHDR")
    data[start + 4:start + 12] = struct.pack(">II", width, height)
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 17])))
    path.write_bytes(bytes(data))


def gif_claiming(path, width, height):
    """A GIF whose logical screen is width x height."""
    import struct

    Image.new("P", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[6:10] = struct.pack("<HH", width, height)
    path.write_bytes(bytes(data))


def test_a_20000_by_20000_frame_is_refused_in_one_sentence(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    png_claiming(folder / "0.png", 20000, 20000)
    _assert_stem_error(r"'.*0\.png' has 400,000,000-pixel frames, more than the 178,956,970 pixels read here; "
                       r"scale it down", path=folder)
    gif_claiming(tmp_path / "huge.gif", 20000, 20000)
    _assert_stem_error(r"'.*huge\.gif' has 400,000,000-pixel frames", path=tmp_path / "huge.gif")
    monkeypatch.setattr(video_module, "MAX_SOURCE_PIXELS", 1000 * 1000)  # a bound below Pillow's holds too
    png_claiming(folder / "0.png", 1200, 1000)
    _assert_stem_error(r"'.*0\.png' has 1200×1000 frames, more than the 1,000,000 pixels", path=folder)


def test_a_video_with_frames_over_the_bound_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.mp4"
    write_video(path, make_clip(2, width=96, height=64), 24)
    monkeypatch.setattr(video_module, "MAX_SOURCE_PIXELS", 96 * 64 - 1)
    monkeypatch.setattr(video_module, "_to_rgb", lambda frame: pytest.fail("a frame was decoded"))
    with pytest.raises(video_module.SourceTooLarge, match=r"'.*big\.mp4' has 96×64 frames"):
        read_video(path, size=64)


def test_a_20000_by_20000_image_file_passed_alone_says_it_is_too_large(tmp_path):
    path = tmp_path / "scan.png"
    Image.new("1", (20000, 20000)).save(path)  # a real one: 50 KB of PNG, 400 million pixels
    with av.open(str(path)) as container:  # the premise: FFmpeg gives it no size, then no frame
        assert container.streams.video[0].codec_context.width == 0
    _assert_stem_error(r"'.*scan\.png' has 400,000,000-pixel frames, more than the 178,956,970 pixels", path=path)
    small = tmp_path / "small.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(small)
    assert read_video(small, size=64).frames.shape == (1, 40, 64, 3)  # a still of sane size is still one frame
