"""The cost model's constants (:class:`Calibration`), measured on the calibration host.

Kept apart from :mod:`app.planner.costmodel`, which applies them; ``bench/plan_calibrate.py``
measures and fits them, ``bench/RESULTS.md`` records the runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

MIB = 2 ** 20
GIB = 2 ** 30


@dataclass(frozen=True)
class Calibration:
    """Constants of the cost model, measured on the calibration host.

    The time terms are the 2026-12-04 fit (``bench/plan_calibrate.py``,
    ``bench/data/plan_calibration_2026-12-04.json``: 17 configurations, one rank with the
    worker's allocator settings and fused AdamW) in seconds on that host: an AMD EPYC at
    95 GFLOP/s per thread whose op probe read 3.41 ms.  A device runs the fixed
    (non-matmul) terms :func:`slowness` times slower: its op probe against
    ``ref_op_probe_s``, else its per-thread matmul rate against ``ref_core_gflops``.
    The Intel host of the earlier calibrations ran the same non-matmul work 2x slower at
    a similar matmul rate: scaling by the matmul rate alone over-predicted every tiny
    model there by ~80 % (``bench/RESULTS.md``).

    Attributes
    ----------
    matmul_efficiency
        Fraction of the fp32 matmul rate (512^3 GEMM, what ``edgetrain profile``
        measures) that training FLOPs reach.
    act_s_per_byte
        Seconds per byte of saved activations (per micro-step, forward + backward) on
        the reference core: element-wise ops, allocation and page faults, which are what
        dominate small models.
    block_s, step_s
        Fixed seconds per block pass (forward + backward of one block on one
        micro-batch) and per micro-step (loss, DDP hooks, autograd start-up).
    embed_grad_s_per_byte
        The token-embedding gradient is dense (vocab x width): allocated and
        accumulated on every micro-step that runs the embeddings.  Measured apart
        (``bench/plan_calibrate.py --embed``: gpt2-s stage with vs without embeddings).
    embed_densify_s_per_byte
        A pipeline's embedding stage takes sparse gradients (only the rows looked up,
        ``workers.engine.sparse_embedding_grads``) and makes the dense one once per step,
        before the optimizer: allocated, zeroed and filled.  ``--embed`` measures it
        beside the dense path (gpt2-s, 4 micro-batches: 0.082 s per step against 0.098 s
        per micro-batch dense).
    tp_module_s
        DTensor dispatch per tensor-parallel linear per step (forward + backward),
        from the quiet-host accuracy runs of the tiny presets (``bench/RESULTS.md``):
        3.6 ms on the Intel host, halved as its other non-matmul terms were on the EPYC
        one (not re-measured there).
    opt_s_per_param, opt_s_per_tensor
        Fused AdamW on CPU (memory bound): per parameter and per tensor, fit by
        ``bench/plan_calibrate.py`` with the time terms.
    ref_core_gflops
        Per-thread matmul rate of the calibration host: fixed costs scale by it on a
        device without an op probe.
    ref_op_probe_s
        The calibration host's op probe (``workers.compute_probe.op_seconds``, median over the
        calibration's runs): fixed costs scale by a device's probe against it.
    runtime_rss_bytes
        RSS of a worker process before its model: python + torch + transformers +
        the workers package + a gloo group.  Measured: ``bench/plan_calibrate.py
        --overhead`` (``ru_maxrss`` after ``import torch, transformers, workers.train``
        and ``workers.dist.init`` of a one-rank group).
    runtime_file_bytes
        The file-backed part of a training worker's RSS (torch's and oneDNN's shared
        libraries: ``RssFile`` in ``/proc/<pid>/status``, ~100 MiB measured during tiny-gpt2
        steps).  Under a physical (cgroup) cap the kernel reclaims these pages before it
        kills: a tiny-gpt2 rank of 450 MiB RSS trained under a 410 MiB cgroup limit.
    rss_per_peer_bytes
        Extra RSS per other rank in the group (gloo pairs and buffers): not measurable
        with 2 and 4 ranks (within 5 MB), so 0.
    first_step_rss_bytes
        RSS the first training step adds beyond tensors (autograd engine, oneDNN
        primitives, allocator bookkeeping).
    act_factor
        Peak activation RSS / saved activations, per family: backward's gradient
        temporaries and freed-but-retained heap (glibc keeps small frees) on top of
        what autograd saves.
    virtual_base_bytes, virtual_per_thread_bytes
        Virtual size minus RSS once training runs: ``base + per_thread * threads``
        (1 thread: 580 MB, 2 threads: 712 MB, over 17 configurations within 10 MB).
    virtual_load_base_bytes, virtual_load_per_thread_bytes
        The same before the first step (466 / 514 MB): autograd's worker threads and
        their malloc arenas appear with the first backward.
    virtual_store_bytes
        Extra virtual size of rank 0 in a group of more than one (the TCPStore server's
        threads and their malloc arena).
    p2p_s
        Fixed CPU cost of one point-to-point message in a pipeline schedule (gloo
        send/recv and the schedule's bookkeeping) on top of the link's latency, on the
        calibration host (:func:`slowness` scales it): ``bench/plan_calibrate.py
        --pipeline``, tiny-gpt2 in 2 stages with 1-16 micro-batches (1.0 ms).
    """

    matmul_efficiency: float = 0.934
    act_s_per_byte: float = 6.83e-10
    block_s: float = 0.0
    step_s: float = 1.05e-3
    embed_grad_s_per_byte: float = 6.4e-10
    embed_densify_s_per_byte: float = 5.3e-10
    tp_module_s: float = 1.8e-3
    opt_s_per_param: float = 7.21e-10
    opt_s_per_tensor: float = 1.4e-5
    ref_core_gflops: float = 95.0
    runtime_rss_bytes: int = 340 * MIB
    runtime_file_bytes: int = 96 * MIB
    rss_per_peer_bytes: int = 0
    first_step_rss_bytes: int = 30 * MIB
    act_factor: Mapping[str, float] = field(default_factory=lambda: {"gpt2": 1.9, "bert": 1.6, "opt": 1.8})
    virtual_base_bytes: int = 448 * MIB
    virtual_per_thread_bytes: int = 132 * MIB
    virtual_load_base_bytes: int = 418 * MIB
    virtual_load_per_thread_bytes: int = 48 * MIB
    virtual_store_bytes: int = 64 * MIB
    p2p_s: float = 1.0e-3
    ref_op_probe_s: float | None = 3.41e-3


CALIBRATION = Calibration()
