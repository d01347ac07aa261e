"""Loading: the real from_pretrained path on a saved tiny model, and clear errors when weights are missing."""

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
