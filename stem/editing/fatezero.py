"""FateZero attention-fusion editing of an inverted video (Qi et al., ICCV 2023), fused on the fly.

At each DDIM step i (T down to 1, timestep t_i) the UNet batch holds the three groups of `common`
(source latents from the cached trajectory under the source prompt | edit x_i, negative prompt |
edit x_i, target prompt). FateZero edits the attention of the **target-prompt group** from the source
group's (the negative-prompt group runs unfused, as in FateZero and Prompt-to-Prompt).

The source group sees, with `source_maps`:
    inversion  x_{i-1} at t_i (default): FateZero stores the source's maps while it inverts, and the
               inversion's step to level i runs the UNet on x_{i-1} at t_i, so these are exactly the
               maps FateZero fuses at step i (`use_inversion_attention`, step_in_store = T - k). With
               STEM the source's EM is seeded as in that inversion step, so the bases are the same too;
    editing    x_i at t_i: the source at the level the edit is at (the project's earlier choice; it
               lines the source's maps up with the edit's latents, but no FateZero run fuses them).

1. Self-attention fusion, during the first `self_replace` fraction of the steps, in the
   self-attention layers with at most 32x32 tokens per frame (FateZero skips SD's 64x64 layers): the
   target group's self-attention probabilities are the source's, applied to the target's own values.
   Per inversion method:
       ddim      per-frame maps: softmax(q_src k_src^T) v_edit;
       inflated  all-frame maps: each frame's source queries over the source keys of every frame;
       stem      in the space of the K bases: the source's probabilities over the source's key bases,
                 softmax(q_src mu_src^T), applied to value bases formed from the edit's values with the
                 source's responsibilities, z_src^T v_edit (z normalised over tokens, as in the ST-M
                 step). The source's EM runs once, with the edit's values beside its own.
2. Cross-attention fusion, during the first `cross_replace` fraction, in the same layers: the target's
   maps come from the source's through a Prompt-to-Prompt word map (`wordmap`: replace or refine),
   times the `reweight` scales. `cross_replace_words` gives target words their own fraction
   (FateZero's `cross_replace_steps: {default_: 0.8, word: 0.4}`): at a step past a token's fraction
   that token keeps its own map, unscaled, as FateZero's `alpha_words` blend does.
3. Local blending with `blend_words` "SRC[,TGT]": a mask per frame from the cross-attention of the blend
   words in the cross-attention layers of `down_blocks.2` and `up_blocks.1` (SD's 16x16 layers at
   512 px; FateZero's `down_cross[2:4] + up_cross[:3]`), mean over heads and layers, 3x3 max-pool,
   resized, divided by the frame's maximum, above `blend_threshold`. Two switches, as FateZero's
   `blend_self_attention` and `blend_latents`, turn each use of the masks on or off. Self-attention is fused as
   mask * edit + (1 - mask) * fused, with the mask of the source's words at this step; after the
   denoising steps k in (blend_start * T, blend_end * T] the latents keep the edit inside the union of
   the source mask (this step) and the target mask (the target's maps summed over the steps so far)
   and take the source's trajectory outside it: with `blend_level` "input" (default) the source's
   x_i, the step's input level, as FateZero's LocalBlend does (it reads `latents_store[T - k]`, the
   inversion's x_i, for the edit's x_{i-1}); with "output" the source's x_{i-1}, the edit's own level.

Nothing is stored per step: the source branch is recomputed beside the edit from the cached
trajectory, so memory does not grow with the number of steps. The self-attention masks need this
step's source maps before the first fused layer runs; when blend words are given, a step with
self-attention fusion first runs the source group alone (the mask pass). With `chunk_size` the UNet
runs on frame chunks in lock-step greenlets (STEM bases and inflated keys from all frames); each chunk's
per-frame state travels to the processors in `cross_attention_kwargs={"chunk": FrameChunk}`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..attention import (
    AttentionState, FrameAttnProcessor, InflatedAttnProcessor, StemAttnProcessor, _frames_major,
    processors_installed, self_attention_layers,
)
from ..errors import StemError
from ..inversion import Callback
from ..lockstep import run_lockstep, whole_video
from ..settings import SettingError, metrics, sentence_case, setting, spec
from .common import (
    COND, EDITOR_CHECKS, EDITORS, NUM_GROUPS, SOURCE, UNCOND, fraction_setting, guidance_setting, guided_noise,
    is_number, leading_steps, negative_prompt_setting, sample_edit, source_latents, target_prompt_setting,
    validate_common,
)
from .freeu import FreeUSettings, freeu_installed
from .wordmap import WORD_MAPS, contains_word, reweight_scales, word_map, word_mask

MAX_FUSED_TOKENS = 32 * 32  # FateZero fuses only in layers with at most 32x32 tokens per frame
BLEND_BLOCKS = ("down_blocks.2.", "up_blocks.1.")  # their cross-attentions make the blend masks
BLEND_POOL = 3  # max-pool window of the masks
MASK_PASS, EDIT_PASS = 1, NUM_GROUPS  # groups in the UNet batch of each pass

# trace(info): an observer for tests and debugging, one dict per event in the callback shape
# {"phase": event, "layer": name, "step": level i, **tensors}. Events: "self" and "cross" (every attention
# call of the edit pass: query, key, value (B, heads, L, d) before fusion and the output after it), "blend"
# (layer "latents": the latent mask (N, 1, h, w) and the latents after blending).
Trace = Callable[[dict], None]


# -- settings ---------------------------------------------------------------------------------------

MAX_REWEIGHT = 100  # larger scales overflow the attention maps to inf/nan
SOURCE_MAPS = ("inversion", "editing")  # the trajectory level of the source group at step i: i - 1 or i
BLEND_LEVELS = ("input", "output")      # the source level the latent blend keeps after step i: i or i - 1


@dataclass(frozen=True)
class FateZeroSettings:
    """One FateZero edit of an inverted video (not part of the cache key: the InversionSettings are).

    Defaults from FateZero's configs: guidance 7.5 (every config), cross_replace 0.8 (its guide,
    docs/EditingGuidance.md, and teaser), self_replace 0.6 (its attribute edits use 0.1-0.7, shape
    0.3-0.9, style up to 0.9), blend threshold 0.3 (`blend_th` of its local edits), latent blending
    between 20 % and 80 % of the steps; both blend switches on, as in its guide's local-edit example.
    """

    editor: ClassVar[str] = "fatezero"

    prompt: str = target_prompt_setting()
    source_prompt: str = setting("", label="Source prompt", words="the source prompt", faces=(),
                                 help="the inversion's prompt (the word maps need both)")  # the CLI's inversion's
    negative_prompt: str = negative_prompt_setting("")  # FateZero's: none
    guidance: float = guidance_setting()
    self_replace: float = fraction_setting(0.6, label="Self-attention fusion", words="the self-attention fusion",
                                           help="fraction of the steps whose self-attention (layers of <= 32x32 "
                                                "tokens) is the clip's: higher keeps more of its structure and motion")
    cross_replace: float = fraction_setting(0.8, label="Cross-attention fusion", words="the cross-attention fusion",
                                            help="fraction of the steps whose word-to-pixel (cross-attention) maps "
                                                 "are the clip's: higher keeps its layout")
    # (target word, fraction): that word's own cross_replace (FateZero's cross_replace_steps {word: fraction})
    cross_replace_words: tuple[tuple[str, float], ...] = setting(
        (), label="Cross-attention fusion per word", words="the per-word cross-attention fusion",
        flag="--cross-replace-word", faces={"cli", "metrics"}, help="a target word's own cross-attention fusion, "
        "WORD=FRACTION (FateZero's cross_replace_steps {word: fraction})")
    word_map: str = setting("auto", label="Word map", words="the word map", choices=WORD_MAPS, faces={"cli", "metrics"},
                            help="how target tokens take the source's maps: auto (FateZero's: replace when the prompts "
                                 "have as many space-separated words, else refine), replace, refine or tokens (replace "
                                 "token by token when they have as many tokens, else refine)")
    reweight: tuple[tuple[str, float], ...] = setting(
        (), label="Reweight", words="the reweighting",
        help="WORD=SCALE pairs that strengthen (or weaken) a target word's cross-attention while the maps are "
             "fused, e.g. golden=2")
    blend_words: str = setting("", label="Blend words", words="the blend words",
                               help="local edit: SRC[,TGT], the source (and target) words of the part to change, e.g. "
                                    "car,truck: their attention masks where the edit may change the video; empty: the "
                                    "whole frame")
    blend_threshold: float = setting(0.3, label="Blend threshold", words="the blend threshold", minimum=0, maximum=1,
                                     step=0.05, page_range=(0.05, 1),
                                     help="mask threshold on the per-frame normalised word maps: higher confines the "
                                          "edit to a smaller region")
    blend_self_attention: bool = setting(
        True,
        label="Blend self-attention",
        words="the self-attention blend",
        faces={"cli", "metrics"},
        help="with blend words: keep the edit's own "
        "self-attention inside the source words' mask (FateZero's blend_self_attention)",
    )
    # with blend words: blend the latents with the source's outside the masks; off as in FateZero's configs (only
    # its jeep_posche_local_latent_blend.yaml turns it on; the others leave it out: "performance not so good")
    blend_latents: bool = setting(False, label="Blend latents", words="the latent blend", faces={"cli", "metrics"},
                                  help="with blend words: blend the latents with the source's outside the masks "
                                       "(FateZero's blend_latents; off, as FateZero's configs)")
    # latents are blended after the steps k with blend_start*T < k <= blend_end*T
    blend_start: float = fraction_setting(0.2, label="Blend start", words="the blend start", faces={"metrics"},
                                          help="latents are blended after the steps k with blend_start*T < k")
    blend_end: float = fraction_setting(0.8, label="Blend end", words="the blend end", faces={"metrics"},
                                        help="latents are blended after the steps k <= blend_end*T")
    source_maps: str = setting("inversion", label="Source maps", words="the source maps", choices=SOURCE_MAPS,
                               faces={"cli", "metrics"}, help="the source's attention maps at step i: inversion "
                               "(FateZero's: x_(i-1) at t_i, as its inversion stores them) or editing (x_i at t_i)")
    blend_level: str = setting("input", label="Blend level", words="the blend level", choices=BLEND_LEVELS,
                               faces={"cli", "metrics"}, help="the source latents the blend keeps outside the mask "
                               "after step i: input (FateZero's LocalBlend: x_i) or output (x_(i-1), the edit's level)")
    seed: int = setting(0, label="Seed", words="the seed", minimum=0, maximum=2**63 - 1, faces=(),
                        help="unused: FateZero draws nothing at random (the EM seed is the inversion's)")
    freeu: FreeUSettings = setting(FreeUSettings(enabled=False), label="FreeU settings", words="the FreeU settings",
                                   help="FreeU in the editing UNet; off: FateZero's release has no FreeU")

    def blend_word_lists(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(source words, target words) of `blend_words`; the target's are the source's when no TGT is given."""
        if not self.blend_words.strip():
            return (), ()
        sides = [tuple(side.split()) for side in self.blend_words.split(",")]
        return sides[0], sides[-1]

    def validate(self) -> "FateZeroSettings":
        """Raise SettingError with one sentence (in words) for the first setting out of range."""
        validate_common(self)
        if self.blend_threshold == 0:
            raise self._error("blend_threshold", "The blend threshold must be above 0 and at most 1 (0.3 is usual), "
                              f"got {self.blend_threshold}.")
        if self.blend_start > self.blend_end:
            raise self._error("blend_start", f"The blend start ({self.blend_start}) must not come after the blend end "
                              f"({self.blend_end}).")
        for word, scale in self._checked_word_pairs("reweight", "SCALE", "reweighted"):
            if not is_number(scale) or not -MAX_REWEIGHT <= scale <= MAX_REWEIGHT:
                raise self._error("reweight", f"The reweighting of {word!r} needs a scale between -{MAX_REWEIGHT} and "
                                  f"{MAX_REWEIGHT}, got {scale!r}.")
        for word, fraction in self._checked_word_pairs("cross_replace_words", "FRACTION", "cross-replace"):
            if not is_number(fraction) or not 0 <= fraction <= 1:
                raise self._error("cross_replace_words", f"The cross-attention fusion of {word!r} must be a fraction "
                                  f"of the steps between 0 and 1, got {fraction}.")
        self._validate_blend_words()
        return self

    @staticmethod
    def _error(name: str, message: str) -> SettingError:
        return SettingError(name, message, FateZeroSettings)

    def _checked_word_pairs(self, name: str, value: str, what: str) -> tuple[tuple[str, float], ...]:
        """The setting `name` if it is a tuple of (one word of the target prompt, value) pairs; else one sentence."""
        pairs, words = getattr(self, name), sentence_case(spec(FateZeroSettings, name).words)
        if not isinstance(pairs, tuple):
            raise self._error(name, f"{words} must be a tuple of (word, {value.lower()}) pairs, got {pairs!r}.")
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise self._error(name, f"{words} takes WORD={value}, got {pair!r}.")
            if len(pair[0].split()) != 1:
                raise self._error(name, f"{words} takes one word per WORD={value}, got {pair[0]!r}.")
            if not contains_word(self.prompt, pair[0]):
                raise self._error(name, f"The {what} word {pair[0]!r} is not in the target prompt {self.prompt!r}.")
        return pairs

    def _validate_blend_words(self) -> None:
        if not self.blend_words.strip():
            return
        if not (self.blend_self_attention or self.blend_latents):
            raise self._error("blend_words", "The blend words do nothing with both the self-attention blend and the "
                              "latent blend off; turn one of them back on or give no blend words.")
        sides = self.blend_words.split(",")
        if len(sides) > 2 or not all(side.split() for side in sides):
            raise self._error("blend_words", "The blend words take SRC or SRC,TGT (e.g. car or car,truck), got "
                              f"{self.blend_words!r}.")
        source_words, target_words = self.blend_word_lists()
        for words, prompt, which in (
            (source_words, self.source_prompt, "source"),
            (target_words, self.prompt, "target"),
        ):
            for word in words:
                if not contains_word(prompt, word):
                    hint = (
                        ""
                        if which == "source" or len(sides) == 2
                        else f"; name the target's word too: {word},TARGET_WORD"
                    )
                    raise self._error("blend_words", f"The blend word {word!r} is not in the {which} prompt "
                                      f"{prompt!r}{hint}.")

    def num_fused_steps(self, num_steps: int) -> tuple[int, int]:
        """(self-attention steps, cross-attention steps): the first so many of `num_steps` steps fuse
        (the cross-attention count of the tokens without a `cross_replace_words` fraction of their own)."""
        return self_replace_steps(self.self_replace, num_steps), cross_replace_steps(self.cross_replace, num_steps)

    def metrics(self) -> dict:
        """The settings as recorded in metrics.json."""
        return metrics(self)


