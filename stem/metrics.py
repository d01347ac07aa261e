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


def warp_error(source: np.ndarray, output: np.ndarray, motion: list | None = None) -> float:
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
        motion: `source_motion(source)`, when several videos are judged against one source.

    Returns:
        The warp error, a float >= 0.
    """
    return _mean_finite(warp_error_per_pair(source, output, motion))


def warp_error_per_pair(source: np.ndarray, output: np.ndarray, motion: list | None = None) -> np.ndarray:
    """The warp error of each consecutive pair, as defined in `warp_error`.

    Args:
        source: (N, H, W, 3) uint8.
        output: (N, H, W, 3) uint8.
        motion: optional `source_motion(source)`.

    Returns:
        (N - 1,) float64; nan for a pair where every pixel is occluded.
    """
    source, output = _check_pair(source, output)
    return _warp_errors(source, [output], motion)[0]


def source_motion(source: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The source's motion as `warp_error` uses it (per pair: remap grids and valid mask), to judge several
    videos against one source without estimating its optical flow again (9 bytes per pixel per pair)."""
    return list(_source_warps(source))


def _warp_errors(source: np.ndarray, outputs: list[np.ndarray], motion: list | None = None) -> np.ndarray:
    """(len(outputs), N - 1) warp errors of several outputs, estimating the source's flow once per pair."""
    errors = np.empty((len(outputs), len(source) - 1))
    for t, (map_x, map_y, valid) in enumerate(_source_warps(source) if motion is None else motion):
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
    source: np.ndarray, reconstruction: np.ndarray, vae_roundtrip: np.ndarray | None = None, motion: list | None = None,
) -> dict:
    """How well a reconstruction matches its source, as JSON-ready plain Python numbers.

    Args:
        source: (N, H, W, 3) uint8, the input video.
        reconstruction: (N, H, W, 3) uint8, e.g. inversion followed by regeneration.
        vae_roundtrip: optional (N, H, W, 3) uint8, the source encoded and decoded by the VAE alone:
            the best any latent-space method can do.
        motion: optional `source_motion(source)`.

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
    warp_errors = _warp_errors(source, [reconstruction, source], motion)
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


# -- CLIP metrics of edits ---------------------------------------------------------------------
#
# Computed on unit-length CLIP embeddings, all cosines (not scaled by 100 or by CLIP's logit scale):
#   clip_text  TokenFlow's edit fidelity: the mean over frames of cos(frame, target prompt).
#   frame_acc  FateZero's Frame-Acc: the share of frames with cos(frame, target) >= cos(frame, source);
#              FateZero compares the softmax of CLIP's logits over [source, target], which orders the
#              same way (a tie counts as a success there too).
#   tem_con    FateZero's Tem-Con: the mean cos(frame t, frame t+1) over consecutive pairs.

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # ViT-B/32, the CLIP FateZero's scripts load
TINY_CLIP = "tiny-random"
TINY_CLIP_WARNING = ("Using the built-in 'tiny-random' CLIP: random weights, so clip_text, frame_acc and tem_con "
                     "mean nothing (for tests and offline smoke runs).")
TINY_CLIP_SIZE = 32  # pixels of its square input


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float64."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_text_alignment(image_embeds: np.ndarray, text_embed: np.ndarray) -> float:
    """Mean cosine similarity of each frame's CLIP embedding to a prompt's (TokenFlow's edit fidelity).

    Args:
        image_embeds: (N, D) CLIP image embeddings of the frames (any length).
        text_embed: (D,) CLIP text embedding of the prompt.

    Returns:
        The mean over frames of cos(frame, prompt), in [-1, 1].
    """
    return float((_unit_rows(image_embeds) @ _unit_rows(text_embed)).mean())


def frame_accuracy(image_embeds: np.ndarray, source_embed: np.ndarray, target_embed: np.ndarray) -> float:
    """FateZero's Frame-Acc: the share of frames closer to the target prompt than to the source prompt.

    Args:
        image_embeds: (N, D) CLIP image embeddings of the edited frames.
        source_embed: (D,) CLIP text embedding of the source prompt.
        target_embed: (D,) CLIP text embedding of the target prompt.

    Returns:
        In [0, 1]: the fraction of frames with cos(frame, target) >= cos(frame, source).
    """
    frames = _unit_rows(image_embeds)
    return float((frames @ _unit_rows(target_embed) >= frames @ _unit_rows(source_embed)).mean())


def temporal_consistency(image_embeds: np.ndarray) -> float:
    """FateZero's Tem-Con: the mean cosine similarity of consecutive frames' CLIP image embeddings.

    Args:
        image_embeds: (N, D) CLIP image embeddings of the frames, in order.

    Returns:
        The mean over t of cos(frame t, frame t+1), in [-1, 1]; 1.0 for a single frame.
    """
    frames = _unit_rows(image_embeds)
    if len(frames) < 2:
        return 1.0
    return float((frames[:-1] * frames[1:]).sum(-1).mean())


class ClipScorer:
    """A CLIP model (transformers' `CLIPModel`) that embeds frames and prompts, and scores edits with them."""

    def __init__(self, model, tokenizer, image_processor, name: str):
        self.model, self.tokenizer, self.image_processor, self.name = model, tokenizer, image_processor, name

    @property
    def device(self):
        return next(self.model.parameters()).device

    def embed_frames(self, frames: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, H, W, 3) uint8 frames -> (N, D) float64 unit CLIP image embeddings.

        The frames go through the model's own image processor: the short side resized (bicubic) to
        CLIP's input size, a centred square crop, CLIP's mean/std normalisation.
        """
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(frames), batch_size):
                pixels = self.image_processor(images=list(frames[start:start + batch_size]), return_tensors="pt",
                                              input_data_format="channels_last")
                features = self.model.get_image_features(pixel_values=_pixel_values_on(pixels, self.model))
                out.append(_pooled(features).float().cpu().numpy())
        return _unit_rows(np.concatenate(out))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Prompts -> (P, D) float64 unit CLIP text embeddings (truncated to CLIP's 77 tokens)."""
        import torch

        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device))
        return _unit_rows(_pooled(features).float().cpu().numpy())

    def edit_metrics(self, frames: np.ndarray, source_prompt: str, target_prompt: str) -> dict:
        """clip_text, frame_acc and tem_con of an edited video (see the definitions above), JSON-ready.

        Args:
            frames: (N, H, W, 3) uint8, the edited video.
            source_prompt: the text that describes the source video.
            target_prompt: the text the edit was asked to match.
        """
        images = self.embed_frames(frames)
        source, target = self.embed_texts([source_prompt, target_prompt])
        return {"clip_model": self.name, "clip_text": clip_text_alignment(images, target),
                "frame_acc": frame_accuracy(images, source, target), "tem_con": temporal_consistency(images)}


