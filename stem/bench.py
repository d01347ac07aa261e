"""Benchmarks of the self-attention modes: time and peak memory against the number of frames N.

    python -m stem.bench attention --frames 4,8,16 --tokens 4096 --json bench.json --plot bench.png
    python -m stem.bench inversion --frames 4,8,16 --size 256 --json bench.json --md bench.md

`attention`: one self-attention layer at SD-1.5's highest resolution, a diffusers
`Attention(query_dim=320, heads=8, dim_head=40)` with random weights, on (N, tokens, 320) hidden
states, for the modes ddim, inflated, stem and stem-naive (the reference below).
`inversion`: one inversion step, i.e. one UNet call over all N frames with the mode's processors,
of SD-1.5's UNet architecture with random weights (same cost as the real model).

Every row: {"bench", "mode", "frames", "tokens" | "size", "seconds", "peak_mb", "device", "dtype", ...}
with `seconds` the median over --repeats timed calls after --warmup untimed ones, and `peak_mb` the
peak memory of a call above the baseline just before it (see PEAK_MEMORY). The timed calls of the
modes are interleaved, so a change in the machine's load hits every mode alike. --json merges the
rows into the file (a row replaces one with the same bench/mode/N/shape/device/dtype), so separate
runs (fast modes with more repeats, inflated with one) build one table.

On a GPU: `--device cuda --dtype float16` (CUDA is synchronised around each timed call; memory is
torch.cuda.max_memory_allocated above the allocation before the call).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .attention import (
    PROCESSORS, AttentionState, StemAttnProcessor, _frames_major, _group_tokens, attention_mode,
    processors_installed, self_attention_layers,
)
from .em import EPS
from .lockstep import whole_video

PEAK_MEMORY = (
    "peak memory of one call above the baseline just before it. cuda: torch.cuda.max_memory_allocated() "
    "- memory_allocated(). cpu: peak resident set size (VmHWM, reset through /proc/self/clear_refs; where "
    "that is refused, a thread polling VmRSS every millisecond) - VmRSS before the call, measured after "
    "malloc_trim(0) so that heap memory freed by an earlier call is not counted as already there."
)
BENCHES = ("attention", "inversion")
MODES = {"attention": ("ddim", "inflated", "stem", "stem-naive"), "inversion": ("ddim", "stem", "inflated")}
ALL_MODES = MODES["attention"]  # every mode, in table order


# -- the reference: STEM as the authors wrote it ----------------------------------------------

class NaiveStemAttnProcessor(StemAttnProcessor):
    """STEM written straightforwardly: a Python loop over heads, full (L, K) responsibilities, explicit attention.

    The same maths as `StemAttnProcessor` (the same initial bases too); kept here only as the
    reference the fast path is checked and timed against, never used by the engine.
    """

    def bases(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, N, h, L, d) keys/values of the whole video -> (G, h, K, d) key and value bases."""
        state = self.state
        G, N, h, L, d = key.shape
        keys = _group_tokens(key).reshape(G * h, N * L, d).float()
        values = _group_tokens(value).reshape(G * h, N * L, value.shape[-1]).float()
        init = self.initial_bases(keys)
        key_bases, value_bases = [], []
        for head in range(G * h):
            k, v, mu = keys[head], values[head], init[head]  # (N*L, d), (N*L, d), (K, d)
            for _ in range(state.num_iters):
                unit = mu / (mu.norm(dim=-1, keepdim=True) + EPS)
                z = torch.softmax(k @ unit.T / state.tau, dim=-1)  # (N*L, K) ST-E
                z = z / (z.sum(dim=0, keepdim=True) + EPS)
                mu = z.T @ k  # (K, d) ST-M
            key_bases.append(mu)
            value_bases.append(z.T @ v)
        state.em_calls += 1
        return torch.stack(key_bases).view(G, h, -1, d), torch.stack(value_bases).view(G, h, -1, value.shape[-1])

    def attend(self, attn, query, key, value, attention_mask=None):
        groups = self.state.num_groups
        key_bases, value_bases = whole_video(self.bases, _frames_major(key, groups), _frames_major(value, groups))
        frames = query.shape[0] // groups
        out = torch.empty_like(query)
        for head in range(query.shape[1]):
            for g in range(groups):
                q = query[g * frames:(g + 1) * frames, head]  # (N, L, d)
                weights = torch.softmax(q @ key_bases[g, head].to(q.dtype).T * attn.scale, dim=-1)  # (N, L, K)
                out[g * frames:(g + 1) * frames, head] = weights @ value_bases[g, head].to(q.dtype)
        return out


