"""`python -m stem.bench memory`: the constants of `stem.memory`, measured on the CPU.

Live tensor bytes are counted from the profiler's allocation events (every allocation and free of
the CPU allocator, in order), the counterpart of CUDA's `max_memory_allocated`; RSS would add the
allocator's caching. SD-1.5's UNet (random weights, float32) runs on N samples without chunks:

    UNET_CALL  the slope of the peak between two N (the fixed part, e.g. the CPU's weight reorders, drops out)
    UNET_HELD  the live bytes when a self-attention layer is reached (what a lock-step chunk holds while it waits)

and SD-1.5's VAE encodes and decodes one frame. Everything is per latent token (per pixel for the
VAE) per sample, in elements of the model's dtype.
"""

from __future__ import annotations

import torch

from ..attention import FrameAttnProcessor, processors_installed, self_attention_layers

MARK = "stem-bench-self-attention"


class _MarkedAttnProcessor(FrameAttnProcessor):
    """Per-frame attention that marks, in the profiler's timeline, the moment a lock-step chunk would wait."""

    def attend(self, attn, query, key, value, attention_mask=None):
        with torch.profiler.record_function(MARK):
            pass
        return super().attend(attn, query, key, value, attention_mask)


def live_bytes(fn) -> tuple[int, int]:
    """(peak, largest at a mark) of the CPU tensor bytes allocated by `fn` and alive at once."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    marks = sorted(e.start_ns() for e in events if e.name() == MARK)
    live = peak = at_marks = 0
    for time_ns, nbytes in allocations:
        while marks and marks[0] < time_ns:
            at_marks = max(at_marks, live)
            marks.pop(0)
        live += nbytes
        peak = max(peak, live)
    return peak, max(at_marks, live if marks else 0)


def calibrate(size: int = 128, frames=(16, 32), vae_sizes=(128, 256)) -> dict:
    """Measure UNET_CALL, UNET_HELD and the VAE's elements per pixel; prints each measurement."""
    from .models import sd15_unet, sd15_vae

    cpu = torch.device("cpu")
    unet = sd15_unet(cpu, torch.float32)
    layers = self_attention_layers(unet)
    L, t = (size // 8) ** 2, torch.tensor(500)
    peaks, held = {}, []
    with torch.inference_mode(), processors_installed(
            unet, lambda name, _: _MarkedAttnProcessor(None, name) if name in layers else None):
        for n in frames:
            x, text = torch.randn(n, 4, size // 8, size // 8), torch.randn(n, 77, 768)
            peaks[n], at_layer = live_bytes(lambda: unet(x, t, encoder_hidden_states=text))
            held.append(at_layer / 4 / (n * L))
            print(f"unet {size} px, {n} samples: peak {peaks[n] / 2**20:.1f} MiB, at a self-attention layer "
                  f"{at_layer / 2**20:.1f} MiB ({held[-1]:.0f} per token per sample)", flush=True)
    a, b = frames[0], frames[-1]
    result = {"UNET_CALL": (peaks[b] - peaks[a]) / 4 / ((b - a) * L), "UNET_HELD": max(held)}
    vae = sd15_vae(cpu, torch.float32)
    per_pixel = []
    with torch.inference_mode():
        for px in vae_sizes:
            image, latent = torch.randn(1, 3, px, px), torch.randn(1, 4, px // 8, px // 8)
            encode, _ = live_bytes(lambda: vae.encode(image).latent_dist.mean)
            decode, _ = live_bytes(lambda: vae.decode(latent).sample)
            per_pixel += [encode / 4 / px**2, decode / 4 / px**2]
            print(f"vae {px} px: encode {per_pixel[-2]:.0f}, decode {per_pixel[-1]:.0f} per pixel", flush=True)
    result["VAE_ELEMENTS_PER_PIXEL"] = max(per_pixel)
    return result
