"""How fast a device computes: the matmul rate and the non-matmul probe a profile reports.

Part of the device-side probe (:mod:`workers.probe`); torch is imported inside each
function, so importing this module needs no torch.  Kept importable by Python 3.8.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional


def cpu_quota_cores(root: str = "/") -> Optional[float]:
    """The CPU quota binding this process, in cores (cgroup v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` or v2 ``cpu.max``, the smallest along the cgroup path), or
    ``None`` when none applies."""
    from .memory import _cgroup_dirs, smallest_along_path

    def reader(version: str) -> Callable[[str], Optional[float]]:
        def read(d: str) -> Optional[float]:
            if version == "cgroup2":
                with open(os.path.join(d, "cpu.max")) as f:
                    quota, period = f.read().split()[:2]
            else:
                with open(os.path.join(d, "cpu.cfs_quota_us")) as f:
                    quota = f.read().strip()
                with open(os.path.join(d, "cpu.cfs_period_us")) as f:
                    period = f.read().strip()
            if quota in ("max", "-1") or float(period) <= 0:
                return None
            return float(quota) / float(period)
        return read

    found = [smallest_along_path(leaf, top, reader(version)) for version, leaf, top in _cgroup_dirs(root, "cpu")]
    return min((q for q in found if q is not None), default=None)


#: Shortest timed window under a CPU quota: 20 periods of the usual 100 ms.  A 0.3 s
#: window is three periods and its wall time depends on where the throttled waits fall
#: (a 0.17-core board read 8.5-15 GFLOP/s and an op probe of 25-38 ms in 0.3 s windows,
#: 13.1-14.0 and 24.5-26.4 ms in 2 s ones).  The window's CPU seconds over the quota are
#: no way round it: work runs slower per CPU second under throttling (cold caches after
#: each wait), and that read 20-40 % fast.
QUOTA_WINDOW_S = 2.0


def timed_window(seconds: float, threads: int, quota: Optional[float]) -> float:
    """The timed window: ``seconds``, or :data:`QUOTA_WINDOW_S` under a CPU ``quota``
    (cores) that binds ``threads``."""
    return max(seconds, QUOTA_WINDOW_S) if quota is not None and quota <= threads else seconds


def matmul_gflops(dtype: str = "float32", device: str = "cpu", seconds: float = 0.3,
                  n: Optional[int] = None) -> Optional[float]:
    """Measured square-matmul throughput in GFLOP/s over the whole timed window.

    All the work over all the time, not a statistic of short chunks: under a CPU quota (a
    cgroup board of the testbed, a container) the chunks alternate between full speed and
    throttled, so a median of chunks reads either; under a quota the window is at least
    :data:`QUOTA_WINDOW_S`.
    """
    import torch
    dt = getattr(torch, dtype)
    n = n or (2048 if device.startswith("cuda") else 512)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)  # warm-up: first call allocates and picks kernels
    sync()
    if not device.startswith("cuda"):
        seconds = timed_window(seconds, torch.get_num_threads(), cpu_quota_cores())
    reps = 0
    t0 = time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        if reps >= 3 and time.perf_counter() - t0 >= seconds:
            break
    sync()
    return float(2.0 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)


def op_seconds(seconds: float = 0.3) -> float:
    """Seconds per pass of a fixed piece of a transformer's non-matmul work, on one thread.

    Forward and backward of layer norm, GELU over an MLP-wide tensor, softmax over
    attention scores and residual adds, at the sizes of a small model's micro-batch
    (2048 tokens x 64, 1-4 MiB tensors), through autograd.  The planner scales its
    non-matmul time terms (activation traffic, per-step overhead, optimizer) by this
    against the calibration host's figure: the matmul rate does not track them across
    CPUs (an AMD EPYC host ran them 2x faster than an Intel one of the same matmul rate).

    One thread, as the cost model's non-matmul terms are per core; the worker's
    allocator settings (:func:`workers.memory.tune_allocator`), without which the
    passes' page faults made the figure vary by 40 % between calls.  All the passes over
    the whole window, as in :func:`matmul_gflops` (CPU quotas).
    """
    import torch
    import torch.nn.functional as F

    from .memory import tune_allocator
    tune_allocator()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2048, 64, generator=gen, requires_grad=True)
        w = torch.ones(64, requires_grad=True)
        b = torch.zeros(64, requires_grad=True)
        scores = torch.randn(256, 32, 32, generator=gen, requires_grad=True)

        def once() -> None:
            h = F.layer_norm(x, (64,), w, b)
            u = F.gelu(h.repeat(1, 4))
            p = torch.softmax(scores, -1)
            ((u * u).sum() + (p * p).sum() + (h + x).sum()).backward()

        once()  # warm-up: the first pass allocates
        seconds = timed_window(seconds, 1, cpu_quota_cores())
        reps = 0
        t0 = time.perf_counter()
        while True:
            once()
            reps += 1
            if reps >= 3 and time.perf_counter() - t0 >= seconds:
                break
        return (time.perf_counter() - t0) / reps
    finally:
        torch.set_num_threads(before)


__all__ = ["cpu_quota_cores", "matmul_gflops", "op_seconds", "timed_window"]
