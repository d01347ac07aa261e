"""Reconstruction and temporal-consistency metrics on uint8 RGB videos (N, H, W, 3)."""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np

PSNR_CAP = 100.0  # dB reported for identical frames (instead of inf, which JSON cannot hold)

# SSIM constants from Wang et al. 2004
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

# Farneback settings of OpenCV's sample (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags)
FARNEBACK = (0.5, 4, 15, 3, 5, 1.2, 0)


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio of every frame, in dB (data range 255).

    Args:
        reference: (N, H, W, 3) uint8.
        test: (N, H, W, 3) uint8.

    Returns:
        (N,) float64; identical frames give PSNR_CAP (100 dB) rather than inf, and no value exceeds it.
    """
    reference, test = _check_pair(reference, test)
    mse = ((reference.astype(np.float64) - test.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(values, PSNR_CAP)


def ssim(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) of every frame.

    Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, computed on each RGB channel.
    The SSIM map is averaged over the 'valid' region (the 5-pixel border, where the window would leave
    the image, is dropped, as in the reference MATLAB code and skimage), then over the channels.
    Frames smaller than the window use the whole map, with reflected borders.

    Args:
        reference: (N, H, W, 3) uint8.
        test: (N, H, W, 3) uint8.

    Returns:
        (N,) float64 in [-1, 1]; 1 for identical frames.
    """
    reference, test = _check_pair(reference, test)
    return np.array([_ssim_frame(x, y) for x, y in zip(reference, test)])