def cross_replace_steps(fraction: float, num_steps: int) -> int:
    """Steps of cross-attention fusion, FateZero's `int(f * (T + 1))` (at most T).

    `ptp_utils.get_time_words_attention_alpha` builds its per-step weights over T + 1 rows and sets the
    first `int(f * (T + 1))` of them; the edit reads rows 0 .. T - 1. (0.75 at T = 50: 38 steps.)
    """
    return min(num_steps, int(fraction * (num_steps + 1)))


def self_replace_steps(fraction: float, num_steps: int) -> int:
    """Steps of self-attention fusion, FateZero's `int(T * f)` (0.58 at T = 50 is 28.999...: 28 steps)."""
    return int(num_steps * fraction)


def parse_reweight(items: str | Iterable[str] | None) -> tuple[tuple[str, float], ...]:
    """"WORD=SCALE" strings (or one comma-separated string) -> ((word, scale), ...); one sentence if malformed."""
    return parse_word_values(items, "reweight", "WORD=SCALE (e.g. watercolor=2)")


def parse_cross_replace_words(items: str | Iterable[str] | None) -> tuple[tuple[str, float], ...]:
    """"WORD=FRACTION" strings (FateZero's `cross_replace_steps: {word: fraction}`) -> ((word, fraction), ...)."""
    return parse_word_values(items, "cross_replace_words", "WORD=FRACTION (e.g. tiger=0.4)")


