"""Text-guided editing (TokenFlow plug-and-play on the inverted video), on the tiny random model.

Clips are made in code: a random texture sliding sideways, so no two tokens are alike (nearest-neighbour
matching has no ties) and the warp error has real motion to follow.
"""

import json
import math

import numpy as np
import pytest
import torch

from stem.cache import LatentCache
from stem.cli import cli_message, main
from stem.editing import DEFAULT_NEGATIVE_PROMPT, FreeUSettings, edit_metrics, edit_video
from stem.editing.common import COND, NUM_GROUPS, SOURCE, UNCOND
from stem.editing.tokenflow import (
    CONV_INJECTION_LAYER, EditSettings, choose_keyframes, edit_latents, keyframe_neighbours, nearest_tokens,
    qk_injection_layers,
)
from stem.engine import Engine, InversionSettings
from stem.errors import StemError
from stem.inversion import ddim_schedule, encode_prompt
from stem.metrics import psnr
from stem.models import TINY_MODEL
from stem.video import Video, read_video, write_video

SOURCE_PROMPT = "a cat"


def textured_clip(num_frames: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8: a window sliding 2 px per frame over a random texture."""
    texture = np.random.default_rng(seed).integers(0, 256, (size, size + 2 * num_frames, 3), dtype=np.uint8)
    return np.stack([texture[:, 2 * t:2 * t + size] for t in range(num_frames)])


def synthetic_video(num_frames: int, seed: int = 0) -> Video:
    return Video(textured_clip(num_frames, seed=seed), fps=12.0, source="synthetic")


def inversion(**overrides) -> InversionSettings:
    fields = dict(model=TINY_MODEL, method="stem", num_bases=8, num_iters=2, num_steps=3, size=64, prompt=SOURCE_PROMPT)
    return InversionSettings(**{**fields, **overrides})


# `engine` (tiny-random, a cache in tmp_path), `tiny_parts` and `count_calls` come from conftest.py.


@pytest.fixture
def parts(tiny_parts):
    return tiny_parts


# -- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="   "), "prompt"),
        (dict(pnp_attn=1.5), "--pnp-attn"),
        (dict(pnp_attn=-0.1), "--pnp-attn"),
        (dict(pnp_conv=float("nan")), "--pnp-conv"),
        (dict(batch_size=0), "--batch-size"),
        (dict(guidance=0.5), "--guidance"),
        (dict(guidance=float("inf")), "--guidance"),
        (dict(attention="full"), "edit attention"),
        (dict(seed=-1), "--seed"),
        (dict(propagation="far"), "--propagation"),
        (dict(freeu=FreeUSettings(s1=-0.5)), "--freeu-s1"),
        (dict(negative_prompt=None), "--negative-prompt"),
    ],
)
def test_bad_settings_are_refused_with_one_sentence(overrides, words):
    with pytest.raises(StemError) as err:
        EditSettings(**{"prompt": "a dog", **overrides}).validate()
    assert "--" not in str(err.value)  # the core names settings in words; the CLI puts the flag first
    message = cli_message(err.value)
    assert words in message and "\n" not in message and message.endswith(".")


def test_defaults_are_the_release_configs():
    edit = EditSettings("a dog")
    assert edit.negative_prompt == "ugly, blurry, low res, unrealistic, unaesthetic"
    assert (edit.guidance, edit.pnp_attn, edit.pnp_conv, edit.batch_size) == (7.5, 0.5, 0.8, 8)
    assert edit.propagation == "previous" and edit.attention == "extended"
    assert edit.freeu == FreeUSettings(enabled=True, b1=1.2, b2=1.4, s1=0.9, s2=0.2)


def test_good_settings_pass_and_are_hashable():
    edit = EditSettings("a dog", pnp_attn=0, pnp_conv=1, guidance=1, batch_size=1, attention="stem")
    assert edit.validate() is edit and hash(edit) == hash(EditSettings(**vars(edit)))
    # int(T * fraction) as in the release, so 50 * 0.58 == 28.999... injects 28 steps
    assert EditSettings("a dog", pnp_attn=0.58, pnp_conv=0.8).num_injected_steps(50) == (28, 40)
    assert EditSettings("a dog").num_injected_steps(50) == (25, 40)


# -- helpers ---------------------------------------------------------------------------------------

def test_keyframes_one_per_batch_including_a_short_last_batch():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        keyframes = choose_keyframes(13, 5, g)
        assert keyframes.tolist() == sorted(keyframes.tolist()) and len(keyframes) == 3
        assert all(5 * j <= k < min(13, 5 * j + 5) for j, k in enumerate(keyframes.tolist()))


def test_previous_batch_neighbours_blend_by_a_sigmoid_of_the_distances_to_batch_centres():
    """The release's rule: batch b blends its keyframe with batch b-1's; centres b*n + n//2, nominal n."""
    keyframes = torch.tensor([1, 6, 9])  # batches of 4: 0-3, 4-7, 8-9 (short); centres 2, 6, 10
    own, other, weight = keyframe_neighbours(torch.arange(10), keyframes, 4, "previous")
    assert own.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert other.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert weight[:4].tolist() == [1, 1, 1, 1]  # batch 0: its own keyframe only

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = {4: sigmoid(2 / (2 + 2)), 6: sigmoid(4 / (0 + 4)), 7: sigmoid(5 / (1 + 5)), 8: sigmoid(2 / (2 + 2)),
                9: sigmoid(3 / (1 + 3))}  # frame: sigmoid(d_previous / (d_own + d_previous))
    for frame, w in expected.items():
        assert weight[frame].item() == pytest.approx(w, rel=1e-12), frame
    assert weight[6] < 1  # a keyframe is blended too
    assert keyframe_neighbours(torch.arange(3), torch.tensor([2]), 8)[2].tolist() == [1, 1, 1]


def test_nearest_neighbours_are_the_two_nearest_keyframes_blended_by_distance():
    keyframes = torch.tensor([1, 6, 10])  # batches of 4: 0-3, 4-7, 8-9 (short)
    own, other, weight = keyframe_neighbours(torch.arange(10), keyframes, 4, "nearest")
    assert own.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert other.tolist() == [1, 1, 1, 1, 0, 0, 2, 2, 1, 1]
    assert weight[1] == 1 and weight[6] == 1  # a keyframe takes its own output
    assert weight[4].item() == pytest.approx(3 / 5)  # frame 4: own keyframe 6 at distance 2, keyframe 1 at distance 3
    single = keyframe_neighbours(torch.arange(3), torch.tensor([2]), 8, "nearest")
    assert single[0].tolist() == single[1].tolist() == [0, 0, 0] and single[2].tolist() == [1, 1, 1]


def test_nearest_tokens_matches_a_dense_argmax_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 20, 8, generator=g), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(3, 16, 8, generator=g), dim=-1)
    dense = torch.einsum("nlc,nkc->nlk", queries, keys).argmax(-1)
    for chunk in (1, 7 * 3 * 16, 1 << 20):
        assert torch.equal(nearest_tokens(queries, keys, chunk), dense)


