"""Spatial-temporal expectation-maximisation (STEM): K bases that summarise the keys of a whole video.

The paper's ST-E / ST-M steps, written as one pure function. Shapes use
    B: independent problems (groups x heads), L: tokens (frames x pixels), C: channels per head,
    K: number of bases.
Everything inside runs in float32 whatever the input dtype, and tokens are streamed in chunks so
the (B, L, K) responsibilities are never materialised at once for a long video.
"""

from __future__ import annotations

import torch

EPS = 1e-4  # the authors' guard in both normalisations

# Responsibilities are streamed in chunks of at most this many (B x tokens x K) float32 elements.
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 64 MiB
# On the CPU a block that stays in cache from the E- to the M-step is ~1.2x faster than a 64 MiB one
# (1-8 MiB all measured alike on the EPYC of assets/bench-cpu.md); on GPUs big blocks mean fewer launches.
CPU_CHUNK_ELEMENTS = 1 << 20  # 4 MiB
SOFTMAX_FLOOR = 80.0  # see _softmax_
# The GPU layout of the M-step (`gpu_layout`). Its sums reduce over thousands of tokens into a small
# (C, K) output per problem; as one GEMM per problem that is a few dozen thread blocks on a GPU,
# each looping over every token (half of a STEM UNet call on the H200 of assets/bench-gpu.md). The
# tokens are cut into up to MAX_REDUCTION_SPLITS slices, one GEMM each in a batch, and the slices'
# sums added: the same sums in another order. The responsibilities' mass over tokens is a GEMM with
# a ones vector there: CUDA's column sum staged a buffer twice the size of the block.
MAX_REDUCTION_SPLITS = 16
SPLIT_SUMS_ELEMENTS = 1 << 22  # bound on the float32 elements of the slices' partial sums (16 MiB)


def channel_stats(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, C) keys -> float32 std and mean over the L tokens, (B, 1, C) each.

    Half-precision keys are converted one problem (head) at a time, so the statistics are float32
    without a float32 copy of all keys. A single token (one frame at the lowest resolution) has no
    spread: std 0, not the nan of correction=1.
    """
    correction = int(keys.shape[1] > 1)
    if keys.dtype in (torch.float32, torch.float64):
        std, mean = torch.std_mean(keys, dim=1, keepdim=True, correction=correction)
        return std.float(), mean.float()
    stats = [torch.std_mean(k.float(), dim=1, keepdim=True, correction=correction) for k in keys.split(1)]
    return torch.cat([std for std, _ in stats]), torch.cat([mean for _, mean in stats])


def init_bases(keys: torch.Tensor, num_bases: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw (B, K, C) bases from a normal with each channel's float32 mean/std over the L tokens."""
    std, mean = channel_stats(keys)  # (B, 1, C)
    B, _, C = keys.shape
    device = generator.device if generator is not None else keys.device
    noise = torch.randn(B, num_bases, C, generator=generator, device=device, dtype=torch.float32)
    return mean + std * noise.to(keys.device)


