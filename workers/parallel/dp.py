"""Data parallelism: DDP replicas, gradients synchronised every k iterations.

Each iteration every replica runs forward/backward on its slice of the global batch.
For k-1 iterations gradients accumulate locally under ``no_sync``; on the k-th the
backward all-reduces them (DDP) and the optimizer steps.  The optimizer never steps
inside ``no_sync`` (replicas would drift, see FEASIBILITY.md).  The result equals one
device accumulating gradients over the same k global batches.

Memory knobs: ``dp_shares`` gives each rank its share of the global batch (a slower or
smaller device takes fewer rows; the loss scaling below keeps unequal slices exact), and
``grad_accumulation`` runs each slice in that many micro-batches, all but the last under
``no_sync``, so peak activations shrink and the step is unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import JobConfig
from ..engine import EvalCounts, StepResult, Trainer, autocast, eval_counts, make_optimizer, rank_slice, survivor_shares


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
        # each rank's share of the global batch (None: equal); checked against the batch now
        self.shares = list(cfg.dp_shares) if cfg.dp_shares else None
        self.planned_shares = self.shares  # by original rank: what survivors keep after a loss
        rank_slice(cfg.batch_size, rank, self.world, self.shares)

    def train_step(self, it: int, ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        sl = rank_slice(ids.shape[0], self.rank, self.world, self.shares)
        x, y = ids[sl].to(self.device), labels[sl].to(self.device)
        k = self.cfg.sync_every
        sync = (it + 1) % k == 0 or it + 1 == self.cfg.steps
        # Sum-reduced loss scaled so DDP's mean over ranks gives the global-batch mean
        # even when ranks get unequal slices; /k turns k iterations into one average.
        # The same factor on every micro-batch: their gradients add up to the slice's.
        scale = self.world / (ids.shape[0] * k)
        # grad_accumulation: the slice in g near-equal micro-batches (fewer when the slice
        # has fewer rows than g: one row each is the smallest there is)
        n = x.shape[0]
        g = max(1, min(self.cfg.grad_accumulation, n))
        loss_total = 0.0
        for j in range(g):
            part = rank_slice(n, j, g)
            # only the last micro-batch of a syncing iteration all-reduces; the others
            # accumulate locally (the optimizer never steps inside no_sync)
            last = sync and j == g - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                self.phase = "forward"
                with autocast(self.cfg, self.device):
                    logits = self.ddp(x[part])
                loss_sum = F.cross_entropy(logits.float(), y[part], reduction="sum")
                self.phase = "backward"
                (loss_sum * scale).backward()
            loss_total += float(loss_sum.detach())
        self._pending += 1
        if sync:
            self.phase = "optimizer"
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self._pending = 0
        return StepResult(loss=loss_total / max(1, n), samples=ids.shape[0], local_samples=n, synced=sync)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.module.named_parameters()}

    def checkpoint_params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters())

    def regroup(self, group, rank: int, world: int, members=None) -> None:
        """Continue as replica ``rank`` of ``world`` in ``group`` (a device left): the same
        module and optimizer under a new DDP; gradients in flight are dropped (the loop
        repeats the iterations since the last sync).  ``members``: the original ranks
        that go on, whose planned batch shares they keep (:func:`survivor_shares`)."""
        self.opt.zero_grad(set_to_none=True)
        self.shares = survivor_shares(self.planned_shares, members, self.cfg.batch_size)
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
        sl = rank_slice(ids.shape[0], self.rank, self.world, self.shares)
        with autocast(self.cfg, self.device):
            logits = self.module(ids[sl].to(self.device))
        part = eval_counts(logits, labels[sl])
        # One all-reduce of three numbers; float64 keeps the counts exact.
        buf = torch.tensor(part, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, group=self.group)
        loss_sum, correct, samples = buf.tolist()
        return EvalCounts(loss_sum, int(correct), int(samples))


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    return DataParallel(cfg, rank, model, device)
