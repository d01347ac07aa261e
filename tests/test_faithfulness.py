"""Editing as the STEM authors ran it (`TokenFlow-Edit/` of their release), checked against independent
float64 references written here: FreeU's rule and filter, the keyframe attention of each group, TokenFlow
propagation frame by frame, and the whole edit against a re-implementation of the release's pipeline.

The references are written from the release's behaviour, one frame and one head at a time, and share
no code with `stem.editing` beyond the UNet itself.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from stem.attention import AttentionState, InflatedAttnProcessor, StemAttnProcessor
from stem.editing import FreeUSettings, TokenFlowSettings
from stem.editing.freeu import fourier_filter, freeu_installed, freeu_resnets
from stem.editing.tokenflow import KEYFRAMES, EditState, TokenFlowAttnProcessor, choose_keyframes, edit_latents
from stem.engine import InversionSettings
from stem.errors import StemError
from stem.inversion import ddim_schedule, encode_prompt
from stem.models import TINY_MODEL, build_tiny

from test_editing import synthetic_video

SOURCE_PROMPT, TARGET_PROMPT = "a cat", "a dog"
NEGATIVE_PROMPT = "ugly, blurry"


@pytest.fixture(scope="module")
def parts64():
    """tiny-random in float64 (the same weights as `tiny_parts`)."""
    return build_tiny(device="cpu", dtype=torch.float64)


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# -- FreeU ------------------------------------------------------------------------------------------

def dft_filter(x: torch.Tensor, scale: float) -> torch.Tensor:
    """FreeU's skip filter from its definition, with DFT matrices: scale each channel's frequencies
    {0, -1 mod H} x {0, -1 mod W} (the 2x2 block at the centre of the fftshifted spectrum) by `scale`."""
    H, W = x.shape[-2:]

    def dft(n):  # (n, n): exp(-2 pi i k m / n)
        k = torch.arange(n, dtype=torch.float64)
        return torch.exp(-2j * math.pi * torch.outer(k, k) / n)

    spectrum = dft(H) @ x.to(torch.complex128) @ dft(W).T
    mask = torch.ones(H, W, dtype=torch.complex128)
    for row in {0, H - 1}:
        for col in {0, W - 1}:
            mask[row, col] = scale
    inverse_h, inverse_w = dft(H).conj() / H, dft(W).conj() / W
    return (inverse_h @ (spectrum * mask) @ inverse_w.T).real


@pytest.mark.parametrize("height, width", [(8, 8), (5, 7), (2, 3), (1, 1), (4, 1)])
def test_fourier_filter_matches_the_direct_dft_formula(height, width):
    x = torch.randn(
        2, 3, height, width, generator=torch.Generator().manual_seed(height * 10 + width), dtype=torch.float64
    )
    for scale in (0.2, 0.9, 1.0):
        assert torch.allclose(fourier_filter(x, scale), dft_filter(x, scale), rtol=0, atol=1e-12), scale
    half = fourier_filter(x.half(), 0.2)  # half precision in, float32 FFT inside, half precision out
    assert half.dtype == torch.float16
    assert torch.allclose(half.double(), dft_filter(x.half().double(), 0.2), atol=2e-2)


# SD 1.x/2.x's up-block resnets and the width of the hidden states arriving at each, as diffusers builds
# the UNet; FreeU rewrites those of width 1280 (b1, s1) and 640 (b2, s2), not up_blocks.3.resnets.1-2.
# (diffusers' `enable_freeu` would instead rewrite all of up_blocks.0 with b1 and all of up_blocks.1 with b2.)
SD_ARRIVING_WIDTHS = {
    "up_blocks.0.resnets.0": 1280, "up_blocks.0.resnets.1": 1280, "up_blocks.0.resnets.2": 1280,
    "up_blocks.1.resnets.0": 1280, "up_blocks.1.resnets.1": 1280, "up_blocks.1.resnets.2": 1280,
    "up_blocks.2.resnets.0": 1280, "up_blocks.2.resnets.1": 640, "up_blocks.2.resnets.2": 640,
    "up_blocks.3.resnets.0": 640, "up_blocks.3.resnets.1": 320, "up_blocks.3.resnets.2": 320,
}
FREEU_B1_RESNETS = {name for name, width in SD_ARRIVING_WIDTHS.items() if width == 1280}
FREEU_B2_RESNETS = {name for name, width in SD_ARRIVING_WIDTHS.items() if width == 640}


def sd_shaped_unet(scale: int = 20, **kw) -> UNet2DConditionModel:
    """SD 1.5's UNet layout (block types, 2 layers per block, widths 320/640/1280/1280) at 1/scale of the width."""
    return UNet2DConditionModel(
        block_out_channels=tuple(c // scale for c in (320, 640, 1280, 1280)),
        layers_per_block=2,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=8,
        **kw,
    )


def test_freeu_chooses_the_resnets_by_the_width_of_their_incoming_hidden_states():
    with torch.device("meta"):  # SD 1.5's own widths, no weights
        sd15 = sd_shaped_unet(scale=1)
    chosen = freeu_resnets(sd15)
    assert {name for name, (_, rule) in chosen.items() if rule == 1} == FREEU_B1_RESNETS
    assert {name for name, (_, rule) in chosen.items() if rule == 2} == FREEU_B2_RESNETS
    assert all(width == SD_ARRIVING_WIDTHS[name] for name, (width, _) in chosen.items())


def test_freeu_rewrites_exactly_the_resnets_of_the_two_widths():
    """On a small UNet of SD 1.5's layout: the input of every up-block resnet before and after FreeU's hook."""
    torch.manual_seed(0)
    unet = sd_shaped_unet().double().eval()
    width = {name: w // 20 for name, w in SD_ARRIVING_WIDTHS.items()}
    settings = FreeUSettings(b1=1.2, b2=1.4, s1=0.9, s2=0.2)
    before, after = {}, {}

    def recorder(store, name):
        def hook(_module, args):
            store[name] = args[0].clone()
        return hook

    handles = [
        unet.get_submodule(name).register_forward_pre_hook(recorder(before, name), prepend=True) for name in width
    ]
    x, text = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    try:
        with torch.no_grad(), freeu_installed(unet, settings) as hooked:
            handles += [unet.get_submodule(name).register_forward_pre_hook(recorder(after, name)) for name in width]
            unet(x, 10, encoder_hidden_states=text)
    finally:
        for handle in handles:
            handle.remove()
    assert set(hooked) == FREEU_B1_RESNETS | FREEU_B2_RESNETS
    changed = {name for name in width if not torch.equal(before[name], after[name])}
    assert changed == FREEU_B1_RESNETS | FREEU_B2_RESNETS
    for name in changed:
        b, s = (settings.b1, settings.s1) if name in FREEU_B1_RESNETS else (settings.b2, settings.s2)
        w, x0, x1 = width[name], before[name], after[name]
        assert torch.allclose(x1[:, :w // 2], x0[:, :w // 2] * b, rtol=1e-15, atol=0), name
        assert torch.equal(x1[:, w // 2:w], x0[:, w // 2:w]), name
        assert torch.allclose(x1[:, w:], dft_filter(x0[:, w:], s), rtol=0, atol=1e-12), name


def test_freeu_off_leaves_the_unet_exactly_as_it_was(tiny_parts):
    unet = tiny_parts.unet
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)

    def run():
        with torch.no_grad():
            return unet(x, 500, encoder_hidden_states=text).sample

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())

    plain, count = run(), hooks()
    with freeu_installed(unet, FreeUSettings(enabled=False)) as hooked:
        assert hooked == {} and hooks() == count
        assert torch.equal(run(), plain)
    with freeu_installed(unet, FreeUSettings()) as hooked:
        assert len(hooked) == 8 and hooks() == count + 8  # every up-block resnet of tiny-random (widths 64 and 32)
        assert not torch.allclose(run(), plain, atol=1e-3)
    assert hooks() == count and torch.equal(run(), plain)


@pytest.mark.parametrize(
    "field, value", [("b1", -1.0), ("b2", float("nan")), ("s1", float("inf")), ("s2", "0.2"), ("b1", True)]
)
def test_bad_freeu_constants_are_refused(field, value):
    with pytest.raises(StemError) as err:
        TokenFlowSettings("a dog", freeu=FreeUSettings(**{field: value})).validate()
    # the library words it (the CLI prefixes --freeu-b1, the app its label): one sentence naming the constant
    assert f"FreeU's {field} must be" in str(err.value) and str(err.value).endswith(".")


# -- keyframe attention, group by group --------------------------------------------------------------

def reference_keyframe_attention(attn, hidden: torch.Tensor, inject: bool) -> torch.Tensor:
    """(3n, L, C) -> (3n, L, C): the release's pass 1, one frame and one head at a time. The source group
    attends per frame; each edit-group frame attends to every frame of its group (queries and keys from
    the source group when `inject`)."""
    G, (B, L, C) = 3, hidden.shape
    n, heads = B // G, attn.heads
    d = C // heads
    q, k, v = (f(hidden).view(G, n, L, C) for f in (attn.to_q, attn.to_k, attn.to_v))
    if inject:
        q, k = torch.stack([q[0]] * G), torch.stack([k[0]] * G)
    out = torch.empty(G, n, L, C, dtype=hidden.dtype)
    for g in range(G):
        for f in range(n):
            keys, values = (k[g, f], v[g, f]) if g == 0 else (k[g].reshape(n * L, C), v[g].reshape(n * L, C))
            for j in range(heads):
                h = slice(j * d, (j + 1) * d)
                weights = torch.softmax(q[g, f, :, h] @ keys[:, h].T * attn.scale, dim=-1)
                out[g, f, :, h] = weights @ values[:, h]
    return attn.to_out[1](attn.to_out[0](out)).reshape(B, L, C)


@pytest.mark.parametrize("inject", [False, True])
def test_keyframe_attention_source_group_per_frame_edit_groups_extended(parts64, inject):
    name = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"
    attn = parts64.unet.get_submodule(name)
    M, L = 3, 16
    hidden = torch.randn(
        3 * M, L, attn.to_q.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    state = EditState(attention=AttentionState(num_groups=3))
    state.phase, state.inject_qk = KEYFRAMES, inject
    processor = TokenFlowAttnProcessor(state, name, InflatedAttnProcessor(state.edit_groups, name), injects_qk=True)
    with torch.no_grad():
        out = processor(attn, hidden)
        assert torch.allclose(out, reference_keyframe_attention(attn, hidden, inject), rtol=0, atol=1e-12)
        per_frame = AttnProcessor2_0()(attn, hidden[:M])  # diffusers' own processor on the source keyframes alone
        assert torch.allclose(out[:M], per_frame, rtol=0, atol=1e-12)
        # STEM keyframe attention for the edit groups leaves the source group per frame too
        stem = TokenFlowAttnProcessor(state, name, StemAttnProcessor(state.edit_groups, name), injects_qk=True)
        assert torch.allclose(stem(attn, hidden)[:M], per_frame, rtol=0, atol=1e-12)


# -- propagation, frame by frame ---------------------------------------------------------------------

def reference_frame_output(frame, batch_size, features, keyframe_features, keyframe_outputs, keyframes, propagation):
    """(G, L, C): one frame's self-attention output gathered from the keyframes' (the rules in words:
    `stem.editing.tokenflow`'s docstring). features (L, C) of the frame; keyframe_* (M, L, C), (G, M, L, C)."""
    b, M = frame // batch_size, len(keyframes)

    def gathered(m):  # keyframe m's outputs at each token's most cosine-similar token of keyframe m
        similarity = F.normalize(features, dim=-1) @ F.normalize(keyframe_features[m], dim=-1).T
        return keyframe_outputs[:, m, similarity.argmax(dim=-1)]

    if propagation == "previous":
        if b == 0:
            return gathered(0)
        d_own = abs(frame - (b * batch_size + batch_size // 2))
        d_previous = abs(frame - ((b - 1) * batch_size + batch_size // 2))
        w = 1 / (1 + math.exp(-d_previous / (d_own + d_previous)))
        return w * gathered(b) + (1 - w) * gathered(b - 1)
    if M == 1:
        return gathered(0)
    other = min((m for m in (b - 1, b + 1) if 0 <= m < M), key=lambda m: (abs(frame - keyframes[m]), m))
    d_own, d_other = abs(frame - keyframes[b]), abs(frame - keyframes[other])
    w = d_other / (d_own + d_other)
    return w * gathered(b) + (1 - w) * gathered(other)


def given_keyframes(per_step):
    """A keyframe chooser that returns the listed keyframes, step T first."""
    steps = iter(per_step)
    return lambda *_: torch.tensor(next(steps))


def edit_inputs(parts, num_frames, num_steps, seed=0):
    """A random trajectory, the schedule and the three prompts' embeddings, in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    trajectory = torch.randn(num_steps + 1, num_frames, 4, 8, 8, generator=g, dtype=torch.float64).to(parts.dtype)
    timesteps, alphas = ddim_schedule(parts.scheduler, num_steps)
    with torch.no_grad():
        text = torch.cat(
            [
                encode_prompt(parts.tokenizer, parts.text_encoder, p)
                for p in (SOURCE_PROMPT, NEGATIVE_PROMPT, TARGET_PROMPT)
            ]
        )
    return trajectory, timesteps, alphas, text


@pytest.mark.parametrize("num_frames, propagation", [(12, "previous"), (12, "nearest"), (10, "previous")])
def test_propagation_matches_a_per_frame_reference(parts64, num_frames, propagation):
    """N = 12 (and a short last batch: 10), batches of 4, given keyframes, two steps, every layer."""
    batch_size = 4
    keyframes = [[2, 4, 11], [0, 7, 9]] if num_frames == 12 else [[1, 6, 9], [3, 4, 8]]
    trajectory, timesteps, alphas, text = edit_inputs(parts64, num_frames, 2)
    stored, checked = {}, []

    def trace(info):
        event, layer, step = info["phase"], info["layer"], info["step"]
        tensors = {k: v for k, v in info.items() if torch.is_tensor(v)}
        if event == "keyframes":
            stored[layer, step] = (tensors["features"].clone(), tensors["outputs"].clone())
        elif event == "propagate":
            keyframe_features, keyframe_outputs = stored[layer, step]
            kf = keyframes[len(timesteps) - step]
            for i, frame in enumerate(tensors["frames"].tolist()):
                expected = reference_frame_output(frame, batch_size, tensors["features"][i], keyframe_features,
                                                  keyframe_outputs, kf, propagation)
                checked.append((frame, layer))
                assert torch.allclose(tensors["outputs"][:, i], expected, rtol=0, atol=1e-12), (layer, step, frame)

    edit = TokenFlowSettings(
        TARGET_PROMPT, negative_prompt=NEGATIVE_PROMPT, batch_size=batch_size, propagation=propagation
    )
    with torch.no_grad():
        _, details = edit_latents(parts64, trajectory, timesteps, alphas, text, edit, AttentionState(num_groups=3),
                                  trace=trace, keyframe_chooser=given_keyframes(keyframes))
    assert details["keyframes"] == keyframes
    layers = sum(1 for name in parts64.unet.attn_processors if name.endswith("attn1.processor"))
    assert len(checked) == 2 * num_frames * layers


# -- the whole edit against a re-implementation of the release's pipeline ----------------------------

class ReleaseAttention:
    """The release's self-attention while editing (one layer): pass 1 per frame / extended per group,
    pass 2 per frame from the stored keyframes (the previous batch's rule)."""

    def __init__(self, run, name, injects):
        self.run, self.name, self.injects = run, name, injects

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        run, G = self.run, 3
        B, L, C = hidden_states.shape
        if run["phase"] == "keyframes":
            out = reference_keyframe_attention(attn, hidden_states, self.injects and run["inject_qk"])
            run["stored"][self.name] = (hidden_states[:B // G], out.view(G, B // G, L, C))
            return out
        keyframe_features, keyframe_outputs = run["stored"][self.name]
        features = hidden_states[:B // G]
        out = torch.stack([reference_frame_output(frame, run["batch_size"], features[i], keyframe_features,
                                                  keyframe_outputs, run["keyframes"], "previous")
                           for i, frame in enumerate(run["frames"])], dim=1)  # (G, n, L, C)
        return out.reshape(B, L, C)


def release_freeu_hooks(unet, settings):
    """FreeU as the original code writes it, as hooks: each up block's skip tensors are taken from its
    call; each resnet splits its input at the skip it is about to consume and checks the hidden width."""
    widest, second = max(unet.config.block_out_channels), unet.config.block_out_channels[1]
    pending, handles = [], []

    def block_hook(_block, args, kwargs):
        pending[:] = list(kwargs["res_hidden_states_tuple"])

    def resnet_hook(_resnet, args):
        skip = pending.pop()
        x = args[0]
        hidden = x[:, :x.shape[1] - skip.shape[1]].clone()
        assert torch.equal(x[:, hidden.shape[1]:], skip)
        c = hidden.shape[1]
        if c == widest:
            hidden[:, :c // 2] = hidden[:, :c // 2] * settings.b1
            skip = dft_filter(skip, settings.s1)
        elif c == second:
            hidden[:, :c // 2] = hidden[:, :c // 2] * settings.b2
            skip = dft_filter(skip, settings.s2)
        return (torch.cat([hidden, skip], dim=1), *args[1:])

    for block in unet.up_blocks:
        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        handles += [resnet.register_forward_pre_hook(resnet_hook) for resnet in block.resnets]
    return handles


def release_edit(parts, trajectory, timesteps, alphas, text, keyframes, batch_size=4, guidance=7.5,
                 pnp_attn=0.5, pnp_conv=0.8, freeu=True):
    """The release's TokenFlow PnP edit in float64 (its `batched_denoise_step` loop), from x_T to x_0."""
    unet, T = parts.unet, len(timesteps)
    N = trajectory.shape[1]
    run = {"batch_size": batch_size, "stored": {}}
    decoder = [n for n in unet.attn_processors if n.startswith("up_blocks.") and n.endswith("attn1.processor")]
    injected = set(decoder) - {"up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"}  # decoder layers 4-11
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({**previous, **{n: ReleaseAttention(run, n, n in injected)
                                            for n in previous if n.endswith("attn1.processor")}})
    resnet = unet.get_submodule("up_blocks.1.resnets.1")

    def conv_injection(module, args, output):  # the edit groups' residual branch := the source group's
        if not run["inject_conv"]:
            return output
        shortcut = args[0] if module.conv_shortcut is None else module.conv_shortcut(args[0])
        branch = (output * module.output_scale_factor - shortcut).view(3, -1, *output.shape[1:])
        branch = torch.stack([branch[0]] * 3).reshape(output.shape)
        return (shortcut + branch) / module.output_scale_factor

    handles = [resnet.register_forward_hook(conv_injection)]
    if freeu:
        handles += release_freeu_hooks(unet, FreeUSettings())
    x = trajectory[-1].double()
    try:
        with torch.no_grad():
            for s, level in enumerate(range(T, 0, -1)):  # s: sampling steps taken
                t, kf = timesteps[level - 1], keyframes[s]
                run["inject_qk"], run["inject_conv"] = s < int(T * pnp_attn), s < int(T * pnp_conv)
                source = trajectory[level].double()

                def unet_call(frames):
                    latents = torch.cat([source[frames], x[frames], x[frames]]).to(parts.dtype)
                    return unet(
                        latents, t, encoder_hidden_states=text.repeat_interleave(len(frames), dim=0)
                    ).sample.double()

                run["phase"], run["keyframes"] = "keyframes", kf
                unet_call(kf)
                run["phase"] = "propagate"
                eps = torch.empty_like(x)
                for start in range(0, N, batch_size):
                    frames = list(range(start, min(N, start + batch_size)))
                    run["frames"] = frames
                    _, uncond, cond = unet_call(frames).chunk(3)
                    eps[frames] = uncond + guidance * (cond - uncond)
                a, a_next = alphas[level].item(), alphas[level - 1].item()
                x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
                x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    finally:
        unet.set_attn_processor(previous)
        for handle in handles:
            handle.remove()
    return x


@pytest.fixture(scope="module")
def inverted_clip(tiny_parts, tmp_path_factory):
    """A 12-frame clip's STEM trajectory, 10 steps (tiny-random, float32)."""
    from stem.cache import LatentCache
    from stem.engine import Engine

    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path_factory.mktemp("cache"))).use_parts(tiny_parts)
    settings = InversionSettings(
        model=TINY_MODEL, method="stem", num_bases=8, num_iters=2, num_steps=10, size=64, prompt=SOURCE_PROMPT
    )
    return engine.invert(synthetic_video(12), settings).trajectory


def test_edit_matches_a_reimplementation_of_the_release(parts64, inverted_clip):
    """The README's "Faithfulness" figure: our default edit against the release's pipeline re-implemented
    above; float64 UNet, the same 10-step STEM trajectory of a 12-frame clip, prompts and keyframes.
    Measured: max relative difference 3.3e-7 (our denoising loop keeps the latents in float32)."""
    trajectory = inverted_clip.double()
    _, timesteps, alphas, text = edit_inputs(parts64, 12, 10)
    generator = torch.Generator().manual_seed(0)
    keyframes = [choose_keyframes(12, 4, generator).tolist() for _ in range(10)]
    edit = TokenFlowSettings(TARGET_PROMPT, negative_prompt=NEGATIVE_PROMPT, batch_size=4)
    with torch.no_grad():
        ours, _ = edit_latents(parts64, trajectory, timesteps, alphas, text, edit, AttentionState(num_groups=3),
                               keyframe_chooser=given_keyframes(keyframes))
    reference = release_edit(parts64, trajectory, timesteps, alphas, text, keyframes)
    difference = max_relative_difference(ours, reference)
    print(f"max relative difference to the release's pipeline: {difference:.2e}")
    assert difference < 2e-6


def test_edit_without_freeu_matches_the_release_without_freeu(parts64):
    """--no-freeu is the release's pipeline with FreeU left out (a random trajectory, 8 frames, 3 steps)."""
    trajectory, timesteps, alphas, text = edit_inputs(parts64, 8, 3)
    keyframes = [[1, 6], [3, 4], [0, 7]]
    edit = TokenFlowSettings(
        TARGET_PROMPT, negative_prompt=NEGATIVE_PROMPT, batch_size=4, freeu=FreeUSettings(enabled=False)
    )
    with torch.no_grad():
        ours, _ = edit_latents(parts64, trajectory, timesteps, alphas, text, edit, AttentionState(num_groups=3),
                               keyframe_chooser=given_keyframes(keyframes))
    without = release_edit(parts64, trajectory, timesteps, alphas, text, keyframes, freeu=False)
    with_freeu = release_edit(parts64, trajectory, timesteps, alphas, text, keyframes)
    assert max_relative_difference(ours, without) < 2e-6
    assert max_relative_difference(ours, with_freeu) > 1e-2


def test_hooks_installed_registers_by_name_and_removes_on_exit(tiny_parts):
    from stem.hooks import hooks_installed

    unet = tiny_parts.unet
    conv = unet.get_submodule("up_blocks.1.resnets.1.conv2")
    seen = []
    with hooks_installed(unet, {"up_blocks.1.resnets.1.conv2": lambda m, args, out: seen.append(out.shape)}) as hooked:
        assert hooked == {"up_blocks.1.resnets.1.conv2": conv} and len(conv._forward_hooks) == 1
        with torch.no_grad():
            unet(torch.zeros(1, 4, 8, 8), 1, encoder_hidden_states=torch.zeros(1, 77, 32))
    assert len(seen) == 1 and not conv._forward_hooks
    with pytest.raises(AttributeError):  # an unknown name: nothing is registered, not even the known one
        with hooks_installed(unet, {"up_blocks.1.resnets.1.conv2": print, "up_blocks.9": print}, pre=True):
            pass
    assert not conv._forward_pre_hooks


def test_freeu_runs_while_editing_only(engine, monkeypatch):
    """FreeU's filter runs in the edit's UNet calls, never in the inversion or the reconstruction."""
    import stem.editing.freeu as freeu
    from stem.editing import edit_video

    phase, calls = {"now": None}, {}
    filter_ = freeu.fourier_filter

    def counted(*args, **kwargs):
        calls[phase["now"]] = calls.get(phase["now"], 0) + 1
        return filter_(*args, **kwargs)

    monkeypatch.setattr(freeu, "fourier_filter", counted)
    settings = InversionSettings(
        model=TINY_MODEL, method="stem", num_bases=4, num_iters=1, num_steps=2, size=64, prompt=SOURCE_PROMPT
    )
    edit_video(engine, synthetic_video(3), settings, TokenFlowSettings(TARGET_PROMPT, batch_size=2),
               callback=lambda info: phase.update(now=info["phase"]))
    assert set(calls) == {"editing"}  # the progress names the phase: loading ... inverting, reconstructing, editing
