"""Low-communication data parallelism (DiLoCo): local steps, then one outer step.

Each replica trains alone for ``sync_every`` iterations (H) with the inner optimizer
(``cfg.optimizer``) on its slice of every global batch.  Then the replicas average the
*pseudo-gradient* — how far each moved from the last common parameters, the anchor —
in one all-reduce, and every replica applies the same outer step to the anchor (SGD with
Nesterov momentum, Douillard et al. 2023, "DiLoCo") and continues from it.  Over a slow
link that is one exchange of the parameters every H iterations instead of the gradients
every iteration, and in ``sync_dtype`` (bf16 by default) half the bytes again.

The anchor is an fp32 copy of the parameters (one more parameter-sized buffer, plus the
outer momentum: the planner counts both).  With H = 1, a plain outer step (lr 1, no
momentum) in fp32 and an inner optimizer that is linear in the gradient (SGD), this is
exactly synchronous DP: the average of the replicas' one-step moves is the step on the
averaged gradient (tests/test_diloco.py checks it against DDP).

Torch has no DiLoCo (torchft has one, built on its own fault-tolerant process groups);
this is the smallest piece on the standard ``torch.distributed`` collectives.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import JobConfig
from ..engine import StepResult, Trainer, autocast, make_optimizer, rank_slice, survivor_shares
from .dp import DataParallel

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DiLoCo(Trainer):
    def __init__(self, cfg: JobConfig, rank: int, model: torch.nn.Module, device: torch.device) -> None:
        self.cfg, self.rank, self.world = cfg, rank, cfg.world_size
        self.role = f"replica {rank}"
        self.module = model.to(device)
        self.device = device
        self.group = None
        self.shares = list(cfg.dp_shares) if cfg.dp_shares else None
        self.planned_shares = self.shares  # by original rank (survivors keep theirs)
        rank_slice(cfg.batch_size, rank, self.world, self.shares)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, cfg)
        # the anchor: the replicas' last common parameters, fp32 whatever the model's dtype
        self.anchor = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        momentum = cfg.outer_momentum
        self.outer = torch.optim.SGD(self.anchor, lr=cfg.outer_lr, momentum=momentum,
                                     nesterov=momentum > 0, weight_decay=0.0)
        self.sync_dtype = TORCH_DTYPES[cfg.sync_dtype]
        self.bytes_synced = 0
        self._weight = 1.0 / self.world  # this replica's rows / the global batch's

    def train_step(self, it: int, ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        sl = rank_slice(ids.shape[0], self.rank, self.world, self.shares)
        x, y = ids[sl].to(self.device), labels[sl].to(self.device)
        n = x.shape[0]
        self._weight = n / ids.shape[0]
        g = max(1, min(self.cfg.grad_accumulation, n))
        loss_total = 0.0
        for j in range(g):
            part = rank_slice(n, j, g)
            self.phase = "forward"
            with autocast(self.cfg, self.device):
                logits = self.module(x[part])
            loss_sum = F.cross_entropy(logits.float(), y[part], reduction="sum")
            self.phase = "backward"
            # the mean over this rank's slice: each replica is its own one-device run
            (loss_sum / n).backward()
            loss_total += float(loss_sum.detach())
        self.phase = "optimizer"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        outer = (it + 1) % self.cfg.sync_every == 0 or it + 1 == self.cfg.steps
        comm_s = self._outer_step() if outer else 0.0
        return StepResult(loss=loss_total / max(1, n), samples=ids.shape[0], local_samples=n, synced=outer,
                          comm_s=comm_s)

    @torch.no_grad()
    def _outer_step(self) -> float:
        """Average the pseudo-gradients (anchor - local) in one all-reduce, step the anchor
        with the outer optimizer, and restart every replica from it.  Returns the seconds
        spent in the collective."""
        # each replica's move weighs as many rows as it trained on, as DP weighs gradients
        flat = torch.cat([(a - p.float()).reshape(-1) for a, p in zip(self.anchor, self.params)])
        buf = (flat * self._weight).to(self.sync_dtype)
        del flat
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=self.group)  # SUM: gloo has no AVG; the weights sum to 1
        comm_s = time.perf_counter() - t0
        self.bytes_synced += buf.numel() * buf.element_size()
        delta = buf.float()
        del buf
        off = 0
        for a in self.anchor:
            k = a.numel()
            a.grad = delta[off:off + k].view_as(a)
            off += k
        self.outer.step()
        for a, p in zip(self.anchor, self.params):
            a.grad = None
            p.copy_(a)
        return comm_s

    def finish(self) -> None:
        """The last iteration always ends with an outer step (see :meth:`train_step`)."""

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.module.named_parameters()}

    def checkpoint_params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters())

    def regroup(self, group, rank: int, world: int, members=None) -> None:
        """Continue as replica ``rank`` of ``world`` in ``group`` (a device left): every
        survivor goes back to the anchor, so the moves since the last outer step, which
        the lost replica's part of would be missing from, are dropped."""
        with torch.no_grad():
            for a, p in zip(self.anchor, self.params):
                p.copy_(a)
        self.opt.zero_grad(set_to_none=True)
        self.shares = survivor_shares(self.planned_shares, members, self.cfg.batch_size)
        self.rank, self.world, self.group = rank, world, group
        self.role = f"replica {rank}"

    # Between outer steps the replicas differ; evaluation reads each replica's current
    # parameters (after the last iteration, an outer step: the common model).  The same
    # attributes as DP's replicas (module, rank, world, shares, group): the same pass.
    eval_batch = DataParallel.eval_batch


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    return DiLoCo(cfg, rank, model, device)
