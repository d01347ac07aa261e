"""CPU cost of canny structure guidance: one STEM inversion step and one TokenFlow step, with and without
the ControlNet.

SD-1.5 architecture (UNet and ControlNet with random weights, no download), 256 px, N = 8 frames:
    python -m benchmarks.control_cost [--frames 8] [--size 256] [--repeats 2] [--warmup 1] [--model sd15|tiny]
The runs with and without the ControlNet alternate (none, canny, none, canny, ...) so a shared CPU's
load weighs on both alike. Prints the mean seconds of each and their ratio:
    inversion  one UNet call over the N frames (STEM attention installed)
    tokenflow  one denoising step of `stem.editing.tokenflow.edit_latents` on a one-step schedule (the keyframe pass
               and the propagation over every frame, three groups, injecting as a real edit's first steps do)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def alternating(runs: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Mean seconds of each `runs[name]()` over `repeats` rounds, the names taking turns (after `warmup` runs each)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: sum(s) / len(s) for name, s in seconds.items()}


def main(argv=None) -> dict:
    from diffusers import ControlNetModel

    from stem.attention import AttentionState, attention_mode
    from stem.control import Control, canny_conditions
    from stem.editing.tokenflow import EditSettings, edit_latents
    from stem.inversion import call_unet, ddim_schedule

    from .models import unet_only_parts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="tiny: a smoke run in seconds")
    parser.add_argument("--only", choices=("inversion", "tokenflow"), default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    parts = unet_only_parts(args.model, "cpu", torch.float32)
    unet = parts.unet
    net = ControlNetModel.from_unet(unet).eval().requires_grad_(False)
    n, h = args.frames, args.size // 8
    frames = np.random.default_rng(0).integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    control = Control(net, canny_conditions(frames))
    generator = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    times = {}
    with torch.inference_mode():
        if args.only in (None, "inversion"):
            x, t, text = torch.randn(n, 4, h, h, generator=generator), torch.tensor(500), torch.randn(n, 77, width)
            state = AttentionState(method="stem", num_bases=256, num_iters=5, seed=0, step=1)
            with attention_mode(unet, state):
                times["inversion"] = alternating(
                    {c: lambda c=c: call_unet(unet, x, t, text, control=control if c else None) for c in ("", "canny")},
                    args.repeats,
                    args.warmup,
                )
        if args.only in (None, "tokenflow"):
            timesteps, alphas = ddim_schedule(parts.scheduler, 1)
            trajectory = torch.randn(2, n, 4, h, h, generator=generator)  # x_0, x_1
            text = torch.randn(3, 77, width, generator=generator)
            edit = EditSettings(prompt="bench", batch_size=8, pnp_attn=1.0, pnp_conv=1.0).validate()

            def step(c):
                state = AttentionState(method="stem", num_groups=3)
                return edit_latents(parts, trajectory, timesteps, alphas, text, edit, state,
                                    control=control if c else None)

            times["tokenflow"] = alternating({c: lambda c=c: step(c) for c in ("", "canny")}, args.repeats, args.warmup)
    ratios = {}
    for what, t in times.items():
        ratios[what] = t["canny"] / t[""]
        print(f"one {'STEM inversion' if what == 'inversion' else 'TokenFlow'} step, {args.model} architecture, "
              f"{args.size} px, N = {n}, {torch.get_num_threads()} threads, {args.repeats} alternating runs each: "
              f"none {t['']:.2f} s, canny {t['canny']:.2f} s, ratio {ratios[what]:.2f}", flush=True)
    return ratios


if __name__ == "__main__":
    main()