def test_qk_injection_skips_the_first_decoder_layer(parts):
    layers = qk_injection_layers(parts.unet.attn_processors)
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor" not in layers
    assert "up_blocks.3.attentions.1.transformer_blocks.0.attn1.processor" in layers
    assert all(name.startswith("up_blocks.") and name.endswith("attn1.processor") for name in layers)


# -- the edit --------------------------------------------------------------------------------------

def test_second_edit_is_an_inversion_cache_hit_with_no_inversion_unet_call(engine, parts, count_calls):
    video, settings = synthetic_video(5), inversion()
    edit = EditSettings("a dog", batch_size=2)
    steps, batches = settings.num_steps, math.ceil(5 / edit.batch_size)
    editing_calls = steps * (1 + batches)  # per step: one keyframe pass, then one call per batch
    first_phases, second_phases = [], []
    with count_calls(parts.unet) as counter:
        first = edit_video(engine, video, settings, edit, callback=lambda info: first_phases.append(info["phase"]))
    assert not first.inversion_cache_hit
    assert counter.calls == 2 * steps + editing_calls  # inversion + reconstruction + edit
    with count_calls(parts.unet) as counter:
        second = edit_video(engine, video, settings, EditSettings("a fox", batch_size=2),
                            callback=lambda info: second_phases.append(info["phase"]))
    assert second.inversion_cache_hit and second.inversion.cache_hit
    assert counter.calls == editing_calls
    assert {"inverting", "reconstructing", "editing", "decoding"} <= set(first_phases)
    assert "inverting" not in second_phases and {"editing", "decoding"} <= set(second_phases)
    assert torch.equal(first.inversion.trajectory, second.inversion.trajectory)
    assert not np.array_equal(first.frames, second.frames)
    assert first.seconds_editing > 0 and second.seconds_inversion < first.seconds_inversion


