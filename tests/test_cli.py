"""`python -m stem invert|compare` end to end on clips made here, and every bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_frames
from stem.cli import main
from stem.video import read_video, write_video

FAST = ["--model", "tiny-random", "--steps", "2", "--bases", "8", "--iters", "2", "--size", "96"]


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_invert_writes_reconstruction_and_metrics_and_hits_the_cache(clip, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["invert", clip, *FAST, "--prompt", "a yellow square", "--out", out, "--cache-dir", tmp_path / "cache"]
    code, stdout, _ = run(args, capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "num_frames", "width", "height", "fps", "psnr", "ssim", "psnr_per_frame", "warp_error",
                "cache_hit", "seconds"):
        assert key in metrics, key
    assert metrics["method"] == "stem" and metrics["cache_hit"] is False
    assert (metrics["width"], metrics["height"], metrics["num_frames"]) == (96, 64, 6)
    video = read_video(out / "reconstruction.mp4", size=96)
    assert video.num_frames == 6 and video.fps == pytest.approx(12.0)
    assert json.loads(stdout)["cache_hit"] is False

    code, _, _ = run(args, capsys)
    assert code == 0 and json.loads((out / "metrics.json").read_text())["cache_hit"] is True


def test_odd_sized_clip_with_frames_and_stride(tmp_path, capsys):
    # 101x67 source, 9 frames at 7.5 fps; --size 80 gives 80x56 (long side 80, multiples of 8).
    frames = np.stack([np.pad(f, ((0, 3), (0, 5), (0, 0)), mode="edge") for f in make_frames(9, 96, 64)])
    source = tmp_path / "odd.mp4"
    write_video(source, frames, 7.5)
    out = tmp_path / "odd-out"
    code, _, err = run(["invert", source, *FAST, "--size", "80", "--frames", "3", "--stride", "2", "--method", "ddim",
                        "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["width"], metrics["height"], metrics["num_frames"]) == (80, 56, 3)
    assert metrics["fps"] == pytest.approx(7.5)
    written = read_video(out / "reconstruction.mp4", size=80)
    assert written.frames.shape == (3, 56, 80, 3)


def test_compare_writes_side_by_side_and_a_block_per_method(clip, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run(["compare", clip, *FAST, "--all", "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"ddim", "stem", "inflated"}
    for block in metrics["methods"].values():
        assert len(block["psnr_per_frame"]) == 6
    panel = read_video(out / "comparison.mp4", size=4 * 96)
    assert panel.num_frames == 6 and panel.width == 4 * 96  # input | DDIM | STEM | inflated


@pytest.fixture
def bad_files(tmp_path, clip):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[:300])
    return {"text": text, "empty": empty, "truncated": truncated, "missing": tmp_path / "missing.mp4", "clip": clip}


@pytest.mark.parametrize("name,extra,word", [
    ("text", [], "video"), ("empty", [], "empty"), ("truncated", [], "truncated"), ("missing", [], "does not exist"),
    ("clip", ["--bases", "0"], "--bases"), ("clip", ["--iters", "0"], "--iters"), ("clip", ["--frames", "0"], "--frames"),
    ("clip", ["--size", "10"], "--size"), ("clip", ["--method", "magic"], "method"), ("clip", ["--steps", "0"], "--steps"),
    ("clip", ["--chunk-size", "0"], "--chunk-size"), ("clip", ["--device", "gpu"], "--device"),
])
def test_bad_input_exits_non_zero_with_one_sentence_and_writes_nothing(bad_files, tmp_path, capsys, name, extra, word):
    out = tmp_path / "never"
    code, stdout, err = run(["invert", bad_files[name], *FAST, *extra, "--out", out, "--cache-dir", tmp_path / "c"], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and word in lines[0], err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()


def test_debug_shows_the_traceback(bad_files, tmp_path):
    from stem.errors import StemError

    with pytest.raises(StemError):
        main(["invert", str(bad_files["text"]), *FAST, "--debug", "--out", str(tmp_path / "o")])


def test_python_dash_m_stem_runs(clip, tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "stem", "invert", str(clip), *FAST, "--method", "ddim", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "reconstruction.mp4").exists() and (out / "metrics.json").exists()
    proc = subprocess.run([sys.executable, "-m", "stem", "invert", str(tmp_path / "nope.mp4"), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr
