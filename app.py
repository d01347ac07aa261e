"""Gradio app: invert a video with STEM, edit it with a text prompt, compare DDIM with STEM.

    python app.py [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share]
                  [--cache-dir DIR] [--max-frames-x-size 48x512]

One `Engine` per process: the model loads on the first job (at start-up on ZeroGPU), and every
inversion goes to the on-disk latent cache, so a second edit of the same clip with the same
inversion settings does no inversion (across edits, users and restarts). The named endpoints
/invert, /edit and /compare take a video file plus scalar settings (ENDPOINT_INPUTS) and are
scriptable with gradio_client. This file is the page: its layout, then its events; the jobs behind
them (workers, sessions, progress, result files, ZeroGPU's duration) are `stem.app_jobs`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import signal
import socket
import sys
import typing
from pathlib import Path
from typing import Callable

import gradio as gr
import torch

from stem import Engine, InversionSettings, LatentCache, StemError
from stem.app_jobs import (
    CPU_LIMIT, GPU_LIMIT, OUTPUT_TTL_SECONDS, Jobs, ResultFolder, add_to_history, button_states, check_numbers,
    describe_limit, job_condition, made_visible, parse_limit, shown_if_any, stop_all_jobs,
)
from stem.app_settings import (
    CPU_DEFAULTS, DEFAULTS, EDIT_SETTINGS, EDITOR_LABELS, ENDPOINT_INPUTS, PARAMETERS, ZERO_GPU_DEFAULTS,
    editor_default,
)
from stem.models import DEFAULT_MODEL, TINY_MODEL, TINY_WARNING, default_device

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_UPLOAD = "200mb"
PLAYER_HEIGHT = 360  # px: a portrait clip never pushes the prompts and buttons off a phone's screen
TABLE_HEADERS = ["Method", "PSNR dB ↑", "SSIM ↑", "Warp error ↓", "Cached", "Seconds"]
log = logging.getLogger("stem.app")


def load_examples() -> list[dict]:
    """The rows of examples/prompts.json whose clip is there: video path, label, source and target prompt."""
    index = EXAMPLES_DIR / "prompts.json"
    if not index.is_file():
        return []
    rows = json.loads(index.read_text())
    return [{**r, "video": str(EXAMPLES_DIR / r["video"]), "label": r.get("label") or r["video"]} for r in rows
            if (EXAMPLES_DIR / r["video"]).is_file()]


def examples_caching(on_spaces: bool, fn: Callable, outputs: list) -> dict:
    """gr.Examples' caching: on Spaces, lazily (an example's edit `fn` runs on its first click, then is served)."""
    if not on_spaces:
        return dict(cache_examples=False)
    return dict(fn=fn, outputs=outputs, cache_examples=True, cache_mode="lazy")


# -- the page --------------------------------------------------------------------------------------------

_RED = gr.themes.colors.red
# Hints, placeholders and the white words on the Edit and Stop buttons: at least 4.5:1 contrast on their
# backgrounds (WCAG AA); the default theme's orange-500 and red-500 give 2.8:1 and 3.8:1.
THEME = gr.themes.Default().set(
    body_text_color_subdued="*neutral_600", body_text_color_subdued_dark="*neutral_300",
    input_placeholder_color="*neutral_600", input_placeholder_color_dark="*neutral_300",
    button_primary_background_fill="*primary_700", button_primary_background_fill_dark="*primary_700",
    button_primary_background_fill_hover="*primary_800", button_primary_background_fill_hover_dark="*primary_800",
    # the theme has no palette for its error hue: red as the default theme names it
    button_cancel_background_fill=_RED.c700, button_cancel_background_fill_dark=_RED.c700,
    button_cancel_background_fill_hover=_RED.c800, button_cancel_background_fill_hover_dark=_RED.c800,
)
CSS = f"""
#status {{ min-height: 2.5em; }}
#input-video video, .result-player video {{ max-height: {PLAYER_HEIGHT}px; object-fit: contain; }}
"""
PAGE_JS = """
() => {
  const status = document.getElementById("status");
  if (status) { status.setAttribute("role", "status"); status.setAttribute("aria-live", "polite"); }
}
"""


def build_app(engine_or_model: Engine | str = DEFAULT_MODEL, *, cache_dir: str | None = None,
              max_pixels: int | None = None, defaults: dict | None = None, on_spaces: bool | None = None,
              results: ResultFolder | None = None, clip_model: str | None = None) -> gr.Blocks:
    """The page, wired to one shared Engine (its model loads on the first job). Serve it with `launch(demo)`.

    Args:
        engine_or_model: an Engine, or a model id / folder / 'tiny-random' to build one on `cache_dir`.
        cache_dir: the latent cache folder when an Engine is built (default: $STEM_CACHE_DIR or ~/.cache/stem).
        max_pixels: the most frames * size**2 per job (default: 48x512 on a GPU, 16x256 on the CPU).
        defaults: the page's starting values by parameter name (see DEFAULTS), e.g. small ones for tests.
        on_spaces: cache the examples lazily, as on Hugging Face Spaces (default: whether $SPACE_ID is set).
        results: where result files go (default: a new ResultFolder in the temp folder).
        clip_model: a CLIP model (hub id, folder or 'tiny-random') that scores every edit (CLIP text
            alignment, Frame-Acc, Tem-Con, see stem.metrics); None: no CLIP metrics.
    """
    engine = engine_or_model if isinstance(engine_or_model, Engine) else Engine(
        engine_or_model, cache=LatentCache(cache_dir))
    on_cpu = torch.device(engine.device or default_device()).type == "cpu"
    if max_pixels is None:
        max_pixels = parse_limit(CPU_LIMIT if on_cpu else GPU_LIMIT)
    zero_gpu = not on_cpu and bool(os.environ.get("SPACES_ZERO_GPU"))
    d = {**DEFAULTS, **(CPU_DEFAULTS if on_cpu else ZERO_GPU_DEFAULTS if zero_gpu else {}), **(defaults or {})}
    if d["frames"] * d["size"] ** 2 > max_pixels and "size" not in (defaults or {}):
        # start within the limit (on a CPU: 8 frames at 256 px), so the defaults always run
        d["size"] = max(64, math.isqrt(max_pixels // max(d["frames"], 1)) // 32 * 32)
        d["frames"] = max(1, min(d["frames"], max_pixels // d["size"] ** 2))
    scorer = None
    if clip_model:
        from stem.metrics import load_clip

        scorer = load_clip(clip_model, engine.device)
    jobs = Jobs(engine, max_pixels, d, results, scorer)
    on_spaces = bool(os.environ.get("SPACE_ID")) if on_spaces is None else on_spaces

    with gr.Blocks(title="STEM video editing", delete_cache=(OUTPUT_TTL_SECONDS, OUTPUT_TTL_SECONDS)) as demo:
        # the status (under the buttons) and the results (the right-hand column), made first: the examples name them
        status = gr.Markdown("Upload a clip or pick an example, describe it, then **Invert** or **Edit**.",
                             elem_id="status", label="Status", render=False)  # the API's name of this output
        player = dict(interactive=False, visible=False, loop=True, elem_classes=["result-player"], render=False)
        edited = gr.Video(label="Edited", elem_id="edited", **player)
        # the frames the edit inverted beside the edited ones, in one video: they play in step, download together
        # (its frames carry their own labels, which the player's label badge would cover: no badge)
        input_vs_edited = gr.Video(label="Input | Edited", elem_id="input-vs-edited", show_label=False, **player)
        reconstruction = gr.Video(label="Reconstruction", elem_id="reconstruction", **player)
        comparison = gr.Video(label="Input | DDIM | STEM", elem_id="comparison", show_label=False, **player)
        table = gr.Dataframe(headers=TABLE_HEADERS, label="Reconstruction quality", interactive=False, wrap=True,
                             # widths in px: on a phone the table scrolls sideways instead of breaking numbers
                             column_widths=["165px", "90px", "75px", "100px", "70px", "80px"], visible=False,
                             elem_id="quality-table", render=False)
        details = gr.JSON(label="Metrics and timings", render=False)

        gr.Markdown("# STEM video editing\nZero-shot text-guided video editing with STEM inversion "
                    "(Li et al., CVPR 2024) over Stable Diffusion. Invert a clip once, then edit it with as "
                    "many prompts as you like: the inversion is cached and reused.")
        if engine.model == TINY_MODEL:
            gr.Markdown(f"⚠️ **{TINY_WARNING}**", elem_id="tiny-note")
        elif on_cpu:
            gr.Markdown(f"⏱ **This server runs on a CPU: a job takes minutes.** The page starts with {d['frames']} "
                        f"frames and {d['steps']} steps; the status says how long a job will take as it starts.",
                        elem_id="cpu-note")
        if zero_gpu:
            gr.Markdown(f"⏱ **Hugging Face counts each visitor's GPU time on this Space** (a few minutes a day; more "
                        f"when logged in). The page starts with {d['frames']} frames, a job that fits; more frames, "
                        f"steps or pixels ask for more.", elem_id="zero-gpu-note")
        c: dict[str, gr.components.Component] = {}  # the endpoints' inputs, by parameter name
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    c["video"] = gr.Video(label="Input video", sources=["upload"], elem_id="input-video")
                    # the structure guidance's condition frames (edges or depth) of the last job, beside the input
                    condition = gr.Video(label="Structure the ControlNet follows (edges or depth)",
                                         elem_id="condition", interactive=False, visible=False, loop=True,
                                         elem_classes=["result-player"])
                condition_path = gr.State()
                depth_request = gr.State()  # the page's values of a depth preview, for the GPU slot
                gif = gr.UploadButton("Upload a GIF instead", file_types=[".gif"], size="sm", elem_id="gif-upload")
                # the prompts' placeholders ask for input: an example sentence there would read as input
                source, target = PARAMETERS["source_prompt"], PARAMETERS["target_prompt"]
                c["source_prompt"] = gr.Textbox(label=source.label, elem_id="source-prompt", max_lines=3,
                                                info=source.help, placeholder="Type what the input video shows")
                c["target_prompt"] = gr.Textbox(label=target.label, elem_id="target-prompt", max_lines=3,
                                                info=f"{target.help} Press Enter to edit.",
                                                placeholder="Type what the edited video should show")
                with gr.Row():
                    button = dict(min_width=120)  # four in a row on a desktop, two on a phone
                    invert_button = gr.Button("Invert & reconstruct", elem_id="invert-button", **button)
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button", **button)
                    compare_button = gr.Button("Compare DDIM vs STEM", elem_id="compare-button", **button)
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button", interactive=False, **button)
                status.render()  # right under the buttons: on a phone the columns stack, and a job's answer and
                # progress must not land a screen below the button that started it
                with gr.Accordion("Advanced", open=False):
                    c.update(_inversion_controls(d, max_pixels))
                    randomize = gr.Checkbox(False, label="Randomise the seed on each run",
                                            info="A different result each run; a new seed re-runs the STEM inversion.")
                    edit_controls, editor_groups = _edit_controls(d)
                    c.update(edit_controls)
                for control in c.values():
                    check_numbers(control)
                    if isinstance(control, gr.Slider):  # no "Reset to default value" stop: Gradio 6.31 shows it
                        control.buttons = []  # unless told, whatever its docstring says (None means ["reset"])
                examples = load_examples()
                if examples:
                    examples = gr.Examples(
                        [[e["video"], e["source_prompt"], e["target_prompt"]] for e in examples],
                        inputs=[c["video"], c["source_prompt"], c["target_prompt"]],
                        example_labels=[e["label"] for e in examples], label="Examples",
                        **examples_caching(on_spaces, jobs.example, [edited, status, details]))
            with gr.Column():
                for component in (edited, input_vs_edited, reconstruction, comparison, table):
                    component.render()
                with gr.Accordion("Details (JSON)", open=False):
                    details.render()
                edit_reconstruction = gr.State()  # the path of an edit's reconstruction, shown after the edit
                edit_side_by_side = gr.State()  # the path of its "Input | Edited" video (not an /edit output)
                history = gr.State([])  # this clip's edits, newest first: (video, caption)
                history_gallery = gr.Gallery(label="This clip's edits (click one to replay it; download it from "
                                                   "the preview)", elem_id="history", columns=3, height=260,
                                             visible=False, interactive=False)

        # -- events: a seed step on the page, then the job (one at a time, queued), then the status -------------
        players = [edited, reconstruction, comparison]
        inputs = {kind: [c[name] for name in names] for kind, names in ENDPOINT_INPUTS.items()}
        gpu = dict(concurrency_limit=1, concurrency_id="gpu")
        outputs = {"invert": [reconstruction, status, details, condition_path],
                   "edit": [edited, status, details, edit_reconstruction, condition_path, edit_side_by_side],
                   "compare": [comparison, table, status, details, condition_path]}
        triggers = {"invert": [invert_button.click], "edit": [edit_button.click, c["target_prompt"].submit],
                    "compare": [compare_button.click]}
        buttons = [invert_button, edit_button, compare_button, stop_button]
        job_events = []
        for kind, target in (("invert", reconstruction), ("edit", edited), ("compare", comparison)):
            # an unqueued first step checks the input (bad input is answered at once, even while other jobs
            # run), disables the job buttons and shows the result's player (and the table): the bar runs over it
            shown = [target, table] if kind == "compare" else [target]
            names = {**{c[name]: name for name in ENDPOINT_INPUTS[kind]}, randomize: "randomize"}
            start = gr.on(triggers[kind], jobs.starting(kind, names), set(names),
                          [c["seed"], status, *shown, *buttons], queue=False, api_visibility="private")
            failed = dict(fn=jobs.failed, inputs=[target, table], outputs=[status, target, table, *buttons],
                          queue=False, api_visibility="private")
            start.failure(**failed)
            # a script's call skips that step: its validator checks the input before it joins the queue
            job = start.success(jobs.endpoint(kind), inputs[kind], outputs[kind], api_name=kind,
                                show_progress_on=[target], validator=jobs.validator(kind), **gpu)
            job.failure(**failed)
            job.success(lambda: button_states(running=False), None, buttons, queue=False, api_visibility="private")
            job.success(job_condition, condition_path, condition, queue=False, api_visibility="private")
            job_events.append(job)
            if kind == "edit":
                job.success(made_visible, edit_reconstruction, reconstruction, queue=False, api_visibility="private")
                job.success(shown_if_any, edit_side_by_side, input_vs_edited, queue=False, api_visibility="private")
                job.success(add_to_history, [history, edited, details], [history, history_gallery], queue=False,
                            api_visibility="private")
        views = [*players, table]
        stop_button.click(jobs.stop, views, [status, *views, *buttons], cancels=job_events, queue=False,
                          api_visibility="private")
        # a new clip: no results of the previous one on screen (a cached example brings its edit); an unusable
        # file is said at once
        clear = dict(
            fn=jobs.uploaded,
            inputs=c["video"],
            outputs=[status, *views, details, history, history_gallery, condition, input_vs_edited],
            queue=False,
            api_visibility="private",
        )
        # the structure guidance's condition frames as soon as it is chosen or a clip arrives: edges at once, depth
        # on the GPU slot (it needs the depth model); none, or no clip: no preview. Queued, but in a group of its
        # own without a limit, so it waits for no job: Gradio fires a State's change only after a queued event
        preview_names = {c[name]: name for name in ENDPOINT_INPUTS["invert"]}
        preview = dict(fn=jobs.previewing(preview_names), inputs=set(preview_names), outputs=[condition, depth_request],
                       concurrency_limit=None, concurrency_id="preview", api_visibility="private")
        c["control"].change(**preview)
        for name in ("frames", "stride", "size"):  # the frames the ControlNet would see change with these
            c[name].release(**preview)
        depth_request.change(jobs.preview_depth, depth_request, condition, api_visibility="private", **gpu)
        c["video"].upload(**clear).then(**preview)
        c["video"].clear(**clear)
        # each editor's own negative prompt and FreeU default (the authors' for TokenFlow, FateZero's none)
        c["editor"].change(_chose_editor, c["editor"],
                           [c["negative_prompt"], *(editor_groups[n] for n in EDIT_SETTINGS)], queue=False,
                           api_visibility="private")
        if examples and on_spaces:
            examples.load_input_event.then(lambda: gr.update(visible=True), None, edited, queue=False,
                                           api_visibility="private").then(**preview)
        elif examples:
            examples.load_input_event.then(**clear).then(**preview)
        gif.upload(jobs.gif_to_video, gif, c["video"], api_visibility="private").success(**clear).then(**preview)
        demo.unload(jobs.page_closed)
        demo.load(None, js=PAGE_JS)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def setting_control(name: str, value) -> gr.components.Component:
    """The page's control of an endpoint parameter, from its setting's spec: a radio for a choice, a checkbox for
    a switch, a slider over the page's range, a number box, or a text box; its label, and one line of help."""
    p = PARAMETERS[name]
    common = dict(label=p.label, info=p.help, elem_id=name.replace("_", "-"), visible=p.visible)
    if p.kind == "choice":
        return gr.Radio(list(p.choices), value=value, **common)
    if p.kind == "switch":
        return gr.Checkbox(value, **common)
    if p.kind == "slider":
        return gr.Slider(p.low, p.high, value, step=p.step or (1 if p.whole else 0.05), **common)
    if p.kind == "number":
        # no bounds: the settings check the range, in words ("the seed must be between 0 and 2**63 - 1")
        return gr.Number(value, precision=0 if p.whole else None, step=p.step, **common)
    return gr.Textbox(value, max_lines=2, **common)


