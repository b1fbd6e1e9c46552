"""How fast a device computes: the two figures of a profile.

``matmul_gflops`` is the fp32 GEMM rate (all the worker's threads); ``activation_gbps``
the one-thread throughput of training's non-matmul work.  The cost model
(``app/planner/costmodel.py``) scales its matmul term by the first and its per-byte and
per-op terms by the second.  Standard library + torch, imported only when called; kept
importable by Python 3.8 like ``workers.probe``.
"""
from __future__ import annotations

import time
from typing import Optional


def matmul_gflops(dtype: str = "float32", device: str = "cpu", seconds: float = 0.3,
                  n: Optional[int] = None) -> Optional[float]:
    """Measured square-matmul throughput in GFLOP/s over the whole timed window.

    All the work over all the time, not a statistic of short chunks: under a CPU quota (a
    cgroup board of the testbed, a container) the chunks alternate between full speed and
    throttled, so a median of chunks reads either; the window spans several quota periods.
    """
    import torch
    dt = getattr(torch, dtype)
    n = n or (2048 if device.startswith("cuda") else 512)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)  # warm-up: first call allocates and picks kernels
    sync()
    reps = 0
    t0 = time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        if reps >= 3 and time.perf_counter() - t0 >= seconds:
            break
    sync()
    return float(2.0 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)


#: Shape of the probe's activation: a micro-batch of 2048 tokens x 512 features (4 MiB),
#: the size of what a small model's layers pass along on a board.
_ACT_SHAPE = (2048, 512)


def activation_gbps(seconds: float = 0.3, clock=time.perf_counter) -> Optional[float]:
    """Throughput of training's non-matmul work on one thread, GB/s of activations.

    Layer norm, GELU, a residual add and a softmax over one activation, each counted as
    reading and writing it once.  The cost model's per-byte and per-op terms scale with
    this, not with the matmul rate: the two drift apart (a host whose memory is contended
    slows its elementwise work more than its GEMMs; measured 2.4-2.8x against 2.0x on a
    shared VM).  One thread, because those terms do not speed up with threads; the
    window spans several CPU-quota periods, as :func:`matmul_gflops`'s does.  ``clock``
    may be ``time.process_time`` to count only this process's CPU on a shared host.
    """
    import torch
    import torch.nn.functional as F
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(*_ACT_SHAPE)
        w, b = torch.ones(_ACT_SHAPE[1]), torch.zeros(_ACT_SHAPE[1])

        def mix() -> None:
            y = F.layer_norm(x, _ACT_SHAPE[1:], w, b)
            y = F.gelu(y)
            y = y + x
            torch.softmax(y, -1)

        mix()  # warm-up: first calls allocate
        reps, t0 = 0, clock()
        while True:
            mix()
            reps += 1
            if reps >= 3 and clock() - t0 >= seconds:
                break
        return float(4 * 2 * x.nbytes * reps / (clock() - t0) / 1e9)
    finally:
        torch.set_num_threads(before)
