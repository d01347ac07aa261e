"""Metrics against independent formulas and exact identities."""

import json

import cv2
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from stem.metrics import (
    PSNR_CAP, psnr, reconstruction_metrics, source_motion, ssim, warp_error, warp_error_per_pair,
)

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def random_video(shape=(3, 32, 40, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def add_noise(video, std, seed=1):
    noise = np.random.default_rng(seed).normal(0, std, video.shape)
    return np.clip(video + noise, 0, 255).round().astype(np.uint8)


def smooth_texture(height, width, seed=0):
    """A high-contrast blurred-noise image: texture that optical flow can follow."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.float32)
    texture = cv2.GaussianBlur(noise, (0, 0), 2)
    return np.clip((texture - texture.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def translating_video(num_frames=8, step=2, height=96, width=128):
    """A texture sliding left by `step` pixels a frame."""
    texture = smooth_texture(height + 20, width + step * num_frames + 20)
    return np.stack([texture[10:10 + height, 10 + step * t:10 + step * t + width] for t in range(num_frames)])


# ---- psnr


def test_psnr_matches_formula():
    a, b = random_video(), random_video(seed=1)
    expected = [10 * np.log10(255.0**2 / np.mean((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b)]
    np.testing.assert_allclose(psnr(a, b), expected, rtol=1e-12)
    assert psnr(a, b).dtype == np.float64 and psnr(a, b).shape == (3,)


def test_psnr_identical_frames_are_capped():
    a = random_video()
    b = a.copy()
    b[1, 0, 0, 0] ^= 1  # one frame differs by one level in one pixel: finite, about 93 dB
    values = psnr(a, b)
    assert values[0] == PSNR_CAP == 100.0 and values[2] == PSNR_CAP
    assert 80 < values[1] < PSNR_CAP


# ---- ssim


def reference_ssim(x, y):
    """Per-pixel windowed SSIM with an explicit 11x11 Gaussian, 'valid' region, channel mean."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for c in range(3):
        px = sliding_window_view(x[..., c].astype(np.float64), (11, 11))  # (H-10, W-10, 11, 11)
        py = sliding_window_view(y[..., c].astype(np.float64), (11, 11))
        mx, my = (px * window).sum((-2, -1)), (py * window).sum((-2, -1))
        vx = (px**2 * window).sum((-2, -1)) - mx**2
        vy = (py**2 * window).sum((-2, -1)) - my**2
        cov = (px * py * window).sum((-2, -1)) - mx * my
        ssim_map = (2 * mx * my + C1) * (2 * cov + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
        values.append(ssim_map.mean())
    return np.mean(values)


def test_ssim_matches_reference():
    a = np.stack([smooth_texture(30, 36, seed=s) for s in range(2)])
    b = add_noise(a, 20)
    expected = [reference_ssim(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-6)


def test_ssim_of_identical_is_one():
    a = random_video()
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)


def test_ssim_decreases_with_noise():
    a = np.stack([smooth_texture(64, 64)])
    scores = [ssim(a, add_noise(a, std))[0] for std in (2, 8, 20, 50)]
    assert all(s0 > s1 for s0, s1 in zip(scores, scores[1:]))
    assert scores[0] > 0.95 and scores[-1] < 0.5


@pytest.mark.parametrize("mx, my", [(100, 100), (30, 200), (0, 255), (128, 127)])
def test_ssim_of_constant_images_is_closed_form(mx, my):
    a = np.full((1, 24, 24, 3), mx, np.uint8)
    b = np.full((1, 24, 24, 3), my, np.uint8)
    expected = (2 * mx * my + C1) / (mx**2 + my**2 + C1)
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-6)


def test_ssim_is_symmetric():
    a, b = random_video(), random_video(seed=2)
    np.testing.assert_allclose(ssim(a, b), ssim(b, a), rtol=1e-12)


def test_ssim_small_frames():
    a = random_video((2, 8, 8, 3))
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        psnr(random_video(), random_video((3, 32, 48, 3)))
    with pytest.raises(ValueError):
        ssim(random_video().astype(np.float32), random_video())


# ---- warp error


def test_warp_error_near_zero_for_the_source_itself():
    source = translating_video()
    assert warp_error(source, source) < 1e-4


def test_warp_error_with_the_sources_motion_computed_once_is_the_same():
    source = translating_video()
    noisy = add_noise(source, 20)
    motion = source_motion(source)
    assert warp_error(source, noisy, motion) == warp_error(source, noisy)
    assert reconstruction_metrics(source, noisy, motion=motion) == reconstruction_metrics(source, noisy)


def test_warp_error_large_for_shuffled_or_noise():
    source = translating_video()
    steady = warp_error(source, source)
    shuffled = source[[3, 0, 6, 1, 7, 2, 5, 4]]
    noise = random_video(source.shape, seed=3)
    assert warp_error(source, shuffled) > 100 * max(steady, 1e-6)
    assert warp_error(source, noise) > 100 * max(steady, 1e-6)
    assert warp_error(source, noise) > 0.05


def test_warp_error_follows_the_source_motion():
    """An output that moves with the source but looks different is still steady."""
    source = translating_video()
    recoloured = (255 - source)  # same motion, inverted colours
    assert warp_error(source, recoloured) < 1e-4
    still = np.repeat(source[:1], len(source), 0)  # does not follow the motion
    assert warp_error(source, still) > 100 * warp_error(source, recoloured)


def test_warp_error_static_and_single_frame():
    static = np.repeat(smooth_texture(64, 80)[None], 5, 0)
    assert warp_error(static, static) < 1e-6
    assert warp_error(static[:1], static[:1]) == 0.0
    assert warp_error_per_pair(static, static).shape == (4,)


# ---- summary


def test_reconstruction_metrics_keys_and_json():
    source = translating_video(num_frames=4, height=64, width=64)
    reconstruction = add_noise(source, 6)
    vae = add_noise(source, 2, seed=5)
    metrics = reconstruction_metrics(source, reconstruction, vae_roundtrip=vae)
    expected = {"psnr", "ssim", "psnr_per_frame", "ssim_per_frame", "warp_error", "psnr_vae", "ssim_vae", "psnr_vs_vae"}
    assert expected <= set(metrics)
    json.loads(json.dumps(metrics, allow_nan=False))  # plain, finite Python numbers
    assert metrics["psnr"] == pytest.approx(np.mean(psnr(source, reconstruction)))
    assert metrics["ssim_per_frame"] == pytest.approx(list(ssim(source, reconstruction)))
    assert metrics["warp_error"] == pytest.approx(warp_error(source, reconstruction))
    assert metrics["psnr_vae"] > metrics["psnr"]  # the round trip is the ceiling here
    assert "psnr_vae" not in reconstruction_metrics(source, source)
    assert reconstruction_metrics(source, source)["psnr"] == PSNR_CAP