def _token_chunk(batch: int, num_tokens: int, num_bases: int, chunk_elements: int, device: torch.device) -> int:
    """Tokens per chunk so that one (B, chunk, K) block holds at most `chunk_elements` values."""
    if device.type == "cpu":
        chunk_elements = min(chunk_elements, CPU_CHUNK_ELEMENTS)
    return max(1, min(num_tokens, chunk_elements // max(1, batch * num_bases)))


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of a contiguous tensor; on the CPU in place, logits floored at max - 80.

    With tau = 0.01 most logits lie hundreds below their row's maximum, where the CPU's vectorised
    exp takes a slow underflow path (the softmax runs 2x slower). The floor moves no responsibility
    by more than e^-80 (~2e-35).
    """
    if logits.device.type != "cpu":
        return torch.softmax(logits, dim=-1)
    floor = logits.amax(dim=-1, keepdim=True).sub_(SOFTMAX_FLOOR)
    torch.maximum(logits, floor, out=logits)
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


def _reduction_splits(batch: int, channels: int, num_bases: int) -> int:
    """Token slices of the GPU layout's sums: up to 16, the slices' partial sums within SPLIT_SUMS_ELEMENTS."""
    return max(1, min(MAX_REDUCTION_SPLITS, SPLIT_SUMS_ELEMENTS // max(1, batch * channels * num_bases)))


def _add_sums_(sums_t: torch.Tensor, x: torch.Tensor, z: torch.Tensor, splits: int) -> None:
    """sums_t (B, Cx, K) += x^T z, summed over the tokens of x (B, c, Cx) and z (B, c, K), in `splits` slices."""
    B, c, Cx = x.shape
    while c % splits:
        splits -= 1
    if splits == 1:
        sums_t.baddbmm_(x.transpose(1, 2), z)
        return
    part = c // splits
    partial = torch.bmm(x.reshape(B * splits, part, Cx).transpose(1, 2), z.reshape(B * splits, part, -1))
    sums_t += partial.view(B, splits, Cx, -1).sum(dim=1)


def _e_step_m_step(keys, values, bases, tau, chunk, block, splits=1, ones=None):
    """One ST-E + ST-M pass, streamed over token chunks through `block`, room for one (B, chunk, K) block.

    Returns (new key bases (B, K, C), new value bases (B, K, Cv) or None). The normalisation of the
    responsibilities by their sum over tokens is applied after the sums, which is the same maths:
    (z / (sum_L z + eps))^T x == (z^T x) / (sum_L z + eps). Keys and values may be strided views in
    any float dtype; each chunk is read once per pass and accumulated in float32. With `ones`, a
    (B, chunk, 1) float32 ones tensor, the mass is summed by a GEMM (the GPU layout).
    """
    B, L, C = keys.shape
    K = bases.shape[1]
    # ST-E uses l2-normalised bases, with 1/tau folded in: keys . (mu / (|mu| + eps) / tau)^T
    unit_bases_t = (bases / (bases.norm(dim=-1, keepdim=True) + EPS)).transpose(1, 2) / tau  # (B, C, K)
    # The sums are accumulated transposed, (B, C, K) = keys^T z: the faster GEMM layout on the CPU.
    key_sums_t = bases.new_zeros(B, C, K)
    value_sums_t = None if values is None else bases.new_zeros(B, values.shape[-1], K)
    mass = bases.new_zeros(B, 1, K)
    for start in range(0, L, chunk):
        k = keys[:, start:start + chunk].float()  # (B, c, C); a view for float32 keys
        z = block[:B * k.shape[1] * K].view(B, -1, K)  # contiguous, also for the last, shorter chunk
        z = _softmax_(torch.bmm(k, unit_bases_t, out=z))  # (B, c, K) responsibilities
        if ones is None:
            mass += z.sum(dim=1, keepdim=True)
        else:
            _add_sums_(mass, ones[:, :z.shape[1]], z, splits)
        _add_sums_(key_sums_t, k, z, splits)
        if value_sums_t is not None:
            _add_sums_(value_sums_t, values[:, start:start + chunk].float(), z, splits)
    inv_mass = 1.0 / (mass + EPS)  # ST-M: responsibilities normalised over tokens
    key_bases = (key_sums_t * inv_mass).transpose(1, 2).contiguous()  # (B, K, C)
    return key_bases, None if value_sums_t is None else (value_sums_t * inv_mass).transpose(1, 2).contiguous()


@torch.no_grad()
def estimate_bases(
    keys: torch.Tensor,
    values: torch.Tensor,
    num_bases: int,
    num_iters: int,
    tau: float = 0.01,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    gpu_layout: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate K key bases and K value bases of a token set by EM (STEM, Li et al. 2024).

    init:  mu ~ N(mean_L(keys), std_L(keys))                                  (per channel)
    ST-E:  z = softmax_K(keys . (mu / (|mu| + 1e-4))^T / tau)                  (B, L, K)
           z = z / (sum_L z + 1e-4)
    ST-M:  mu = z^T keys                                                       (B, K, C)
    After `num_iters` iterations the value bases are z^T values with the last responsibilities.

    Args:
        keys: (B, L, C) keys of all tokens of the video (B = groups x heads); any float dtype,
            strided views welcome (no copy is made).
        values: (B, L, Cv) the matching values.
        num_bases: K, the number of bases.
        num_iters: R, the number of EM iterations (>= 1).
        tau: softmax temperature of the E-step.
        init: optional (B, K, C) initial bases; drawn from the keys' statistics when None.
        generator: random generator for the initial bases (determinism).
        chunk_elements: bound on the float32 elements of one (B, tokens, K) responsibility block
            (the CPU uses at most CPU_CHUNK_ELEMENTS, a cache-sized block).
        gpu_layout: the M-step's sums in token slices and the mass as a GEMM, the fast layout on
            GPUs (the same sums in another order); None: on any device but the CPU.

    Returns:
        key_bases (B, K, C) and value_bases (B, K, Cv), float32.
    """
    if num_bases < 1 or num_iters < 1:
        raise ValueError(f"num_bases and num_iters must be >= 1, got {num_bases} and {num_iters}")
    bases = init_bases(keys, num_bases, generator) if init is None else init.float()
    B, L, _ = keys.shape
    chunk = _token_chunk(B, L, num_bases, chunk_elements, keys.device)
    block = bases.new_empty(B * chunk * num_bases)  # the only (B, tokens, K) memory the EM holds
    if gpu_layout is None:
        gpu_layout = keys.device.type != "cpu"
    splits, ones = 1, None
    if gpu_layout:
        splits = _reduction_splits(B, max(keys.shape[-1], values.shape[-1]), num_bases)
        ones = bases.new_ones(B, chunk, 1)
    for i in range(num_iters):
        last = i == num_iters - 1
        bases, value_bases = _e_step_m_step(keys, values if last else None, bases, tau, chunk, block, splits, ones)
    return bases, value_bases
