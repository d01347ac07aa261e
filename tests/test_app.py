"""The Gradio app driven over HTTP with gradio_client, on the offline `tiny-random` model.

What a user (or a script) sees: /invert, /edit and /compare return videos with the right number of
frames; a second edit of the same clip reuses the cached inversion and runs no inversion UNet steps;
changing an inversion setting re-inverts; a new process on the same cache reuses it too; bad
uploads and empty prompts come back as one sentence, and the app keeps serving.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app  # conftest.py has set GRADIO_ANALYTICS_ENABLED=False and HF_HUB_OFFLINE=1 before this
from stem import Engine, LatentCache, StemError
from stem.models import TINY_WARNING
from stem.video import read_video, write_video

pytestmark = pytest.mark.filterwarnings("ignore")

FRAMES, SIZE, STEPS = 4, 64, 2
SMALL = dict(bases=8, iters=2, steps=STEPS, frames=FRAMES, size=SIZE, batch_size=2)  # the page's defaults here
SOURCE = "a red ball bouncing on a wooden floor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(engine_or_model, **kwargs) -> tuple:
    """Launch the app on a free local port; returns (demo, client)."""
    demo = app.build_app(engine_or_model, defaults=SMALL, **kwargs)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    return demo, Client(demo.local_url, verbose=False)


class UnetCalls:
    """Counts UNet forward calls (a forward hook on the engine's UNet; `remove()` takes it off)."""

    def __init__(self, unet):
        self.count = 0
        self.remove = unet.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1)).remove

    def during(self, fn, *args, **kwargs):
        """(fn's result, UNet calls it made)."""
        before = self.count
        return fn(*args, **kwargs), self.count - before


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
    unet = UnetCalls(engine.parts.unet)
    demo, client = serve(engine, max_pixels=app.parse_limit("16x256"))  # the CPU default, on any machine
    yield SimpleNamespace(engine=engine, unet=unet, client=client, cache=cache, url=demo.local_url)
    demo.close()
    unet.remove()


def num_frames(path: str) -> int:
    return read_video(path, size=SIZE, max_frames=None).num_frames


def test_invert_then_two_edits_reuse_the_inversion_and_compare(served, clip):
    client, unet = served.client, served.unet
    video = handle_file(str(clip))

    (path, status, details), calls = unet.during(client.predict, video, SOURCE, api_name="/invert")
    assert num_frames(path) == FRAMES
    assert "computed" in status and details["inversion_cache_hit"] is False
    assert calls == 2 * STEPS  # DDIM inversion + reconstruction, one UNet call per step each

    edits = []
    for prompt in ("a shiny golden ball bouncing on a marble floor", "a blue ball bouncing on grass"):
        (path, status, details), calls = unet.during(client.predict, video, SOURCE, prompt, api_name="/edit")
        assert num_frames(path) == FRAMES
        assert "reused from the cache" in status and details["inversion_cache_hit"] is True
        assert details["prompt"] == prompt
        edits.append((read_video(path, size=SIZE).frames, calls))
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
    assert read_video(path, size=1024).width >= 3 * read_video(clip, size=SIZE).width  # input | DDIM | STEM
    methods = [row[0] for row in table["data"]]
    assert methods[:2] == ["DDIM", "STEM (K=8, R=2)"]
    for row in table["data"][:2]:
        assert float(row[1]) > 0 and 0 < float(row[2]) <= 1 and float(row[3]) >= 0
    assert table["data"][1][4] == "yes"  # STEM came from the /invert above
    assert set(details) == {"DDIM", "STEM (K=8, R=2)"} and "psnr" in details["DDIM"]


def test_a_restarted_app_reuses_the_cache_on_disk(served, clip):
    served.client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")  # cached (maybe already)
    engine = Engine("tiny-random", cache=LatentCache(served.cache))  # a new process's engine: loads its own model
    demo, client = serve(engine)
    unet = UnetCalls(engine.parts.unet)
    try:
        (_, status, details), calls = unet.during(client.predict, handle_file(str(clip)), SOURCE, api_name="/invert")
    finally:
        demo.close()
    assert "reused from the cache" in status and details["inversion_cache_hit"] is True
    assert calls == 0


