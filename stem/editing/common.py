"""What every editor shares: the three-group UNet batch, injection from the source group, guidance,
the denoising loop around the cached trajectory, and the edit job (invert or reuse, edit, decode).

An edit runs, at each DDIM step i (T down to 1), one UNet batch of three groups of frames,
group-major:

    [ source x_i (from the inversion's trajectory) | edit x_i, negative prompt | edit x_i, target prompt ]

The source group re-runs the source prompt on the cached trajectory, so whatever an editor injects
(PnP features for TokenFlow, attention maps for FateZero) is computed on the fly beside the edit and
never stored per step. Classifier-free guidance combines the two edit groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from ..engine import Engine, InversionResult, InversionSettings, non_finite_advice
from ..errors import StemError
from ..settings import SettingError, check, setting
from ..inversion import (
    Callback,
    NonFiniteLatents,
    call_unet,
    ddim_sample,
    ddim_schedule,
    decode_latents,
    encode_prompt,
    in_phase,
    to_epsilon,
)
from ..memory import MemoryPlan
from ..video import Video

SOURCE, UNCOND, COND = 0, 1, 2  # the groups of the UNet batch
NUM_GROUPS = 3
DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"  # the STEM authors' editing configs


class EditSettingsBase(Protocol):
    """What `edit_video` needs of an editor's frozen settings dataclass."""

    editor: str            # the editor's name (a ClassVar of the dataclass)
    prompt: str
    negative_prompt: str
    guidance: float
    seed: int

    def validate(self): ...

    def metrics(self) -> dict: ...


# edit_latents(parts, trajectory, timesteps, alphas, text, settings, attention, chunk_size, callback)
#   -> (latents (N, 4, h, w) float32, info dict for EditResult.details)
EditFn = Callable[..., tuple[torch.Tensor, dict]]
EDITORS: dict[str, EditFn] = {}  # editor name -> its edit_latents; filled by each editor's module
# editor name -> check(settings, inversion settings, tokenizer), run before the inversion: what can only be
# checked against the inversion's prompt or the model's tokenizer (FateZero's word maps). Optional.
EDITOR_CHECKS: dict[str, Callable[[EditSettingsBase, InversionSettings, object], None]] = {}


@dataclass
class EditResult:
    """An edited video and how it was made."""

    frames: np.ndarray            # (N, H, W, 3) uint8, every input frame
    inversion: InversionResult
    inversion_cache_hit: bool
    seconds_inversion: float      # the inversion's own time (the cache load on a hit)
    seconds_editing: float        # denoising + decoding
    settings: EditSettingsBase    # the edit's settings (for edit_metrics)
    details: dict                 # editor-specific record, e.g. TokenFlow's keyframes per step

    @property
    def keyframes(self) -> list[list[int]]:
        """TokenFlow: the keyframe indices chosen at each denoising step (step T first)."""
        return self.details.get("keyframes", [])


MAX_GUIDANCE = 100  # far above any useful scale; larger ones overflow the latents to inf/nan


def is_number(x) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def leading_steps(fraction: float, num_steps: int) -> int:
    """floor(fraction * T), robust to 0.58 * 50 == 28.999..."""
    return min(num_steps, math.floor(fraction * num_steps + 1e-6))


def fraction_setting(default: float, *, label: str, words: str, help: str, **more):
    """A fraction of the denoising steps, in [0, 1], as a setting."""
    return setting(default, label=label, words=words, help=help, minimum=0, maximum=1, step=0.05, page_range=(0, 1),
                   **more)


def target_prompt_setting():
    """The target prompt every editor takes (required; the CLI's repeatable --prompt)."""
    return setting(label="Target prompt", words="the target prompt", flag="--prompt", api_name="target_prompt",
                   help="describes the video you want")


def negative_prompt_setting(default: str):
    return setting(default, label="Negative prompt", words="the negative prompt",
                   help="what the edit should avoid (the guidance's unconditional text), e.g. blur, artefacts")


def guidance_setting():
    return setting(7.5, label="Guidance scale", words="the guidance scale", minimum=1, maximum=MAX_GUIDANCE, step=0.5,
                   note="7.5 is usual", page_range=(1, 20),
                   help="classifier-free guidance scale: higher follows the target prompt more closely, and strays "
                        "further from the clip")


def validate_common(edit: EditSettingsBase) -> None:
    """Check every setting's type and range, and that the target prompt says something."""
    check(edit)
    if not edit.prompt.strip():
        raise SettingError("prompt", "The target prompt is empty; give a text that describes the edited video.",
                           type(edit))


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or `dtype` when it is wider (float64): for arithmetic that half precision would spoil."""
    return torch.promote_types(dtype, torch.float32)


def from_source(x: torch.Tensor, groups: int = NUM_GROUPS) -> torch.Tensor:
    """(G*n, ...) -> (G*n, ...) with every group's frames replaced by the source group's."""
    grouped = x.view(groups, -1, *x.shape[1:])
    return grouped[:1].expand_as(grouped).reshape(x.shape)


def unet_groups(parts, text: torch.Tensor, source: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                chunk_size: int | None = None, control=None) -> torch.Tensor:
    """Run the UNet on the three groups of n frames.

    Args:
        parts: the model (`StableDiffusionParts`).
        text: (3, 77, D) embeddings of [source prompt, negative prompt, target prompt].
        source: (n, 4, h, w) the source's latents at this level (from the trajectory).
        x: (n, 4, h, w) the edit's latents.
        t: the timestep.
        chunk_size: frames per UNet call (lock-step), None for one call.
        control: optional `stem.control.Control` with the n source frames' conditions, for every group.

    Returns:
        (3, n, 4, h, w) float32 UNet outputs of the source, negative and target groups.
    """
    n = x.shape[0]
    latents = torch.cat([source, x, x]).to(parts.dtype)
    out = call_unet(parts.unet, latents, t, text.repeat_interleave(n, dim=0), chunk_size, NUM_GROUPS, control)
    return out.float().view(NUM_GROUPS, n, *x.shape[1:])


def guided_noise(
    out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, guidance: float, prediction_type: str
) -> torch.Tensor:
    """(3, n, 4, h, w) UNet outputs -> (n, 4, h, w) the edit's classifier-free-guided noise."""
    uncond, cond = to_epsilon(out[UNCOND:], x, alpha, prediction_type)
    return uncond + guidance * (cond - uncond)


