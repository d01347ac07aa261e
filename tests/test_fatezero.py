"""FateZero attention-fusion editing on the inverted video, on the tiny random model.

The tiny model's tokenizer spells words letter by letter ("a cat" -> BOS a</w> c a t</w> EOS), so the
word maps below are worked out by hand on those tokens.
"""

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from stem.attention import AttentionState, StemAttnProcessor
from stem import em_reference
from stem.cache import LatentCache
from stem.cli import cli_message, main
from stem.editing import FateZeroSettings, edit_metrics, edit_video, parse_reweight
from stem.editing.common import COND, NUM_GROUPS, SOURCE, UNCOND
from stem.editing.fatezero import (
    EDIT_PASS, MAX_FUSED_TOKENS, EditMaps, FateZeroSelfAttnProcessor, FateZeroState, FrameChunk, blend_mask,
    edit_latents, token_grid,
)
from stem.editing.tokenflow import EditSettings
from stem.editing.wordmap import align_tokens, reweight_scales, word_map, word_positions
from stem.engine import Engine
from stem.errors import StemError
from stem.inversion import ddim_schedule, decode_latents, encode_prompt
from stem.metrics import psnr
from stem.models import TINY_MODEL
from stem.video import read_video
from test_editing import SOURCE_PROMPT, clip_file, edit_args, inversion, synthetic_video  # noqa: F401 (clip_file: a fixture)


def fatezero(prompt="a dog", **overrides) -> FateZeroSettings:
    return FateZeroSettings(prompt, **{"source_prompt": SOURCE_PROMPT, **overrides})


@pytest.fixture
def tokenizer(tiny_parts):
    return tiny_parts.tokenizer


@pytest.fixture(scope="module")
def shared_engine(tiny_parts, tmp_path_factory):
    """One cache for the tests that do not count inversions: each clip is inverted once for the module."""
    return Engine(TINY_MODEL, cache=LatentCache(tmp_path_factory.mktemp("cache"))).use_parts(tiny_parts)


# -- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(prompt=""), "prompt"),
        (dict(guidance=0.5), "--guidance"),
        (dict(self_replace=1.5), "--self-replace"),
        (dict(self_replace=-0.1), "--self-replace"),
        (dict(cross_replace=float("nan")), "--cross-replace"),
        (dict(cross_replace=2), "--cross-replace"),
        (dict(blend_threshold=0), "--blend-threshold"),
        (dict(blend_threshold=1.5), "--blend-threshold"),
        (dict(blend_threshold=-0.3), "--blend-threshold"),
        (dict(word_map="swap"), "word map"),
        (dict(blend_words="horse"), "source prompt"),
        (dict(blend_words="cat,horse"), "target prompt"),
        (
            dict(blend_words="cat"),
            "--blend-words: the blend word 'cat' is not in the target prompt 'a dog'; name the target's word too: "
            "cat,TARGET_WORD",
        ),
        (dict(blend_words="cat,dog,fox"), "--blend-words"),
        (dict(blend_words=" ,dog"), "--blend-words"),
        (dict(reweight=(("horse", 2.0),)), "reweighted word"),
        (dict(reweight=(("dog", float("inf")),)), "--reweight"),
        (dict(reweight=(("a dog", 2.0),)), "one word"),
        (dict(blend_start=0.9), "blend start"),
        (dict(source_prompt=None), "--source-prompt"),
        (dict(source_maps="x_i"), "--source-maps"),
        (dict(blend_level="previous"), "--blend-level"),
        (dict(cross_replace_words=(("dog", 1.5),)), "--cross-replace-word: the cross-attention fusion of 'dog'"),
        (dict(cross_replace_words=(("horse", 0.4),)), "cross-replace word"),
        (dict(cross_replace_words=(("a dog", 0.4),)), "one word"),
        (dict(cross_replace_words=("dog",)), "WORD=FRACTION"),
        (dict(blend_latents=1), "--blend-latents"),
        (dict(blend_self_attention="yes"), "--blend-self-attention"),
        (
            dict(blend_words="cat,dog", blend_latents=False, blend_self_attention=False),
            "--blend-words: the blend words do nothing",
        ),
    ],
)
def test_bad_settings_are_refused_with_one_sentence(overrides, words):
    with pytest.raises(StemError) as err:
        fatezero(**overrides).validate()
    assert "--" not in str(err.value)  # the core names settings in words; the CLI puts the flag first
    message = cli_message(err.value)
    assert words in message and "\n" not in message and message.endswith("."), message


