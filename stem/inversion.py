"""DDIM inversion and sampling as pure loops, plus the tensor-level helpers around the UNet and VAE.

Notation (Song et al. 2021, "Denoising Diffusion Implicit Models"):
    x_i      latents at noise level i; i = 0 is the clean latent, i = T the inverted noise
    a_i      alpha-bar (cumulative product of alphas) at level i; a_0 is the scheduler's final alpha
    t_i      the UNet timestep of level i (ascending: t_1 < ... < t_T)
    eps      the UNet's noise prediction

One deterministic DDIM move from level i to level j (either direction):
    x0_hat = (x_i - sqrt(1 - a_i) * eps) / sqrt(a_i)
    x_j    = sqrt(a_j) * x0_hat + sqrt(1 - a_j) * eps
Inversion moves 0 -> T evaluating eps at (x_{i-1}, t_i); sampling moves T -> 0 evaluating eps at
(x_i, t_i). With a UNet whose output does not depend on its input the two are exact inverses.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .errors import StemError
from .lockstep import run_lockstep
from .offload import execution_device

# eps_fn(x, t, step) -> eps: the model at UNet timestep t; `step` is the level index i (1..T).
EpsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# callback(info): one dict per step, k-diffusion's shape: {"phase": ..., "i": steps done, "total": ..., ...}.
# The loops here give "i", "total" and what the step made ("x", "step"); the job adds "phase" (`in_phase`).
# A sampling callback may return latents to go on from instead of "x" (a per-step hook, e.g. a blend).
Callback = Callable[[dict], "torch.Tensor | None"]


def in_phase(callback: Callback | None, phase: str) -> Callback | None:
    """`callback` with {"phase": phase} added to every dict it is given (None stays None)."""
    if callback is None:
        return None
    return lambda info: callback({"phase": phase, **info})


def ddim_schedule(scheduler, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (T,) ascending and alpha-bars (T + 1,) of levels 0..T, from a DDIMScheduler.

    "leading" spacing adds the config's `steps_offset` (1 for Stable Diffusion) to every timestep;
    at T = num_train_timesteps that pushes the last one to 1000, past the last trained timestep
    999. The offset is then lowered just enough to keep every timestep in range (1000 steps use
    each trained timestep 0..999 once); every other T keeps the scheduler's own timesteps.
    """
    scheduler.set_timesteps(num_steps)
    overshoot = int(scheduler.timesteps.max()) - (scheduler.config.num_train_timesteps - 1)
    if overshoot > 0:
        scheduler = type(scheduler).from_config(
            scheduler.config, steps_offset=scheduler.config.steps_offset - overshoot
        )
        scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.flip(0).clone()  # (T,) ascending
    alphas = torch.cat([scheduler.final_alpha_cumprod.reshape(1), scheduler.alphas_cumprod[timesteps]])
    return timesteps, alphas.to(torch.float64)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """Move latents `x` from the level with alpha-bar `alpha_from` to `alpha_to` (deterministic DDIM)."""
    a_from, a_to = float(alpha_from), float(alpha_to)
    x0_hat = (x - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0_hat + (1 - a_to) ** 0.5 * eps


class NonFiniteLatents(StemError):
    """A sampling loop's latents became NaN or infinite; the caller names the settings that can cause it."""

    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        super().__init__(f"The latents became NaN or infinite at step {step} of {total}.")


def check_finite(x: torch.Tensor, step: int, total: int) -> None:
    """Raise NonFiniteLatents if `x` holds a NaN or an infinity (one reduction and one sync per step)."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteLatents(step, total)


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, latents: torch.Tensor, timesteps: torch.Tensor, alphas: torch.Tensor,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM inversion of clean latents to noise, keeping every level.

    Args:
        eps_fn: the noise predictor, `eps_fn(x, t, step)`.
        latents: (N, 4, h, w) clean latents x_0.
        timesteps: (T,) ascending UNet timesteps.
        alphas: (T + 1,) alpha-bars of levels 0..T.
        callback: called as `callback({"i": i, "total": T, "step": i, "x": x_i})` after level i is reached.

    Returns:
        The trajectory (T + 1, N, 4, h, w): x_0 (the input) to x_T (the inverted noise).

    Raises:
        NonFiniteLatents: at the first level that holds a NaN or an infinity.
    """
    x = latents
    trajectory = [x]
    total = len(timesteps)
    for i in range(1, total + 1):
        eps = eps_fn(x, timesteps[i - 1], i)
        x = ddim_step(x, eps, alphas[i - 1], alphas[i])
        check_finite(x, i, total)
        trajectory.append(x)
        if callback is not None:
            callback({"i": i, "total": total, "step": i, "x": x})
    return torch.stack(trajectory)


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, noise: torch.Tensor, timesteps: torch.Tensor, alphas: torch.Tensor,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM sampling from level T down to clean latents.

    Args:
        eps_fn: the noise predictor, `eps_fn(x, t, step)`; step runs T, T-1, ..., 1.
        noise: (N, 4, h, w) latents x_T.
        timesteps, alphas: as for `ddim_invert`.
        callback: called as `callback({"i": k, "total": T, "step": i, "x": x_{i-1}})` after the k-th step
            (k = 1..T, from level i); latents it returns replace x_{i-1} (a per-step hook, e.g. a blend).

    Returns:
        (N, 4, h, w) the clean latents x_0.

    Raises:
        NonFiniteLatents: after the first step whose latents hold a NaN or an infinity.
    """
    x = noise
    total = len(timesteps)
    for k, i in enumerate(range(total, 0, -1), start=1):
        eps = eps_fn(x, timesteps[i - 1], i)
        x = ddim_step(x, eps, alphas[i], alphas[i - 1])
        if callback is not None:
            changed = callback({"i": k, "total": total, "step": i, "x": x})
            x = changed if isinstance(changed, torch.Tensor) else x  # a progress callback's return value is ignored
        check_finite(x, k, total)
    return x


def to_epsilon(model_output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert the UNet's output to a noise prediction (SD 2.x 768 models predict v)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        a = float(alpha)
        return a ** 0.5 * model_output + (1 - a) ** 0.5 * x
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def call_unet(unet, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
              chunk_size: int | None = None, num_groups: int = 1, control=None) -> torch.Tensor:
    """Run the UNet on all frames, optionally on chunks of frames in lock-step.

    Args:
        unet: a diffusers UNet2DConditionModel (with whatever processors are installed).
        latents: (G * N, 4, h, w), `num_groups` groups of N frames, group-major.
        t: the timestep (scalar tensor).
        text: (G * N, 77, D) text embeddings, one per latent.
        chunk_size: frames per UNet call; None or >= N runs them all at once. Whole-video
            attention layers meet across chunks, so the result does not depend on it.
        num_groups: G.
        control: optional `stem.control.Control` (a ControlNet and the N frames' conditions, shared by
            every group); its residuals go into each UNet call.

    Returns:
        (G * N, 4, h, w) the UNet's output.
    """
    frames = latents.shape[0] // num_groups
    if control is None:
        def model(x, emb, cond):
            return unet(x, t, encoder_hidden_states=emb).sample
        cond = None
    else:
        from .control import controlled_unet

        def model(x, emb, cond):
            return controlled_unet(unet, control, x, t, emb, cond)
        cond = control.cond.repeat(num_groups, 1, 1, 1)  # (G * N, 3, H, W)
    if chunk_size is None or chunk_size >= frames:
        return model(latents, text, cond)

    def chunk_of(x, start):
        if x is None:
            return None
        grouped = x.view(num_groups, frames, *x.shape[1:])[:, start:start + chunk_size]
        return grouped.reshape(-1, *x.shape[1:])

    chunks = [(chunk_of(latents, s), chunk_of(text, s), chunk_of(cond, s)) for s in range(0, frames, chunk_size)]
    outputs = run_lockstep(lambda c: model(*c), chunks)
    grouped = [o.view(num_groups, -1, *o.shape[1:]) for o in outputs]
    return torch.cat(grouped, dim=1).reshape(latents.shape[0], *outputs[0].shape[1:])


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    """(1, 77, D) CLIP text embeddings of `prompt` (padded to the tokenizer's max length)."""
    tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(execution_device(text_encoder)))[0]


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray, batch_size: int = 4, callback: Callback | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (N, 4, H/8, W/8) scaled latents (the posterior mean)."""
    latents = []
    for start in range(0, len(frames), batch_size):
        images = torch.from_numpy(frames[start:start + batch_size]).to(execution_device(vae))
        images = images.permute(0, 3, 1, 2).contiguous().to(vae.dtype) / 127.5 - 1.0
        mean = vae.encode(images).latent_dist.mean  # a channel slice of the moments, channels-last on the CPU
        # contiguous NCHW latents: the UNet's CPU kernels (so the last bits of every result, which STEM's
        # 1/tau amplifies) depend on the layout, and a lock-step chunk would lose channels-last after conv_in
        latents.append((mean * vae.config.scaling_factor).contiguous())
        if callback is not None:
            callback({"i": min(start + batch_size, len(frames)), "total": len(frames)})
    return torch.cat(latents)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 4, callback: Callback | None = None) -> np.ndarray:
    """(N, 4, h, w) scaled latents -> (N, 8h, 8w, 3) uint8 frames."""
    frames = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start:start + batch_size].to(device=execution_device(vae), dtype=vae.dtype)
        images = vae.decode(chunk / vae.config.scaling_factor).sample
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames.append(images.permute(0, 2, 3, 1).cpu().numpy())
        if callback is not None:
            callback({"i": min(start + batch_size, len(latents)), "total": len(latents)})
    return np.concatenate(frames)
