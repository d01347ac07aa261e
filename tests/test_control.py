"""Structure guidance (issue 20): ControlNet residuals in every UNet call of inversion and reconstruction.

The faithfulness test re-implements the release's `preprocess.py` ControlNet branch (canny of each
frame, ControlNet then UNet on each batch of frames, DDIM inversion then sampling) in float64, one
batch at a time, sharing no code with `stem.engine` / `stem.inversion` beyond the models.
"""

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from stem.cache import LatentCache
from stem.control import (
    build_tiny_controlnet, build_tiny_depth_estimator, canny_conditions, depth_conditions, load_controlnet,
    load_depth_estimator,
)
from stem.engine import Engine, InversionSettings
from stem.errors import StemError
from stem.inversion import encode_prompt
from stem.models import SD_DOWN_BLOCKS, build_tiny
from stem.video import Video

from conftest import make_frames

BASE = InversionSettings(model="tiny-random", method="stem", num_bases=8, num_iters=2, num_steps=3, prompt="a square")
CANNY = dataclasses.replace(BASE, control="canny")


@pytest.fixture
def video():
    return Video(make_frames(4), 12.0, "made")


def test_canny_conditions_are_the_releases_cv2_canny_in_three_channels(video):
    cond = canny_conditions(video.frames)
    assert cond.shape == (4, 3, video.height, video.width) and cond.dtype == torch.float32
    for frame, c in zip(video.frames, cond):
        edges = cv2.Canny(frame.copy(), 100, 200)[:, :, None]
        expected = np.concatenate([edges, edges, edges], axis=2).astype(np.float32) / 255.0  # as preprocess.py
        assert torch.equal(c, torch.from_numpy(expected).permute(2, 0, 1))
    assert 0 < cond.mean() < 1


def test_depth_is_normalised_over_the_clip_not_per_frame(video):
    estimator, processor = build_tiny_depth_estimator()
    depth = depth_conditions(estimator, processor, video.frames)
    raw = estimator(**processor(images=list(video.frames), return_tensors="pt")).predicted_depth.float()
    raw = torch.nn.functional.interpolate(
        raw[:, None], size=video.frames.shape[1:3], mode="bicubic", align_corners=False
    )
    expected = (raw - raw.min()) / (raw.max() - raw.min())  # one min / max for the whole clip
    torch.testing.assert_close(depth[:, :1], expected, rtol=0, atol=1e-6)
    assert depth.amin() == 0 and depth.amax() == 1


def test_none_is_todays_result_and_key(engine, video):
    plain = engine.invert(video, BASE)
    none = dataclasses.replace(BASE, control="none", control_scale=3.0, canny_low=1)
    again = engine.invert(video, none)
    assert again.cache_hit and again.key == plain.key  # "none" adds nothing to the key
    assert "control" not in engine.job_for(video, none)


def test_control_changes_the_result_and_scale_zero_gives_none(engine, video):
    plain = engine.invert(video, BASE)
    canny = engine.invert(video, CANNY)
    zero = engine.invert(video, dataclasses.replace(CANNY, control_scale=0.0))
    assert not canny.cache_hit and not zero.cache_hit and len({plain.key, canny.key, zero.key}) == 3
    assert (canny.trajectory - plain.trajectory).abs().max() > 1e-3
    assert torch.equal(zero.trajectory, plain.trajectory)
    assert np.array_equal(zero.reconstruction, plain.reconstruction)


def test_depth_control_runs_offline_and_differs_from_canny(engine, video):
    canny = engine.invert(video, CANNY)
    depth = engine.invert(video, dataclasses.replace(BASE, control="depth"))
    assert depth.key != canny.key and (depth.trajectory - canny.trajectory).abs().max() > 1e-6


def test_cache_keeps_controlled_and_uncontrolled_apart_and_reuses_each(engine, video, count_calls):
    engine.invert(video, BASE)
    engine.invert(video, CANNY)
    with count_calls(engine.parts.unet) as counter:
        assert engine.invert(video, BASE).cache_hit and engine.invert(video, CANNY).cache_hit
    assert counter.calls == 0
    other = dataclasses.replace(CANNY, canny_high=120)  # other thresholds: other condition frames
    assert not engine.invert(video, other).cache_hit