def test_replace_with_different_word_counts_is_refused(tokenizer):
    edit = fatezero("a big cat", word_map="replace").validate()
    with pytest.raises(StemError) as err:
        EditMaps.build(edit, tokenizer)
    message = str(err.value)
    assert (
        "The word map replace" in message
        and "--word-map replace" in cli_message(err.value)
        and "words" in message
        and "2" in message
        and "3" in message
        and "\n" not in message
    )


def test_good_settings_pass_and_are_hashable():
    edit = fatezero("A big DOG, running", self_replace=0, cross_replace=1, blend_words="cat,dog", blend_threshold=1,
                    reweight=(("big", 2.0), ("running", -1)), word_map="refine")
    assert edit.validate() is edit and hash(edit) == hash(FateZeroSettings(**vars(edit)))
    assert edit.blend_word_lists() == (("cat",), ("dog",))
    assert fatezero("a cat", blend_words="cat").validate().blend_word_lists() == (("cat",), ("cat",))
    assert fatezero(self_replace=0.58, cross_replace=0.8).num_fused_steps(50) == (28, 40)


def test_reweight_parsing():
    assert parse_reweight(["dog=2", " big = -1.5 "]) == (("dog", 2.0), ("big", -1.5))
    assert parse_reweight("dog=2, big=3") == (("dog", 2.0), ("big", 3.0))
    assert parse_reweight(None) == ()
    for bad in ("dog", "=2", "dog=x", "dog=="):
        with pytest.raises(StemError, match="WORD=SCALE"):
            parse_reweight([bad])


# -- word maps (hand-worked) -------------------------------------------------------------------------

def test_alignment_of_token_sequences():
    assert align_tokens([1, 2, 3], [1, 4, 2, 3]) == [0, None, 1, 2]      # insertion
    assert align_tokens([1, 2, 4, 3], [1, 2, 3]) == [0, 1, 3]            # deletion
    assert align_tokens([1, 2, 3], [1, 9, 3]) == [0, None, 2]            # a changed token is never aligned
    assert align_tokens([5], [5, 5]) == [0, None]                        # the earliest match wins a tie
    assert align_tokens([7, 8], [8, 7]) == [1, None]                     # ... and the earliest target token
    # FateZero's traceback: a repeated word aligns to its earliest source occurrence
    assert align_tokens([0, 1, 2, 3, 4, 1, 5, 3, 9], [0, 1, 6, 3, 9]) == [0, 1, None, 3, 8]


def test_word_swap_is_a_replace(tokenizer):
    # "a cat" = BOS a</w> c a t</w> EOS, "a dog" = BOS a</w> d o g</w> EOS: six tokens each
    mapping = word_map(tokenizer, "a cat", "a dog")
    assert mapping.mode == "replace"
    assert mapping.source_index == tuple(range(77)) and mapping.weight == (1.0,) * 77


def test_a_swap_that_changes_the_token_count_is_fatezeros_word_replace(tokenizer):
    # source  0 BOS 1 a</w> 2 f 3 o 4 x</w> 5 s 6 a 7 t</w> 8 EOS
    # target  0 BOS 1 a</w> 2 w 3 o 4 l 5 f</w> 6 s 7 a 8 t</w> 9 EOS: as many words, one token more
    mapping = word_map(tokenizer, "a fox sat", "a wolf sat")
    assert mapping.mode == "replace" and mapping.weight == (1.0,) * 77
    assert mapping.columns[:2] == (((0, 1.0),), ((1, 1.0),))
    assert all(column == ((2, 0.25), (3, 0.25), (4, 0.25)) for column in mapping.columns[2:6])  # fox / 4 each
    # after the last swapped word, by absolute position: "sat" takes "at" and the EOS of the source
    assert mapping.columns[6:10] == (((6, 1.0),), ((7, 1.0),), ((8, 1.0),), ((9, 1.0),))
    tokens = word_map(tokenizer, "a fox sat", "a wolf sat", mode="tokens")   # the project's rule: a refine
    assert tokens.mode == "refine" and tokens.source_index[6:10] == (5, 6, 7, 8)
    assert word_map(tokenizer, "a cat", "a dog", mode="tokens").source_index == tuple(range(77))


def test_insertion_is_a_refine(tokenizer):
    # source  0 BOS 1 a</w> 2 c 3 a 4 t</w> 5 EOS 6.. padding
    # target  0 BOS 1 a</w> 2 b 3 i 4 g</w> 5 c 6 a 7 t</w> 8 EOS 9.. padding
    mapping = word_map(tokenizer, "a cat", "a big cat")
    assert mapping.mode == "refine"
    assert mapping.source_index[:9] == (0, 1, 0, 0, 0, 2, 3, 4, 5)
    assert mapping.weight[:9] == (1, 1, 0, 0, 0, 1, 1, 1, 1)                  # "big" keeps its own maps
    assert mapping.source_index[9:] == tuple(range(6, 74)) and set(mapping.weight[9:]) == {1.0}  # padding by order


