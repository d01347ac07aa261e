"""The inversion job: cache hits do no UNet work, any changed setting misses, corrupt files recompute."""

import dataclasses
import os
import threading
import warnings

import numpy as np
import pytest
import torch

from conftest import make_frames
from stem.engine import Engine, InversionSettings, inversion_metrics
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


@pytest.mark.parametrize("field, flag", [("num_steps", "--steps"), ("num_bases", "--bases"), ("num_iters", "--iters"),
                                         ("num_frames", "--frames"), ("stride", "--stride"), ("size", "--size"),
                                         ("seed", "--seed")])
@pytest.mark.parametrize("value", [1.5, 2.0, True])
def test_counts_that_are_not_ints_are_refused_not_truncated(field, flag, value):
    # steps=1.5 used to pass as 1 <= 1.5 <= 1000 and run one step; 2.0 would split the cache key from 2
    value = value * 64 if field == "size" and not isinstance(value, bool) else value
    with pytest.raises(StemError, match=rf"^{flag} must be a whole number \(an int\), got {value!r}\.$"):
        dataclasses.replace(BASE, **{field: value}).validate()


def test_settings_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASE.num_bases = 3
    assert hash(BASE) == hash(dataclasses.replace(BASE))


def test_a_job_for_another_model_is_refused(engine, video):
    with pytest.raises(StemError, match="model"):
        engine.invert(video, dataclasses.replace(BASE, model="other/model"))


# --- an entry is served only for the job that made it ------------------------------------------------


def _copy_entry(engine, source_key, target_key):
    engine.cache.path_for(target_key).write_bytes(engine.cache.path_for(source_key).read_bytes())


@pytest.mark.parametrize("other", ["frames", "steps", "dtype"])
def test_an_entry_copied_under_another_jobs_key_is_recomputed(engine, video, count_calls, tmp_path, other):
    # the cases: `--stride 3` (other frames), other --steps, float64 under a float32 name
    donor, job_engine, job_video, job = engine, engine, video, BASE
    if other == "frames":
        job_video = Video(video.frames[::3], video.fps, "made")
    elif other == "steps":
        job = dataclasses.replace(BASE, num_steps=2)
    else:
        from stem.models import build_tiny

        donor = Engine("tiny-random", cache=engine.cache).use_parts(build_tiny(device="cpu", dtype=torch.float64))
    first = donor.invert(video, BASE)
    wanted = job_engine.invert(job_video, job)
    assert wanted.key != first.key
    _copy_entry(engine, first.key, wanted.key)
    with pytest.warns(UserWarning, match="made for another job"), count_calls(engine.parts.unet) as counter:
        again = job_engine.invert(job_video, job)
    assert not again.cache_hit and counter.calls == 2 * job.num_steps
    assert torch.equal(again.trajectory, wanted.trajectory)  # this job's latents, not the copied ones
    assert job_engine.invert(job_video, job).cache_hit  # the entry was overwritten with the right one


def test_an_entry_of_another_frame_size_is_recomputed_not_a_crash(engine, video, count_calls):
    small = Video(np.ascontiguousarray(video.frames[:, :, :64]), video.fps, "made")  # 64x64 instead of 96x64
    wide = engine.invert(video, BASE)
    wanted = engine.invert(small, BASE)
    _copy_entry(engine, wide.key, wanted.key)
    with pytest.warns(UserWarning, match="another job"):
        again = engine.invert(small, BASE)
    assert not again.cache_hit and again.reconstruction.shape == small.frames.shape

    # an entry whose job record matches but whose tensors do not fit (a damaged writer, a hand-made file)
    tensors = dict(engine.cache.load(wide.key).tensors)
    engine.cache.save(wanted.key, tensors, job=engine.job_for(small, BASE))
    with pytest.warns(UserWarning, match=r"holds a trajectory of shape .*; recomputing"), \
            count_calls(engine.parts.unet) as counter:
        fixed = engine.invert(small, BASE)
    assert not fixed.cache_hit and counter.calls == 2 * BASE.num_steps
    torch.testing.assert_close(fixed.trajectory, wanted.trajectory)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_planted_under_the_entry_name_does_not_hang_the_job(engine, video):
    path = engine.cache.path_for(engine.key_for(video, BASE))
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    results = []
    job = threading.Thread(target=lambda: results.append(engine.invert(video, BASE)), daemon=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job.start()
        job.join(timeout=300)
    if job.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # unblock the reader before failing
        pytest.fail("the job blocked on the FIFO")
    assert not results[0].cache_hit and path.is_file()
    assert engine.invert(video, BASE).cache_hit


def test_two_identical_jobs_at_once_invert_once(tiny_parts, video, tmp_path, count_calls):
    from stem.cache import LatentCache
    from stem.models import build_tiny

    # one engine per thread, each with its own modules, sharing one cache folder (like two processes)
    engines = [Engine("tiny-random", cache=LatentCache(tmp_path / "shared")).use_parts(parts)
               for parts in (tiny_parts, build_tiny(device="cpu"))]
    start = threading.Barrier(2)
    results = [None, None]

    def run(i):
        start.wait()
        results[i] = engines[i].invert(video, BASE)

    with count_calls(engines[0].parts.unet) as a, count_calls(engines[1].parts.unet) as b:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert a.calls + b.calls == 2 * BASE.num_steps  # exactly one inversion (and its reconstruction)
    assert sorted(r.cache_hit for r in results) == [False, True]
    assert torch.equal(results[0].trajectory, results[1].trajectory)


def test_a_resaved_local_model_folder_is_a_new_model(tiny_parts, video, tmp_path):
    from stem.cache import LatentCache
    from stem.models import build_tiny, save_pretrained

    folder = save_pretrained(tiny_parts, tmp_path / "my-model")
    settings = dataclasses.replace(BASE, model=str(folder))
    cache = LatentCache(tmp_path / "cache")
    first = Engine(str(folder), device="cpu", cache=cache).invert(video, settings)
    assert Engine(str(folder), device="cpu", cache=cache).invert(video, settings).cache_hit  # same files: a hit
    save_pretrained(build_tiny(seed=1), folder)  # other weights, same names and configs
    other = Engine(str(folder), device="cpu", cache=cache)
    again = other.invert(video, settings)
    assert not again.cache_hit and again.key != first.key
    assert (again.trajectory[-1] - first.trajectory[-1]).abs().max() > 1e-3
    assert other.model_fingerprint.startswith("folder:")
