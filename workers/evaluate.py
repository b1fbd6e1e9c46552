"""Held-out evaluation: mean loss and accuracy over the evaluation rows, on every parallelism.

The rows come from :func:`workers.data.split_eval`.  :func:`evaluate` walks them in
their fixed order, in global batches of ``cfg.batch_size``, and hands each batch to the
trainer's :meth:`~workers.engine.Trainer.eval_batch`, which runs the parallelism's own
forward (DP: a slice per replica and one all-reduce; SP/TP: their sharded forward;
PP/hybrid: the schedule's forward-only ``eval()``).  Every rank must call it at the
same step, as it calls ``train_step``: the forwards communicate.

Choices:

* **Batches of ``cfg.batch_size``.**  A training batch already splits as each
  parallelism needs (pipelines: into equal micro-batches), so an evaluation batch of
  the same size does too.
* **The last partial batch is padded**, not dropped, with copies of its first row
  labelled ``IGNORE_LABEL``: padded rows count neither in the loss nor in the accuracy,
  every evaluation row is scored, and an evaluation set smaller than one batch still
  gets evaluated.
* **At most** :data:`MAX_BATCHES` **batches per evaluation** (the first ones, always the
  same rows): an evaluation costs at most 8 forward-only batches, about as much as
  three training steps (a forward is roughly a third of a step), so evaluating every
  25 steps adds roughly a tenth to a run; and evaluations at different steps score
  the same rows, which makes them comparable.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import JobConfig
from .data import IGNORE_LABEL, Encoded
from .engine import Trainer

#: Evaluation batches per evaluation, by default (see the module docstring).
MAX_BATCHES = 8


@dataclass(frozen=True)
class EvalResult:
    """One evaluation.

    Attributes
    ----------
    loss
        Mean cross-entropy over the labelled rows evaluated.
    accuracy
        Share of them whose arg-max logit is the label, in ``[0, 1]``.
    samples
        Labelled rows evaluated (padding and unlabeled rows are not counted).
    """

    loss: float
    accuracy: float
    samples: int


def eval_batches(data: Encoded, batch_size: int,
                 max_batches: int | None = MAX_BATCHES) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The global evaluation batches: rows in order, the last batch padded.

    Parameters
    ----------
    data
        The evaluation rows.
    batch_size
        Rows per batch (the run's global batch size).
    max_batches
        Stop after this many batches (``None``: all of them).

    Yields
    ------
    tuple[Tensor, Tensor]
        ``input_ids[batch_size, S]`` and ``labels[batch_size]``; padding rows carry
        ``IGNORE_LABEL``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    n = len(data)
    count = -(-n // batch_size)
    if max_batches is not None:
        count = min(count, max_batches)
    for b in range(count):
        ids = data.input_ids[b * batch_size:(b + 1) * batch_size]
        labels = data.labels[b * batch_size:(b + 1) * batch_size]
        pad = batch_size - ids.shape[0]
        if pad:
            ids = torch.cat([ids, ids[:1].expand(pad, -1)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE_LABEL, dtype=labels.dtype)])
        yield ids, labels


def evaluate(trainer: Trainer, eval_data: Encoded, cfg: JobConfig,
             max_batches: int | None = MAX_BATCHES) -> EvalResult | None:
    """Evaluate the model as it is now on (the first batches of) the evaluation rows.

    Parameters
    ----------
    trainer
        This rank's trainer; every rank of the run calls this together.
    eval_data
        The held-out rows (the same on every rank).
    cfg
        The run's settings (``batch_size``).
    max_batches
        Batches per evaluation (:data:`MAX_BATCHES`; ``None``: every row).

    Returns
    -------
    EvalResult | None
        On every rank that knows the result (not on pipeline stages before the last);
        ``None`` there, and everywhere when no labelled row was evaluated.
    """
    loss_sum, correct, samples = 0.0, 0, 0
    known = False
    for ids, labels in eval_batches(eval_data, cfg.batch_size, max_batches):
        counts = trainer.eval_batch(ids, labels)
        if counts is None:
            continue
        known = True
        # summed in float64 here: the batches' float32 sums add without further rounding
        loss_sum += counts.loss_sum
        correct += counts.correct
        samples += counts.samples
    if not known or samples == 0:
        return None
    return EvalResult(loss=loss_sum / samples, accuracy=correct / samples, samples=samples)
