"""What every parallelism provides to the worker's training loop.

A parallelism lives in ``workers/parallel/<name>.py`` and exposes
``build(cfg, rank, model, device) -> Trainer``.  The loop hands each trainer the same
deterministic *global* mini-batch on every rank; the trainer takes the part its rank
works on.  This is what makes every parallelism comparable with one-device training.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import JobConfig, share_bounds
from .data import IGNORE_LABEL


@dataclass
class StepResult:
    """One iteration (one global mini-batch) on one rank."""

    loss: float | None        # global-batch loss where this rank knows it, else None
    samples: int              # samples of the global batch this iteration covered
    local_samples: int        # samples this rank computed on (for per-device rates)
    synced: bool              # an optimizer step happened in this iteration
    comm_s: float = 0.0       # time spent in collectives we could time, seconds


class EvalCounts(NamedTuple):
    """One evaluation batch, summed (not averaged) so batches and ranks add up exactly."""

    loss_sum: float           # cross-entropy summed over the labelled samples
    correct: int              # labelled samples whose arg-max logit is the label
    samples: int              # labelled samples (rows with ``IGNORE_LABEL`` do not count)


class Trainer:
    """Base class: holds the model part of this rank and its optimizer.

    ``phase`` names what the trainer is doing (``load``, ``forward``, ``backward``,
    ``optimizer``) so an allocation failure can be reported with where it happened.
    """

    phase: str = "load"
    role: str = "replica"     # shown in telemetry: replica, stage N, shard N/W

    def train_step(self, it: int, ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def full_state(self) -> dict[str, torch.Tensor]:
        """Parameters this rank holds, by the full model's parameter names (for checks)."""
        raise NotImplementedError

    def local_state(self) -> dict[str, torch.Tensor]:
        """What this rank holds, as stored here (shards stay shards): no communication,
        no extra memory.  Used for the end-of-run parameter digest."""
        return self.full_state()

    def checkpoint_params(self) -> dict[str, torch.nn.Parameter]:
        """The live parameters this rank holds, by the one-device model's names.

        A checkpoint saves these (and their optimizer state) and a resume loads into
        them in place, so every layout that names its tensors like the one-device model
        reshards through :mod:`torch.distributed.checkpoint`.
        """
        raise NotImplementedError

    #: How :meth:`checkpoint_params` lays tensors out: ``canonical`` (each tensor is the
    #: one-device model's tensor, or a DTensor shard of it) or a layout only the same
    #: parallelism and world size can load (``tp-gpt2/<world>``: transposed, permuted).
    checkpoint_layout: str = "canonical"

    def finish(self) -> None:
        """Flush any accumulated gradients (called once after the last iteration)."""

    def eval_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> EvalCounts | None:
        """Forward-only pass over one *global* evaluation batch (see ``workers.evaluate``).

        Every rank calls this together with the same batch, like :meth:`train_step`; the
        size must split as a training batch does (pipelines: into equal micro-batches).
        Runs under ``torch.no_grad()``: no gradient, optimizer state or accumulation
        changes, so training continues as if it had not happened.  The models have no
        dropout, so the training-mode forward is the evaluation forward and the module's
        mode is left alone.

        Returns
        -------
        EvalCounts | None
            The whole global batch's sums on every rank that can know them; ``None``
            where it cannot (pipeline stages other than the last).
        """
        raise NotImplementedError


