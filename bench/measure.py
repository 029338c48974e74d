"""Timers, peak extra memory and the copy bandwidth.

CUDA: CUDA events around each call, after a time-based warm-up; before every timed call the
gradients are reset (outside the timing) and the L2 cache is flushed by writing a buffer twice its
size, so each call reads its inputs from HBM (inputs are also rotated among copies, see inputs.py).
Peak extra memory: ``torch.cuda.max_memory_allocated()`` during one call minus the memory
allocated just before it (inputs, rotation copies, anything the provider keeps), after
``reset_peak_memory_stats``.

CPU: ``time.perf_counter`` around each call, median of the repeats after warm-up; inputs smaller
than the last-level cache rotate among copies that together exceed twice it (rotation_cache_bytes,
inputs.copies_for_cache), so a call does not find the previous one's inputs in cache. Peak extra
memory: the process's resident-set high-water mark during one call minus its resident set just
before, with the high-water mark reset first (Linux: writing 5 to /proc/self/clear_refs resets
VmHWM). Large torch CPU buffers are mmap'ed by the allocator and returned to the OS when freed, so
the difference is the memory the call touched beyond what was live before it (it also counts page
tables and first-touched thread stacks: a few MB of noise). Where clear_refs cannot be written the
row's peak is null.
"""

from __future__ import annotations

import functools
import gc
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms) -> dict:
    ordered = sorted(times_ms)
    return {
        "ms_median": statistics.median(ordered),
        "ms_min": ordered[0],
        "ms_max": ordered[-1],
        "ms_p20": _quantile(ordered, 0.2),
        "ms_p80": _quantile(ordered, 0.8),
        "reps": len(ordered),
    }


def l2_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0)) or 50 * 2 ** 20


SYSFS_CPU = Path("/sys/devices/system/cpu")
# Where sysfs says nothing (not Linux, a container hiding it): a common server L3 (the 2-core VMs
# this harness runs on report 32 MiB). Too small a guess rotates too few copies; too large only
# costs memory (bounded by inputs.ROTATION_CAP_BYTES).
DEFAULT_LLC_BYTES = 32 * 2 ** 20


def _sysfs_size(text: str) -> Optional[int]:
    """'32768K' / '1M' / '512' (bytes) as bytes."""
    text = text.strip().upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
    digits = text.rstrip("KMGB")
    return int(digits) * scale if digits.isdigit() else None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def llc_bytes_from_sysfs(root: Path = SYSFS_CPU) -> Optional[int]:
    """The machine's last-level cache: the highest cache level sysfs lists (data or unified),
    each instance counted once (CPUs sharing one list the same shared_cpu_list), summed over the
    instances, since rotated inputs spread over every core's slice when all cores run. None
    where sysfs has no cache description."""
    found: dict = {}   # level -> {shared_cpu_list: bytes}
    for index in sorted(root.glob("cpu[0-9]*/cache/index[0-9]*")):
        level, size = _read(index / "level"), _read(index / "size")
        if _read(index / "type") == "Instruction" or not level or not level.isdigit() or not size:
            continue
        nbytes = _sysfs_size(size)
        if nbytes:
            shared = _read(index / "shared_cpu_list") or str(index.parent.parent.name)
            found.setdefault(int(level), {})[shared] = nbytes
    if not found:
        return None
    return sum(found[max(found)].values())


def rotation_cache_bytes(device: torch.device) -> int:
    """The cache the input rotation must defeat: the L2 on a GPU, the last-level cache on the CPU
    (sysfs, else DEFAULT_LLC_BYTES)."""
    if device.type == "cuda":
        return l2_bytes(device)
    return llc_bytes_from_sysfs() or DEFAULT_LLC_BYTES


