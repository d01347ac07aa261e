"""Small cards: the model dtype, the memory estimate and plan (free memory injected), CPU offload."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_frames
from stem import em_fused, memory, offload
from stem.cache import LatentCache
from stem.cli import cli_message, main as cli_main
from stem.engine import Engine, InversionSettings
from stem.errors import StemError
from stem.memory import GiB, Job, MiB, ModelFacts, balanced_chunks, estimate, plan
from stem.models import TINY_MODEL, build_tiny, resolve_dtype
from stem.video import Video

# SD-1.5 in float16: the weights counted by ModelFacts.of on the real architecture
SD15 = ModelFacts(unet_bytes=1_719_000_000, vae_bytes=167_000_000, text_bytes=246_000_000, element_bytes=2,
                  largest_unet_module_bytes=26_000_000)
JOB = Job(frames=48, height=512, width=512, method="stem")
SETTINGS = InversionSettings(model=TINY_MODEL, method="stem", num_bases=8, num_iters=2, num_steps=2, prompt="a square")


# -- dtype ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        (None, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_names_on_the_cpu(name, dtype):
    assert resolve_dtype(name, "cpu") == dtype


def test_gpu_default_is_float16_and_bfloat16_needs_support():
    assert resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype("bfloat16", "cuda", bf16_supported=True) == torch.bfloat16
    with pytest.raises(StemError, match="float16") as error:
        resolve_dtype("bfloat16", "cuda", bf16_supported=False)
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


@pytest.mark.parametrize("bad", ["int8", "half-ish", "float8", torch.int64])
def test_unknown_dtype_is_refused_when_the_engine_is_made(bad):
    with pytest.raises(StemError, match="model precision") as error:
        Engine(TINY_MODEL, dtype=bad)
    assert cli_message(error.value).startswith("--dtype: the model precision")


def test_engine_takes_the_dtype_by_name(tmp_path):
    engine = Engine(TINY_MODEL, dtype="bf16", cache=LatentCache(tmp_path))
    with pytest.warns(UserWarning, match="noise"):
        assert engine.parts.dtype == torch.bfloat16 and engine.parts.unet.dtype == torch.bfloat16


def test_command_line_dtype_and_offload(clip, tmp_path, capsys):
    code = cli_main(["invert", str(clip), "--model", TINY_MODEL, "--dtype", "bfloat16", "--offload", "--steps", "2",
                     "--bases", "4", "--iters", "1", "--size", "64", "--out", str(tmp_path / "out"),
                     "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["dtype"] == "bfloat16" and np.isfinite(metrics["psnr"])
    with pytest.raises(SystemExit):
        cli_main(["invert", str(clip), "--dtype", "float64"])


# -- the estimate ---------------------------------------------------------------------------------

def test_estimate_grows_with_frames_and_size_and_chunks_bound_the_unet():
    base = estimate(JOB, SD15)
    assert estimate(dataclasses.replace(JOB, frames=96), SD15)["unet"] > base["unet"]
    assert estimate(dataclasses.replace(JOB, height=768, width=768), SD15)["unet"] > base["unet"]
    assert estimate(JOB, SD15, chunk=8)["unet"] < base["unet"]
    assert estimate(JOB, SD15, chunk=1)["unet"] < estimate(JOB, SD15, chunk=8)["unet"]
    # waiting lock-step chunks still hold their activations: chunking saves less for STEM than for DDIM
    ddim = dataclasses.replace(JOB, method="ddim")
    saved = lambda job: estimate(job, SD15)["unet"] - estimate(job, SD15, chunk=1)["unet"]  # noqa: E731
    assert saved(ddim) > saved(JOB) > 0


def test_estimate_of_sd15_at_512_px_is_the_documented_arithmetic():
    """48 frames, all at once, fp16: weights + 1.25 x (activations + EM + trajectory) + 512 MiB.

    The EM: its block and softmax's output, the M-step's partial sums (16 MiB), float32 keys and values of
    one 8192-token chunk, the keys and values regrouped per head (fp16), the per-head statistics.
    """
    L = 64 * 64
    em = memory.EM_BLOCK_BYTES + 16 * 2**20 + 2 * 8192 * 320 * 4 + 2 * 48 * L * 320 * 2 + 48 * L * 40 * 4
    activations = 48 * memory.UNET_CALL * L * 2 + em + 2 * 51 * 48 * 4 * L * 4
    weights = SD15.unet_bytes + SD15.vae_bytes + SD15.text_bytes
    assert estimate(JOB, SD15)["unet"] == pytest.approx(weights + 1.25 * activations + 512 * 2**20, abs=2)
    assert 5 * GiB < estimate(JOB, SD15)["peak"] < 8 * GiB


def test_the_fused_kernels_em_term_is_its_programs_partial_sums():
    """48 frames at 512 px: 8 heads of 40 channels, K = 256, P = ceil(PROGRAMS / 8) programs per head (of
    6,144 token blocks), each writing its key sums, mass and value sums in float32: 8 P x 256 x 81 x 4 bytes,
    beside the keys and values regrouped per head and the per-head statistics (no responsibility block).
    """
    fused = dataclasses.replace(JOB, em_kernel="fused")
    L = 64 * 64
    regrouped = 2 * 48 * L * 320 * 2 + 48 * L * 40 * 4
    P = math.ceil(em_fused.PROGRAMS / 8)
    assert P <= 48 * L / em_fused.BLOCK_L  # fewer programs than blocks: no clamp at this size
    partials = 8 * P * 256 * (40 + 1 + 40) * 4
    assert memory.stem_em_bytes(fused, SD15) == pytest.approx(regrouped + partials, abs=2)
    assert partials < 64 * MiB  # where one partial per block of 32 tokens was ~4 GB
    # FateZero's three groups run in one EM: 24 problems of ceil(PROGRAMS / 24) programs
    P3 = math.ceil(em_fused.PROGRAMS / 24)
    assert memory.stem_em_bytes(fused, SD15, groups=3) == pytest.approx(3 * regrouped + 24 * P3 * 256 * 81 * 4, abs=2)
    assert estimate(fused, SD15)["unet"] < estimate(JOB, SD15)["unet"]  # the streamed path's 128 MiB block


def test_offload_leaves_only_the_running_part_and_streaming_only_one_layer():
    full, offloaded = estimate(JOB, SD15, chunk=1), estimate(JOB, SD15, chunk=1, offload=True)
    assert full["unet"] - offloaded["unet"] == pytest.approx(SD15.vae_bytes + SD15.text_bytes, abs=2)
    streamed = estimate(JOB, SD15, chunk=1, offload=True, stream_unet=True)
    assert offloaded["unet"] - streamed["unet"] == pytest.approx(
        SD15.unet_bytes - SD15.largest_unet_module_bytes, abs=2
    )


def test_an_editor_adds_its_phase():
    plain, edited = estimate(JOB, SD15), estimate(dataclasses.replace(JOB, editor="tokenflow"), SD15)
    assert "edit" not in plain and set(edited) == {"vae", "unet", "edit", "peak"}
    wider = estimate(dataclasses.replace(JOB, editor="tokenflow", edit_batch_size=16), SD15)
    assert wider["edit"] > edited["edit"]  # propagation calls of 3 x 16 frames instead of 3 x 8
    with pytest.raises(ValueError, match="EDITORS"):
        estimate(dataclasses.replace(JOB, editor="unknown"), SD15)
    fatezero = estimate(dataclasses.replace(JOB, editor="fatezero"), SD15)
    assert fatezero["edit"] > fatezero["unet"]  # three groups of every frame in one call, beside the inversion's one


def test_self_attention_elements_match_the_tokens_the_layers_see(tiny_parts):
    """S from the UNet's config against the (tokens x channels) each self-attention layer really gets."""
    from stem.attention import self_attention_layers

    seen = []
    modules = dict(tiny_parts.unet.named_modules())
    names = [n.removesuffix(".processor") for n in self_attention_layers(tiny_parts.unet)]
    handles = [modules[n].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1] * args[0].shape[2]))
               for n in names]
    try:
        with torch.no_grad():
            tiny_parts.unet(torch.randn(1, 4, 16, 16), 5, encoder_hidden_states=torch.randn(1, 77, 32))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(names)
    assert ModelFacts.of(tiny_parts).self_attention_elements == pytest.approx(sum(seen) / (16 * 16))


