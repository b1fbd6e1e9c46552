"""Sequence parallelism: every rank holds the whole model and a contiguous chunk of the
sequence.

How one iteration runs on rank ``r`` of ``W``:

* The global batch ``ids[B, S]`` is cut along the sequence into near-equal contiguous
  chunks (:func:`workers.engine.rank_slice`); rank ``r`` embeds its chunk with
  ``position_offset`` = the chunk's first position.
* In every layer, LayerNorms, projections and the MLP act on the local positions only.
  Attention projects the local keys and values, **all-gathers them along the sequence**
  (one collective per layer for k and v together), and lets the local queries attend to
  all keys with ``F.scaled_dot_product_attention`` and an explicit boolean mask that is
  causal *with the chunk's offset* for gpt2/opt and absent for bert
  (``workers.parallel._attention``).
* The classification head pools one position, which lives on one rank: the last rank
  for gpt2/opt (last token; data is left-padded), rank 0 for bert ([CLS]).  That rank
  computes logits and the loss; the others run backward from their last hidden state
  with a zero gradient.  Every rank must run backward: the all-gathers' backward
  (a reduce-scatter) hands each rank the gradient its keys/values received from the
  other ranks' queries, so the pooled token's dependence on earlier chunks reaches them.
* After backward each rank's weight gradient is its positions' share of the total, so
  the gradients are all-reduced (sum, bucketed) and every rank takes the same
  optimizer step; replicas stay identical.  The loss rides along in the same buffer so
  every rank reports it.

Why all-gathering K/V by hand rather than DTensor's ``SequenceParallel`` style: that style
only shards the norm/dropout regions around a tensor-parallel block and all-gathers the
*activations* before attention, so each rank would still compute attention (and the
projections) for the whole sequence; it is a companion to TP, not a split of attention.
``context_parallel`` (ring attention) fails on CPU (FEASIBILITY.md).  Gathering K/V
splits all compute by sequence and sends ``2 x B x S x H`` values per layer.  The
gather uses the functional collective with autograd
(``all_gather_single_autograd``, formerly ``all_gather_tensor_autograd``); the
deprecated ``torch.distributed.nn.functional.all_gather`` gives wrong gradients on gloo
when concatenating along a dimension other than 0.

The optimizer steps every iteration (``sync_every`` is a DP setting), matching one
device training on the same global batches.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import JobConfig
from ..engine import EvalCounts, StepResult, Trainer, autocast, eval_counts, make_optimizer, rank_slice
from ._attention import LAYER_FORWARDS, Gather, make_chunk

try:  # torch >= 2.13 renamed it; the old name warns on every call
    from torch.distributed._functional_collectives import all_gather_single_autograd as _gather_autograd
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._functional_collectives import all_gather_tensor_autograd as _gather_autograd

# Gradient all-reduce bucket size (elements): bounds the extra memory of flattening
# (64 MiB of fp32) while keeping the number of collectives small.
BUCKET_ELEMS = 16 * 1024 * 1024


def allreduce_grads(params: list[torch.nn.Parameter], extra: torch.Tensor, group=None) -> torch.Tensor:
    """Sum every parameter's gradient over the group, in flat buckets.

    Parameters that got no gradient on this rank (e.g. the head off its owner rank)
    contribute zeros, and receive the sum.  ``extra`` (a small 1-D tensor, e.g. the
    loss) is appended to the last bucket and returned summed, saving a collective.
    """
    buckets: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size + p.numel() > BUCKET_ELEMS:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    for i, bucket in enumerate(buckets):
        last = i == len(buckets) - 1
        parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket]
        if last:
            parts.append(extra.reshape(-1).to(params[0].dtype))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n
        if last:
            extra = flat[offset:]
    return extra


class SequenceParallel(Trainer):
    """Full model on every rank, sequence split across ranks (see module docstring)."""

    def __init__(self, cfg: JobConfig, rank: int, model, device: torch.device) -> None:
        self.cfg, self.rank, self.world = cfg, rank, cfg.world_size
        if cfg.seq_len < self.world:
            raise ValueError(f"sequence parallelism needs at least one position per rank: "
                             f"seq_len {cfg.seq_len} < world size {self.world}")
        self.model = model.to(device)
        self.device = device
        self.family = model.family
        self.layer_forward = LAYER_FORWARDS[model.family]
        # The pooled position is global 0 (bert) or S-1 (gpt2/opt): first or last chunk.
        self.owner = 0 if model.pool_position == 0 else self.world - 1
        self.role = f"seq {rank + 1}/{self.world}"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, cfg)

    def _gather(self, seq: int) -> tuple[slice, Gather]:
        """This rank's slice of a length-``seq`` sequence and the K/V gather for it."""
        sl = rank_slice(seq, self.rank, self.world)
        lengths = [len(range(seq)[rank_slice(seq, r, self.world)]) for r in range(self.world)]
        longest = max(lengths)
        keep = None
        if any(n != longest for n in lengths):
            # all_gather needs equal sizes: pad every chunk to the longest, then drop the
            # padding rows of the gathered tensor.
            keep = torch.cat([torch.arange(r * longest, r * longest + n) for r, n in enumerate(lengths)])
            keep = keep.to(self.device)
        pad = longest - (sl.stop - sl.start)
        group = dist.group.WORLD

        def gather(x: torch.Tensor) -> torch.Tensor:
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
            out = _gather_autograd(x.contiguous(), 1, group)
            return out if keep is None else out.index_select(1, keep)

        return sl, gather

    def _layers(self, x: torch.Tensor, start: int, chunk) -> torch.Tensor:
        """Embed this rank's chunk and run it through every layer (K/V all-gathers inside).

        With activation checkpointing each layer is recomputed in backward, all-gathers
        included: every rank runs backward through the layers in the same order, so the
        recomputed collectives pair up as the forward's did."""
        hidden = self.model.embed(x, position_offset=start)
        for block in self.model.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(self.layer_forward, block.inner, hidden, chunk, use_reentrant=False)
            else:
                hidden = self.layer_forward(block.inner, hidden, chunk)
        return hidden

    def train_step(self, it: int, ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        seq = ids.shape[1]
        sl, gather = self._gather(seq)
        x = ids[:, sl].to(self.device)
        chunk = make_chunk(sl.start, sl.stop - sl.start, seq, self.model.causal, gather, self.device)
        self.phase = "forward"
        with autocast(self.cfg, self.device):
            hidden = self._layers(x, sl.start, chunk)
            logits = self.model.head(hidden) if self.rank == self.owner else None
        self.phase = "backward"
        if logits is not None:
            loss = F.cross_entropy(logits.float(), labels.to(self.device))
            loss.backward()
            loss_buf = loss.detach().reshape(1)
        else:
            # No loss here, but the graph holds the all-gathers whose backward the owner
            # waits on: run it with a zero upstream gradient.
            hidden.backward(torch.zeros_like(hidden))
            loss_buf = torch.zeros(1, device=self.device)
        t0 = time.perf_counter()
        loss_sum = allreduce_grads(self.params, loss_buf)
        comm = time.perf_counter() - t0
        self.phase = "optimizer"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return StepResult(loss=float(loss_sum[0]), samples=ids.shape[0], local_samples=ids.shape[0],
                          synced=True, comm_s=comm)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.model.named_parameters()}

    def checkpoint_params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def eval_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> EvalCounts:
        # The training forward, chunk by chunk with the K/V all-gathers (every rank
        # must take part in them), without the backward and the gradient all-reduce.
        self.phase = "eval"
        seq = ids.shape[1]
        sl, gather = self._gather(seq)
        chunk = make_chunk(sl.start, sl.stop - sl.start, seq, self.model.causal, gather, self.device)
        with autocast(self.cfg, self.device):
            hidden = self._layers(ids[:, sl].to(self.device), sl.start, chunk)
            logits = self.model.head(hidden) if self.rank == self.owner else None
        # Only the rank holding the pooled position has logits; one all-reduce of three
        # numbers (zeros elsewhere) gives every rank the counts, as every rank reports
        # the training loss.
        part = eval_counts(logits, labels) if logits is not None else (0.0, 0, 0)
        buf = torch.tensor(part, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf)
        loss_sum, correct, samples = buf.tolist()
        return EvalCounts(loss_sum, int(correct), int(samples))


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    return SequenceParallel(cfg, rank, model, device)