def sample_edit(eps_fn, trajectory: torch.Tensor, timesteps: torch.Tensor, alphas: torch.Tensor, device,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM sampling of the edit from the source's inverted noise x_T (float32 on `device`); see `ddim_sample`."""
    noise = trajectory[-1].to(device=device, dtype=torch.float32)
    return ddim_sample(eps_fn, noise, timesteps, alphas, callback)


def source_latents(trajectory: torch.Tensor, step: int, device) -> torch.Tensor:
    """(N, 4, h, w) the source's latents x_step, float32 on `device`."""
    return trajectory[step].to(device=device, dtype=torch.float32)


def edit_video(engine: Engine, video: Video, inversion: InversionSettings, edit: EditSettingsBase,
               plan: MemoryPlan | None = None, callback: Callback | None = None) -> EditResult:
    """Edit `video` to match `edit.prompt`, reusing the cached inversion when there is one.

    Args:
        engine: the model and latent cache; `inversion.model` must be its model.
        video: the decoded, resized frames.
        inversion: the inversion job (its settings are the cache key).
        edit: the edit's settings; `edit.editor` picks the editor (see `EDITORS`).
        plan: the job's memory plan, `engine.plan(video, inversion, edit)`; None: that one.
        callback: optional, one dict per step, `{"phase": ..., "i": done, "total": ...}`: phases "loading",
            "encoding", "inverting", "reconstructing", "decoding" (inversion, skipped on a cache hit), then
            "editing" (with the step's latents "x"), "decoding".

    Returns:
        The edited frames (N, H, W, 3) uint8, the inversion, timings and the editor's details.
    """
    inversion.validate()
    edit.validate()
    edit_latents = EDITORS[edit.editor]
    parts = engine.load(callback)
    check = EDITOR_CHECKS.get(edit.editor)
    if check is not None:  # what needs the tokenizer or the inversion's prompt, before any work
        check(edit, inversion, parts.tokenizer)
    if plan is None:
        plan = engine.plan(video, inversion, edit)  # a plan that covers the edit too, or a refusal before any work
    result = engine.invert(video, inversion, plan, callback)
    start = time.perf_counter()
    control = engine.control_for(video, inversion)  # the source frames' conditions guide every group
    control = {} if control is None else {"control": control}
    timesteps, alphas = ddim_schedule(parts.scheduler, inversion.num_steps)
    if timesteps.tolist() != result.timesteps.tolist():
        raise StemError(
            "The cached inversion was made with other timesteps than this model's scheduler gives; clear the cache "
            "and try again."
        )
    with torch.inference_mode():
        text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p)
                          for p in (inversion.prompt, edit.negative_prompt, edit.prompt)])
        if callback is not None:
            callback({"phase": "editing", "i": 0, "total": len(timesteps)})
        with engine.applied(plan):
            try:
                latents, details = edit_latents(
                    parts,
                    result.trajectory,
                    timesteps,
                    alphas,
                    text,
                    edit,
                    engine.attention_state(inversion, NUM_GROUPS),
                    plan.chunk_size,
                    in_phase(callback, "editing"),
                    **control,
                )
            except NonFiniteLatents as error:
                raise StemError(f"The edit became NaN or infinite at step {error.step} of {error.total}, so nothing "
                                f"was written; {non_finite_advice(parts.dtype, edit_causes(edit))}") from None
            frames = decode_latents(parts.vae, latents, plan.vae_batch_size, in_phase(callback, "decoding"))
    return EditResult(frames, result, result.cache_hit, result.seconds, time.perf_counter() - start, edit, details)


def edit_causes(edit: EditSettingsBase) -> tuple[str, ...]:
    """The edit's settings that can drive its latents to NaN or infinity, each with its value."""
    causes = [f"lower the guidance scale ({edit.guidance:g})"]
    freeu = getattr(edit, "freeu", None)
    if freeu is not None and freeu.enabled:
        causes.append(f"the FreeU factors (b1 {freeu.b1:g}, b2 {freeu.b2:g}, s1 {freeu.s1:g}, s2 {freeu.s2:g})")
    reweight = getattr(edit, "reweight", ())
    if reweight:
        causes.append("the reweight scales (" + ", ".join(f"{word}={scale:g}" for word, scale in reweight) + ")")
    return tuple(causes)


def edit_metrics(video: Video, result: EditResult) -> dict:
    """The metrics.json block of one edit: settings, timing, and the edit's warp error (source motion)."""
    from ..metrics import warp_error

    inv = result.inversion.settings
    return {
        "inversion_cache_hit": result.inversion_cache_hit,
        "seconds_inversion": round(result.seconds_inversion, 3),
        "seconds_editing": round(result.seconds_editing, 3),
        "num_frames": int(result.frames.shape[0]), "fps": video.fps, "width": video.width, "height": video.height,
        "warp_error": warp_error(video.frames, result.frames),
        "editor": result.settings.editor, **result.settings.metrics(),
        "method": inv.method, "source_prompt": inv.prompt, "model": inv.model, "num_steps": inv.num_steps,
    }
