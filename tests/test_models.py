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
