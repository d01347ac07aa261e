"""`python -m benchmarks gpu` (`bash scripts/gpu_check.sh`): the one-command GPU check.

Sections, in this order, each with its own time budget and (by default) its own process, so a
failure, an out-of-memory or a timeout loses only that section; rows go to OUT/bench-gpu.json after
every row (and OUT/bench-gpu.md with them), the plot and a summary table at the end:

    sdpa       which scaled-dot-product-attention kernels (flash, memory-efficient, cuDNN, math) accept
               SD-1.5's shapes in fp16, and which kernels the engine's processors actually ran
    pytest     the `gpu`-marked tests, tests/test_gpu.py (fp16 against fp32 on CUDA, offload, ...)
    bench      the attention and inversion benches at 512 px fp16, N = 8, 16, 32, 48 (inflated at 8, 16)
    full-stem  a whole 50-step STEM inversion + reconstruction of 48 frames at 512x512, SD-1.5's
               architecture with random weights (row bench "full"; goal: under 90 s on one H100)
    full-ddim  the same with per-frame DDIM
    full-edit  a 50-step TokenFlow edit of the same clip (the STEM inversion comes from the cache)
    full-canny the full-stem job with canny structure guidance (a ControlNet of SD-1.5's shape, random
               weights, in every UNet call; row bench "full", mode "stem-canny")
    fatezero   FateZero edits at 8/16/32/48 frames and 10/50 steps (peak memory against frames and steps)

`--dry` runs the sections on the CPU with the tiny model at tiny sizes in seconds (the test suite's
check that this cannot rot); there `pytest` is left out unless --sections names it.

Random weights in fp16: every full job checks that its latents stayed finite (`finite` in the row)
and says so in its note; NaNs are reported, never hidden.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stem.report import read_doc, write_json, write_report

from .measure import load_average, machine_info
from .report import (
    full_jobs_table, machine_summary, markdown_document, markdown_table, merge_rows, plot, sections_table,
)

DEADLINE = 510  # seconds for the whole check: the goal is 8 minutes; the integrator runs it under a 9.8-minute limit
RESERVE = 15          # seconds kept for the report at the end
BUDGETS = {
    "sdpa": 45,
    "pytest": 90,
    "bench": 100,
    "full-stem": 150,
    "full-stem-fused": 90,
    "full-ddim": 90,
    "full-edit": 150,
    "full-canny": 200,
    "fatezero": 200,
}
SECTIONS = tuple(BUDGETS)
PROMPT, EDIT_PROMPT = "a test pattern sliding sideways", "a watercolor painting of a test pattern sliding sideways"


class SectionSkipped(Exception):
    """The section cannot run here (its note says why)."""


def repository_root(start: Path | None = None) -> Path:
    """The checkout the check runs in: the nearest folder at or above `start` (default: the working folder),
    then above this package, holding `stem/`, `benchmarks/` and `tests/test_gpu.py`.

    The pytest section runs tests/test_gpu.py there. Raises SectionSkipped when there is no such folder.
    """
    starts = [Path.cwd() if start is None else Path(start), Path(__file__).parent]
    for folder in (f for s in starts for f in (s.resolve(), *s.resolve().parents)):
        if all((folder / marker).is_file() for marker in ("stem/__init__.py", "benchmarks/__init__.py",
                                                          "tests/test_gpu.py")):
            return folder
    raise SectionSkipped("no repository checkout (stem/, benchmarks/ and tests/test_gpu.py) at or above "
                         f"{starts[0]}; run the check from the repository root (bash scripts/gpu_check.sh)")


class SectionTimeout(BaseException):
    """SIGTERM from the orchestrator: the section's budget is spent."""


