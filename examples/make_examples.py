"""Make the app's example clips: short procedural videos this project owns, with their prompts.

    python examples/make_examples.py          # writes examples/*.mp4 and examples/prompts.json

Each clip is drawn with numpy/OpenCV from a fixed seed (so re-running gives the same pictures),
24 frames at 384x256, written as H.264 with `stem.video.write_video`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from anywhere without installing the package

from stem.video import write_video  # noqa: E402

WIDTH, HEIGHT, NUM_FRAMES, FPS = 384, 256, 24, 12


def _smooth_noise(rng: np.random.Generator, h: int, w: int, blur: float) -> np.ndarray:
    """(h, w) float32 noise in [0, 1], blurred to the given scale."""
    noise = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), blur)
    return (noise - noise.min()) / (np.ptp(noise) + 1e-6)


def bouncing_ball(rng: np.random.Generator) -> np.ndarray:
    """A shaded red ball bouncing left to right over a wooden floor, in front of a pale wall."""
    horizon = int(HEIGHT * 0.55)
    background = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    wall = np.linspace(235, 205, horizon, dtype=np.float32)[:, None, None] * np.array([1.0, 0.97, 0.9])
    background[:horizon] = wall
    # floor: planks along x, each with its own tint, plus stretched grain
    floor_h = HEIGHT - horizon
    grain = _smooth_noise(rng, floor_h, WIDTH * 4, blur=1.5)[:, ::4]
    plank = (np.arange(floor_h) // 14) % 5
    tint = rng.uniform(0.85, 1.1, 5)[plank][:, None]
    wood = np.array([150, 95, 55], np.float32) * (tint * (0.8 + 0.35 * grain))[..., None]
    wood[np.arange(floor_h) % 14 == 0] *= 0.55  # gaps between planks
    background[horizon:] = wood
    frames = []
    radius = 30
    for i in range(NUM_FRAMES):
        t = i / NUM_FRAMES
        x = int(50 + t * (WIDTH - 100))
        bounce = abs(np.sin(np.pi * 2.0 * t))  # two bounces per clip
        floor_y = HEIGHT - 40
        y = int(floor_y - radius - bounce * 110)
        frame = background.copy()
        shadow_w = int(radius * (1.1 - 0.4 * bounce))
        shadow = np.zeros((HEIGHT, WIDTH), np.float32)
        cv2.ellipse(shadow, (x, floor_y), (shadow_w, 6), 0, 0, 360, 1.0, -1)
        frame *= 1 - 0.45 * cv2.GaussianBlur(shadow, (0, 0), 3)[..., None]
        yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
        dist = np.hypot(xx - x, yy - y)
        inside = np.clip(radius + 0.5 - dist, 0, 1)[..., None]  # anti-aliased edge
        light = np.clip(1.0 - np.hypot(xx - (x - 10), yy - (y - 10)) / (1.6 * radius), 0, 1)[..., None]
        ball = np.array([150, 20, 25], np.float32) + light * np.array([105, 120, 110], np.float32)
        frames.append(frame * (1 - inside) + ball * inside)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def spinning_flower(rng: np.random.Generator) -> np.ndarray:
    """A pink eight-petal flower turning slowly over a blurred green foliage background."""
    leaves = _smooth_noise(rng, HEIGHT, WIDTH, blur=9)
    background = np.stack([40 + 50 * leaves, 90 + 90 * leaves, 35 + 30 * leaves], axis=-1).astype(np.float32)
    centre = (WIDTH // 2, HEIGHT // 2)
    frames = []
    for i in range(NUM_FRAMES):
        frame = background.copy()
        petals = np.zeros((HEIGHT, WIDTH), np.float32)
        for k in range(8):
            angle = k * 45 + i * 4.0  # degrees; a slow turn
            ox = int(centre[0] + 45 * np.cos(np.radians(angle)))
            oy = int(centre[1] + 45 * np.sin(np.radians(angle)))
            cv2.ellipse(petals, (ox, oy), (48, 20), angle, 0, 360, 1.0, -1, cv2.LINE_AA)
        petals = cv2.GaussianBlur(petals, (0, 0), 1.2)[..., None]
        yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
        shade = np.clip(np.hypot(xx - centre[0], yy - centre[1]) / 95, 0, 1)[..., None]
        petal_colour = np.array([250, 150, 190], np.float32) * (1.0 - 0.3 * shade)
        frame = frame * (1 - petals) + petal_colour * petals
        heart = np.zeros((HEIGHT, WIDTH), np.float32)
        cv2.circle(heart, centre, 22, 1.0, -1, cv2.LINE_AA)
        heart = heart[..., None]
        frame = frame * (1 - heart) + np.array([245, 200, 40], np.float32) * heart
        frames.append(frame)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def drifting_clouds(rng: np.random.Generator) -> np.ndarray:
    """Soft white clouds drifting right across a blue sky above rolling green hills."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    sky = np.stack([90 + 80 * yy / HEIGHT, 150 + 70 * yy / HEIGHT, np.full_like(yy, 240)], axis=-1)
    clouds = [(rng.uniform(0, WIDTH), rng.uniform(25, 110), rng.uniform(30, 60), rng.uniform(2.0, 5.0))
              for _ in range(6)]  # (x, y, size, speed in px/frame)
    ridge = HEIGHT - 70 + 18 * np.sin(xx[0] / 50.0) + 10 * np.sin(xx[0] / 23.0 + 1.0)
    hills = (yy > ridge[None, :]).astype(np.float32)
    hills = cv2.GaussianBlur(hills, (0, 0), 1.0)[..., None]
    hill_colour = np.stack([60 + 0 * yy, 140 - 40 * (yy - HEIGHT + 90) / 90, 50 + 0 * yy], axis=-1)
    texture = _smooth_noise(rng, HEIGHT, WIDTH, blur=2)[..., None]
    frames = []
    for i in range(NUM_FRAMES):
        cover = np.zeros((HEIGHT, WIDTH), np.float32)
        for cx, cy, size, speed in clouds:
            x = (cx + speed * i) % (WIDTH + 2 * size) - size
            for dx, dy, s in ((0, 0, 1.0), (-0.6, 0.15, 0.7), (0.6, 0.1, 0.75), (0.25, -0.3, 0.6)):
                cover += np.exp(
                    -((xx - x - dx * size) ** 2 + (yy - cy - dy * size) ** 2) / (2 * (0.45 * s * size) ** 2)
                )
        cover = np.clip(cover, 0, 1)[..., None]
        frame = sky * (1 - cover) + np.array([250, 250, 252], np.float32) * cover
        frame = frame * (1 - hills) + hill_colour * (0.8 + 0.3 * texture) * hills
        frames.append(frame)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


