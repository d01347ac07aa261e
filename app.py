"""Gradio app: invert a video with STEM, edit it with a text prompt, compare DDIM with STEM.

    python app.py [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share]
                  [--cache-dir DIR] [--max-frames-x-size 48x512]

One `Engine` per process: the model loads on the first job, and every inversion goes to the
on-disk latent cache, so a second edit of the same clip with the same inversion settings does no
inversion (across edits, users and restarts). The named endpoints /invert, /edit and /compare
take a video file plus scalar settings and are scriptable with gradio_client.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
import torch

from stem import Engine, InversionSettings, LatentCache, StemError, inversion_metrics, read_video, write_video
from stem.editing import EditSettings, edit_metrics, edit_video
from stem.models import DEFAULT_MODEL, TINY_MODEL, TINY_WARNING, default_device
from stem.video import DEFAULT_MAX_FRAMES, Video, side_by_side

try:  # Hugging Face ZeroGPU: hold a GPU only while a job runs
    import spaces

    gpu_job = spaces.GPU(duration=240)
except ImportError:
    def gpu_job(fn):
        """No-op outside Spaces."""
        return fn

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
GPU_LIMIT, CPU_LIMIT = "48x512", "16x256"  # per job: frames x size, i.e. frames * size**2 pixels at most
MAX_UPLOAD = "200mb"
OUTPUT_TTL_SECONDS = 3600  # result files older than this are deleted
METHODS = [("STEM", "stem"), ("DDIM", "ddim"), ("Inflated DDIM", "inflated")]
TABLE_HEADERS = ["Method", "PSNR dB ↑", "SSIM ↑", "Warp err. ↓", "Cached", "Seconds"]
# The page's defaults, by endpoint parameter name; build_app(defaults=...) overrides them.
DEFAULTS = dict(method="stem", bases=256, iters=5, steps=50, frames=16, stride=1, size=512, seed=0,
                guidance=7.5, pnp_attn=0.5, pnp_conv=0.8, batch_size=8, negative_prompt="")
# Command-line flags named in the engine's messages -> the labels on this page.
LABELS = {"--bases": "Bases K", "--iters": "EM iterations R", "--steps": "Steps", "--frames": "Frames",
          "--stride": "Stride", "--size": "Size", "--guidance": "Guidance scale", "--seed": "Seed",
          "--pnp-attn": "PnP attention threshold", "--pnp-conv": "PnP convolution threshold",
          "--batch-size": "Batch size", "--negative-prompt": "Negative prompt"}
log = logging.getLogger("stem.app")


def parse_limit(text: str) -> int:
    """'48x512' (frames x size) or a plain pixel count -> the most frames * size**2 pixels per job."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise StemError(f"The frames x size limit {text!r} is not valid; write it as FRAMESxSIZE, e.g. 48x512.")
    return parts[0] * parts[1] ** 2 if len(parts) == 2 else parts[0]


def describe_limit(max_pixels: int) -> str:
    """E.g. 'frames × size² ≤ 12,582,912: 48 frames at 512 px, 192 at 256 px'."""
    return (f"frames × size² ≤ {max_pixels:,}: {max_pixels // 512**2} frames at 512 px, "
            f"{max_pixels // 256**2} at 256 px")


def _bad(message: str) -> gr.Error:
    """An error for the page: the sentence as a toast, no traceback in the server log."""
    return gr.Error(message, print_exception=False)


def _user_errors(handler):
    """Show StemError (and anything unexpected) in the page as one sentence, not a traceback."""
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except StemError as error:
            message = str(error)
            for flag, label in LABELS.items():
                message = message.replace(flag, label)
            raise _bad(message) from error
        except torch.cuda.OutOfMemoryError as error:
            raise _bad("The GPU ran out of memory; choose fewer frames, a smaller size or a smaller batch size.") from error
        except Exception as error:  # noqa: BLE001 - a bug or the environment: log it, tell the user in a sentence
            log.exception("job failed")
            raise _bad(f"The job failed ({type(error).__name__}: {error}); try fewer frames or a smaller size, "
                       "and see the server log for details.") from error
    return wrapped