def test_deletion_is_a_refine(tokenizer):
    mapping = word_map(tokenizer, "a big cat", "a cat")
    assert mapping.mode == "refine"
    assert mapping.source_index[:6] == (0, 1, 5, 6, 7, 8) and mapping.weight[:6] == (1,) * 6
    # target padding 6..76 takes source padding 9..79: the last three have no partner and keep their own
    assert mapping.source_index[6:74] == tuple(range(9, 77)) and set(mapping.weight[6:74]) == {1.0}
    assert mapping.weight[74:] == (0, 0, 0)


def test_forced_refine_of_a_swap_keeps_only_the_shared_tokens(tokenizer):
    mapping = word_map(tokenizer, "a cat", "a dog", mode="refine")
    assert mapping.mode == "refine" and mapping.weight[:6] == (1, 1, 0, 0, 0, 1)
    assert mapping.source_index[:2] == (0, 1) and mapping.source_index[5] == 5


def test_words_are_found_as_whole_words(tokenizer):
    assert word_positions(tokenizer, "a big cat", "cat") == [5, 6, 7]
    assert word_positions(tokenizer, "A Cat, a cat.", "cat") == [2, 3, 4, 7, 8, 9]
    assert word_positions(tokenizer, "a bobcat", "cat") == [] and word_positions(tokenizer, "a cats", "cat") == []
    scales = reweight_scales(tokenizer, "a big cat", [("big", 3.0)])
    assert scales[2:5].tolist() == [3.0] * 3 and scales.sum().item() == 77 - 3 + 9


def test_fused_cross_attention_follows_the_word_map(tokenizer):
    maps = EditMaps.build(fatezero("a big cat", reweight=(("cat", 2.0),)), tokenizer)
    g = torch.Generator().manual_seed(0)
    source, edit = torch.rand(2, 3, 77, generator=g), torch.rand(2, 3, 77, generator=g)
    fused = maps.fuse_cross(source, edit)
    torch.testing.assert_close(fused[..., [0, 1]], source[..., [0, 1]])
    torch.testing.assert_close(fused[..., 2:5], edit[..., 2:5])           # "big" is new
    torch.testing.assert_close(fused[..., 5:8], 2 * source[..., 2:5])     # "cat", reweighted
    torch.testing.assert_close(fused[..., 8], source[..., 5])             # EOS


def test_per_word_cross_replace_fuses_that_word_for_its_own_steps(tokenizer):
    # "a cat" -> "a dog": BOS a</w> d o g</w> EOS; dog fuses for int(0.4 * 11) = 4 of 10 steps, the rest for 8
    maps = EditMaps.build(fatezero("a dog", cross_replace=0.8, cross_replace_words=(("dog", 0.4),),
                                   reweight=(("dog", 2.0),)), tokenizer)
    steps = maps.cross_steps(10)
    assert (
        steps[2:5].tolist() == [4, 4, 4] and steps[[0, 1, 5]].tolist() == [8, 8, 8] and set(steps[5:].tolist()) == {8}
    )
    g = torch.Generator().manual_seed(0)
    source, edit = torch.rand(2, 3, 77, generator=g), torch.rand(2, 3, 77, generator=g)
    alpha = torch.ones(77)
    alpha[2:5] = 0  # step 5: dog no longer fuses
    fused = maps.fuse_cross(source, edit, alpha)
    torch.testing.assert_close(fused[..., 2:5], edit[..., 2:5])          # its own map, not reweighted
    torch.testing.assert_close(fused[..., [0, 1, 5]], source[..., [0, 1, 5]])
    torch.testing.assert_close(maps.fuse_cross(source, edit, torch.ones(77))[..., 2:5], 2 * source[..., 2:5])


