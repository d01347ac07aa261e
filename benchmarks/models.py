"""Benchmark models: SD-1.5's architecture with random weights, built in code (no hub), at the real model's cost."""

from __future__ import annotations

import contextlib

import torch

SD15_MODEL_ID = "sd15-random"


@contextlib.contextmanager
def _seeded_on(device, seed: int):
    """Build modules directly on `device` (fast on a GPU) from a fixed seed, leaving the global RNG as it was."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        yield


def _build(make, device, seed: int):
    """`make()` on `device` directly; if building there fails, on the CPU (then moved by `_finish`)."""
    try:
        with _seeded_on(device, seed):
            return make()
    except Exception as error:  # noqa: BLE001 - a library that cannot build on the device: the slow way
        if torch.device(device).type == "cpu":
            raise
        print(f"note: building on {device} failed ({type(error).__name__}: {error}); building on the CPU", flush=True)
        with _seeded_on("cpu", seed):
            return make()


def _finish(module, device, dtype):
    if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op
        module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


def attention_layer(device, dtype, seed: int = 0):
    """SD-1.5's highest-resolution self-attention layer (320 channels, 8 heads of 40), random weights."""
    from diffusers.models.attention_processor import Attention

    with _seeded_on("cpu", seed):
        attn = Attention(query_dim=320, heads=8, dim_head=40)
    return _finish(attn, device, dtype)


def sd15_unet(device, dtype, seed: int = 0):
    """SD-1.5's UNet architecture (860M parameters) with random weights: the real model's cost."""
    from diffusers import UNet2DConditionModel

    from stem.models import SD_DOWN_BLOCKS, SD_UP_BLOCKS

    unet = _build(lambda: UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=SD_DOWN_BLOCKS, up_block_types=SD_UP_BLOCKS, cross_attention_dim=768, attention_head_dim=8,
    ), device, seed)
    return _finish(unet, device, dtype)


def sd15_vae(device, dtype, seed: int = 1):
    """SD-1.5's VAE architecture (84M parameters) with random weights."""
    from diffusers import AutoencoderKL

    vae = _build(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ), device, seed)
    return _finish(vae, device, dtype)


def sd15_text_encoder(vocab_size: int, device, dtype, seed: int = 2):
    """SD-1.5's CLIP ViT-L/14 text encoder shape (12 layers of 768) with random weights, for `vocab_size` tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = _build(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )), device, seed)
    return _finish(encoder, device, dtype)


def sd15_parts(device, dtype):
    """`StableDiffusionParts` of SD-1.5's architecture with random weights (the tokenizer is the tiny one)."""
    from stem.models import StableDiffusionParts, _tiny_tokenizer, sd_ddim_scheduler

    tokenizer = _tiny_tokenizer()  # its cost is irrelevant; the encoder has SD-1.5's shape
    return StableDiffusionParts(sd15_unet(device, dtype), sd15_vae(device, dtype),
                                sd15_text_encoder(len(tokenizer), device, dtype), tokenizer, sd_ddim_scheduler(),
                                SD15_MODEL_ID, torch.device(device), dtype)


def tiny_parts(device, dtype):
    """The built-in tiny-random model (tests, dry runs)."""
    from stem.models import build_tiny

    return build_tiny(device=device, dtype=dtype)


def bench_parts(kind: str, device, dtype):
    """"sd15" (the real cost) or "tiny" (tests) parts."""
    return sd15_parts(device, dtype) if kind == "sd15" else tiny_parts(device, dtype)


def bench_unet(kind: str, device, dtype):
    """Only the UNet of `bench_parts` (the inversion and editing benches need nothing else)."""
    return sd15_unet(device, dtype) if kind == "sd15" else tiny_parts(device, dtype).unet


def unet_only_parts(kind: str, device, dtype, model_id: str = "bench"):
    """`bench_unet` with SD's DDIM scheduler and the tiny tokenizer (FateZero's word maps need one), no VAE or
    text encoder: the editing benches start from latents and embeddings."""
    from stem.models import StableDiffusionParts, _tiny_tokenizer, sd_ddim_scheduler

    return StableDiffusionParts(bench_unet(kind, device, dtype), None, None, _tiny_tokenizer(), sd_ddim_scheduler(),
                                model_id, torch.device(device), dtype)