def test_live_bytes_counts_what_is_alive_at_once():
    from benchmarks.calibrate import live_bytes

    def two_then_one():
        a = torch.ones(1 << 20)   # 4 MiB
        b = a + 1                 # 4 MiB more: 8 MiB alive
        del a
        return (b * 2).sum()      # b and b * 2: 8 MiB again

    peak, _ = live_bytes(two_then_one)
    assert 8 * 2**20 <= peak < 8.1 * 2**20


# -- the plan -------------------------------------------------------------------------------------

def test_the_plan_takes_the_largest_balanced_chunk_that_fits():
    assert balanced_chunks(48)[:6] == [48, 24, 16, 12, 10, 8] and balanced_chunks(48)[-1] == 1
    assert plan(JOB, SD15, available=80 * GiB).chunk_size is None  # all 48 frames at once
    for chunk in (24, 12, 5, 1):
        need = estimate(JOB, SD15, chunk=chunk, vae_batch=1)["unet"]
        chosen = plan(JOB, SD15, available=need)
        assert chosen.chunk_size == chunk and chosen.estimate_bytes <= need
        if chunk > 1:
            assert plan(JOB, SD15, available=need - 1).chunk_size < chunk


def test_a_job_that_does_not_fit_one_frame_at_a_time_is_refused_with_what_to_change():
    smallest = estimate(JOB, SD15, chunk=1, vae_batch=1, vae_tiling=True)["peak"]
    offloaded = estimate(JOB, SD15, chunk=1, vae_batch=1, vae_tiling=True, offload=True, stream_unet=True)["peak"]
    with pytest.raises(StemError) as error:
        plan(JOB, SD15, available=smallest - 1)
    message = str(error.value)  # in words; the CLI names its flags (stem.cli.options.cli_message)
    assert "add offloading, or use fewer frames or a smaller size." in message and "--" not in message
    assert "add --offload, or use fewer --frames or a smaller --size." in cli_message(error.value)
    assert "48 frames" in message and "\n" not in message and message.endswith(".")
    with pytest.raises(StemError, match="fewer frames or a smaller size") as error:
        plan(JOB, SD15, available=offloaded - 1, offload=True)
    assert "offload" not in str(error.value) and "fewer --frames or a smaller --size" in cli_message(error.value)
    with pytest.raises(StemError, match="the chunk size 24") as error:
        plan(JOB, SD15, available=estimate(JOB, SD15, chunk=24)["unet"] - 1, chunk=24)
    assert "with --chunk-size 24" in cli_message(error.value) and "lower --chunk-size" in cli_message(error.value)


