"""The benchmark command end to end (tiny shapes), and the fast STEM path against the naive reference."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from benchmarks import NaiveStemAttnProcessor, install, main
from stem.attention import AttentionState, StemAttnProcessor, attention_mode

ROW_KEYS = {"bench", "mode", "frames", "seconds", "peak_mb", "device", "dtype", "memory"}


def test_attention_and_inversion_benchmarks_write_one_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["attention", "--tokens", "64", "--frames", "1,2", "--repeats", "1", "--bases", "8", "--iters", "2",
          "--json", str(out)])
    main(
        [
            "inversion",
            "--unet",
            "tiny",
            "--size",
            "64",
            "--frames",
            "1,2",
            "--repeats",
            "1",
            "--bases",
            "8",
            "--iters",
            "2",
            "--json",
            str(out),
            "--md",
            str(tmp_path / "bench.md"),
            "--plot",
            str(tmp_path / "bench.png"),
        ]
    )

    rows = json.loads(out.read_text())["rows"]
    attention = [r for r in rows if r["bench"] == "attention"]
    inversion = [r for r in rows if r["bench"] == "inversion"]
    assert {(r["mode"], r["frames"]) for r in attention} == {
        (m, n) for m in ("ddim", "inflated", "stem", "stem-naive") for n in (1, 2)}
    assert {(r["mode"], r["frames"]) for r in inversion} == {
        (m, n) for m in ("ddim", "stem", "inflated") for n in (1, 2)
    }
    for r in rows:
        assert ROW_KEYS <= r.keys() and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["seconds"] > 0 and r["peak_mb"] >= 0
    assert all(r["tokens"] == 64 for r in attention) and all(r["size"] == 64 for r in inversion)

    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "bench.md").read_text()
    assert page.count("| attention |") == 8 and page.count("| inversion |") == 6
    assert "| inversion | 2 | 64 | stem |" in capsys.readouterr().out  # the table is printed too


def test_rerunning_a_mode_replaces_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "attention",
        "--tokens",
        "16",
        "--frames",
        "1",
        "--repeats",
        "1",
        "--bases",
        "4",
        "--iters",
        "1",
        "--json",
        str(out),
    ]
    main(args + ["--modes", "ddim,stem"])
    main(args + ["--modes", "stem"])
    assert sorted(r["mode"] for r in json.loads(out.read_text())["rows"]) == ["ddim", "stem"]


def test_report_rerenders_the_page_and_plot_without_running(tmp_path):
    out = tmp_path / "bench.json"
    main(["attention", "--tokens", "16", "--frames", "1", "--repeats", "1", "--bases", "4", "--iters", "1",
          "--modes", "ddim", "--json", str(out)])
    before = out.read_text()
    main(["report", "--json", str(out), "--md", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png")])
    assert out.read_text() == before
    assert "| attention | 1 | 16 | ddim |" in (tmp_path / "b.md").read_text() and (tmp_path / "b.png").exists()


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["attention", "--modes", "ddim,fast"])


@torch.no_grad()
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 1000])  # one chunk; many ragged ones
def test_fast_stem_equals_the_naive_reference(groups, chunk_elements):
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16).eval()
    # keys spread widely enough that most logits / tau lie far below their row's maximum
    x = 3 * torch.randn(groups * 3, 50, 64, generator=torch.Generator().manual_seed(1))

    def run(cls, seed=0):
        state = AttentionState(method="stem", num_bases=8, num_iters=3, seed=seed, num_groups=groups,
                               em_chunk_elements=chunk_elements)
        attn.set_processor(cls(state))
        return attn(x)

    fast, naive = run(StemAttnProcessor), run(NaiveStemAttnProcessor)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(run(StemAttnProcessor, seed=1), naive, rtol=1e-3, atol=1e-3)  # the check can fail


@torch.no_grad()
def test_naive_reference_installs_like_the_engine_on_a_unet(tiny_parts):
    unet = tiny_parts.unet
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))
    state = AttentionState(method="stem", num_bases=6, num_iters=2, step=3)
    with attention_mode(unet, state):
        fast = unet(x, 10, encoder_hidden_states=text).sample
    with install(unet, "stem-naive", state):
        naive = unet(x, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-4)  # 10 sharp (tau = 0.01) EMs in a row
    with attention_mode(unet, AttentionState(method="stem", num_bases=6, num_iters=2, step=4)):
        other_step = unet(x, 10, encoder_hidden_states=text).sample
    assert not torch.allclose(other_step, naive, rtol=1e-3, atol=1e-3)  # same layer seeds matter


# -- the editing bench and the GPU check ------------------------------------------------------------

def test_edit_benchmark_compares_one_editing_step_with_3n_unet_calls(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["edit", "--unet", "tiny", "--size", "64", "--frames", "4", "--batch-size", "2", "--repeats", "1",
          "--editors", "tokenflow,fatezero", "--json", str(out), "--md", str(tmp_path / "bench.md")])
    rows = json.loads(out.read_text())["rows"]
    printed = capsys.readouterr().out
    modes = {r["mode"] for r in rows}
    assert {"ddim", "tokenflow"} <= modes and all(r["bench"] == "edit" and r["frames"] == 4 for r in rows)
    assert "fatezero" in modes or "edit fatezero: skipped" in printed  # the slot: skipped until it exists
    assert "| edit | 4 | 64 | tokenflow |" in (tmp_path / "bench.md").read_text()


def test_edit_step_runs_the_keyframe_pass_and_the_propagation(tiny_parts, count_calls):
    """One step of 3 groups: the keyframe call and one propagation call per batch of frames."""
    from benchmarks.benches import tokenflow_step
    from stem.inversion import ddim_schedule
    from stem.models import sd_ddim_scheduler

    timesteps, alphas = ddim_schedule(sd_ddim_scheduler(), 1)
    trajectory, text = torch.randn(2, 5, 4, 8, 8), torch.randn(3, 77, 32)
    setup, call = tokenflow_step(tiny_parts, trajectory, timesteps, alphas, text, batch_size=2)
    with setup(), count_calls(tiny_parts.unet) as unet, torch.inference_mode():
        latents, details = call()
    assert unet.calls == 1 + 3 and latents.shape == (5, 4, 8, 8) and len(details["keyframes"][0]) == 3


def test_fatezero_step_runs_every_frame_of_the_three_groups_once(tiny_parts, count_calls):
    """One FateZero step: one UNet call on the source and both edit groups of all frames."""
    from benchmarks.benches import fatezero_step
    from stem.inversion import ddim_schedule
    from stem.models import sd_ddim_scheduler

    timesteps, alphas = ddim_schedule(sd_ddim_scheduler(), 1)
    trajectory, text = torch.randn(2, 5, 4, 8, 8), torch.randn(3, 77, 32)
    setup, call = fatezero_step(tiny_parts, trajectory, timesteps, alphas, text, batch_size=2)
    with setup(), count_calls(tiny_parts.unet) as unet, torch.inference_mode():
        latents, _ = call()
    assert unet.calls == 1 and latents.shape == (5, 4, 8, 8) and torch.isfinite(latents).all()


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    assert main(["gpu", "--dry", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench-gpu.json").read_text())
    benches = {(r["bench"], r["mode"]) for r in doc["rows"]}
    assert {("attention", "stem"), ("inversion", "stem"), ("inversion", "inflated"), ("full", "stem"),
            ("full", "ddim"), ("full", "stem-canny"), ("full-edit", "tokenflow"), ("full-edit", "fatezero")} <= benches
    full = next(r for r in doc["rows"] if r["bench"] == "full" and r["mode"] == "stem")
    assert full["finite"] and full["steps"] == 2 and full["seconds"] > 0 and full["estimate_mb"] > 0
    assert {s["status"] for s in doc["sections"].values()} <= {"ok", "skipped"} and "pytest" not in doc["sections"]
    assert doc["sdpa"]["cases"] and all(c["usable"]["math"] in ("yes", "not tried") for c in doc["sdpa"]["cases"])
    page = (tmp_path / "bench-gpu.md").read_text()
    assert "## Whole jobs" in page and "| full | stem |" in page and "## Sections of the GPU check" in page
    assert (tmp_path / "bench-gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_check_script_runs_sections_in_their_own_processes_without_video_libraries(tmp_path):
    """The script as the GPU machine runs it, with PyAV, imageio and gradio absent (as they are there)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nfor name in ('av', 'imageio', 'imageio_ffmpeg', 'gradio'):\n    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site)}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", str(tmp_path / "out"), "--isolate",
                           "--sections", "pytest,full-edit"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "bench-gpu.json").read_text())
    assert doc["sections"]["pytest"]["status"] == "ok" and doc["pytest"]["skipped"] > 0  # no CUDA here
    assert doc["sections"]["full-edit"]["status"] == "ok"
    assert [r["bench"] for r in doc["rows"]] == ["full-edit"]
    assert "| full-edit | ok |" in proc.stdout  # the summary table comes last


