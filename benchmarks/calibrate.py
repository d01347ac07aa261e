"""`python -m benchmarks memory`: the constants of `stem.memory`, measured.

On the CPU, live tensor bytes are counted from the profiler's allocation events (every allocation
and free of the CPU allocator, in order), the counterpart of CUDA's `max_memory_allocated`; RSS
would add the allocator's caching. On CUDA (`--device cuda`, fp16) the caching allocator's own
counters are read: `max_memory_allocated` for peaks, `memory_allocated` at the marks. SD-1.5's UNet
(random weights) runs on N samples without chunks:

    UNET_CALL  the slope of the peak between two N (the fixed part, e.g. the CPU's weight reorders, drops out)
    UNET_HELD  the live bytes when a self-attention layer is reached (what a lock-step chunk holds while it waits)

and SD-1.5's VAE encodes and decodes one frame. Everything is per latent token (per pixel for the
VAE) per sample, in elements of the model's dtype. On CUDA it then runs STEM on 8 frames in
lock-step chunks of every size and prints each measured peak beside `stem.memory`'s estimate.
"""

from __future__ import annotations

import torch

from stem.attention import (
    AttentionState,
    FrameAttnProcessor,
    attention_mode,
    processors_installed,
    self_attention_layers,
)

MARK = "stem-bench-self-attention"


class _MarkedAttnProcessor(FrameAttnProcessor):
    """Per-frame attention that marks the moment a lock-step chunk would wait: in the profiler's timeline
    (CPU), or by reading the CUDA allocator's live bytes into `marks`."""

    def __init__(self, *args, marks: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.marks = marks

    def attend(self, attn, query, key, value, attention_mask=None):
        if self.marks is not None:
            self.marks.append(torch.cuda.memory_allocated(query.device))
        else:
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


def cuda_live_bytes(fn, device, marks: list | None = None) -> tuple[int, int]:
    """(peak, largest at a mark) of the CUDA bytes `fn` allocates above what was allocated before it."""
    from .measure import PeakMemory

    if marks is not None:
        marks.clear()
    with PeakMemory(device) as memory:
        fn()
    peak = round(memory.peak_mb * 2**20)
    return peak, max((m - memory.base for m in marks), default=0) if marks is not None else 0


def calibrate(device: str = "cpu", size: int | None = None, frames=None, vae_sizes=None) -> dict:
    """Measure UNET_CALL, UNET_HELD and the VAE's elements per pixel; prints each measurement.

    CPU: float32, 128 px, 16 and 32 samples, VAE at 128 and 256 px. CUDA: float16, 256 px, 8 and 16
    samples, VAE at 256 and 512 px, then the lock-step chunk table (`lockstep`).
    """
    from .models import sd15_unet, sd15_vae

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    size = size or (256 if cuda else 128)
    frames = frames or ((8, 16) if cuda else (16, 32))
    vae_sizes = vae_sizes or ((256, 512) if cuda else (128, 256))
    element = torch.finfo(dtype).bits // 8
    marks = [] if cuda else None

    def measure(fn):
        if cuda:
            fn()  # warm-up: cuDNN picks its algorithms, cuBLAS allocates its workspace
            return cuda_live_bytes(fn, device, marks)
        return live_bytes(fn)

    unet = sd15_unet(device, dtype)
    layers = self_attention_layers(unet)
    L, t = (size // 8) ** 2, torch.tensor(500, device=device)
    peaks, held = {}, []
    with torch.inference_mode(), processors_installed(
            unet, lambda name, _: _MarkedAttnProcessor(None, name, marks=marks) if name in layers else None):
        for n in frames:
            x = torch.randn(n, 4, size // 8, size // 8, device=device, dtype=dtype)
            text = torch.randn(n, 77, 768, device=device, dtype=dtype)
            peaks[n], at_layer = measure(lambda: unet(x, t, encoder_hidden_states=text))  # noqa: F821 (del'd after)
            held.append(at_layer / element / (n * L))
            print(f"unet {size} px, {n} samples: peak {peaks[n] / 2**20:.1f} MiB, at a self-attention layer "
                  f"{at_layer / 2**20:.1f} MiB ({held[-1]:.0f} per token per sample)", flush=True)
    a, b = frames[0], frames[-1]
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "UNET_CALL": (peaks[b] - peaks[a]) / element / ((b - a) * L), "UNET_HELD": max(held)}
    if cuda:
        result["lockstep"] = lockstep_table(unet, device, dtype, size)
    del unet
    vae = sd15_vae(device, dtype)
    per_pixel = []
    with torch.inference_mode():
        for px in vae_sizes:
            image = torch.randn(1, 3, px, px, device=device, dtype=dtype)
            latent = torch.randn(1, 4, px // 8, px // 8, device=device, dtype=dtype)
            encode, _ = measure(lambda: vae.encode(image).latent_dist.mean)
            decode, _ = measure(lambda: vae.decode(latent).sample)
            per_pixel += [encode / element / px**2, decode / element / px**2]
            print(f"vae {px} px: encode {per_pixel[-2]:.0f}, decode {per_pixel[-1]:.0f} per pixel", flush=True)
    result["VAE_ELEMENTS_PER_PIXEL"] = max(per_pixel)
    return result


def lockstep_table(unet, device, dtype, size: int, frames: int = 8, chunks=(None, 4, 2, 1)) -> dict:
    """STEM on `frames` frames in lock-step chunks: {chunk: (measured MiB, estimated MiB)} of one UNet call."""
    from stem.inversion import call_unet
    from stem.memory import Job, ModelFacts, inversion_activations, trajectory_bytes

    h = size // 8
    x = torch.randn(frames, 4, h, h, device=device, dtype=dtype)
    text = torch.randn(frames, 77, 768, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    facts = ModelFacts(unet_bytes=0, vae_bytes=0, text_bytes=0, element_bytes=torch.finfo(dtype).bits // 8)
    job = Job(frames=frames, height=size, width=size, method="stem", num_steps=0)
    trajectory = trajectory_bytes(job)  # not held by a bare UNet call
    table = {}
    with torch.inference_mode(), attention_mode(unet, AttentionState(method="stem")):
        for chunk in chunks:
            call_unet(unet, x, t, text, chunk)  # warm-up
            peak, _ = cuda_live_bytes(lambda: call_unet(unet, x, t, text, chunk), device)
            estimated = inversion_activations(job, facts, chunk) - trajectory
            table[str(chunk)] = (round(peak / 2**20, 1), round(estimated / 2**20, 1))
            print(f"stem {frames} frames {size} px, chunk {chunk}: measured {peak / 2**20:.0f} MiB, "
                  f"estimated {estimated / 2**20:.0f} MiB", flush=True)
    return table
