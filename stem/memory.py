"""Peak GPU memory of a job, estimated before it runs, and the frame chunk and VAE batch that fit.

The model, in bytes. b: bytes per element of the model's dtype; L = (H/8)(W/8): latent tokens per
frame; w: the UNet's first block width / 320 (1 for SD 1.x and 2.x); C = 320 w; T: DDIM steps.

    peak = max over the job's phases of (weights on the GPU in that phase) + (activations of the phase)

    VAE call of v frames (encode, decode)       v · H · W · VAE_ELEMENTS_PER_PIXEL · b
    UNet call of s samples while h samples of   (s · UNET_CALL + h · UNET_HELD) · w · L · b
      other lock-step chunks wait at a layer
    + STEM                                      the EM's responsibility block and its softmax (2 x 64 MiB, float32),
                                                the float32 keys and values of one token chunk, the M-step's
                                                partial sums (16 MiB), all keys and values regrouped per head,
                                                and one head's keys in float32, N · L · C/heads · 4
                                                (the fused kernel: no block nor chunk; its programs' partial
                                                sums, 4 · B · P · K · (2 C/heads + 1), P = ⌈528 / B⌉ programs
                                                per problem, B = groups · heads; `em_fused.partial_bytes`)
    + STEM or inflated, chunked                 all frames' keys and values gathered, 2 · N · C · L · b
    + inflated                                  the queries regrouped over frames, 2 · s · C · L · b
    + inversion                                 the trajectory, every level of every frame in float32
                                                (kept on the device until the end), 2 · (T + 1) · N · 4 · L · 4
    TokenFlow edit (3 groups, M = ⌈N / batch⌉   the keyframe pass (3 · chunk samples, the other keyframes'
      keyframes)                                samples held), the propagation pass (3 · min(batch, chunk)
                                                samples) and a 64 MiB similarity block; during both, the
                                                stored keyframe outputs and features, 4 · M · S · L · b, where
                                                S = Σ over self-attention layers of tokens · channels / L

UNET_CALL, UNET_HELD and VAE_ELEMENTS_PER_PIXEL are elements per latent token (per pixel for the VAE)
per sample, measured on the SD-1.5 architecture by `python -m benchmarks memory`: on the CPU through
the profiler's allocation events, on CUDA (`--device cuda`, fp16) through the caching allocator's
counters. The constants are the larger of the two. They do not depend on the size (64-512 px
measured): attention runs in fused kernels (flash, memory-efficient or cuDNN on CUDA), so no
(tokens x tokens) matrix is held. The GPU check records this estimate beside the measured peak of
its full jobs, and `python -m benchmarks memory --device cuda` prints it beside the measured peak of
STEM calls in lock-step chunks of every size.

A phase fits when MARGIN · activations + weights + RESERVE <= the bytes available to the job
(free GPU memory, plus what torch has cached, plus our own weights already on the GPU). The plan
takes the largest balanced UNet chunk that fits (all frames at once when possible), lowers the VAE
batch down to 1 frame and then tiles the VAE, and with offload streams the UNet's weights when even
its own weights and one frame do not fit; otherwise it refuses with one sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import em
from .settings import SettingError

MiB = 2**20
GiB = 2**30

# Elements per latent token per sample, SD-1.5 UNet (w = 1); see the module docstring.
# `python -m benchmarks memory` printed, 2026-11: on the CPU (torch 2.13, float32) UNET_CALL 7246,
# UNET_HELD 3526, VAE 996; on an H200 (torch 2.11 + CUDA 13, float16) 8251, 3618 and 1225.
UNET_CALL = 8250     # peak of one UNet call (CUDA: slope over 8 -> 16 samples at 256 px; cuDNN's convolutions)
UNET_HELD = 3618     # what a sample holds at a self-attention layer (CPU 3522-3545 at 64-256 px; CUDA 3522-3618)
VAE_ELEMENTS_PER_PIXEL = 1225  # CUDA decode 1220-1225, encode 769-834 per pixel (256, 512 px); CPU decode 969-1104
EM_BLOCK_BYTES = 2 * 4 * em.DEFAULT_CHUNK_ELEMENTS  # float32 responsibilities, and softmax's output on a GPU
SPLIT_SUMS_BYTES = 4 * em.SPLIT_SUMS_ELEMENTS  # the M-step's partial sums on a GPU
SIMILARITY_BYTES = 4 * (1 << 24)  # TokenFlow's nearest-neighbour block (DEFAULT_MATCH_CHUNK_ELEMENTS)
MARGIN = 1.25            # allocator rounding and fragmentation, kernels' workspaces
RESERVE = 512 * MiB      # cuDNN/cuBLAS workspaces and whatever else this process allocates
WHOLE_VIDEO = ("stem", "inflated")
CONTROL_ACTIVATIONS = 0.5  # a ControlNet (the UNet's encoder half) adds about half a UNet's activations per call


@dataclass(frozen=True)
class Job:
    """What a job's memory depends on."""

    frames: int
    height: int              # pixels
    width: int
    method: str = "stem"
    num_steps: int = 50
    editor: str | None = None   # None (inversion only), "tokenflow" or "fatezero"
    edit_batch_size: int = 8
    em_kernel: str = "torch"    # STEM's EM: "torch" (streamed blocks) or "fused" (Triton, per-block partial sums)
    control: bool = False       # structure guidance: a ControlNet runs before every UNet call

    @property
    def tokens(self) -> int:
        """Latent tokens per frame."""
        return (self.height // 8) * (self.width // 8)

    def key(self) -> tuple:
        return (self.frames, self.height, self.width, self.method, self.num_steps, self.em_kernel, self.control)

    @classmethod
    def of(cls, video, settings, edit=None, em_kernel: str = "torch") -> "Job":
        """The job of inverting `video` (a stem.video.Video) with `settings`, and editing it with `edit` if given."""
        return cls(frames=video.num_frames, height=video.height, width=video.width, method=settings.method,
                   num_steps=settings.num_steps, editor=None if edit is None else getattr(edit, "editor", "tokenflow"),
                   edit_batch_size=getattr(edit, "batch_size", 8), em_kernel=em_kernel,
                   control=getattr(settings, "control", "none") != "none")


@dataclass(frozen=True)
class ModelFacts:
    """The numbers of a loaded model that the estimate needs."""

    unet_bytes: int
    vae_bytes: int
    text_bytes: int
    element_bytes: int        # of the model's dtype
    width: float = 1.0        # UNet first block width / 320
    heads: int = 8            # heads of the first self-attention level
    self_attention_elements: float = 2820.0  # S: Σ tokens · channels over self-attention layers, per latent token
    largest_unet_module_bytes: int = 0       # what a streamed (sequentially offloaded) UNet keeps on the GPU
    vae_tile_pixels: int = 512 * 512  # pixels of one VAE tile when tiling
    control_bytes: int = 0  # a ControlNet's weights (a copy of the UNet's encoder half), if one is used

    @classmethod
    def of(cls, parts) -> "ModelFacts":
        """The facts of `StableDiffusionParts` (weights counted exactly)."""
        unet = parts.unet
        channels = unet.config.block_out_channels
        levels = len(channels)
        attn_dim = unet.config.attention_head_dim
        heads = attn_dim[0] if isinstance(attn_dim, (list, tuple)) else attn_dim
        sample = getattr(parts.vae.config, "sample_size", 512)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return cls(
            unet_bytes=module_bytes(unet),
            vae_bytes=module_bytes(parts.vae),
            text_bytes=module_bytes(parts.text_encoder),
            element_bytes=torch.finfo(parts.dtype).bits // 8,
            width=channels[0] / 320,
            heads=heads,
            self_attention_elements=self_attention_elements(unet, channels, levels),
            largest_unet_module_bytes=max(module_bytes(m, recurse=False) for m in unet.modules()),
            vae_tile_pixels=sample * sample,
            control_bytes=sum(
                module_bytes(m) for m in (unet.conv_in, unet.time_embedding, *unet.down_blocks, unet.mid_block)
            ),
        )


def module_bytes(module, recurse: bool = True) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
    return sum(t.numel() * t.element_size() for t in tensors)


def self_attention_elements(unet, channels, levels) -> float:
    """S: Σ over the UNet's self-attention layers of tokens · channels, per latent token of a frame."""
    from .attention import self_attention_layers

    total = 0.0
    for name in self_attention_layers(unet):
        block, index = name.split(".")[0], name.split(".")[1]
        level = (
            levels - 1 if block == "mid_block" else int(index) if block == "down_blocks" else levels - 1 - int(index)
        )
        total += channels[level] / 4**level
    return total


@dataclass(frozen=True)
class MemoryPlan:
    """What a job will use: the UNet chunk, the VAE batch and tiling, whether the UNet streams."""

    chunk_size: int | None     # frames per UNet call; None: all at once
    vae_batch_size: int
    vae_tiling: bool
    stream_unet: bool          # the UNet's weights are offloaded module by module (slow; only when needed)
    estimate_bytes: int | None  # the peak of the job's phases, margin and reserve included (None: not planned)
    available_bytes: int | None
    phases: dict = field(default_factory=dict, compare=False)  # phase -> estimated bytes
    job_key: tuple = ()

    @property
    def planned(self) -> bool:
        """Whether the plan was fitted to a memory budget (else it holds what was asked for, unchecked)."""
        return self.estimate_bytes is not None

    def describe(self) -> str:
        if not self.planned:
            chunk = "all frames" if self.chunk_size is None else f"{self.chunk_size} frames"
            return f"not planned (no GPU budget): UNet on {chunk} per call, VAE on {self.vae_batch_size} frame(s)"
        chunk = "all frames" if self.chunk_size is None else f"{self.chunk_size} frames"
        extra = (", tiled VAE" if self.vae_tiling else "") + (
            ", UNet streamed from the CPU" if self.stream_unet else ""
        )
        return (f"about {self.estimate_bytes / GiB:.1f} GiB of {self.available_bytes / GiB:.1f} GiB: UNet on {chunk} "
                f"per call, VAE on {self.vae_batch_size} frame(s){extra}")


# -- the estimate ---------------------------------------------------------------------------------

def _unet_call(samples: int, held: int, job: Job, facts: ModelFacts) -> float:
    return (samples * UNET_CALL + held * UNET_HELD) * facts.width * job.tokens * facts.element_bytes


def inversion_activations(job: Job, facts: ModelFacts, chunk: int | None) -> float:
    """Bytes of the UNet phase of an inversion + reconstruction (activations only)."""
    n, L, b, C = job.frames, job.tokens, facts.element_bytes, 320 * facts.width
    s = n if chunk is None else min(chunk, n)
    chunked = s < n and job.method in WHOLE_VIDEO
    total = _unet_call(s, n - s if chunked else 0, job, facts)
    if job.method == "stem":
        total += stem_em_bytes(job, facts)
    if chunked:
        total += 2 * n * C * L * b
    if job.method == "inflated":
        total += 2 * s * C * L * b
    return total + trajectory_bytes(job)


def trajectory_bytes(job: Job) -> float:
    """The inversion's trajectory, every level of every frame in float32, kept on the device until the end."""
    return 2 * (job.num_steps + 1) * job.frames * 4 * job.tokens * 4


def stem_em_bytes(job: Job, facts: ModelFacts, groups: int = 1) -> float:
    """Bytes one EM of the first level holds beside the UNet's activations: the responsibility block and
    softmax's output, the float32 copy of one chunk of keys and of values, the M-step's partial sums,
    the keys and values regrouped per head (a copy in the model's dtype), and the per-head statistics.

    Checked on an H200 against the live tensors at the peak of SD-1.5 calls (`torch.cuda.memory`
    snapshots, 8 frames of 256 px, unchunked and in lock-step chunks of 1 and 2 frames).
    """
    n, L, b, C = job.frames, job.tokens, facts.element_bytes, 320 * facts.width
    regrouped = 2 * n * L * C * b + n * L * (C / facts.heads) * 4
    if job.em_kernel == "fused":  # no responsibilities; one partial of the key sums, mass and value sums per program
        from .em_fused import partial_bytes

        problems, head_channels = groups * facts.heads, C / facts.heads
        return groups * regrouped + partial_bytes(problems, n * L, 256, head_channels, head_channels)  # K = 256
    chunk_tokens = em._token_chunk(facts.heads, n * L, 256, em.DEFAULT_CHUNK_ELEMENTS, torch.device("cuda"))  # K = 256
    return groups * (EM_BLOCK_BYTES + SPLIT_SUMS_BYTES + 2 * chunk_tokens * C * 4 + regrouped)


def tokenflow_activations(job: Job, facts: ModelFacts, chunk: int | None) -> float:
    """Bytes of a TokenFlow edit's denoising (activations only): three groups, keyframes, then propagation."""
    n, L, b, C = job.frames, job.tokens, facts.element_bytes, 320 * facts.width
    keyframes = math.ceil(n / job.edit_batch_size)
    s = keyframes if chunk is None else min(chunk, keyframes)
    chunked = s < keyframes
    keyframe_pass = _unet_call(3 * s, 3 * (keyframes - s) if chunked else 0, job, facts) + 2 * 3 * s * C * L * b
    if chunked:
        keyframe_pass += 2 * 3 * keyframes * C * L * b
    frames = job.edit_batch_size if chunk is None else min(job.edit_batch_size, chunk)
    propagation = _unet_call(3 * frames, 0, job, facts) + SIMILARITY_BYTES
    stored = 4 * keyframes * facts.self_attention_elements * L * b
    return stored + max(keyframe_pass, propagation) + 3 * n * 4 * L * 4


def fatezero_activations(job: Job, facts: ModelFacts, chunk: int | None) -> float:
    """Bytes of a FateZero edit's denoising (activations only): the three groups of every frame in one
    lock-step UNet call, with the source's and the edit's STEM statistics and the blend maps of one step.

    Not calibrated separately: the UNet and EM terms are the inversion's, times three groups, plus the
    cross-attention maps the local blend keeps for a step (float32, 77 text tokens, two prompts).
    """
    n, L, b, C = job.frames, job.tokens, facts.element_bytes, 320 * facts.width
    s = n if chunk is None else min(chunk, n)
    chunked = s < n
    total = _unet_call(3 * s, 3 * (n - s) if chunked else 0, job, facts)
    total += stem_em_bytes(job, facts, groups=3)
    if chunked:
        total += 2 * 3 * n * C * L * b
    return total + 3 * n * 4 * L * 4 + 2 * n * L * 77 * 4


# Editors' activation terms; an editor adds its function here.
EDITORS = {"tokenflow": tokenflow_activations, "fatezero": fatezero_activations}


def vae_activations(job: Job, facts: ModelFacts, batch: int, tiling: bool) -> float:
    pixels = min(job.height * job.width, facts.vae_tile_pixels) if tiling else job.height * job.width
    return batch * pixels * VAE_ELEMENTS_PER_PIXEL * facts.element_bytes


def estimate(job: Job, facts: ModelFacts, chunk: int | None = None, vae_batch: int = 4, vae_tiling: bool = False,
             offload: bool = False, stream_unet: bool = False) -> dict[str, int]:
    """Estimated peak bytes of each phase of `job` (margin and reserve included), and of the job ("peak").

    Args:
        job: frames, size, method, steps and editor.
        facts: the model's weights and shape (`ModelFacts.of(parts)`).
        chunk: frames per UNet call (None: all at once).
        vae_batch: frames per VAE call; vae_tiling: whether the VAE runs on tiles.
        offload: only the component that runs is on the GPU (else all three always are).
        stream_unet: the UNet's weights are streamed module by module (needs offload).

    Returns:
        {"vae": bytes, "unet": bytes, "edit": bytes (with an editor), "peak": the largest}.
    """
    control = facts.control_bytes if job.control else 0  # with offload, the ControlNet is on the device beside the UNet
    guided = 1 + CONTROL_ACTIVATIONS if job.control else 1
    all_weights = facts.unet_bytes + facts.vae_bytes + facts.text_bytes + control
    unet_weights = (
        (facts.largest_unet_module_bytes if stream_unet else facts.unet_bytes) + control if offload else all_weights
    )
    vae_weights = facts.vae_bytes if offload else all_weights

    def total(weights, activations):
        return int(weights + MARGIN * activations + RESERVE)

    phases = {
        "vae": total(vae_weights, vae_activations(job, facts, vae_batch, vae_tiling)),
        "unet": total(unet_weights, guided * inversion_activations(job, facts, chunk)),
    }
    if job.editor is not None:
        if job.editor not in EDITORS:
            raise ValueError(f"no memory model for the editor {job.editor!r}; add one to stem.memory.EDITORS")
        phases["edit"] = total(unet_weights, guided * EDITORS[job.editor](job, facts, chunk))
    phases["peak"] = max(phases.values())
    return phases


# -- the plan -------------------------------------------------------------------------------------

def balanced_chunks(frames: int) -> list[int]:
    """Candidate chunk sizes, largest first: ⌈N / k⌉ for k = 1..N (equal-sized calls)."""
    return sorted({math.ceil(frames / k) for k in range(1, frames + 1)}, reverse=True)


def plan(job: Job, facts: ModelFacts, available: int, chunk: int | None = None, vae_batch: int = 4,
         offload: bool = False) -> MemoryPlan:
    """The largest UNet chunk and VAE batch that fit in `available` bytes, or a StemError saying what to change.

    Args:
        job, facts: as for `estimate`.
        available: bytes the job may use on the GPU (see `available_bytes`).
        chunk: the user's --chunk-size (kept, or refused when it does not fit); None: chosen here.
        vae_batch: the most frames per VAE call.
        offload: whether --offload is on (the UNet may then also stream its weights).

    Returns:
        The plan; `chunk_size` is None when all frames fit in one UNet call.
    """
    chunks = [chunk] if chunk is not None else balanced_chunks(job.frames)

    def unet_peak(c, stream):
        phases = estimate(job, facts, c, 1, False, offload, stream)
        return max(v for k, v in phases.items() if k in ("unet", "edit"))

    chosen = None
    for stream in ((False, True) if offload else (False,)):
        chosen = next(((c, stream) for c in chunks if unet_peak(c, stream) <= available), None)
        if chosen is not None:
            break
    if chosen is None:
        raise _refusal(job, facts, available, chunk, offload)
    unet_chunk, stream = chosen
    vae_options = [(v, False) for v in range(max(1, vae_batch), 0, -1)] + [(1, True)]
    vae = next(((v, t) for v, t in vae_options
                if estimate(job, facts, unet_chunk, v, t, offload, stream)["vae"] <= available), None)
    if vae is None:
        raise _refusal(job, facts, available, chunk, offload)
    phases = estimate(job, facts, unet_chunk, vae[0], vae[1], offload, stream)
    return MemoryPlan(chunk_size=None if unet_chunk >= job.frames else unet_chunk, vae_batch_size=vae[0],
                      vae_tiling=vae[1], stream_unet=stream, estimate_bytes=phases["peak"], available_bytes=available,
                      phases=phases, job_key=job.key())


def unplanned(job: Job, chunk: int | None = None, vae_batch: int = 4) -> MemoryPlan:
    """The plan of a job run without a memory budget (a CPU): the UNet chunk and VAE batch asked for, no estimate."""
    return MemoryPlan(chunk_size=None if chunk is None or chunk >= job.frames else chunk, vae_batch_size=vae_batch,
                      vae_tiling=False, stream_unet=False, estimate_bytes=None, available_bytes=None, job_key=job.key())


def _refusal(job: Job, facts: ModelFacts, available: int, chunk: int | None, offload: bool) -> SettingError:
    """One sentence: how much the job needs at its smallest, what is available, what to change."""
    what = f"{job.frames} frames at {job.width}x{job.height} ({job.method}{', ' + job.editor if job.editor else ''})"
    mentions = {"offload": "offloading", "num_frames": "frames", "size": "size"}
    if chunk is not None and chunk > 1:
        need = estimate(job, facts, chunk, 1, True, offload, offload)["peak"]
        return SettingError("chunk_size", f"This job ({what}) needs about {need / GiB:.1f} GiB of GPU memory with "
                            f"{{chunk_size}} {chunk} but {available / GiB:.1f} GiB are available; lower {{chunk_size}} "
                            "or leave it out to choose one that fits.", mentions={"chunk_size": "the chunk size"})
    smallest = estimate(job, facts, 1, 1, True, offload, offload)["peak"]
    with_offload = estimate(job, facts, 1, 1, True, True, True)["peak"]
    if not offload and with_offload <= available:
        change = "add {offload}, or use fewer {num_frames} or a smaller {size}"
    else:
        change = "use fewer {num_frames} or a smaller {size}" + ("" if offload else " ({offload} is not enough)")
    return SettingError("", f"This job ({what}) needs about {smallest / GiB:.1f} GiB of GPU memory even one frame at "
                        f"a time but {available / GiB:.1f} GiB are available; {change}.", mentions=mentions)


def available_bytes(device, modules=()) -> int:
    """Bytes a job may use on a CUDA device: free memory, torch's cached blocks, and `modules`' weights there."""
    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    ours = sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers())
               if t.device.type == "cuda")
    return int(free + cached + ours)
