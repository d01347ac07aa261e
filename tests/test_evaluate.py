"""`python -m stem evaluate` across two accelerate processes, resuming, bad manifests, and the CLIP edit metrics."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_frames
from stem.cli import build_parser, main
from stem.cli.evaluate import make_plan, mean_std_table, read_manifest
from stem.metrics import (
    build_tiny_clip, clip_text_alignment, frame_accuracy, load_clip, temporal_consistency,
)
from stem.video import write_video

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-random", "--steps", "2", "--bases", "4", "--iters", "1", "--size", "64",
        "--clip-model", "tiny-random"]
CLIPS = {  # name -> (frames, source prompt, target prompt)
    "a": (make_frames(3, 96, 64, seed=0), "a yellow square", "a red square"),
    "b": (make_frames(3, 64, 96, seed=1), "a striped gradient", "a blue gradient"),
}
METRICS = ("psnr", "ssim", "psnr_vae", "ssim_vae", "psnr_vs_vae", "ssim_vs_vae", "warp_error", "warp_error_source",
           "clip_text", "frame_acc", "tem_con", "num_frames", "width", "height")


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two 3-frame clips (landscape and portrait) and a manifest with one target prompt each."""
    folder = tmp_path_factory.mktemp("clips")
    for name, (frames, _, _) in CLIPS.items():
        write_video(folder / f"{name}.mp4", frames, 12.0)
    manifest = [{"video": f"{name}.mp4", "source_prompt": source, "target_prompts": [target]}
                for name, (_, source, target) in CLIPS.items()]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.fixture(scope="module")
def two_processes(clips, tmp_path_factory):
    """The evaluation run by `accelerate launch` with two CPU processes, isolated from any accelerate config."""
    root = tmp_path_factory.mktemp("accelerate")
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("ACCELERATE_USE_CPU", None)
    # accelerate 1.x starts several CPU processes through torchrun's --multi_gpu launcher (--cpu alone needs
    # MPI); without CUDA, evaluate puts them on the CPU with the gloo backend
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "stem", "evaluate", clips / "manifest.json", *FAST,
               "--out", root / "out", "--cache-dir", root / "cache"]
    proc = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


@pytest.fixture
def counted_unet(tiny_parts, monkeypatch, count_calls):
    """In-process runs use the session's tiny model, its UNet calls counted."""
    monkeypatch.setattr("stem.engine.load_models", lambda *args, **kwargs: tiny_parts)
    with count_calls(tiny_parts.unet) as counter:
        yield counter