def test_same_seed_same_edit_and_another_seed_other_keyframes(engine):
    video, settings = synthetic_video(7), inversion()
    a = edit_video(engine, video, settings, EditSettings("a dog", batch_size=3, seed=0))
    b = edit_video(engine, video, settings, EditSettings("a dog", batch_size=3, seed=0))
    c = edit_video(engine, video, settings, EditSettings("a dog", batch_size=3, seed=1))
    assert np.array_equal(a.frames, b.frames) and a.keyframes == b.keyframes
    assert len(a.keyframes) == settings.num_steps and all(len(k) == 3 for k in a.keyframes)
    assert c.keyframes != a.keyframes and not np.array_equal(c.frames, a.frames)


def test_injection_fractions_change_the_edit(engine):
    video, settings = synthetic_video(5), inversion()

    def frames(**kw):
        return edit_video(engine, video, settings, EditSettings("a dog", batch_size=2, **kw)).frames

    none = frames(pnp_attn=0, pnp_conv=0)
    assert not np.array_equal(none, frames(pnp_attn=1, pnp_conv=0))
    assert not np.array_equal(none, frames(pnp_attn=0, pnp_conv=1))


def test_injected_queries_keys_and_conv_features_equal_the_source_groups(engine, parts):
    """Through the trace (queries/keys after injection) and, independently, through a hook on the resnet."""
    video, settings = synthetic_video(5), inversion(num_steps=4)
    result = engine.invert(video, settings)
    timesteps, alphas = ddim_schedule(parts.scheduler, settings.num_steps)
    text = torch.cat([encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in (SOURCE_PROMPT, "", "a dog")])
    edit = EditSettings("a dog", pnp_attn=0.5, pnp_conv=0.25, batch_size=2)  # Q/K: steps 4, 3; conv: step 4
    injected = "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    first_decoder = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    assert injected in qk_injection_layers(parts.unet.attn_processors)
    seen: dict = {}
    current = {"step": None}

    def trace(info):
        event, name, step = info["phase"], info["layer"], info["step"]
        tensors = {k: v for k, v in info.items() if torch.is_tensor(v)}
        current["step"] = step
        if event == "qk" and name in (injected, first_decoder):
            for what, x in tensors.items():
                seen.setdefault((name, what, step), []).append(x.reshape(NUM_GROUPS, -1).clone())

    resnet = parts.unet.get_submodule(CONV_INJECTION_LAYER)
    residuals: dict = {}

    def record(module, args, output):  # the residual branch, recomputed from the block's input and output
        x = args[0] if module.conv_shortcut is None else module.conv_shortcut(args[0])
        branch = output * module.output_scale_factor - x
        residuals.setdefault(current["step"], []).append(branch.reshape(NUM_GROUPS, -1).clone())

    handle = resnet.register_forward_hook(record)
    try:
        with torch.inference_mode():
            edit_latents(parts, result.trajectory, timesteps, alphas, text, edit,
                         engine.attention_state(settings, NUM_GROUPS), trace=trace)
    finally:
        handle.remove()

    def same(x):  # edit groups equal the source group
        return torch.allclose(x[UNCOND], x[SOURCE], atol=1e-6) and torch.allclose(x[COND], x[SOURCE], atol=1e-6)

    for step, injects in ((4, True), (3, True), (2, False), (1, False)):
        for what in ("query", "key"):
            assert [same(x) for x in seen[(injected, what, step)]] == [injects], (what, step)
        assert not any(same(x) for x in seen[(first_decoder, "query", step)])  # PnP leaves it alone
    for step, injects in ((4, True), (3, False), (2, False), (1, False)):
        assert len(residuals[step]) == 1 + 3  # keyframe pass + three batches of the 5 frames
        assert all(same(x) == injects for x in residuals[step]), step


