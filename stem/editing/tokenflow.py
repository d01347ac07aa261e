"""TokenFlow plug-and-play editing of an inverted video, as the STEM authors ran it. Tensors in, tensors out.

The STEM authors edit their inverted videos with TokenFlow (Geyer et al. 2023) on top of
plug-and-play (PnP) feature injection (Tumanyan et al. 2023) and FreeU (Si et al. 2024), in their
release's `TokenFlow-Edit/`; the defaults here reproduce that code (see docs/method-and-faithfulness.md,
"TokenFlow editing against the authors' release").
At each DDIM step i (T down to 1) the UNet batch holds the three groups of `common` (source,
negative, target; `AttentionState.num_groups == 3`) and one step is:

1. Keyframes. The frames are cut into batches of `batch_size` (the last one may be shorter); one
   random keyframe is drawn per batch (a generator seeded with `TokenFlowSettings.seed`).
2. Pass 1, keyframes only. At every self-attention layer each source keyframe attends to its own
   tokens (per-frame attention, as in the release), and each keyframe of the two edit groups attends
   to all keyframes of its group (extended attention) or to K STEM bases estimated from them
   (`attention="stem"`). PnP injection: during the first int(T * `pnp_attn`) steps the decoder's
   self-attention queries and keys of both edit groups are replaced by the source group's; during
   the first int(T * `pnp_conv`) steps the residual branch of `up_blocks.1.resnets.1` (its `conv2`
   output) is. Each self-attention layer stores its keyframe outputs and the source group's inputs
   in `EditState`.
3. Pass 2, every frame. No self-attention is computed: each frame's output at each self-attention
   layer is gathered from the stored keyframe outputs, token by token, at the nearest neighbour
   (cosine similarity of the SOURCE group's attention inputs) in two keyframes, and blended. The same
   correspondence serves all three groups. Conv injection applies here too. Which two keyframes and
   which weights (`propagation`):
       previous (the release's, TokenFlow's): a frame of batch b blends its own batch's keyframe
           (weight w) with batch b-1's (1 - w), w = sigmoid(d2 / (d1 + d2)), d1 and d2 the frame's
           distances to the centres of batches b and b-1, centre(b) = b * n + n // 2 (n = batch_size;
           a short last batch keeps these nominal centres). Frames of batch 0 take their own
           keyframe only; a keyframe is blended like any frame.
       nearest: its own batch's keyframe and the nearer adjacent batch's, blended linearly by the
           distance to each (weight 1 at a keyframe).
4. FreeU (`freeu`, on by default) in the UNet's up blocks during both passes, for all three groups.
5. Classifier-free guidance on the two edit groups; one deterministic DDIM step (`ddim_sample`).

Attention changes are processors installed by layer name and restored afterwards; the conv
injection and FreeU are module hooks installed by name and removed afterwards; everything a step
shares lives in one `EditState`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F

from ..attention import (
    AttentionState, FrameAttnProcessor, InflatedAttnProcessor, StemAttnProcessor, is_self_attention,
    processors_installed, self_attention_layers,
)
from ..errors import StemError
from ..hooks import hooks_installed
from ..inversion import Callback
from ..lockstep import whole_video
from ..settings import metrics, setting
from .common import (
    DEFAULT_NEGATIVE_PROMPT,
    EDITORS,
    NUM_GROUPS,
    SOURCE,
    fraction_setting,
    from_source,
    guidance_setting,
    guided_noise,
    negative_prompt_setting,
    sample_edit,
    source_latents,
    target_prompt_setting,
    unet_groups,
    validate_common,
    wide_dtype,
)
from .freeu import FreeUSettings, freeu_installed

EDIT_ATTENTION = ("extended", "stem")
PROPAGATION = ("previous", "nearest")  # the second keyframe of a frame and the blend, see the module docstring
CONV_INJECTION_LAYER = "up_blocks.1.resnets.1"  # PnP's injected residual block (SD's 4th decoder layer)
KEYFRAMES, PROPAGATE = "keyframes", "propagate"  # the two passes of a step
DEFAULT_MATCH_CHUNK_ELEMENTS = 1 << 24  # float32 elements of one (frames x tokens x tokens) similarity block

# trace(info): an observer for tests and debugging, one dict per event in the callback shape
# {"phase": event, "layer": name, "step": level i, **tensors}; events "qk" (pass 1's queries and keys after
# injection), "keyframes" (a layer's stored keyframe outputs and source features), "propagate" (a pass-2
# call's frames, source features and propagated outputs) and "conv".
Trace = Callable[[dict], None]
# keyframe_chooser(num_frames, batch_size, generator) -> (M,) one frame per batch; called once per step, step T first
KeyframeChooser = Callable[[int, int, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TokenFlowSettings:
    """One TokenFlow edit of an inverted video (not part of the cache key: the InversionSettings are)."""

    editor: ClassVar[str] = "tokenflow"

    prompt: str = target_prompt_setting()
    negative_prompt: str = negative_prompt_setting(DEFAULT_NEGATIVE_PROMPT)  # the STEM authors'
    guidance: float = guidance_setting()
    pnp_attn: float = fraction_setting(0.5, label="PnP attention threshold", words="the PnP attention fraction",
                                       help="fraction of the steps whose self-attention queries and keys come from "
                                            "the clip: higher keeps more of its structure, lower lets the prompt "
                                            "change more")
    pnp_conv: float = fraction_setting(0.8, label="PnP convolution threshold", words="the PnP convolution fraction",
                                       help="fraction of the steps whose residual (convolution) features come "
                                            "from the clip: higher keeps more of its layout")
    batch_size: int = setting(8, label="Batch size (frames per keyframe)", words="the batch size", minimum=1, step=1,
                              page_range=(1, 32), help="frames per TokenFlow batch, one keyframe each: larger is "
                                                       "faster; smaller follows fast motion better")
    attention: str = setting("extended", label="Edit attention", words="the edit attention", flag="--edit-attention",
                             choices=EDIT_ATTENTION, faces={"cli", "metrics"},
                             help="the edit groups' keyframe attention: extended (TokenFlow's) or stem (STEM bases)")
    propagation: str = setting("previous", label="Propagation", words="the propagation", choices=PROPAGATION,
                               choice_labels={"previous": "Previous keyframe (the authors')",
                                              "nearest": "Nearest keyframes"},
                               help="which two keyframes each frame's attention comes from: previous (its batch's and "
                                    "the previous batch's, as the STEM authors ran it) or nearest (the two nearest, "
                                    "blended linearly)")
    freeu: FreeUSettings = setting(FreeUSettings(), label="FreeU settings", words="the FreeU settings",
                                   help="FreeU in the editing UNet, on as in the release")
    seed: int = setting(0, label="Seed", words="the seed", minimum=0, maximum=2**63 - 1,
                        help="picks TokenFlow's keyframes at each step")

    def validate(self) -> "TokenFlowSettings":
        """Raise SettingError with one sentence (in words) for the first setting out of range."""
        validate_common(self)
        return self

    def num_injected_steps(self, num_steps: int) -> tuple[int, int]:
        """(Q/K steps, conv steps): the first int(T * fraction) of the T denoising steps inject, as in the release."""
        return int(num_steps * self.pnp_attn), int(num_steps * self.pnp_conv)

    def metrics(self) -> dict:
        """The settings as recorded in metrics.json."""
        return metrics(self)


EditSettings = TokenFlowSettings  # the default editor's settings under their historical name


# -- the shared state, the processors and the hook ----------------------------------------------

@dataclass
class EditState:
    """Everything the editing processors and the conv hook share during one edit."""

    attention: AttentionState          # batch layout (num_groups = 3) and the STEM settings of pass 1
    step: int = 0                      # level i of the current denoising step (T .. 1)
    inject_qk: bool = False            # this step replaces edit queries/keys by the source's
    inject_conv: bool = False          # this step replaces edit conv features by the source's
    phase: str = KEYFRAMES             # KEYFRAMES (pass 1) or PROPAGATE (pass 2)
    neighbours: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # ^ pass 2, for the frames of the current UNet call: own keyframe (n,), other keyframe (n,), own weight (n,)
    frames: torch.Tensor | None = None  # pass 2: the frame indices (n,) of the current UNet call
    keyframe_outputs: dict[str, torch.Tensor] = field(default_factory=dict)   # layer -> (G, M, L, C)
    keyframe_features: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (M, L, C), unit norm
    match_chunk_elements: int = DEFAULT_MATCH_CHUNK_ELEMENTS
    trace: Trace | None = None
    edit_groups: AttentionState = field(init=False)  # `attention` for the two edit groups alone (pass 1)

    def __post_init__(self):
        self.edit_groups = replace(self.attention, num_groups=self.attention.num_groups - 1)

    @property
    def num_groups(self) -> int:
        return self.attention.num_groups

    def set_step(self, step: int) -> None:
        """Level i of the step about to run (it also seeds the initial bases of STEM keyframe attention)."""
        self.step = self.attention.step = self.edit_groups.step = step


def unit_features(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C) unit-norm along the channels, in `wide_dtype`."""
    return F.normalize(x.to(wide_dtype(x.dtype)), dim=-1)


