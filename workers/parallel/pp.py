"""Pipeline parallelism: each rank holds one stage (a contiguous run of blocks).

``cfg.stages`` lists the stages in pipeline order, ``{"ranks": [r], "layers": [a, b)}``
(half-open block ranges, uneven allowed).  The first stage also holds the embeddings,
the last one the classification head.  Stage modules are built by hand from the
:class:`~workers.models.StagedModel` parts (``pipeline()`` tracing of HF models fails,
see FEASIBILITY.md) and driven by ``torch.distributed.pipelining``'s ``PipelineStage``
with ``ScheduleGPipe`` or ``Schedule1F1B`` (``cfg.schedule``).

Exactness.  The global batch of ``B`` samples is split into ``cfg.micro_batches``
equal micro-batches; the last stage's loss for a micro-batch is the *summed*
cross-entropy times ``1/B`` and the schedule is told not to rescale
(``scale_grads=False``).  The schedules add the micro-batches' gradients, so the
total is exactly the gradient of the global-batch mean, as on one device.  The
optimizer steps every iteration (``cfg.sync_every`` does not apply to pipelines).

Micro-batches must be equal: a stage allocates its receive buffers from the shapes
it sees on the first micro-batch, so ``B`` must be divisible by ``cfg.micro_batches``
(checked when the trainer is built, with a message naming both numbers).

Loss.  Only the last stage computes it; ``StepResult.loss`` is ``None`` on the other
stages.  Broadcasting it would add a world-wide collective per step for a number the
controller already gets from the last stage's telemetry.

Memory.  A rank only needs its stage's parts: :func:`model_parts` names them, for
``build_model(..., parts=...)`` so a GPT2-L stage never allocates the other stages'
blocks.  Given a fully built model, the trainer moves the other parts to ``meta``,
which frees them (the load itself then peaked at the full size, though).

Tied weights.  The models are ``*ForSequenceClassification``: no LM head, so no
embedding/head tie can cross stages (asserted on the HF model at build).
"""
from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..config import JobConfig
from ..engine import (
    EvalCounts,
    StepResult,
    Trainer,
    autocast,
    densify_grads,
    eval_counts,
    make_optimizer,
    sparse_embedding_grads,
)

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


@dataclass
class StageLayout:
    """Where one rank sits in the pipeline grid.

    Attributes
    ----------
    stage, n_stages
        This rank's stage index (pipeline order) and the number of stages.
    replica, n_replicas
        Which copy of the stage this rank is (hybrid PP x DP; 0 and 1 for plain PP).
    layers
        Half-open block range ``(a, b)`` of this stage.
    grid
        ``grid[i][j]`` = global rank of replica ``j`` of stage ``i``.
    """

    stage: int
    n_stages: int
    replica: int
    n_replicas: int
    layers: tuple[int, int]
    grid: list[list[int]]

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.n_stages - 1

    def pipeline_ranks(self, replica: int) -> list[int]:
        """Global ranks of pipeline ``replica``, in stage order."""
        return [row[replica] for row in self.grid]


def stage_layout(cfg: JobConfig, rank: int) -> StageLayout:
    """Find ``rank`` in ``cfg.stages``; checks the grid is rectangular and ranges chain.

    Raises
    ------
    ValueError
        No stages, a rank in no or several stages, stages with different replica
        counts, or block ranges that are empty or do not follow each other.
    """
    if not cfg.stages:
        raise ValueError("pipeline parallelism needs cfg.stages (one entry per stage)")
    grid = [list(s["ranks"]) for s in cfg.stages]
    ranges = [(int(s["layers"][0]), int(s["layers"][1])) for s in cfg.stages]
    widths = {len(row) for row in grid}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every stage needs the same, non-zero number of replicas; got "
                         f"{[len(row) for row in grid]} ranks per stage")
    where = [(i, j) for i, row in enumerate(grid) for j, r in enumerate(row) if r == rank]
    if len(where) != 1:
        raise ValueError(f"rank {rank} appears {len(where)} times in cfg.stages; needs exactly once")
    for i, (a, b) in enumerate(ranges):
        if a >= b:
            raise ValueError(f"stage {i} has an empty block range [{a}, {b})")
        if i and a != ranges[i - 1][1]:
            raise ValueError(f"stage {i} starts at block {a}, but stage {i - 1} ends at {ranges[i - 1][1]}")
    if ranges[0][0] != 0:
        raise ValueError(f"the first stage must start at block 0, not {ranges[0][0]}")
    stage, replica = where[0]
    return StageLayout(stage, len(grid), replica, len(grid[0]), ranges[stage], grid)


def model_parts(cfg: JobConfig, rank: int) -> list:
    """What ``build_model(parts=...)`` must materialise for ``rank``: its blocks, plus
    ``'embed'`` on the first stage and ``'head'`` on the last."""
    lay = stage_layout(cfg, rank)
    parts: list = list(range(*lay.layers))
    if lay.first:
        parts.insert(0, "embed")
    if lay.last:
        parts.append("head")
    return parts


