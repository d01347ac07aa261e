"""`python -m stem invert|compare` end to end on clips made here, and every bad input."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_frames
import stem.cli.edit
import stem.cli.invert
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


@pytest.mark.parametrize(
    "name,extra,word",
    [
        ("text", [], "video"),
        ("empty", [], "empty"),
        ("truncated", [], "truncated"),
        ("missing", [], "does not exist"),
        ("clip", ["--bases", "0"], "--bases"),
        ("clip", ["--iters", "0"], "--iters"),
        ("clip", ["--frames", "0"], "--frames"),
        ("clip", ["--size", "10"], "--size"),
        ("clip", ["--method", "magic"], "method"),
        ("clip", ["--steps", "0"], "--steps"),
        ("clip", ["--chunk-size", "0"], "--chunk-size"),
        ("clip", ["--device", "gpu"], "--device"),
        ("clip", ["--fps", "0"], "--fps"),
        ("clip", ["--seed", str(2**70)], "--seed"),  # as `edit` refuses it
    ],
)
def test_bad_input_exits_non_zero_with_one_sentence_and_writes_nothing(bad_files, tmp_path, capsys, name, extra, word):
    out = tmp_path / "never"
    code, stdout, err = run(
        ["invert", bad_files[name], *FAST, *extra, "--out", out, "--cache-dir", tmp_path / "c"], capsys
    )
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
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stem",
            "invert",
            str(clip),
            *FAST,
            "--method",
            "ddim",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
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

    monkeypatch.setattr(stem.cli.invert, "write_json", disk_full)


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
    args = [
        "edit",
        clip,
        *FAST,
        "--frames",
        "2",
        "--size",
        "64",
        "--prompt",
        "a red square",
        "--prompt",
        "a blue square",
        "--out",
        out,
        "--cache-dir",
        tmp_path / "cache",
    ]
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

    monkeypatch.setattr(stem.cli.edit, "write_video", second_fails)
    code, _, err = run(args, capsys)
    assert code == 1 and len(writes) == 2
    assert list(out.iterdir()) == []  # not edited-1-*.mp4 without the rest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


KILLED_RUN = """
import os, signal, sys
import stem.cli.invert

def killed(path, data):  # the video is in the staging folder; die before the metrics, as kill -9 would
    os.kill(os.getpid(), signal.SIGKILL)

stem.cli.invert.write_json = killed
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


KILLED_MOVE = """
import os, signal, sys
import stem.files

real_move, real_replace, state = stem.files._move_into, os.replace, {"moving": False, "renames": 0}

def replace(src, dst):  # kill -9 just before the n-th rename of the final move
    if state["moving"]:
        state["renames"] += 1
        if state["renames"] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

def move(*args):
    state["moving"] = True
    return real_move(*args)

os.replace, stem.files._move_into = replace, move
import stem.cli.invert
stem.cli.main(sys.argv[2:])
"""