def install(unet, mode: str, state: AttentionState):
    """Context manager: every self-attention of `unet` gets the processor of a benchmark mode."""
    if mode != "stem-naive":
        return attention_mode(unet, state)
    layers = self_attention_layers(unet)
    return processors_installed(unet, lambda name, _: NaiveStemAttnProcessor(state, name, layers[name]) if name in layers else None)


def processor(mode: str, state: AttentionState):
    """The processor of a benchmark mode for a single attention layer."""
    return NaiveStemAttnProcessor(state) if mode == "stem-naive" else PROCESSORS[mode](state)


@contextlib.contextmanager
def using_processor(attn, proc):
    """Set `proc` on a single attention layer for the block."""
    attn.set_processor(proc)
    yield


# -- measuring ---------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the baseline RSS holds only live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_hwm() -> bool:
    """Whether this kernel lets us reset VmHWM (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block above the baseline at its start, in MiB (`peak_mb`); see PEAK_MEMORY."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda-max-allocated" if device.type == "cuda" else (
            "rss-hwm" if _can_reset_hwm() else "rss-poll")
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        self.base = _status_kb("VmRSS")
        if self.method == "rss-hwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
        else:
            self._max, self._stop = self.base, threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self._max = max(self._max, _status_kb("VmRSS"))

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
            return
        if self.method == "rss-hwm":
            peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, _status_kb("VmRSS"))
        self.peak_mb = max(0, peak - self.base) / 1024


def measure(cases: dict[str, tuple[Callable, Callable]], device: torch.device, repeats: int, warmup: int) -> dict:
    """Time and peak memory of each case, `{mode: (setup, call)}`: `call()` runs inside `with setup():`.

    Each mode gets `warmup` untimed calls; then the timed calls are interleaved, one per mode per
    round, so a change in the machine's load affects every mode alike. Returns
    `{mode: (median seconds, max peak MiB, memory method)}`.
    """
    for setup, call in cases.values():
        with setup():
            for _ in range(warmup):
                call()
    seconds = {mode: [] for mode in cases}
    peaks = {mode: [] for mode in cases}
    method = PeakMemory(device).method
    for _ in range(repeats):
        for mode, (setup, call) in cases.items():
            with setup(), PeakMemory(device) as memory:
                start = time.perf_counter()
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[mode].append(time.perf_counter() - start)
            peaks[mode].append(memory.peak_mb)
    return {mode: (statistics.median(seconds[mode]), max(peaks[mode]), method) for mode in cases}


# -- the benchmarks ----------------------------------------------------------------------------

def attention_layer(device, dtype, seed: int = 0):
    """SD-1.5's highest-resolution self-attention layer (320 channels, 8 heads of 40), random weights."""
    from diffusers.models.attention_processor import Attention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attn = Attention(query_dim=320, heads=8, dim_head=40)
    return attn.to(device=device, dtype=dtype).eval().requires_grad_(False)


def sd15_unet(device, dtype, seed: int = 0):
    """SD-1.5's UNet architecture (860M parameters) with random weights: the real model's cost."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op
        unet.to(dtype=dtype)
    return unet.to(device=device).eval().requires_grad_(False)


def tiny_unet(device, dtype):
    """The built-in tiny-random model's UNet (tests)."""
    from .models import build_tiny

    return build_tiny(device=device, dtype=dtype).unet


