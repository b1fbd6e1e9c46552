"""Data parallelism: DDP replicas, gradients synchronised every k iterations.

Each iteration every replica runs forward/backward on its slice of the global batch.
For k-1 iterations gradients accumulate locally under ``no_sync``; on the k-th the
backward all-reduces them (DDP) and the optimizer steps.  The optimizer never steps
inside ``no_sync`` (replicas would drift, see FEASIBILITY.md).  The result equals one
device accumulating gradients over the same k global batches.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import JobConfig
from ..engine import EvalCounts, StepResult, Trainer, eval_counts, make_optimizer, rank_slice


class DataParallel(Trainer):
    def __init__(self, cfg: JobConfig, rank: int, model: torch.nn.Module, device: torch.device) -> None:
        self.cfg, self.rank, self.world = cfg, rank, cfg.world_size
        self.role = f"replica {rank}"
        model = model.to(device)
        self.module = model
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = make_optimizer(self.ddp.parameters(), cfg)
        self.device = device
        self._pending = 0  # iterations accumulated since the last optimizer step
        self.group = None  # the replicas' process group (None: the default one, until regroup)

    def train_step(self, it: int, ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        sl = rank_slice(ids.shape[0], self.rank, self.world)
        x, y = ids[sl].to(self.device), labels[sl].to(self.device)
        k = self.cfg.sync_every
        sync = (it + 1) % k == 0 or it + 1 == self.cfg.steps
        # Sum-reduced loss scaled so DDP's mean over ranks gives the global-batch mean
        # even when ranks get unequal slices; /k turns k iterations into one average.
        scale = self.world / (ids.shape[0] * k)
        ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
        with ctx:
            self.phase = "forward"
            logits = self.ddp(x)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            self.phase = "backward"
            (loss_sum * scale).backward()
        self._pending += 1
        if sync:
            self.phase = "optimizer"
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self._pending = 0
        n = max(1, x.shape[0])
        return StepResult(loss=float(loss_sum.detach()) / n, samples=ids.shape[0], local_samples=x.shape[0],
                          synced=sync)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.module.named_parameters()}

    def checkpoint_params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters())

    def regroup(self, group, rank: int, world: int) -> None:
        """Continue as replica ``rank`` of ``world`` in ``group`` (a device left): the same
        module and optimizer under a new DDP; gradients in flight are dropped (the loop
        repeats the iterations since the last sync)."""
        self.opt.zero_grad(set_to_none=True)
        self.rank, self.world = rank, world
        self.role = f"replica {rank}"
        dev = self.device
        self.ddp = DDP(self.module, process_group=group, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.group = group
        self._pending = 0

    @torch.no_grad()
    def eval_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> EvalCounts:
        # The raw module, not the DDP wrapper: DDP's forward may broadcast buffers and
        # set its reducer up for a backward, and evaluation wants neither.  Replicas hold
        # identical parameters, so each rank's module is the model.
        self.phase = "eval"
        sl = rank_slice(ids.shape[0], self.rank, self.world)
        part = eval_counts(self.module(ids[sl].to(self.device)), labels[sl])
        # One all-reduce of three numbers; float64 keeps the counts exact.
        buf = torch.tensor(part, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, group=self.group)
        loss_sum, correct, samples = buf.tolist()
        return EvalCounts(loss_sum, int(correct), int(samples))


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    return DataParallel(cfg, rank, model, device)
