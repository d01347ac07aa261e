"""Self-attention processors for video inversion, installed on every `attn1` of a diffusers UNet.

Three modes, one per `method`:
    ddim      each frame attends to its own tokens (diffusers' default processor, per frame);
    inflated  each frame attends to the tokens of all frames, O(N^2 (HW)^2);
    stem      each frame attends to K key/value bases estimated by EM from all frames, O(N HW K).

The UNet batch is laid out as `num_groups` groups of frames, group-major: (G * N, tokens, C),
e.g. G = 1 for inversion, G = 2 for classifier-free guidance. Whole-video context never crosses
groups. Processors own no weights; they read `attn.to_q/to_k/to_v/to_out` like diffusers'
`AttnProcessor2_0`, and they find all frames through `lockstep.whole_video` even when the UNet runs
on frame chunks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .em import DEFAULT_CHUNK_ELEMENTS, estimate_bases, init_bases
from .lockstep import whole_video

METHODS = ("stem", "ddim", "inflated")


@dataclass
class AttentionState:
    """Per-run state shared by every processor of one UNet: the STEM settings and the batch layout."""

    method: str = "stem"
    num_bases: int = 256
    num_iters: int = 5
    tau: float = 0.01
    seed: int = 0              # with `step` and the layer, seeds each EM's initial bases
    step: int = 0              # the diffusion level being computed (set by the caller before each UNet call)
    num_groups: int = 1
    em_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    em_kernel: str = "torch"   # "torch": stem.em's streamed EM; "fused": stem.em_fused's Triton E+M kernel
    em_calls: int = field(default=0, init=False)  # how many EMs ran (one per layer per step)


class FrameAttnProcessor:
    """Per-frame self-attention; the shared skeleton of every mode (mirrors `AttnProcessor2_0`)."""

    def __init__(self, state: AttentionState | None = None, name: str = "", layer_index: int = 0):
        self.state = state
        self.name = name
        self.layer_index = layer_index

    def attend(self, attn, query, key, value, attention_mask=None):
        """(B, heads, L, d) queries, keys, values -> (B, heads, L, d) outputs."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return self.attention_call(self.attend, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    @staticmethod
    def attention_call(attend, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        """`AttnProcessor2_0`'s skeleton (norms, projections, heads, output, residual) around
        `attend(attn, q, k, v, mask)`."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, L, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = attend(attn, query, key, value, attention_mask)  # (B, h, L, d)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _frames_major(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(G*N, h, L, d) -> (G, N, h, L, d)."""
    return x.view(groups, -1, *x.shape[1:])


def _group_tokens(x: torch.Tensor) -> torch.Tensor:
    """(G, N, h, L, d) -> (G, h, N*L, d): every token of a group's video in one sequence."""
    G, N, h, L, d = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(G, h, N * L, d)


class InflatedAttnProcessor(FrameAttnProcessor):
    """Each frame's queries attend to the keys and values of every frame of its group."""

    def attend(self, attn, query, key, value, attention_mask=None):
        groups = self.state.num_groups
        key_all, value_all = whole_video(
            lambda k, v: (_group_tokens(k), _group_tokens(v)),
            _frames_major(key, groups), _frames_major(value, groups),
        )  # (G, h, N_all*L, d)
        q = _group_tokens(_frames_major(query, groups))  # (G, h, N*L, d)
        out = F.scaled_dot_product_attention(q, key_all, value_all, scale=attn.scale)
        G, h, NL, d = out.shape
        L = query.shape[2]
        return out.view(G, h, NL // L, L, d).permute(0, 2, 1, 3, 4).reshape(query.shape)


class StemAttnProcessor(FrameAttnProcessor):
    """Each frame's queries attend to K key/value bases estimated by EM from all frames of the video."""

    def bases(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, N, h, L, d) keys/values of the whole video -> (G, h, K, d) key and value bases."""
        state = self.state
        G, N, h, L, d = key.shape
        # (G*h, N*L, d): a view, no copy, when G = 1 and the keys come straight from `to_k`.
        keys = _group_tokens(key).reshape(G * h, N * L, d)
        values = _group_tokens(value).reshape(G * h, N * L, value.shape[-1])
        if state.em_kernel == "fused":
            from .em_fused import estimate_bases_fused

            key_bases, value_bases = estimate_bases_fused(
                keys, values, state.num_bases, state.num_iters, tau=state.tau, init=self.initial_bases(keys))
        else:
            key_bases, value_bases = estimate_bases(
                keys, values, state.num_bases, state.num_iters, tau=state.tau, init=self.initial_bases(keys),
                chunk_elements=state.em_chunk_elements,
            )
        state.em_calls += 1
        return key_bases.view(G, h, -1, d), value_bases.view(G, h, -1, value.shape[-1])

    def initial_bases(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, L, d) keys -> (B, K, d) initial bases, drawn from a generator seeded by (seed, step, layer).

        Inversion and reconstruction of the same level start EM from the same draw, and the draw is
        the same on every device.
        """
        state = self.state
        generator = torch.Generator().manual_seed(hash((state.seed, state.step, self.layer_index)) & (2**63 - 1))
        return init_bases(keys, state.num_bases, generator)

    def attend(self, attn, query, key, value, attention_mask=None):
        groups = self.state.num_groups
        key_bases, value_bases = whole_video(self.bases, _frames_major(key, groups), _frames_major(value, groups))
        # Every frame of a group shares its group's bases: (G, h, K, d) -> (G*N, h, K, d).
        frames = query.shape[0] // groups
        key_bases = key_bases.to(query.dtype).repeat_interleave(frames, dim=0)
        value_bases = value_bases.to(query.dtype).repeat_interleave(frames, dim=0)
        return F.scaled_dot_product_attention(query, key_bases, value_bases, scale=attn.scale)


PROCESSORS: dict[str, type[FrameAttnProcessor]] = {
    "ddim": FrameAttnProcessor,
    "inflated": InflatedAttnProcessor,
    "stem": StemAttnProcessor,
}


def is_self_attention(name: str) -> bool:
    """True for the processor names of self-attention layers (`...attn1.processor`)."""
    return name.endswith("attn1.processor")


def self_attention_layers(unet) -> dict[str, int]:
    """The self-attention processor names of `unet`, each with its index in the UNet's order."""
    return {name: i for i, name in enumerate(n for n in unet.attn_processors if is_self_attention(n))}


@contextlib.contextmanager
def processors_installed(unet, make: Callable[[str, object], object | None]) -> Iterator[dict]:
    """Install `make(name, previous)` on every processor it returns non-None for; restore on exit.

    Yields the dict of installed processors by name.
    """
    previous = dict(unet.attn_processors)
    installed = {}
    for name, processor in previous.items():
        new = make(name, processor)
        if new is not None:
            installed[name] = new
    unet.set_attn_processor({**previous, **installed})
    try:
        yield installed
    finally:
        unet.set_attn_processor(previous)


@contextlib.contextmanager
def attention_mode(unet, state: AttentionState) -> Iterator[dict]:
    """Replace every self-attention processor of `unet` by the processor of `state.method`."""
    if state.method not in PROCESSORS:
        raise ValueError(f"unknown method {state.method!r}; choose one of {', '.join(METHODS)}")
    cls = PROCESSORS[state.method]
    layers = self_attention_layers(unet)
    with processors_installed(
        unet, lambda name, _: cls(state, name, layers[name]) if name in layers else None
    ) as installed:
        yield installed
