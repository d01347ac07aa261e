"""A fused Triton E+M pass of STEM's EM (`stem.em.estimate_bases`): the (B, L, K) responsibilities never
reach global memory.

One program takes BLOCK_L tokens of one problem b (B = groups x heads). It computes their logits against
all K unit bases (1/tau folded in), takes the softmax over K in registers, and writes partial sums for its
block: z^T keys (K, C), the mass sum_L z (K), and, in the last iteration, z^T values (K, Cv). torch then
reduces the blocks' partials in a fixed order (a sum over the block dimension). There are no atomics, so a
run repeats bit for bit. The maths is that of `stem.em`: same init, tau, 1e-4 epsilons, normalisation
after the sums.

Precision: keys and values are read in their own dtype (fp16/bf16/fp32) and converted to float32 in
registers. Every product, including the logit product that 1/tau = 100 amplifies, is a float32 dot with
float32 accumulation (`input_precision="ieee"`, CUDA cores). So the fused kernel matches the float32 torch
path to float32 rounding. `input_precision="tf32x3"` (three TF32 tensor-core products, about float32
accuracy) can be passed to try tensor cores on the GPU. It has not been measured yet (no GPU lent).

Triton is optional and imported lazily: `available()` reports whether this kernel can run on a device.
"""

from __future__ import annotations

import functools

import torch

from .em import EPS, init_bases

BLOCK_L = 32  # tokens per program


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def em_block(keys, values, ubases, key_part, mass_part, value_part,
                 L, C, Cv, K, nblocks,
                 sk_b, sk_l, sk_c, sv_b, sv_l, sv_c,
                 WITH_VALUES: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr):
        blk = tl.program_id(0)
        b = tl.program_id(1)
        rows = blk * BLOCK_L + tl.arange(0, BLOCK_L)
        ks = tl.arange(0, BLOCK_K)
        cs = tl.arange(0, BLOCK_C)
        row_ok = rows < L
        k = tl.load(keys + b * sk_b + rows[:, None] * sk_l + cs[None, :] * sk_c,
                    mask=row_ok[:, None] & (cs[None, :] < C), other=0.0).to(tl.float32)  # (BL, BC)
        u = tl.load(ubases + b * K * C + ks[:, None] * C + cs[None, :],
                    mask=(ks[:, None] < K) & (cs[None, :] < C), other=0.0)  # (BK, BC) unit bases / tau
        logits = tl.dot(k, tl.trans(u), input_precision=PRECISION)  # (BL, BK), float32 accumulation
        logits = tl.where(ks[None, :] < K, logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        z = p / tl.sum(p, axis=1)[:, None]
        z = tl.where(row_ok[:, None], z, 0.0)  # the ragged last block's padding carries no mass
        out = b * nblocks + blk
        tl.store(mass_part + out * K + ks, tl.sum(z, axis=0), mask=ks < K)
        ksum = tl.dot(tl.trans(z), k, input_precision=PRECISION)  # (BK, BC)
        tl.store(key_part + out * K * C + ks[:, None] * C + cs[None, :], ksum,
                 mask=(ks[:, None] < K) & (cs[None, :] < C))
        if WITH_VALUES:
            vs = tl.arange(0, BLOCK_CV)
            v = tl.load(values + b * sv_b + rows[:, None] * sv_l + vs[None, :] * sv_c,
                        mask=row_ok[:, None] & (vs[None, :] < Cv), other=0.0).to(tl.float32)
            vsum = tl.dot(tl.trans(z), v, input_precision=PRECISION)
            tl.store(value_part + out * K * Cv + ks[:, None] * Cv + vs[None, :], vsum,
                     mask=(ks[:, None] < K) & (vs[None, :] < Cv))

    return triton, em_block


def available(device: torch.device | str) -> bool:
    """Whether the fused kernel can run on `device`: CUDA with Triton importable (or Triton's interpreter)."""
    import os

    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())  # tl.dot wants every dim >= 16


def _e_step_m_step(keys, values, bases, tau, precision):
    triton, em_block = _kernel()
    B, L, C = keys.shape
    K = bases.shape[1]
    Cv = values.shape[-1] if values is not None else 1
    unit = (bases / (bases.norm(dim=-1, keepdim=True) + EPS) / tau).contiguous()  # (B, K, C) float32
    nblocks = triton.cdiv(L, BLOCK_L)
    key_part = bases.new_empty(B, nblocks, K, C)
    mass_part = bases.new_empty(B, nblocks, K)
    value_part = bases.new_empty(B, nblocks, K, Cv) if values is not None else key_part
    v = values if values is not None else keys
    em_block[(nblocks, B)](
        keys, v, unit, key_part, mass_part, value_part, L, C, Cv, K, nblocks,
        *keys.stride(), *v.stride(),
        WITH_VALUES=values is not None, PRECISION=precision,
        BLOCK_L=BLOCK_L, BLOCK_K=_pow2(K), BLOCK_C=_pow2(C), BLOCK_CV=_pow2(Cv),
    )
    inv_mass = 1.0 / (mass_part.sum(dim=1).unsqueeze(-1) + EPS)  # (B, K, 1); fixed-order reductions
    key_bases = key_part.sum(dim=1) * inv_mass
    return key_bases, None if values is None else value_part.sum(dim=1) * inv_mass


@torch.no_grad()
def estimate_bases_fused(keys, values, num_bases, num_iters, tau=0.01, init=None, generator=None,
                         precision: str = "ieee"):
    """`stem.em.estimate_bases` with a fused Triton E+M pass; returns float32 (B, K, C), (B, K, Cv)."""
    if num_bases < 1 or num_iters < 1:
        raise ValueError(f"num_bases and num_iters must be >= 1, got {num_bases} and {num_iters}")
    bases = init_bases(keys, num_bases, generator) if init is None else init.float()
    value_bases = None
    for i in range(num_iters):
        last = i == num_iters - 1
        bases, value_bases = _e_step_m_step(keys, values if last else None, bases, tau, precision)
    return bases, value_bases