def sparse_embedding_grads(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Make ``module``'s embedding tables produce sparse gradients; returns their weights.

    A dense embedding backward allocates a zeroed vocab x width gradient per micro-batch
    (154 MB for gpt2-s), above glibc's largest mmap threshold, so its pages are mapped
    and faulted in afresh every time: a gpt2-s embedding stage spent 0.72 s CPU per step
    of 4 micro-batches, 0.42 s with sparse gradients, and peaked 150 MB lower
    (``bench/RESULTS.md``, "Sparse embedding gradients").  Autograd accumulates the
    sparse pieces (only the looked-up rows); :func:`densify_grads` turns them into the
    dense gradient the optimizer needs, once per step.  Only for trainers without DDP
    (its reducer expects the dense layout) and plain tensors (not DTensor shards).
    """
    weights = []
    for sub in module.modules():
        w = getattr(sub, "weight", None)
        if isinstance(sub, torch.nn.Embedding) and type(w) is torch.nn.Parameter and not w.is_meta:
            sub.sparse = True
            weights.append(w)
    return weights


def densify_grads(params: list[torch.nn.Parameter]) -> None:
    """Replace sparse gradients by dense ones (summing repeated rows), before gradients
    are combined across ranks or the optimizer steps."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def make_optimizer(params, cfg: JobConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, at ``cfg.lr``, without weight decay.

    Parameters
    ----------
    params
        Parameters or parameter groups (TP passes sharded and replicated groups).
    cfg
        ``optimizer``: ``adamw`` (two moments per parameter), ``sgd`` (momentum 0.9: one
        buffer) or ``adafactor`` (factored second moment: a row and a column per matrix).

    Returns
    -------
    torch.optim.Optimizer
    """
    # No weight decay anywhere, so a shard's update equals the matching slice of the
    # single-device update for the element-wise optimizers (AdamW, SGD).
    name = cfg.optimizer
    if name == "adamw":
        # torch's fused kernels (AdamW, SGD): one in-place pass per tensor.  The default
        # AdamW makes parameter-sized temporaries each step; on CPU those above glibc's
        # largest mmap threshold (gpt2-s's 154 MiB token embedding) are mapped and
        # zero-filled afresh every step: 0.75 s against 0.17 s per gpt2-s step, SGD 0.23
        # against 0.13 s (bench/optimizer_step.py --all).  They take DTensor parameters
        # too (TP's sharded and replicated groups).
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=0.0, fused=True)
    if name == "adafactor":
        # torch's Adafactor scales each step by the parameter's RMS (relative step size);
        # lr caps that relative step (rho_t = min(lr, 1/sqrt(t)), Shazeer & Stern 2018).
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=0.0)
    raise ValueError(f"optimizer {name!r} is not one of adamw, sgd, adafactor")


def autocast(cfg: JobConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's precision context: bf16 autocast when ``cfg.precision`` asks for it.

    Parameters and optimizer state stay fp32 (autocast casts per operation, and the
    gradients of fp32 leaves come back fp32).  On a CUDA device without bf16 torch itself
    warns and runs fp32; on a CPU without native bf16 it is correct, only slower.
    """
    if cfg.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def eval_counts(logits: torch.Tensor, labels: torch.Tensor) -> EvalCounts:
    """Summed loss, correct and labelled counts of ``logits[N, C]`` against ``labels[N]``."""
    labels = labels.to(logits.device)
    mask = labels != IGNORE_LABEL
    # float32 sums however the model computes: the ranks' and batches' sums then add
    # up to what one device gets, within float32 rounding
    loss = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE_LABEL)
    correct = (logits.argmax(dim=-1) == labels) & mask
    return EvalCounts(float(loss), int(correct.sum()), int(mask.sum()))


def rank_slice(n: int, rank: int, world: int, shares: list[float] | None = None) -> slice:
    """Rank's contiguous part of ``n`` items: near-equal, or by ``shares``.

    Parameters
    ----------
    n, rank, world
        Items to split, this rank, the number of ranks.
    shares
        Each rank's share (normalised; :func:`workers.config.share_bounds`); ``None``:
        near-equal parts, the first ``n % world`` ranks one item more.

    Raises
    ------
    ValueError
        ``shares`` does not have ``world`` entries, or leaves a rank no item.
    """
    if shares is not None:
        if len(shares) != world:
            raise ValueError(f"dp_shares has {len(shares)} entries for {world} ranks")
        bounds = share_bounds(n, shares)
        return slice(bounds[rank], bounds[rank + 1])
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def survivor_shares(planned: list[float] | None, members, batch_size: int) -> list[float] | None:
    """The batch shares of the devices left after a loss: their planned shares, renormalised.

    ``planned`` are the launch's shares by original rank (``None``: equal), ``members`` the
    original ranks that go on.  The planner picked shares by device speed, so the same
    devices keep the same proportions, which is also what its re-plan of the survivors
    picks.  Equal shares when they were equal, or when a survivor would get no row.
    """
    if planned is None or not members or max(members) >= len(planned):
        return None
    shares = [planned[r] for r in members]
    try:
        share_bounds(batch_size, shares)
    except ValueError:
        return None
    return shares


def model_parts(cfg: JobConfig, rank: int):
    """The model parts this rank must materialise (``None``: the whole model).

    Pipeline stages build only their own blocks, so a model larger than one device's
    memory can still load on each stage.
    """
    name = "diloco" if cfg.parallelism == "dp" and cfg.dp_mode == "diloco" else cfg.parallelism
    module = importlib.import_module(f"workers.parallel.{name}")
    fn = getattr(module, "model_parts", None)
    return fn(cfg, rank) if fn is not None else None


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    """Instantiate the trainer of ``cfg.parallelism`` for this rank."""
    name = "diloco" if cfg.parallelism == "dp" and cfg.dp_mode == "diloco" else cfg.parallelism
    module = importlib.import_module(f"workers.parallel.{name}")
    if cfg.activation_checkpointing:
        # every parallelism that calls the blocks as modules recomputes them in backward;
        # sp runs the layers itself and checks the setting there
        model.set_activation_checkpointing(True)
    return module.build(cfg, rank, model, device)
