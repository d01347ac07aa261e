"""CUDA checks (marker `gpu`; skipped without a CUDA device). `pytest -m gpu` and the GPU check run them.

float32 references run in real float32 here (TF32 off for matrix products and convolutions).
"""

import dataclasses

import numpy as np
import pytest
import torch

from stem.attention import PROCESSORS, AttentionState
from stem.cache import LatentCache
from stem.em import estimate_bases
from stem.engine import Engine, InversionSettings
from stem.errors import StemError
from stem.models import TINY_MODEL, build_tiny
from stem.video import Video

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
SETTINGS = InversionSettings(
    model=TINY_MODEL, method="stem", num_bases=8, num_iters=2, num_steps=3, size=64, prompt="a cat"
)


@pytest.fixture(autouse=True)
def exact_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def half_dtypes():
    return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else [])


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def relative_error(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def clip(frames=4, size=64) -> Video:
    texture = np.random.default_rng(0).integers(0, 256, (size, size + 2 * frames, 3), dtype=np.uint8)
    return Video(np.stack([texture[:, 2 * t:2 * t + size] for t in range(frames)]), 12.0, "synthetic")


def test_em_of_fp16_keys_on_cuda_is_float32_and_matches_the_cpu():
    generator = torch.Generator().manual_seed(0)
    keys = (3 * torch.randn(8, 8192, 40, generator=generator)).half()
    values = torch.randn(8, 8192, 40, generator=generator).half()
    init = torch.randn(8, 256, 40, generator=generator)
    # tau = 1: smooth responsibilities, so summation orders cannot tip a token from one basis to another
    gpu = estimate_bases(keys.to(CUDA), values.to(CUDA), 256, 5, tau=1.0, init=init.to(CUDA))
    cpu = estimate_bases(keys.float(), values.float(), 256, 5, tau=1.0, init=init)
    for g, c in zip(gpu, cpu):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert relative_error(g, c) < 1e-4  # float32 both; fp16 accumulation would be off by ~5e-4


@torch.no_grad()
@pytest.mark.parametrize("method, bound", [("ddim", 4), ("inflated", 4), ("stem", 40)])
@pytest.mark.parametrize("dtype", half_dtypes(), ids=str)
def test_sd15_sized_attention_in_half_on_cuda_matches_float64(method, bound, dtype):
    """One SD-1.5 top-level self-attention layer (8 heads of 40, 4 frames of 1024 tokens) against float64 on the CPU.

    Measured on the CPU at this shape: ddim and inflated 0.5 u, STEM 11 u in float16 (its τ = 0.01 E-step
    turns roundings of the keys into moved responsibilities), 4 u in bfloat16.
    """
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    half = Attention(query_dim=320, heads=8, dim_head=40).eval().to(device=CUDA, dtype=dtype)
    exact = Attention(query_dim=320, heads=8, dim_head=40).eval().double()
    exact.load_state_dict({k: v.cpu() for k, v in half.state_dict().items()})  # the rounded weights
    x = torch.randn(4, 1024, 320, generator=torch.Generator().manual_seed(1)).to(dtype)
    state = AttentionState(method=method)
    half.set_processor(PROCESSORS[method](state))
    exact.set_processor(PROCESSORS[method](state))
    out = half(x.to(CUDA))
    assert out.dtype == dtype and torch.isfinite(out).all()
    error = relative_error(out, exact(x.double()))
    print(f"{method} {dtype}: {error / unit_roundoff(dtype):.1f} u")
    assert error <= bound * unit_roundoff(dtype)


@pytest.mark.parametrize("dtype", half_dtypes(), ids=str)
@pytest.mark.parametrize("method", ["ddim", "stem", "inflated"])
def test_tiny_inversion_in_half_on_cuda_stays_near_float32(method, dtype, tmp_path):
    """x_T of the tiny model on CUDA; the CPU's bounds of tests/test_half.py, doubled for other kernels."""
    bounds = {"ddim": 40, "stem": 60, "inflated": 40}
    runs = {}
    for d in (torch.float32, dtype):
        engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path / str(d))).use_parts(build_tiny(device=CUDA, dtype=d))
        runs[d] = engine.invert(clip(), dataclasses.replace(SETTINGS, method=method))
    assert torch.isfinite(runs[dtype].trajectory).all()
    error = relative_error(runs[dtype].inverted_latents, runs[torch.float32].inverted_latents)
    print(f"{method} {dtype}: {error / unit_roundoff(dtype):.1f} u")
    assert 0 < error <= bounds[method] * unit_roundoff(dtype)