# -- benchmarks/ beside the library ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_ships_no_benchmarks():
    """No module of `stem` names `benchmarks`; the wheel's packages are every package under stem/ and nothing else."""
    import ast
    import importlib.util
    import tomllib

    from setuptools import find_packages

    for path in (ROOT / "stem").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(m.split(".")[0] == "benchmarks" for m in modules), path
    assert importlib.util.find_spec("stem.bench") is None and not (ROOT / "stem" / "bench_fatezero.py").exists()
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stem").rglob("__init__.py")}
    assert shipped == on_disk and "stem.editing" in shipped


def test_fatezero_is_a_subcommand_with_its_own_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.fatezero.fix_mmap_threshold", lambda: False)  # leave this process's malloc alone
    out = tmp_path / "fz.json"
    assert main(["fatezero", "--unet", "tiny", "--frames", "1", "--steps", "1", "--size", "64", "--modes", "ddim",
                 "--json", str(out)]) == 0
    assert [(r["bench"], r["frames"], r["steps"]) for r in json.loads(out.read_text())["rows"]] == [
        ("fatezero-memory", 1, 1)]
    with pytest.raises(SystemExit):  # its options belong after it
        main(["--frames", "1", "fatezero"])
    assert "put it first" in capsys.readouterr().err


def test_repository_root_is_found_from_inside_the_checkout_or_from_the_package(tmp_path, monkeypatch):
    from benchmarks.gpu import repository_root

    assert repository_root(ROOT / "tests") == ROOT
    assert repository_root(tmp_path) == ROOT  # outside any checkout: the one the package lives in
    fake = tmp_path / "checkout"
    for marker in ("stem/__init__.py", "benchmarks/__init__.py", "tests/test_gpu.py"):
        (fake / marker).parent.mkdir(parents=True, exist_ok=True)
        (fake / marker).touch()
    (fake / "assets").mkdir()
    monkeypatch.chdir(fake / "assets")
    assert repository_root() == fake  # the working folder's checkout comes first


def test_isolated_sections_write_where_the_caller_asked_from_any_folder(tmp_path, monkeypatch):
    """The section's process imports the parent's packages and resolves a relative --out as the parent does."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "")
    assert main(["gpu", "--dry", "--isolate", "--sections", "sdpa", "--out", "rel"]) == 0
    doc = json.loads((tmp_path / "rel" / "bench-gpu.json").read_text())
    assert doc["sections"]["sdpa"]["status"] == "ok" and doc["sdpa"]["cases"]
