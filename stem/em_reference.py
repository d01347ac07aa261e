"""STEM's EM written out plainly in float64: the readable reference `stem.em` is checked against.

The paper's steps on full (B, L, K) responsibilities, no streaming, no chunks; B: independent
problems (groups x heads), L: tokens (frames x pixels), C: channels per head, K: bases.

    ST-E   z = softmax over bases of (keys . mu / |mu|) / tau          (B, L, K)
           z = z / (sum over tokens of z + EPS)                         normalised over tokens
    ST-M   mu = z^T keys                                                (B, K, C)

After R iterations the value bases are z^T values with the last responsibilities. Never used by the
engine; the tests (and anyone reading `stem.em`) use it.
"""

from __future__ import annotations

import torch

from .em import EPS


def responsibilities(keys: torch.Tensor, bases: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """ST-E: (B, L, C) keys, (B, K, C) bases -> (B, L, K) softmax over bases of keys . unit bases / tau (float64)."""
    unit = bases.double() / (torch.linalg.vector_norm(bases.double(), dim=-1, keepdim=True) + EPS)
    return torch.softmax(keys.double() @ unit.transpose(-1, -2) / tau, dim=-1)


def reference_em(keys: torch.Tensor, init: torch.Tensor, num_iters: int, tau: float = 0.01,
                 values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """R iterations of ST-E / ST-M in float64.

    Args:
        keys: (B, L, C); init: (B, K, C) the initial bases; values: optional (B, L, Cv).

    Returns:
        key bases (B, K, C), value bases (B, K, Cv) or None, and the last responsibilities (B, L, K)
        normalised over tokens; all float64.
    """
    k, mu = keys.double(), init.double()
    z = None
    for _ in range(num_iters):
        z = responsibilities(k, mu, tau)                 # ST-E: softmax over bases
        z = z / (z.sum(dim=-2, keepdim=True) + EPS)       # normalised over tokens
        mu = z.transpose(-1, -2) @ k                      # ST-M
    value_bases = None if values is None else z.transpose(-1, -2) @ values.double()
    return mu, value_bases, z