class StageModule(nn.Module):
    """``[embed] -> blocks[a:b] -> [head]``: one pipeline stage, built by hand.

    ``on_phase`` is told ``'forward'`` when a micro-batch enters the stage and
    ``'backward'`` when the gradient of its output arrives, so an allocation failure
    inside the schedule is reported with the right phase.
    """

    def __init__(self, model: nn.Module, a: int, b: int, first: bool, last: bool,
                 on_phase: Callable[[str], None] | None = None,
                 precision: Callable[[], AbstractContextManager] | None = None) -> None:
        super().__init__()
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleList(model.blocks[a:b])
        self.head = model.head if last else None
        self._on_phase = on_phase or (lambda phase: None)
        self._precision = precision or contextlib.nullcontext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._on_phase("forward")
        with self._precision():
            h = self.embed(x) if self.embed is not None else x
            for block in self.blocks:
                h = block(h)
            out = self.head(h) if self.head is not None else h
        # fp32 between stages and into the loss whatever the autocast computed: the
        # stages' receive buffers and the loss see one dtype (a no-op without autocast)
        out = out.float()
        if out.requires_grad:
            out.register_hook(lambda grad: self._on_phase("backward"))
        return out


class PipelineParallel(Trainer):
    """One stage of one pipeline; subclasses add replicas (``hybrid``).

    Subclass hooks: :meth:`_pipeline_group` (the process group of this rank's
    pipeline), :meth:`_share` (the part of the global batch this pipeline trains on)
    and :meth:`_sync` (called after ``schedule.step()``, before the optimizer).
    """

    allow_replicas = False

    def __init__(self, cfg: JobConfig, rank: int, model: nn.Module, device: torch.device) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self.lay = lay = stage_layout(cfg, rank)
        if lay.n_replicas > 1 and not self.allow_replicas:
            raise ValueError(f"stages have {lay.n_replicas} ranks each: use parallelism 'hybrid' "
                             "for replicated stages")
        if lay.layers[1] > model.n_blocks or cfg.stages[-1]["layers"][1] != model.n_blocks:
            raise ValueError(f"stages cover blocks [0, {cfg.stages[-1]['layers'][1]}), "
                             f"the model has {model.n_blocks}")
        share = self._share(cfg.batch_size).stop - self._share(cfg.batch_size).start
        if cfg.micro_batches < 1 or share % cfg.micro_batches:
            raise ValueError(f"a pipeline's batch of {share} samples does not split into "
                             f"{cfg.micro_batches} equal micro-batches (batch_size {cfg.batch_size}, "
                             f"{lay.n_replicas} pipeline(s)); choose a divisor")
        if cfg.schedule == "1f1b" and cfg.micro_batches < lay.n_stages:
            raise ValueError(f"1F1B needs at least as many micro-batches as stages "
                             f"({cfg.micro_batches} < {lay.n_stages})")
        # No LM head in a sequence-classification model: nothing is tied across stages.
        assert not getattr(model.hf, "all_tied_weights_keys", {}), "tied weights across stages"
        self.role = f"stage {lay.stage}/{lay.n_stages}"
        self.phase = "load"
        self._keep_only_own_parts(model)
        full_names = {id(p): n for n, p in model.named_parameters()}
        self.module = StageModule(model, *lay.layers, lay.first, lay.last, on_phase=self._set_phase,
                                  precision=lambda: autocast(cfg, device)).to(device)
        self._names = {n: full_names[id(p)] for n, p in self.module.named_parameters()}
        group = self._pipeline_group()
        self.stage = PipelineStage(self.module, lay.stage, lay.n_stages, device, group=group)
        # Stage i talks to the rank holding stage i+1 of *this* pipeline: map stage
        # indices to ranks within the group (group ranks follow sorted global ranks,
        # not stage order).
        pg = group if group is not None else dist.group.WORLD
        self.stage.stage_index_to_group_rank = {
            i: dist.get_group_rank(pg, r) for i, r in enumerate(lay.pipeline_ranks(lay.replica))}
        self._scale = 1.0
        # this step's micro-batch losses, and how many have had their backward (see _set_phase)
        self._mb_losses: list[torch.Tensor] = []
        self._losses_freed = self._backwards = 0
        self.schedule = _SCHEDULES[cfg.schedule](self.stage, cfg.micro_batches, loss_fn=self._loss,
                                                 scale_grads=False)
        self.opt = make_optimizer(self.module.parameters(), cfg)
        # no DDP here: the embedding stage's tables can take sparse gradients
        self._sparse = sparse_embedding_grads(self.module)

    # ---------------------------------------------------------------- hooks

    def _pipeline_group(self) -> dist.ProcessGroup | None:
        return None  # one pipeline over the whole world

    def _share(self, batch: int) -> slice:
        return slice(0, batch)

    def _sync(self, loss_sum: torch.Tensor | None) -> tuple[torch.Tensor | None, float]:
        """Combine gradients across replicas; returns the (global) loss and comm time."""
        return loss_sum, 0.0

    # ---------------------------------------------------------------- helpers

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        if phase == "backward" and self.lay.last:
            # A micro-batch's backward starts: the ones before it are done.  The schedule
            # keeps every micro-batch's loss until the step ends, and with it that
            # micro-batch's autograd graph (its nodes, not its activations), which pins
            # the heap between later micro-batches' activations: the last stage kept
            # ~7-16 MB of freed heap per micro-batch (``bench/pp_stage_memory.py``).
            # Detached, each graph goes as soon as its backward is done.
            for loss in self._mb_losses[self._losses_freed:self._backwards]:
                loss.detach_()
            self._losses_freed = self._backwards
            self._backwards += 1

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Summed over the micro-batch, divided by the *global* batch: the schedule's
        # sum over micro-batches (and hybrid's sum over pipelines) is then the mean.
        loss = F.cross_entropy(logits, labels, reduction="sum") * self._scale
        self._mb_losses.append(loss)
        return loss

    def _keep_only_own_parts(self, model: nn.Module) -> None:
        own = set(model_parts(self.cfg, self.rank))
        built = set(getattr(model, "parts", own))
        if own - built:
            raise ValueError(f"rank {self.rank} ({self.role}) needs model parts "
                             f"{sorted(own - built, key=str)} that were not built; build the model "
                             "with parts=model_parts(cfg, rank)")
        for part in built - own:  # a full build: free what other stages hold
            model.part_module(part).to("meta")
        model.parts = frozenset(own)

    # ---------------------------------------------------------------- Trainer

    def train_step(self, it: int, ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        batch = ids.shape[0]
        sl = self._share(batch)
        x, y = ids[sl].to(self.device), labels[sl].to(self.device)
        if x.shape[0] % self.cfg.micro_batches:
            raise ValueError(f"{x.shape[0]} samples do not split into {self.cfg.micro_batches} "
                             "equal micro-batches")
        self._scale = 1.0 / batch
        self._mb_losses, self._losses_freed, self._backwards = [], 0, 0
        losses: list[torch.Tensor] = []
        self.phase = "forward"
        args = (x,) if self.lay.first else ()
        target = y if self.lay.last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        loss_sum = torch.stack([l.detach() for l in losses]).sum() if self.lay.last else None
        self._mb_losses = []
        densify_grads(self._sparse)
        loss, comm_s = self._sync(loss_sum)
        self.phase = "optimizer"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return StepResult(loss=float(loss) if loss is not None else None, samples=batch,
                          local_samples=x.shape[0], synced=True, comm_s=comm_s)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {self._names[n]: p.detach().cpu() for n, p in self.module.named_parameters()
                if not p.is_meta}

    def checkpoint_params(self) -> dict[str, torch.nn.Parameter]:
        return {self._names[n]: p for n, p in self.module.named_parameters() if not p.is_meta}

    @torch.no_grad()
    def eval_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> EvalCounts | None:
        """Forward-only through the pipeline with the schedule's own ``eval()``.

        ``eval()`` runs the same schedule (GPipe or 1F1B) with its backward switched
        off: micro-batches flow forward, nothing is accumulated, the optimizer is not
        touched.  Switching between ``eval()`` and ``step()`` makes the schedule set its
        stages up again (receive buffers with and without ``requires_grad``), one small
        exchange per switch.  The last stage gets the merged logits of its share and
        counts them; the schedule's loss hook still runs on each micro-batch and its
        result is dropped.
        """
        self.phase = "eval"
        self._mb_losses = []  # the loss hook runs here too (no graphs: nothing to free)
        sl = self._share(ids.shape[0])
        x, y = ids[sl].to(self.device), labels[sl].to(self.device)
        if x.shape[0] % self.cfg.micro_batches:
            raise ValueError(f"{x.shape[0]} evaluation samples do not split into "
                             f"{self.cfg.micro_batches} equal micro-batches")
        args = (x,) if self.lay.first else ()
        # The schedule's loss hook indexes the target on the last stage: pass it there.
        logits = self.schedule.eval(*args, target=y if self.lay.last else None)
        counts = eval_counts(logits, y) if self.lay.last else None
        return self._eval_combine(counts)

    def _eval_combine(self, counts: EvalCounts | None) -> EvalCounts | None:
        """Counts of the whole global batch from this pipeline's (hybrid: add replicas')."""
        return counts


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    return PipelineParallel(cfg, rank, model, device)


__all__ = ["PipelineParallel", "StageLayout", "StageModule", "build", "model_parts", "stage_layout"]