@torch.no_grad()
def test_per_word_cross_replace_in_the_edit(tiny_parts):
    """cross_replace 0 but "dog" 1.0: every step's target cross-attention takes the source's maps at dog's
    tokens only (the replace map of "a cat" -> "a dog" is the identity), recomputed in float64 from the trace."""
    parts, steps, n = tiny_parts, 2, 1
    trajectory = torch.randn(steps + 1, n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps, alphas = ddim_schedule(parts.scheduler, steps)
    text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in (SOURCE_PROMPT, "", "a dog")])
    edit = fatezero("a dog", self_replace=0, cross_replace=0, cross_replace_words=(("dog", 1.0),)).validate()
    checked = []

    def trace(info):
        event, step = info["phase"], info["step"]
        tensors = {k: v for k, v in info.items() if torch.is_tensor(v)}
        if event != "cross":
            return
        q, k, v = (
            x.double().view(NUM_GROUPS, n, *x.shape[1:]) for x in (tensors["query"], tensors["key"], tensors["value"])
        )
        out = tensors["output"].double().view(NUM_GROUPS, n, *tensors["output"].shape[1:])
        scale = q.shape[-1] ** -0.5
        source, own = (torch.softmax(q[g] @ k[g].transpose(-1, -2) * scale, dim=-1) for g in (SOURCE, COND))
        mixed = own.clone()
        mixed[..., 2:5] = source[..., 2:5]
        torch.testing.assert_close(out[COND], mixed @ v[COND], rtol=1e-4, atol=1e-5)
        checked.append(step)

    edit_latents(parts, trajectory, timesteps, alphas, text, edit, AttentionState(method="ddim", num_groups=NUM_GROUPS),
                 trace=trace)
    assert set(checked) == {1, 2}


@torch.no_grad()
def test_blend_switches(tiny_parts, count_calls):
    """--no-blend-latents: no latent blend; --no-blend-self-attention: no mask pass (the source group alone)."""
    parts, steps = tiny_parts, 3
    trajectory = torch.randn(steps + 1, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps, alphas = ddim_schedule(parts.scheduler, steps)
    text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in (SOURCE_PROMPT, "", "a dog")])
    attention = AttentionState(method="ddim", num_groups=NUM_GROUPS)
    runs = {}
    for latents_on, self_on in ((True, True), (False, True), (True, False)):
        edit = fatezero(blend_words="cat,dog", blend_threshold=0.999, blend_start=0, blend_end=1, self_replace=1.0,
                        blend_latents=latents_on, blend_self_attention=self_on).validate()
        with count_calls(parts.unet) as counter:
            _, details = edit_latents(parts, trajectory, timesteps, alphas, text, edit, attention)
        runs[latents_on, self_on] = (details["blended_steps"], counter.calls)
    assert runs[True, True] == ([3, 2, 1], 2 * steps)     # a mask pass before each fused step
    assert runs[False, True] == ([], 2 * steps)
    assert runs[True, False] == ([3, 2, 1], steps)


# -- masks -----------------------------------------------------------------------------------------

def test_blend_mask_pools_resizes_normalises_per_frame_and_thresholds():
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 1] = 1.0   # frame 0: one hot token
    maps[1] = 0.2         # frame 1: flat and weak, but normalised by its own maximum
    maps[1, 3, 3] = 0.25
    mask = blend_mask(maps, (8, 8), threshold=0.3)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    expected0 = torch.zeros(8, 8, dtype=torch.bool)
    expected0[0:6, 0:6] = True  # the 3x3 neighbourhood of token (1, 1), each token 2x2 pixels
    assert torch.equal(mask[0, 0], expected0)
    assert mask[1].all()  # 0.2 / 0.25 > 0.3 everywhere
    assert not blend_mask(maps, (8, 8), threshold=1.0).any()          # strictly above the maximum: nothing
    assert not blend_mask(torch.zeros(1, 2, 2), (4, 4), 0.3).any()    # no attention at all: nothing, no nan


def test_token_grid_follows_the_unet_levels():
    assert token_grid(34 * 34, (34, 34)) == (34, 34) and token_grid(17 * 17, (34, 34)) == (17, 17)
    assert token_grid(9 * 9, (34, 34)) == (9, 9) and token_grid(18 * 32, (18, 32)) == (18, 32)
    assert token_grid(5 * 8, (18, 32)) == (5, 8)


# -- STEM-space fusion against a float64 re-derivation --------------------------------------------