@pytest.fixture(autouse=True)
def one_thread():
    """torchrun gives each process one thread; the same here makes the floating-point sums identical
    (and keeps a busy 2-core machine from thrashing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows_of(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def expected_ids() -> set[str]:
    ids = set()
    for name, (_, _, target) in CLIPS.items():
        for method in ("ddim", "stem"):
            ids |= {f"{name}--{method}--reconstruction", f"{name}--{method}--tokenflow--1-{target.replace(' ', '-')}"}
    return ids


def test_two_processes_run_every_job_once_and_match_one_process(two_processes, clips, tmp_path, capsys,
                                                                counted_unet):
    root, proc = two_processes
    assert (
        len([line for line in proc.stdout.splitlines() if line.startswith("{")]) == 1
    )  # only the main process reports
    rows = rows_of(root / "out")
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids()
    assert {row["process_index"] for row in rows} == {0, 1}
    assert sorted(p.stem for p in (root / "out" / "rows").iterdir()) == sorted(ids)
    assert sorted(p.stem for p in (root / "out" / "videos").iterdir()) == sorted(ids)
    for name in CLIPS:
        for method in ("ddim", "stem"):
            group = [row for row in rows if row["clip"] == name and row["method"] == method]
            assert len({row["process_index"] for row in group}) == 1  # one inversion, one process
            assert [row["cache_hit"] for row in group] == [False, True]  # the edit reuses the inversion
    assert not any(row.get("error") for row in rows)

    code, out, err = run(["evaluate", clips / "manifest.json", *FAST, "--out", tmp_path / "out",
                          "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert json.loads(out)["ran"] == len(ids) and counted_unet.calls > 0
    single = {row["id"]: row for row in rows_of(tmp_path / "out")}
    for row in rows:
        assert {k: row.get(k) for k in METRICS} == {k: single[row["id"]].get(k) for k in METRICS}, row["id"]

    csv_lines = (root / "out" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(ids) and csv_lines[0].startswith("id,clip,video,kind,method,editor,prompt")
    summary = (root / "out" / "summary.md").read_text()
    assert "| ddim | 2 |" in summary and "| tokenflow / stem | 2 |" in summary and "tiny-random" in summary
    assert (root / "out" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_skips_finished_jobs_and_redoes_only_missing_ones(two_processes, clips, tmp_path, capsys,
                                                                  counted_unet):
    root, _ = two_processes
    out, cache = tmp_path / "out", tmp_path / "cache"
    shutil.copytree(root / "out", out)
    shutil.copytree(root / "cache", cache)
    args = ["evaluate", clips / "manifest.json", *FAST, "--out", out, "--cache-dir", cache]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert counted_unet.calls == 0
    assert json.loads(stdout)["ran"] == 0
    assert all(row["skipped"] for row in rows_of(out))

    # a run killed during one job has written every other row: only that job runs again
    lost = "b--stem--tokenflow--1-a-blue-gradient"
    (out / "rows" / f"{lost}.json").unlink()
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert json.loads(stdout)["ran"] == 1 and counted_unet.calls > 0
    rows = {row["id"]: row for row in rows_of(out)}
    assert not rows[lost]["skipped"] and rows[lost]["cache_hit"]  # its inversion came from the cache
    assert sum(not row["skipped"] for row in rows.values()) == 1

    # other settings make every stored row stale
    counted_unet.calls = 0
    code, stdout, err = run([*args, "--methods", "ddim", "--editors", "none", "--steps", "1"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["ran"] == 2 and counted_unet.calls > 0


def test_manifest_per_clip_settings_and_yaml(clips, tmp_path):
    (tmp_path / "m.yaml").write_text(
        f"- video: {clips / 'a.mp4'}\n  source_prompt: a square\n  target_prompts: [a red square, a blue square]\n"
        f"  frames: 2\n  size: 128\n  name: first\n"
        f"- video: {clips / 'b.mp4'}\n  target_prompts: [a gradient]\n")
    first, second = read_manifest(tmp_path / "m.yaml", default_source_prompt="a video")
    assert (first.name, first.settings, first.target_prompts) == (
        "first", (("num_frames", 2), ("size", 128)), ("a red square", "a blue square"))
    assert (second.name, second.source_prompt, second.settings) == ("b", "a video", ())
    args = build_parser().parse_args(["evaluate", str(tmp_path / "m.yaml"), "--model", "tiny-random", "--frames", "3",
                                      "--methods", "stem,inflated", "--guidance", "5",
                                      "--source-prompt", "a video"])
    plan = make_plan(args)
    assert [len(g.jobs) for g in plan.groups] == [3, 3, 2, 2]
    settings = {(j.clip.name, j.inversion.method): j.inversion for j in plan.jobs}
    assert (settings["first", "stem"].num_frames, settings["first", "stem"].size) == (2, 128)
    assert (settings["b", "inflated"].num_frames, settings["b", "inflated"].size, settings["b", "inflated"].prompt) == (
        3,
        512,
        "a video",
    )
    assert {j.edit.guidance for j in plan.jobs if j.edit is not None} == {5.0}


def test_manifest_per_clip_structure_guidance_is_the_command_lines(clips, tmp_path, capsys):
    # issue 20: an entry sets control, control_scale and the canny thresholds for its clip as --control ... would
    edges = {"control": "canny", "control_scale": 0.5, "canny_low": 50, "canny_high": 150}
    manifest = [
        {"video": str(clips / "a.mp4"), "name": "plain"},
        {"video": str(clips / "a.mp4"), "name": "edges", **edges},
    ]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    args = [tmp_path / "m.json", *FAST, "--methods", "ddim", "--editors", "none"]
    plan = make_plan(build_parser().parse_args(["evaluate", *map(str, args)]))
    inversions = {job.clip.name: job.inversion for job in plan.jobs}
    assert inversions["plain"].control == "none" and len(plan.groups) == 2
    assert {k: getattr(inversions["edges"], k) for k in edges} == edges

    code, _, err = run(["evaluate", *args, "--out", tmp_path / "eval", "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    rows = {row["clip"]: row for row in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
    flags = ["--control", "canny", "--control-scale", "0.5", "--canny-low", "50", "--canny-high", "150"]
    for name, extra in (("plain", []), ("edges", flags)):
        code, _, err = run(["invert", clips / "a.mp4", *FAST[:-2], "--method", "ddim", *extra,
                            "--out", tmp_path / name, "--cache-dir", tmp_path / f"cache-{name}"], capsys)
        assert code == 0, err
        alone = json.loads((tmp_path / name / "metrics.json").read_text())
        assert rows[name]["psnr"] == alone["psnr"] and not alone["cache_hit"]
        assert (alone.get("control"), alone.get("canny_low")) == ((None, None) if name == "plain" else ("canny", 50))
    assert rows["plain"]["psnr"] != rows["edges"]["psnr"]  # the ControlNet changed the reconstruction


@pytest.mark.parametrize("entry, words", [
    ({"control": "pose"}, "field 'control': the structure guidance must be one of: none, canny, depth, got 'pose'."),
    ({"control_scale": -1}, "field 'control_scale': the structure strength must be 0 or more"),
    ({"control_scale": "strong"}, "field 'control_scale' must be a number, got 'strong'."),
    ({"canny_low": 1.5}, "field 'canny_low' must be a whole number, got 1.5."),
])
def test_bad_per_clip_structure_guidance_names_the_entry_and_field(clips, tmp_path, entry, words):
    from stem.errors import StemError

    (tmp_path / "m.json").write_text(json.dumps([{"video": str(clips / "a.mp4"), **entry}]))
    with pytest.raises(StemError) as error:
        make_plan(build_parser().parse_args(["evaluate", str(tmp_path / "m.json"), "--model", "tiny-random",
                                             "--editors", "none"]))
    assert words in str(error.value) and "m.json line 1 (entry 1)" in str(error.value) and "\n" not in str(error.value)


def test_one_video_listed_twice_is_inverted_by_one_group(clips, tmp_path):
    manifest = [{"video": str(clips / "a.mp4"), "target_prompts": ["x"], "name": n} for n in ("one", "two")]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    plan = make_plan(build_parser().parse_args(["evaluate", str(tmp_path / "m.json"), "--model", "tiny-random"]))
    assert len(plan.groups) == 2 and [len(g.jobs) for g in plan.groups] == [4, 4]  # per method: both clips' jobs


BAD_MANIFESTS = [
    ('[{"video": "a.mp4", "target_prompts": ["x"]},\n {"video": "a.mp4" "target_prompts": []}]', "line 2"),
    ('{"video": "a.mp4"}', "list of clips"),
    ('[\n  "a.mp4"\n]', "line 2 (entry 1)"),
    (
        '[\n  {"video": "a.mp4",\n   "target_prompt": ["x"]}\n]',
        "line 3 (entry 1): unknown field 'target_prompt'; did you mean 'target_prompts'",
    ),
    (
        '[{"video": "a.mp4", "target_prompts": ["x"]},\n {"video": "gone.mp4",\n  "target_prompts": ["x"]}]',
        "line 2 (entry 2): the video 'gone.mp4' does not exist",
    ),
    ('[{"video": "a.mp4",\n  "target_prompts": "a red square"}]', "line 2 (entry 1): field 'target_prompts'"),
    ('[{"video": "a.mp4", "target_prompts": ["x"],\n  "frames": 0}]', "line 2 (entry 1): field 'frames'"),
    (
        '[{"video": "a.mp4", "target_prompts": ["x"], "size": 10}]',
        "line 1 (entry 1): field 'size': the size must be between 64 and 2048",
    ),
    (
        '[{"video": "a.mp4", "target_prompts": ["x"]},\n {"video": "b.mp4", "target_prompts": ["x"], "name": "a"}]',
        "the name 'a' is taken",
    ),
    ('[{"video": "a.mp4", "target_prompts": ["x"]},\n {"video": "b.mp4"}]', "entry 2) (b.mp4) has no 'target_prompts'"),
    ("[]", "lists no clips"),
]


@pytest.mark.parametrize("text,words", BAD_MANIFESTS)
def test_a_bad_manifest_is_refused_in_one_sentence_before_any_work(clips, tmp_path, capsys, text, words):
    manifest = clips / f"bad-{abs(hash(text))}.json"
    manifest.write_text(text)
    try:
        code, stdout, err = run(["evaluate", manifest, *FAST, "--out", tmp_path / "never"], capsys)
    finally:
        manifest.unlink()
    assert code == 2 and stdout == ""
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("extra,words", [
    (["--methods", "ddim,magic"], "Unknown method 'magic' in --methods"),
    (["--editors", "photoshop"], "Unknown editor 'photoshop' in --editors"),
    (["--method", "ddim"], "--methods and --editors"),
    (["--guidance", "0.5"], "--guidance"),
    ([], "does not exist"),
])
def test_bad_options_are_refused_in_one_sentence(clips, tmp_path, capsys, extra, words):
    manifest = clips / "manifest.json" if extra else tmp_path / "missing.json"
    code, _, err = run(["evaluate", manifest, *FAST, *extra, "--out", tmp_path / "never"], capsys)
    assert code == 2 and len([x for x in err.splitlines() if x.startswith("error:")]) == 1 and words in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind", ["file", "read-only folder", "folder at results.json"])
def test_an_out_that_cannot_take_the_results_is_refused_before_any_job(clips, tmp_path, capsys, counted_unet, kind,
                                                                       monkeypatch):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("notes")
    elif kind == "read-only folder":
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):  # root writes anywhere: the folder refuses new entries as a read-only one would
            mkdtemp = tempfile.mkdtemp

            def refused(*args, dir=None, **kwargs):
                if dir is not None and Path(dir) == out:
                    raise PermissionError(13, "Permission denied", str(out))
                return mkdtemp(*args, dir=dir, **kwargs)
            monkeypatch.setattr(tempfile, "mkdtemp", refused)
    else:
        (out / "results.json").mkdir(parents=True)
    try:
        code, _, err = run(["evaluate", clips / "manifest.json", *FAST, "--out", out], capsys)
    finally:
        out.chmod(0o700) if out.is_dir() else None
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert {"file": "is a file", "read-only folder": "is not writable",
            "folder at results.json": "is a folder, so the output results.json"}[kind] in errors[0]
    assert counted_unet.calls == 0  # not one job ran
    assert sorted(p.name for p in out.iterdir()) == ([] if kind == "read-only folder" else ["results.json"]) \
        if out.is_dir() else out.read_text() == "notes"


def test_yaml_errors_name_the_line(clips, tmp_path):
    from stem.errors import StemError

    (tmp_path / "bad.yaml").write_text(f"- video: {clips / 'a.mp4'}\n  target_prompts: [x\n- video: b\n")
    with pytest.raises(StemError, match=r"bad.yaml line \d: not valid YAML"):
        read_manifest(tmp_path / "bad.yaml")
    (tmp_path / "field.yaml").write_text(f"- video: {clips / 'a.mp4'}\n\n  stride: two\n")
    with pytest.raises(StemError, match=r"field.yaml line 3 \(entry 1\): field 'stride'"):
        read_manifest(tmp_path / "field.yaml")


def test_summary_table_bolds_the_best_mean_and_reports_the_sample_std():
    rows = {"ddim": [{"kind": "reconstruction", "psnr": 10.0, "warp_error": 0.5},
                     {"kind": "reconstruction", "psnr": 12.0, "warp_error": 0.1}],
            "stem": [{"kind": "reconstruction", "psnr": 13.0, "warp_error": 0.4}]}
    columns = (("psnr", "PSNR", 1, "{:.2f}"), ("warp_error", "warp", -1, "{:.2f}"))
    lines = mean_std_table(rows, columns, "method").splitlines()
    assert lines[0] == "| method | n | PSNR ↑ | warp ↓ |"
    assert lines[2] == "| ddim | 2 | 11.00 ± 1.41 | **0.30 ± 0.28** |"  # sample std of (10, 12) = sqrt(2)
    assert lines[3] == "| stem | 1 | **13.00 ± 0.00** | 0.40 ± 0.00 |"


# -- CLIP metrics ------------------------------------------------------------------------------

def test_clip_metrics_against_hand_computed_values(monkeypatch):
    scorer = build_tiny_clip("cpu")
    # three frames and two prompts with known (not unit) embeddings
    monkeypatch.setattr(scorer, "embed_frames", lambda frames: np.array([[2.0, 0, 0], [3, 4, 0], [0, 0, 5]]))
    monkeypatch.setattr(scorer, "embed_texts", lambda texts: np.array([[0, 2.0, 0], [1.0, 0, 0]]))  # source, target
    metrics = scorer.edit_metrics(np.zeros((3, 8, 8, 3), np.uint8), "source", "target")
    # cos to the target: 1, 0.6, 0; to the source: 0, 0.8, 0; consecutive frames: 0.6, 0
    assert metrics["clip_text"] == pytest.approx((1 + 0.6 + 0) / 3)
    assert metrics["frame_acc"] == pytest.approx(2 / 3)  # frame 1 is closer to the source; frame 2 ties (a success)
    assert metrics["tem_con"] == pytest.approx((0.6 + 0) / 2)
    assert metrics["clip_model"] == "tiny-random"


def test_clip_metrics_match_the_reference_definitions():
    rng = np.random.default_rng(0)
    images, source, target = rng.normal(size=(9, 16)), rng.normal(size=16), rng.normal(size=16)

    def unit(v):
        return v / np.sqrt((v * v).sum())

    # TokenFlow: mean cosine of each frame to the target; FateZero: softmax of 100 x cosines over
    # [source, target] per frame, success when p(target) >= p(source); consecutive frames' cosine
    cos = [[float(unit(f) @ unit(t)) for t in (source, target)] for f in images]
    probs = [np.exp(100 * np.array(c)) / np.exp(100 * np.array(c)).sum() for c in cos]
    assert clip_text_alignment(images, target) == pytest.approx(sum(c[1] for c in cos) / len(cos), abs=1e-12)
    assert frame_accuracy(images, source, target) == sum(p[1] >= p[0] for p in probs) / len(probs)
    pairs = [float(unit(a) @ unit(b)) for a, b in zip(images[:-1], images[1:])]
    assert temporal_consistency(images) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert temporal_consistency(images[:1]) == 1.0


def test_frame_acc_and_tem_con_on_synthetic_frames(monkeypatch):
    """A 'CLIP' that sees colours: red frames match 'red', blue frames match 'blue'."""
    scorer = build_tiny_clip("cpu")
    colours = {"red": [1.0, 0, 0], "blue": [0, 0, 1.0]}
    monkeypatch.setattr(scorer, "embed_frames", lambda frames: frames.reshape(len(frames), -1, 3).mean(1))
    monkeypatch.setattr(scorer, "embed_texts", lambda texts: np.array([colours[t] for t in texts]))
    red, blue = np.full((8, 8, 3), (255, 0, 0), np.uint8), np.full((8, 8, 3), (0, 0, 255), np.uint8)
    steady_red = np.stack([red] * 4)
    assert scorer.edit_metrics(steady_red, "blue", "red")["frame_acc"] == 1.0
    assert scorer.edit_metrics(steady_red, "red", "blue")["frame_acc"] == 0.0
    assert scorer.edit_metrics(steady_red, "blue", "red")["tem_con"] == pytest.approx(1.0)
    flicker = np.stack([red, blue, red, blue])
    metrics = scorer.edit_metrics(flicker, "blue", "red")
    assert metrics["frame_acc"] == 0.5 and metrics["tem_con"] == pytest.approx(0.0)


def test_tiny_clip_embeds_frames_as_clip_expects():
    """Image embeddings against an independent preprocessing: 32-pixel short side, centred crop, CLIP's mean/std."""
    scorer = build_tiny_clip("cpu")
    frames = np.random.default_rng(1).integers(0, 256, size=(2, 32, 48, 3), dtype=np.uint8)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = (frames[:, :, 8:40].astype(np.float64) / 255 - mean) / std  # (2, 32, 32, 3), no resize needed
    with torch.inference_mode():
        features = scorer.model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2).float())
    features = getattr(features, "pooler_output", features).double().numpy()
    expected = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(scorer.embed_frames(frames), expected, atol=1e-5)
    still = np.stack([frames[0]] * 3)
    metrics = scorer.edit_metrics(still, "a cat", "a cat")
    assert metrics["tem_con"] == pytest.approx(1.0) and metrics["frame_acc"] == 1.0
    assert scorer.embed_texts(["x" * 300, "y"]).shape == (2, 16)  # past 77 tokens: truncated, not an error