def _controls(names: list[str], d: dict) -> dict:
    """The controls of `names`, a choice on a row of its own, the others two to a row."""
    c, pending = {}, []

    def flush():
        if pending:
            with gr.Row():
                for n in pending:
                    c[n] = setting_control(n, d[n])
            pending.clear()

    for name in names:
        if PARAMETERS[name].kind == "choice":
            flush()
            c[name] = setting_control(name, d[name])
        else:
            pending.append(name)
            if len(pending) == 2:
                flush()
    flush()
    return c


def _inversion_controls(d: dict, max_pixels: int) -> dict:
    """The Advanced panel's inversion settings (every InversionSettings parameter but the prompt), by name."""
    gr.Markdown("**Inversion**")
    names = [n for n, p in PARAMETERS.items() if InversionSettings in p.owners and n != "source_prompt"]
    c = _controls(names, d)
    gr.Markdown(f"Limit per job: {describe_limit(max_pixels)}.")
    return c


def _edit_controls(d: dict) -> tuple[dict, dict]:
    """The Advanced panel's edit settings, by name: the editor, what every editor takes, each editor's own group
    (shown only while that editor is chosen), then FreeU's."""
    edit = [n for n, p in PARAMETERS.items() if n not in ("target_prompt", "seed") and
            (n == "editor" or any(o in EDIT_SETTINGS.values() for o in p.owners))]
    shared = [n for n in edit if set(EDIT_SETTINGS.values()) <= set(PARAMETERS[n].owners) and not PARAMETERS[n].nested]
    nested = [n for n in edit if PARAMETERS[n].nested]
    gr.Markdown("**Editing**")
    c = _controls(["editor", *shared], d)
    groups = {}
    for editor, cls in EDIT_SETTINGS.items():
        own = [n for n in edit if PARAMETERS[n].owners == (cls,) and not PARAMETERS[n].nested]
        with gr.Column(visible=d["editor"] == editor, elem_id=f"{editor}-settings") as groups[editor]:
            gr.Markdown(EDITOR_LABELS[editor])
            c.update(_controls(own, d))
    gr.Markdown("FreeU in the editing UNet")
    c.update(_controls(nested, d))
    return c, groups