def test_fused_attention_kernels_accept_our_shapes():
    from benchmarks.gpu import sdpa_probe

    probe = sdpa_probe(CUDA, torch.float16)
    for case in probe["cases"]:
        assert "yes" in (case["usable"]["flash"], case["usable"]["efficient"]), case
    print(probe["ran"])


def test_offload_on_cuda_gives_the_same_result_and_keeps_one_part_on_the_gpu(tmp_path):
    video = clip()
    reference = (
        Engine(TINY_MODEL, cache=LatentCache(tmp_path / "r")).use_parts(build_tiny(device=CUDA)).invert(video, SETTINGS)
    )
    parts = build_tiny(device=CUDA)
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "o"), offload=True).use_parts(parts)
    result = engine.invert(video, SETTINGS)
    torch.testing.assert_close(result.trajectory, reference.trajectory, rtol=1e-4, atol=1e-5)
    on_gpu = [name for name in ("unet", "vae", "text_encoder") if next(getattr(parts, name).parameters()).is_cuda]
    assert on_gpu == ["vae"]  # the last part to run (decoding)
    engine._offload.stream_unet(True)
    streamed = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "s")).use_parts(parts).invert(video, SETTINGS)
    torch.testing.assert_close(streamed.trajectory, reference.trajectory, rtol=1e-4, atol=1e-5)
    engine._offload.remove()


def test_the_memory_plan_reads_the_free_gpu_memory(tmp_path):
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path)).use_parts(build_tiny(device=CUDA))
    plan = engine.plan(clip(), SETTINGS)
    free, total = torch.cuda.mem_get_info()
    assert plan.planned and plan.chunk_size is None and free <= plan.available_bytes <= total
    engine.memory_budget = lambda: 2**20
    with pytest.raises(StemError, match="even one frame at a time"):
        engine.plan(clip(), SETTINGS)


@pytest.fixture(scope="module")
def sd15_unet_fp16():
    from benchmarks.models import sd15_unet

    return sd15_unet(CUDA, torch.float16)


@torch.no_grad()
@pytest.mark.parametrize("method, chunk", [("ddim", None), ("stem", None), ("stem", 4), ("stem", 2), ("stem", 1)])
def test_the_memory_estimate_covers_a_measured_sd15_unet_call(method, chunk, sd15_unet_fp16):
    """SD-1.5's UNet (random weights, fp16) on 8 frames at 256 px: measured peak within the estimate's activations."""
    from stem.attention import attention_mode
    from stem.inversion import call_unet
    from stem.memory import MARGIN, Job, ModelFacts, inversion_activations

    unet = sd15_unet_fp16
    x = torch.randn(8, 4, 32, 32, device=CUDA, dtype=torch.float16)
    text = torch.randn(8, 77, 768, device=CUDA, dtype=torch.float16)
    with attention_mode(unet, AttentionState(method=method)):
        call_unet(unet, x, torch.tensor(500, device=CUDA), text, chunk)  # warm-up (cuDNN picks its algorithms)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call_unet(unet, x, torch.tensor(500, device=CUDA), text, chunk)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
    facts = ModelFacts(unet_bytes=0, vae_bytes=0, text_bytes=0, element_bytes=2)
    job = Job(frames=8, height=256, width=256, method=method, num_steps=0)
    trajectory = 2 * 1 * 8 * 4 * 32 * 32 * 4  # not held by a bare UNet call
    estimated = inversion_activations(job, facts, chunk) - trajectory
    print(f"{method} chunk {chunk}: measured {measured / 2**20:.0f} MiB, estimated {estimated / 2**20:.0f} MiB")
    assert 0.3 * estimated < measured <= MARGIN * estimated


@torch.no_grad()
def test_a_chunked_call_keeps_no_memory_and_runs_on_the_callers_cublas_handle(sd15_unet_fp16):
    """Chunk threads each took a cuBLAS handle, and PyTorch keeps a workspace per handle for good (32 MiB
    each on Hopper): the first 4-chunk call left 137 MiB allocated on the H200. Greenlets keep none."""
    from stem.attention import attention_mode
    from stem.inversion import call_unet

    x = torch.randn(4, 4, 16, 16, device=CUDA, dtype=torch.float16)
    text = torch.randn(4, 77, 768, device=CUDA, dtype=torch.float16)
    with attention_mode(sd15_unet_fp16, AttentionState(method="stem")):
        call_unet(sd15_unet_fp16, x, torch.tensor(500, device=CUDA), text, None)  # this thread's handle and workspace
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(2):
            call_unet(sd15_unet_fp16, x, torch.tensor(500, device=CUDA), text, 1)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
    assert kept < 2**20, f"a chunked call left {kept / 2**20:.1f} MiB allocated"