@pytest.mark.parametrize("name, content, args, sentence", [
    ("notes.mp4", b"this is a text file, not a video\n", (SOURCE,), "'notes.mp4' is not a video this app can read"),
    ("empty.mp4", b"", (SOURCE,), "'empty.mp4' is empty (0 bytes)"),
    ("clip", None, ("  ",), "Describe the input video in the source prompt"),
])
def test_bad_input_is_a_sentence_and_the_app_keeps_serving(served, clip, tmp_path, name, content, args, sentence):
    path = clip if content is None else tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AppError) as error:
        served.client.predict(handle_file(str(path)), *args, api_name="/invert")
    assert sentence in str(error.value)
    assert "Traceback" not in str(error.value)
    path, _, _ = served.client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")  # still serving
    assert num_frames(path) == FRAMES


def test_edit_needs_a_target_prompt(served, clip):
    with pytest.raises(AppError, match="Type a target prompt"):
        served.client.predict(handle_file(str(clip)), SOURCE, "", api_name="/edit")


def test_the_frames_x_size_limit_is_enforced(served, clip):
    # 16x256 is 16 frames at 256 px, so 4 at 512 px: 8 frames at 512 px is too much
    with pytest.raises(AppError, match=r"8 frames at 512 px is over this app's limit of 4 frames"):
        served.client.predict(handle_file(str(clip)), SOURCE, frames=8, size=512, api_name="/compare")
    with pytest.raises(AppError, match=r"Value 0 is less than minimum value 1"):  # Gradio checks the sliders' ranges
        served.client.predict(handle_file(str(clip)), SOURCE, steps=0, api_name="/invert")
    with pytest.raises(AppError, match=r"^Seed must be a whole number of 0 or more"):  # the engine's, with page labels
        served.client.predict(handle_file(str(clip)), SOURCE, "a golden ball", seed=-1, api_name="/edit")


def test_all_frames_means_all_up_to_the_limit(served, clip):
    jobs = app.Jobs(served.engine, max_pixels=3 * 64**2)
    settings = jobs._settings(SOURCE, "stem", 8, 2, STEPS, 0, 1, 64, 0)  # frames 0: all of them
    video, note = jobs._clip(str(clip), settings)
    assert video.num_frames == 3 and "Used the first 3 frames" in note


def test_engine_progress_is_shown_by_phase():
    calls = []
    report = app._reporter(lambda *args, **kwargs: calls.append((args, kwargs)), prefix="DDIM: ")
    report("inverting", 2, 5)
    report("loading", 0, 0)
    assert calls == [(((2, 5),), {"desc": "DDIM: inverting", "unit": "steps"}),
                     (((0, 1),), {"desc": "DDIM: loading", "unit": "steps"})]


def test_a_missing_model_is_reported_in_the_page(tmp_path, clip):
    demo, client = serve("/nonexistent/stem-model", cache_dir=str(tmp_path))
    try:
        with pytest.raises(AppError, match="The model folder '/nonexistent/stem-model' does not exist"):
            client.predict(handle_file(str(clip)), SOURCE, api_name="/invert")
    finally:
        demo.close()


def test_the_page_says_tiny_random_outputs_are_noise(served):
    import httpx

    config = httpx.get(served.url.rstrip("/") + "/config").text
    assert TINY_WARNING in config


def test_the_seed_box():
    assert app.pick_seed(5, False) == 5
    seeds = {app.pick_seed(5, True) for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)


def test_limits_and_command_line(monkeypatch):
    assert app.parse_limit("48x512") == 48 * 512 * 512
    assert app.parse_limit("1000000") == 1_000_000
    for bad in ("48 by 512", "0x512", "-3", ""):
        with pytest.raises(StemError, match="FRAMESxSIZE"):
            app.parse_limit(bad)
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
