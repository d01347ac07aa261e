"""A fused Triton E+M pass of STEM's EM (`stem.em.estimate_bases`): the (B, L, K) responsibilities never
reach global memory.

The grid is (P, B): P programs per problem b (B = groups x heads), P = clamp(ceil(PROGRAMS / B), 1,
nblocks) for the nblocks = ceil(L / BLOCK_L) token blocks of a problem. Program p walks the blocks
p, p + P, p + 2P, ... in that order. For each block it computes the logits of its BLOCK_L tokens against
all K unit bases (1/tau folded in), takes the softmax over K in registers and adds, in float32 registers,
z^T keys (K, C), the mass sum_L z (K) and, in the last iteration, z^T values (K, Cv). It writes one
partial per program, so the partials are B x P x K x (C + 1 + Cv) floats (`partial_bytes`): about 22 MB
per partial tensor for 8 heads, K = 256, C = 40 (P = 66), whatever the number of tokens, where one
partial per block was ~2 GB at 48 frames of 4096 tokens. torch then adds the P partials in a fixed order
(a sum over that dimension). There are no atomics and every program's order is fixed, so a run repeats
bit for bit. The maths is that of `stem.em`: same init, tau, 1e-4 epsilons, normalisation after the sums.

PROGRAMS = 4 x 132: four waves over the 132 SMs of an H100/H200 at one resident program per SM (each
holds most of an SM's registers, below), so uneven programs (a problem's last, ragged blocks) cost a
fraction of a wave, and few enough that the partials stay a few MB. Smaller GPUs just run more waves.

Registers. At K = 256 and C padded to 64 (SD's 40 channels per head) a program holds the unit bases
(BLOCK_K x BLOCK_C, loaded once), the key sums (the same size) and, in the last iteration, the value
sums: 3 x 16K float32 = 192 KB of an SM's 256 KB register file (2 x 16K in the other iterations), plus
the (BLOCK_L, BLOCK_K) = 8K-float logit tile and its softmax. NUM_WARPS = 8 (256 threads, up to 255
registers each, which is the whole register file) gives each thread ~190 registers of state: one
program per SM, little room to spare. 4 warps would need ~380 a thread and spill for certain; 16 warps
cap a thread at 128 registers (65,536 / 512), ~96 of them state, leaving too few for the logit tile,
its softmax and the addresses. The first GPU check (scripts/gpu_check.sh, `full-stem-fused`) tells
whether 8 spills; NUM_WARPS and BLOCK_L (the logit tile's height) are the constants to tune then.

Precision: keys and values are read in their own dtype (fp16/bf16/fp32) and converted to float32 in
registers. Every product, including the logit product that 1/tau = 100 amplifies, is a float32 dot with
float32 accumulation (`input_precision="ieee"`, CUDA cores). So the fused kernel matches the float32 torch
path to float32 rounding. `input_precision="tf32x3"` (three TF32 tensor-core products, about float32
accuracy) can be passed to try tensor cores on the GPU. It has not been measured yet (no GPU lent).

Triton is optional and imported lazily: `available()` reports whether this kernel can run on a device.
"""

from __future__ import annotations

import functools
import math

import torch

from .em import EPS, init_bases

BLOCK_L = 32  # tokens per block: the height of the (BLOCK_L, BLOCK_K) logit tile
PROGRAMS = 4 * 132  # target programs over all problems: four per SM of an H100/H200
NUM_WARPS = 8  # see the module docstring: the accumulators fill most of an SM's registers


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def em_programs(keys, values, ubases, key_part, mass_part, value_part,
                    L, C, Cv, K, nblocks, P,
                    sk_b, sk_l, sk_c, sv_b, sv_l, sv_c,
                    WITH_VALUES: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr):
        p = tl.program_id(0)
        b = tl.program_id(1)
        ks = tl.arange(0, BLOCK_K)
        cs = tl.arange(0, BLOCK_C)
        vs = tl.arange(0, BLOCK_CV)
        lanes = tl.arange(0, BLOCK_L)
        kc_ok = (ks[:, None] < K) & (cs[None, :] < C)
        u = tl.load(
            ubases + b * K * C + ks[:, None] * C + cs[None, :], mask=kc_ok, other=0.0
        )  # (BK, BC) unit bases / tau
        key_sums = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        value_sums = tl.zeros((BLOCK_K, BLOCK_CV), dtype=tl.float32)
        mass = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for blk in range(p, nblocks, P):  # this program's blocks, in a fixed order
            rows = blk * BLOCK_L + lanes
            row_ok = rows < L
            k = tl.load(keys + b * sk_b + rows[:, None] * sk_l + cs[None, :] * sk_c,
                        mask=row_ok[:, None] & (cs[None, :] < C), other=0.0).to(tl.float32)  # (BL, BC)
            logits = tl.dot(k, tl.trans(u), input_precision=PRECISION)  # (BL, BK), float32 accumulation
            logits = tl.where(ks[None, :] < K, logits, float("-inf"))
            e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            z = e / tl.sum(e, axis=1)[:, None]
            z = tl.where(row_ok[:, None], z, 0.0)  # the ragged last block's padding carries no mass
            mass += tl.sum(z, axis=0)
            key_sums = tl.dot(tl.trans(z), k, key_sums, input_precision=PRECISION)  # (BK, BC)
            if WITH_VALUES:
                v = tl.load(values + b * sv_b + rows[:, None] * sv_l + vs[None, :] * sv_c,
                            mask=row_ok[:, None] & (vs[None, :] < Cv), other=0.0).to(tl.float32)
                value_sums = tl.dot(tl.trans(z), v, value_sums, input_precision=PRECISION)  # (BK, BCV)
        out = b * P + p
        tl.store(mass_part + out * K + ks, mass, mask=ks < K)
        tl.store(key_part + out * K * C + ks[:, None] * C + cs[None, :], key_sums, mask=kc_ok)
        if WITH_VALUES:
            tl.store(value_part + out * K * Cv + ks[:, None] * Cv + vs[None, :], value_sums,
                     mask=(ks[:, None] < K) & (vs[None, :] < Cv))

    return em_programs


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