def _chose_editor(editor: str) -> tuple:
    """The editor's own negative prompt (the authors' for TokenFlow, FateZero's none) and only its settings shown."""
    return (editor_default(editor, "negative_prompt"), *(gr.update(visible=editor == name) for name in EDIT_SETTINGS))


def launch(demo: gr.Blocks, **kwargs):
    """Serve the page with its theme and style (Gradio 6 takes them at launch)."""
    return demo.launch(theme=THEME, css=CSS, **kwargs)


# -- the server ------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    on_spaces = bool(os.environ.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description="STEM video editing: the Gradio app.")
    parser.add_argument(
        "--model",
        default=os.environ.get("STEM_MODEL", DEFAULT_MODEL),
        help=f"SD 1.x/2.x hub id or local folder, or tiny-random (default: $STEM_MODEL or {DEFAULT_MODEL})",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_spaces else "127.0.0.1"),
                        help="address to bind (default: 127.0.0.1; 0.0.0.0 on Hugging Face Spaces)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument(
        "--mcp",
        action="store_true",
        default=os.environ.get("STEM_MCP", "").lower() in ("1", "true", "yes"),
        help="also serve /invert, /edit and /compare as MCP tools at /gradio_api/mcp/ (also $STEM_MCP=1)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="latent cache folder (default: $STEM_CACHE_DIR or ~/.cache/stem)"
    )
    parser.add_argument("--max-frames-x-size", default=os.environ.get("STEM_MAX_FRAMES_X_SIZE"),
                        help=f"per-job limit as FRAMESxSIZE, i.e. frames * size^2 pixels "
                             f"(default: $STEM_MAX_FRAMES_X_SIZE, else {GPU_LIMIT} on a GPU, {CPU_LIMIT} on the CPU)")
    parser.add_argument(
        "--clip-model",
        default=os.environ.get("STEM_CLIP_MODEL"),
        help="score every edit with this CLIP model (e.g. openai/clip-vit-base-patch32, or tiny-random): "
        "CLIP text alignment, Frame-Acc and Tem-Con in the status and details (default: "
        "$STEM_CLIP_MODEL, else off)",
    )
    args = parser.parse_args(argv)
    try:
        args.max_pixels = parse_limit(args.max_frames_x_size) if args.max_frames_x_size else None
    except StemError as error:
        parser.error(str(error))
    return args


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def make_engine(model: str, cache_dir: str | None, zero_gpu: bool) -> Engine:
    """The server's engine; on ZeroGPU its model is loaded onto 'cuda' at start-up, as ZeroGPU asks."""
    engine = Engine(model, device="cuda" if zero_gpu else None, cache=LatentCache(cache_dir))
    if zero_gpu:
        try:
            engine.load()
        except StemError as error:  # the page will say the server cannot run jobs; the log says why
            log.error("cannot load the model: %s", error)
    return engine


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.mcp and importlib.util.find_spec("mcp") is None:
        print("--mcp needs Gradio's MCP extra; install it with pip install 'gradio[mcp]'.", file=sys.stderr)
        sys.exit(2)
    if not port_is_free(args.host, args.port):
        _port_busy(args.port)
    engine = make_engine(args.model, args.cache_dir, zero_gpu=bool(os.environ.get("SPACES_ZERO_GPU")))
    results = ResultFolder()
    demo = build_app(engine, max_pixels=args.max_pixels, results=results, clip_model=args.clip_model)
    # a stop signal (e.g. a Space's restart) ends the server as Ctrl+C does, so the result folder goes too
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        launch(demo, server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD,
               allowed_paths=[str(EXAMPLES_DIR)], mcp_server=args.mcp)
    except OSError as error:
        if "port" not in str(error).lower():
            raise
        results.close()
        _port_busy(args.port)  # taken between the check and the launch
    stop_all_jobs()  # the server has closed: end running jobs at their next step, then exit


def _port_busy(port: int) -> typing.NoReturn:
    print(f"Port {port} is busy; pass --port with a free port (or set GRADIO_SERVER_PORT).", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