@pytest.mark.parametrize("num_frames, batch_size", [(7, 3), (13, 8), (10, 4), (3, 8)])
def test_every_frame_is_kept_when_batches_do_not_divide(engine, num_frames, batch_size):
    video = synthetic_video(num_frames)
    result = edit_video(engine, video, inversion(num_steps=2), EditSettings("a dog", batch_size=batch_size))
    assert result.frames.shape == video.frames.shape and result.frames.dtype == np.uint8
    batches = math.ceil(num_frames / batch_size)
    for keyframes in result.keyframes:
        assert [k // batch_size for k in keyframes] == list(range(batches)) and max(keyframes) < num_frames


def test_one_frame_per_batch_without_injection_is_the_inflated_reconstruction(engine):
    """With batch size 1 every frame is a keyframe: extended attention over all keyframes is inflated
    attention, `nearest` propagation copies each frame's own output, and with guidance 1, the source
    prompt, no injection and no FreeU the edit group is the reconstruction (up to float rounding of the
    three-group batch). (The release's `previous` propagation blends every frame with the previous one.)"""
    video, settings = synthetic_video(5), inversion(method="inflated")
    result = edit_video(
        engine,
        video,
        settings,
        EditSettings(
            SOURCE_PROMPT,
            guidance=1,
            pnp_attn=0,
            pnp_conv=0,
            batch_size=1,
            propagation="nearest",
            freeu=FreeUSettings(enabled=False),
        ),
    )
    difference = np.abs(result.frames.astype(int) - result.inversion.reconstruction.astype(int))
    assert difference.max() <= 1 and difference.mean() < 1e-3


def test_source_prompt_with_full_injection_stays_close_to_the_reconstruction(engine):
    """Guidance 1, target prompt = source prompt, Q/K and conv injection at every step, FreeU off (FreeU
    changes the UNet on purpose: with it the same edit is 17.6 dB from the reconstruction).

    Not exact: (1) only the keyframes run self-attention (extended over the keyframes, where the
    inversion used STEM bases of all frames) and every other frame's attention output is propagated
    from them by nearest neighbours; (2) the source branch runs on the inversion's trajectory x_i while
    the edit runs on its own DDIM samples, which drift from x_i (DDIM inversion is not exactly inverted),
    and the injected queries/keys/conv features come from the source branch. The tiny random model
    magnifies (2) (its own reconstruction is only ~13 dB from the VAE round trip).
    Measured (7 frames, batch 3, 3 steps, CPU float32): PSNR to the reconstruction 30.3 dB; the same edit
    without injection 32.9 dB (injection pulls towards the source branch, i.e. towards the trajectory, not
    the reconstruction's own path); the prompt "a dog" at guidance 7.5 (FreeU off) 13.8 dB.
    """
    video, settings = synthetic_video(7), inversion()
    off = FreeUSettings(enabled=False)
    same = edit_video(
        engine,
        video,
        settings,
        EditSettings(SOURCE_PROMPT, guidance=1, pnp_attn=1, pnp_conv=1, batch_size=3, freeu=off),
    )
    other = edit_video(engine, video, settings, EditSettings("a dog", batch_size=3, freeu=off))
    reconstruction = same.inversion.reconstruction
    close, far = psnr(reconstruction, same.frames).mean(), psnr(reconstruction, other.frames).mean()
    assert close > 26.0, close
    assert close > far + 8.0, (close, far)


def test_chunked_unet_calls_give_the_same_edit(parts, tmp_path):
    """Pass 1 runs in lock-step chunks (extended attention and STEM see all keyframes), pass 2 in smaller calls."""
    video, settings = synthetic_video(7), inversion()
    whole = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "cache")).use_parts(parts)
    chunked = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "cache")).use_parts(parts)
    for attention in ("extended", "stem"):
        edit = EditSettings("a dog", batch_size=3, attention=attention)
        a = edit_video(whole, video, settings, edit)
        b = edit_video(chunked, video, settings, edit, chunked.plan(video, settings, edit, chunk_size=2))
        assert b.inversion_cache_hit and a.keyframes == b.keyframes
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2, attention
    assert not np.array_equal(a.frames, edit_video(whole, video, settings, EditSettings("a dog", batch_size=3)).frames)