def test_lockstep_chunks_give_the_same_controlled_stem_inversion(tiny_parts, video, tmp_path):
    whole = Engine("tiny-random", cache=LatentCache(tmp_path / "a")).use_parts(tiny_parts).invert(video, CANNY)
    chunked = Engine("tiny-random", cache=LatentCache(tmp_path / "b")).use_parts(tiny_parts)
    result = chunked.invert(video, CANNY, chunked.plan(video, CANNY, chunk_size=1))
    torch.testing.assert_close(result.trajectory, whole.trajectory, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, word", [
    ({"control": "pose"}, "structure guidance"), ({"control_scale": -1.0}, "structure strength"),
    ({"control_scale": float("nan")}, "structure strength"), ({"canny_low": 300}, "lower canny threshold"),
])
def test_bad_control_settings_are_one_sentence(bad, word):
    with pytest.raises(StemError, match=word) as error:
        dataclasses.replace(CANNY, **bad).validate()
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_a_controlnet_for_another_base_is_refused_before_any_work(engine, video, tmp_path, count_calls):
    from diffusers import ControlNetModel

    other = ControlNetModel(block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=64,
                            attention_head_dim=8, norm_num_groups=8, down_block_types=SD_DOWN_BLOCKS,
                            conditioning_embedding_out_channels=(8, 8, 16, 16))  # for a wider text encoder
    other.save_pretrained(tmp_path / "other")
    with count_calls(engine.parts.unet) as counter, pytest.raises(StemError, match="cross-attention width 64"):
        engine.invert(video, dataclasses.replace(CANNY, control_model=str(tmp_path / "other")))
    assert counter.calls == 0 and not list((engine.cache.root).glob("**/*.safetensors"))


def test_save_pretrained_round_trip_of_controlnet_and_depth_estimator(tiny_parts, video, tmp_path):
    net = build_tiny_controlnet(tiny_parts.unet)
    net.save_pretrained(tmp_path / "controlnet")
    loaded = load_controlnet(str(tmp_path / "controlnet"), tiny_parts.unet, "cpu", torch.float32)
    x, cond = torch.randn(2, 4, 8, 12), canny_conditions(video.frames[:2])
    text = torch.randn(2, 77, 32)
    for a, b in zip(
        *(m(x, 10, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)[0] for m in (net, loaded))
    ):
        assert torch.equal(a, b)
    estimator, processor = build_tiny_depth_estimator()
    estimator.save_pretrained(tmp_path / "depth")
    processor.save_pretrained(tmp_path / "depth")
    estimator2, processor2 = load_depth_estimator(str(tmp_path / "depth"), "cpu")
    assert torch.equal(
        depth_conditions(estimator, processor, video.frames), depth_conditions(estimator2, processor2, video.frames)
    )


# -- the release's ControlNet branch, in float64 ------------------------------------------------------