def reference_em(keys, init, num_iters, tau):
    """Float64 EM of the paper (`stem.em_reference`): key bases (h, K, d) and the last responsibilities
    (h, NL, K) normalised over tokens."""
    mu, _, z = em_reference.reference_em(keys, init, num_iters, tau)
    return mu, z


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_stem_fusion_matches_a_float64_reference(masked, tokenizer):
    n, side, heads, d, K, R = 3, 4, 2, 8, 4, 3
    L = side * side
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=heads, dim_head=d).eval()
    attention = AttentionState(method="stem", num_bases=K, num_iters=R, seed=3, step=7, num_groups=NUM_GROUPS)
    maps = EditMaps.build(fatezero("a dog"), tokenizer)
    state = FateZeroState(attention, maps, threshold=0.5, step=7, fuse_self=True)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    processor = FateZeroSelfAttnProcessor(state, name, layer_index=2)
    chunk = FrameChunk(EDIT_PASS, (side, side))
    if masked:  # a hot first column; the 3x3 max-pool widens it: columns 0-1 keep the edit's own attention
        chunk.self_mask_maps = torch.zeros(n, side, side)
        chunk.self_mask_maps[:, :, 0] = 1.0
    hidden = 0.5 * torch.randn(NUM_GROUPS * n, L, 16, generator=torch.Generator().manual_seed(1))
    out = processor(attn, hidden, chunk=chunk)

    def heads_of(x):  # (G*n, L, h*d) -> G groups of (h, n*L, d)
        x = x.double().view(NUM_GROUPS, n, L, heads, d).permute(0, 3, 1, 2, 4)
        return list(x.reshape(NUM_GROUPS, heads, n * L, d))

    q, k, v = (heads_of(layer(hidden)) for layer in (attn.to_q, attn.to_k, attn.to_v))
    scale = d ** -0.5
    stem = StemAttnProcessor(attention, name, 2)

    def bases_attention(query, mu, value_bases):  # each token over the K bases
        return torch.softmax(query @ mu.transpose(-1, -2) * scale, dim=-1) @ value_bases

    mu_s, z_s = reference_em(k[SOURCE], stem.initial_bases(k[SOURCE].float()), R, attention.tau)
    expected = [bases_attention(q[SOURCE], mu_s, z_s.transpose(-1, -2) @ v[SOURCE]), None,
                bases_attention(q[SOURCE], mu_s, z_s.transpose(-1, -2) @ v[COND])]   # the fused target group
    own = [UNCOND, COND] if masked else [UNCOND]
    init = stem.initial_bases(torch.cat([k[g] for g in own]).float()).split(
        heads
    )  # the groups' own EMs, drawn together
    for g, mu0 in zip(own, init):
        mu, z = reference_em(k[g], mu0, R, attention.tau)
        mine = bases_attention(q[g], mu, z.transpose(-1, -2) @ v[g])
        if g == COND:  # inside the mask (columns 0-1 of each frame) the edit's own attention
            inside = (torch.arange(n * L) % side <= 1).view(1, -1, 1)
            mine = torch.where(inside, mine, expected[COND])
        expected[g] = mine
    core = (
        torch.stack(expected)
        .view(NUM_GROUPS, heads, n, L, d)
        .permute(0, 2, 3, 1, 4)
        .reshape(NUM_GROUPS * n, L, heads * d)
    )
    reference = core @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference[2 * n:], reference[:n], atol=1e-3)  # the fused group is not the source's output


# -- which layers and steps fuse (trace) ---------------------------------------------------------

