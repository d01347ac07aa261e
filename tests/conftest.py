"""Shared fixtures: the tiny random model, small clips made in code, an isolated cache."""

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
warnings.filterwarnings("ignore", message=".*torchvision.*")


def make_frames(num_frames=6, width=96, height=64, seed=0):
    """A textured gradient with a bright square moving right: (N, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    texture = rng.integers(0, 40, size=(height, width, 3))
    frames = []
    for i in range(num_frames):
        frame = np.stack([(x * 2 + 3 * i) % 200, (y * 3) % 200, (x + y) % 200], axis=-1) + texture
        left = 4 + 3 * i
        frame[height // 4: height // 4 + 16, left:left + 16] = (250, 240, 40)
        frames.append(frame)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_parts():
    from stem.models import build_tiny

    return build_tiny(device="cpu")


@pytest.fixture
def engine(tiny_parts, tmp_path):
    from stem.cache import LatentCache
    from stem.engine import Engine

    return Engine("tiny-random", cache=LatentCache(tmp_path / "cache")).use_parts(tiny_parts)


@pytest.fixture
def clip(tmp_path):
    """A 6-frame 96x64 mp4 at 12 fps."""
    from stem.video import write_video

    path = tmp_path / "clip.mp4"
    write_video(path, make_frames(), 12.0)
    return path


class UNetCallCounter:
    """Counts forward calls of a module through a pre-hook (removed on exit)."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, *_):
        self.calls += 1

    def __exit__(self, *_):
        self.handle.remove()


@pytest.fixture
def count_calls():
    return UNetCallCounter
