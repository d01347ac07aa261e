"""Half precision on the CPU: every path of the pipeline in float16 and bfloat16 against float32, tiny model.

Each case runs the same job with the tiny model built in float32 and in a half dtype (the same
weights, rounded) and compares the results by relative L2 error ‖half - float32‖ / ‖float32‖, in
units of the half dtype's unit roundoff u (float16: 2^-11 ≈ 4.9e-4, bfloat16: 2^-8 ≈ 3.9e-3).

Why errors of this size: every layer rounds its output once (about 40 roundings per UNet call
here) and independent roundings add up like a random walk: over the 6 UNet calls of a 3-step
inversion and reconstruction, sqrt(240) ≈ 15 u. Decoding and guidance (7.5 × the difference of two
predictions) amplify it, and STEM most: its E-step at τ = 0.01 multiplies logit differences by 100,
so a rounding can move a responsibility outright, an error that does not shrink with u (STEM's
float16 errors are the largest in units of u). Measured on this model (float16 / bfloat16, in u):

    invert-ddim 6.3 / 6.8     invert-stem 10.7 / 7.8     invert-inflated 5.6 / 7.2
    reconstruct-ddim 13 / 13  reconstruct-stem 44 / 16   edit-tokenflow 18 / 19      edit-tokenflow-stem 72 / 30

Each case's bound is loose, 3-5x its largest measurement: other CPUs run other kernels and summation
orders, and STEM's E-step turns a different last bit into a different responsibility; an error of order 1
(a wrong dtype path, EM statistics kept in half) fails them all, and an error of 0 (the half model
silently running in float32) fails too.

Adding a path (FateZero editing, FreeU) is one entry in CASES: (a function of (parts, the float32
inversion, a folder) returning float32 latents or uint8 frames, its bound in u), e.g.
`"edit-fatezero": (edited(editor="fatezero"), BOUND)` with BOUND from the same kind of measurement.
"""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from stem.attention import AttentionState, StemAttnProcessor
from stem.cache import LatentCache
from stem.editing import EDITORS, FateZeroSettings, FreeUSettings, TokenFlowSettings
from stem.editing.common import NUM_GROUPS
from stem.em import channel_stats, estimate_bases
from stem.engine import Engine, InversionSettings
from stem.inversion import ddim_schedule, encode_prompt
from stem.models import TINY_MODEL, build_tiny
from stem.video import Video

HALF = (torch.float16, torch.bfloat16)
SETTINGS = InversionSettings(model=TINY_MODEL, method="stem", num_bases=8, num_iters=2, num_steps=3, size=64,
                             prompt="a cat")


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def relative_error(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(x, dtype=np.float64)) if not torch.is_tensor(x) else x.double() for x in (a, b))
    return float((a - b).norm() / b.norm())


@functools.lru_cache(maxsize=None)
def parts_in(dtype: torch.dtype):
    return build_tiny(device="cpu", dtype=dtype)


@functools.lru_cache(maxsize=None)
def video() -> Video:
    """4 frames of a random texture sliding 2 px per frame (no two tokens alike)."""
    texture = np.random.default_rng(0).integers(0, 256, (64, 72, 3), dtype=np.uint8)
    return Video(np.stack([texture[:, 2 * t:2 * t + 64] for t in range(4)]), 12.0, "synthetic")


def invert(parts, tmp_dir, chunk_size=None, **changes):
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_dir)).use_parts(parts)
    settings = dataclasses.replace(SETTINGS, **changes)
    return engine.invert(video(), settings, engine.plan(video(), settings, chunk_size=chunk_size))


def inverted_noise(chunk_size=None, **changes):
    """Case: the inverted noise x_T of an inversion."""
    return lambda parts, _reference, tmp_dir: invert(parts, tmp_dir, chunk_size, **changes).inverted_latents


def reconstruction(**changes):
    """Case: the decoded reconstruction (uint8 frames) of an inversion."""
    return lambda parts, _reference, tmp_dir: invert(parts, tmp_dir, **changes).reconstruction


def edited(editor: str = "tokenflow", **edit_changes):
    """Case: the latents of an edit of the float32 inversion (the same source for every dtype)."""

    def run(parts, reference, _tmp_dir):
        timesteps, alphas = ddim_schedule(parts.scheduler, SETTINGS.num_steps)
        if editor == "tokenflow":
            edit = TokenFlowSettings(prompt="a dog", batch_size=2, **edit_changes).validate()
        else:
            edit = FateZeroSettings(prompt="a dog", source_prompt="a cat", **edit_changes).validate()
        with torch.inference_mode():
            text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in ("a cat", "", "a dog")])
            latents, _ = EDITORS[editor](parts, reference.trajectory, timesteps, alphas, text, edit,
                                         Engine("tiny-random", device="cpu").attention_state(SETTINGS, NUM_GROUPS))
        return latents

    return run