def test_with_offload_the_unet_streams_only_when_its_weights_do_not_fit():
    whole = estimate(JOB, SD15, chunk=1, vae_batch=1, offload=True)["unet"]
    assert not plan(JOB, SD15, available=whole, offload=True).stream_unet
    assert plan(JOB, SD15, available=whole - 1, offload=True).stream_unet


def test_large_frames_lower_the_vae_batch_then_tile():
    big = Job(frames=4, height=2048, width=2048, method="ddim")
    roomy = plan(big, SD15, available=80 * GiB)
    assert roomy.vae_batch_size == 4 and not roomy.vae_tiling
    batch_one = estimate(big, SD15, vae_batch=1)["vae"]
    assert plan(big, SD15, available=batch_one).vae_batch_size == 1
    unet = estimate(big, SD15, chunk=1, vae_batch=1, vae_tiling=True)["unet"]
    tiled = plan(big, SD15, available=max(unet, batch_one - 1))
    assert tiled.vae_tiling and tiled.vae_batch_size == 1


# -- the engine plans before any work -------------------------------------------------------------

@pytest.fixture
def video():
    return Video(make_frames(5), 12.0, "made")


def test_the_engine_chunks_the_unet_to_fit_the_injected_budget(tiny_parts, video, tmp_path, count_calls):
    facts = ModelFacts.of(tiny_parts)
    job = Job(video.num_frames, video.height, video.width, "stem", SETTINGS.num_steps)
    budget = estimate(job, facts, chunk=2, vae_batch=1)["unet"]
    assert budget > estimate(job, facts, chunk=2, vae_batch=1)["vae"]  # so the UNet decides the chunk
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "a"), memory_budget=lambda: budget).use_parts(tiny_parts)
    plan = engine.plan(video, SETTINGS)
    assert plan.chunk_size == 2 and plan.vae_batch_size <= 4
    with count_calls(tiny_parts.unet) as counter:
        chunked = engine.invert(video, SETTINGS)  # planned again: the same plan, a value
    assert counter.calls == 2 * SETTINGS.num_steps * 3  # 5 frames in chunks of 2: three calls per step
    whole = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "b")).use_parts(tiny_parts).invert(video, SETTINGS)
    assert whole.key == chunked.key
    torch.testing.assert_close(chunked.trajectory, whole.trajectory, rtol=1e-4, atol=1e-5)


def test_a_job_too_big_for_the_budget_is_refused_before_any_work(tiny_parts, video, tmp_path, count_calls):
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path), memory_budget=lambda: 100 * 2**20).use_parts(tiny_parts)
    with count_calls(tiny_parts.unet) as unet, count_calls(tiny_parts.vae.encoder) as vae:
        with pytest.raises(StemError, match="even one frame at a time"):
            engine.invert(video, SETTINGS)
    assert unet.calls == 0 and vae.calls == 0 and not list(tmp_path.rglob("*.safetensors"))


