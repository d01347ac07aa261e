"""DDIM inversion and sampling: exact inverses for a constant UNet, chunk-size invariance, the schedule."""

import pytest
import torch

from stem.attention import METHODS, AttentionState, attention_mode
from stem.engine import Engine, InversionSettings
from stem.inversion import call_unet, ddim_invert, ddim_sample, ddim_schedule, ddim_step, encode_prompt, to_epsilon


def test_schedule_is_ascending_and_starts_at_the_clean_level(tiny_parts):
    timesteps, alphas = ddim_schedule(tiny_parts.scheduler, 10)
    assert timesteps.shape == (10,) and alphas.shape == (11,)
    assert (timesteps[1:] > timesteps[:-1]).all()
    assert (alphas[1:] < alphas[:-1]).all()  # more noise at every level
    assert alphas[0] == tiny_parts.scheduler.final_alpha_cumprod


def test_ddim_step_is_its_own_inverse():
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    there = ddim_step(x, eps, torch.tensor(0.9), torch.tensor(0.3))
    torch.testing.assert_close(ddim_step(there, eps, torch.tensor(0.3), torch.tensor(0.9)), x)


def test_v_prediction_converts_to_the_same_epsilon():
    a = torch.tensor(0.4)
    x0, eps = torch.randn(3), torch.randn(3)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(to_epsilon(v, x, a, "v_prediction"), eps)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_constant_output_unet_makes_inversion_exactly_invertible(tiny_parts, method):
    # The stand-in ignores the latents it is given and runs the real UNet (with the method's
    # processors) on fixed latents, so eps depends on the level only: DDIM is then exactly invertible.
    unet = tiny_parts.unet
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fixed = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = encode_prompt(tiny_parts.tokenizer, tiny_parts.text_encoder, "a ball").expand(3, -1, -1)
    timesteps, alphas = ddim_schedule(tiny_parts.scheduler, 8)
    state = AttentionState(method=method, num_bases=5, num_iters=3)

    def eps(x, t, step):
        state.step = step
        return call_unet(unet, fixed, t, text)

    with attention_mode(unet, state):
        trajectory = ddim_invert(eps, latents, timesteps, alphas)
        back = ddim_sample(eps, trajectory[-1], timesteps, alphas)
    assert trajectory.shape == (9, 3, 4, 8, 8)
    assert torch.equal(trajectory[0], latents)
    assert (trajectory[-1] - latents).abs().mean() > 0.1  # the inversion went somewhere
    torch.testing.assert_close(back, latents, rtol=0, atol=1e-5)


@torch.no_grad()
def test_stem_inversion_does_not_depend_on_the_unet_chunk_size(tmp_path):
    from conftest import make_frames
    from stem.cache import LatentCache
    from stem.models import build_tiny
    from stem.video import Video

    # float64: convolutions over batches of other sizes round differently in the last bit, and
    # STEM's E-step (logits / 0.01) amplifies float32 rounding about tenfold per step (measured:
    # 4e-7 after one step, 2e-3 after four). In float64 any real chunk dependence would still show.
    parts = build_tiny(device="cpu", dtype=torch.float64)
    video = Video(make_frames(5), 12.0, "made")
    settings = InversionSettings(model="tiny-random", method="stem", num_bases=8, num_iters=3, num_steps=4)
    results = []
    for chunk in (None, 2, 3):
        engine = Engine("tiny-random", cache=LatentCache(tmp_path / f"c{chunk}")).use_parts(parts)
        results.append(engine.invert(video, settings, engine.plan(video, settings, chunk_size=chunk)))
    for other in results[1:]:
        torch.testing.assert_close(other.trajectory, results[0].trajectory, rtol=0, atol=1e-9)
    tiny_parts = parts
    # and the video context matters: per-frame DDIM gives other latents
    ddim = Engine("tiny-random", cache=LatentCache(tmp_path / "d")).use_parts(tiny_parts).invert(
        video, InversionSettings(model="tiny-random", method="ddim", num_steps=4))
    assert (ddim.trajectory[-1] - results[0].trajectory[-1]).abs().max() > 1e-3


def test_1000_steps_use_every_trained_timestep_once_and_invert_exactly(tiny_parts):
    # "leading" spacing plus steps_offset=1 would give timesteps 1..1000, past the last trained one (999)
    InversionSettings(num_steps=1000).validate()  # documented as valid
    timesteps, alphas = ddim_schedule(tiny_parts.scheduler, 1000)
    assert timesteps.tolist() == list(range(1000))
    torch.testing.assert_close(alphas[1:], tiny_parts.scheduler.alphas_cumprod.to(torch.float64))
    assert ddim_schedule(tiny_parts.scheduler, 50)[0].tolist() == list(range(1, 1000, 20))  # other T unchanged

    # the loops over all 1000 levels, with a noise prediction that depends on the timestep only
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(1000, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = lambda x, t, step: noise[int(t)]  # noqa: E731
    trajectory = ddim_invert(eps, latents, timesteps, alphas)
    assert trajectory.shape == (1001, 2, 4, 8, 8) and torch.isfinite(trajectory).all()
    torch.testing.assert_close(ddim_sample(eps, trajectory[-1], timesteps, alphas), latents, rtol=0, atol=1e-9)


def test_one_dict_per_step_and_a_sampling_callback_may_replace_the_latents(tiny_parts):
    timesteps, alphas = ddim_schedule(tiny_parts.scheduler, 5)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = lambda x, t, step: torch.sin(x + step)  # noqa: E731 - depends on the latents: steps do not undo each other
    seen = []
    trajectory = ddim_invert(eps, latents, timesteps, alphas, seen.append)
    assert [(d["i"], d["total"], d["step"]) for d in seen] == [(i, 5, i) for i in range(1, 6)]
    assert all(torch.equal(d["x"], trajectory[d["step"]]) for d in seen)
    seen.clear()
    plain = ddim_sample(eps, trajectory[-1], timesteps, alphas, lambda info: seen.append(info) or True)  # not a tensor
    assert torch.equal(plain, ddim_sample(eps, trajectory[-1], timesteps, alphas))
    assert [(d["i"], d["step"]) for d in seen] == [(k, 6 - k) for k in range(1, 6)] and torch.equal(
        seen[-1]["x"], plain
    )
    # a hook that puts the latents back on the inversion's trajectory after every step ends at x_0 exactly
    hooked = ddim_sample(eps, trajectory[-1], timesteps, alphas, lambda info: trajectory[info["step"] - 1])
    assert torch.equal(hooked, latents) and not torch.equal(plain, latents)