# the word-pair settings' parsers, by field name: what the CLI's repeated options and the app's text become
WORD_VALUE_PARSERS = {"reweight": parse_reweight, "cross_replace_words": parse_cross_replace_words}


def parse_word_values(items: str | Iterable[str] | None, name: str, form: str) -> tuple[tuple[str, float], ...]:
    """"WORD=NUMBER" strings (or one comma-separated string) -> ((word, number), ...) for the FateZero setting
    `name`; one sentence if malformed."""
    if items is None:
        return ()
    if isinstance(items, str):
        items = [item for item in items.split(",") if item.strip()]
    pairs = []
    for item in items:
        word, _, scale = item.partition("=")
        try:
            value = float(scale)
        except ValueError:
            value = None
        if value is None or not word.strip():
            words = sentence_case(spec(FateZeroSettings, name).words)
            raise SettingError(name, f"{words} takes {form}, got {item!r}.", FateZeroSettings)
        pairs.append((word.strip(), value))
    return tuple(pairs)


# -- the word maps and masks of one edit -------------------------------------------------------------

@dataclass
class EditMaps:
    """The token-level tensors of one edit: word map, reweighting and the blend words' tokens."""

    mode: str                             # the word map used: "replace" or "refine"
    mapper: torch.Tensor                  # (77, 77) float32: target token j's map is sum_i mapper[i, j] source_i
    weight: torch.Tensor                  # (77,) float32: 1 takes the source's map, 0 keeps the target's
    scales: torch.Tensor                  # (77,) float32: reweighting of the target's maps
    cross_fractions: tuple[float, ...]    # (77,) each target token's fraction of cross-attention fusion steps
    source_blend: torch.Tensor | None     # (77,) float32: 1 at the source blend words' tokens
    target_blend: torch.Tensor | None     # (77,) float32: 1 at the target blend words' tokens

    @property
    def blends(self) -> bool:
        return self.source_blend is not None

    @classmethod
    def build(cls, edit: FateZeroSettings, tokenizer, device=None) -> "EditMaps":
        """Tokenise the prompts; refuses a replace with different word counts or words past the 77 tokens."""
        mapping = word_map(tokenizer, edit.source_prompt, edit.prompt, edit.word_map)
        mapper, weight = mapping.tensors(device)
        scales = reweight_scales(tokenizer, edit.prompt, edit.reweight).to(device)
        fractions = [edit.cross_replace] * tokenizer.model_max_length
        for word, fraction in edit.cross_replace_words:  # FateZero's {default_: f, word: f_word}, the word's tokens
            for position in word_mask(tokenizer, edit.prompt, [word], "cross-replace").nonzero().flatten().tolist():
                fractions[position] = fraction
        source_words, target_words = edit.blend_word_lists()
        source_blend = target_blend = None
        if source_words:
            source_blend = word_mask(tokenizer, edit.source_prompt, source_words, "blend").to(device)
            target_blend = word_mask(tokenizer, edit.prompt, target_words, "blend").to(device)
        return cls(mapping.mode, mapper, weight, scales, tuple(fractions), source_blend, target_blend)

    def cross_steps(self, num_steps: int, device=None) -> torch.Tensor:
        """(77,) long: how many of the first steps fuse each target token's cross-attention."""
        return torch.tensor([cross_replace_steps(f, num_steps) for f in self.cross_fractions], device=device)

    def fuse_cross(self, source: torch.Tensor, edit: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """(..., 77) source and edit cross-attention probabilities -> the edit's fused probabilities.

        `alpha` (77,) 1 where this step fuses the target token, 0 where it keeps the edit's own map
        (FateZero's `replace * alpha_words + (1 - alpha_words) * edit`: reweighting only where fused); None: all 1.
        """
        fused = torch.lerp(edit, source @ self.mapper, self.weight) * self.scales
        return fused if alpha is None else torch.lerp(edit, fused, alpha)


def token_grid(num_tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of a UNet level with `num_tokens` tokens per frame (SD halves each side, rounding up)."""
    h, w = latent_size
    while h * w > num_tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != num_tokens:
        raise ValueError(f"no UNet level of a {latent_size} latent has {num_tokens} tokens")
    return h, w


def blend_mask(maps: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """FateZero's mask: (n, r, c) word maps -> (n, 1, *size) bool: 3x3 max-pool, resize, / frame max, > threshold."""
    pooled = F.max_pool2d(maps[:, None].float(), BLEND_POOL, stride=1, padding=BLEND_POOL // 2)
    resized = F.interpolate(pooled, size=tuple(size), mode="nearest")
    peak = resized.amax(dim=(-2, -1), keepdim=True)
    return resized / peak.clamp_min(torch.finfo(torch.float32).tiny) > threshold


# -- the shared state and the per-chunk context -----------------------------------------------------

@dataclass
class FateZeroState:
    """Everything the FateZero processors share during one edit."""

    attention: AttentionState          # the inversion's self-attention method and STEM settings
    maps: EditMaps
    threshold: float                   # blend threshold
    step: int = 0                      # level i of the current denoising step (T .. 1)
    fuse_self: bool = False            # this step fuses self-attention
    fuse_cross: bool = False           # this step fuses cross-attention (of some target tokens)
    cross_alpha: torch.Tensor | None = None  # (77,) 1 at the target tokens whose cross-attention this step fuses
    trace: Trace | None = None


@dataclass
class FrameChunk:
    """One UNet call over a chunk of frames: what its processors read and record (cross_attention_kwargs)."""

    groups: int                                  # MASK_PASS (source only) or EDIT_PASS (three groups)
    latent_size: tuple[int, int]                 # (h, w) of the latents
    self_mask_maps: torch.Tensor | None = None   # (n, r, c) source blend-word maps of this step (from the mask pass)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # "source"/"target" -> (n, r, c) summed word maps
    heads: dict[str, int] = field(default_factory=dict)          # how many (layer, head) maps each sum holds

    def record(self, which: str, maps: torch.Tensor) -> None:
        """Add (n, heads, L) word maps of one layer to the `which` sum."""
        n, h, L = maps.shape
        grid = token_grid(L, self.latent_size)
        summed = maps.float().sum(dim=1).view(n, *grid)
        self.sums[which] = summed if which not in self.sums else self.sums[which] + summed
        self.heads[which] = self.heads.get(which, 0) + h

    def mean_maps(self, which: str) -> torch.Tensor | None:
        """(n, r, c) mean over the recorded layers and heads, or None."""
        return self.sums[which] / self.heads[which] if which in self.sums else None

    def self_mask(self, num_tokens: int, threshold: float) -> torch.Tensor | None:
        """(n, 1, L, 1) bool: where a layer of `num_tokens` tokens keeps the edit's own self-attention."""
        if self.self_mask_maps is None:
            return None
        grid = token_grid(num_tokens, self.latent_size)
        return blend_mask(self.self_mask_maps, grid, threshold).view(-1, 1, num_tokens, 1)


class FateZeroAttnProcessor(FrameAttnProcessor):
    """The skeleton of FrameAttnProcessor with the call's `FrameChunk` handed to `attend_chunk`."""

    def __init__(self, state: FateZeroState, name: str, layer_index: int = 0):
        super().__init__(state.attention, name, layer_index)
        self.edit = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 chunk: FrameChunk | None = None, **kwargs):
        if chunk is None:
            raise ValueError(
                f"{self.name}: FateZero processors run with cross_attention_kwargs={{'chunk': FrameChunk}}"
            )

        # the lock-step chunks share the processors, so a call's chunk travels with the call, not on `self`
        def attend(attn, query, key, value, attention_mask=None):
            return self.attend_chunk(attn, query, key, value, chunk, attention_mask)

        return self.attention_call(attend, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def attend_chunk(self, attn, query, key, value, chunk: FrameChunk, attention_mask=None):
        raise NotImplementedError

    def observe(self, event: str, chunk: FrameChunk, tensors: dict) -> None:
        if self.edit.trace is not None and chunk.groups == EDIT_PASS:
            self.edit.trace({"phase": event, "layer": self.name, "step": self.edit.step, **tensors})


def _groups(x: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """(G*n, ...) -> G tensors of (n, ...)."""
    return list(x.chunk(groups))


class FateZeroSelfAttnProcessor(FateZeroAttnProcessor):
    """A self-attention layer: the inversion's attention per group, the target group fused with the source's."""

    def __init__(self, state: FateZeroState, name: str, layer_index: int):
        super().__init__(state, name, layer_index)
        self.stem = StemAttnProcessor(
            state.attention, name, layer_index
        )  # its EM (`bases`), seeded as in the inversion

    def attend_chunk(self, attn, query, key, value, chunk, attention_mask=None):
        state, G = self.edit, chunk.groups
        L = query.shape[2]
        fuse = G == EDIT_PASS and state.fuse_self and L <= MAX_FUSED_TOKENS
        mask = chunk.self_mask(L, state.threshold) if fuse else None
        if G == EDIT_PASS and self.state.method == "stem":
            out = self.stem_groups(attn, query, key, value, fuse, mask)
        elif fuse:
            out = self.fused_maps(attn, query, key, value, mask)
        else:
            out = self.plain(attn, query, key, value, G)
        self.observe("self", chunk, {"query": query, "key": key, "value": value, "output": out})
        return out

    def plain(self, attn, query, key, value, groups: int) -> torch.Tensor:
        """(G*n, h, L, d) -> (G*n, h, L, d): the inversion's self-attention, each group on its own."""
        method = self.state.method
        if method == "ddim":
            return F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        if method == "inflated":
            return InflatedAttnProcessor(AttentionState(method="inflated", num_groups=groups)).attend(
                attn, query, key, value
            )
        return self.attend_bases(
            attn, query, *whole_video(self.stem.bases, _frames_major(key, groups), _frames_major(value, groups))
        )

    @staticmethod
    def attend_bases(attn, query, key_bases, value_bases) -> torch.Tensor:
        """(G*n, h, L, d) queries, (G, h, K, d|dv) bases -> (G*n, h, L, dv): each frame over its group's bases."""
        frames = query.shape[0] // key_bases.shape[0]
        return F.scaled_dot_product_attention(
            query,
            key_bases.to(query.dtype).repeat_interleave(frames, dim=0),
            value_bases.to(query.dtype).repeat_interleave(frames, dim=0),
            scale=attn.scale,
        )

    def fused_maps(self, attn, query, key, value, mask):
        """ddim / inflated: the target group attends with the source's queries and keys (the source's maps)."""
        q, k = _groups(query, NUM_GROUPS), _groups(key, NUM_GROUPS)
        q[COND], k[COND] = q[SOURCE], k[SOURCE]
        out = self.plain(attn, torch.cat(q), torch.cat(k), value, NUM_GROUPS)
        if mask is None:
            return out
        groups = _groups(out, NUM_GROUPS)
        own = self.plain(attn, *(_groups(x, NUM_GROUPS)[COND] for x in (query, key, value)), 1)
        groups[COND] = torch.where(mask, own, groups[COND])
        return torch.cat(groups)

    def stem_groups(self, attn, query, key, value, fuse: bool, mask):
        """STEM, edit pass: the source's EM on its own (as in the reconstruction), then the edit groups'.

        Fused, the target group takes the source's probabilities over the source's bases applied to value
        bases of its own values: one EM on the source's keys gives the key bases mu and the
        responsibilities z, the value bases of [source values | target values] are z^T [v_src | v_edit]
        (normalised over tokens), so the source's output softmax(q mu^T) (z^T v_src) and the fused one
        softmax(q mu^T) (z^T v_edit) come from one attention over 2d value channels. The negative-prompt
        group (and, unfused or inside a blend mask, the target group) attends to the bases of its own EM.
        """
        q, k, v = (_groups(x, NUM_GROUPS) for x in (query, key, value))
        d = value.shape[-1]
        values = torch.cat([v[SOURCE], v[COND]], dim=-1) if fuse else v[SOURCE]
        both = self.attend_bases(attn, q[SOURCE], *whole_video(self.stem.bases, k[SOURCE][None], values[None]))
        out = [both[..., :d], None, both[..., d:] if fuse else None]
        own = [g for g in (UNCOND, COND) if out[g] is None or mask is not None]
        mine = _groups(self.plain(attn, *(torch.cat([x[g] for g in own]) for x in (q, k, v)), len(own)), len(own))
        for g, result in zip(own, mine):
            out[g] = result if out[g] is None else torch.where(mask, result, out[g])
        return torch.cat(out)


class FateZeroCrossAttnProcessor(FateZeroAttnProcessor):
    """A cross-attention layer: the target group's maps from the source's by the word map; blend-word maps recorded."""

    def __init__(self, state: FateZeroState, name: str, records_blend: bool):
        super().__init__(state, name)
        self.records_blend = records_blend

    def attend_chunk(self, attn, query, key, value, chunk, attention_mask=None):
        state, G = self.edit, chunk.groups
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        records = self.records_blend and state.maps.blends
        fuse = G == EDIT_PASS and state.fuse_cross and query.shape[2] <= MAX_FUSED_TOKENS
        if records or fuse:
            q, k, v = (_groups(x, G) for x in (query, key, value))

            def probabilities(g):  # (n, h, L, 77), float32
                return torch.softmax(q[g].float() @ k[g].float().transpose(-1, -2) * attn.scale, dim=-1)

            source = probabilities(SOURCE)
            if records:
                chunk.record("source", source @ state.maps.source_blend)
            if G == EDIT_PASS:
                target = probabilities(COND)
                if records:
                    chunk.record("target", target @ state.maps.target_blend)
                if fuse:
                    groups = _groups(out, G)
                    groups[COND] = (state.maps.fuse_cross(source, target, state.cross_alpha) @ v[COND].float()).to(
                        out.dtype
                    )
                    out = torch.cat(groups)
        self.observe("cross", chunk, {"query": query, "key": key, "value": value, "output": out})
        return out


@contextlib.contextmanager
def fatezero_processors(unet, state: FateZeroState) -> Iterator[dict]:
    """Install FateZero processors on every self- and cross-attention layer of `unet`; restore on exit."""
    layers = self_attention_layers(unet)

    def make(name, _previous):
        if name in layers:
            return FateZeroSelfAttnProcessor(state, name, layers[name])
        if name.endswith("attn2.processor"):
            return FateZeroCrossAttnProcessor(state, name, name.startswith(BLEND_BLOCKS))
        return None

    with processors_installed(unet, make) as installed:
        yield installed


# -- the edit ---------------------------------------------------------------------------------------

def unet_step(parts, text: torch.Tensor, source: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              chunk_size: int | None, mask_pass: bool, control=None):
    """One denoising step's UNet work on every frame, in lock-step frame chunks.

    Args:
        parts: the model (`StableDiffusionParts`) with the FateZero processors installed.
        text: (3, 77, D) embeddings of [source prompt, negative prompt, target prompt] (model dtype).
        source: (N, 4, h, w) the source group's latents (see `source_maps`); x: (N, 4, h, w) the edit's.
        t: the timestep.
        chunk_size: frames per UNet call (None: all at once).
        mask_pass: run the source group alone first, for this step's self-attention blend masks.
        control: optional `stem.control.Control` with the N source frames' conditions, for every group.

    Returns:
        (3, N, 4, h, w) float32 UNet outputs, and the (N, r, c) source and target blend-word maps
        of this step (None without blend words).
    """
    unet, N = parts.unet, x.shape[0]
    size = chunk_size or N

    def call(latents, emb, frames: slice, chunk):
        """The UNet on latents of the frames `frames` (with the ControlNet's residuals under structure guidance)."""
        if control is None:
            return unet(latents, t, encoder_hidden_states=emb, cross_attention_kwargs={"chunk": chunk}).sample
        from ..control import controlled_unet

        cond = control.cond[frames].repeat(latents.shape[0] // (frames.stop - frames.start), 1, 1, 1)
        return controlled_unet(unet, control, latents, t, emb, cond, cross_attention_kwargs={"chunk": chunk})

    def run(frames: slice):
        n = frames.stop - frames.start
        chunk = FrameChunk(MASK_PASS, tuple(x.shape[-2:]))
        if mask_pass:
            call(source[frames].to(parts.dtype), text[SOURCE:SOURCE + 1].expand(n, -1, -1), frames, chunk)
            chunk.self_mask_maps, chunk.sums, chunk.heads = chunk.mean_maps("source"), {}, {}
        chunk.groups = EDIT_PASS
        latents = torch.cat([source[frames], x[frames], x[frames]]).to(parts.dtype)
        out = call(latents, text.repeat_interleave(n, dim=0), frames, chunk)
        return out.float().view(NUM_GROUPS, n, *x.shape[1:]), chunk.mean_maps("source"), chunk.mean_maps("target")

    results = run_lockstep(run, [slice(s, min(N, s + size)) for s in range(0, N, size)])
    out = torch.cat([r[0] for r in results], dim=1)
    maps = [None if results[0][j] is None else torch.cat([r[j] for r in results]) for j in (1, 2)]
    return out, maps[0], maps[1]


def edit_latents(
    parts,
    trajectory: torch.Tensor,
    timesteps: torch.Tensor,
    alphas: torch.Tensor,
    text: torch.Tensor,
    edit: FateZeroSettings,
    attention: AttentionState,
    chunk_size: int | None = None,
    callback: Callback | None = None,
    trace: Trace | None = None,
    control=None,
) -> tuple[torch.Tensor, dict]:
    """FateZero editing of an inverted video, from x_T to clean latents.

    Args:
        parts: the model (`StableDiffusionParts`); its tokenizer makes the word maps.
        trajectory: (T + 1, N, 4, h, w) the source's DDIM trajectory x_0 .. x_T (any device).
        timesteps: (T,) ascending UNet timesteps of the inversion.
        alphas: (T + 1,) alpha-bars of levels 0..T.
        text: (3, 77, D) embeddings of [source prompt, negative prompt, target prompt].
        edit: the edit's settings (validated; `edit.source_prompt` is the inversion's prompt).
        attention: the inversion's method and STEM settings; its num_groups must be 3.
        chunk_size: frames per UNet call (None: all at once); the result does not depend on it.
        callback: `callback({"i": k, "total": T, "step": i, "x": x_{i-1}})` after the k-th denoising step,
            once the step's latents are blended.
        trace: optional observer, see `Trace`.
        control: optional `stem.control.Control` with the N source frames' conditions: ControlNet
            residuals for all three groups (this project's design; the release has none).

    Returns:
        (N, 4, h, w) float32 edited clean latents, and {"word_map": "replace" | "refine",
        "blended_steps": the levels i whose result was blended with the source's latents}.
    """
    if attention.num_groups != NUM_GROUPS:
        raise ValueError(f"the attention state must describe {NUM_GROUPS} groups, got {attention.num_groups}")
    device, num_steps = parts.device, len(timesteps)
    maps = EditMaps.build(edit, parts.tokenizer, device)
    state = FateZeroState(attention, maps, edit.blend_threshold, trace=trace)
    self_steps = edit.num_fused_steps(num_steps)[0]
    cross_steps = maps.cross_steps(num_steps, device)  # per target token
    blend_from, blend_to = leading_steps(edit.blend_start, num_steps), leading_steps(edit.blend_end, num_steps)
    text = text.to(device=device, dtype=parts.dtype)
    maps_of_step, target_maps, blended = {}, None, []

    def eps_fn(x, t, i):
        k = num_steps - i + 1
        state.step = attention.step = i  # the step also seeds STEM's initial bases, as in the inversion
        state.cross_alpha = (k <= cross_steps).float()
        state.fuse_self, state.fuse_cross = k <= self_steps, bool(state.cross_alpha.any())
        source = source_latents(trajectory, i - 1 if edit.source_maps == "inversion" else i, device)
        out, maps_of_step["source"], maps_of_step["target"] = unet_step(
            parts,
            text,
            source,
            x,
            t,
            chunk_size,
            maps.blends and state.fuse_self and edit.blend_self_attention,
            control,
        )
        return guided_noise(out, x, alphas[i], edit.guidance, parts.prediction_type)

    def blend(x, i):
        nonlocal target_maps
        k = num_steps - i + 1
        step_maps = maps_of_step["target"]
        target_maps = step_maps if target_maps is None else target_maps + step_maps
        if blend_from < k <= blend_to:
            size = tuple(x.shape[-2:])
            mask = blend_mask(maps_of_step["source"], size, edit.blend_threshold) | blend_mask(
                target_maps, size, edit.blend_threshold
            )
            x = torch.where(mask, x, source_latents(trajectory, i if edit.blend_level == "input" else i - 1, device))
            blended.append(i)
            if trace is not None:
                trace({"phase": "blend", "layer": "latents", "step": i, "mask": mask, "latents": x})
        return x

    def after_step(info):  # the local blend, then the caller's callback with the blended latents
        x = blend(info["x"], info["step"]) if maps.blends and edit.blend_latents else info["x"]
        if callback is not None:
            callback({**info, "x": x})
        return x

    with fatezero_processors(parts.unet, state), freeu_installed(parts.unet, edit.freeu):
        x = sample_edit(eps_fn, trajectory, timesteps, alphas, device, after_step)
    return x, {"word_map": maps.mode, "blended_steps": blended}


def check_job(edit: FateZeroSettings, inversion, tokenizer) -> None:
    """Before the inversion: the settings' source prompt is the inversion's, and the prompts tokenise as asked."""
    if edit.source_prompt != inversion.prompt:
        raise StemError(f"The FateZero settings were made for the source prompt {edit.source_prompt!r} but the "
                        f"inversion uses {inversion.prompt!r}; build them with the inversion's source prompt.")
    EditMaps.build(edit, tokenizer)


EDITORS[FateZeroSettings.editor] = edit_latents
EDITOR_CHECKS[FateZeroSettings.editor] = check_job