def test_a_plan_made_for_an_edit_serves_its_inversion_and_another_jobs_plan_is_refused(tiny_parts, video, tmp_path,
                                                                                       count_calls):
    facts = ModelFacts.of(tiny_parts)
    job = Job(video.num_frames, video.height, video.width, "stem", SETTINGS.num_steps)
    budget = estimate(dataclasses.replace(job, editor="tokenflow", edit_batch_size=2), facts, chunk=1, vae_batch=1)[
        "peak"
    ]
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path), memory_budget=lambda: budget).use_parts(tiny_parts)
    edit_plan = engine.plan(video, SETTINGS, SimpleNamespace(batch_size=2))
    assert "edit" in edit_plan.phases and edit_plan.estimate_bytes <= budget
    assert edit_plan == engine.plan(video, SETTINGS, SimpleNamespace(batch_size=2))  # a value: planning changes nothing
    unbudgeted = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "u")).use_parts(tiny_parts)
    asked = unbudgeted.plan(video, SETTINGS, SimpleNamespace(batch_size=2), chunk_size=2)
    with count_calls(tiny_parts.unet) as counter:
        unbudgeted.invert(video, SETTINGS, asked)
    assert counter.calls == 2 * SETTINGS.num_steps * 3  # the plan handed in: 5 frames in chunks of 2
    with pytest.raises(StemError, match="made for another job"):
        engine.invert(Video(video.frames[:3], video.fps, "made"), SETTINGS, edit_plan)


def test_an_edit_too_big_for_the_budget_is_refused_before_its_inversion(tiny_parts, video, tmp_path, count_calls):
    from stem.editing import FateZeroSettings, edit_video

    facts = ModelFacts.of(tiny_parts)
    job = Job(video.num_frames, video.height, video.width, "stem", SETTINGS.num_steps)
    budget = estimate(job, facts, chunk=1, vae_batch=1)["peak"]  # the inversion fits, the edit's three groups do not
    assert estimate(dataclasses.replace(job, editor="fatezero"), facts, chunk=1, vae_batch=1)["peak"] > budget
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path), memory_budget=lambda: budget).use_parts(tiny_parts)
    edit = FateZeroSettings(prompt="a dog", source_prompt="a cat")
    with count_calls(tiny_parts.unet) as unet, pytest.raises(StemError, match="even one frame at a time"):
        edit_video(engine, video, dataclasses.replace(SETTINGS, prompt="a cat"), edit)
    assert unet.calls == 0


# -- offload --------------------------------------------------------------------------------------

def test_only_the_running_component_stays_on_the_device(monkeypatch):
    """The hooks' bookkeeping, with moves recorded instead of made (no GPU here)."""
    te, vae, unet = (torch.nn.Linear(2, 2) for _ in range(3))
    where = {}
    for module in (te, vae, unet):
        monkeypatch.setattr(module, "to", lambda device, m=module: where.__setitem__(m, torch.device(device).type) or m)
    monkeypatch.setattr(offload, "_on_device", lambda module, device: where.get(module) == device.type)
    offload.Offload(SimpleNamespace(text_encoder=te, vae=vae, unet=unet), "cuda")
    assert set(where.values()) == {"cpu"}  # everything starts on the CPU
    for module in (vae, te, unet, vae, unet, te):  # encode, prompt, denoise, decode, another job...
        module._hf_hook.pre_forward(module)  # what a forward (or diffusers' VAE encode/decode) calls first
        assert [m for m in (te, vae, unet) if where[m] == "cuda"] == [module]


def test_offloaded_and_streamed_engines_give_the_same_result(video, tmp_path, tiny_parts):
    reference = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "r")).use_parts(tiny_parts).invert(video, SETTINGS)
    parts = build_tiny(device="cpu")  # hooks go on a fresh copy, not the shared fixture
    engine = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "o"), offload=True).use_parts(parts)
    assert offload.execution_device(parts.vae) == torch.device("cpu") and hasattr(parts.unet, "_hf_hook")
    result = engine.invert(video, SETTINGS, engine.plan(video, SETTINGS, chunk_size=2))
    torch.testing.assert_close(result.trajectory, reference.trajectory, rtol=1e-4, atol=1e-5)
    engine._offload.stream_unet(True)
    streamed = Engine(TINY_MODEL, cache=LatentCache(tmp_path / "s")).use_parts(parts)
    result = streamed.invert(video, SETTINGS, streamed.plan(video, SETTINGS, chunk_size=2))
    torch.testing.assert_close(result.trajectory, reference.trajectory, rtol=1e-4, atol=1e-5)
    engine._offload.remove()
    assert not any(hasattr(m, "_hf_hook") for m in (parts.unet, parts.vae, parts.text_encoder))
    assert all(p.device.type == "cpu" for p in parts.unet.parameters())