def _reporter(progress: gr.Progress, prefix: str = ""):
    """The engine's progress(phase, done, total) as a Gradio progress bar named after the phase."""
    def report(phase: str, done: int, total: int) -> None:
        progress((done, max(total, 1)), desc=f"{prefix}{phase}", unit="steps")
    return report


def _how(cache_hit: bool, seconds: float) -> str:
    return (f"reused from the cache ({seconds:.1f} s, no inversion)" if cache_hit
            else f"computed in {seconds:.1f} s (now cached)")


def _jsonable(metrics: dict) -> dict:
    """inf/nan (e.g. the PSNR of identical frames) -> None, so the JSON output stays valid."""
    fix = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    return {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in metrics.items()}


class Jobs:
    """The handlers behind the buttons and endpoints: page values in, the stem API, files and a status out."""

    def __init__(self, engine: Engine, max_pixels: int):
        self.engine, self.max_pixels = engine, max_pixels
        self.out_root = Path(tempfile.mkdtemp(prefix="stem-app-"))

    @_user_errors
    def invert(self, video, source_prompt, method, bases, iters, steps, frames, stride, size, seed,
               progress=gr.Progress(track_tqdm=True)):
        """Invert the clip (or reuse its cached inversion) and reconstruct it."""
        settings = self._settings(source_prompt, method, bases, iters, steps, frames, stride, size, seed)
        clip, note = self._clip(video, settings)
        result = self.engine.invert(clip, settings, _reporter(progress))
        metrics = inversion_metrics(clip, result, self.engine)
        status = (f"**Inversion** ({_describe(settings, clip)}): {_how(result.cache_hit, result.seconds)}. "
                  f"Reconstruction PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
                  f"warp error {metrics['warp_error']:.4f}.{note}")
        path = self._write("reconstruction.mp4", result.reconstruction, clip)
        return path, status, _jsonable({"inversion_cache_hit": result.cache_hit, **metrics})

    @_user_errors
    def edit(self, video, source_prompt, target_prompt, method, bases, iters, steps, frames, stride, size, seed,
             guidance, pnp_attn, pnp_conv, batch_size, negative_prompt, progress=gr.Progress(track_tqdm=True)):
        """Edit the clip towards the target prompt, inverting it first unless its inversion is cached."""
        if not (target_prompt or "").strip():
            raise _bad("Type a target prompt that describes the edited video, "
                       "e.g. 'a shiny golden ball bouncing on a marble floor'.")
        settings = self._settings(source_prompt, method, bases, iters, steps, frames, stride, size, seed)
        edit = EditSettings(prompt=target_prompt.strip(), negative_prompt=(negative_prompt or "").strip(),
                            guidance=float(guidance), pnp_attn=float(pnp_attn), pnp_conv=float(pnp_conv),
                            batch_size=int(batch_size), seed=int(seed)).validate()
        clip, note = self._clip(video, settings)
        result = edit_video(self.engine, clip, settings, edit, _reporter(progress))
        status = (f"**Edit** to “{edit.prompt}” ({_describe(settings, clip)}): inversion "
                  f"{_how(result.inversion_cache_hit, result.seconds_inversion)}; "
                  f"editing took {result.seconds_editing:.1f} s.{note}")
        path = self._write("edited.mp4", result.frames, clip)
        return path, status, _jsonable(edit_metrics(clip, result))

    @_user_errors
    def compare(self, video, source_prompt, bases, iters, steps, frames, stride, size, seed,
                progress=gr.Progress(track_tqdm=True)):
        """Invert the clip with DDIM and with STEM; a side-by-side video and a table of metrics."""
        jobs = {"DDIM": self._settings(source_prompt, "ddim", bases, iters, steps, frames, stride, size, seed),
                f"STEM (K={int(bases)}, R={int(iters)})":
                    self._settings(source_prompt, "stem", bases, iters, steps, frames, stride, size, seed)}
        clip, note = self._clip(video, jobs["DDIM"])
        results = {label: self.engine.invert(clip, s, _reporter(progress, f"{label}: ")) for label, s in jobs.items()}
        metrics = {label: inversion_metrics(clip, r, self.engine) for label, r in results.items()}
        panel = side_by_side([clip.frames, *(r.reconstruction for r in results.values())], ["Input", *results])
        path = self._write("comparison.mp4", panel, clip)
        first = next(iter(metrics.values()))
        table = [[label, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['warp_error']:.5f}",
                  "yes" if m["cache_hit"] else "no", f"{m['seconds']:.1f}"] for label, m in metrics.items()]
        table += [["VAE round trip (best possible)", f"{first['psnr_vae']:.2f}", f"{first['ssim_vae']:.4f}", "", "", ""],
                  ["Input video (warp floor)", "", "", f"{first['warp_error_source']:.5f}", "", ""]]
        status = (f"**Compare** ({_describe(jobs['DDIM'], clip, with_method=False)}): "
                  + "; ".join(f"{label} {_how(r.cache_hit, r.seconds)}" for label, r in results.items())
                  + f". Higher PSNR/SSIM is a more faithful reconstruction; lower warp error is steadier.{note}")
        return path, table, status, {label: _jsonable(m) for label, m in metrics.items()}

    def _settings(self, source_prompt, method, bases, iters, steps, frames, stride, size, seed) -> InversionSettings:
        """The page's values as validated InversionSettings (the cache key)."""
        if not (source_prompt or "").strip():
            raise _bad("Describe the input video in the source prompt, e.g. 'a red ball bouncing on a "
                       "wooden floor'; it conditions the inversion.")
        return InversionSettings(
            model=self.engine.model, method=method, num_bases=int(bases), num_iters=int(iters),
            num_steps=int(steps), num_frames=int(frames) or None, stride=int(stride), size=int(size),
            prompt=source_prompt.strip(), seed=int(seed),
        ).validate()

    def _clip(self, video, settings: InversionSettings) -> tuple[Video, str]:
        """Read the uploaded clip within the per-job limit; also a note when frames were left out."""
        if not video:
            raise _bad("Upload a video (or click one of the examples) first.")
        path, size = Path(video), settings.size
        cap = min(self.max_pixels // size**2, DEFAULT_MAX_FRAMES)
        if cap < 1:
            raise _bad(f"A size of {size} px is over this app's limit ({describe_limit(self.max_pixels)}) "
                       "even for one frame; choose a smaller size.")
        if settings.num_frames and settings.num_frames > cap:
            raise _bad(f"{settings.num_frames} frames at {size} px is over this app's limit of {cap} frames at "
                       "that size; choose fewer frames or a smaller size.")
        if path.is_file() and path.stat().st_size == 0:
            raise _bad(f"'{path.name}' is empty (0 bytes); upload the complete video file again.")
        try:
            clip = read_video(path, num_frames=settings.num_frames or cap + 1, stride=settings.stride, size=size)
        except StemError as error:
            raise _bad(f"'{path.name}' is not a video this app can read; upload an mp4, webm, mov or gif clip.") from error
        if clip.num_frames <= cap:
            return clip, ""
        clip = Video(clip.frames[:cap], clip.fps, clip.source)
        return clip, f" Used the first {cap} frames, the limit at {size} px."

    def _write(self, name: str, frames, clip: Video) -> str:
        """Write a result video (at the source fps, like the command line) into a fresh folder; prune old ones."""
        now = time.time()
        for old in self.out_root.iterdir():
            if now - old.stat().st_mtime > OUTPUT_TTL_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        path = self.out_root / uuid.uuid4().hex / name
        write_video(path, frames, clip.fps)
        return str(path)


def _describe(settings: InversionSettings, clip: Video, with_method: bool = True) -> str:
    """E.g. 'STEM, K=256, R=5, 50 steps, 16 frames at 512×344'."""
    method = {"stem": f"STEM, K={settings.num_bases}, R={settings.num_iters}, ", "ddim": "DDIM, ",
              "inflated": "inflated DDIM, "}[settings.method] if with_method else ""
    return f"{method}{settings.num_steps} steps, {clip.num_frames} frames at {clip.width}×{clip.height}"


def pick_seed(seed, randomize: bool) -> int:
    """A fresh random seed when the box is ticked, else the seed as typed."""
    return random.randint(0, 2**31 - 1) if randomize else int(seed or 0)


def load_examples() -> list[list[str]]:
    """[video path, source prompt, target prompt] rows from examples/prompts.json (made by make_examples.py)."""
    index = EXAMPLES_DIR / "prompts.json"
    if not index.is_file():
        return []
    rows = json.loads(index.read_text())
    return [[str(EXAMPLES_DIR / r["video"]), r["source_prompt"], r["target_prompt"]] for r in rows
            if (EXAMPLES_DIR / r["video"]).is_file()]


def build_app(engine_or_model: Engine | str = DEFAULT_MODEL, *, cache_dir: str | None = None,
              max_pixels: int | None = None, defaults: dict | None = None) -> gr.Blocks:
    """The page, wired to one shared Engine (its model loads on the first job).

    Args:
        engine_or_model: an Engine, or a model id / folder / 'tiny-random' to build one on `cache_dir`.
        cache_dir: the latent cache folder when an Engine is built (default: $STEM_CACHE_DIR or ~/.cache/stem).
        max_pixels: the most frames * size**2 per job (default: 48x512 on a GPU, 16x256 on the CPU).
        defaults: the page's starting values by parameter name (see DEFAULTS), e.g. small ones for tests.
    """
    engine = engine_or_model if isinstance(engine_or_model, Engine) else Engine(
        engine_or_model, cache=LatentCache(cache_dir))
    if max_pixels is None:
        on_gpu = torch.device(engine.device or default_device()).type != "cpu"
        max_pixels = parse_limit(GPU_LIMIT if on_gpu else CPU_LIMIT)
    jobs, d = Jobs(engine, max_pixels), {**DEFAULTS, **(defaults or {})}
    if d["frames"] * d["size"] ** 2 > max_pixels and "size" not in (defaults or {}):
        # start within the limit (on a CPU: 16 frames at 256 px), so the defaults always run
        d["size"] = max(64, math.isqrt(max_pixels // max(d["frames"], 1)) // 32 * 32)

    with gr.Blocks(title="STEM video editing", delete_cache=(OUTPUT_TTL_SECONDS, OUTPUT_TTL_SECONDS)) as demo:
        gr.Markdown("# STEM video editing\nZero-shot text-guided video editing with STEM inversion "
                    "(Li et al., CVPR 2024) over Stable Diffusion. Invert a clip once, then edit it with as "
                    "many prompts as you like: the inversion is cached and reused.")
        if engine.model == TINY_MODEL:
            gr.Markdown(f"⚠️ **{TINY_WARNING}**", elem_id="tiny-note")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Input video", sources=["upload"], elem_id="input-video")
                source_prompt = gr.Textbox(label="Source prompt", elem_id="source-prompt",
                                           info="Describes the input video; it conditions the inversion.",
                                           placeholder="a red ball bouncing on a wooden floor")
                target_prompt = gr.Textbox(label="Target prompt", elem_id="target-prompt",
                                           info="Describes the video you want.",
                                           placeholder="a shiny golden ball bouncing on a marble floor")
                with gr.Row():
                    invert_button = gr.Button("Invert & reconstruct", elem_id="invert-button")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    compare_button = gr.Button("Compare DDIM vs STEM", elem_id="compare-button")
                with gr.Accordion("Advanced", open=False):
                    method = gr.Radio(METHODS, value=d["method"], label="Inversion method")
                    with gr.Row():
                        bases = gr.Slider(1, 1024, d["bases"], step=1, label="Bases K (STEM)")
                        iters = gr.Slider(1, 20, d["iters"], step=1, label="EM iterations R (STEM)")
                    with gr.Row():
                        steps = gr.Slider(1, 100, d["steps"], step=1, label="DDIM steps")
                        guidance = gr.Slider(1, 20, d["guidance"], step=0.5, label="Guidance scale")
                    with gr.Row():
                        frames = gr.Slider(0, DEFAULT_MAX_FRAMES, d["frames"], step=1, label="Frames (0 = all)")
                        size = gr.Slider(64, 1024, d["size"], step=32, label="Size (long side, px)")
                    gr.Markdown(f"Limit per job: {describe_limit(max_pixels)}.")
                    with gr.Row():
                        stride = gr.Slider(1, 8, d["stride"], step=1, label="Stride (every n-th frame)")
                        batch_size = gr.Slider(1, 32, d["batch_size"], step=1, label="Batch size (frames per keyframe)")
                    with gr.Row():
                        pnp_attn = gr.Slider(0, 1, d["pnp_attn"], step=0.05, label="PnP attention threshold")
                        pnp_conv = gr.Slider(0, 1, d["pnp_conv"], step=0.05, label="PnP convolution threshold")
                    negative_prompt = gr.Textbox(d["negative_prompt"], label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(d["seed"], precision=0, label="Seed")
                        randomize = gr.Checkbox(False, label="Randomise the seed on each run "
                                                              "(a new seed re-runs the STEM inversion)")
                examples = load_examples()
                if examples:
                    gr.Examples(examples, inputs=[video, source_prompt, target_prompt], label="Examples")
            with gr.Column():
                status = gr.Markdown("Upload a clip or pick an example, describe it, then **Invert** or **Edit**.",
                                     label="Status", elem_id="status")
                with gr.Row():
                    reconstruction = gr.Video(label="Reconstruction", interactive=False, elem_id="reconstruction")
                    edited = gr.Video(label="Edited", interactive=False, elem_id="edited")
                comparison = gr.Video(label="Input | DDIM | STEM", show_label=False, interactive=False, elem_id="comparison")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Reconstruction quality", interactive=False, wrap=True,
                                     column_widths=["31%", "15%", "13%", "15%", "13%", "13%"])
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="Metrics and timings")

        # -- events: a seed step on the page, then the GPU job (one at a time, queued) -------------------
        inversion = [method, bases, iters, steps, frames, stride, size, seed]
        gpu = dict(concurrency_limit=1, concurrency_id="gpu")
        new_seed = dict(fn=pick_seed, inputs=[seed, randomize], outputs=seed, queue=False, api_visibility="private")
        invert_button.click(**new_seed).then(
            gpu_job(jobs.invert), [video, source_prompt, *inversion], [reconstruction, status, details],
            api_name="invert", **gpu)
        edit_button.click(**new_seed).then(
            gpu_job(jobs.edit), [video, source_prompt, target_prompt, *inversion, guidance, pnp_attn, pnp_conv,
                                 batch_size, negative_prompt], [edited, status, details], api_name="edit", **gpu)
        compare_button.click(**new_seed).then(
            gpu_job(jobs.compare), [video, source_prompt, bases, iters, steps, frames, stride, size, seed],
            [comparison, table, status, details], api_name="compare", **gpu)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    on_spaces = bool(os.environ.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description="STEM video editing: the Gradio app.")
    parser.add_argument("--model", default=os.environ.get("STEM_MODEL", DEFAULT_MODEL),
                        help=f"SD 1.x/2.x hub id or local folder, or tiny-random (default: $STEM_MODEL or {DEFAULT_MODEL})")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_spaces else "127.0.0.1"),
                        help="address to bind (default: 127.0.0.1; 0.0.0.0 on Hugging Face Spaces)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--cache-dir", default=None, help="latent cache folder (default: $STEM_CACHE_DIR or ~/.cache/stem)")
    parser.add_argument("--max-frames-x-size", default=os.environ.get("STEM_MAX_FRAMES_X_SIZE"),
                        help=f"per-job limit as FRAMESxSIZE, i.e. frames * size^2 pixels "
                             f"(default: $STEM_MAX_FRAMES_X_SIZE, else {GPU_LIMIT} on a GPU, {CPU_LIMIT} on the CPU)")
    args = parser.parse_args(argv)
    try:
        args.max_pixels = parse_limit(args.max_frames_x_size) if args.max_frames_x_size else None
    except StemError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    demo = build_app(args.model, cache_dir=args.cache_dir, max_pixels=args.max_pixels)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD,
                allowed_paths=[str(EXAMPLES_DIR)])


if __name__ == "__main__":
    main()