def bench_attention(modes, frames, tokens, device, dtype, repeats, warmup, num_bases, num_iters, report):
    """Time one self-attention layer per mode and N; rows go to `report`."""
    attn = attention_layer(device, dtype)
    generator = torch.Generator().manual_seed(0)
    for n in frames:
        x = torch.randn(n, tokens, attn.inner_dim, generator=generator).to(device=device, dtype=dtype)

        def case(mode, x):
            state = AttentionState(method=mode.removesuffix("-naive"), num_bases=num_bases, num_iters=num_iters)
            return lambda: using_processor(attn, processor(mode, state)), lambda: attn(x)

        with torch.inference_mode():
            results = measure({mode: case(mode, x) for mode in modes}, device, repeats, warmup)
        for mode, (seconds, peak, how) in results.items():
            report({"bench": "attention", "mode": mode, "frames": n, "tokens": tokens, "seconds": seconds,
                    "peak_mb": peak, "memory": how})
        del x


def bench_inversion(modes, frames, size, device, dtype, repeats, warmup, num_bases, num_iters, report, unet_kind="sd15"):
    """Time one inversion step (one UNet call over all N frames) per mode and N; rows go to `report`."""
    from .inversion import call_unet

    unet = sd15_unet(device, dtype) if unet_kind == "sd15" else tiny_unet(device, dtype)
    side = size // 8  # latent pixels
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor(500, device=device)
    for n in frames:
        latents = torch.randn(n, unet.config.in_channels, side, side, generator=generator).to(device=device, dtype=dtype)
        text = torch.randn(n, 77, unet.config.cross_attention_dim, generator=generator).to(device=device, dtype=dtype)

        def case(mode, latents, text):
            state = AttentionState(method=mode.removesuffix("-naive"), num_bases=num_bases, num_iters=num_iters)
            return lambda: install(unet, mode, state), lambda: call_unet(unet, latents, t, text)

        with torch.inference_mode():
            results = measure({mode: case(mode, latents, text) for mode in modes}, device, repeats, warmup)
        for mode, (seconds, peak, how) in results.items():
            report({"bench": "inversion", "mode": mode, "frames": n, "size": size, "seconds": seconds,
                    "peak_mb": peak, "memory": how})
        del latents, text


# -- reporting ---------------------------------------------------------------------------------

