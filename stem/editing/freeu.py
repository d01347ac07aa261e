"""FreeU (Si et al., CVPR 2024) in the editing UNet, by the rule of the original FreeU code, which the
STEM authors ship with their TokenFlow editing.

Inside every up block, just before a resnet concatenates its skip connection, FreeU looks at the
width of the hidden states arriving from below:

    the UNet's widest width (1280 in SD 1.x/2.x):  first half of the hidden channels x b1, skip filtered with s1
    block_out_channels[1] (640 in SD 1.x/2.x):     first half of the hidden channels x b2, skip filtered with s2

The skip filter (`fourier_filter`) scales the lowest frequencies of each channel: a 2-D FFT over
height and width (float32, or float64 for a float64 model), shifted so that frequency 0 sits at
(H//2, W//2); the 2x2 block of rows H//2-1..H//2 and columns W//2-1..W//2 (threshold 1) is
multiplied by s; the inverse shift and FFT; the real part, in the input's dtype. The two changes
touch different tensors, so their order does not matter.

In SD 1.x/2.x this rewrites up_blocks.0.resnets.0-2, up_blocks.1.resnets.0-2 and up_blocks.2.resnets.0
(b1, s1) and up_blocks.2.resnets.1-2 and up_blocks.3.resnets.0 (b2, s2); up_blocks.3.resnets.1-2 stay
as they are. diffusers' `enable_freeu` chooses by block index instead (b1 in up_blocks[0], b2 in
up_blocks[1]), which touches other resnets, so it is not used.

diffusers' up blocks concatenate [hidden | skip] before calling the resnet, so the rule is a forward
pre-hook on each chosen resnet: it splits the input at the hidden width (known from the UNet's
structure), rescales and filters, and concatenates again. `freeu_installed` registers the hooks by
module name and removes them on exit; nothing is patched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ..hooks import hooks_installed
from ..settings import check, flattened, metrics, setting
from .common import wide_dtype

MAX_SCALE = 10  # FreeU scales beyond this blow the features up to inf/nan
THRESHOLD = 1  # half the side of the scaled block of lowest frequencies (FreeU's and the authors' value)


def _constant(default: float, key: str, what: str):
    """One of FreeU's four constants as a setting (flag --freeu-KEY, in metrics.json as freeu_KEY)."""
    return setting(default, label=f"FreeU {key}", words=f"FreeU's {key}", flag=f"--freeu-{key}", minimum=0,
                   maximum=MAX_SCALE, step=0.1, note="FreeU's are 1.2, 1.4, 0.9, 0.2", help=f"FreeU's {what}")


@dataclass(frozen=True)
class FreeUSettings:
    """FreeU in the editing UNet; the defaults are the constants the STEM authors edit with."""

    enabled: bool = setting(True, label="FreeU", words="the FreeU switch", flag="--freeu",
                            help="FreeU re-weights the editing UNet's backbone and skip features: often crisper "
                                 "detail, sometimes over-saturated (default: the editor's; on for tokenflow, as "
                                 "the STEM authors ran it)")
    # backbone scale where the arriving hidden states have the UNet's widest width
    b1: float = _constant(1.2, "b1", "backbone scale at the widest up-block width (> 1: crisper)")
    # backbone scale where they have the second width (block_out_channels[1])
    b2: float = _constant(1.4, "b2", "backbone scale at the second width (> 1: crisper)")
    # scale of the skip features' lowest frequencies at the widest width
    s1: float = _constant(0.9, "s1", "skip low-frequency scale at the widest width (< 1: weaker skips)")
    s2: float = _constant(0.2, "s2", "skip low-frequency scale at the second width (< 1: weaker skips)")

    def validate(self) -> "FreeUSettings":
        """Raise SettingError with one sentence (in words) for the first constant out of range."""
        check(self)
        return self

    def metrics(self) -> dict:
        """The settings as recorded in metrics.json (nested in an editor's: freeu, freeu_b1, ...)."""
        return flattened("freeu", metrics(self))


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = THRESHOLD) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): the 2t x 2t lowest frequencies (centred by `fftshift`) times `scale`."""
    dtype = x.dtype
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.to(wide_dtype(dtype)), dim=(-2, -1)), dim=(-2, -1))
    H, W = x.shape[-2:]
    mask = torch.ones(H, W, dtype=spectrum.real.dtype, device=x.device)
    mask[max(0, H // 2 - threshold):H // 2 + threshold, max(0, W // 2 - threshold):W // 2 + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(dtype)


def freeu_resnets(unet) -> dict[str, tuple[int, int]]:
    """The up-block resnets FreeU rewrites: name -> (width of the hidden states arriving from below, 1 or 2).

    1 marks the UNet's widest width (b1, s1), 2 the width of `block_out_channels[1]` (b2, s2); if the
    two coincide the first rule applies.
    """
    channels = tuple(unet.config.block_out_channels)
    rules = {max(channels): 1}
    rules.setdefault(channels[1], 2)
    arriving = channels[-1]  # up_blocks[0] receives the middle block's output, of the deepest width
    chosen = {}
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if arriving in rules:
                chosen[f"up_blocks.{i}.resnets.{j}"] = (arriving, rules[arriving])
            arriving = resnet.out_channels  # the attention and the upsampler after a resnet keep its width
    return chosen


def freeu_hook(width: int, backbone: float, skip: float):
    """A forward pre-hook (with kwargs) applying FreeU to a resnet's input [hidden (width) | skip]."""

    def hook(_module, args, kwargs):
        x = args[0]  # (B, width + skip channels, H, W)
        half = width // 2
        return (torch.cat([x[:, :half] * backbone, x[:, half:width], fourier_filter(x[:, width:], skip)], dim=1),
                *args[1:]), kwargs

    return hook


@contextlib.contextmanager
def freeu_installed(unet, settings: FreeUSettings | None) -> Iterator[dict]:
    """FreeU on `unet` while the context is open (nothing when `settings` is None or disabled).

    Yields the hooked resnets by name.
    """
    if settings is None or not settings.enabled:
        yield {}
        return
    constants = {1: (settings.b1, settings.s1), 2: (settings.b2, settings.s2)}
    hooks = {name: freeu_hook(width, *constants[rule]) for name, (width, rule) in freeu_resnets(unet).items()}
    with hooks_installed(unet, hooks, pre=True, with_kwargs=True) as installed:
        yield installed
