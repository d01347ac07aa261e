"""The inversion job: settings, the cached trajectory, reconstruction. Tensors in, tensors out.

`Engine` holds one loaded model and one latent cache and is shared by the command line and the
app. `Engine.invert(video, settings)` returns the DDIM trajectory of the video under the chosen
self-attention mode plus its reconstruction, from the cache when the same frames were inverted
with the same settings before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .attention import METHODS, AttentionState, attention_mode
from .cache import CacheEntry, LatentCache, frames_digest, job_key, misfit
from .errors import StemError
from .inversion import (
    Callback, NonFiniteLatents, call_unet, ddim_invert, ddim_sample, ddim_schedule, decode_latents, encode_frames,
    encode_prompt, in_phase, to_epsilon,
)
from .memory import Job, MemoryPlan, ModelFacts, available_bytes, plan, unplanned
from .control import (
    CONTROL_KINDS,
    DEFAULT_CONTROL_MODELS,
    DEFAULT_DEPTH_MODEL,
    TINY_CONTROL,
    Control,
    canny_conditions,
    depth_conditions,
    load_controlnet,
    load_depth_estimator,
)
from .models import (
    DEFAULT_MODEL, TINY_MODEL, StableDiffusionParts, default_device, fingerprint_for, load_models, resolve_dtype,
)
from .settings import SettingError, check, metrics, setting
from .video import DEFAULT_MAX_FRAMES, Video

MAX_STEPS = 1000
MAX_BASES = 4096
MAX_ITERS = 100
MAX_CANNY = 255 * 4  # cv2.Canny's gradient magnitudes (L1 of two 3x3 Sobels) stay below this


def _stem(s) -> bool:
    return s.method == "stem"  # K, R and the seed only matter for STEM


def _controlled(s) -> bool:
    return s.control != "none"


def _canny(s) -> bool:
    return s.control == "canny"


def _depth(s) -> bool:
    return s.control == "depth"

# A job's callback gets one dict per step (`stem.inversion.Callback`): {"phase": ..., "i": done, "total": ...}, phases
# "loading", "encoding", "inverting", "reconstructing", "decoding" (and an edit's "editing"); sampling steps add "x".


@dataclass(frozen=True)
class InversionSettings:
    """Everything that defines one inversion job; frozen and hashable (it is the cache key)."""

    model: str = setting(DEFAULT_MODEL, label="Model", words="the model", faces={"cli", "metrics"},
                         help="diffusers SD 1.x/2.x hub id or local folder, or tiny-random")
    method: str = setting("stem", label="Inversion method", words="the inversion method", choices=METHODS,
                          choice_labels={"stem": "STEM", "ddim": "DDIM", "inflated": "Inflated DDIM"},
                          help="how frames see each other while inverting: stem (K bases shared by all frames), ddim "
                               "(each frame alone) or inflated (every frame's keys, slow); a steadier inversion "
                               "gives a steadier edit")
    num_bases: int = setting(256, label="Bases K (STEM)", words="the number of bases K", flag="--bases", minimum=1,
                             maximum=MAX_BASES, step=1, note="the paper uses 256", when=_stem, page_range=(1, 1024),
                             help="STEM: K bases per layer; more are closer to full attention over all frames "
                                  "(steadier) and slower; the paper uses 256")
    num_iters: int = setting(5, label="EM iterations R (STEM)", words="the number of EM iterations R",
                             flag="--iters", minimum=1, maximum=MAX_ITERS, step=1, note="the paper uses 5", when=_stem,
                             page_range=(1, 20), help="STEM: R EM iterations that fit the bases to the clip; more fit "
                                                       "them better, each costs time; the paper uses 5")
    num_steps: int = setting(
        50,
        label="DDIM steps",
        words="the number of DDIM steps",
        flag="--steps",
        minimum=1,
        maximum=MAX_STEPS,
        step=1,
        note="50 is usual",
        page_range=(1, 100),
        help="DDIM steps T of the inversion and the edit: more are more faithful and slower (cost grows linearly)",
    )
    num_frames: int | None = setting(None, label="Frames", words="the number of frames", flag="--frames", minimum=1,
                                     step=1, faces={"cli", "app", "api"},  # metrics.json records the video's count
                                     page_range=(0, DEFAULT_MAX_FRAMES),  # 0 on the page: all
                                     help="how many frames to invert and edit (none or 0: all, up to the frame limit); "
                                          "cost grows with the frames")
    stride: int = setting(1, label="Stride (every n-th frame)", words="the stride", minimum=1, step=1,
                          page_range=(1, 8), help="keep every n-th frame: a longer stretch of the clip in the same "
                                                  "frames; the result plays faster")
    size: int = setting(512, label="Size (long side, px)", words="the size", minimum=64, maximum=2048, step=32,
                        note="pixels on the long side", page_range=(64, 1024),
                        help="the frames' long side in pixels (rounded to multiples of 8): larger is sharper; cost "
                             "grows with the square of the size")
    prompt: str = setting("", label="Source prompt", words="the source prompt", flag="--source-prompt",
                          help="describes the input video; it conditions the inversion")
    seed: int = setting(0, label="Seed", words="the seed", minimum=0, maximum=2**63 - 1, when=_stem,  # torch's bound
                        help="picks STEM's initial bases (and TokenFlow's keyframes when editing); the same seed "
                             "gives the same result")
    max_frames: int = setting(DEFAULT_MAX_FRAMES, label="Frame limit", words="the frame limit", minimum=1, faces=(),
                              help="the most frames a job may use")
    control: str = setting("none", label="Structure guidance", words="the structure guidance", choices=CONTROL_KINDS,
                           when=_controlled, choice_labels={"none": "None", "canny": "Canny edges", "depth": "Depth"},
                           help="none, canny (edges) or depth: a ControlNet keeps the clip's edges or depth through "
                                "the edit (in the inversion, the reconstruction and the edit)")
    control_model: str = setting(
        "",
        label="ControlNet",
        words="the ControlNet model",
        faces={"cli", "metrics"},
        when=_controlled,
        help="ControlNet hub id or folder (default: lllyasviel's SD 1.5 v1.1 canny "
        "/ depth ControlNet; tiny-random's own for the tiny-random model)",
    )
    control_scale: float = setting(1.0, label="Structure strength", words="the structure strength", minimum=0,
                                   step=0.05, note="1.0 is the release's", when=_controlled, page_range=(0, 2),
                                   help="how strongly the edges or depth hold the shape (the ControlNet's "
                                        "conditioning scale): 0 is no guidance, 1 the ControlNet's usual")
    canny_low: int = setting(100, label="Canny low threshold", words="the lower canny threshold", minimum=0,
                             maximum=MAX_CANNY, faces={"cli", "metrics"}, when=_canny,
                             help="canny: lower cv2.Canny threshold")
    canny_high: int = setting(200, label="Canny high threshold", words="the upper canny threshold", minimum=0,
                              maximum=MAX_CANNY, faces={"cli", "metrics"}, when=_canny,
                              help="canny: upper cv2.Canny threshold")
    depth_model: str = setting(
        "",
        label="Depth model",
        words="the depth model",
        faces={"cli", "metrics"},
        when=_depth,
        help="depth: transformers depth-estimation hub id or folder (default: "
        "depth-anything/Depth-Anything-V2-Small-hf; tiny-random's own for the tiny-random model)",
    )

    def validate(self) -> "InversionSettings":
        """Raise SettingError with one sentence (in words) for the first setting out of range."""
        check(self)
        if self.num_frames is not None and self.num_frames > self.max_frames:
            raise SettingError("num_frames", f"The number of frames must be between 1 and {self.max_frames}, "
                               f"got {self.num_frames}.", InversionSettings)
        if self.canny_low > self.canny_high:
            raise SettingError("canny_low", f"The lower canny threshold must not be above the upper one (100 and 200 "
                               f"are the release's), got {self.canny_low} and {self.canny_high}.", InversionSettings)
        return self

    def control_ids(self) -> tuple[str, str]:
        """The ControlNet and depth model this job uses ("" defaults resolved; tiny-random's own for tiny-random)."""
        tiny = self.model == TINY_MODEL
        net = self.control_model or (TINY_CONTROL if tiny else DEFAULT_CONTROL_MODELS.get(self.control, ""))
        depth = self.depth_model or (TINY_CONTROL if tiny else DEFAULT_DEPTH_MODEL)
        return net, depth

    def result_fields(self) -> dict:
        """The settings that change the inverted latents (K and R only matter for STEM)."""
        fields = {"model": self.model, "method": self.method, "num_steps": self.num_steps,
                  "prompt": self.prompt}
        if self.method == "stem":
            fields.update(num_bases=self.num_bases, num_iters=self.num_iters, seed=self.seed)
        if self.control != "none":  # "none" keeps the keys of uncontrolled jobs as they were
            net, depth = self.control_ids()
            fields.update(control=self.control, control_model=net, control_scale=float(self.control_scale))
            fields.update(dict(canny_low=self.canny_low, canny_high=self.canny_high) if self.control == "canny" else
                          dict(depth_model=depth))
        return fields


@dataclass
class InversionResult:
    """An inverted video: the trajectory, and its reconstruction under the same attention mode."""

    settings: InversionSettings
    key: str
    trajectory: torch.Tensor       # (T + 1, N, 4, h, w) float32, CPU: x_0 .. x_T
    timesteps: torch.Tensor        # (T,) ascending
    reconstruction: np.ndarray     # (N, H, W, 3) uint8
    vae_roundtrip: np.ndarray      # (N, H, W, 3) uint8: decode(encode(frames)), the ceiling
    cache_hit: bool
    seconds: float                 # inversion + reconstruction (cache load on a hit)
    cache_warning: str | None = None  # why a computed result is not in the cache (also warned), else None

    @property
    def inverted_latents(self) -> torch.Tensor:
        """(N, 4, h, w) x_T, the inverted noise."""
        return self.trajectory[-1]


class Engine:
    """One model (loaded on first use) and one latent cache, shared across jobs.

    The engine keeps nothing one job writes for the next: a job's memory plan is a value
    (`plan = engine.plan(video, settings, edit)`) handed to `invert` and the editors, and what it
    switches on shared parts (VAE tiling, a streamed UNet) is switched back when the job ends.

    Memory: `dtype` is a torch dtype or its name ("float16", "bfloat16", "float32"; default fp16 on
    GPUs, fp32 on the CPU). `offload` keeps the components on the CPU and moves each to the GPU in
    turn (`stem.offload`). On a CUDA device (or whenever `memory_budget`, a function returning the
    bytes a job may use, is given) `plan` estimates the job's peak memory (`stem.memory`) and chooses
    the UNet chunk (unless one is asked for) and the VAE batch that fit, or refuses the job with one
    sentence before any work.
    """

    def __init__(self, model: str = DEFAULT_MODEL, device=None, dtype=None, cache: LatentCache | None = None,
                 offload: bool = False, memory_budget: Callable[[], int] | None = None, em_kernel: str = "auto"):
        self.model = model
        self.device = device
        self.dtype = dtype
        resolve_dtype(dtype, device if device is not None else default_device())  # a bad dtype fails now
        self.em_kernel = choose_em_kernel(em_kernel, device if device is not None else default_device())
        self.cache = cache if cache is not None else LatentCache()
        self.offload = offload
        self.memory_budget = memory_budget
        self._offload = None
        self._parts: StableDiffusionParts | None = None
        self._controlnets: dict = {}   # ControlNet id -> module, loaded on first use
        self._conditions: dict = {}    # (frames digest, kind, thresholds / depth model) -> (N, 3, H, W) float32 CPU

    @property
    def parts(self) -> StableDiffusionParts:
        """The model's components, loaded on first use."""
        if self._parts is None:
            if not self.offload:
                self._parts = load_models(self.model, self.device, self.dtype)
            else:  # loaded on the CPU in the GPU's dtype; each part moves to the GPU when it runs
                device = torch.device(self.device) if self.device is not None else default_device()
                self._use_offload(load_models(self.model, "cpu", resolve_dtype(self.dtype, device)), device)
        return self._parts

    def _use_offload(self, parts: StableDiffusionParts, device) -> None:
        from .offload import Offload

        self._offload = Offload(parts, device)
        parts.device = torch.device(device)
        self._parts = parts

    def load(self, callback: Callback | None = None) -> StableDiffusionParts:
        """Load the model now (reporting a "loading" phase) unless it is loaded already."""
        if self._parts is None and callback is not None:
            callback({"phase": "loading", "i": 0, "total": 1})
            _ = self.parts  # the property loads the model
            callback({"phase": "loading", "i": 1, "total": 1})
        return self.parts

    def use_parts(self, parts: StableDiffusionParts) -> "Engine":
        """Use already-built components (tests, benchmarks); with `offload`, they take turns on their device."""
        self._parts, self.model = parts, parts.model_id
        if self.offload:
            self._use_offload(parts, parts.device)
        return self

    @classmethod
    def from_pipe(cls, pipe, model: str | None = None, **options) -> "Engine":
        """An engine over a loaded diffusers `StableDiffusionPipeline` (SD 1.x/2.x), sharing its modules.

        Args:
            pipe: the pipeline; its UNet, VAE, text encoder and tokenizer are used as they are (device, dtype),
                its scheduler's config makes the DDIM scheduler (clip_sample off, as `load_models` does).
            model: the name jobs give as `InversionSettings.model` (default: the pipeline's `name_or_path`).
            options: more `Engine` arguments (cache, offload, memory_budget, em_kernel).

        The cache keys hold a digest of the pipeline's configs and weights, so a changed pipeline (a fused
        LoRA, other weights under the same name) never meets another's cached inversions.
        """
        from .models import parts_from_pipe

        parts = parts_from_pipe(pipe, model)
        engine = cls(parts.model_id, device=parts.device, dtype=parts.dtype, **options)
        return engine.use_parts(parts)

    def plan(self, video: Video, settings: InversionSettings, edit=None, chunk_size: int | None = None,
             vae_batch_size: int = 4) -> MemoryPlan:
        """The memory plan of a job: the UNet chunk, the VAE batch and tiling, whether the UNet streams.

        Args:
            video: the frames (their number and size).
            settings: the inversion job.
            edit: optional edit settings (TokenFlow: its `batch_size`); the plan then covers the edit too,
                and the edit's inversion runs under it.
            chunk_size: frames per UNet call asked for (kept, or refused when it does not fit); None: the
                plan chooses (all frames at once when they fit). The result does not depend on it.
            vae_batch_size: the most frames per VAE call.

        Returns:
            A frozen `stem.memory.MemoryPlan`. Where nothing is planned (a CPU without `memory_budget`)
            it holds the chunk and VAE batch asked for, and no estimate.

        Raises:
            StemError: one sentence saying what to change when the job does not fit even one frame at a time.
        """
        settings.validate()
        parts = self.parts
        job = Job.of(video, settings, edit, self.em_kernel)
        if self.memory_budget is not None:
            budget = self.memory_budget()
        elif parts.device.type == "cuda":
            budget = available_bytes(parts.device, (parts.unet, parts.vae, parts.text_encoder))
        else:
            return unplanned(job, chunk_size, vae_batch_size)
        return plan(job, ModelFacts.of(parts), budget, chunk_size, vae_batch_size, offload=self._offload is not None)

    def _plan_for(self, video: Video, settings: InversionSettings, plan: MemoryPlan | None) -> MemoryPlan:
        """`plan`, checked to be this job's, or the job's own plan when None."""
        if plan is None:
            return self.plan(video, settings)
        if not isinstance(plan, MemoryPlan):
            raise TypeError(f"plan must be a stem.memory.MemoryPlan (from Engine.plan), got {type(plan).__name__}; "
                            "pass a progress function as callback=")
        if plan.job_key != Job.of(video, settings, em_kernel=self.em_kernel).key():
            raise StemError("This memory plan was made for another job (other frames, size, method, steps or "
                            "structure guidance); make it with engine.plan(video, settings) for this job.")
        return plan

    @contextlib.contextmanager
    def applied(self, plan: MemoryPlan):
        """Run a job under `plan`: the VAE tiles and the UNet streams as it says, and both are as before afterwards
        (an unplanned job leaves them as they are)."""
        if not plan.planned:
            yield plan
            return
        vae = self.parts.vae
        tiled = bool(getattr(vae, "use_tiling", False))
        streaming = self._offload.streaming if self._offload is not None else None
        _set_tiling(vae, plan.vae_tiling)
        if self._offload is not None:
            self._offload.stream_unet(plan.stream_unet)
        try:
            yield plan
        finally:
            _set_tiling(vae, tiled)
            if self._offload is not None:
                self._offload.stream_unet(streaming)

    def _check_model(self, settings: InversionSettings) -> None:
        if settings.model != self.model:
            raise StemError(
                f"This engine holds the model {self.model!r} but the job asks for {settings.model!r}; "
                "use one engine per model."
            )

    @property
    def model_fingerprint(self) -> str:
        """What identifies the loaded weights (hub commit, folder digest, tiny-random's build); part of every cache
        key."""
        return self.parts.fingerprint

    def model_identity(self) -> str:
        """The model fingerprint and dtype that every cache key of this engine holds, e.g.
        ``"folder:9f2c... torch.float32"``.

        Known without loading the weights when they are not loaded yet (`stem.models.fingerprint_for`), so
        a caller can tell whether a stored result was made with this model before it decides to load it.
        """
        if self._parts is not None:
            return f"{self.parts.fingerprint} {self.parts.dtype}"
        device = self.device if self.device is not None else default_device()
        return f"{fingerprint_for(self.model)} {resolve_dtype(self.dtype, device)}"

    def job_for(self, video: Video, settings: InversionSettings, plan: MemoryPlan | None = None) -> dict:
        """The full key material of inverting these frames with these settings (under `plan`, default: the job's
        own): stored in the entry, compared on load."""
        plan = self._plan_for(video, settings, plan)
        tiled = {"vae_tiling": True} if plan.vae_tiling else {}  # tiles change the latents
        control = {}
        if settings.control != "none":  # the condition frames themselves: a different condition is a different job
            cond = self.conditions(video, settings)
            control = {"control_frames": frames_digest((cond[:, 0] * 255).round().to(torch.uint8).numpy())}
        # the fused EM rounds otherwise than the streamed one (entries made before it existed are the torch path's)
        fused = {"em_kernel": "fused"} if settings.method == "stem" and self.em_kernel == "fused" else {}
        return {**settings.result_fields(), "dtype": str(self.parts.dtype), "model_fingerprint": self.model_fingerprint,
                "frames": frames_digest(video.frames), **tiled, **control, **fused}

    def conditions(self, video: Video, settings: InversionSettings) -> torch.Tensor:
        """(N, 3, H, W) float32 CPU condition frames of `video` for `settings.control`, computed once per clip."""
        _, depth_id = settings.control_ids()
        how = (settings.canny_low, settings.canny_high) if settings.control == "canny" else depth_id
        key = (frames_digest(video.frames), settings.control, how)
        if key not in self._conditions:
            if settings.control == "canny":
                cond = canny_conditions(video.frames, settings.canny_low, settings.canny_high)
            else:
                from .offload import execution_device

                estimator, processor = load_depth_estimator(depth_id, execution_device(self.parts.unet))
                cond = depth_conditions(estimator, processor, video.frames)
                del estimator
            self._conditions = {key: cond}  # one clip at a time: condition frames are as large as the video
        return self._conditions[key]

    def control_for(self, video: Video, settings: InversionSettings) -> Control | None:
        """The ControlNet and condition frames of a job (None for `control="none"`)."""
        if settings.control == "none":
            return None
        from .offload import execution_device

        parts = self.parts
        net_id, _ = settings.control_ids()
        device = execution_device(parts.unet)
        if net_id not in self._controlnets:  # with offload it waits on the CPU and takes its turn with the UNet
            net = load_controlnet(net_id, parts.unet, "cpu" if self._offload is not None else device, parts.dtype)
            if self._offload is not None:
                self._offload.add_beside_unet(net)
            self._controlnets = {net_id: net}
        net = self._controlnets[net_id]
        cond = self.conditions(video, settings).to(device=device, dtype=parts.dtype)
        return Control(net, cond, float(settings.control_scale))

    def key_for(self, video: Video, settings: InversionSettings, plan: MemoryPlan | None = None) -> str:
        """The cache key of inverting these frames with these settings (with this model, in this dtype)."""
        return job_key(self.job_for(video, settings, plan))

    def entry_spec(self, video: Video, settings: InversionSettings, timesteps: torch.Tensor) -> dict:
        """What a cache entry of this job holds: tensor name -> (dtype, shape), as `stem.cache.misfit` takes."""
        f, channels = self.parts.vae_scale_factor, self.parts.unet.config.in_channels
        return {
            "trajectory": (torch.float32, (settings.num_steps + 1, video.num_frames, channels,
                                           video.height // f, video.width // f)),
            "timesteps": (timesteps.dtype, tuple(timesteps.shape)),
            "reconstruction": (torch.uint8, video.frames.shape), "vae_roundtrip": (torch.uint8, video.frames.shape),
        }

    def _misfit(self, entry: CacheEntry, video: Video, settings: InversionSettings) -> str | None:
        """Why a cache entry's tensors cannot be this job's result (a sentence part), or None if they fit.

        Every tensor's dtype and shape is checked, float ones for NaN and inf, and the timesteps against
        this model's scheduler: whatever an entry holds, it is served only if it is what this job computes.
        """
        timesteps, _ = ddim_schedule(self.parts.scheduler, settings.num_steps)
        problem = misfit(entry.tensors, self.entry_spec(video, settings, timesteps))
        if problem is None and not torch.equal(entry.tensors["timesteps"], timesteps):
            problem = "holds other timesteps than this model's scheduler gives"
        return problem

    def _save(self, key: str, tensors: dict, metadata: dict, job: dict, spec: dict) -> str | None:
        """Save a computed result in the cache; what went wrong is warned and returned, never raised."""
        problem = misfit(tensors, spec)
        if problem is not None:  # never write an entry that load would refuse
            return _cache_warning(f"The result {problem}, so it is not cached.")
        try:
            self.cache.save(key, tensors, metadata, job=job)
        except Exception as error:  # noqa: BLE001 - the cache must never cost the user the result
            return _cache_warning(_cache_trouble(self.cache, error))
        return None

    def eps_fn(self, text: torch.Tensor, alphas: torch.Tensor, state: AttentionState | None = None,
               num_groups: int = 1, control: Control | None = None, chunk_size: int | None = None):
        """A noise predictor `eps_fn(x, t, step)` over all frames (float32 in and out, `chunk_size` frames per
        UNet call); sets `state.step`."""
        parts = self.parts

        def eps(x, t, step):
            if state is not None:
                state.step = step
            out = call_unet(parts.unet, x.to(parts.dtype), t, text.expand(x.shape[0], -1, -1),
                            chunk_size, num_groups, control)
            return to_epsilon(out.float(), x, alphas[step], parts.prediction_type)

        return eps

    def attention_state(self, settings: InversionSettings, num_groups: int = 1) -> AttentionState:
        """The processors' shared state for a job."""
        return AttentionState(method=settings.method, num_bases=settings.num_bases, num_iters=settings.num_iters,
                              seed=settings.seed, num_groups=num_groups, em_kernel=self.em_kernel)

    def invert(self, video: Video, settings: InversionSettings, plan: MemoryPlan | None = None,
               callback: Callback | None = None) -> InversionResult:
        """Invert `video` with `settings` (from the cache when possible) and reconstruct it.

        Args:
            video: the decoded, resized frames.
            settings: the job; `settings.model` must be this engine's model.
            plan: the job's memory plan (`Engine.plan`); None: the job's own.
            callback: optional, one dict per step: `{"phase": ..., "i": done, "total": ...}` (see `Callback`).

        Returns:
            The trajectory, the reconstruction and the VAE round trip.
        """
        settings.validate()
        self._check_model(settings)
        self.load(callback)
        plan = self._plan_for(video, settings, plan)  # the memory plan (chunk, VAE batch) or a refusal, before any work
        control = self.control_for(video, settings)  # a ControlNet for another base model is refused before any work
        job = self.job_for(video, settings, plan)
        key = job_key(job)
        with (
            self.cache.lock(key),
            self.applied(plan),
        ):  # one job per key: an identical job waits, then reads this one's entry
            return self._load_or_invert(video, settings, plan, job, key, callback, control)

    def _load_or_invert(self, video: Video, settings: InversionSettings, plan: MemoryPlan, job: dict, key: str,
                        callback: Callback | None, control: Control | None) -> InversionResult:
        """The cached result of `job` if there is a fitting one, else invert and save it."""
        parts = self.parts
        start = time.perf_counter()
        entry = self.cache.load(key, job)
        if entry is not None:
            problem = self._misfit(entry, video, settings)
            if problem is None:
                t = entry.tensors
                return InversionResult(settings, key, t["trajectory"], t["timesteps"], t["reconstruction"].numpy(),
                                       t["vae_roundtrip"].numpy(), True, time.perf_counter() - start)
            warnings.warn(f"STEM cache entry {entry.path} {problem}; recomputing.", stacklevel=3)
            self.cache.discard(entry)  # a bad entry never stays in the way, even if this result is not saved

        try:  # say before the expensive part that its result will not be kept; the job runs all the same
            self.cache.ensure_writable()
            unwritable = None
        except (StemError, OSError) as error:
            unwritable = _cache_warning(_cache_trouble(self.cache, error))
        timesteps, alphas = ddim_schedule(parts.scheduler, settings.num_steps)
        with torch.inference_mode():
            latents = encode_frames(
                parts.vae, video.frames, plan.vae_batch_size, in_phase(callback, "encoding")
            ).float()
            text = encode_prompt(parts.tokenizer, parts.text_encoder, settings.prompt)
            state = self.attention_state(settings)
            eps = self.eps_fn(text, alphas, state, control=control, chunk_size=plan.chunk_size)
            with attention_mode(parts.unet, state):
                phase = "inversion"
                try:
                    trajectory = ddim_invert(eps, latents, timesteps, alphas, in_phase(callback, "inverting"))
                    phase = "reconstruction"
                    clean = ddim_sample(eps, trajectory[-1], timesteps, alphas, in_phase(callback, "reconstructing"))
                except NonFiniteLatents as error:
                    raise StemError(f"The {phase} became NaN or infinite at step {error.step} of {error.total}, so "
                                    f"nothing was written or cached; {non_finite_advice(parts.dtype)}") from None
            decode = lambda x: decode_latents(parts.vae, x, plan.vae_batch_size, in_phase(callback, "decoding"))  # noqa: E731
            reconstruction = decode(clean)
            seconds = time.perf_counter() - start
            roundtrip = decode(latents)
        result = InversionResult(
            settings, key, trajectory.cpu().contiguous(), timesteps, reconstruction, roundtrip, False, seconds
        )
        result.cache_warning = unwritable or self._save(key, {
            "trajectory": result.trajectory, "timesteps": timesteps,
            "reconstruction": torch.from_numpy(reconstruction), "vae_roundtrip": torch.from_numpy(roundtrip),
        }, {"settings": repr(dataclasses.asdict(settings)), "seconds": f"{seconds:.3f}"}, job,
            self.entry_spec(video, settings, timesteps))
        return result


EM_KERNELS = ("auto", "fused", "torch")
# The fused kernel has run only in Triton's interpreter so far: no GPU has compiled or timed it (docs/performance.md,
# "The fused EM kernel"). `auto` picks it once a GPU check has.
FUSED_BY_DEFAULT = False


def choose_em_kernel(name: str, device) -> str:
    """The EM kernel `name` asks for on `device`: "fused" (Triton) or "torch" (streamed); one sentence when it
    cannot run. `auto` is meant to be the fused kernel on CUDA where Triton imports; until a GPU check has
    compiled and measured that kernel (`FUSED_BY_DEFAULT`), `auto` is the streamed torch path everywhere and
    `fused` is asked for by name."""
    from . import em_fused

    device = torch.device(device)
    if name not in EM_KERNELS:
        raise StemError(f"Unknown EM kernel {name!r}; choose one of: {', '.join(EM_KERNELS)}.")
    if name == "auto":
        chosen = FUSED_BY_DEFAULT and device.type == "cuda" and em_fused.available(device)
        return "fused" if chosen else "torch"
    if name == "fused" and not em_fused.available(device):
        raise SettingError("em_kernel", f"The fused EM kernel needs a CUDA GPU with Triton installed (this job runs on "
                           f"{device.type}); choose auto or torch.")
    return name


def _set_tiling(vae, on: bool) -> None:
    """Switch the VAE's tiled encode/decode on or off (diffusers' AutoencoderKL)."""
    if on:
        vae.enable_tiling()
    elif hasattr(vae, "disable_tiling"):
        vae.disable_tiling()


def non_finite_advice(dtype: torch.dtype, causes: tuple[str, ...] = ()) -> str:
    """What to change when a job's latents became NaN or infinite: the settings that can cause it."""
    fixes = list(causes)
    if dtype in (torch.float16, torch.bfloat16):
        fixes.append(f"run the model in float32 ({str(dtype).replace('torch.', '')} overflows first)")
    if not fixes:
        return "the model's noise predictions are not finite; check its weights."
    return (fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]) + "."


def _cache_trouble(cache: LatentCache, error: Exception) -> str:
    """One sentence on a cache that cannot take this result: the cache's own, or one naming the error."""
    if isinstance(error, StemError):
        return str(error)
    return (f"Could not save the result in the cache folder {cache.root} ({type(error).__name__}: {error}), so it is "
            "not cached; pass another cache folder or set STEM_CACHE_DIR to a writable folder with free space.")


def _cache_warning(message: str) -> str:
    """Warn that a result is not cached (the outputs are written all the same) and return the sentence."""
    warnings.warn(message, stacklevel=4)
    return message


def inversion_metrics(video: Video, result: InversionResult, engine: Engine | None = None, motion=None) -> dict:
    """The metrics.json block of one inversion: settings, fidelity, steadiness, timing (`motion`: see
    `stem.metrics.source_motion`)."""
    from .metrics import reconstruction_metrics

    s = result.settings
    block = {"num_frames": video.num_frames, "width": video.width, "height": video.height, "fps": video.fps,
             **metrics(s)}
    block.update({k: v for k, v in s.result_fields().items() if k in block})  # the values used ("" defaults resolved)
    block.update(reconstruction_metrics(video.frames, result.reconstruction, result.vae_roundtrip, motion))
    block.update(cache_hit=result.cache_hit, seconds=round(result.seconds, 3))
    if engine is not None and engine._parts is not None:
        block.update(device=str(engine.parts.device), dtype=str(engine.parts.dtype).replace("torch.", ""))
    return block
