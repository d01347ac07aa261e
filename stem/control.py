"""Structure guidance: a ControlNet's residuals in every UNet call, from condition frames computed once per clip.

The authors' release (`TokenFlow-Edit/preprocess.py`, `sd_version == 'ControlNet'`) inverts and
reconstructs with `lllyasviel/sd-controlnet-canny`: `cv2.Canny(frame, 100, 200)` of each resized
frame, repeated to 3 channels in [0, 1]; each UNet call first runs the ControlNet on the same
latents, timestep and (source prompt) text embeddings with `conditioning_scale=1`, no guess mode,
and hands its residuals to the UNet as `down_block_additional_residuals` /
`mid_block_additional_residual`. STEM's attention is installed on the UNet only; the ControlNet
keeps its own per-frame attention. Depth guidance and ControlNet residuals in editing are this
project's own design (the release has neither).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .settings import SettingError

CONTROL_KINDS = ("none", "canny", "depth")
DEFAULT_CONTROL_MODELS = {
    "canny": "lllyasviel/control_v11p_sd15_canny",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
}
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
TINY_CONTROL = "tiny-random"  # the built-in random ControlNet / depth estimator of the tiny-random model


@dataclass(frozen=True)
class Control:
    """A ControlNet and the clip's condition frames, handed to every UNet call."""

    net: torch.nn.Module          # a diffusers ControlNetModel
    cond: torch.Tensor            # (N, 3, H, W) condition frames in [0, 1], in the net's dtype and device
    scale: float = 1.0            # conditioning_scale

    def frames(self, index) -> "Control":
        """The same ControlNet with the conditions of the frames `index` (a slice or index tensor)."""
        return Control(self.net, self.cond[index], self.scale)


def canny_conditions(frames: np.ndarray, low: int = 100, high: int = 200) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (N, 3, H, W) float32 canny edges in {0, 1}, as the release computes them."""
    import cv2

    edges = np.stack([cv2.Canny(np.ascontiguousarray(frame), low, high) for frame in frames])  # (N, H, W) 0/255
    edges = torch.from_numpy(edges.astype(np.float32) / 255.0)
    return edges[:, None].expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def depth_conditions(estimator, processor, frames: np.ndarray, batch_size: int = 4) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (N, 3, H, W) float32 depth in [0, 1], normalised over the whole clip.

    One min/max for the clip, not one per frame, so the depth scale does not flicker.
    """
    device = next(estimator.parameters()).device
    height, width = frames.shape[1:3]
    depths = []
    for start in range(0, len(frames), batch_size):
        inputs = processor(images=list(frames[start:start + batch_size]), return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=device, dtype=next(estimator.parameters()).dtype)
        depth = estimator(pixel_values=pixels).predicted_depth.float()  # (b, h', w')
        depths.append(torch.nn.functional.interpolate(depth[:, None], size=(height, width), mode="bicubic",
                                                      align_corners=False).cpu())
    depth = torch.cat(depths)  # (N, 1, H, W)
    lo, hi = depth.amin(), depth.amax()
    depth = (depth - lo) / (hi - lo).clamp_min(1e-8)
    return depth.expand(-1, 3, -1, -1).contiguous()


def check_controlnet(controlnet, unet, name: str) -> None:
    """Refuse a ControlNet made for another base model (its cross-attention width differs from the UNet's)."""
    have, want = controlnet.config.cross_attention_dim, unet.config.cross_attention_dim
    if have != want:
        raise SettingError("", f"The ControlNet {name!r} has cross-attention width {have} but the model's UNet has "
                           f"{want}; pass a ControlNet made for this base model as {{control_model}}.",
                           mentions={"control_model": "the ControlNet model"})


def build_tiny_controlnet(unet, seed: int = 0):
    """A random ControlNet shaped like `unet` (diffusers' `ControlNetModel.from_unet`), seeded."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                        load_weights_from_unet=False)
        for p in net.parameters():  # zero convolutions start at 0; random ones make the test residuals matter
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    return net


def build_tiny_depth_estimator(seed: int = 0):
    """A tiny random DPT depth estimator and its image processor (transformers), seeded."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(config)
    processor = DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False, do_rescale=True)
    return model.eval().requires_grad_(False), processor


def load_controlnet(model_id: str, unet, device, dtype, seed: int = 0):
    """The ControlNet `model_id` (hub id or folder; `tiny-random`: built from `unet`), checked against `unet`."""
    if model_id == TINY_CONTROL:
        net = build_tiny_controlnet(unet, seed)
    else:
        from diffusers import ControlNetModel

        try:
            net = ControlNetModel.from_pretrained(model_id, torch_dtype=dtype)
        except Exception as error:  # hub, network and format errors all mean "cannot load this ControlNet"
            raise SettingError("", f"Could not load the ControlNet {model_id!r} ({type(error).__name__}); pass a "
                               "local ControlNet folder or hub id as {control_model}.",
                               mentions={"control_model": "the ControlNet model"}) from error
    check_controlnet(net, unet, model_id)
    if next(net.parameters()).dtype != dtype:  # diffusers warns on any dtype cast, even a no-op
        net.to(dtype=dtype)
    return net.to(device=device).eval().requires_grad_(False)


def load_depth_estimator(model_id: str, device, seed: int = 0):
    """A transformers depth-estimation model and its processor (`tiny-random`: a built-in random DPT)."""
    if model_id == TINY_CONTROL:
        model, processor = build_tiny_depth_estimator(seed)
    else:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        try:
            model = AutoModelForDepthEstimation.from_pretrained(model_id)
            processor = AutoImageProcessor.from_pretrained(model_id)
        except Exception as error:
            raise SettingError("", f"Could not load the depth model {model_id!r} ({type(error).__name__}); pass a "
                               "local depth-estimation model folder or hub id as {depth_model}.",
                               mentions={"depth_model": "the depth model"}) from error
    return model.to(device).eval().requires_grad_(False), processor


def controlled_unet(unet, control: Control, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                    cond: torch.Tensor, **unet_kwargs) -> torch.Tensor:
    """One UNet call with the ControlNet's residuals, as diffusers' StableDiffusionControlNetPipeline does.

    Args:
        latents: (B, 4, h, w); text: (B, 77, D); cond: (B, 3, H, W) the condition frames of these latents.
        unet_kwargs: more arguments of the UNet call (e.g. `cross_attention_kwargs` for the UNet's processors).

    Returns:
        (B, 4, h, w) the UNet's output.
    """
    down, mid = control.net(latents, t, encoder_hidden_states=text, controlnet_cond=cond,
                            conditioning_scale=control.scale, return_dict=False)
    return unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, **unet_kwargs).sample