def _ssim_frame(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of one (H, W, C) frame pair, averaged over channels."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    c = x.shape[-1]
    # blur the five local statistics in one call: (H, W, 5C)
    stats = _blur(np.concatenate([x, y, x * x, y * y, x * y], axis=-1))
    mu_x, mu_y, xx, yy, xy = (stats[..., i * c:(i + 1) * c] for i in range(5))
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    ssim_map = num / den
    pad = SSIM_WINDOW // 2
    if min(ssim_map.shape[:2]) > 2 * pad:
        ssim_map = ssim_map[pad:-pad, pad:-pad]
    return float(ssim_map.mean())


def _blur(image: np.ndarray) -> np.ndarray:
    """The SSIM Gaussian window applied to every channel."""
    return cv2.GaussianBlur(image, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)


def warp_error(source: np.ndarray, output: np.ndarray) -> float:
    """Temporal warp error of `output`, using motion estimated on `source`; lower is steadier.

    For each pair (t, t+1): Farneback optical flow is computed on the grayscale SOURCE frames, backward
    b (t+1 -> t) and forward f (t -> t+1). Output frame t is warped onto t+1 by backward warping,
    warped(p) = output[t](p + b(p)) (bilinear, cv2.remap). A pixel p counts when it is not occluded:
    p + b(p) lies inside the frame and the flows agree,
        |b(p) + f(p + b(p))|^2 < 0.01 (|b(p)|^2 + |f(p + b(p))|^2) + 0.5.
    The pair's error is the mean over counted pixels and RGB channels of (output[t+1] - warped)^2 with
    pixels scaled to [0, 1]; the warp error is the mean over pairs (pairs with no counted pixel are
    skipped). A single frame gives 0.0.

    Args:
        source: (N, H, W, 3) uint8, the video the motion is taken from.
        output: (N, H, W, 3) uint8, the video judged (e.g. a reconstruction or an edit of `source`).

    Returns:
        The warp error, a float >= 0.
    """
    return _mean_finite(warp_error_per_pair(source, output))


def warp_error_per_pair(source: np.ndarray, output: np.ndarray) -> np.ndarray:
    """The warp error of each consecutive pair, as defined in `warp_error`.

    Args:
        source: (N, H, W, 3) uint8.
        output: (N, H, W, 3) uint8.

    Returns:
        (N - 1,) float64; nan for a pair where every pixel is occluded.
    """
    source, output = _check_pair(source, output)
    return _warp_errors(source, [output])[0]


def _warp_errors(source: np.ndarray, outputs: list[np.ndarray]) -> np.ndarray:
    """(len(outputs), N - 1) warp errors of several outputs, estimating the source's flow once per pair."""
    errors = np.empty((len(outputs), len(source) - 1))
    for t, (map_x, map_y, valid) in enumerate(_source_warps(source)):
        for k, output in enumerate(outputs):
            errors[k, t] = _pair_error(output[t], output[t + 1], map_x, map_y, valid)
    return errors


def _source_warps(source: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each pair (t, t+1) of the source: remap grids (map_x, map_y) from frame t+1 onto t, and the valid mask."""
    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in source]
    h, w = gray[0].shape
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    for prev, nxt in zip(gray[:-1], gray[1:]):
        backward = cv2.calcOpticalFlowFarneback(nxt, prev, None, *FARNEBACK)  # (H, W, 2): t+1 -> t
        forward = cv2.calcOpticalFlowFarneback(prev, nxt, None, *FARNEBACK)  # (H, W, 2): t -> t+1
        map_x, map_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
        forward_at = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # consistency check of Sundaram et al. 2010 / Ruder et al. 2016: the round trip must come back
        mismatch = ((backward + forward_at) ** 2).sum(-1)
        magnitude = (backward**2).sum(-1) + (forward_at**2).sum(-1)
        inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        yield map_x, map_y, inside & (mismatch < 0.01 * magnitude + 0.5)


def _pair_error(prev: np.ndarray, nxt: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, valid: np.ndarray) -> float:
    """Mean squared difference over valid pixels between nxt and prev warped onto it, pixels in [0, 1]."""
    if not valid.any():
        return np.nan
    warped = cv2.remap(prev.astype(np.float32) / 255.0, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    squared = (nxt.astype(np.float32) / 255.0 - warped) ** 2  # (H, W, 3)
    return float(squared[valid].mean(dtype=np.float64))


def reconstruction_metrics(
    source: np.ndarray, reconstruction: np.ndarray, vae_roundtrip: np.ndarray | None = None
) -> dict:
    """How well a reconstruction matches its source, as JSON-ready plain Python numbers.

    Args:
        source: (N, H, W, 3) uint8, the input video.
        reconstruction: (N, H, W, 3) uint8, e.g. inversion followed by regeneration.
        vae_roundtrip: optional (N, H, W, 3) uint8, the source encoded and decoded by the VAE alone:
            the best any latent-space method can do.

    Returns:
        psnr, ssim: means over frames of the reconstruction against the source;
        psnr_per_frame, ssim_per_frame: lists of floats;
        warp_error: of the reconstruction (see `warp_error`); warp_error_source: of the source itself,
            the floor set by flow errors, lighting and noise;
        with vae_roundtrip: psnr_vae, ssim_vae (round trip against the source: the ceiling) and
            psnr_vs_vae, ssim_vs_vae (reconstruction against the round trip).
    """
    source, reconstruction = _check_pair(source, reconstruction)
    psnrs, ssims = psnr(source, reconstruction), ssim(source, reconstruction)
    warp_errors = _warp_errors(source, [reconstruction, source])
    metrics = {
        "psnr": float(psnrs.mean()),
        "ssim": float(ssims.mean()),
        "psnr_per_frame": [float(v) for v in psnrs],
        "ssim_per_frame": [float(v) for v in ssims],
        "warp_error": _mean_finite(warp_errors[0]),
        "warp_error_source": _mean_finite(warp_errors[1]),
    }
    if vae_roundtrip is not None:
        metrics["psnr_vae"] = float(psnr(source, vae_roundtrip).mean())
        metrics["ssim_vae"] = float(ssim(source, vae_roundtrip).mean())
        metrics["psnr_vs_vae"] = float(psnr(vae_roundtrip, reconstruction).mean())
        metrics["ssim_vs_vae"] = float(ssim(vae_roundtrip, reconstruction).mean())
    return metrics


def _mean_finite(values: np.ndarray) -> float:
    """Mean of the finite values, 0.0 when there are none."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else 0.0


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both videos must be (N, H, W, 3) uint8 of the same shape."""
    a, b = np.asarray(a), np.asarray(b)
    for video in (a, b):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"expected (N, H, W, 3) uint8 videos, got {video.shape} {video.dtype}")
        if video.shape[0] == 0:
            raise ValueError("expected at least one frame, got an empty video")
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got {a.shape} and {b.shape}")
    return a, b