def test_load_clip_from_a_folder_and_refusals(tmp_path):
    from stem.errors import StemError

    tiny = build_tiny_clip("cpu")
    for part in (tiny.model, tiny.tokenizer, tiny.image_processor):
        part.save_pretrained(tmp_path / "clip")
    loaded = load_clip(str(tmp_path / "clip"), "cpu")
    frames = np.random.default_rng(2).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.embed_frames(frames), tiny.embed_frames(frames), atol=1e-6)
    np.testing.assert_allclose(loaded.embed_texts(["a cat"]), tiny.embed_texts(["a cat"]), atol=1e-6)
    with pytest.raises(StemError, match="does not exist"):
        load_clip(str(tmp_path / "nowhere" / "clip"))
    with pytest.raises(StemError, match="offline mode is on"):
        load_clip("stem-tests/no-such-clip")


def test_edit_command_adds_clip_metrics(clip, tmp_path, capsys):
    out = tmp_path / "edit"
    code, _, err = run(["edit", clip, *FAST, "--frames", "3", "--source-prompt", "a yellow square",
                        "--prompt", "a red square", "--out", out, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clip_model"] == "tiny-random" and 0 <= metrics["frame_acc"] <= 1
    assert -1 <= metrics["clip_text"] <= 1 and -1 <= metrics["tem_con"] <= 1


def test_a_failing_job_is_recorded_and_the_others_go_on(clips, tmp_path, capsys, counted_unet):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    manifest = [{"video": str(clips / "a.mp4")}, {"video": str(tmp_path / "notes.mp4")}]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    args = ["evaluate", tmp_path / "m.json", *FAST, "--methods", "ddim", "--editors", "none", "--out", out]
    code, _, err = run([*args, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "1 of 2 jobs failed" in lines[0] and "notes--ddim--reconstruction" in lines[0], err
    rows = {row["id"]: row for row in rows_of(out)}
    assert "psnr" in rows["a--ddim--reconstruction"] and "error" not in rows["a--ddim--reconstruction"]
    assert "video" in rows["notes--ddim--reconstruction"]["error"]
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["a--ddim--reconstruction.json"]  # retried next time
    assert "## Failed jobs (1)" in (out / "summary.md").read_text()


def test_rows_made_with_other_weights_under_the_same_model_name_are_recomputed(clips, tmp_path, capsys):
    from stem.models import build_tiny, save_pretrained

    folder = save_pretrained(build_tiny(seed=0), tmp_path / "my-model")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"video": str(clips / "a.mp4"), "source_prompt": "a yellow square"}]))
    out = tmp_path / "out"
    args = ["evaluate", manifest, *FAST, "--model", folder, "--methods", "ddim", "--editors", "none",
            "--out", out, "--cache-dir", tmp_path / "cache"]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert json.loads(stdout)["ran"] == 1
    first = rows_of(out)[0]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert json.loads(stdout)["ran"] == 0 and rows_of(out)[0]["skipped"]  # same weights: the row stands

    save_pretrained(build_tiny(seed=1), folder)  # other weights under the same name and configs
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert json.loads(stdout)["ran"] == 1
    (row,) = rows_of(out)
    assert not row["skipped"] and not row["cache_hit"] and row["fingerprint"] != first["fingerprint"]
    assert row["psnr"] != first["psnr"]  # what the new weights give, not the old row