def reference_attention(q, k, v, scale, all_frames: bool):
    """(n, h, L, d) float64: per-frame softmax(q k^T) v, or every frame's queries over all frames' keys."""
    if all_frames:
        n, h, L, d = q.shape
        keys, values = (x.permute(1, 0, 2, 3).reshape(1, h, n * L, -1) for x in (k, v))
        return torch.softmax(q @ keys.transpose(-1, -2) * scale, dim=-1) @ values
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@torch.no_grad()
@pytest.mark.parametrize("method, side, n", [("ddim", 34, 1), ("inflated", 8, 2)])
def test_fusion_only_in_small_layers_and_in_the_configured_steps(tiny_parts, method, side, n):
    """ddim on a 34x34 latent: the outer UNet level has 1156 > 32x32 tokens per frame and must not fuse.
    inflated on two 8x8 frames: the fused maps are each frame's source queries over every frame's keys.

    Every attention output of the target group is compared with both candidates recomputed in float64
    from the traced queries, keys and values: its own attention, and the source's maps on its values.
    """
    parts, steps = tiny_parts, 3
    trajectory = torch.randn(steps + 1, n, 4, side, side, generator=torch.Generator().manual_seed(0))
    timesteps, alphas = ddim_schedule(parts.scheduler, steps)
    text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in (SOURCE_PROMPT, "", "a dog")])
    edit = fatezero("a dog", self_replace=0.7, cross_replace=0.4, guidance=3).validate()  # self: levels 3, 2; cross: 3
    seen = {"self": {True: 0, False: 0}, "cross": {True: 0, False: 0}}
    big_layers = set()

    def trace(info):
        event, name, step = info["phase"], info["layer"], info["step"]
        tensors = {k: v for k, v in info.items() if torch.is_tensor(v)}
        if event not in seen:
            return
        q, k, v = (
            x.double().view(NUM_GROUPS, n, *x.shape[1:]) for x in (tensors["query"], tensors["key"], tensors["value"])
        )
        out = tensors["output"].double().view(NUM_GROUPS, n, *tensors["output"].shape[1:])
        L, scale = q.shape[-2], q.shape[-1] ** -0.5
        all_frames = event == "self" and method == "inflated"
        own = reference_attention(q[COND], k[COND], v[COND], scale, all_frames)
        fused = reference_attention(q[SOURCE], k[SOURCE], v[COND], scale, all_frames)
        should = L <= MAX_FUSED_TOKENS and (step >= 2 if event == "self" else step == 3)
        if L > MAX_FUSED_TOKENS:
            big_layers.add(name)
        torch.testing.assert_close(out[SOURCE], reference_attention(q[SOURCE], k[SOURCE], v[SOURCE], scale, all_frames),
                                   rtol=1e-4, atol=1e-5)
        if torch.allclose(own, fused, atol=1e-4):
            return  # both candidates agree (the first layer of the first step: the same latents)
        torch.testing.assert_close(out[COND], fused if should else own, rtol=1e-4, atol=1e-5)
        seen[event][should] += 1

    edit_latents(parts, trajectory, timesteps, alphas, text, edit,
                 AttentionState(method=method, num_groups=NUM_GROUPS), trace=trace)
    if side == 34:
        assert any("down_blocks.0" in name for name in big_layers) and any("up_blocks.3" in name for name in big_layers)
    assert min(seen["self"].values()) >= 3 and min(seen["cross"].values()) >= 3, seen


# -- the edit --------------------------------------------------------------------------------------

def test_source_prompt_with_full_fusion_reproduces_the_reconstruction(shared_engine):
    """Guidance 1, target prompt = source prompt, self- and cross-attention fused at every step: the
    target group runs the source's attention on its own values. Not exact, for the reason the TokenFlow
    identity test gives: the edit runs on its own DDIM samples, which drift from the trajectory x_i the
    source branch runs on. Bound as in tests/test_editing.py. Measured (5 frames, 3 steps, CPU float32):
    39.4 dB to the reconstruction (mean |diff| 1.7 / 255; TokenFlow's identity edit of the same clip
    30.4 dB); "a dog" at guidance 7.5 14.5 dB.
    """
    video, settings = synthetic_video(5), inversion()
    same = edit_video(
        shared_engine, video, settings, fatezero(SOURCE_PROMPT, guidance=1, self_replace=1, cross_replace=1)
    )
    other = edit_video(shared_engine, video, settings, fatezero("a dog"))
    reconstruction = same.inversion.reconstruction
    close, far = psnr(reconstruction, same.frames).mean(), psnr(reconstruction, other.frames).mean()
    assert close > 26.0, close
    assert close > far + 8.0, (close, far)
    assert same.details["word_map"] == "replace" and same.frames.shape == video.frames.shape


def test_an_empty_blend_mask_keeps_every_pixel_of_the_source(shared_engine, tiny_parts):
    """Threshold 1: no normalised map is above its frame's maximum, so the masks are empty. Blending after
    every step puts the source back: FateZero's blend level (the step's input x_i) ends on the source's x_1,
    the "output" level on its x_0; the frames are those decoded source latents, exactly."""
    video, settings = synthetic_video(3), inversion()
    for level, final in (("input", 1), ("output", 0)):
        result = edit_video(shared_engine, video, settings, fatezero(blend_words="cat,dog", blend_threshold=1.0,
                                                                     blend_start=0, blend_end=1, blend_level=level,
                                                                     blend_latents=True))
        trajectory = result.inversion.trajectory
        assert result.details["blended_steps"] == [3, 2, 1]
        assert np.array_equal(result.frames, decode_latents(tiny_parts.vae, trajectory[final]))

    # the default window, steps k in (0.6, 2.4] of 3: the latents are the source's after those steps only
    parts, blends = tiny_parts, []
    timesteps, alphas = ddim_schedule(parts.scheduler, settings.num_steps)
    text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in (SOURCE_PROMPT, "", "a dog")])
    edit = fatezero(blend_words="cat,dog", blend_threshold=1.0, blend_latents=True)
    with torch.inference_mode():
        latents, details = edit_latents(
            parts, trajectory, timesteps, alphas, text, edit, shared_engine.attention_state(settings, NUM_GROUPS),
            trace=lambda info: blends.append((info["step"], info)) if info["phase"] == "blend" else None,
        )
    assert details["blended_steps"] == [3, 2] and [step for step, _ in blends] == [3, 2]
    for step, tensors in blends:
        assert not tensors["mask"].any() and torch.equal(tensors["latents"], trajectory[step])
    assert not torch.equal(latents, trajectory[0])  # the last step is not blended


