"""`python -m stem invert|compare` end to end on clips made here, and every bad input."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_frames
import stem.cli
import stem.engine
import stem.files
import stem.video
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
    ("clip", ["--fps", "0"], "--fps"),
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


# --- where the outputs go: checked first, written all together or not at all ------------------------


def snapshot(folder):
    """Every file under a folder with its bytes (hidden ones included), or None if it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


def no_model(monkeypatch):
    """Make loading the model a failure the test would see (exit 1, not 2)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stem.engine, "load_models", refuse)


@pytest.mark.parametrize("case, word", [
    ("a file", "is a file"), ("under a file", "cannot be created"), ("not writable", "not writable"),
    ("a folder in the way", "is a folder"),
])
def test_out_is_checked_before_the_model_loads(clip, tmp_path, capsys, monkeypatch, case, word):
    no_model(monkeypatch)
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    out = {"a file": taken, "under a file": taken / "sub", "not writable": tmp_path / "ro",
           "a folder in the way": tmp_path / "out"}[case]
    if case == "not writable":  # what a read-only folder does, even for root
        monkeypatch.setattr(stem.files.tempfile, "mkdtemp", lambda *a, **k: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")))
    if case == "a folder in the way":
        (out / "metrics.json").mkdir(parents=True)
        (out / "reconstruction.mp4").write_bytes(b"the previous run's video")
    before = snapshot(tmp_path)
    code, stdout, err = run(["invert", clip, *FAST, "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and word in lines[0] and "--out" in lines[0], err
    assert "loading the model" not in err and stdout == ""
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="needs POSIX permissions that bind the user")
def test_a_read_only_out_folder_is_refused_up_front(clip, tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, _, err = run(["invert", clip, *FAST, "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    finally:
        out.chmod(0o700)
    assert code == 2 and "not writable" in err and list(out.iterdir()) == []


def _fail_second_write(monkeypatch):
    """The first output is written, the second fails as a full disk would."""
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stem.cli, "write_json", disk_full)


@pytest.mark.parametrize("command, video_name", [("invert", "reconstruction.mp4"), ("compare", "comparison.mp4")])
def test_a_failed_second_output_leaves_the_output_folder_as_it_was(clip, tmp_path, capsys, monkeypatch, command,
                                                                    video_name):
    out = tmp_path / "out"
    out.mkdir()
    (out / video_name).write_bytes(b"the previous run's video")
    (out / "metrics.json").write_text('{"previous": true}')
    before = snapshot(tmp_path / "out")
    _fail_second_write(monkeypatch)
    code, _, err = run([command, clip, *FAST, "--frames", "2", "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 1 and "No space left" in err
    assert snapshot(out) == before  # no new video beside the old metrics, no staging folder left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    fresh = tmp_path / "fresh" / "deeper"  # a folder that does not exist yet is not created by a failed run
    code, _, _ = run([command, clip, *FAST, "--frames", "2", "--out", fresh, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 1 and not (tmp_path / "fresh").exists()


def test_edit_with_several_prompts_writes_all_videos_or_none(clip, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["edit", clip, *FAST, "--frames", "2", "--size", "64", "--prompt", "a red square", "--prompt", "a blue square",
            "--out", out, "--cache-dir", tmp_path / "cache"]
    (out / "metrics.json").mkdir(parents=True)  # in the way: refused before any work
    code, _, err = run(args, capsys)
    assert code == 2 and "is a folder" in err and "loading the model" not in err
    (out / "metrics.json").rmdir()

    writes = []
    real_write = stem.video.write_video

    def second_fails(path, frames, fps):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, frames, fps)

    monkeypatch.setattr(stem.video, "write_video", second_fails)
    code, _, err = run(args, capsys)
    assert code == 1 and len(writes) == 2
    assert list(out.iterdir()) == []  # not edited-1-*.mp4 without the rest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


KILLED_RUN = """
import os, signal, sys
import stem.cli

def killed(path, data):  # the video is in the staging folder; die before the metrics, as kill -9 would
    os.kill(os.getpid(), signal.SIGKILL)

stem.cli.write_json = killed
stem.cli.main(sys.argv[1:])
"""


@pytest.mark.skipif(os.name == "nt", reason="kill -9 is POSIX")
def test_what_a_killed_run_left_is_removed_by_the_next_run(clip, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["invert", str(clip), *FAST, "--method", "ddim", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (stage,) = [p for p in tmp_path.iterdir() if p.name.startswith(".stem-out")]
    assert (stage / "reconstruction.mp4").is_file() and not out.exists()

    code, _, err = run(args, capsys)
    assert code == 0, err
    assert not stage.exists() and sorted(p.name for p in out.iterdir()) == ["metrics.json", "reconstruction.mp4"]

    # temp files in the output folder: a dead writer's go, a live writer's stay
    dead = out / f".reconstruction{stem.files.owner_tag().replace(f'~{os.getpid()}~', f'~{killed_pid(stage)}~')}x.mp4"
    live = out / f".metrics{stem.files.owner_tag()}y.json"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    assert run(args, capsys)[0] == 0
    assert not dead.exists() and live.exists()


def killed_pid(stage):
    """The pid in a staging folder's name (.stem-out~<pid>~<host>~<random>)."""
    return int(stage.name.split("~")[1])


def test_fps_sets_the_outputs_frame_rate(clip, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["invert", clip, *FAST, "--method", "ddim", "--fps", "5", "--out", out,
                        "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["fps"] == 5
    assert read_video(out / "reconstruction.mp4", size=96).fps == 5


def test_option_adder_rewords_by_argparse_dest_and_refuses_unknown_overrides():
    import argparse

    from stem.cli import option_adder

    parser = argparse.ArgumentParser()
    add = option_adder(parser, {"out": {"help": "reworded"}, "x_y": {"default": 3}})
    out = add("-o", "--out", help="original")
    xy = add("--x-y", type=int, default=1)
    add.check()
    assert (out.dest, out.help) == ("out", "reworded") and parser.parse_args([]).x_y == 3 == xy.default
    add = option_adder(argparse.ArgumentParser(), {"missing": {"help": "?"}})
    add("--present")
    with pytest.raises(ValueError, match="missing"):
        add.check()


@pytest.mark.parametrize("how", ["a file at the cache dir", "a full disk"])
def test_a_cache_that_cannot_be_written_is_a_warning_and_the_outputs_are_written(clip, tmp_path, capsys,
                                                                                 monkeypatch, how):
    import errno

    import stem.cache

    cache = tmp_path / "cache"
    if how == "a full disk":
        def full(fd, data):
            os.close(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(stem.cache, "_write_and_sync", full)
        reason = "No space left on device"
    else:
        cache.write_text("not a folder")
        reason = "is not a folder" if os.name == "nt" else ""
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:
        code, stdout, err = run(["invert", clip, *FAST, "--frames", "2", "--out", out, "--cache-dir", cache], capsys)
    assert code == 0, err
    messages = [str(w.message) for w in record if "cache" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith(f"Cannot write to the cache folder {cache} (")
    assert reason in messages[0] and "so the result is not cached" in messages[0]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "reconstruction.mp4"]
    assert read_video(out / "reconstruction.mp4", size=96).num_frames == 2
    assert json.loads((out / "metrics.json").read_text())["cache_hit"] is False