def machine_info() -> dict:
    """CPU model and cores (lscpu's fields, read from /proc/cpuinfo), torch version, GPU name."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _key(row: dict) -> tuple:
    return (row["bench"], row["mode"], row["frames"], row.get("tokens"), row.get("size"), row["device"], row["dtype"])


def merge_rows(path: Path, rows: list[dict]) -> dict:
    """Rows of `path` (if any) updated with `rows`; returns the document written back."""
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = {_key(r): r for r in old}
    merged.update({_key(r): r for r in rows})
    order = {m: i for i, m in enumerate(ALL_MODES)}
    ordered = sorted(merged.values(), key=lambda r: (BENCHES.index(r["bench"]), r["device"], r["dtype"],
                                                     r.get("tokens") or r.get("size"), r["frames"], order[r["mode"]]))
    return {"machine": machine_info(), "seconds": "median over the timed calls after warm-up, modes interleaved",
            "peak_mb": PEAK_MEMORY, "rows": ordered}


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, with each mode's time relative to ddim at the same N."""
    ddim = {(_key(r)[0],) + _key(r)[2:]: r["seconds"] for r in rows if r["mode"] == "ddim"}
    lines = ["| bench | N | tokens / px | mode | seconds | × ddim | peak MiB | timed calls | device | dtype |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        base = ddim.get((_key(r)[0],) + _key(r)[2:])
        shape = r.get("tokens") if r["bench"] == "attention" else r.get("size")
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        lines.append(f"| {r['bench']} | {r['frames']} | {shape} | {r['mode']} | {r['seconds']:.3f} | {ratio} | "
                     f"{r['peak_mb']:.0f} | {r.get('repeats', '-')} | {r['device']} | {r['dtype']} |")
    return "\n".join(lines)


def markdown_document(doc: dict) -> str:
    """The benchmark page: machine, how it was measured, the table."""
    m = doc["machine"]
    return "\n".join([
        "# Benchmark: self-attention modes against the number of frames N", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + ".", "",
        f"`seconds`: {doc['seconds']}. `peak MiB`: {doc['peak_mb']}", "",
        markdown_table(doc["rows"]), "",
    ])


def plot(rows: list[dict], path: Path) -> None:
    """Seconds and peak memory against N, one line per mode; one row of two panels per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    benches = [b for b in BENCHES if any(r["bench"] == b for r in rows)]
    fig, axes = plt.subplots(len(benches), 2, figsize=(10, 3.8 * len(benches)), squeeze=False)
    for (ax_time, ax_mem), bench in zip(axes, benches):
        picked = [r for r in rows if r["bench"] == bench]
        shape = "tokens" if bench == "attention" else "size"
        where = f"{picked[0]['device']} {picked[0]['dtype']}, {shape} {picked[0].get(shape)}"
        for mode in ALL_MODES:
            line = sorted((r["frames"], r["seconds"], r["peak_mb"]) for r in picked if r["mode"] == mode)
            if not line:
                continue
            n, seconds, peak = zip(*line)
            ax_time.plot(n, seconds, marker="o", label=mode)
            ax_mem.plot(n, peak, marker="o", label=mode)
        times = [r["seconds"] for r in picked]
        log = max(times) > 20 * min(times)  # inflated attention: two orders of magnitude
        ax_time.set(title=f"{bench}: time ({where})", xlabel="frames N",
                    ylabel="seconds (log scale)" if log else "seconds", yscale="log" if log else "linear")
        if log:
            ax_time.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax_mem.set(title=f"{bench}: peak memory above baseline", xlabel="frames N", ylabel="MiB")
        for ax in (ax_time, ax_mem):
            ax.set_xticks(sorted({r["frames"] for r in picked}))
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stem.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=BENCHES + ("report",),
                        help="what to run; `report` only re-renders --md/--plot from the rows of --json")
    parser.add_argument("--frames", default="4,8,16", help="comma-separated N (default: %(default)s)")
    parser.add_argument("--modes", default=None, help="comma-separated modes (default: ddim,inflated,stem,stem-naive "
                        "for attention; ddim,stem,inflated for inversion)")
    parser.add_argument("--tokens", type=int, default=4096, help="attention: tokens per frame (default: %(default)s, a 64x64 latent)")
    parser.add_argument("--size", type=int, default=None, help="inversion: frame side in pixels (default: 256 on cpu, 512 on cuda)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--bases", type=int, default=256, help="STEM: K (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=5, help="STEM: R (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="merge the rows into this JSON file")
    parser.add_argument("--md", type=Path, default=None, help="write the JSON file's rows as a markdown page (needs --json)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of seconds and peak memory against N")
    parser.add_argument("--unet", default="sd15", choices=("sd15", "tiny"), help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    args.frames = [int(n) for n in args.frames.split(",") if n]
    args.modes = args.modes.split(",") if args.modes else list(MODES.get(args.bench, ()))
    unknown = set(args.modes) - set(ALL_MODES)
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.md and not args.json:
        parser.error("--md writes the rows of the --json file; pass --json too")
    if args.bench == "report" and not (args.json and args.json.exists()):
        parser.error("report reads the rows of an existing --json file")
    if args.size is None:
        args.size = 512 if args.device == "cuda" else 256
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []

    def report(row):
        row.update(device=args.device, dtype=args.dtype, repeats=args.repeats,
                   loadavg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
        rows.append(row)
        shape = f"tokens={row['tokens']}" if "tokens" in row else f"size={row['size']}"
        print(f"{row['bench']} {row['mode']:>10} N={row['frames']:<3} {shape}: {row['seconds']:.3f} s, "
              f"peak +{row['peak_mb']:.0f} MiB", flush=True)

    common = dict(modes=args.modes, frames=args.frames, device=device, dtype=dtype, repeats=args.repeats,
                  warmup=args.warmup, num_bases=args.bases, num_iters=args.iters, report=report)
    if args.bench == "attention":
        bench_attention(tokens=args.tokens, **common)
    elif args.bench == "inversion":
        bench_inversion(size=args.size, unet_kind=args.unet, **common)
    doc = None  # the --json file's rows: the table of --md and --plot
    if args.json:
        doc = json.loads(args.json.read_text()) if args.bench == "report" else merge_rows(args.json, rows)
        if rows:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(markdown_table(rows or doc["rows"]))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown_document(doc))
    if args.plot:
        plot(doc["rows"] if doc else rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
