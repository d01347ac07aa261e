"""The inversion job: cache hits do no UNet work, any changed setting misses, corrupt files recompute."""

import dataclasses
import os
import threading
import warnings

import numpy as np
import pytest
import torch

from conftest import make_frames
from stem.cache import LatentCache
from stem.engine import Engine, InversionSettings, inversion_metrics
from stem.models import TINY_MODEL
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
    ({"num_bases": 0}, "number of bases K"), ({"num_iters": 0}, "number of EM iterations R"),
    ({"num_steps": 0}, "number of DDIM steps"), ({"num_frames": 0}, "number of frames"), ({"stride": 0}, "stride"),
    ({"size": 10}, "size"), ({"method": "magic"}, "method"),
])
def test_bad_settings_are_refused_with_one_sentence(bad, word):
    with pytest.raises(StemError, match=word) as error:
        dataclasses.replace(BASE, **bad).validate()
    assert str(error.value).count("\n") == 0


@pytest.mark.parametrize(
    "field, flag",
    [
        ("num_steps", "The number of DDIM steps"),
        ("num_bases", "The number of bases K"),
        ("num_iters", "The number of EM iterations R"),
        ("num_frames", "The number of frames"),
        ("stride", "The stride"),
        ("size", "The size"),
        ("seed", "The seed"),
    ],
)
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


# --- an entry holds exactly what the job computes, and the cache never costs the result (issue 17: 3, 5, 7) ---


def _plant(engine, video, settings, **changes):
    """Rewrite the job's entry (checksum and job record intact) with some tensors replaced."""
    key = engine.key_for(video, settings)
    tensors = {**engine.cache.load(key).tensors, **changes}
    engine.cache.save(key, tensors, job=engine.job_for(video, settings))
    return key


