"""The fused Triton E+M kernel (`stem.em_fused`) against a float64 reference of the EM.

Without a GPU the kernel runs in Triton's interpreter. TRITON_INTERPRET must be set before triton is
imported, so these cases run in one subprocess (this file run as a script) and leave the rest of the
suite's imports alone. `gpu`-marked tests run the compiled kernel on CUDA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
# (name, B, L, C, Cv, K, dtype): ragged last block (37 = 32 + 5), K not a power of two, one token.
CASES = [
    ("ragged", 2, 37, 8, 5, 7, "float32"),
    ("k17", 3, 64, 8, 8, 17, "float32"),
    ("one_token", 2, 1, 8, 4, 5, "float32"),
    ("several_problems", 5, 40, 16, 16, 8, "float32"),
    ("float16", 2, 45, 8, 8, 6, "float16"),
    ("bfloat16", 2, 45, 8, 8, 6, "bfloat16"),
]
ITERS = 3
BOUND = 1e-3  # relative to the bases' size; float32 rounding of logits ~ |k|/tau gives ~1e-5


def reference(keys, values, init, num_iters, tau=0.01, eps=1e-4):
    """The EM in float64, written out naively: the full (B, L, K) responsibilities."""
    k, v, mu = keys.double(), values.double(), init.double()
    for _ in range(num_iters):
        unit = mu / (mu.norm(dim=-1, keepdim=True) + eps)
        z = torch.softmax(k @ unit.transpose(1, 2) / tau, dim=-1)
        z = z / (z.sum(dim=1, keepdim=True) + eps)
        mu = z.transpose(1, 2) @ k
    return mu, z.transpose(1, 2) @ v


def inputs(B, L, C, Cv, K, dtype, device="cpu"):
    g = torch.Generator().manual_seed(B * 1000 + L * 10 + K)
    keys = torch.randn(B, L, C, generator=g).to(device, getattr(torch, dtype))
    values = torch.randn(B, L, Cv, generator=g).to(device, getattr(torch, dtype))
    init = torch.randn(B, K, C, generator=g).to(device)
    return keys, values, init


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max())


def measure(device="cpu"):
    from stem.em import estimate_bases
    from stem.em_fused import estimate_bases_fused

    out = {}
    for name, B, L, C, Cv, K, dtype in CASES:
        keys, values, init = inputs(B, L, C, Cv, K, dtype, device)
        ref = reference(keys.cpu(), values.cpu(), init.cpu(), ITERS)
        fused = estimate_bases_fused(keys, values, K, ITERS, init=init)
        again = estimate_bases_fused(keys, values, K, ITERS, init=init)
        torch_path = estimate_bases(keys, values, K, ITERS, init=init)
        out[name] = {
            "keys_vs_ref": rel(fused[0], ref[0]), "values_vs_ref": rel(fused[1], ref[1]),
            "vs_torch": max(rel(fused[0], torch_path[0]), rel(fused[1], torch_path[1])),
            "torch_vs_ref": rel(torch_path[0], ref[0]),
            "repeat": bool(torch.equal(fused[0], again[0]) and torch.equal(fused[1], again[1])),
            "shapes": [list(fused[0].shape), list(fused[1].shape)],
        }
    return out


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(result, name):
    _, B, L, C, Cv, K, _ = next(c for c in CASES if c[0] == name)
    assert result["shapes"] == [[B, K, C], [B, K, Cv]]
    assert result["keys_vs_ref"] < BOUND and result["values_vs_ref"] < BOUND, result
    assert result["vs_torch"] < BOUND, result
    assert result["repeat"], "two runs of the fused kernel differ"


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_interpreted_kernel_matches_float64_reference(interpreted, name):
    check(interpreted[name], name)


def test_the_engine_and_fatezero_run_the_fused_kernel_when_asked_and_key_it_apart(interpreted):
    runs = interpreted["engine"]
    assert runs["torch_calls"] == [0, 0]
    assert all(n > 0 for n in runs["fused_calls"]), runs  # the inversion's EMs, and the FateZero edit's
    assert runs["keys_differ"]  # the kernel rounds otherwise: its own cache entries
    # the same maths: trajectories agree to float32 rounding amplified by 1/tau over 2 steps (loose, any CPU)
    assert runs["trajectory_rel"] < 1e-2, runs


def test_em_kernel_choice_and_refusals(monkeypatch):
    from stem.cli import cli_message
    from stem.engine import Engine, choose_em_kernel
    from stem.errors import StemError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose_em_kernel("auto", "cpu") == "torch" and choose_em_kernel("torch", "cpu") == "torch"
    assert Engine("tiny-random", device="cpu").em_kernel == "torch"
    with pytest.raises(StemError, match=r"^The fused EM kernel needs a CUDA GPU with Triton installed \(this job "
                                        r"runs on cpu\); choose auto or torch\.$") as error:
        Engine("tiny-random", device="cpu", em_kernel="fused")
    assert cli_message(error.value).startswith("--em-kernel: the fused EM kernel needs")
    with pytest.raises(StemError, match=r"Unknown EM kernel 'magic'; choose one of: auto, fused, torch\."):
        choose_em_kernel("magic", "cpu")
    import stem.em_fused
    import stem.engine

    monkeypatch.setattr(stem.em_fused, "available", lambda device: torch.device(device).type == "cuda")
    assert choose_em_kernel("auto", "cuda") == "torch"  # not before a GPU has compiled and measured the kernel
    monkeypatch.setattr(stem.engine, "FUSED_BY_DEFAULT", True)
    assert choose_em_kernel("auto", "cuda") == "fused" and choose_em_kernel("auto", "cpu") == "torch"


def test_not_available_on_cpu_without_interpreter(monkeypatch):
    from stem.em_fused import available

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not available("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_compiled_kernel_matches_float64_reference(name):
    check(measure("cuda")[name], name)


def engine_runs(cache_dir):
    """One tiny STEM inversion (and a FateZero edit, whose EMs use the same kernel) per EM kernel, counting the
    fused kernel's calls; run under the interpreter in the subprocess."""
    import numpy as np

    import stem.em_fused
    from stem.cache import LatentCache
    from stem.editing import FateZeroSettings, edit_video
    from stem.engine import Engine, InversionSettings
    from stem.models import build_tiny
    from stem.video import Video

    calls = {"fused": 0}
    real = stem.em_fused.estimate_bases_fused

    def counted(*args, **kwargs):
        calls["fused"] += 1
        return real(*args, **kwargs)

    stem.em_fused.estimate_bases_fused = counted
    rng = np.random.default_rng(0)
    video = Video(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8), 8.0, "noise")
    settings = InversionSettings(model="tiny-random", num_bases=4, num_iters=2, num_steps=2, size=64, prompt="a cat")
    parts = build_tiny("cpu", torch.float32)
    out = {}
    for kernel in ("torch", "fused"):
        engine = Engine("tiny-random", device="cpu", cache=LatentCache(Path(cache_dir) / kernel),
                        em_kernel=kernel).use_parts(parts)
        before = calls["fused"]
        result = engine.invert(video, settings)
        inverting = calls["fused"] - before
        edit_video(engine, video, settings, FateZeroSettings(prompt="a dog", source_prompt="a cat"))
        out[kernel] = {"key": engine.key_for(video, settings), "trajectory": result.trajectory,
                       "calls": [inverting, calls["fused"] - before - inverting]}
    t, f = out["torch"], out["fused"]
    return {"keys_differ": t["key"] != f["key"], "torch_calls": t["calls"], "fused_calls": f["calls"],
            "trajectory_rel": rel(f["trajectory"], t["trajectory"])}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as cache_dir:
        print(json.dumps({**measure(), "engine": engine_runs(cache_dir)}))