def test_metrics_block(engine):
    video = synthetic_video(4)
    result = edit_video(
        engine, video, inversion(), EditSettings("a dog", negative_prompt="blurry", batch_size=2, seed=3)
    )
    block = edit_metrics(video, result)
    expected = {"inversion_cache_hit": False, "num_frames": 4, "fps": 12.0, "width": 64, "height": 64,
                "prompt": "a dog", "negative_prompt": "blurry", "guidance": 7.5, "pnp_attn": 0.5, "pnp_conv": 0.8,
                "batch_size": 2, "attention": "extended", "propagation": "previous", "freeu": True, "freeu_b1": 1.2,
                "freeu_b2": 1.4, "freeu_s1": 0.9, "freeu_s2": 0.2, "method": "stem", "seed": 3}
    assert {k: block[k] for k in expected} == expected
    assert block["warp_error"] >= 0 and block["seconds_editing"] > 0 and block["seconds_inversion"] > 0
    json.dumps(block, allow_nan=False)


# -- the command line ------------------------------------------------------------------------------

@pytest.fixture
def clip_file(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, textured_clip(5), fps=15)
    return path


def edit_args(clip_file, tmp_path, *extra):
    return ["edit", str(clip_file), "--model", TINY_MODEL, "--cache-dir", str(tmp_path / "cache"), "--size", "64",
            "--steps", "2", "--bases", "4", "--iters", "1", "--source-prompt", SOURCE_PROMPT,
            "--out", str(tmp_path / "out"), *extra]


def test_cli_edits_with_two_prompts_from_one_inversion(clip_file, tmp_path, capsys):
    code = main(edit_args(clip_file, tmp_path, "--prompt", "a dog", "--prompt", "A red fox!", "--batch-size", "2"))
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    files = [block["file"] for block in metrics["edits"]]
    assert files == ["edited-1-a-dog.mp4", "edited-2-a-red-fox.mp4"]
    assert [block["inversion_cache_hit"] for block in metrics["edits"]] == [False, True]
    for name in files:
        edited = read_video(out / name, size=64)
        assert edited.num_frames == 5 and edited.fps == pytest.approx(15)