@torch.no_grad()
def test_blend_words_confine_the_edit(tiny_parts):
    """A 16x16 latent (blend layers at 4x4 tokens): the masks cover part of each frame; after each blended
    step the latents outside the mask are the source's x_i (FateZero's blend level) and inside it the edit's
    own. The random model's maps are flat (0.7-1.0 of each frame's maximum), so a threshold near 1 keeps about the 3x3
    neighbourhood of each frame's maximum."""
    parts, steps, n = tiny_parts, 3, 2
    trajectory = torch.randn(steps + 1, n, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps, alphas = ddim_schedule(parts.scheduler, steps)
    text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in (SOURCE_PROMPT, "", "a dog")])
    edit = fatezero(
        blend_words="cat,dog",
        blend_threshold=0.999,
        blend_start=0,
        blend_end=1,  # flat maps of random weights
        blend_latents=True,
    )
    blends = []
    latents, details = edit_latents(
        parts, trajectory, timesteps, alphas, text, edit,
        AttentionState(method="stem", num_bases=8, num_iters=2, num_groups=NUM_GROUPS),
        trace=lambda info: blends.append((info["step"], info)) if info["phase"] == "blend" else None,
    )
    assert details["blended_steps"] == [3, 2, 1] and len(blends) == 3
    for step, tensors in blends:
        mask, x = tensors["mask"].expand(-1, 4, -1, -1), tensors["latents"]
        assert 0.05 < mask.float().mean() < 0.95, mask.float().mean()
        assert torch.equal(x[~mask], trajectory[step][~mask])
        assert (x[mask] != trajectory[step][mask]).float().mean() > 0.99
    assert torch.equal(latents, blends[-1][1]["latents"])


def test_second_edit_does_no_inversion_work(engine, tiny_parts, count_calls):
    video, settings = synthetic_video(3), inversion()
    with count_calls(tiny_parts.unet) as counter:
        first = edit_video(engine, video, settings, fatezero())
    assert not first.inversion_cache_hit and counter.calls == 2 * 3 + 3  # inversion + reconstruction + one call a step
    with count_calls(tiny_parts.unet) as counter:
        second = edit_video(engine, video, settings, fatezero("a fox", blend_words="cat,fox", self_replace=0.7))
    assert second.inversion_cache_hit and counter.calls == 3 + 2  # plus a mask pass in the 2 self-fused steps
    with count_calls(tiny_parts.unet) as counter:
        third = edit_video(engine, video, settings, EditSettings("a fox", batch_size=3))
    assert third.inversion_cache_hit and counter.calls == 3 * 2  # TokenFlow reuses the same inversion
    assert not np.array_equal(first.frames, second.frames)


def test_chunked_unet_calls_give_the_same_edit(tiny_parts, tmp_path):
    """Lock-step chunks: STEM bases from every frame, blend masks per chunk in the call's FrameChunk."""
    video, settings = synthetic_video(3), inversion()
    whole = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "cache")).use_parts(tiny_parts)
    chunked = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "cache")).use_parts(tiny_parts)
    edit = fatezero(blend_words="cat,dog", blend_start=0, blend_end=1)
    a = edit_video(whole, video, settings, edit)
    b = edit_video(chunked, video, settings, edit, chunked.plan(video, settings, edit, chunk_size=2))
    assert b.inversion_cache_hit
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2


def test_check_before_inversion(engine, tiny_parts, count_calls):
    video, settings = synthetic_video(3), inversion()
    with count_calls(tiny_parts.unet) as counter:
        with pytest.raises(StemError, match="The word map replace"):
            edit_video(engine, video, settings, fatezero("a big dog", word_map="replace"))
        with pytest.raises(StemError, match="source prompt"):
            edit_video(engine, video, settings, FateZeroSettings("a dog", source_prompt="a fox"))
    assert counter.calls == 0