class CudaTimer:
    """Median-of-events timer: warm-up for ``warmup_ms``, then time reps for about ``rep_ms``."""

    def __init__(self, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                 min_reps: int = 10, max_reps: int = 500):
        self.device = device
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        flush = 2 * (l2_bytes(device) or 50 * 2 ** 20)
        self._flush = torch.empty(flush // 4, dtype=torch.int32, device=device)

    def time(self, step: Callable, reset: Callable) -> list:
        ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        # Estimate the time of one call (3 calls), then size the warm-up and the timed reps.
        start, end = ev(), ev()
        reset()
        start.record()
        for _ in range(3):
            step()
        end.record()
        sync(self.device)
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        n_warm = max(1, min(1000, int(self.warmup_ms / estimate)))
        n_rep = max(self.min_reps, min(self.max_reps, int(self.rep_ms / estimate)))
        for _ in range(n_warm):
            reset()
            step()
        starts = [ev() for _ in range(n_rep)]
        ends = [ev() for _ in range(n_rep)]
        for i in range(n_rep):
            reset()
            self._flush.zero_()
            starts[i].record()
            step()
            ends[i].record()
        sync(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def close(self):
        self._flush = None


class CpuTimer:
    """perf_counter around each call: ``warmup`` calls, then reps for about ``rep_s`` seconds."""

    def __init__(self, warmup: int = 1, rep_s: float = 3.0, min_reps: int = 5, max_reps: int = 100):
        self.warmup, self.rep_s = warmup, rep_s
        self.min_reps, self.max_reps = min_reps, max_reps

    def time(self, step: Callable, reset: Callable) -> list:
        for _ in range(self.warmup):
            reset()
            step()
        times = []
        began = time.perf_counter()
        while len(times) < self.max_reps:
            reset()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= self.min_reps and time.perf_counter() - began >= self.rep_s:
                break
        return times

    def close(self):
        pass


# ----------------------------------------------------------------------------- memory

def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_memory_method() -> str:
    if _proc_status_kb("VmHWM") is not None and _reset_hwm():
        return "rss-hwm (VmHWM after clear_refs=5 minus VmRSS before)"
    return "unavailable (no /proc/self/clear_refs)"


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache  # once a process: find_library may run ldconfig, and the setting persists
def _pin_mmap_threshold() -> None:
    """glibc serves a freed buffer's memory again from its heap, without returning it to the OS,
    once its dynamic mmap threshold has risen (up to 32 MiB): a temporary of a few MB is then
    resident before the call and the RSS high-water mark misses it (16 MB temporaries read 16,
    16, 16, 0 MB on successive calls). A fixed 128 KiB threshold maps every larger buffer anew."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        except (OSError, AttributeError):  # not glibc
            pass


def peak_extra_bytes(device: torch.device, step: Callable, reset: Callable) -> Optional[int]:
    """Memory one call needs beyond what was allocated before it (see the module docstring)."""
    reset()
    gc.collect()
    if device.type == "cpu":
        _pin_mmap_threshold()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _reset_hwm():
        step()
        return None
    before = _proc_status_kb("VmRSS")
    step()
    hwm = _proc_status_kb("VmHWM")
    if before is None or hwm is None:
        return None
    return max(0, hwm - before) * 1024


# ----------------------------------------------------------------------------- copy bandwidth

COPY_METHOD = "dst.copy_(src), bytes read + written over median time"
# The probe fractions of the floor use (bench/README.md): the warm one measured before the rows.
# It is known when each row is written (a killed run's rows are complete), and it is what every
# file before 2026-12 measured, so fractions stay comparable across files; `after` and `spread`
# say how far the machine drifted during the run, `fresh` how much slower writes into
# never-touched memory are (first-touch page faults: what a CPU fwdbwd row's gradient pays).
FLOOR_PROBE = "before"


def default_copy_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return int(min(2 ** 30, free // 4))
    return 256 * 2 ** 20


def _new_destination(like: torch.Tensor) -> torch.Tensor:
    """A newly allocated, never written buffer. On a GPU the caching allocator would hand back the
    block just freed, so its cache is emptied first (device memory has no first-touch cost, so
    there the fresh probe mostly checks that)."""
    if like.device.type == "cuda":
        torch.cuda.empty_cache()
    return torch.empty_like(like)


def _probe_result(nbytes: int, times: list, destination: str) -> dict:
    stats = summarize(times)
    return {"bytes": nbytes, "ms_median": stats["ms_median"], "ms_min": stats["ms_min"],
            "ms_max": stats["ms_max"], "reps": stats["reps"],
            "gb_per_s": 2 * nbytes / (stats["ms_median"] * 1e-3) / 1e9,
            "method": COPY_METHOD, "destination": destination}


def copy_bandwidth(device: torch.device, timer, nbytes: Optional[int] = None, *,
                   fresh: bool = False) -> dict:
    """A large device-to-device (or RAM-to-RAM) copy: (bytes read + bytes written) / median time.
    ``fresh``: every timed copy goes into a destination allocated just before it (outside the
    timing) and never touched; otherwise into one warm buffer, written by every rep."""
    nbytes = nbytes or default_copy_bytes(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = [torch.empty_like(src)]

    def renew() -> None:
        dst[0] = None   # free the previous one first: one destination alive at a time
        dst[0] = _new_destination(src)

    times = timer.time(lambda: dst[0].copy_(src), renew if fresh else (lambda: None))
    src = dst = None  # noqa: F841 - free the buffers before the rows run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _probe_result(nbytes, times, "fresh (allocated before each copy, never touched)"
                         if fresh else "warm (one buffer, rewritten every rep)")


def _probe(device: torch.device, timer, nbytes: Optional[int], fresh: bool = False) -> dict:
    """copy_bandwidth, or its error as a record: the rows are still worth having without it."""
    try:
        return copy_bandwidth(device, timer, nbytes, fresh=fresh)
    except Exception as exc:  # noqa: BLE001
        return {"gb_per_s": None, "error": f"{type(exc).__name__}: {exc}"}


def copy_probes_before(device: torch.device, timer, nbytes: Optional[int] = None) -> dict:
    """The run's copy_bandwidth record before the rows: the warm probe (top-level ``gb_per_s``,
    the one floor fractions use, as in older files) and the fresh-destination probe."""
    before = _probe(device, timer, nbytes)
    fresh = _probe(device, timer, nbytes, fresh=True)
    return {**before, "floor_uses": FLOOR_PROBE, "before": before, "fresh": fresh}


def add_probe_after(record: dict, device: torch.device, timer,
                    nbytes: Optional[int] = None) -> None:
    """The warm probe again once the rows are done, and the spread of the two."""
    record["after"] = _probe(device, timer, nbytes)
    record["spread"] = probe_spread(record.get("before"), record["after"])


def probe_spread(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """min, max and (max - min) / min of the warm probes' GB/s; None if one is missing."""
    values = [p.get("gb_per_s") for p in (before or {}, after or {})]
    if any(v is None or v <= 0 for v in values):
        return None
    lo, hi = min(values), max(values)
    return {"min_gb_per_s": lo, "max_gb_per_s": hi, "relative": (hi - lo) / lo}


def default_threads() -> int:
    return os.cpu_count() or 1