# file name -> (how to draw it, label in the app, source prompt, target prompt)
EXAMPLES = {
    "ball.mp4": (bouncing_ball, "Bouncing ball (procedural)", "a red ball bouncing on a wooden floor",
                 "a shiny golden ball bouncing on a marble floor"),
    "flower.mp4": (spinning_flower, "Turning flower (procedural)", "a pink flower turning in front of green leaves",
                   "a sunflower turning in front of autumn leaves"),
    "clouds.mp4": (drifting_clouds, "Drifting clouds (procedural)",
                   "white clouds drifting over green hills in a blue sky",
                   "dark storm clouds drifting over snowy hills at sunset"),
}


def main() -> None:
    index = HERE / "prompts.json"
    # keep the rows of other clips (the real footage of make_real_examples.py) before these
    prompts = [r for r in json.loads(index.read_text()) if r["video"] not in EXAMPLES] if index.is_file() else []
    for seed, (name, (draw, label, source, target)) in enumerate(EXAMPLES.items()):
        frames = draw(np.random.default_rng(seed))
        write_video(HERE / name, frames, FPS)
        (HERE / name).chmod(0o644)  # write_video's temp file is private (0600); these are served
        prompts.append({"video": name, "label": label, "source_prompt": source, "target_prompt": target})
        print(f"{name}: {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}, "
              f"{(HERE / name).stat().st_size / 1024:.0f} KB")
    index.write_text(json.dumps(prompts, indent=2) + "\n")


if __name__ == "__main__":
    main()
