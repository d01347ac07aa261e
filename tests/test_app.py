"""The Gradio app driven over HTTP with gradio_client, on the offline `tiny-random` model, plus its parts.

What a user (or a script) sees: /invert, /edit and /compare return videos with the right number of
frames, named after the clip and the prompt; a second edit of the same clip reuses the cached
inversion and runs no inversion UNet steps; changing an inversion setting re-inverts; a new process
on the same cache reuses it too; bad uploads and empty prompts come back as one sentence, and the
app keeps serving; a cancelled job stops within one step and frees the model for the next; the
README's gradio_client snippet runs as written against a CPU server. And the parts: the progress
bar, the ZeroGPU duration estimate, the file names, the "used k of n frames" note, the result folder.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import anyio
import av
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

import app  # conftest.py has set GRADIO_ANALYTICS_ENABLED=False and HF_HUB_OFFLINE=1 before this
from stem import app_jobs, app_settings
from stem import Engine, LatentCache, StemError
from stem.editing import DEFAULT_NEGATIVE_PROMPT
from stem.models import TINY_WARNING
from stem.video import read_video, write_video

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE, STEPS = 4, 64, 2
SMALL = dict(bases=8, iters=2, steps=STEPS, frames=FRAMES, size=SIZE, batch_size=2)  # the page's defaults here
SOURCE = "a red ball bouncing on a wooden floor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(engine_or_model, tmp_path, defaults=SMALL, **kwargs) -> tuple:
    """Launch the app on a free local port, its results under tmp_path; returns (demo, client)."""
    demo = app.build_app(engine_or_model, defaults=defaults, results=app_jobs.ResultFolder(tmp_path), **kwargs)
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    return demo, Client(demo.local_url, verbose=False)


class UnetGate:
    """Counts the UNet's forward calls per thread; while closed, each call waits until it is opened.

    A forward pre-hook on the engine's UNet (`remove()` takes it off). `entered` is set by the first
    call made while the gate is closed, and `held` is the thread making it.
    """

    def __init__(self, unet):
        self.calls: list[int] = []  # the thread of each call
        self.open, self.entered = threading.Event(), threading.Event()
        self.open.set()
        self.held: int | None = None
        self.remove = unet.register_forward_pre_hook(self._hook).remove

    def _hook(self, *_):
        self.calls.append(threading.get_ident())
        if not self.open.is_set():
            if not self.entered.is_set():
                self.held = threading.get_ident()
                self.entered.set()
            self.open.wait(120)

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()

    def count(self, thread: int | None = None) -> int:
        return len(self.calls) if thread is None else self.calls.count(thread)

    def during(self, fn, *args, **kwargs):
        """(fn's result, UNet calls it made)."""
        before = self.count()
        return fn(*args, **kwargs), self.count() - before


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A small moving-square clip of our own (6 frames, 96x64)."""
    frames = np.full((6, 64, 96, 3), 40, np.uint8)
    for i in range(6):
        frames[i, 20:40, 10 + 10 * i: 30 + 10 * i] = (220, 40, 40)
    path = tmp_path_factory.mktemp("clips") / "square.mp4"
    write_video(path, frames, 8)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_parts):
    cache = tmp_path_factory.mktemp("cache")
    engine = Engine("tiny-random", cache=LatentCache(cache)).use_parts(tiny_parts)
    unet = UnetGate(engine.parts.unet)
    demo, client = serve(engine, tmp_path_factory.mktemp("results"), max_pixels=app_jobs.parse_limit("16x256"))
    yield SimpleNamespace(engine=engine, unet=unet, client=client, cache=cache, url=demo.local_url)
    unet.open.set()
    demo.close()
    unet.remove()


def num_frames(path: str) -> int:
    return read_video(path, size=SIZE, max_frames=None).num_frames


def test_invert_then_two_edits_reuse_the_inversion_and_compare(served, clip):
    client, unet = served.client, served.unet
    video = handle_file(str(clip))

    (path, status, details), calls = unet.during(client.predict, video, SOURCE, api_name="/invert")
    assert num_frames(path) == FRAMES
    assert Path(path).name == "square-reconstruction-stem.mp4"
    assert "computed" in status and details["inversion_cache_hit"] is False
    assert "Used 4 of 6 frames (Frames is set to 4" in status
    assert calls == 2 * STEPS  # DDIM inversion + reconstruction, one UNet call per step each

    edits = []
    for prompt in ("a shiny golden ball bouncing on a marble floor", "a blue ball bouncing on grass"):
        (path, status, details), calls = unet.during(client.predict, video, SOURCE, prompt, api_name="/edit")
        assert num_frames(path) == FRAMES
        assert "reused from the cache" in status and details["inversion_cache_hit"] is True
        assert details["prompt"] == prompt
        edits.append((read_video(path, size=SIZE).frames, calls))
    assert Path(path).name == "square-edited-a-blue-ball-bouncing-on-grass.mp4"
    assert edits[0][1] == edits[1][1] > 0  # the same editing work each time: no inversion in either
    assert not np.array_equal(edits[0][0], edits[1][0])  # the prompt reached the model

    # changing an inversion setting re-inverts: the extra UNet calls are exactly the new inversion's
    runs = []
    for prompt in ("a golden ball", "a green ball"):
        runs.append(unet.during(client.predict, video, SOURCE, prompt, steps=STEPS + 1, api_name="/edit"))
    ((path, status, details), first), ((_, status_again, details_again), again) = runs
    assert "computed" in status and details["inversion_cache_hit"] is False
    assert "reused from the cache" in status_again and details_again["inversion_cache_hit"] is True
    assert first - again == 2 * (STEPS + 1)
    assert num_frames(path) == FRAMES

    (path, table, status, details), _ = unet.during(client.predict, video, SOURCE, api_name="/compare")
    assert num_frames(path) == FRAMES
    assert Path(path).name == "square-ddim-vs-stem.mp4"
    assert read_video(path, size=1024).width >= 3 * read_video(clip, size=SIZE).width  # input | DDIM | STEM
    methods = [row[0] for row in table["data"]]
    assert methods[:2] == ["DDIM", "STEM (K=8, R=2)"]
    assert methods[2] == "VAE only (reference)"  # not "best possible": a method can beat it in pixel space
    assert "“VAE only” is the VAE's own reconstruction (encode → decode), the reference for latent methods" in status
    for row in table["data"][:2]:
        assert float(row[1]) > 0 and 0 < float(row[2]) <= 1 and float(row[3]) >= 0
    assert table["data"][1][4] == "yes"  # STEM came from the /invert above
    assert set(details) == {"DDIM", "STEM (K=8, R=2)"} and "psnr" in details["DDIM"]


def test_fatezero_edits_through_the_same_endpoint_from_the_cached_inversion(served, clip):
    client, unet = served.client, served.unet
    video = handle_file(str(clip))
    client.predict(video, SOURCE, api_name="/invert")  # the inversion both editors start from
    target = "a blue ball bouncing on a wooden floor"
    (path, status, details), calls = unet.during(client.predict, video, SOURCE, target, editor="fatezero",
                                                 api_name="/edit")
    assert details["editor"] == "fatezero" and details["inversion_cache_hit"] is True
    assert status.startswith("**Edit** with FateZero to")  # the status names the editor
    assert details["freeu"] is False  # FateZero's default: no FreeU
    assert calls == STEPS  # one UNet call per step on the source and both edit groups, no inversion
    assert num_frames(path) == FRAMES
    _, _, details = client.predict(video, SOURCE, target, editor="fatezero", blend_words="red,blue", api_name="/edit")
    assert details["blend_words"] == "red,blue" and details["inversion_cache_hit"] is True
    _, _, details = client.predict(video, SOURCE, "a blue ball", freeu="on", api_name="/edit")
    assert details["editor"] == "tokenflow" and details["freeu"] is True
    with pytest.raises(Exception, match="blend word 'car' is not in the source prompt"):
        client.predict(video, SOURCE, "a blue ball", editor="fatezero", blend_words="car", api_name="/edit")


def test_with_a_clip_model_every_edit_is_scored(tiny_parts, tmp_path, clip):
    engine = Engine("tiny-random", cache=LatentCache(tmp_path / "cache")).use_parts(tiny_parts)
    demo, client = serve(engine, tmp_path, clip_model="tiny-random")
    try:
        _, status, details = client.predict(handle_file(str(clip)), SOURCE, "a blue ball", api_name="/edit")
    finally:
        demo.close()
    assert details["clip_model"] == "tiny-random" and 0 <= details["frame_acc"] <= 1
    assert -1 <= details["clip_text"] <= 1 and -1 <= details["tem_con"] <= 1
    assert f"CLIP text alignment {details['clip_text']:.3f}" in status


def test_a_cancelled_job_stops_within_one_step_and_the_next_one_runs(served, clip):
    unet = served.unet
    unet.close()
    job = served.client.submit(handle_file(str(clip)), SOURCE, "a golden ball", steps=7, api_name="/edit")
    try:
        assert unet.entered.wait(60)  # the edit is inside a UNet call (its inversion), held by the gate
        job.cancel()  # what Stop does on the page (Gradio cancels the event)
        nxt = served.client.submit(handle_file(str(clip)), SOURCE, steps=5, api_name="/invert")
        time.sleep(0.5)
    finally:
        held, before = unet.held, unet.count(unet.held)
        unet.open.set()
    path, status, _ = nxt.result(timeout=120)
    assert "computed" in status and num_frames(path) == FRAMES
    assert unet.count(held) == before  # the stopped job made no UNet call after the one it was in


def test_closing_the_page_stops_its_job(served, clip, tmp_path):
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    values = {**app_settings.DEFAULTS, **SMALL, "video": str(clip), "source_prompt": SOURCE, "steps": 6}
    page, outcome = SimpleNamespace(session_hash="page-1"), {}

    def job():
        try:
            outcome["result"] = anyio.run(jobs.run, "invert", values, lambda *a, **k: None, page)
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcome["error"] = error

    unet = served.unet
    unet.close()
    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert unet.entered.wait(60)
        jobs.page_closed(SimpleNamespace(session_hash="another-page"))  # not this job's page
        jobs.page_closed(page)  # what Gradio calls when the page goes (demo.unload)
    finally:
        held, before = unet.held, unet.count(unet.held)
        unet.open.set()
    worker.join(60)
    assert getattr(outcome.get("error"), "message", None) == "The job was stopped."
    assert unet.count(held) == before  # no UNet call after the one it was in


def test_the_readme_snippet_runs_as_written_against_a_cpu_server(tmp_path, tiny_parts, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    api = readme[readme.index("### API"):]
    snippet = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    assert 'Client("http://127.0.0.1:7860/")' in snippet
    engine = Engine("tiny-random", cache=LatentCache(tmp_path / "cache")).use_parts(tiny_parts)
    # `python app.py` on a CPU: the CPU limit and the page's CPU defaults (8 frames at 256 px), fewer steps still
    demo, _ = serve(
        engine, tmp_path, defaults=dict(steps=2, bases=8, iters=2), max_pixels=app_jobs.parse_limit(app_jobs.CPU_LIMIT)
    )
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    try:
        exec(snippet.replace("http://127.0.0.1:7860/", demo.local_url), scope)
    finally:
        demo.close()
    frames = app_settings.CPU_DEFAULTS["frames"]
    assert read_video(scope["video"], size=256, max_frames=None).num_frames == frames
    assert scope["status"].startswith("**Edit**") and f"{frames} frames at 256×" in scope["status"]
    assert scope["metrics"]["inversion_cache_hit"] is False


def test_the_apis_defaults_are_the_pages(served):
    params = {
        p["parameter_name"]: p
        for p in served.client.view_api(return_format="dict")["named_endpoints"]["/edit"]["parameters"]
    }
    assert list(params) == list(app_settings.ENDPOINT_INPUTS["edit"])
    assert {name: params[name]["parameter_default"] for name in SMALL} == SMALL
    cpu = app.build_app(
        served.engine, max_pixels=app_jobs.parse_limit(app_jobs.CPU_LIMIT), results=app_jobs.ResultFolder()
    )
    gpu = app.build_app(
        served.engine, max_pixels=app_jobs.parse_limit(app_jobs.GPU_LIMIT), results=app_jobs.ResultFolder()
    )
    tiny = app.build_app(served.engine, max_pixels=app_jobs.parse_limit("4x64"), results=app_jobs.ResultFolder())
    # the engine runs on the CPU: its page starts with CPU_DEFAULTS, within each limit
    cpu_steps, cpu_frames, cpu_size = (app_settings.CPU_DEFAULTS[name] for name in ("steps", "frames", "size"))
    cuda = app.build_app(Engine("tiny-random", device="cuda"), results=app_jobs.ResultFolder())  # not loaded
    for demo, frames, size, steps in ((cpu, cpu_frames, cpu_size, cpu_steps), (gpu, cpu_frames, cpu_size, cpu_steps),
                                      (tiny, 4, 64, cpu_steps),
                                      (cuda, 16, 512, 50)):  # a GPU keeps the full defaults
        info = {p["parameter_name"]: p["parameter_default"]
                for p in demo.get_api_info()["named_endpoints"]["/edit"]["parameters"]}
        assert (info["frames"], info["size"], info["steps"]) == (frames, size, steps)


@pytest.mark.parametrize("name, content, args, sentence", [
    ("notes.mp4", b"this is a text file, not a video\n", (SOURCE,),
     "- video: 'notes.mp4' is not a video this app can read"),
    ("empty.mp4", b"", (SOURCE,), "- video: 'empty.mp4' is empty (0 bytes)"),
    ("clip", None, ("  ",), "- source_prompt: Describe the input video in the source prompt"),
])
def test_bad_input_is_a_sentence_and_the_app_keeps_serving(served, clip, tmp_path, name, content, args, sentence):
    path = clip if content is None else tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValidationError) as error:  # refused before it joins the queue, naming the parameter
        served.client.predict(handle_file(str(path)), *args, api_name="/invert")
    assert f"\n{sentence}" in str(error.value)
    assert "Traceback" not in str(error.value)
    path, _, _ = served.client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")  # still serving
    assert num_frames(path) == FRAMES


@pytest.mark.parametrize("api, values, sentence", [
    ("/invert", dict(bases="abc"), "Bases K (STEM) must be a number, got 'abc'."),
    ("/invert", dict(bases=None), "The Bases K (STEM) box is empty; type a number in it."),
    ("/edit", dict(iters=[1, 2]), "EM iterations R (STEM) must be a number, got [1, 2]."),
    ("/edit", dict(freeu_b1=None), "The FreeU b1 box is empty; type a number in it."),  # an emptied number box
    ("/edit", dict(guidance="x"), "Guidance scale must be a number, got 'x'."),
    ("/edit", dict(steps=1.5), "DDIM steps must be a whole number, got 1.5."),
    ("/invert", dict(seed=2**70), "Seed: the seed must be between 0 and 2**63 - 1"),  # refused before inverting
    ("/edit", dict(seed=2**70), "Seed: the seed must be between 0 and 2**63 - 1"),
])
def test_wrong_typed_api_values_are_one_sentence_naming_the_control_before_any_work(served, clip, api, values,
                                                                                  sentence):
    args = {"source_prompt": SOURCE, **({"target_prompt": "a golden ball"} if api == "/edit" else {}), **values}
    before = served.unet.count()
    (name,) = values
    with pytest.raises(ValidationError) as error:
        served.client.predict(handle_file(str(clip)), **args, api_name=api)
    assert str(error.value).startswith(f"1 parameter(s) failed validation:\n- {name}: {sentence}")
    assert "Traceback" not in str(error.value)
    assert served.unet.count() == before  # nothing inverted, nothing cached
    assert app_settings.number("steps", "3", whole=True) == 3
    assert app_settings.number("guidance", 256.0, whole=False) == 256.0


def test_edit_needs_a_target_prompt(served, clip):
    with pytest.raises(ValidationError, match="Type a target prompt"):
        served.client.predict(handle_file(str(clip)), SOURCE, "", api_name="/edit")


def test_an_api_calls_bad_input_is_refused_before_it_queues_behind_a_running_job(served, clip):
    """A script's call (no page step before it) is checked before it joins the queue (22.3): while another job holds
    the model, an empty target prompt comes back at once, with the page's sentence and the parameter's name."""
    sentence = ("Type a target prompt that describes the edited video, e.g. 'a shiny golden ball bouncing on a "
                "marble floor'.")
    unet = served.unet
    unet.close()
    running = served.client.submit(handle_file(str(clip)), SOURCE, steps=6, api_name="/invert")
    try:
        assert unet.entered.wait(60)  # the job holds the one slot, inside a UNet call the gate keeps waiting
        before = unet.count()
        refused = served.client.submit(handle_file(str(clip)), SOURCE, "  ", api_name="/edit")
        with pytest.raises(ValidationError) as error:
            refused.result(timeout=60)  # queued behind the held job, it would still be waiting here
        assert not running.done() and unet.count() == before  # answered while the other job is still inside the gate
        settings = [{**app_jobs.DEFAULTS, **SMALL}[name] for name in app_jobs.ENDPOINT_INPUTS["edit"][3:]]
        over_http = httpx.post(f"{served.url}gradio_api/call/edit", json={"data": [None, SOURCE, "", *settings]},
                               timeout=60)
        assert not running.done()
        wrong = served.client.submit(handle_file(str(clip)), SOURCE, "a golden ball", steps=1.5, api_name="/edit")
        with pytest.raises(ValidationError) as wrong_error:
            wrong.result(timeout=60)
        assert not running.done()
    finally:
        unet.open.set()
    assert str(error.value) == f"1 parameter(s) failed validation:\n- target_prompt: {sentence}"
    assert str(wrong_error.value).endswith("\n- steps: DDIM steps must be a whole number, got 1.5.")
    refusals = [entry for entry in over_http.json()["detail"] if not entry["is_valid"]]  # the HTTP API's words
    assert over_http.status_code == 422 and [(r["parameter_name"], r["message"]) for r in refusals] == [
        ("target_prompt", sentence)]
    path, status, _ = running.result(timeout=120)  # the held job was not disturbed
    assert "computed" in status and num_frames(path) == FRAMES
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder())
    names = {name: name for name in app_jobs.ENDPOINT_INPUTS["edit"]} | {"randomize": "randomize"}
    page = {**app_jobs.DEFAULTS, **SMALL, "video": str(clip), "source_prompt": SOURCE, "target_prompt": "  ",
            "randomize": False}
    with pytest.raises(Exception) as on_the_page:
        jobs.starting("edit", names)(page, SimpleNamespace(session_hash="page-1"))
    assert on_the_page.value.message == sentence  # the same words as the page's


def test_the_frames_x_size_limit_is_enforced(served, clip):
    # 16x256 is 16 frames at 256 px, so 4 at 512 px: 8 frames at 512 px is too much
    with pytest.raises(ValidationError, match=r"8 frames at 512 px is over this app's limit of 4 frames"):
        served.client.predict(handle_file(str(clip)), SOURCE, frames=8, size=512, api_name="/compare")
    with pytest.raises(ValidationError, match=r"- steps: DDIM steps: Value 0 is less than minimum value 1"):  # range
        served.client.predict(handle_file(str(clip)), SOURCE, steps=0, api_name="/invert")
    with pytest.raises(
        ValidationError, match=r"\n- seed: Seed: the seed must be between 0 and 2\*\*63 - 1"
    ):  # the engine's, with page labels
        served.client.predict(handle_file(str(clip)), SOURCE, "a golden ball", seed=-1, api_name="/edit")


def test_all_frames_means_all_up_to_the_limit_and_the_status_says_so(served, clip):
    jobs = app_jobs.Jobs(served.engine, max_pixels=3 * 64**2, results=app_jobs.ResultFolder())
    settings = jobs._settings({**app_settings.DEFAULTS, **SMALL, "source_prompt": SOURCE, "frames": 0})  # 0: all
    video, note = jobs._clip(str(clip), settings)
    assert video.num_frames == 3 and note == " Used 3 of 6 frames (the limit at 64 px)."
    everything = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder())
    video, note = everything._clip(str(clip), settings)
    assert video.num_frames == 6 and note == ""


def test_the_sources_sound_is_kept_when_the_frames_keep_its_timing(served, tmp_path):
    from test_audio import make_clip

    source = make_clip(tmp_path / "talk.mp4", "aac", seconds=1.0)  # 10 frames at 10 fps with a tone
    path, status, _ = served.client.predict(handle_file(str(source)), SOURCE, api_name="/invert")
    assert "With the source's sound (0.4 s)" in status
    with av.open(path) as result:
        assert len(result.streams.audio) == 1
    path, status, _ = served.client.predict(handle_file(str(source)), SOURCE, stride=2, api_name="/invert")
    assert "No sound: at stride 2 the result plays 2× faster" in status
    with av.open(path) as result:
        assert len(result.streams.audio) == 0


def test_a_restarted_app_reuses_the_cache_on_disk(served, clip, tmp_path):
    served.client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")  # cached (maybe already)
    engine = Engine("tiny-random", cache=LatentCache(served.cache))  # a new process's engine: loads its own model
    demo, client = serve(engine, tmp_path)
    unet = UnetGate(engine.parts.unet)
    try:
        (_, status, details), calls = unet.during(client.predict, handle_file(str(clip)), SOURCE, api_name="/invert")
    finally:
        demo.close()
    assert "reused from the cache" in status and details["inversion_cache_hit"] is True
    assert calls == 0


def test_a_missing_model_is_the_operators_problem_not_the_pages(tmp_path, clip, caplog):
    demo, client = serve("/nonexistent/stem-model", tmp_path, cache_dir=str(tmp_path / "cache"))
    try:
        with caplog.at_level(logging.ERROR, logger="stem.app"):
            with pytest.raises(AppError) as error:
                client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")
    finally:
        demo.close()
    assert str(error.value).startswith("This server cannot run jobs right now (its model could not be loaded)")
    assert "--model" not in str(error.value)
    assert "The model folder '/nonexistent/stem-model' does not exist" in caplog.text  # the operator's hint


def test_the_page_says_tiny_random_outputs_are_noise(served):
    import httpx

    config = httpx.get(served.url.rstrip("/") + "/config").text
    assert TINY_WARNING in config


def test_a_gif_becomes_an_mp4_for_the_player(served, tmp_path):
    gif = tmp_path / "Wave (1).gif"
    images = [Image.fromarray(np.full((40, 60, 3), (30 * i, 90, 200 - 30 * i), np.uint8)) for i in range(5)]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=100, loop=0)
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    video = read_video(jobs.gif_to_video(str(gif)), size=64)
    assert Path(video.source).name == "wave-1.mp4"
    assert video.num_frames == 5 and video.fps == pytest.approx(10.0)
    assert np.abs(video.frames[4].astype(int) - (120, 90, 80)).mean() < 8  # the last frame's colour
    with pytest.raises(Exception, match="not a GIF this app can read"):
        (tmp_path / "fake.gif").write_bytes(b"GIF89a but not really")
        jobs.gif_to_video(str(tmp_path / "fake.gif"))


# -- the parts --------------------------------------------------------------------------------------

class Bar:
    """Records what a JobProgress shows."""

    def __init__(self):
        self.shown: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=None):
        self.shown.append((fraction, desc))


def test_one_bar_for_the_whole_job_with_the_step_and_the_time_left():
    bar, now = Bar(), [0.0]
    phases = [("encoding", 1.0), ("inverting", 4.0), ("decoding", 1.0), ("decoding", 1.0), ("editing", 8.0)]
    report = app_jobs.JobProgress(bar, phases, clock=lambda: now[0])
    report({"phase": "loading", "i": 0, "total": 1})
    for done in (1, 2):
        report({"phase": "encoding", "i": done, "total": 2})
    for done in range(1, 5):
        now[0] += 1.0
        report({"phase": "inverting", "i": done, "total": 4})
    report(
        {"phase": "waiting for the cache", "i": 0, "total": 1}
    )  # a phase the plan does not know: the bar stays where it is
    report({"phase": "decoding", "i": 1, "total": 1})
    report({"phase": "decoding", "i": 1, "total": 1})  # the second decoding (the round trip): a phase of its own
    report({"phase": "editing", "i": 0, "total": 8})
    assert bar.shown[7] == (bar.shown[6][0], "Waiting for the cache…")
    fractions = [f for f, _ in bar.shown]
    assert fractions == sorted(fractions)  # never goes back to 0 at a new phase
    assert fractions[2] == pytest.approx(1 / 15)  # encoding done
    assert fractions[-1] == pytest.approx(7 / 15)  # everything before editing
    texts = [desc for _, desc in bar.shown]
    assert texts[:3] == ["Loading the model…", "Encoding: frame 1 of 2", "Encoding: frame 2 of 2"]
    # 4.5 units of work took 4 s since the first report (encoding 1 of 2): the 10 units left, about 9 s
    assert texts[6] == "Inverting: step 4 of 4 · about 9 s left"


def test_compares_time_left_times_the_stem_inversion_at_its_own_pace():
    """22.5: DDIM at 1 s per unit of work, STEM at 3 (as on a CPU with the tiny model): half-way through STEM's
    inversion the time left is STEM's own work left at its own pace, not at DDIM's."""
    bar, now = Bar(), [0.0]
    phases = app_jobs.job_phases("compare", frames=4, steps=10)
    seconds_per_unit = {"DDIM": 1.0, "STEM": 3.0}
    report = app_jobs.JobProgress(bar, phases, clock=lambda: now[0])
    steps = 10
    truth = None
    for index, (name, work) in enumerate(phases):
        group = name.split(" · ")[0]
        for done in range(1, steps + 1):
            now[0] += work / steps * seconds_per_unit[group]
            report({"phase": name, "i": done, "total": steps})
            if name == "STEM · inverting" and done == steps // 2:
                left = sum(w for _, w in phases[index + 1:]) + work / 2
                truth = left * seconds_per_unit["STEM"]
                shown = bar.shown[-1][1]
                break
        if truth is not None:
            break
    minutes, seconds = re.search(r"about (?:(\d+) min )?(\d+) s left", shown).groups()
    estimate = int(minutes or 0) * 60 + int(seconds)
    assert estimate == pytest.approx(truth, rel=0.1), shown
    overall = now[0] / sum(w for _, w in phases[:index] + [(None, work / 2)])  # the whole job's pace so far
    assert overall * left < 0.75 * truth  # what one pace for the whole job would have said


def test_a_cached_inversion_leaves_the_plan_and_stop_raises():
    bar, stop = Bar(), threading.Event()
    report = app_jobs.JobProgress(bar, app_jobs.job_phases("edit", frames=4, steps=2, batch_size=2), stop)
    report({"phase": "editing", "i": 0, "total": 2})  # the inversion came from the cache
    report({"phase": "editing", "i": 1, "total": 2})
    assert bar.shown[-1][0] == pytest.approx(0.5 * 36 / (36 + 6))  # editing 3*(4+2)*2 = 36, decoding 1.5*4 = 6
    stop.set()
    with pytest.raises(app_jobs.Stopped):
        report({"phase": "editing", "i": 2, "total": 2})


def test_the_zerogpu_duration_grows_with_the_work():
    est = app_jobs.estimate_gpu_seconds
    # an independent count of the UNet frame-calls of a 16-frame, 50-step edit at 512 px, batch 8:
    # VAE encode 16 x 0.7, inversion + reconstruction 2 x 50 x 16 x 1.1 (STEM), two decodings 2 x 16 x 1.5,
    # editing 50 x 3 x (16 + 2 keyframes), a last decoding 16 x 1.5; 0.02 s each, plus 15 s
    work = 16 * 0.7 + 2 * 50 * 16 * 1.1 + 2 * 16 * 1.5 + 50 * 3 * 18 + 16 * 1.5
    assert est("edit", 16, 512, 50) == math.ceil(15 + 0.02 * work)
    assert est("edit", 16, 256, 50) < est("edit", 16, 512, 50) < est("edit", 48, 512, 50) < est("edit", 48, 512, 100)
    assert est("invert", 16, 512, 50) < est("compare", 16, 512, 50) < est("edit", 16, 512, 50)
    assert est("invert", 16, 512, 50, method="ddim") < est("invert", 16, 512, 50, method="stem")
    assert 60 <= est("edit", 48, 512, 50) <= 600  # the largest GPU job fits a ZeroGPU request


def test_jobs_run_under_spaces_gpu_with_a_duration_for_their_frames(served, clip, tmp_path, monkeypatch):
    asked = []

    def gpu(duration):
        def wrap(fn):
            def run(*args, **kwargs):
                asked.append(duration(*args, **kwargs))
                return fn(*args, **kwargs)
            return run
        return wrap

    monkeypatch.setitem(sys.modules, "spaces", SimpleNamespace(GPU=gpu))
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    values = {**app_settings.DEFAULTS, **SMALL, "video": str(clip), "source_prompt": SOURCE, "frames": 0}
    path, status, _, _condition = anyio.run(jobs.run, "invert", values, lambda *a, **k: None, None)
    assert num_frames(path) == 6  # all of the clip's 6 frames
    assert asked == [app_jobs.estimate_gpu_seconds("invert", 6, SIZE, STEPS, "stem", 2)]


@pytest.mark.parametrize(
    "source, kind, detail, name",
    [
        (
            "/tmp/g/city.mp4",
            "edited",
            "Glass skyscrapers at sunset, golden sky!",
            "city-edited-glass-skyscrapers-at-sunset-golden-sky.mp4",
        ),
        (
            "/tmp/g/city.mp4",
            "edited",
            "glass skyscrapers at sunset under a golden orange sky, seen from below",
            "city-edited-glass-skyscrapers-at-sunset-under-a-golden.mp4",
        ),  # cut at a word's end
        ("/tmp/g/My Clip (1).MOV", "reconstruction", "stem", "my-clip-1-reconstruction-stem.mp4"),
        ("/tmp/g/Café.webm", "ddim-vs-stem", "", "cafe-ddim-vs-stem.mp4"),
        ("/tmp/g/视频.mp4", "edited", "x" * 80, "clip-edited-" + "x" * 48 + ".mp4"),
    ],
)
def test_output_names_say_which_clip_and_what_was_done(source, kind, detail, name):
    assert app_jobs.output_name(source, kind, detail) == name


@pytest.mark.parametrize("used, available, stride, requested, cap, note", [
    (16, 50, 1, 16, 16, " Used 16 of 50 frames (the limit at 256 px)."),
    (16, 50, 1, 16, 48, " Used 16 of 50 frames (Frames is set to 16; 0 uses all, up to the limit)."),
    (16, 50, 2, 0, 16, " Used 16 of 25 frames (every 2nd of 50) (the limit at 256 px)."),
    (16, 16, 1, 16, 16, ""),  # nothing left out
    (25, 50, 2, 0, 48, ""),
    (16, None, 1, 0, 16, ""),  # unknown length: no claim
])
def test_the_status_says_when_frames_were_left_out(used, available, stride, requested, cap, note):
    assert app_jobs.frames_note(used, available, stride, requested, cap, 256) == note


def test_the_seed_box():
    assert app_jobs.pick_seed(5, False) == 5
    seeds = {app_jobs.pick_seed(5, True) for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)


def test_examples_are_cached_lazily_on_spaces_only():
    assert app.examples_caching(False, print, []) == {"cache_examples": False}
    assert app.examples_caching(True, print, [])["cache_mode"] == "lazy"
    rows = app.load_examples()
    assert rows[0]["label"].startswith("Skyscrapers at night") and Path(rows[0]["video"]).is_file()
    assert {Path(r["video"]).name for r in rows} >= {"city.mp4", "ball.mp4", "flower.mp4", "clouds.mp4"}


def test_result_folders_of_ended_processes_are_swept_and_ours_goes_at_exit(tmp_path, monkeypatch):
    at_exit = []
    monkeypatch.setattr(app_jobs.atexit, "register", at_exit.append)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = tmp_path / f"stem-app-{ended.stdout.strip()}-x", tmp_path / f"stem-app-{os.getpid()}-y"
    old, fresh, other = tmp_path / "stem-app-old", tmp_path / "stem-app-new", tmp_path / "unrelated"
    for folder in (dead, alive, old, fresh, other):
        (folder / "r").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * app_jobs.OUTPUT_TTL_SECONDS,) * 2)
    results = app_jobs.ResultFolder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, fresh, other))
    assert results.root is None  # made on first use only: a failed launch leaves nothing
    path = results.new_path("a.mp4")
    assert path.parent.parent.parent == tmp_path and path.parent.parent.name.startswith(f"stem-app-{os.getpid()}-")
    path.parent.mkdir()
    path.write_bytes(b"a result")
    assert at_exit == [results.close]  # removed at exit
    at_exit[0]()
    assert not path.parent.parent.exists()


def test_on_zerogpu_the_model_goes_to_cuda_at_start_up(monkeypatch, tmp_path):
    loaded = []
    monkeypatch.setattr(Engine, "load", lambda self, progress=None: loaded.append(self.device))
    assert app.make_engine("tiny-random", str(tmp_path), zero_gpu=False).device is None and loaded == []
    assert app.make_engine("tiny-random", str(tmp_path), zero_gpu=True).device == "cuda" and loaded == ["cuda"]


def test_a_busy_port_is_one_sentence(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(app.logging, "basicConfig", lambda **kwargs: None)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            app.main(["--model", "tiny-random", "--port", str(port), "--host", "127.0.0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"Port {port} is busy; pass --port with a free port (or set GRADIO_SERVER_PORT)."
    assert not list(tmp_path.glob("stem-app-*"))


def test_limits_and_command_line(monkeypatch):
    assert app_jobs.parse_limit("48x512") == 48 * 512 * 512
    assert app_jobs.parse_limit("1000000") == 1_000_000
    for bad in ("48 by 512", "0x512", "-3", ""):
        with pytest.raises(StemError, match="FRAMESxSIZE"):
            app_jobs.parse_limit(bad)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.setenv("STEM_MODEL", "tiny-random")
    args = app.parse_args([])
    assert (args.host, args.port, args.model, args.max_pixels) == ("127.0.0.1", 7860, "tiny-random", None)
    monkeypatch.setenv("SPACE_ID", "someone/stem")
    monkeypatch.setenv("STEM_MAX_FRAMES_X_SIZE", "8x256")
    args = app.parse_args(["--port", "9000"])
    assert (args.host, args.port, args.max_pixels) == ("0.0.0.0", 9000, 8 * 256 * 256)
    with pytest.raises(SystemExit):
        app.parse_args(["--max-frames-x-size", "lots"])


def test_the_endpoints_take_one_list_of_inputs():
    jobs = app_jobs.Jobs(Engine("tiny-random"), max_pixels=16 * 64**2, results=app_jobs.ResultFolder())
    for kind, names in app_settings.ENDPOINT_INPUTS.items():
        params = list(inspect.signature(jobs.endpoint(kind)).parameters)
        assert params == [*names, "progress", "request"]
    # the released positional order, as scripts call it (a new setting may only come after it)
    released_edit = ("video", "source_prompt", "target_prompt", "method", "bases", "iters", "steps", "frames", "stride",
                     "size", "seed", "editor", "guidance", "negative_prompt", "pnp_attn", "pnp_conv", "batch_size",
                     "propagation", "self_replace", "cross_replace", "blend_words", "blend_threshold", "reweight",
                     "freeu", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2", "control", "control_scale")
    assert app_settings.ENDPOINT_INPUTS["edit"][:len(released_edit)] == released_edit
    assert app_settings.ENDPOINT_INPUTS["compare"][:2] == ("video", "source_prompt")
    assert "method" not in app_settings.ENDPOINT_INPUTS["compare"]  # /compare runs both


def test_every_app_setting_of_the_settings_classes_is_a_parameter():
    """Each field with the app face is a parameter named by its spec, owned by its class, with its default."""
    from stem import FateZeroSettings, FreeUSettings, InversionSettings, TokenFlowSettings
    from stem.settings import specs

    for cls in (InversionSettings, TokenFlowSettings, FateZeroSettings):
        for s in specs(cls):
            if "app" not in s.faces:
                continue
            if s.nested:
                assert {f"freeu_{k}" for k in ("b1", "b2", "s1", "s2")} | {"freeu"} <= set(app_settings.PARAMETERS)
                continue
            p = app_settings.PARAMETERS[s.api_name]
            assert cls in p.owners and p.spec.name == s.name
    assert app_settings.PARAMETERS["bases"].spec.name == "num_bases"
    assert app_settings.PARAMETERS["freeu_s2"].default == FreeUSettings().s2
    assert app_settings.PARAMETERS["seed"].owners == (InversionSettings, TokenFlowSettings)  # one seed box


def test_page_values_become_the_settings_a_script_would_write():
    """The conversion against settings written out by hand: sliders' floats, 0 frames, reweight text, FreeU."""
    from stem import FateZeroSettings, FreeUSettings, InversionSettings, TokenFlowSettings

    page = {**app_settings.DEFAULTS, "source_prompt": " a ball ", "target_prompt": "a golden ball", "bases": 64.0,
            "frames": 0, "steps": 12.0, "size": 256.0, "seed": 3, "guidance": 5, "batch_size": 4.0}
    assert app_settings.inversion_settings(page, "tiny-random") == InversionSettings(
        model="tiny-random", method="stem", num_bases=64, num_iters=5, num_steps=12, num_frames=None, stride=1,
        size=256, prompt="a ball", seed=3)
    assert app_settings.inversion_settings(page, "tiny-random", method="ddim").method == "ddim"
    assert app_settings.edit_settings(page) == TokenFlowSettings(prompt="a golden ball", guidance=5.0, batch_size=4,
                                                                 seed=3)
    fz = {**page, "editor": "fatezero", "negative_prompt": "", "reweight": "golden=2, ball=0.5", "freeu": "on",
          "freeu_b1": 1.1,
          "blend_words": "ball,ball"}
    assert app_settings.edit_settings(fz) == FateZeroSettings(
        prompt="a golden ball", source_prompt="a ball", guidance=5.0, reweight=(("golden", 2.0), ("ball", 0.5)),
        blend_words="ball,ball", freeu=FreeUSettings(enabled=True, b1=1.1))
    assert app_settings.edit_settings({**fz, "freeu": "default"}).freeu.enabled is False  # FateZero's own default
    assert app_settings.edit_settings({**page, "freeu": False}).freeu.enabled is False  # off, not the default
    assert app_settings.edit_settings({**page, "freeu": None}).freeu.enabled is True  # TokenFlow's own default
    with pytest.raises(StemError, match="^The DDIM steps box is empty"):
        app_settings.inversion_settings({**page, "steps": None}, "tiny-random")


ADDED_FIELD = r"""
import dataclasses, json, sys
import stem, stem.engine
from stem.settings import setting

@dataclasses.dataclass(frozen=True)
class WithSharpness(stem.engine.InversionSettings):
    sharpness: float = setting(0.25, label="Sharpness", words="the sharpness", minimum=0, maximum=1, step=0.05,
                               page_range=(0, 1), help="how sharp the reconstruction is kept")

stem.engine.InversionSettings = stem.InversionSettings = WithSharpness  # as if the field had been written there
import app
from stem import app_jobs

demo = app.build_app(stem.Engine("tiny-random"), results=app_jobs.ResultFolder(sys.argv[1]))
info = demo.get_api_info()["named_endpoints"]
jobs = app_jobs.Jobs(stem.Engine("tiny-random"), max_pixels=16 * 64**2, results=app_jobs.ResultFolder(sys.argv[1]))
values = {**app_jobs.DEFAULTS, "source_prompt": "a ball", "sharpness": 0.5}
print(json.dumps({
    "api": {name: [p["parameter_name"] for p in info[name]["parameters"]] for name in ("/invert", "/edit", "/compare")},
    "api_help": [p.get("description") for p in info["/invert"]["parameters"] if p["parameter_name"] == "sharpness"],
    "controls": {b.label: [b.value, b.info] for b in demo.blocks.values() if type(b).__name__ == "Slider"},
    "settings": jobs._settings(values).sharpness,
}))
"""


def test_a_setting_added_to_the_settings_class_reaches_the_api_and_the_page(tmp_path):
    """Issue 18.1: one field with its spec, no other edit: a parameter of /invert, /edit and /compare (after the
    released ones), a slider with its label, range, default and help, and the job's settings."""
    import json

    out = subprocess.run([sys.executable, "-c", ADDED_FIELD, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("/invert", "/edit", "/compare"):
        assert found["api"][name][-1] == "sharpness", found["api"][name]
        assert found["api"][name][:-1] == list(app_settings.ENDPOINT_INPUTS[name.strip("/")])
    assert found["controls"]["Sharpness"] == [0.25, "How sharp the reconstruction is kept."]
    assert found["settings"] == 0.5


# -- frames too large to decode: one sentence, before any pixel is decoded -------------------------

def gif_claiming(path: Path, width: int, height: int) -> None:
    """A GIF whose logical screen says width x height (Pillow refuses it from the header)."""
    Image.new("P", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[6:10] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    path.write_bytes(bytes(data))


def test_a_20000_by_20000_upload_is_one_sentence_and_the_app_keeps_serving(served, clip, tmp_path):
    huge = tmp_path / "huge.gif"
    gif_claiming(huge, 20000, 20000)
    with pytest.raises(AppError) as error:  # used to be Gradio's generic text over a DecompressionBombError
        served.client.predict(handle_file(str(huge)), SOURCE, api_name="/invert")
    assert "'huge.gif' has 400,000,000-pixel frames, too large for this app to read; scale it down" in str(error.value)
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path / "results"))
    with pytest.raises(Exception, match=r"'huge\.gif' has 400,000,000-pixel frames, too large for this app"):
        jobs.gif_to_video(str(huge))  # the GIF upload button
    path, _, _ = served.client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")  # still serving
    assert num_frames(path) == FRAMES


def test_a_video_upload_over_the_pixel_bound_is_refused_before_decoding(served, clip, monkeypatch):
    import stem.video as video_module

    monkeypatch.setattr(video_module, "MAX_SOURCE_PIXELS", 96 * 64 - 1)  # the clip is 96x64
    monkeypatch.setattr(video_module, "_to_rgb", lambda frame: pytest.fail("a frame was decoded"))
    with pytest.raises(AppError, match=r"'square\.mp4' has 96×64 frames, too large for this app to read"):
        served.client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")


def test_a_cache_that_cannot_store_results_costs_reuse_not_the_result(tiny_parts, tmp_path, clip, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    engine = Engine("tiny-random", cache=LatentCache(blocker / "cache")).use_parts(tiny_parts)
    (tmp_path / "results").mkdir()
    demo, client = serve(engine, tmp_path / "results", max_pixels=app_jobs.parse_limit("16x256"))
    try:
        with caplog.at_level(logging.WARNING, logger="stem.app"):
            path, status, details = client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")
    finally:
        demo.close()
    assert num_frames(path) == FRAMES and details["inversion_cache_hit"] is False and "computed" in status
    assert f"Cannot write to the cache folder {blocker / 'cache'}" in caplog.text  # the operator's hint
    assert blocker.read_text() == "not a folder"


def test_structure_guidance_through_the_api(served, clip, tmp_path):
    plain, _, plain_details = served.client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")
    guided, status, details = served.client.predict(handle_file(str(clip)), SOURCE, control="canny", api_name="/invert")
    assert num_frames(guided) == FRAMES and details["control"] == "canny" and "control" not in plain_details
    assert not np.array_equal(read_video(guided, size=SIZE).frames, read_video(plain, size=SIZE).frames)
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    values = {**app_settings.DEFAULTS, **SMALL, "video": str(clip), "source_prompt": SOURCE, "control": "canny"}
    *_, condition = jobs._invert(values, lambda *a, **k: None)  # the page shows the edges beside the input
    settings = jobs._settings(values)
    edges = served.engine.conditions(jobs._clip(str(clip), settings)[0], settings)[:, 0].numpy()
    shown = read_video(condition, size=SIZE).frames[..., 0] / 255.0
    assert Path(condition).name == "square-control-canny.mp4" and shown.shape == edges.shape
    assert np.abs(shown - edges).mean() < 0.1  # the same edges, through a lossy video codec
    assert (
        jobs._condition_video(jobs._clip(str(clip), settings)[0], jobs._settings({**values, "control": "none"})) is None
    )
    with pytest.raises(ValidationError, match="- control_scale: Structure strength"):  # the engine's, the page's label
        served.client.predict(handle_file(str(clip)), SOURCE, control="canny", control_scale=-1, api_name="/invert")


def test_empty_prompt_boxes_show_an_instruction_not_an_example_and_the_refusal_does_not_quote_it(served):
    demo = app.build_app(served.engine, defaults=SMALL, results=app_jobs.ResultFolder())
    boxes = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder())
    values = {**app_settings.DEFAULTS, **SMALL, "source_prompt": "", "target_prompt": ""}
    for elem_id, refuse in (("source-prompt", lambda: jobs._settings(values)),
                            ("target-prompt", lambda: jobs._edit_settings(values))):
        placeholder = boxes[elem_id].placeholder
        assert placeholder.startswith("Type what")  # an instruction, which no one takes for a prompt
        with pytest.raises(Exception) as error:
            refuse()
        assert placeholder not in str(error.value) and placeholder.lower() not in str(error.value).lower()


def test_the_api_names_every_output(served):
    demo = app.build_app(served.engine, defaults=SMALL, results=app_jobs.ResultFolder())
    endpoints = demo.get_api_info()["named_endpoints"]
    for kind in ("/invert", "/edit", "/compare"):
        labels = [r["label"] for r in endpoints[kind]["returns"]]
        assert "Status" in labels and not any(label.startswith("value_") for label in labels), labels


def test_the_endpoints_are_mcp_tools_with_their_parameters_described(served):
    import json
    import urllib.request

    pytest.importorskip("mcp")
    demo = app.build_app(served.engine, defaults=SMALL, results=app_jobs.ResultFolder())
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
               mcp_server=True)
    try:
        tools = {tool["name"]: tool for tool in json.loads(urllib.request.urlopen(
            demo.local_url + "gradio_api/mcp/schema", timeout=30).read())}
    finally:
        demo.close()
    assert set(tools) == {"invert", "edit", "compare"}
    for name, tool in tools.items():
        properties = tool["inputSchema"]["properties"]
        assert list(properties) == list(app_settings.ENDPOINT_INPUTS[name])
        for parameter, schema in properties.items():
            assert schema["description"] == app_settings.PARAMETERS[parameter].help
    assert tools["edit"]["description"].startswith("Edit the clip towards the target prompt")
    assert app.parse_args(["--mcp"]).mcp and not app.parse_args([]).mcp


def test_stem_mcp_turns_the_mcp_server_on(monkeypatch):
    monkeypatch.setenv("STEM_MCP", "1")
    assert app.parse_args([]).mcp


def _components(demo) -> dict:
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def test_the_page_step_refuses_bad_input_at_once_and_the_status_keeps_the_sentence(served, clip, tmp_path):
    """The unqueued step before a job checks its input (22.3): no queue, no model; its sentence stays for the status."""
    import gradio as gr

    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    request = SimpleNamespace(session_hash="page-1")
    names = {name: name for name in app_settings.ENDPOINT_INPUTS["edit"]} | {"randomize": "randomize"}
    start = jobs.starting("edit", names)
    good = {**app_settings.DEFAULTS, **SMALL, "video": str(clip), "source_prompt": SOURCE,
            "target_prompt": "a golden ball", "randomize": False}
    with jobs._model_lock:  # another job holds the model: the answer does not wait for it
        for bad, sentence in ((dict(target_prompt=""), "Type a target prompt"),
                              (dict(source_prompt=" "), "Describe the input video in the source prompt"),
                              (dict(freeu_b1=app_jobs.Refused("The FreeU b1 box is empty; type a number in it.")),
                               "The FreeU b1 box is empty"),
                              (dict(editor="fatezero", blend_words="car"), "blend word 'car' is not in the source"),
                              (dict(video=None), "Upload a video")):
            before = served.unet.count()
            with pytest.raises(gr.Error, match=re.escape(sentence)):
                start({**good, **bad}, request)
            assert served.unet.count() == before
            status, _, _, *buttons = jobs.failed(None, None, request)
            assert sentence in status and [b["interactive"] for b in buttons] == [True, True, True, False]
        seed, status, shown, *buttons = start(good, request)
    assert seed == SMALL.get("seed", 0) and status.startswith("**Editing** with TokenFlow")
    assert [b["interactive"] for b in buttons] == [False, False, False, True]  # Invert, Edit, Compare off; Stop on
    assert [b["interactive"] for b in jobs.stop(None, None, None, None, request)[-4:]] == [True, True, True, False]
    status = jobs.failed(None, None, request)[0]  # a job stopped while queued: its failure says so
    assert "Stopped" in status and "corner" not in status
    assert "corner" not in jobs.failed(None, None, request)[0]  # nothing to tell: no message to look for


def test_an_upload_is_checked_when_it_arrives(served, clip, tmp_path):
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    (tmp_path / "notes.mp4").write_bytes(b"this is a text file, not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert jobs.uploaded(str(tmp_path / "notes.mp4"))[0] == "⚠️ " + app_jobs.NOT_A_VIDEO.format(name="notes.mp4")
    assert "'empty.mp4' is empty (0 bytes)" in jobs.uploaded(str(tmp_path / "empty.mp4"))[0]
    assert jobs.uploaded(str(clip))[0].startswith("New clip")
    assert jobs.uploaded(None)[0].startswith("New clip")  # the box was cleared


def test_each_editors_settings_show_only_while_it_is_chosen(served):
    demo = app.build_app(served.engine, defaults=SMALL, results=app_jobs.ResultFolder())
    boxes = _components(demo)
    assert boxes["tokenflow-settings"].visible and not boxes["fatezero-settings"].visible
    inside = {kind: {getattr(child, "label", None) for child in _descendants(boxes[f"{kind}-settings"])}
              for kind in ("tokenflow", "fatezero")}
    assert {"PnP attention threshold", "Batch size (frames per keyframe)"} <= inside["tokenflow"]
    assert {"Blend words", "Reweight", "Blend threshold"} <= inside["fatezero"]
    negative, tokenflow, fatezero = app._chose_editor("fatezero")
    assert negative == "" and not tokenflow["visible"] and fatezero["visible"]
    negative, tokenflow, fatezero = app._chose_editor("tokenflow")
    assert negative == DEFAULT_NEGATIVE_PROMPT and tokenflow["visible"] and not fatezero["visible"]


def _descendants(block):
    for child in getattr(block, "children", []):
        yield child
        yield from _descendants(child)


def test_every_setting_says_what_it_changes(served):
    demo = app.build_app(served.engine, defaults=SMALL, results=app_jobs.ResultFolder())
    controls = [b for b in demo.blocks.values() if getattr(b, "interactive", None) is not False
                and type(b).__name__ in ("Slider", "Number", "Radio", "Textbox", "Checkbox")]
    for control in controls:
        assert control.info and len(control.info) > 20, control.label
        if type(control).__name__ == "Slider":  # no "Reset to default value" stops (22.14); None would show one
            assert control.buttons == [], control.label
    # every parameter of the endpoints has a control, labelled and explained as its setting says
    by_label = {control.label: control for control in controls}
    for name in {n for names in app_settings.ENDPOINT_INPUTS.values() for n in names} - {"video"}:
        p = app_settings.PARAMETERS[name]
        assert p.label in by_label, name
        assert by_label[p.label].info.startswith(p.help), name


def _theme_colours(css: str, block: str) -> dict:
    """The --name: value pairs of one block (':root' or '.dark') of the theme's CSS."""
    body = css[css.index(block + " {") if block + " {" in css else css.index(block + "{"):]
    body = body[body.index("{") + 1:body.index("}")]
    return dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in body.split(";") if ":" in line))


