"""The self-attention processors: equivalence with diffusers, whole-video context, bases span."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stem.attention import (
    AttentionState, FrameAttnProcessor, InflatedAttnProcessor, StemAttnProcessor, attention_mode,
)
from stem.inversion import call_unet


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=2, dim_head=16).eval()


def frames(n=3, tokens=20, channels=32, seed=0):
    return torch.randn(n, tokens, channels, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_ddim_processor_equals_diffusers_default(attn):
    x = frames()
    attn.set_processor(AttnProcessor2_0())
    expected = attn(x)
    attn.set_processor(FrameAttnProcessor(AttentionState(method="ddim")))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_ddim_mode_leaves_the_unet_output_unchanged(tiny_parts):
    unet = tiny_parts.unet
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    expected = unet(x, 10, encoder_hidden_states=text).sample
    with attention_mode(unet, AttentionState(method="ddim")) as installed:
        assert len(installed) == 10 and all(name.endswith("attn1.processor") for name in installed)
        out = unet(x, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method,sees_other_frames", [("ddim", False), ("inflated", True), ("stem", True)])
def test_a_frame_sees_the_other_frames_only_in_video_modes(attn, method, sees_other_frames):
    cls = {"ddim": FrameAttnProcessor, "inflated": InflatedAttnProcessor, "stem": StemAttnProcessor}[method]
    attn.set_processor(cls(AttentionState(method=method, num_bases=4, num_iters=3)))
    x = frames()
    changed = x.clone()
    changed[2] += 3.0 * torch.randn_like(changed[2])
    a, b = attn(x), attn(changed)
    assert (not torch.allclose(a[0], b[0], atol=1e-5)) == sees_other_frames
    assert not torch.allclose(a[2], b[2], atol=1e-5)


@torch.no_grad()
def test_inflated_is_attention_over_all_tokens_of_the_video(attn):
    x = frames(n=3, tokens=10)
    attn.set_processor(InflatedAttnProcessor(AttentionState(method="inflated")))
    out = attn(x)
    # Reference: every frame's queries against the keys/values of the concatenated video.
    q, k, v = attn.to_q(x), attn.to_k(x.reshape(1, 30, 32)), attn.to_v(x.reshape(1, 30, 32))
    split = lambda t: t.view(t.shape[0], -1, 2, 16).transpose(1, 2)  # noqa: E731
    ref = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 4.0, dim=-1) @ split(v)
    ref = attn.to_out[0](ref.transpose(1, 2).reshape(3, 10, 32))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_stem_outputs_lie_in_the_span_of_k_value_bases_per_head(attn):
    K = 3
    proc = StemAttnProcessor(AttentionState(method="stem", num_bases=K, num_iters=4))
    x = frames(n=4, tokens=25)
    q, k, v = (t(x).view(4, 25, 2, 16).transpose(1, 2) for t in (attn.to_q, attn.to_k, attn.to_v))
    out = proc.attend(attn, q, k, v)  # (N, heads, L, d)
    for head in range(2):
        singular = torch.linalg.svdvals(out[:, head].reshape(-1, 16))
        assert singular[K:].max() < 1e-4 * singular[0], singular  # rank K, not 16
    # and dense per-frame attention is not low-rank, so the check can fail
    dense = FrameAttnProcessor().attend(attn, q, k, v)
    assert torch.linalg.svdvals(dense[:, 0].reshape(-1, 16))[K] > 1e-2


@torch.no_grad()
def test_groups_do_not_see_each_other(attn):
    state = AttentionState(method="stem", num_bases=4, num_iters=2, num_groups=2)
    attn.set_processor(StemAttnProcessor(state))
    x = frames(n=6)  # two groups of three frames
    changed = x.clone()
    changed[4] += 5.0
    a, b = attn(x), attn(changed)
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3], b[3], atol=1e-5)


@torch.no_grad()
def test_stem_is_deterministic_for_a_seed_and_changes_with_it(attn):
    x = frames()
    def run(seed):
        attn.set_processor(StemAttnProcessor(AttentionState(method="stem", num_bases=4, num_iters=2, seed=seed)))
        return attn(x)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@torch.no_grad()
@pytest.mark.parametrize("method", ["stem", "inflated"])
def test_chunked_unet_call_equals_the_whole_video_call(tiny_parts, method):
    unet = tiny_parts.unet
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(5, 77, 32, generator=torch.Generator().manual_seed(1))
    state = AttentionState(method=method, num_bases=6, num_iters=3)
    with attention_mode(unet, state):
        whole = call_unet(unet, x, 10, text)
        for chunk in (1, 2, 3):
            torch.testing.assert_close(call_unet(unet, x, 10, text, chunk_size=chunk), whole, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_one_em_per_layer_per_call_whatever_the_chunking(tiny_parts):
    unet = tiny_parts.unet
    x = torch.randn(4, 4, 8, 8)
    text = torch.randn(4, 77, 32)
    for chunk in (None, 1, 3):
        state = AttentionState(method="stem", num_bases=4, num_iters=1)
        with attention_mode(unet, state):
            call_unet(unet, x, 10, text, chunk_size=chunk)
        assert state.em_calls == 10


def test_processors_are_restored_even_after_an_error(tiny_parts):
    unet = tiny_parts.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError):
        with attention_mode(unet, AttentionState(method="stem")):
            assert isinstance(
                unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"], StemAttnProcessor
            )
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_chunk_errors_surface_in_the_caller(tiny_parts):
    unet = tiny_parts.unet
    with attention_mode(unet, AttentionState(method="stem", num_bases=4, num_iters=1)):
        with pytest.raises(RuntimeError):
            call_unet(unet, torch.randn(4, 4, 8, 8), 10, torch.randn(4, 77, 31), chunk_size=2)  # wrong text width
