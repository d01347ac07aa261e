"""Reading, writing and laying out videos: clips are made in code, nothing is read from outside."""

import warnings

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from stem import video as video_module
from stem.errors import StemError
from stem.video import FOLDER_FPS, Video, fit_size, read_video, side_by_side, write_video


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


def _write_noise_mp4(path, faststart):
    """A 30-frame noisy mp4, moov atom first (our writer) or last (ffmpeg's default)."""
    frames = np.random.default_rng(0).integers(0, 256, (30, 64, 96, 3), dtype=np.uint8)
    if faststart:
        write_video(path, frames, 24)
        return
    writer = imageio_ffmpeg.write_frames(
        str(path), (96, 64), fps=24, codec="libx264", macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)
    for frame in frames:
        writer.send(frame.tobytes())
    writer.close()


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
    if not faststart:  # without an index at the start nothing can be decoded
        with pytest.raises(StemError, match="not a readable video"):
            read_video(cut, size=64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=10), r"--size must be between 64 and 2048 pixels \(got 10\)"),
        (dict(size=4096), r"--size must be between 64 and 2048"),
        (dict(stride=0), r"--stride must be at least 1 \(got 0\)"),
        (dict(num_frames=0), r"--frames must be at least 1 \(got 0\)"),
        (dict(fps=0), r"--fps must be a positive number"),
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