def _pixel_values_on(pixels, model):
    """The processor's pixel_values on the model's device and dtype."""
    p = next(model.parameters())
    return pixels["pixel_values"].to(device=p.device, dtype=p.dtype)


def _pooled(features):
    """transformers 5 returns a model output with the projected embeddings as pooler_output; 4.x the tensor."""
    return features if hasattr(features, "float") else features.pooler_output


def _image_processor_class():
    """transformers' PIL-based CLIP image processor (the same resize everywhere, torchvision or not)."""
    try:
        from transformers import CLIPImageProcessorPil  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


def build_tiny_clip(device=None, seed: int = 0) -> ClipScorer:
    """A CLIP with small, seeded random weights built in code (32x32 input, 16-d embeddings), for tests."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from .models import _tiny_tokenizer, default_device

    tokenizer = _tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TINY_CLIP_SIZE, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = _image_processor_class()(size={"shortest_edge": TINY_CLIP_SIZE},
                                         crop_size={"height": TINY_CLIP_SIZE, "width": TINY_CLIP_SIZE})
    model = model.to(device if device is not None else default_device()).eval().requires_grad_(False)
    return ClipScorer(model, tokenizer, processor, TINY_CLIP)


def load_clip(name: str = DEFAULT_CLIP_MODEL, device=None) -> ClipScorer:
    """Load a CLIP model for the edit metrics: a hub id or local folder (local files first), or tiny-random.

    Args:
        name: e.g. `openai/clip-vit-base-patch32`, a folder saved by `CLIPModel.save_pretrained` with its
            tokenizer and image processor, or `tiny-random` (random weights, with a warning).
        device: defaults to CUDA, then MPS, then CPU; the model runs in float32.

    Raises:
        StemError: the model cannot be loaded (no such folder, offline and not in the local hub cache, ...).
    """
    import warnings
    from pathlib import Path

    import torch

    from .errors import StemError
    from .models import _is_offline, default_device

    device = device if device is not None else default_device()
    if name == TINY_CLIP:
        warnings.warn(TINY_CLIP_WARNING, stacklevel=2)
        return build_tiny_clip(device)
    from transformers import CLIPModel, CLIPTokenizer

    local = Path(name).expanduser()
    if not local.is_dir() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise StemError(f"The CLIP model folder {name!r} does not exist; pass an existing folder, a hub id such as "
                        f"{DEFAULT_CLIP_MODEL}, or tiny-random.")
    source = str(local) if local.is_dir() else name

    def load(local_files_only: bool):
        kw = dict(local_files_only=local_files_only)
        return (CLIPModel.from_pretrained(source, **kw), CLIPTokenizer.from_pretrained(source, **kw),
                _image_processor_class().from_pretrained(source, **kw))

    try:
        try:  # a folder, or a hub id already in the local hub cache: no network at all
            model, tokenizer, processor = load(local_files_only=True)
        except Exception:
            if local.is_dir() or _is_offline():
                raise
            model, tokenizer, processor = load(local_files_only=False)
    except Exception as error:  # hub, network and file-format errors all mean "cannot load this model"
        if local.is_dir():
            raise StemError(f"Could not load a CLIP model from the folder {name!r} ({type(error).__name__}); it needs "
                            "the files of CLIPModel.save_pretrained with its tokenizer and image processor.") from error
        how = "the Hugging Face Hub is not reachable (offline mode is on)" if _is_offline() else \
            "it could not be downloaded from the Hugging Face Hub (no network, or no such model)"
        raise StemError(f"Could not load the CLIP model {name!r}: it is not a local folder and {how}; pass a local "
                        "CLIP folder with --clip-model /path/to/clip, or --clip-model tiny-random for an offline "
                        "smoke run.") from error
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return ClipScorer(model, tokenizer, processor, name)
