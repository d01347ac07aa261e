"""The benchmark's attention modes: the engine's processors, and the naive STEM reference."""

from __future__ import annotations

import contextlib

import torch

from stem.attention import (
    PROCESSORS, AttentionState, StemAttnProcessor, _frames_major, _group_tokens, attention_mode,
    processors_installed, self_attention_layers,
)
from stem.em import EPS
from stem.lockstep import whole_video


class NaiveStemAttnProcessor(StemAttnProcessor):
    """STEM written straightforwardly: a Python loop over heads, full (L, K) responsibilities, explicit attention.

    The same maths as `StemAttnProcessor` (the same initial bases too); kept here only as the
    reference the fast path is checked and timed against, never used by the engine.
    """

    def bases(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, N, h, L, d) keys/values of the whole video -> (G, h, K, d) key and value bases."""
        state = self.state
        G, N, h, L, d = key.shape
        keys = _group_tokens(key).reshape(G * h, N * L, d).float()
        values = _group_tokens(value).reshape(G * h, N * L, value.shape[-1]).float()
        init = self.initial_bases(keys)
        key_bases, value_bases = [], []
        for head in range(G * h):
            k, v, mu = keys[head], values[head], init[head]  # (N*L, d), (N*L, d), (K, d)
            for _ in range(state.num_iters):
                unit = mu / (mu.norm(dim=-1, keepdim=True) + EPS)
                z = torch.softmax(k @ unit.T / state.tau, dim=-1)  # (N*L, K) ST-E
                z = z / (z.sum(dim=0, keepdim=True) + EPS)
                mu = z.T @ k  # (K, d) ST-M
            key_bases.append(mu)
            value_bases.append(z.T @ v)
        state.em_calls += 1
        return torch.stack(key_bases).view(G, h, -1, d), torch.stack(value_bases).view(G, h, -1, value.shape[-1])

    def attend(self, attn, query, key, value, attention_mask=None):
        groups = self.state.num_groups
        key_bases, value_bases = whole_video(self.bases, _frames_major(key, groups), _frames_major(value, groups))
        frames = query.shape[0] // groups
        out = torch.empty_like(query)
        for head in range(query.shape[1]):
            for g in range(groups):
                q = query[g * frames:(g + 1) * frames, head]  # (N, L, d)
                weights = torch.softmax(q @ key_bases[g, head].to(q.dtype).T * attn.scale, dim=-1)  # (N, L, K)
                out[g * frames:(g + 1) * frames, head] = weights @ value_bases[g, head].to(q.dtype)
        return out


def mode_state(mode: str, **kwargs) -> AttentionState:
    """The attention state of a benchmark mode: `stem-naive` is STEM's maths in the reference processor,
    `stem-fused` STEM with the fused Triton EM (`stem.em_fused`)."""
    method = mode.removesuffix("-naive").removesuffix("-fused")
    return AttentionState(method=method, em_kernel="fused" if mode.endswith("-fused") else "torch", **kwargs)


def install(unet, mode: str, state: AttentionState):
    """Context manager: every self-attention of `unet` gets the processor of a benchmark mode."""
    if mode != "stem-naive":
        return attention_mode(unet, state)
    layers = self_attention_layers(unet)
    return processors_installed(
        unet, lambda name, _: NaiveStemAttnProcessor(state, name, layers[name]) if name in layers else None
    )


def processor(mode: str, state: AttentionState):
    """The processor of a benchmark mode for a single attention layer."""
    return NaiveStemAttnProcessor(state) if mode == "stem-naive" else PROCESSORS[state.method](state)


@contextlib.contextmanager
def using_processor(attn, proc):
    """Set `proc` on a single attention layer for the block."""
    attn.set_processor(proc)
    yield
