"""The inversion job: cache hits do no UNet work, any changed setting misses, corrupt files recompute."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import make_frames
from stem.engine import InversionSettings, inversion_metrics
from stem.errors import StemError
from stem.video import Video

BASE = InversionSettings(model="tiny-random", method="stem", num_bases=8, num_iters=2, num_steps=3, prompt="a square")


@pytest.fixture
def video():
    return Video(make_frames(4), 12.0, "made")


def test_repeated_job_is_a_cache_hit_with_zero_unet_calls(engine, video, count_calls):
    with count_calls(engine.parts.unet) as first:
        a = engine.invert(video, BASE)
    assert not a.cache_hit and first.calls == 2 * BASE.num_steps  # invert + reconstruct, all frames per call
    with count_calls(engine.parts.unet) as second:
        b = engine.invert(video, BASE)
    assert b.cache_hit and second.calls == 0
    assert torch.equal(a.trajectory, b.trajectory)
    assert np.array_equal(a.reconstruction, b.reconstruction)
    assert np.array_equal(a.vae_roundtrip, b.vae_roundtrip)
    assert torch.equal(a.timesteps, b.timesteps)


@pytest.mark.parametrize("change", [
    {"method": "ddim"}, {"num_bases": 4}, {"num_iters": 3}, {"num_steps": 2}, {"prompt": "a cube"}, {"seed": 1},
])
def test_any_changed_setting_misses(engine, video, count_calls, change):
    engine.invert(video, BASE)
    with count_calls(engine.parts.unet) as counter:
        result = engine.invert(video, dataclasses.replace(BASE, **change))
    assert not result.cache_hit and counter.calls > 0


def test_changed_frames_miss(engine, video):
    engine.invert(video, BASE)
    frames = video.frames.copy()
    frames[1, 5, 5, 0] ^= 1  # one pixel, one bit
    assert not engine.invert(Video(frames, video.fps, "made"), BASE).cache_hit
    assert not engine.invert(Video(video.frames[:3], video.fps, "made"), BASE).cache_hit


def test_bases_settings_do_not_split_the_cache_of_per_frame_ddim(engine, video):
    ddim = dataclasses.replace(BASE, method="ddim")
    engine.invert(video, ddim)
    assert engine.invert(video, dataclasses.replace(ddim, num_bases=64, num_iters=9, seed=3)).cache_hit


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_cache_file_is_reported_and_recomputed(engine, video, count_calls, damage):
    first = engine.invert(video, BASE)
    path = engine.cache.path_for(first.key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"), count_calls(engine.parts.unet) as counter:
        again = engine.invert(video, BASE)
    assert not again.cache_hit and counter.calls == 2 * BASE.num_steps
    torch.testing.assert_close(again.trajectory, first.trajectory)
    assert engine.invert(video, BASE).cache_hit  # rewritten


def test_result_shapes_and_metrics(engine, video):
    result = engine.invert(video, BASE)
    T, N = BASE.num_steps, video.num_frames
    assert result.trajectory.shape == (T + 1, N, 4, video.height // 8, video.width // 8)
    assert result.inverted_latents.shape == (N, 4, video.height // 8, video.width // 8)
    assert result.reconstruction.shape == video.frames.shape and result.reconstruction.dtype == np.uint8
    metrics = inversion_metrics(video, result, engine)
    for key in ("method", "num_frames", "width", "height", "fps", "psnr", "ssim", "psnr_per_frame", "warp_error",
                "cache_hit", "seconds", "psnr_vae"):
        assert key in metrics, key
    assert len(metrics["psnr_per_frame"]) == N and metrics["num_frames"] == N


@pytest.mark.parametrize("bad,word", [
    ({"num_bases": 0}, "--bases"), ({"num_iters": 0}, "--iters"), ({"num_steps": 0}, "--steps"),
    ({"num_frames": 0}, "--frames"), ({"stride": 0}, "--stride"), ({"size": 10}, "--size"),
    ({"method": "magic"}, "method"),
])
def test_bad_settings_are_refused_with_one_sentence(bad, word):
    with pytest.raises(StemError, match=word) as error:
        dataclasses.replace(BASE, **bad).validate()
    assert str(error.value).count("\n") == 0


def test_settings_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASE.num_bases = 3
    assert hash(BASE) == hash(dataclasses.replace(BASE))


def test_a_job_for_another_model_is_refused(engine, video):
    with pytest.raises(StemError, match="model"):
        engine.invert(video, dataclasses.replace(BASE, model="other/model"))