@pytest.mark.skipif(os.name == "nt", reason="kill -9 is POSIX")
@pytest.mark.parametrize("rename", [1, 2, 3, 4, 5])  # journal; old video aside; new video in; old metrics aside; ...
def test_a_run_killed_during_the_final_move_leaves_one_complete_set_that_the_next_run_keeps(
        clip, tmp_path, capsys, monkeypatch, rename):
    out = tmp_path / "out"
    out.mkdir()
    (out / "reconstruction.mp4").write_bytes(b"the previous run's video")
    (out / "metrics.json").write_text('{"previous": true}')
    args = ["invert", str(clip), *FAST, "--method", "ddim", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    killed = subprocess.run([sys.executable, "-c", KILLED_MOVE, str(rename), *args], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    def refuse(*args, **kwargs):  # the next run fails after it has looked at the folder
        raise stem.cli.StemError("the next run failed")

    monkeypatch.setattr(stem.cli.invert, "make_engine", refuse)
    code, _, err = run(args, capsys)
    assert code == 2 and "the next run failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "reconstruction.mp4"]  # no stage, no backups left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    old_video = (out / "reconstruction.mp4").read_bytes() == b"the previous run's video"
    old_metrics = json.loads((out / "metrics.json").read_text()) == {"previous": True}
    assert old_video == old_metrics, "a new video beside old metrics, or the reverse"
    assert old_video == (rename == 1)  # once the journal is written, the new set is the complete one
    if not old_video:
        assert read_video(out / "reconstruction.mp4", size=96).num_frames == 6
        assert json.loads((out / "metrics.json").read_text())["method"] == "ddim"


def test_a_stage_journalled_for_another_folder_is_left_for_that_folder(tmp_path):
    from stem.files import JOURNAL, remove_dead_stages

    dead = f".stem-out{stem.files.owner_tag().replace(f'~{os.getpid()}~', f'~{dead_pid()}~')}x"
    stage = tmp_path / dead
    stage.mkdir()
    (stage / "a.txt").write_text("new a")
    (stage / JOURNAL).write_text(json.dumps({"out": str((tmp_path / "other").resolve()), "names": ["a.txt"]}))
    remove_dead_stages(tmp_path / "mine")
    assert (stage / "a.txt").read_text() == "new a"  # not this folder's to finish, and never deleted
    remove_dead_stages(tmp_path / "other")
    assert not stage.exists() and (tmp_path / "other" / "a.txt").read_text() == "new a"


def dead_pid():
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.parametrize("command", ["invert", "compare", "edit"])
def test_a_second_run_into_a_folder_in_use_is_refused_before_any_work(clip, tmp_path, capsys, monkeypatch, command):
    from stem.files import output_lock

    no_model(monkeypatch)
    out = tmp_path / "out"
    extra = ["--prompt", "a red square"] if command == "edit" else []
    with output_lock(out):  # what another run holds while it works
        code, stdout, err = run([command, clip, *FAST, *extra, "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 2 and "--out: another run is writing into the output folder" in err and stdout == ""
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists()


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


def poisoned_models(monkeypatch, when):
    """Load the model as usual, with a UNet whose output turns NaN on the calls for which `when(batch)` holds."""
    real = stem.engine.load_models

    def load(*args, **kwargs):
        parts = real(*args, **kwargs)

        def hook(module, inputs, output):
            if when(inputs[0].shape[0]):
                (output[0] if isinstance(output, tuple) else output.sample).fill_(float("nan"))

        parts.unet.register_forward_hook(hook)
        return parts

    monkeypatch.setattr(stem.engine, "load_models", load)


@pytest.mark.parametrize("command, extra, words", [
    ("invert", [], ["inversion", "NaN", "step 1 of 2"]),
    ("edit", ["--prompt", "a red square"], ["edit", "NaN", "guidance scale (7.5)", "FreeU factors (b1 1.2"]),
    ("edit", ["--editor", "fatezero", "--prompt", "a red square", "--reweight", "red=3"],
     ["edit", "NaN", "guidance scale (7.5)", "reweight scales (red=3)"]),
])
def test_latents_that_turn_non_finite_stop_the_job_with_one_sentence_and_write_nothing(
        clip, tmp_path, capsys, monkeypatch, command, extra, words):
    frames = 2
    # the inversion's UNet sees one group of frames, the edit's three (source, negative, target)
    poisoned_models(monkeypatch, (lambda batch: True) if command == "invert" else (lambda batch: batch == 3 * frames))
    out = tmp_path / "out"
    code, stdout, err = run([command, clip, *FAST, "--frames", frames, *extra, "--out", out,
                             "--cache-dir", tmp_path / "cache"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and stdout == "", err
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if command == "invert":  # nothing non-finite is cached
        assert not [p for p in (tmp_path / "cache").rglob("*.safetensors")]


# --- rates, counts and inputs the video layer refuses in one sentence, before any work -------------


def test_an_fps_an_mp4_cannot_hold_is_refused_before_the_model_loads(clip, tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    out = tmp_path / "out"
    code, stdout, err = run(
        ["invert", clip, *FAST, "--fps", "1e-9", "--out", out, "--cache-dir", tmp_path / "c"], capsys
    )
    assert code == 2 and stdout == "", err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert (
        len(lines) == 1
        and "--fps: the frame rate must be a positive number of frames per second between 0.01 and 1000" in lines[0]
    )
    assert not out.exists() and not (tmp_path / "c").exists()


def test_the_fps_in_metrics_is_the_rate_the_mp4_plays_at(clip, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["invert", clip, *FAST, "--method", "ddim", "--fps", "23.976023976", "--out", out,
                        "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    import av

    with av.open(str(out / "reconstruction.mp4")) as container:
        written = container.streams.video[0].average_rate
    recorded = json.loads((out / "metrics.json").read_text())["fps"]
    assert recorded == float(written) and recorded == pytest.approx(23.976023976, rel=1e-9)


def test_a_variable_rate_input_gives_a_result_at_its_frames_rate(tmp_path, capsys):
    from fractions import Fraction

    import av

    frames, tick = make_frames(6), Fraction(1, 1000)
    source = tmp_path / "vfr.mkv"
    with av.open(str(source), "w") as container:  # declares 1000 fps; its frames come every ~40 ms
        stream = container.add_stream("libx264", rate=1000)
        stream.height, stream.width, stream.pix_fmt = 64, 96, "yuv420p"
        stream.codec_context.time_base = stream.time_base = tick
        for frame, pts in zip(frames, [0, 40, 80, 81, 121, 161]):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = pts, tick
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    out = tmp_path / "out"
    code, _, err = run(["invert", source, *FAST, "--method", "ddim", "--frames", "4", "--out", out,
                        "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["fps"] == 25
    with av.open(str(out / "reconstruction.mp4")) as container:
        packets = [p for p in container.demux(video=0) if p.pts is not None]
        seconds = sum(float(p.duration * p.time_base) for p in packets)
    assert len(packets) == 4 and seconds == pytest.approx(0.16, abs=1e-3)  # 4 frames of 40 ms, not 4 ms


@pytest.mark.parametrize(
    "flag, value", [("--steps", "1.5"), ("--bases", "2.5"), ("--frames", "nan"), ("--seed", "1e400")]
)
def test_a_count_that_is_not_whole_is_refused_not_truncated(clip, tmp_path, capsys, monkeypatch, flag, value):
    no_model(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["invert", str(clip), *FAST, flag, value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a whole number such as 2, got '{value}'" in err
    assert not (tmp_path / "out").exists()


def test_whole_numbers_written_as_floats_are_taken():
    from stem.cli import whole_number

    assert (whole_number("3"), whole_number("3.0"), whole_number("1e3"), whole_number("-2")) == (3, 3, 1000, -2)


def test_an_edit_batch_size_that_is_not_whole_is_refused(clip, tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    with pytest.raises(SystemExit):
        main(
            [
                "edit",
                str(clip),
                *FAST,
                "--source-prompt",
                "a square",
                "--prompt",
                "a red square",
                "--batch-size",
                "2.5",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert "argument --batch-size: must be a whole number such as 2, got '2.5'" in capsys.readouterr().err


def _huge_png(path):
    """A PNG whose header says 20000x20000 (Pillow refuses it from the header; nothing is decoded)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    start = data.find(b"IHDR")
    data[start + 4:start + 12] = struct.pack(">II", 20000, 20000)
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 17])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, sentence", [
    ("huge frame", "has 400,000,000-pixel frames, more than the 178,956,970 pixels read here; scale it down"),
    ("symlink loop", "is a symlink loop"),
    ("index cut", "is truncated or damaged and cannot be read (it ends inside its 'moov' box"),
])
def test_unreadable_inputs_say_why_in_one_sentence(tmp_path, capsys, monkeypatch, case, sentence):
    no_model(monkeypatch)
    if case == "huge frame":
        source = tmp_path / "frames"
        source.mkdir()
        _huge_png(source / "0.png")
    elif case == "symlink loop":
        source, other = tmp_path / "a.mp4", tmp_path / "b.mp4"
        source.symlink_to(other)
        other.symlink_to(source)
    else:
        import av

        full = tmp_path / "full.mp4"
        with av.open(str(full), "w") as container:  # no faststart: the index is written last
            stream = container.add_stream("libx264", rate=12)
            stream.height, stream.width, stream.pix_fmt = 64, 96, "yuv420p"
            for frame in make_frames(6):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        data = full.read_bytes()
        source = tmp_path / "cut.mp4"
        source.write_bytes(data[: data.rfind(b"moov") + 12])
    out = tmp_path / "out"
    code, stdout, err = run(["invert", source, *FAST, "--out", out, "--cache-dir", tmp_path / "c"], capsys)
    assert code == 2 and stdout == "", err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and sentence in lines[0], err
    assert "Traceback" not in err and not out.exists()


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