CASES = {  # name: (run, bound in u)
    "invert-ddim": (inverted_noise(method="ddim"), 20),
    "invert-stem": (inverted_noise(), 60),
    "invert-inflated": (inverted_noise(method="inflated"), 20),
    "reconstruct-ddim": (reconstruction(method="ddim"), 40),
    "reconstruct-stem": (reconstruction(), 200),
    "edit-tokenflow": (edited(), 50),  # FreeU on, as by default
    "edit-tokenflow-no-freeu": (edited(freeu=FreeUSettings(enabled=False)), 50),
    "edit-tokenflow-stem": (edited(attention="stem"), 150),
    # FateZero fuses in the STEM bases' space, so like STEM keyframe attention its sharp E-step (tau = 0.01)
    # can move a token to another basis: measured 107 u (fp16) and 27 u (bf16), 72 u and 28 u with blending
    "edit-fatezero": (edited("fatezero"), 250),
    "edit-fatezero-blend": (edited("fatezero", blend_words="cat,dog", freeu=FreeUSettings()), 250),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The float32 STEM inversion every edit starts from."""
    return invert(parts_in(torch.float32), tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def float32_results(reference, tmp_path_factory):
    """Each case's float32 result, computed once for both half dtypes."""
    results = {}

    def result(case):
        if case not in results:
            results[case] = CASES[case][0](parts_in(torch.float32), reference, tmp_path_factory.mktemp(case))
        return results[case]

    return result


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_half_precision_stays_within_its_bound_of_float32(case, dtype, reference, float32_results, tmp_path):
    run, bound = CASES[case]
    half = run(parts_in(dtype), reference, tmp_path)
    full = float32_results(case)
    if torch.is_tensor(half):
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
    error = relative_error(half, full)
    assert 0 < error <= bound * unit_roundoff(dtype), f"{case}: {error / unit_roundoff(dtype):.1f} u"


def test_the_cache_keeps_half_and_float32_inversions_apart(tmp_path):
    cache = tmp_path / "cache"
    full = invert(parts_in(torch.float32), cache)
    half = invert(parts_in(torch.float16), cache)
    assert not full.cache_hit and not half.cache_hit and half.key != full.key
    assert invert(parts_in(torch.float16), cache).cache_hit


# -- lock-step chunks: the same job in the same dtype, chunked or not ------------------------------

@pytest.mark.parametrize("method", ["ddim", "stem", "inflated"])
@pytest.mark.parametrize("dtype", (torch.float32, *HALF), ids=lambda d: str(d).removeprefix("torch."))
def test_chunked_inversion_equals_unchunked_in_the_same_dtype(dtype, method, tmp_path):
    """Chunks of 3 + 1 frames against one call, same weights, same dtype.

    The whole-video layers see the same keys either way, so the only difference is the per-frame
    kernels' choice for a batch of 3 or 1 instead of 4 (bit-identical on some CPUs, a last-bit
    change on others). Per-frame DDIM keeps such a change at a few u; STEM's E-step (1/tau = 100)
    can turn it into a moved responsibility, so its bound is wider. Measured on Intel and AMD:
    at most 14 u. An error of order 1 (a chunk seeing other bases) fails by far.
    """
    parts = parts_in(dtype)
    whole = invert(parts, tmp_path / "whole", method=method).inverted_latents
    chunked = invert(parts, tmp_path / "chunked", chunk_size=3, method=method).inverted_latents
    assert whole.is_contiguous() and chunked.is_contiguous()  # no channels-last latents from the VAE
    u = unit_roundoff(dtype)
    bound = (100 if method == "stem" else 30) * max(u, unit_roundoff(torch.float16))
    assert relative_error(chunked, whole) <= bound, f"{relative_error(chunked, whole) / u:.1f} u"


def test_encoded_latents_are_contiguous_nchw():
    """The VAE gets NCHW frames, so the trajectory is never channels-last (the kernels depend on it)."""
    from stem.inversion import encode_frames

    parts = parts_in(torch.float32)
    latents = encode_frames(parts.vae, video().frames)
    assert latents.is_contiguous() and not latents.is_contiguous(memory_format=torch.channels_last)


# -- the EM's statistics are float32 whatever the keys' dtype ---------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_em_of_half_keys_equals_em_of_the_same_values_in_float32(dtype):
    generator = torch.Generator().manual_seed(0)
    keys = (3 * torch.randn(4, 300, 16, generator=generator)).to(dtype)
    values = torch.randn(4, 300, 16, generator=generator).to(dtype)
    init = torch.randn(4, 8, 16, generator=generator)
    half = estimate_bases(keys, values, 8, 3, init=init, chunk_elements=1000)  # many ragged chunks
    full = estimate_bases(keys.float(), values.float(), 8, 3, init=init, chunk_elements=1000)
    for h, f in zip(half, full):
        assert h.dtype == torch.float32
        torch.testing.assert_close(h, f, rtol=1e-5, atol=1e-6)  # half accumulation would be off by ~u


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_channel_statistics_of_half_keys_are_float32(dtype):
    keys = (100 + 5 * torch.randn(3, 5000, 8, generator=torch.Generator().manual_seed(1))).to(dtype)
    std, mean = channel_stats(keys)
    exact = keys.double()
    assert std.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(mean, exact.mean(dim=1, keepdim=True).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(std, exact.std(dim=1, keepdim=True).float(), rtol=1e-5, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_stem_attention_in_half_matches_a_float64_reference(dtype):
    """The STEM processor on half inputs against the same (rounded) weights and inputs in float64."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16).eval()
    x = torch.randn(6, 50, 64, generator=torch.Generator().manual_seed(1))
    state = AttentionState(method="stem", num_bases=8, num_iters=3)
    half_attn = Attention(query_dim=64, heads=4, dim_head=16).eval().to(dtype)
    half_attn.load_state_dict(attn.state_dict())
    half_attn.set_processor(StemAttnProcessor(state))
    out = half_attn(x.to(dtype))
    exact_attn = Attention(query_dim=64, heads=4, dim_head=16).eval().double()
    exact_attn.load_state_dict(half_attn.state_dict())  # the rounded weights
    exact_attn.set_processor(StemAttnProcessor(state))
    exact = exact_attn(x.to(dtype).double())
    assert out.dtype == dtype
    error = relative_error(out, exact)
    assert error <= 20 * unit_roundoff(dtype), f"{error / unit_roundoff(dtype):.1f} u"  # a handful of roundings