@dataclass(frozen=True)
class CheckConfig:
    """Sizes of the check: the real one on CUDA, or the tiny dry run on the CPU."""

    out: Path
    cache_dir: Path
    dry: bool = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry else "cuda")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.dry else torch.float16

    @property
    def model(self) -> str:
        return "tiny" if self.dry else "sd15"

    @property
    def size(self) -> int:
        return 64 if self.dry else 512

    @property
    def frames(self) -> tuple[int, ...]:
        return (1, 2) if self.dry else (8, 16, 32, 48)

    @property
    def inflated_frames(self) -> tuple[int, ...]:
        return (1,) if self.dry else (8, 16)

    @property
    def full_frames(self) -> int:
        return 2 if self.dry else 48

    @property
    def steps(self) -> int:
        return 2 if self.dry else 50

    @property
    def repeats(self) -> int:
        return 1 if self.dry else 3

    @property
    def fatezero_runs(self) -> list[tuple[int, int]]:
        """(frames, steps) of the FateZero section."""
        # every N at 10 steps (memory against frames); 8 and 48 at 50 (flat in steps; 48 x 50 reuses the
        # full-stem section's inversion from the cache), so the check stays within its 8 minutes
        chosen = os.environ.get("STEM_GPU_FATEZERO_RUNS")  # e.g. "48x50,16x50": a rerun of some rows only
        if chosen:
            return [tuple(int(v) for v in run.split("x")) for run in chosen.split(",")]
        return [(2, 2)] if self.dry else [(n, 10) for n in (8, 16, 32, 48)] + [(8, 50), (48, 50)]

    @property
    def json(self) -> Path:
        return self.out / "bench-gpu.json"


class Recorder:
    """Writes each row into the JSON (and the markdown page) as soon as it exists."""

    def __init__(self, cfg: CheckConfig):
        self.cfg = cfg
        self.device_name = "cpu" if cfg.dry else torch.cuda.get_device_name(cfg.device)
        self.dtype_name = str(cfg.dtype).removeprefix("torch.")
        self.machine = machine_summary(machine_info())

    def row(self, row: dict) -> None:
        row.setdefault("repeats", 1)
        row.update(device=self.device_name, dtype=self.dtype_name, machine=self.machine,
                   loadavg=load_average())
        write_report(merge_rows(self.cfg.json, [row]), json_path=self.cfg.json, md_path=self.cfg.out / "bench-gpu.md",
                     markdown=markdown_document)
        shape = f"tokens={row['tokens']}" if "tokens" in row else f"size={row.get('size')}"
        print(f"  row: {row['bench']} {row['mode']} N={row['frames']} {shape}: {row['seconds']:.3f} s, "
              f"peak {row['peak_mb']:.0f} MiB" + (f" ({row['note']})" if row.get("note") else ""), flush=True)

    def update(self, key: str, value) -> None:
        """Set a top-level entry of the JSON document (sdpa, pytest)."""
        doc = read_doc(self.cfg.json)
        doc[key] = value
        write_json(self.cfg.json, doc)


# -- helpers --------------------------------------------------------------------------------------

def synthetic_video(num_frames: int, size: int, seed: int = 0):
    """A `Video` of a smooth random texture sliding 2 px per frame (no decoding library needed)."""
    from stem.video import Video

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8 + 1, (size + 2 * num_frames) // 8 + 1, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks: something the VAE can keep
    return Video(np.stack([texture[:size, 2 * t:2 * t + size] for t in range(num_frames)]), 10.0, "synthetic")


def build_parts(cfg: CheckConfig):
    from .models import bench_parts

    start = time.perf_counter()
    parts = bench_parts(cfg.model, cfg.device, cfg.dtype)
    print(f"  built {parts.model_id} on {cfg.device} {cfg.dtype} in {time.perf_counter() - start:.1f} s", flush=True)
    return parts