def _luminance(hex_colour: str) -> float:
    value = {"white": "#ffffff", "black": "#000000"}.get(hex_colour, hex_colour).lstrip("#")
    channels = [int(value[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_edit_and_stop_have_a_contrast_of_at_least_4_5_to_1_in_light_and_dark(served):
    css = app.THEME._get_theme_css()
    light = _theme_colours(css, ":root")
    for block, names in ((":root", light), (".dark", {**light, **_theme_colours(css, ".dark")})):
        def colour(name):
            value = names[name]
            while value.startswith("var("):
                value = names[value[4:-1]]
            return value
        for variant in ("primary", "cancel"):
            for state in ("", "-hover"):
                text = _luminance(colour(f"--button-{variant}-text-color"))
                fill = _luminance(colour(f"--button-{variant}-background-fill{state}"))
                ratio = (max(text, fill) + 0.05) / (min(text, fill) + 0.05)
                assert ratio >= 4.5, (block, variant, state, ratio)


def test_on_a_cpu_a_slow_job_says_how_long_it_takes_as_it_starts(clip, tmp_path):
    """22.12: a real model on a CPU: the start's status gives the time the cost model predicts; a GPU says nothing."""
    import torch

    values = {**app_settings.DEFAULTS, **app_settings.CPU_DEFAULTS, "video": str(clip), "size": 256, "frames": 0}
    model = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # named, never loaded
    jobs = app_jobs.Jobs(Engine(model, device="cpu"), max_pixels=16 * 256**2, results=app_jobs.ResultFolder(tmp_path))
    note = jobs.slow_job_note("edit", values)
    # the clip has 6 frames, so 6 are used (not the default's 8)
    work = app_jobs.job_work("edit", 6, 256, values["steps"], "stem", values["batch_size"], "tokenflow")
    seconds = app_jobs.estimate_cpu_seconds(work, torch.get_num_threads())
    assert seconds > 60 and note.startswith(f" On this CPU it takes about {app_jobs._duration_text(seconds)}")
    assert app_jobs.estimate_cpu_seconds(work, 4) == pytest.approx(app_jobs.estimate_cpu_seconds(work, 2) / 2)
    on_gpu = app_jobs.Jobs(
        Engine(model, device="cuda"), max_pixels=16 * 256**2, results=app_jobs.ResultFolder(tmp_path)
    )
    tiny = app_jobs.Jobs(Engine("tiny-random", device="cpu"), max_pixels=16 * 256**2,
                         results=app_jobs.ResultFolder(tmp_path))
    assert on_gpu.slow_job_note("edit", values) == "" and tiny.slow_job_note("edit", values) == ""


def test_an_identical_edit_comes_from_the_result_cache_without_recomputing(served, clip, tmp_path):
    """22.13: the same clip (by its bytes, not its path), inversion and edit settings: the stored video, no UNet
    call."""
    import shutil

    client, unet = served.client, served.unet
    target = "a violet ball bouncing on a wooden floor"
    (path, status, details), calls = unet.during(client.predict, handle_file(str(clip)), SOURCE, target, seed=3,
                                                 api_name="/edit")
    assert calls > 0 and details["result_cache_hit"] is False and not status.startswith(app_jobs.SAME_EDIT)
    copy = tmp_path / "another-name.mp4"  # the same bytes uploaded again under another name
    shutil.copy(clip, copy)
    (again, status_again, details_again), calls_again = unet.during(client.predict, handle_file(str(copy)), SOURCE,
                                                                    target, seed=3, api_name="/edit")
    assert calls_again == 0 and details_again["result_cache_hit"] is True
    assert status_again == f"{app_jobs.SAME_EDIT} {status}"
    assert np.array_equal(read_video(again, size=SIZE).frames, read_video(path, size=SIZE).frames)
    _, calls_other = unet.during(client.predict, handle_file(str(clip)), SOURCE, target, seed=4, api_name="/edit")
    assert calls_other > 0  # another seed is another edit


def test_the_pages_defaults_are_the_settings_own_but_for_the_pages_choices():
    from stem import InversionSettings
    from stem.editing import FreeUSettings, TokenFlowSettings

    assert app_settings.DEFAULTS["bases"] == InversionSettings().num_bases and app_settings.DEFAULTS["steps"] == 50
    assert app_settings.DEFAULTS["pnp_attn"] == TokenFlowSettings(prompt="x").pnp_attn
    assert app_settings.DEFAULTS["freeu_b1"] == FreeUSettings().b1
    assert app_settings.DEFAULTS["frames"] == 16 and InversionSettings().num_frames is None  # a page choice


def test_on_zerogpu_the_first_edit_fits_an_anonymous_visitors_daily_quota(monkeypatch):
    """ZeroGPU refuses a job whose requested duration is over the visitor's quota left: the page's defaults
    ask for less than a whole day's quota of a visitor who is not logged in, after `spaces`' own stretch."""
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    engine = Engine("tiny-random", device="cuda")  # as make_engine builds it on ZeroGPU (nothing is loaded here)
    demo = app.build_app(engine, results=app_jobs.ResultFolder())
    boxes = _components(demo)
    frames, size, steps = (boxes[name].value for name in ("frames", "size", "steps"))
    assert frames == app_settings.ZERO_GPU_DEFAULTS["frames"] and (size, steps) == (512, 50)
    for kind in ("invert", "edit", "compare"):
        asked = app_jobs.estimate_gpu_seconds(kind, frames, size, steps) * app_settings.ZERO_GPU_DURATION_FACTOR
        assert asked <= app_settings.ZERO_GPU_ANONYMOUS_SECONDS, kind
    assert "zero-gpu-note" in boxes
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert _components(app.build_app(engine, results=app_jobs.ResultFolder()))["frames"].value == 16  # a GPU


def decoded(path) -> np.ndarray:
    """(N, H, W, 3) uint8: every frame of a video file as stored, not resized."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_an_edit_shows_the_frames_it_inverted_beside_the_edited_ones(served, clip, tmp_path):
    """22.13: "Input | Edited" is one video of the input frames the job used (stride, frames, size) and the edit."""
    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    values = {**app_settings.DEFAULTS, **SMALL, "video": str(clip), "source_prompt": SOURCE,
              "target_prompt": "a blue ball", "stride": 2, "frames": 0}  # every 2nd of 6 frames: 3
    edited, _, details, _, _, both = anyio.run(jobs.run, "edit", values, lambda *a, **k: None, None)
    assert Path(both).name == "square-input-vs-edited-a-blue-ball.mp4"
    panel, out = decoded(both), decoded(edited)
    used = read_video(clip, stride=2, size=SIZE).frames  # what the job inverted, read here on its own
    assert len(used) == 3 and panel.shape[0] == out.shape[0] == 3
    width = out.shape[2]
    assert panel.shape[2] == 2 * width  # side by side, no gap (64 + 64: even, no padding)
    strip = panel.shape[1] - out.shape[1]  # side_by_side labels each half on a strip above it
    assert 16 <= strip <= 32
    left, right = panel[:, strip:, :width].astype(float), panel[:, strip:, width:].astype(float)
    assert np.abs(left - used).mean() < 8  # through two lossy encodings
    assert np.abs(right - out).mean() < 8
    assert np.abs(left - out).mean() > np.abs(right - out).mean()  # the halves are not swapped

    # the same edit again comes from the result cache, with the same video beside it
    again = anyio.run(jobs.run, "edit", values, lambda *a, **k: None, None)
    assert again[2]["result_cache_hit"] is True and again[5] == both
    Path(both).unlink()  # a result file gone (its folder's TTL): the edit is made again, with a new one
    made = anyio.run(jobs.run, "edit", values, lambda *a, **k: None, None)
    assert made[2]["result_cache_hit"] is False and Path(made[5]).is_file()


def test_the_edit_endpoint_still_returns_the_video_the_status_and_the_metrics(served, clip):
    demo = app.build_app(served.engine, defaults=SMALL, results=app_jobs.ResultFolder())
    returns = demo.get_api_info()["named_endpoints"]["/edit"]["returns"]
    assert [r["label"] for r in returns] == ["Edited", "Status", "Metrics and timings"]
    video, status, details = served.client.predict(handle_file(str(clip)), SOURCE, "a grey ball", api_name="/edit")
    assert num_frames(video) == FRAMES and "editing took" in status and details["prompt"] == "a grey ball"


def test_choosing_structure_guidance_previews_its_condition_frames(served, clip, tmp_path):
    """Edges at once when canny is chosen (no source prompt needed), depth asked of the GPU slot, nothing without
    guidance or a clip, and never an error."""
    import gradio as gr

    jobs = app_jobs.Jobs(served.engine, max_pixels=16 * 64**2, results=app_jobs.ResultFolder(tmp_path))
    names = {name: name for name in app_settings.ENDPOINT_INPUTS["invert"]}  # the page's inversion controls
    preview = jobs.previewing(names)
    page = {**app_settings.DEFAULTS, **SMALL, "video": str(clip), "source_prompt": "", "control": "canny"}
    values = {name: page[name] for name in names}
    before = served.unet.count()
    shown, depth = preview(values)
    assert shown["visible"] is True and depth == gr.skip()
    assert Path(shown["value"]).name == "square-control-canny.mp4"
    expected = len(read_video(clip, num_frames=FRAMES, size=SIZE).frames)  # the page's 4 frames of 6
    assert expected == FRAMES and num_frames(shown["value"]) == expected
    edges = decoded(shown["value"])
    assert 0 < (edges > 128).mean() < 0.5  # white edges on black: the square's outline
    assert served.unet.count() == before  # no model call for edges

    for other in (dict(control="none"), dict(video=None), dict(steps=app_jobs.Refused("The Steps box is empty.")),
                  dict(video=str(tmp_path / "missing.mp4"))):
        hidden, depth = preview({**values, **other})
        assert hidden["visible"] is False and hidden["value"] is None and depth == gr.skip(), other

    shown, request = preview({**values, "control": "depth"})  # the player shows, empty, for the queued step's bar
    assert shown["visible"] is True and shown["value"] is None and request["control"] == "depth"
    latest = preview({**values, "control": "depth"})[1]
    assert latest != request  # a new request each time: the State changes
    assert anyio.run(jobs.preview_depth, request, lambda *a, **k: None) == gr.skip()  # superseded: not computed
    request = latest
    # on ZeroGPU it asks for the GPU for its frames through the depth model: more than the fixed part, less than a job
    est = app_jobs.estimate_gpu_seconds
    assert app_jobs.GPU_FIXED_SECONDS < est("conditions", 48, 512, 50) < est("invert", 48, 512, 50)
    assert jobs.gpu_seconds("conditions", request) == est("conditions", FRAMES, SIZE, STEPS)
    made = anyio.run(jobs.preview_depth, request, lambda *a, **k: None)
    assert made["visible"] is True and num_frames(made["value"]) == FRAMES
    assert Path(made["value"]).name == "square-control-depth.mp4"
    assert anyio.run(jobs.preview_depth, None, lambda *a, **k: None) == gr.skip()
    # depth, then none before the depth came: the late depth does not bring the player back
    _, late = preview({**values, "control": "depth"})
    assert preview({**values, "control": "none"})[0]["visible"] is False
    assert anyio.run(jobs.preview_depth, late, lambda *a, **k: None) == gr.skip()
    other_page = SimpleNamespace(session_hash="another-page")  # another page's choice is its own
    _, theirs = preview({**values, "control": "depth"}, other_page)
    preview({**values, "control": "none"})
    assert anyio.run(jobs.preview_depth, theirs, lambda *a, **k: None, other_page)["visible"] is True


def test_the_preview_follows_the_controls_that_change_the_condition_frames(served):
    """Choosing the guidance, and letting go of the frames, stride or size slider, re-run the preview step."""
    demo = app.build_app(served.engine, defaults=SMALL, results=app_jobs.ResultFolder())
    boxes = _components(demo)
    condition = boxes["condition"]._id
    triggers = {(target[0], target[1]) for dep in demo.config["dependencies"] if condition in dep["outputs"]
                and dep.get("api_visibility", "private") == "private" for target in dep["targets"]}
    for name, event in (("control", "change"), ("frames", "release"), ("stride", "release"), ("size", "release")):
        assert (boxes[name]._id, event) in triggers, name


def test_a_job_without_guidance_leaves_the_structure_preview_as_it_is(tmp_path):
    import gradio as gr

    assert app_jobs.job_condition(None) == gr.skip()  # a preview chosen while the job ran stays
    path = str(tmp_path / "clip-control-canny.mp4")
    assert app_jobs.job_condition(path) == gr.update(value=path, visible=True)