def test_cli_one_prompt_writes_edited_mp4(clip_file, tmp_path, capsys):
    assert main(edit_args(clip_file, tmp_path, "--prompt", "a dog", "--frames", "3", "--edit-attention", "stem")) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["file"] == "edited.mp4" and metrics["attention"] == "stem" and metrics["num_frames"] == 3
    assert metrics["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and metrics["propagation"] == "previous"
    assert metrics["freeu"] is True and metrics["freeu_b1"] == 1.2
    assert read_video(tmp_path / "out" / "edited.mp4", size=64).num_frames == 3


def test_cli_freeu_negative_prompt_and_propagation_options(clip_file, tmp_path, capsys):
    extra = ["--prompt", "a dog", "--frames", "3", "--negative-prompt", "", "--no-freeu", "--freeu-b1", "1.3",
             "--freeu-s2", "0.5", "--propagation", "nearest"]
    assert main(edit_args(clip_file, tmp_path, *extra)) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["negative_prompt"] == "" and metrics["propagation"] == "nearest"
    assert (metrics["freeu"], metrics["freeu_b1"], metrics["freeu_b2"], metrics["freeu_s2"]) == (False, 1.3, 1.4, 0.5)


def test_freeu_options_are_refused_by_an_editor_without_freeu():
    from dataclasses import dataclass
    from types import SimpleNamespace

    from stem.cli.options import with_freeu_options

    @dataclass(frozen=True)
    class NoFreeU:
        editor = "plain"

    settings = NoFreeU()
    assert with_freeu_options(settings, SimpleNamespace(freeu=None, freeu_b1=None)) is settings
    with pytest.raises(StemError, match="plain editor has no FreeU; leave out --no-freeu"):
        with_freeu_options(settings, SimpleNamespace(freeu=False, freeu_b1=None))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--prompt", ""], "prompt"),
        (["--prompt", "a dog", "--pnp-attn", "1.5"], "--pnp-attn"),
        (["--prompt", "a dog", "--pnp-conv", "-1"], "--pnp-conv"),
        (["--prompt", "a dog", "--batch-size", "0"], "--batch-size"),
        (["--prompt", "a dog", "--guidance", "0.5"], "--guidance"),
        (["--prompt", "a dog", "--edit-attention", "full"], "full"),
        ([], "--prompt"),
        (["--prompt", "a dog", "--prompt", " "], "prompt"),
        (["--prompt", "a dog", "--propagation", "far"], "--propagation"),
        (["--prompt", "a dog", "--freeu-b2", "nan"], "--freeu-b2"),
        (["--prompt", "a dog", "--guidance", "1e300"], "--guidance"),
        (["--prompt", "a dog", "--freeu-b1", "1e300"], "--freeu-b1"),
        (["--prompt", "a dog", "--blend-words", "cat"], "--blend-words"),
        (["--prompt", "a dog", "--editor", "fatezero", "--pnp-attn", "0.3"], "--pnp-attn"),
        (["--prompt", "a blue dog", "--editor", "fatezero", "--reweight", "blue=-1e30"], "--reweight"),
        (["--prompt", "a blue dog", "--editor", "fatezero", "--reweight", "blue=1e300"], "--reweight"),
    ],
)
def test_cli_refuses_bad_input_before_any_work(tmp_path, capsys, monkeypatch, extra, words):
    def no_model(*_, **__):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("stem.engine.load_models", no_model)
    missing = tmp_path / "not-read.mp4"  # the video is not even opened: the settings are checked first
    assert main(edit_args(missing, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_stem_keyframe_attention_with_one_token_stays_finite():
    """One keyframe at the 1x1 middle block of a 64 px clip is a single token: its spread is 0, not nan."""
    from stem.em import estimate_bases

    key_bases, value_bases = estimate_bases(torch.randn(6, 1, 8), torch.randn(6, 1, 8), num_bases=4, num_iters=2)
    assert torch.isfinite(key_bases).all() and torch.isfinite(value_bases).all()


def test_each_editor_gets_its_own_negative_prompt_and_freeu_defaults():
    """TokenFlow: the STEM authors' negative prompt and FreeU on; FateZero: FateZero's empty one and FreeU off."""
    from stem.cli import build_parser
    from stem.editing import DEFAULT_NEGATIVE_PROMPT
    from stem.cli.options import edit_settings_for

    def settings(*extra):
        args = build_parser().parse_args(["edit", "clip.mp4", "--source-prompt", "a cat", *extra])
        return edit_settings_for(args, "a dog")

    tokenflow, fatezero = settings(), settings("--editor", "fatezero")
    assert (tokenflow.negative_prompt, tokenflow.freeu.enabled) == (DEFAULT_NEGATIVE_PROMPT, True)
    assert (fatezero.negative_prompt, fatezero.freeu.enabled) == ("", False)
    assert fatezero.metrics()["freeu"] is False
    chosen = settings("--editor", "fatezero", "--freeu", "--freeu-b1", "1.1", "--negative-prompt", "blurry")
    assert (chosen.freeu.enabled, chosen.freeu.b1, chosen.negative_prompt) == (True, 1.1, "blurry")
    assert settings("--negative-prompt", "").negative_prompt == ""