class PhaseClock:
    """callback({"phase", "i", "total"}) -> the time at which each phase last reported; prints every tenth step."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last: dict[str, float] = {}
        self.where = "starting"

    def __call__(self, info: dict) -> None:
        phase, done, total = info["phase"], info["i"], info["total"]
        now = time.perf_counter()
        self.last[phase] = now
        self.where = f"{phase} {done}/{total}"
        if phase in ("inverting", "reconstructing", "editing") and (done % 10 == 0 or done == total):
            print(f"    {phase} {done}/{total} at {now - self.start:.1f} s", flush=True)

    def between(self, before: str, phase: str) -> float | None:
        """Seconds from the end of `before` (or the start) to the end of `phase`."""
        if phase not in self.last:
            return None
        return round(self.last[phase] - self.last.get(before, self.start), 3)


class PeakGpu:
    """Absolute peak of allocated (and reserved) CUDA memory over a block; nothing on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated_mb = self.reserved_mb = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            self.reserved_mb = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)


class FiniteInputs:
    """Module forward pre-hook (removed on exit): were all inputs of `module` finite?"""

    def __init__(self, module):
        self.module, self.finite = module, True

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._check)
        return self

    def _check(self, _module, args):
        self.finite = self.finite and all(bool(torch.isfinite(a).all()) for a in args if torch.is_tensor(a))

    def __exit__(self, *exc):
        self.handle.remove()


def job_estimate_mb(engine, plan, video, settings, edit=None) -> float:
    """stem.memory's estimate of the job as planned (on a CPU: for the plan's chunk)."""
    from stem.memory import Job, ModelFacts, estimate

    if plan.planned:
        return round(plan.estimate_bytes / 2**20, 1)
    job = Job.of(video, settings, edit)
    return round(estimate(job, ModelFacts.of(engine.parts), plan.chunk_size)["peak"] / 2**20, 1)


def _peak_note(peak: "PeakGpu") -> str:
    return "" if peak.allocated_mb is None else f", peak {peak.allocated_mb:.0f} MiB"


def _finite_note(finite: bool, dtype: torch.dtype) -> str:
    return "" if finite else f"NON-FINITE latents in {str(dtype).removeprefix('torch.')} (random weights overflowed)"


