"""Timing and peak memory of benchmark calls, and a description of the machine."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
import time
from typing import Callable

import torch

PEAK_MEMORY = (
    "peak memory of one call above the baseline just before it. cuda: torch.cuda.max_memory_allocated() "
    "- memory_allocated(). cpu: peak resident set size (VmHWM, reset through /proc/self/clear_refs; where "
    "that is refused, a thread polling VmRSS every millisecond) - VmRSS before the call, measured after "
    "malloc_trim(0) so that heap memory freed by an earlier call is not counted as already there."
)


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
    round, in reverse order every other round (ABBA), so a change in the machine's load affects
    every mode alike. Returns
    `{mode: (median seconds, max peak MiB, memory method)}`.
    """
    for setup, call in cases.values():
        with setup():
            for _ in range(warmup):
                call()
    seconds = {mode: [] for mode in cases}
    peaks = {mode: [] for mode in cases}
    method = PeakMemory(device).method
    for round_ in range(repeats):
        # ABBA: every other round runs the modes in reverse, so a steady drift of the machine's load
        # (other processes starting or ending) favours no mode
        order = list(cases.items()) if round_ % 2 == 0 else list(cases.items())[::-1]
        for mode, (setup, call) in order:
            with setup(), PeakMemory(device) as memory:
                start = time.perf_counter()
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[mode].append(time.perf_counter() - start)
            peaks[mode].append(memory.peak_mb)
    return {mode: (statistics.median(seconds[mode]), max(peaks[mode]), method) for mode in cases}


def load_average() -> float | None:
    """The 1-minute load average, 2 decimals (None where the OS has none): how busy the machine was."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


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