def release_controlnet_inversion(parts, controlnet, frames, latents, prompt, num_steps, batch_size):
    """preprocess.py (sd_version='ControlNet'): ddim_inversion then ddim_sample, batch by batch, float64."""
    scheduler = parts.scheduler
    scheduler.set_timesteps(num_steps)
    canny = []
    for image in frames:  # get_canny_cond
        edges = cv2.Canny(image.copy(), 100, 200)[:, :, None]
        canny.append(torch.from_numpy(np.concatenate([edges] * 3, axis=2).astype(np.float64) / 255.0))
    canny = torch.stack(canny).permute(0, 3, 1, 2)
    cond = encode_prompt(parts.tokenizer, parts.text_encoder, prompt).double()
    acp = scheduler.alphas_cumprod.double()
    final = scheduler.final_alpha_cumprod.double()

    def controlnet_pred(x, t, text, c):
        down, mid = controlnet(
            x, t, encoder_hidden_states=text, controlnet_cond=c, conditioning_scale=1, return_dict=False
        )
        return parts.unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={},
                          down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    x = latents.clone()
    timesteps = list(reversed(scheduler.timesteps))
    trajectory = [x.clone()]
    for i, t in enumerate(timesteps):  # ddim_inversion
        for b in range(0, len(x), batch_size):
            x_batch = x[b:b + batch_size]
            a_t, a_prev = acp[t], (acp[timesteps[i - 1]] if i > 0 else final)
            eps = controlnet_pred(x_batch, t, cond.repeat(len(x_batch), 1, 1), canny[b:b + batch_size])
            pred_x0 = (x_batch - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
            x[b:b + batch_size] = a_t ** 0.5 * pred_x0 + (1 - a_t) ** 0.5 * eps
        trajectory.append(x.clone())
    timesteps = list(scheduler.timesteps)
    for i, t in enumerate(timesteps):  # ddim_sample
        for b in range(0, len(x), batch_size):
            x_batch = x[b:b + batch_size]
            a_t = acp[t]
            a_prev = acp[timesteps[i + 1]] if i < len(timesteps) - 1 else final
            eps = controlnet_pred(x_batch, t, cond.repeat(len(x_batch), 1, 1), canny[b:b + batch_size])
            pred_x0 = (x_batch - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            x[b:b + batch_size] = a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * eps
    return torch.stack(trajectory), x


def test_canny_inversion_and_reconstruction_match_the_release_in_float64(video, tmp_path):
    parts64 = build_tiny(device="cpu", dtype=torch.float64)
    settings = dataclasses.replace(CANNY, method="ddim", num_steps=4)
    engine = Engine("tiny-random", dtype=torch.float64, cache=LatentCache(tmp_path / "c")).use_parts(parts64)
    captured = {}
    from stem import engine as engine_module

    real_sample = engine_module.ddim_sample

    def spy(*args, **kw):
        captured["clean"] = real_sample(*args, **kw)
        return captured["clean"]

    engine_module.ddim_sample = spy
    try:
        result = engine.invert(video, settings, engine.plan(video, settings, chunk_size=2))
    finally:
        engine_module.ddim_sample = real_sample
    controlnet = build_tiny_controlnet(build_tiny(device="cpu").unet).double()
    latents = result.trajectory[0].double()
    trajectory, clean = release_controlnet_inversion(parts64, controlnet, video.frames, latents, settings.prompt,
                                                     settings.num_steps, batch_size=2)
    torch.testing.assert_close(result.trajectory.double(), trajectory, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(captured["clean"].double(), clean, rtol=1e-6, atol=1e-6)


# -- editing: residuals for all three groups, with the source frames' conditions -----------------------

def _fatezero(prompt):
    from stem.editing import FateZeroSettings

    return FateZeroSettings(prompt, source_prompt="a square")


@pytest.mark.parametrize(
    "make_edit",
    [
        lambda: __import__("stem.editing", fromlist=["TokenFlowSettings"]).TokenFlowSettings("a dog", batch_size=2),
        lambda: _fatezero("a circle"),
    ],
    ids=["tokenflow", "fatezero"],
)
def test_edits_take_controlnet_residuals_for_every_group(engine, video, count_calls, make_edit):
    from stem.editing import edit_video

    plain = edit_video(engine, video, BASE, make_edit())
    zero = edit_video(engine, video, dataclasses.replace(CANNY, control_scale=0.0), make_edit())
    engine.invert(video, CANNY)  # cached: only the edit's calls are counted below
    net = engine.control_for(video, CANNY).net
    batches = []
    handle = net.register_forward_pre_hook(
        lambda _m, args, kwargs: batches.append((args[0].shape[0], kwargs["controlnet_cond"])), with_kwargs=True
    )
    try:
        with count_calls(engine.parts.unet) as unet_calls:
            canny = edit_video(engine, video, CANNY, make_edit())
    finally:
        handle.remove()
    assert np.array_equal(zero.frames, plain.frames)  # scale 0: the uncontrolled edit
    assert not np.array_equal(canny.frames, plain.frames)
    assert len(batches) == unet_calls.calls > 0  # one ControlNet call per UNet call
    edit_passes = [(b, c) for b, c in batches if b % 3 == 0 and torch.equal(c[: b // 3], c[b // 3: 2 * b // 3])]
    assert edit_passes  # the three groups get the same (source) frames' conditions
    conditions = engine.conditions(video, CANNY)
    for _, c in batches:  # every condition handed over is one of the source frames'
        assert all(any(torch.equal(ci, f) for f in conditions) for ci in c)


# -- command line -------------------------------------------------------------------------------------

FAST = ["--model", "tiny-random", "--steps", "2", "--bases", "8", "--iters", "2", "--size", "96"]


def test_cli_invert_with_canny_writes_control_video_and_keys_the_cache(clip, tmp_path, capsys):
    import json

    from stem.cli import main
    from stem.video import read_video

    common = ["invert", str(clip), *FAST, "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "control.mp4").exists()
    assert main([*common, "--control", "canny", "--control-scale", "0.5", "--out", str(tmp_path / "canny")]) == 0
    metrics = json.loads((tmp_path / "canny" / "metrics.json").read_text())
    assert metrics["cache_hit"] is False and metrics["control"] == "canny" and metrics["control_scale"] == 0.5
    control = read_video(tmp_path / "canny" / "control.mp4", size=96).frames
    assert control.shape == (6, 64, 96, 3) and control.max() > 200 and control.min() < 30  # white edges on black
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags, word", [(["--control", "pose"], "--control"), (["--control-scale", "-1"], "--control-scale")]
)
def test_cli_bad_control_flags_are_one_sentence_and_write_nothing(clip, tmp_path, capsys, flags, word):
    from stem.cli import main

    code = main(["invert", str(clip), *FAST, *flags, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code != 0 and word in err and not (tmp_path / "o").exists()


def test_memory_estimate_counts_the_controlnet(tiny_parts, video):
    from stem.memory import Job, ModelFacts, estimate, module_bytes

    facts = ModelFacts.of(tiny_parts)
    net = build_tiny_controlnet(tiny_parts.unet)
    # the ControlNet's weights, but its own conditioning embedding and zero convolutions (a few percent)
    extras = module_bytes(net.controlnet_cond_embedding) + sum(module_bytes(m) for m in net.controlnet_down_blocks) \
        + module_bytes(net.controlnet_mid_block)
    assert facts.control_bytes == module_bytes(net) - extras
    plain, guided = Job.of(video, BASE), Job.of(video, CANNY)
    assert guided.key() != plain.key()
    a, b = estimate(plain, facts), estimate(guided, facts)
    assert b["unet"] - a["unet"] > facts.control_bytes and b["vae"] - a["vae"] == facts.control_bytes


# -- offload: the ControlNet takes its turn with the UNet ---------------------------------------------

def test_offloaded_controlled_inversion_gives_the_unoffloaded_result(tiny_parts, video, tmp_path):
    reference = Engine("tiny-random", cache=LatentCache(tmp_path / "r")).use_parts(tiny_parts).invert(video, CANNY)
    parts = build_tiny(device="cpu")  # hooks go on a fresh copy, not the shared fixture
    engine = Engine("tiny-random", cache=LatentCache(tmp_path / "o"), offload=True).use_parts(parts)
    result = engine.invert(video, CANNY)
    net = engine.control_for(video, CANNY).net
    assert hasattr(net, "_hf_hook") and any(m is net for m in engine._offload.group)  # offloaded like the other parts
    assert torch.equal(result.trajectory, reference.trajectory)
    assert np.array_equal(result.reconstruction, reference.reconstruction)
    engine._offload.remove()


def test_the_controlnet_stays_beside_the_unet_and_leaves_for_the_vae(monkeypatch):
    """The hooks' bookkeeping with moves recorded instead of made (no GPU here)."""
    from types import SimpleNamespace

    from stem import offload

    te, vae, unet, net = (torch.nn.Linear(2, 2) for _ in range(4))
    where = {}
    for module in (te, vae, unet, net):
        monkeypatch.setattr(module, "to", lambda device, m=module: where.__setitem__(m, torch.device(device).type) or m)
    monkeypatch.setattr(offload, "_on_device", lambda module, device: where.get(module) == device.type)
    hooks = offload.Offload(SimpleNamespace(text_encoder=te, vae=vae, unet=unet), "cuda")
    hooks.add_beside_unet(net)
    assert where[net] == "cpu"
    for module, on_device in ((te, [te]), (net, [net]), (unet, [unet, net]), (net, [unet, net]), (vae, [vae]),
                              (unet, [unet]), (net, [unet, net]), (te, [te])):
        module._hf_hook.pre_forward(module)
        assert [m for m in (te, vae, unet, net) if where[m] == "cuda"] == on_device, module
