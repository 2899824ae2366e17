"""Timing helpers and machine facts shared by the mixprec run and the AIMET worker.

Imports only the standard library and torch, so the AIMET worker (another venv, no mixprec)
can use it too.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

now = time.perf_counter


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes (CUDA work included)."""
    sync(device)
    start = now()
    fn()
    sync(device)
    return now() - start


_PROBE = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))


def speed_probe() -> float:
    """Milliseconds of a fixed small workload (40 float32 256x256 matmuls, best of 3).

    Taken before every section: when it varies across a run, the machine's speed changed under
    the benchmark and wall *and* CPU times are not comparable. On a small (virtual) machine
    whose second core is not available at once, every multi-threaded op can wait ~16 ms for
    its second thread: this probe then reads ~600 ms instead of ~10 ms (2 threads, 2 cores).
    """
    best = float("inf")
    for _ in range(3):
        start = now()
        for _ in range(40):
            torch.mm(_PROBE, _PROBE)
        best = min(best, now() - start)
    return best * 1e3


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call: CPU time (all threads) is much less
    inflated than wall time when other processes compete for the cores."""
    wall, cpu = now(), time.process_time()
    fn()
    return now() - wall, time.process_time() - cpu


def time_runs(fn: Callable[[], object], repeats: int, warmup: int) -> dict[str, float]:
    """Median and minimum wall time and median process CPU time (ms) of ``repeats`` calls of
    ``fn``, after ``warmup`` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), now()
        fn()
        times.append(now() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "cpu_median_ms": statistics.median(cpu) * 1e3,
    }


def cpu_share(wall_s: float, cpu_s: float, threads: int) -> float:
    """Fraction of ``threads`` cores this process got over a stretch of wall time."""
    return cpu_s / (wall_s * threads) if wall_s > 0 else 0.0


class Budget:
    """Splits the remaining wall-clock budget among the sections still to run.

    A section gets ``remaining * share / (shares of the sections not yet run)``, so time a
    section leaves unused goes to the ones after it.
    """

    def __init__(self, total_s: float, shares: dict[str, float]) -> None:
        self.end = now() + total_s
        self.pending = dict(shares)

    def section(self, name: str) -> float:
        """Deadline (a ``now()`` value) of section ``name``; removes it from the pending ones."""
        share = self.pending.pop(name, 0.0)
        rest = share + sum(self.pending.values())
        remaining = max(0.0, self.end - now())
        return now() + (remaining * share / rest if rest > 0 else remaining)

    def remaining(self) -> float:
        return max(0.0, self.end - now())


def split_deadline(deadline: float, parts_left: int) -> float:
    """Deadline of the next of ``parts_left`` equal parts of the time left until ``deadline``."""
    return now() + max(0.0, deadline - now()) / max(1, parts_left)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """Facts a reader needs to compare two runs of the benchmark."""
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    return info


def git_revision(repo: Path) -> str | None:
    """``<commit>[+dirty]`` of ``repo``, or None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


class Interrupted(BaseException):
    """SIGTERM from the parent benchmark at its time limit: save what was measured and stop."""


def raise_interrupted(signum: int, frame: object) -> None:
    """A SIGTERM handler for the aimet workers (signal.signal(signal.SIGTERM, raise_interrupted))."""
    raise Interrupted