def programs_per_problem(num_problems: int, num_tokens: int, programs: int = PROGRAMS) -> int:
    """P, the programs of one problem: `programs` over all B problems, at least one, at most one per block."""
    nblocks = math.ceil(num_tokens / BLOCK_L)
    return max(1, min(nblocks, math.ceil(programs / max(1, num_problems))))


def partial_bytes(num_problems: int, num_tokens: int, num_bases: int, channels: float, value_channels: float,
                  programs: int = PROGRAMS) -> float:
    """Bytes of the float32 partial sums of one pass with values: B x P x K x (C + 1 + Cv)."""
    P = programs_per_problem(num_problems, num_tokens, programs)
    return 4 * num_problems * P * num_bases * (channels + 1 + value_channels)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())  # tl.dot wants every dim >= 16


def _launch(keys, values, unit, programs, precision):
    """One pass's kernel on (B, L, C) keys, (B, L, Cv) values or None and (B, K, C) unit bases / tau.

    Returns the float32 partials: key sums (B, P, K, C), mass (B, P, K), value sums (B, P, K, Cv) or
    None, and what the launch returned (the compiled kernel on CUDA).
    """
    em_programs = _kernel()
    B, L, C = keys.shape
    K = unit.shape[1]
    Cv = values.shape[-1] if values is not None else 1
    P = programs_per_problem(B, L, programs)
    key_part = unit.new_empty(B, P, K, C)
    mass_part = unit.new_empty(B, P, K)
    value_part = unit.new_empty(B, P, K, Cv) if values is not None else key_part
    v = values if values is not None else keys
    launched = em_programs[(P, B)](
        keys, v, unit, key_part, mass_part, value_part, L, C, Cv, K, math.ceil(L / BLOCK_L), P,
        *keys.stride(), *v.stride(),
        WITH_VALUES=values is not None, PRECISION=precision,
        BLOCK_L=BLOCK_L, BLOCK_K=_pow2(K), BLOCK_C=_pow2(C), BLOCK_CV=_pow2(Cv), num_warps=NUM_WARPS,
    )
    return key_part, mass_part, value_part if values is not None else None, launched


def _e_step_m_step(keys, values, bases, tau, precision, programs):
    unit = (bases / (bases.norm(dim=-1, keepdim=True) + EPS) / tau).contiguous()  # (B, K, C) float32
    key_part, mass_part, value_part, _ = _launch(keys, values, unit, programs, precision)
    inv_mass = 1.0 / (mass_part.sum(dim=1).unsqueeze(-1) + EPS)  # (B, K, 1); fixed-order reductions over P
    key_bases = key_part.sum(dim=1) * inv_mass
    return key_bases, None if value_part is None else value_part.sum(dim=1) * inv_mass


def compiled_registers(device, num_bases: int = 256, channels: int = 40, value_channels: int = 40,
                       dtype: torch.dtype = torch.float16) -> dict | None:
    """Registers and spilled registers (32-bit words in local memory) per thread of the kernel compiled for
    these sizes with values (the last pass, the largest state; see the module docstring), as
    {"registers", "spilled_registers"}; None where nothing is compiled (not CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not available(device):
        return None
    keys = torch.zeros(1, BLOCK_L, channels, device=device, dtype=dtype)
    values = torch.zeros(1, BLOCK_L, value_channels, device=device, dtype=dtype)
    unit = torch.ones(1, num_bases, channels, device=device)
    launched = _launch(keys, values, unit, 1, "ieee")[-1]
    return {"registers": int(launched.n_regs), "spilled_registers": int(launched.n_spills)}


@torch.no_grad()
def estimate_bases_fused(keys, values, num_bases, num_iters, tau=0.01, init=None, generator=None,
                         precision: str = "ieee", programs: int = PROGRAMS):
    """`stem.em.estimate_bases` with a fused Triton E+M pass; returns float32 (B, K, C), (B, K, Cv).

    `programs` is the target number of programs over all B problems (`programs_per_problem`); the
    result depends on it only through float32 rounding (the order of the sums).
    """
    if num_bases < 1 or num_iters < 1:
        raise ValueError(f"num_bases and num_iters must be >= 1, got {num_bases} and {num_iters}")
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    bases = init_bases(keys, num_bases, generator) if init is None else init.float()
    value_bases = None
    for i in range(num_iters):
        last = i == num_iters - 1
        bases, value_bases = _e_step_m_step(keys, values if last else None, bases, tau, precision, programs)
    return bases, value_bases