# -- the sections ---------------------------------------------------------------------------------

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_probe(device: torch.device, dtype: torch.dtype, frames: int = 2) -> dict:
    """Which SDPA backends accept SD-1.5's attention shapes, and which kernels the processors ran.

    Shapes: per-frame self-attention, STEM (queries against K = 256 bases) and inflated attention
    (8 frames' tokens), at head dims 40, 80, 160 (SD-1.5's levels at 512 px: 4096, 1024, 256 tokens).
    """
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    scale = 64 if device.type == "cpu" else 1  # the CPU dry run uses 64x fewer tokens
    generator = torch.Generator(device).manual_seed(0)
    cases = []
    for head_dim, tokens in ((40, 4096 // scale), (80, 1024 // scale), (160, 256 // scale)):
        for name, batch, queries, keys in (("per-frame", frames, tokens, tokens), ("STEM bases", frames, tokens, 256),
                                           ("inflated, 8 frames", 1, 8 * tokens, 8 * tokens)):
            q = torch.randn(batch, 8, queries, head_dim, device=device, dtype=dtype, generator=generator)
            k = torch.randn(batch, 8, keys, head_dim, device=device, dtype=dtype, generator=generator)
            usable = {}
            for label, backend in backends.items():
                if label == "math" and queries * keys > 2**26:
                    usable[label] = "not tried"  # a (tokens x tokens) matrix per head
                    continue
                try:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, k)
                    usable[label] = "yes"
                except Exception:  # noqa: BLE001 - torch refuses a backend with RuntimeError (or others)
                    usable[label] = "no"
            cases.append({"name": name, "keys": keys, "head_dim": head_dim, "usable": usable})
    try:
        ran = sdpa_kernels_ran(device, dtype, 4096 // scale, frames)
    except Exception as error:  # noqa: BLE001 - the profiler is optional; the table above still stands
        ran = {"profiler": f"failed ({type(error).__name__}: {error})"}
    return {"about": f"{str(dtype).removeprefix('torch.')}, 8 heads; `yes`: the backend alone (torch.nn.attention."
                     "sdpa_kernel) ran the shape.", "backends": list(SDPA_BACKENDS), "cases": cases, "ran": ran}


def sdpa_kernels_ran(device, dtype, tokens, frames) -> dict:
    """The attention kernels the profiler saw in one call of each engine processor on SD-1.5's top layer."""
    from torch.profiler import ProfilerActivity, profile

    from stem.attention import PROCESSORS, AttentionState
    from .models import attention_layer

    attn = attention_layer(device, dtype)
    x = torch.randn(frames, tokens, 320, device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ran = {}
    for method in ("ddim", "stem", "inflated"):
        attn.set_processor(PROCESSORS[method](AttentionState(method=method)))
        with torch.inference_mode():
            attn(x)  # warm-up
            with profile(activities=activities) as prof:
                attn(x)
        names = {e.key for e in prof.key_averages()
                 if re.search(r"flash|fmha|efficient|cudnn|scaled_dot_product|attention", e.key, re.I)
                 and not e.key.startswith("aten::scaled_dot_product_attention")}
        ran[method] = ", ".join(sorted(n[:90] for n in names)) or "none seen"
    return ran


def section_sdpa(cfg: CheckConfig, rec: Recorder) -> str:
    result = sdpa_probe(cfg.device, cfg.dtype)
    rec.update("sdpa", result)
    fused = sorted({b for c in result["cases"] for b in ("flash", "efficient") if c["usable"].get(b) == "yes"})
    missing = [f"{c['name']} d={c['head_dim']}" for c in result["cases"]
               if not any(c["usable"].get(b) == "yes" for b in ("flash", "efficient"))]
    print("  kernels that ran:", json.dumps(result["ran"], indent=1), flush=True)
    return f"fused backends usable: {', '.join(fused) or 'none'}" + (
        f"; none for {', '.join(missing)}" if missing else ""
    )


def section_pytest(cfg: CheckConfig, rec: Recorder) -> str:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rA", "-p", "no:cacheprovider"]
    proc = subprocess.run(command, cwd=repository_root(), capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n", flush=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"pytest exited {proc.returncode}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    rec.update("pytest", {"summary": summary, "returncode": proc.returncode, **counts})
    if proc.returncode not in (0, 5):
        raise RuntimeError(summary)
    return summary


def section_bench(cfg: CheckConfig, rec: Recorder) -> str:
    from .benches import bench_attention, bench_inversion
    from .models import bench_unet

    common = dict(device=cfg.device, dtype=cfg.dtype, repeats=cfg.repeats, warmup=1, num_bases=256, num_iters=5)

    def report(row):
        rec.row({**row, "repeats": cfg.repeats})

    from stem import em_fused

    fused = ["stem-fused"] if em_fused.available(cfg.device) else []

    def modes(n):
        return ["ddim", "stem", *fused] + (["inflated"] if n in cfg.inflated_frames else [])

    for n in cfg.frames:  # one layer: cheap, all N first; the authors' formulation (stem-naive) beside ours
        bench_attention(modes(n) + ["stem-naive"], [n], tokens=(cfg.size // 8) ** 2, report=report, **common)
    unet = bench_unet(cfg.model, cfg.device, cfg.dtype)
    for n in cfg.frames:
        bench_inversion(modes(n), [n], cfg.size, report=report, unet=unet, **common)
    return f"N = {', '.join(map(str, cfg.frames))}"


def section_full(cfg: CheckConfig, rec: Recorder, method: str, em_kernel: str = "torch", control: str = "none") -> str:
    """One whole inversion + reconstruction through `Engine.invert` (row bench "full"; mode "stem-fused" for STEM
    with the fused EM kernel, "stem-canny" with canny structure guidance: a random ControlNet of the UNet's shape)."""
    from stem import em_fused
    from stem.cache import LatentCache
    from stem.engine import Engine, InversionSettings

    if em_kernel == "fused" and not em_fused.available(cfg.device):
        return f"skipped: the fused EM kernel needs CUDA and Triton (this run: {cfg.device.type})"
    parts = build_parts(cfg)
    engine = Engine(parts.model_id, device=cfg.device, cache=LatentCache(cfg.cache_dir),
                    em_kernel=em_kernel).use_parts(parts)
    video = synthetic_video(cfg.full_frames, cfg.size)
    guidance = {} if control == "none" else dict(control=control, control_model="tiny-random")  # built from the UNet
    settings = InversionSettings(model=parts.model_id, method=method, num_steps=cfg.steps, size=cfg.size, prompt=PROMPT,
                                 **guidance)
    plan = engine.plan(video, settings)
    print(f"  memory plan: {plan.describe()}", flush=True)
    mode = method + ("-fused" if em_kernel == "fused" else "") + ("" if control == "none" else f"-{control}")
    row = {"bench": "full", "mode": mode, "frames": cfg.full_frames, "size": cfg.size, "steps": cfg.steps,
           "chunk_size": plan.chunk_size, "estimate_mb": job_estimate_mb(engine, plan, video, settings),
           "memory": "cuda-max-allocated (absolute)" if cfg.device.type == "cuda" else "not measured on the CPU"}
    clock = PhaseClock()
    try:
        with PeakGpu(cfg.device) as peak:
            result = engine.invert(video, settings, plan, clock)
    except SectionTimeout:
        rec.row({**row, "seconds": time.perf_counter() - clock.start, "peak_mb": 0.0, "complete": False,
                 "note": f"timed out at {clock.where}"})
        raise
    finite = bool(torch.isfinite(result.trajectory).all())
    if em_kernel == "fused":  # whether NUM_WARPS leaves the kernel's accumulators in registers (stem/em_fused.py)
        from stem.memory import ModelFacts

        facts = ModelFacts.of(parts)
        head_channels = round(320 * facts.width / facts.heads)
        row["em_kernel"] = em_fused.compiled_registers(cfg.device, 256, head_channels, head_channels, cfg.dtype)
    rec.row({**row, "seconds": round(result.seconds, 3), "seconds_total": round(time.perf_counter() - clock.start, 3),
             "seconds_inverting": clock.between("encoding", "inverting"),
             "seconds_reconstructing": clock.between("inverting", "reconstructing"),
             "peak_mb": peak.allocated_mb or 0.0, "peak_reserved_mb": peak.reserved_mb, "finite": finite,
             "cache_hit": result.cache_hit, "note": _finite_note(finite, cfg.dtype)})
    registers = row.get("em_kernel")
    kernel = (
        f", EM kernel {registers['registers']} registers, {registers['spilled_registers']} spilled" if registers else ""
    )
    return f"{result.seconds:.1f} s{_peak_note(peak)}{kernel}" + ("" if finite else ", NON-FINITE")


def run_edit(cfg: CheckConfig, rec: Recorder, editor: str, frames: int, steps: int, parts=None) -> str:
    """One whole edit through `edit_video` (row bench "full-edit"); the STEM inversion comes from the cache
    when there."""
    from stem.cache import LatentCache
    from stem.editing import FateZeroSettings, TokenFlowSettings, edit_video
    from stem.engine import Engine, InversionSettings

    parts = parts if parts is not None else build_parts(cfg)
    engine = Engine(parts.model_id, cache=LatentCache(cfg.cache_dir)).use_parts(parts)
    video = synthetic_video(frames, cfg.size)
    settings = InversionSettings(model=parts.model_id, method="stem", num_steps=steps, size=cfg.size, prompt=PROMPT)
    edit = (TokenFlowSettings(prompt=EDIT_PROMPT) if editor == "tokenflow"
            else FateZeroSettings(prompt=EDIT_PROMPT, source_prompt=PROMPT))
    plan = engine.plan(video, settings, edit)
    print(f"  memory plan: {plan.describe()}", flush=True)
    row = {"bench": "full-edit", "mode": editor, "frames": frames, "size": cfg.size, "steps": steps,
           "chunk_size": plan.chunk_size, "estimate_mb": job_estimate_mb(engine, plan, video, settings, edit),
           "memory": "cuda-max-allocated (absolute)" if cfg.device.type == "cuda" else "not measured on the CPU"}
    clock = PhaseClock()
    try:
        with PeakGpu(cfg.device) as peak, FiniteInputs(parts.vae.decoder) as latents:
            result = edit_video(engine, video, settings, edit, plan, clock)
    except SectionTimeout:
        rec.row({**row, "seconds": time.perf_counter() - clock.start, "peak_mb": 0.0, "complete": False,
                 "note": f"timed out at {clock.where}"})
        raise
    rec.row({**row, "seconds": round(result.seconds_editing, 3), "seconds_editing": round(result.seconds_editing, 3),
             "seconds_inversion": round(result.seconds_inversion, 3), "inversion_cache_hit": result.inversion_cache_hit,
             "peak_mb": peak.allocated_mb or 0.0, "peak_reserved_mb": peak.reserved_mb, "finite": latents.finite,
             "note": _finite_note(latents.finite, cfg.dtype)})
    return f"{result.seconds_editing:.1f} s editing{_peak_note(peak)}" + ("" if latents.finite else ", NON-FINITE")


def section_fatezero(cfg: CheckConfig, rec: Recorder) -> str:
    """FateZero edits (their peak memory against frames and steps), one row each."""
    parts = build_parts(cfg)
    for frames, steps in cfg.fatezero_runs:
        run_edit(cfg, rec, "fatezero", frames, steps, parts)
    return f"{len(cfg.fatezero_runs)} edits"


RUNNERS = {
    "sdpa": section_sdpa,
    "pytest": section_pytest,
    "bench": section_bench,
    "full-stem": lambda cfg, rec: section_full(cfg, rec, "stem"),
    "full-stem-fused": lambda cfg, rec: section_full(cfg, rec, "stem", em_kernel="fused"),
    "full-ddim": lambda cfg, rec: section_full(cfg, rec, "ddim"),
    "full-edit": lambda cfg, rec: run_edit(cfg, rec, "tokenflow", cfg.full_frames, cfg.steps),
    "full-canny": lambda cfg, rec: section_full(cfg, rec, "stem", control="canny"),
    "fatezero": section_fatezero,
}


def run_section(name: str, cfg: CheckConfig) -> tuple[str, str]:
    """Run one section here; returns (status, note) with status ok, skipped, failed or timeout."""
    try:
        note = RUNNERS[name](cfg, Recorder(cfg))
        return "ok", note or ""
    except SectionSkipped as skipped:
        return "skipped", str(skipped)
    except SectionTimeout:
        return "timeout", "budget spent"
    except Exception as error:  # noqa: BLE001 - one section's failure is reported, the others go on
        import traceback

        traceback.print_exc()
        return "failed", f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def section_main(name: str, cfg: CheckConfig, status_file: Path) -> int:
    """A section in its own process (the orchestrator's child); SIGTERM ends it as a timeout."""
    def on_term(*_):
        raise SectionTimeout()

    signal.signal(signal.SIGTERM, on_term)
    status, note = run_section(name, cfg)
    status_file.write_text(json.dumps({"status": status, "note": note}))
    return 0 if status in ("ok", "skipped") else 1


# -- the orchestrator -------------------------------------------------------------------------------

def _import_path() -> str:
    """PYTHONPATH for a section's process: the folders this one imported `benchmarks` and `stem` from, first."""
    import stem

    folders = [str(Path(module_file).resolve().parents[1]) for module_file in (__file__, stem.__file__)]
    folders += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(folders))


def _child(name: str, cfg: CheckConfig, budget: float) -> tuple[str, str]:
    """Run a section in a child process within `budget` seconds (SIGTERM, then SIGKILL 10 s later)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        status_file = Path(f.name)
    command = [sys.executable, "-m", "benchmarks", "gpu", "--section", name, "--out", str(cfg.out),
               "--cache-dir", str(cfg.cache_dir), "--status-file", str(status_file)] + (["--dry"] if cfg.dry else [])
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": _import_path()})
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        result = json.loads(status_file.read_text())
        status, note = result["status"], result["note"]
    except (OSError, ValueError, KeyError):
        status, note = ("timeout", f"killed after {budget:.0f} s") if proc.returncode in (-9, -15) else (
            "failed", f"the section's process exited {proc.returncode} (a crash?)")
    finally:
        status_file.unlink(missing_ok=True)
    if status == "timeout":
        note = f"budget of {budget:.0f} s spent" + (f"; {note}" if note and note != "budget spent" else "")
    return status, note


def _record_section(cfg: CheckConfig, name: str, status: str, seconds: float, note: str) -> None:
    doc = read_doc(cfg.json)
    doc.setdefault("sections", {})[name] = {"status": status, "seconds": round(seconds, 1), "note": note}
    write_json(cfg.json, doc)


def run_check(out: Path, dry: bool = False, sections=None, isolate: bool | None = None,
              deadline: float = DEADLINE) -> int:
    """Run the GPU check's sections in order, within `deadline` seconds; write OUT/bench-gpu.{json,md,png}.

    Returns 0 when every section ran or was skipped, 1 when one failed or ran out of time.
    """
    sections = list(sections or ([s for s in SECTIONS if s != "pytest"] if dry else SECTIONS))
    isolate = (not dry) if isolate is None else isolate
    if not dry and not torch.cuda.is_available():
        print(
            "error: the GPU check needs a CUDA device (torch sees none); run it with --dry on a CPU.", file=sys.stderr
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    cfg = CheckConfig(out=out, cache_dir=Path(tempfile.mkdtemp(prefix="stem-gpu-cache-")), dry=dry)
    start = time.monotonic()
    results = {}
    try:
        for name in sections:
            left = deadline - (time.monotonic() - start) - RESERVE
            budget = min(BUDGETS[name], left)
            print(f"== {name} (budget {max(0, budget):.0f} s)", flush=True)
            began = time.monotonic()
            if budget < 10:
                status, note = "skipped", "no time left"
            elif isolate:
                status, note = _child(name, cfg, budget)
            else:
                status, note = run_section(name, cfg)
            results[name] = (status, time.monotonic() - began, note)
            _record_section(cfg, name, status, results[name][1], note)
            print(f"== {name}: {status} in {results[name][1]:.0f} s {note}", flush=True)
    finally:
        shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    doc = read_doc(cfg.json)
    doc.setdefault("machine", machine_info())
    doc.setdefault("seconds", "median over the timed calls after warm-up, modes interleaved")
    doc.setdefault("peak_mb", "see benchmarks/measure.py")
    plotted = any(r["bench"] in ("attention", "inversion", "edit") for r in doc["rows"])
    write_report(doc, json_path=cfg.json, md_path=out / "bench-gpu.md",
                 png_path=out / "bench-gpu.png" if plotted else None, markdown=markdown_document, plot=plot)
    print("\n" + markdown_table(doc["rows"]) + "\n\n" + full_jobs_table(doc["rows"]) + "\n")
    print(sections_table({name: {"status": status, "seconds": seconds, "note": note}
                          for name, (status, seconds, note) in results.items()}))
    print(f"\ntotal {time.monotonic() - start:.0f} s; wrote {cfg.json}, {out / 'bench-gpu.md'}"
          + (f", {out / 'bench-gpu.png'}" if (out / "bench-gpu.png").exists() else ""), flush=True)
    return 0 if all(status in ("ok", "skipped") for status, _, _ in results.values()) else 1