@pytest.mark.parametrize("bad,reason", [
    ("float16 trajectory", r"holds a trajectory of dtype float16, not float32"),
    ("float64 trajectory", r"holds a trajectory of dtype float64, not float32"),
    ("float reconstruction", r"holds a reconstruction of dtype float32, not uint8"),
    ("int64 reconstruction", r"holds a reconstruction of dtype int64, not uint8"),
    ("int32 timesteps", r"holds a timesteps of dtype int32, not int64"),
    ("other timesteps", r"other timesteps than this model's scheduler gives"),
    ("NaN trajectory", r"holds a trajectory with NaN or infinite values"),
    ("inf roundtrip", r"holds a vae_roundtrip of dtype float32"),
    ("inf trajectory", r"holds a trajectory with NaN or infinite values"),
])
def test_an_entry_of_another_dtype_or_with_non_finite_values_is_a_miss_and_replaced(engine, video, count_calls,
                                                                                     bad, reason):
    first = engine.invert(video, BASE)
    t = first.trajectory
    nan, inf = t.clone(), t.clone()
    nan[1, 0, 0, 0, 0] = float("nan")
    inf[-1, 2, 1, 3, 3] = float("-inf")
    recon = torch.from_numpy(first.reconstruction)
    planted = {
        "float16 trajectory": dict(trajectory=t.half()), "float64 trajectory": dict(trajectory=t.double()),
        "float reconstruction": dict(reconstruction=recon.float()),
        "int64 reconstruction": dict(reconstruction=recon.long()),
        "int32 timesteps": dict(timesteps=first.timesteps.int()),
        "other timesteps": dict(timesteps=first.timesteps + 1),
        "NaN trajectory": dict(trajectory=nan), "inf trajectory": dict(trajectory=inf),
        "inf roundtrip": dict(vae_roundtrip=torch.full(video.frames.shape, float("inf"))),
    }[bad]
    key = _plant(engine, video, BASE, **planted)
    with pytest.warns(UserWarning, match=reason + r".*; recomputing"), count_calls(engine.parts.unet) as counter:
        again = engine.invert(video, BASE)
    assert not again.cache_hit and counter.calls == 2 * BASE.num_steps
    assert again.trajectory.dtype == torch.float32 and again.reconstruction.dtype == np.uint8
    torch.testing.assert_close(again.trajectory, first.trajectory)
    assert np.array_equal(again.reconstruction, first.reconstruction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replaced: the next run is a clean hit
        hit = engine.invert(video, BASE)
    assert hit.cache_hit and hit.key == key and torch.equal(hit.trajectory, first.trajectory)


def test_a_bad_entry_is_removed_even_when_the_result_cannot_be_saved(engine, video, monkeypatch):
    import errno

    import stem.cache

    first = engine.invert(video, BASE)
    key = _plant(engine, video, BASE, reconstruction=torch.from_numpy(first.reconstruction).long())

    def full(fd, data):
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stem.cache, "_write_and_sync", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = engine.invert(video, BASE)
    assert not again.cache_hit and np.array_equal(again.reconstruction, first.reconstruction)
    assert not engine.cache.path_for(key).exists()  # it does not block the runs after this one
    assert any("No space left on device" in str(w.message) for w in caught)


def _cache_files(engine):
    return sorted(p.name for p in engine.cache.root.iterdir() if not p.name.endswith(".lock"))


def test_a_full_disk_under_the_cache_is_a_warning_and_the_result_is_returned(engine, video, monkeypatch):
    import errno

    import stem.cache

    def full(fd, data):
        os.write(fd, data[: len(data) // 3])  # part of it made it to the disk
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stem.cache, "_write_and_sync", full)
    with pytest.warns(UserWarning) as record:
        result = engine.invert(video, BASE)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and result.cache_warning == messages[0]
    assert messages[0].startswith(f"Cannot write to the cache folder {engine.cache.root} (No space left on device), "
                                  "so the result is not cached; pass another cache folder")
    assert messages[0].count(". ") == 0 and messages[0].endswith(".")  # one sentence
    assert not result.cache_hit and result.reconstruction.shape == video.frames.shape
    assert _cache_files(engine) == []  # no partial entry, no temp file
    monkeypatch.undo()
    assert not engine.invert(video, BASE).cache_hit  # nothing was cached; now it is
    assert engine.invert(video, BASE).cache_hit


def test_an_unwritable_cache_warns_before_the_work_and_never_raises(engine, video, monkeypatch):
    import stem.cache

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # what a read-only folder does (root aside)

    monkeypatch.setattr(stem.cache.tempfile, "mkstemp", denied)
    events = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.invert(video, BASE, callback=lambda info: events.append((info["phase"], len(caught))))
    assert [str(w.message) for w in caught] == [result.cache_warning]
    assert "Permission denied" in result.cache_warning and "not cached" in result.cache_warning
    assert events and all(warned == 1 for _, warned in events)  # said before any work began
    assert not result.cache_hit and result.reconstruction.shape == video.frames.shape
    assert _cache_files(engine) == []


@pytest.mark.parametrize("full", [False, True])
def test_a_folder_at_the_entry_name_does_not_fail_the_job(engine, video, full):
    path = engine.cache.path_for(engine.key_for(video, BASE))
    path.mkdir(parents=True)
    if full:
        (path / "keep.txt").write_text("someone's file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.invert(video, BASE)
    assert not result.cache_hit and result.reconstruction.shape == video.frames.shape
    if full:  # a folder with contents is left alone, and said so
        assert result.cache_warning == (f"The cache entry {path} is a folder, so the result is not cached; "
                                        "move that folder away or pass another cache folder.")
        assert [str(w.message) for w in caught if "cache" in str(w.message)] == [result.cache_warning]
        assert (path / "keep.txt").read_text() == "someone's file"
        assert not engine.invert(video, BASE).cache_hit  # every run still works
    else:  # an empty one makes way for the entry
        assert result.cache_warning is None and path.is_file()
        assert engine.invert(video, BASE).cache_hit


def test_a_non_finite_result_is_not_written_to_the_cache(engine, video, monkeypatch):
    import stem.engine as engine_mod

    real = engine_mod.ddim_invert

    def poisoned(*args, **kwargs):
        trajectory = real(*args, **kwargs)
        trajectory[2, 1, 0, 0, 0] = float("nan")
        return trajectory

    monkeypatch.setattr(engine_mod, "ddim_invert", poisoned)
    with pytest.warns(UserWarning, match="with NaN or infinite values, so it is not cached"):
        result = engine.invert(video, BASE)
    assert not engine.cache.path_for(result.key).exists()


# -- a diffusers pipeline handed in ---------------------------------------------------------------

def tiny_pipeline(parts):
    """A diffusers StableDiffusionPipeline of the tiny-random parts (its own PNDM scheduler, as a loaded one has)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler.from_config(parts.scheduler.config)
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_an_engine_from_a_pipeline_gives_the_plain_engines_result_bit_for_bit(tmp_path):
    from stem.models import build_tiny

    video = Video(make_frames(3), 12.0, "made")
    plain = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "a"))
    expected = plain.invert(video, BASE)
    piped = Engine.from_pipe(tiny_pipeline(build_tiny(device="cpu")), model="my-pipeline",
                             cache=LatentCache(tmp_path / "b"))
    assert piped.parts.scheduler.__class__.__name__ == "DDIMScheduler" and not piped.parts.scheduler.config.clip_sample
    result = piped.invert(video, dataclasses.replace(BASE, model="my-pipeline"))
    assert torch.equal(result.trajectory, expected.trajectory) and torch.equal(result.timesteps, expected.timesteps)
    assert np.array_equal(result.reconstruction, expected.reconstruction)
    assert piped.model_fingerprint.startswith("pipe:") and result.key != expected.key  # its own cache keys
    other = build_tiny(device="cpu", seed=1)
    assert Engine.from_pipe(tiny_pipeline(other), model="my-pipeline").model_fingerprint != piped.model_fingerprint
    with pytest.raises(StemError, match="holds the model 'my-pipeline'"):
        piped.invert(video, BASE)
