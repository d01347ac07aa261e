"""The benchmarks: one attention layer, one inversion step, one editing step; rows go to a `report` callback."""

from __future__ import annotations

import contextlib

import torch

from stem.attention import AttentionState
from .measure import measure
from .models import attention_layer, bench_unet, unet_only_parts
from .modes import install, mode_state, processor, using_processor


def bench_attention(modes, frames, tokens, device, dtype, repeats, warmup, num_bases, num_iters, report):
    """Time one self-attention layer per mode and N; rows go to `report`."""
    attn = attention_layer(device, dtype)
    generator = torch.Generator().manual_seed(0)
    for n in frames:
        x = torch.randn(n, tokens, attn.inner_dim, generator=generator).to(device=device, dtype=dtype)

        def case(mode, x):
            state = mode_state(mode, num_bases=num_bases, num_iters=num_iters)
            return lambda: using_processor(attn, processor(mode, state)), lambda: attn(x)

        with torch.inference_mode():
            results = measure({mode: case(mode, x) for mode in modes}, device, repeats, warmup)
        for mode, (seconds, peak, how) in results.items():
            report({"bench": "attention", "mode": mode, "frames": n, "tokens": tokens, "seconds": seconds,
                    "peak_mb": peak, "memory": how})
        del x


def bench_inversion(modes, frames, size, device, dtype, repeats, warmup, num_bases, num_iters, report, unet_kind="sd15",
                    unet=None):
    """Time one inversion step (one UNet call over all N frames) per mode and N; rows go to `report`."""
    from stem.inversion import call_unet

    unet = unet if unet is not None else bench_unet(unet_kind, device, dtype)
    side = size // 8  # latent pixels
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor(500, device=device)
    for n in frames:
        latents = torch.randn(n, unet.config.in_channels, side, side, generator=generator).to(
            device=device, dtype=dtype
        )
        text = torch.randn(n, 77, unet.config.cross_attention_dim, generator=generator).to(device=device, dtype=dtype)

        def case(mode, latents, text):
            state = mode_state(mode, num_bases=num_bases, num_iters=num_iters)
            return lambda: install(unet, mode, state), lambda: call_unet(unet, latents, t, text)

        with torch.inference_mode():
            results = measure({mode: case(mode, latents, text) for mode in modes}, device, repeats, warmup)
        for mode, (seconds, peak, how) in results.items():
            report({"bench": "inversion", "mode": mode, "frames": n, "size": size, "seconds": seconds,
                    "peak_mb": peak, "memory": how})
        del latents, text


# -- editing ------------------------------------------------------------------------------------

def tokenflow_step(parts, trajectory, timesteps, alphas, text, batch_size):
    """(setup, call) of one TokenFlow step: the keyframe pass and the propagation over every frame."""
    from stem.editing.tokenflow import EditSettings, edit_latents

    # injecting in this step, as the first steps of a real edit do
    edit = EditSettings(prompt="bench", batch_size=batch_size, pnp_attn=1.0, pnp_conv=1.0).validate()
    state = AttentionState(method="stem", num_groups=3)
    return contextlib.nullcontext, lambda: edit_latents(parts, trajectory, timesteps, alphas, text, edit, state)


def fatezero_step(parts, trajectory, timesteps, alphas, text, batch_size):
    """(setup, call) of one FateZero step: the source and both edit groups of every frame, fusing on the fly.

    `batch_size` is TokenFlow's and unused here; `text` holds the source, negative and target prompts, the
    word map comes from the two prompts below (a word swap of the same token count: "replace").
    """
    from stem.editing import EDITORS as EDIT_FUNCTIONS
    from stem.editing import FateZeroSettings

    edit = FateZeroSettings(
        prompt="a bench clip", source_prompt="a test clip", self_replace=1.0, cross_replace=1.0
    ).validate()
    state = AttentionState(method="stem", num_groups=3)
    return contextlib.nullcontext, lambda: EDIT_FUNCTIONS["fatezero"](
        parts, trajectory, timesteps, alphas, text, edit, state
    )


EDITORS = {"tokenflow": tokenflow_step, "fatezero": fatezero_step}


def bench_edit(editors, frames, size, device, dtype, repeats, warmup, batch_size, report, unet_kind="sd15"):
    """Time one editing step per editor against 3·N plain per-frame UNet evaluations (mode "ddim").

    The editing step is one denoising step of `stem.editing.tokenflow.edit_latents` on a one-step schedule
    (keyframe pass, propagation, guidance). The baseline evaluates the UNet with its default
    processors on 3·N samples in calls of 3·batch_size samples, the size of the propagation's calls.
    """
    from stem.inversion import call_unet, ddim_schedule

    parts = unet_only_parts(unet_kind, device, dtype)
    unet = parts.unet
    timesteps, alphas = ddim_schedule(parts.scheduler, 1)
    side, width = size // 8, unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    t = timesteps[0].to(device)
    for n in frames:
        trajectory = torch.randn(2, n, unet.config.in_channels, side, side, generator=generator)  # x_0, x_1 on the host
        text = torch.randn(3, 77, width, generator=generator)
        samples = torch.randn(3 * n, unet.config.in_channels, side, side, generator=generator).to(
            device=device, dtype=dtype
        )
        sample_text = text.repeat_interleave(n, dim=0).to(device=device, dtype=dtype)
        call = 3 * batch_size

        def per_frame():
            for start in range(0, 3 * n, call):
                call_unet(unet, samples[start:start + call], t, sample_text[start:start + call])  # noqa: F821 (del'd after the loop)

        cases = {"ddim": (contextlib.nullcontext, per_frame)}
        for editor in editors:
            cases[editor] = EDITORS[editor](parts, trajectory, timesteps, alphas, text, batch_size)
        with torch.inference_mode():
            results = measure(cases, torch.device(device), repeats, warmup)
        for mode, (seconds, peak, how) in results.items():
            report({"bench": "edit", "mode": mode, "frames": n, "size": size, "seconds": seconds, "peak_mb": peak,
                    "memory": how, "batch_size": batch_size})
        del samples, sample_text