def nearest_tokens(
    queries: torch.Tensor, keys: torch.Tensor, chunk_elements: int = DEFAULT_MATCH_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Index of the most cosine-similar key token for every query token.

    Args:
        queries: (n, L, C) unit-norm features of n frames.
        keys: (n, L2, C) unit-norm features of each frame's keyframe.
        chunk_elements: bound on the float32 elements of one (n, tokens, L2) similarity block.

    Returns:
        (n, L) long indices into L2.
    """
    n, L, _ = queries.shape
    dtype = wide_dtype(queries.dtype)
    keys_t = keys.to(dtype).transpose(1, 2)  # (n, C, L2)
    rows = max(1, chunk_elements // max(1, n * keys.shape[1]))
    index = torch.empty(n, L, dtype=torch.long, device=queries.device)
    for start in range(0, L, rows):
        similarity = torch.bmm(queries[:, start:start + rows].to(dtype), keys_t)  # (n, rows, L2)
        index[:, start:start + rows] = similarity.argmax(dim=-1)
    return index


def choose_keyframes(num_frames: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(M,) one random frame index per batch of `batch_size` frames (the last batch may be shorter)."""
    starts = torch.arange(0, num_frames, batch_size)
    sizes = (num_frames - starts).clamp(max=batch_size)
    offsets = (torch.rand(len(starts), generator=generator, dtype=torch.float64) * sizes).long()
    return starts + offsets.clamp(max=sizes - 1)


def keyframe_neighbours(frames: torch.Tensor, keyframes: torch.Tensor, batch_size: int, propagation: str = "previous"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two keyframes each frame's self-attention outputs are gathered from, and the blend.

    Args:
        frames: (n,) frame indices.
        keyframes: (M,) the keyframe of each batch.
        batch_size: frames per batch (the nominal size; the last batch may be shorter).
        propagation: "previous" or "nearest" (see the module docstring).

    Returns:
        own (n,) and other (n,) keyframe numbers (0..M-1), and own_weight (n,) float64: the weight of
        the own keyframe's output (1 where `other == own`).
        previous: own = the frame's batch b, other = b - 1, own_weight = sigmoid(d2 / (d1 + d2)) with
            d1, d2 the distances to the centres b * n + n // 2 of batches b and b - 1; batch 0: other = own.
        nearest: other = the nearer adjacent batch's keyframe, own_weight = d_other / (d_own + d_other)
            with the distances to the two keyframes (1 at a keyframe, and when M == 1).
    """
    own = frames // batch_size
    if propagation == "previous":
        def centre(batch):
            return batch * batch_size + batch_size // 2

        d_own, d_previous = (frames - centre(own)).abs().double(), (frames - centre(own - 1)).abs().double()
        first = own == 0
        weight = torch.where(first, 1.0, torch.sigmoid(d_previous / (d_own + d_previous)))
        return own, torch.where(first, own, own - 1), weight
    M = len(keyframes)
    d_own = (frames - keyframes[own]).abs().double()
    if M == 1:
        return own, own, torch.ones(len(frames), dtype=torch.float64)
    before, after = (own - 1).clamp(min=0), (own + 1).clamp(max=M - 1)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    d_before = torch.where(own > 0, (frames - keyframes[before]).abs().double(), inf)
    d_after = torch.where(own < M - 1, (frames - keyframes[after]).abs().double(), inf)
    other = torch.where(d_before <= d_after, before, after)
    d_other = torch.minimum(d_before, d_after)
    return own, other, d_other / (d_own + d_other)


class TokenFlowAttnProcessor(FrameAttnProcessor):
    """Self-attention of one layer during an edit: keyframe attention in pass 1, propagation in pass 2.

    Pass 1 (`state.phase == KEYFRAMES`) runs per-frame attention on the source group's keyframes and
    `keyframe_attention` (extended or STEM, over the two edit groups: `state.edit_groups`) on the
    edit groups', with the edit groups' queries and keys replaced by the source group's when this
    layer and step inject, and stores the outputs. Pass 2 (`PROPAGATE`) computes no attention: it
    gathers every frame's output from the stored keyframe outputs (see the module docstring).
    """

    def __init__(self, state: EditState, name: str, keyframe_attention: FrameAttnProcessor, injects_qk: bool):
        super().__init__(state, name)
        self.keyframe_attention = keyframe_attention
        self.injects_qk = injects_qk

    def attend(self, attn, query, key, value, attention_mask=None):
        """(3n, heads, L, d) -> (3n, heads, L, d): PnP Q/K injection; the source group per frame, the
        edit groups with the keyframe attention."""
        state = self.state
        if self.injects_qk and state.inject_qk:
            query, key = from_source(query, state.num_groups), from_source(key, state.num_groups)
        if state.trace is not None:
            state.trace({"phase": "qk", "layer": self.name, "step": state.step, "query": query, "key": key})
        n = query.shape[0] // state.num_groups
        masks = (None, None) if attention_mask is None else (attention_mask[:n], attention_mask[n:])
        source = super().attend(attn, query[:n], key[:n], value[:n], masks[0])  # (n, heads, L, d)
        edits = self.keyframe_attention.attend(attn, query[n:], key[n:], value[n:], masks[1])  # (2n, heads, L, d)
        return torch.cat([source, edits])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.name}: TokenFlow editing expects (batch, tokens, channels) inputs")
        if self.state.phase == PROPAGATE:
            return self.propagate(attn, hidden_states)
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        self.store(attn, hidden_states, out)
        return out

    def _core(self, attn, hidden_states, out):
        """The layer's output without its residual and rescaling (what is propagated)."""
        out = out * attn.rescale_output_factor
        return out - hidden_states if attn.residual_connection else out

    def store(self, attn, hidden_states, out) -> None:
        """Keep the keyframes' outputs (all groups) and the source group's inputs, across lock-step chunks."""
        state, G = self.state, self.state.num_groups
        B, L, C = hidden_states.shape
        core = self._core(attn, hidden_states, out).reshape(G, B // G, L, C)
        source_inputs = hidden_states.reshape(G, B // G, L, C)[:SOURCE + 1]  # (1, n, L, C)

        def keep(outputs, inputs):  # (G, M, L, C), (1, M, L, C): every keyframe of the video
            state.keyframe_outputs[self.name] = outputs
            state.keyframe_features[self.name] = unit_features(inputs[0]).to(inputs.dtype)
            if state.trace is not None:
                state.trace({"phase": "keyframes", "layer": self.name, "step": state.step, "features": inputs[0],
                             "outputs": outputs})

        whole_video(keep, core, source_inputs)

    def propagate(self, attn, hidden_states):
        """(G*n, L, C) inputs of n frames -> their outputs, gathered from the keyframes' outputs."""
        state, G = self.state, self.state.num_groups
        B, L, C = hidden_states.shape
        n = B // G
        own, other, own_weight = state.neighbours
        outputs = state.keyframe_outputs[self.name]        # (G, M, L, C)
        keyframe_features = state.keyframe_features[self.name]  # (M, L, C)
        flat_outputs = outputs.reshape(G, -1, C)           # (G, M*L, C)
        features = unit_features(hidden_states.reshape(G, n, L, C)[SOURCE])  # (n, L, C)

        def gather(keyframe):  # (n,) keyframe numbers -> (G, n*L, C) outputs at the nearest tokens
            index = nearest_tokens(features, keyframe_features[keyframe], state.match_chunk_elements)
            return flat_outputs[:, (index + keyframe[:, None] * L).reshape(-1)]

        out = gather(own)
        if not torch.equal(own, other):
            weight = own_weight.to(out.device, out.dtype).repeat_interleave(L).view(1, n * L, 1)
            out = torch.lerp(gather(other), out, weight)  # weight * own + (1 - weight) * other
        if state.trace is not None:
            state.trace({"phase": "propagate", "layer": self.name, "step": state.step, "frames": state.frames,
                         "features": hidden_states.reshape(G, n, L, C)[SOURCE], "outputs": out.view(G, n, L, C)})
        out = out.reshape(B, L, C)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def qk_injection_layers(names) -> set[str]:
    """The decoder's self-attention processors but the first (PnP's layers 4-11 of SD's decoder)."""
    decoder = [n for n in names if n.startswith("up_blocks.") and is_self_attention(n)]
    return set(decoder[1:])


@contextlib.contextmanager
def tokenflow_processors(unet, state: EditState, attention: str) -> Iterator[dict]:
    """Install a TokenFlowAttnProcessor on every self-attention layer of `unet`; restore on exit."""
    inner = {"extended": InflatedAttnProcessor, "stem": StemAttnProcessor}[attention]
    injected = qk_injection_layers(unet.attn_processors)
    layers = self_attention_layers(unet)

    def make(name, _previous):
        if name not in layers:
            return None
        return TokenFlowAttnProcessor(state, name, inner(state.edit_groups, name, layers[name]), name in injected)

    with processors_installed(unet, make) as installed:
        yield installed


@contextlib.contextmanager
def conv_injection(unet, state: EditState, layer: str = CONV_INJECTION_LAYER) -> Iterator[None]:
    """Replace the edit groups' residual-branch features of `layer` (its conv2 output) by the source's.

    PnP injects the residual branch only: the block's skip connection keeps the edit's own input.
    """
    conv = f"{layer}.conv2"
    if conv not in dict(unet.named_modules()):
        raise StemError(
            f"This UNet has no residual block named {layer!r}; editing needs a Stable Diffusion 1.x/2.x UNet."
        )

    def hook(_module, _args, output):
        if state.inject_conv:
            output = from_source(output, state.num_groups)
        if state.trace is not None:
            state.trace({"phase": "conv", "layer": layer, "step": state.step, "features": output})
        return output

    with hooks_installed(unet, {conv: hook}):
        yield


# -- the edit -------------------------------------------------------------------------------------

def edit_latents(
    parts,
    trajectory: torch.Tensor,
    timesteps: torch.Tensor,
    alphas: torch.Tensor,
    text: torch.Tensor,
    edit: TokenFlowSettings,
    attention: AttentionState,
    chunk_size: int | None = None,
    callback: Callback | None = None,
    trace: Trace | None = None,
    keyframe_chooser: KeyframeChooser = choose_keyframes,
    control=None,
) -> tuple[torch.Tensor, dict]:
    """TokenFlow PnP editing of an inverted video, from x_T to clean latents.

    Args:
        parts: the model (`StableDiffusionParts`).
        trajectory: (T + 1, N, 4, h, w) the source's DDIM trajectory x_0 .. x_T (any device).
        timesteps: (T,) ascending UNet timesteps of the inversion.
        alphas: (T + 1,) alpha-bars of levels 0..T.
        text: (3, 77, D) embeddings of [source prompt, negative prompt, target prompt].
        edit: the edit's settings (validated).
        attention: the STEM settings for `edit.attention == "stem"`; its num_groups must be 3.
        chunk_size: frames per UNet call (None: a whole pass-1 call, `batch_size` frames in pass 2);
            the output does not depend on it.
        callback: `callback({"i": k, "total": T, "step": i, "x": x_{i-1}})` after the k-th denoising step.
        trace: optional observer, see `Trace`.
        keyframe_chooser: picks each step's keyframes (default: one at random per batch, seeded by
            `edit.seed`); tests pass given keyframes.
        control: optional `stem.control.Control` with the N source frames' conditions: ControlNet
            residuals in both passes for all three groups (this project's design; the release has none).

    Returns:
        (N, 4, h, w) float32 edited clean latents, and {"keyframes": the keyframes chosen at each step}.
    """
    if attention.num_groups != NUM_GROUPS:
        raise ValueError(f"the attention state must describe {NUM_GROUPS} groups, got {attention.num_groups}")
    unet, device = parts.unet, parts.device
    num_steps, num_frames = len(timesteps), trajectory.shape[1]
    qk_steps, conv_steps = edit.num_injected_steps(num_steps)
    call_frames = edit.batch_size if chunk_size is None else min(edit.batch_size, chunk_size)
    state = EditState(attention=attention, trace=trace)
    generator = torch.Generator().manual_seed(edit.seed)
    text = text.to(device=device, dtype=parts.dtype)
    chosen: list[list[int]] = []

    def eps(x, t, step):
        done = num_steps - step  # denoising steps already taken
        state.set_step(step)
        state.inject_qk, state.inject_conv = done < qk_steps, done < conv_steps
        keyframes = keyframe_chooser(num_frames, edit.batch_size, generator)
        chosen.append(keyframes.tolist())
        source = source_latents(trajectory, step, device)
        keys = keyframes.to(device)

        state.phase = KEYFRAMES  # pass 1: the keyframes attend (see TokenFlowAttnProcessor); outputs stored
        unet_groups(parts, text, source[keys], x[keys], t, chunk_size, control and control.frames(keys))

        state.phase = PROPAGATE  # pass 2: every frame, self-attention propagated from the keyframes
        noise = torch.empty_like(x)
        for start in range(0, num_frames, call_frames):
            frames = torch.arange(start, min(num_frames, start + call_frames))
            own, other, own_weight = keyframe_neighbours(frames, keyframes, edit.batch_size, edit.propagation)
            state.neighbours = (own.to(device), other.to(device), own_weight.to(device, wide_dtype(parts.dtype)))
            state.frames = frames
            index = frames.to(device)
            out = unet_groups(parts, text, source[index], x[index], t, None, control and control.frames(index))
            noise[index] = guided_noise(out, x[index], alphas[step], edit.guidance, parts.prediction_type)
        state.keyframe_outputs.clear()
        state.keyframe_features.clear()
        state.neighbours = state.frames = None
        return noise

    with (
        tokenflow_processors(unet, state, edit.attention),
        conv_injection(unet, state),
        freeu_installed(unet, edit.freeu),
    ):
        latents = sample_edit(eps, trajectory, timesteps, alphas, device, callback)
    return latents, {"keyframes": chosen}


EDITORS[TokenFlowSettings.editor] = edit_latents
