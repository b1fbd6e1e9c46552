"""Hybrid pipeline x data parallelism: replicated pipeline stages.

``cfg.stages[i]["ranks"]`` lists the ``R`` replicas of stage ``i`` (every stage has
the same ``R``).  The ranks form a grid: replica ``j`` of every stage makes pipeline
``j``, which trains on its share of the global batch (``rank_slice`` over the ``R``
pipelines) with the same schedule as :mod:`workers.parallel.pp`.  After
``schedule.step()`` each stage's gradients are summed over the stage's replica group
with a flat, bucketed all-reduce, then every replica steps its optimizer.

Why a flat all-reduce and not DDP around the stage: a DDP-wrapped stage fails on the
second step under ``ScheduleGPipe`` (reducer assertion), while an all-reduce after the
schedule works with both schedules (FEASIBILITY.md).

Exactness.  Every pipeline's loss is its summed cross-entropy divided by the *global*
batch size ``B`` (see ``pp``), so its gradient is its share's contribution to the
global mean; summing over pipelines gives the global-batch mean gradient exactly, even
for unequal shares.  Each share must still split into equal micro-batches.

Loss.  The last stage's replicas add their loss sums into the same all-reduce (one
extra float), so each of them reports the global-batch loss; other stages report
``None``.

Groups.  ``dist.new_group`` is called by every rank for every group in the same order
(pipelines ``0..R-1``, then stages ``0..S-1``).  A ``DeviceMesh`` is not used: it
creates its subgroups with the device type's default backend (stock gloo), not the
``edgegloo`` backend that binds each device's own address.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..config import JobConfig
from ..engine import EvalCounts, Trainer, rank_slice
from .pp import PipelineParallel, model_parts  # noqa: F401 (model_parts: same parts as pp)

# Elements per all-reduce bucket (16 MB of fp32): the flat copy of a GPT2-L stage's
# gradients would be another ~1 GB on a 4 GB device; buckets keep the extra small.
BUCKET_ELEMS = 4 * 1024 * 1024


class HybridParallel(PipelineParallel):
    """Replica ``j`` of stage ``i`` in a grid of ``S`` stages x ``R`` pipelines."""

    allow_replicas = True

    def __init__(self, cfg: JobConfig, rank: int, model, device: torch.device) -> None:
        super().__init__(cfg, rank, model, device)
        self.role = f"stage {self.lay.stage} replica {self.lay.replica}"

    def _pipeline_group(self) -> dist.ProcessGroup | None:
        lay = self.lay
        pipelines = [dist.new_group(lay.pipeline_ranks(j)) for j in range(lay.n_replicas)]
        replicas = [dist.new_group(row) for row in lay.grid]
        self._replica_group = replicas[lay.stage]
        return pipelines[lay.replica]

    def _share(self, batch: int) -> slice:
        return rank_slice(batch, self.lay.replica, self.lay.n_replicas)

    def _sync(self, loss_sum: torch.Tensor | None) -> tuple[torch.Tensor | None, float]:
        if self.lay.n_replicas == 1:
            return loss_sum, 0.0
        self.phase = "backward"  # still finishing gradients: report allocation failures so
        t0 = time.perf_counter()
        params = list(self.module.parameters())
        for p in params:
            if p.grad is None:  # keep every replica's buckets the same shape
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if loss_sum is not None:
            # The global loss rides along in the last bucket: no extra collective.
            grads.append(loss_sum.reshape(1).to(device=grads[0].device, dtype=grads[0].dtype))
        for bucket in _buckets(grads, BUCKET_ELEMS):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._replica_group)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return (grads[-1] if loss_sum is not None else None), time.perf_counter() - t0

    def _eval_combine(self, counts: EvalCounts | None) -> EvalCounts | None:
        # Each pipeline evaluated its share: the last stage's replicas add theirs up
        # (one all-reduce of three numbers in the last stage's replica group).
        if counts is None or self.lay.n_replicas == 1:
            return counts
        buf = torch.tensor(counts, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._replica_group)
        loss_sum, correct, samples = buf.tolist()
        return EvalCounts(loss_sum, int(correct), int(samples))


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of at most ``limit`` elements (a bigger tensor goes alone)."""
    out: list[list[torch.Tensor]] = []
    size = limit
    for t in tensors:
        if size + t.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    return HybridParallel(cfg, rank, model, device)
