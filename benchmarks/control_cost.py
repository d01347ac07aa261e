"""CPU cost of canny structure guidance: one STEM inversion step with and without the ControlNet.

SD-1.5 architecture (UNet and ControlNet with random weights, no download), 256 px, N = 8 frames:
    python benchmarks/control_cost.py [--frames 8] [--size 256] [--repeats 2]
Prints the seconds of one UNet call (STEM attention installed) without and with the ControlNet, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def sd15_unet():
    """Stable Diffusion 1.5's UNet config, random weights."""
    from diffusers import UNet2DConditionModel

    from stem.models import SD_DOWN_BLOCKS, SD_UP_BLOCKS

    return UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                down_block_types=SD_DOWN_BLOCKS, up_block_types=SD_UP_BLOCKS,
                                cross_attention_dim=768, attention_head_dim=8).eval().requires_grad_(False)


def main() -> None:
    from diffusers import ControlNetModel

    from stem.attention import AttentionState, attention_mode
    from stem.control import Control, canny_conditions
    from stem.inversion import call_unet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = sd15_unet()
    net = ControlNetModel.from_unet(unet).eval().requires_grad_(False)
    n, h = args.frames, args.size // 8
    frames = np.random.default_rng(0).integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    control = Control(net, canny_conditions(frames))
    x, t, text = torch.randn(n, 4, h, h), torch.tensor(500), torch.randn(n, 77, 768)
    state = AttentionState(method="stem", num_bases=256, num_iters=5, seed=0)
    times = {}
    with torch.inference_mode(), attention_mode(unet, state):
        state.step = 1
        for name, c in (("none", None), ("canny", control)):
            call_unet(unet, x, t, text, control=c)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                call_unet(unet, x, t, text, control=c)
            times[name] = (time.perf_counter() - start) / args.repeats
    print(f"one STEM inversion step, SD-1.5 architecture, {args.size} px, N = {n}, {torch.get_num_threads()} threads: "
          f"none {times['none']:.2f} s, canny {times['canny']:.2f} s, ratio {times['canny'] / times['none']:.2f}")


if __name__ == "__main__":
    main()