def test_metrics_block(shared_engine):
    video = synthetic_video(3)
    result = edit_video(shared_engine, video, inversion(), fatezero(reweight=(("dog", 2.0),), blend_words="cat,dog"))
    block = edit_metrics(video, result)
    expected = {"editor": "fatezero", "prompt": "a dog", "self_replace": 0.6, "cross_replace": 0.8, "word_map": "auto",
                "reweight": {"dog": 2.0}, "blend_words": "cat,dog", "blend_threshold": 0.3, "guidance": 7.5,
                "num_frames": 3, "fps": 12.0, "method": "stem", "source_prompt": SOURCE_PROMPT}
    assert {k: block[k] for k in expected} == expected
    json.dumps(block, allow_nan=False)


# -- the command line ------------------------------------------------------------------------------

def fatezero_args(clip_file, tmp_path, *extra):
    return edit_args(clip_file, tmp_path, "--editor", "fatezero", *extra)


def test_cli_fatezero_end_to_end(clip_file, tmp_path, capsys):
    code = main(
        fatezero_args(
            clip_file,
            tmp_path,
            "--prompt",
            "a dog",
            "--blend-words",
            "cat,dog",
            "--reweight",
            "dog=2",
            "--self-replace",
            "0.5",
            "--cross-replace",
            "1",
            "--blend-threshold",
            "0.4",
            "--frames",
            "3",
        )
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["editor"] == "fatezero" and metrics["file"] == "edited.mp4"
    assert (metrics["self_replace"], metrics["cross_replace"], metrics["blend_threshold"]) == (0.5, 1.0, 0.4)
    assert metrics["reweight"] == {"dog": 2.0} and metrics["blend_words"] == "cat,dog"
    edited = read_video(tmp_path / "out" / "edited.mp4", size=64)
    assert edited.num_frames == 3 and edited.fps == pytest.approx(15)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--self-replace", "1.5"], "--self-replace"),
        (["--cross-replace", "-1"], "--cross-replace"),
        (["--blend-threshold", "0"], "--blend-threshold"),
        (["--blend-words", "horse"], "horse"),
        (["--reweight", "dog"], "WORD=SCALE"),
        (["--reweight", "fox=2"], "fox"),
        (["--word-map", "swap"], "swap"),
        (["--source-maps", "stored"], "--source-maps"),
        (["--blend-level", "x_i"], "--blend-level"),
        (["--cross-replace-word", "dog"], "WORD=FRACTION"),
        (["--cross-replace-word", "dog=2"], "--cross-replace-word: the cross-attention fusion of 'dog'"),
        (
            ["--blend-words", "cat,dog", "--no-blend-latents", "--no-blend-self-attention"],
            "--blend-words: the blend words do nothing",
        ),
    ],
)
def test_cli_refuses_bad_fatezero_options_before_any_work(clip_file, tmp_path, capsys, monkeypatch, extra, words):
    def no_model(*_, **__):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("stem.engine.load_models", no_model)
    assert main(fatezero_args(tmp_path / "not-read.mp4", tmp_path, "--prompt", "a dog", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_cli_refuses_replace_with_different_word_counts_before_inverting(clip_file, tmp_path, capsys):
    assert (
        main(fatezero_args(clip_file, tmp_path, "--prompt", "a big dog", "--word-map", "replace", "--frames", "2")) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after "loading the model..."
    assert err.startswith("error: ") and "--word-map replace" in err
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").glob("**/*.safetensors"))


# -- the memory benchmark (tiny configuration) -----------------------------------------------------

def test_memory_benchmark_writes_rows_table_and_plot(tmp_path, capsys, monkeypatch):
    from benchmarks.fatezero import main as bench

    monkeypatch.setattr("benchmarks.fatezero.fix_mmap_threshold", lambda: False)  # leave this process's malloc alone
    out = tmp_path / "bench.json"
    bench(["--unet", "tiny", "--frames", "1,2", "--steps", "1", "--size", "64", "--modes", "ddim", "--json", str(out),
           "--md", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png")])
    doc = json.loads(out.read_text())
    assert [(r["frames"], r["steps"]) for r in doc["rows"]] == [(1, 1), (2, 1)]
    for r in doc["rows"]:
        assert r["bench"] == "fatezero-memory" and r["mode"] == "ddim" and r["size"] == 64
        assert r["allocator"] == "allocator default"
        assert r["seconds"] > 0 and r["peak_mb"] >= 0 and (r["device"], r["dtype"]) == ("cpu", "float32")
    assert "100 GB" in (tmp_path / "bench.md").read_text() and "| ddim | 2 | 64 | 1 |" in capsys.readouterr().out
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench(["--report", "--json", str(out), "--md", str(tmp_path / "again.md")])  # re-rendered, nothing run
    assert (tmp_path / "again.md").read_text() == (tmp_path / "bench.md").read_text()
