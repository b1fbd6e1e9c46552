"""The memory knobs of a run in the cost model: optimizer, checkpointing, accumulation, shares, precision.

``RunSettings`` carries five settings that trade time for memory (or change the maths):

* ``optimizer``: AdamW keeps two fp32 moments per parameter; SGD with momentum one
  buffer; ``torch.optim.Adafactor`` (torch 2.13, ``torch/optim/_adafactor.py``) keeps,
  per parameter of two or more dimensions, a row factor (``shape[:-1]``) and a column
  factor (``shape[:-2] + shape[-1:]``) of the second moment and no first moment, and a
  full-size ``variance`` for a 1-D parameter (biases, LayerNorms).
* ``activation_checkpointing``: ``torch.utils.checkpoint`` around every transformer
  block keeps only each block's input for backward; backward re-runs one block's
  forward at a time, so one block's full activations are alive at once on top.
* ``grad_accumulation`` (DP): a replica runs its slice in ``g`` micro-batches; the
  activations at the peak are one micro-batch's, the gradients persist between them.
* ``dp_shares`` (DP): each rank's fraction of the global batch; the planner picks shares
  proportional to the devices' matmul rates when they differ (:func:`speed_shares`).
* ``precision``: ``bf16`` autocast halves (roughly) the activations; parameters,
  gradients and optimizer state stay fp32, and autocast keeps a bf16 copy of every
  weight a matmul uses while forward and backward run.

Pure functions of the shape and the settings: :mod:`app.planner.parallel` and
:mod:`app.planner.pipeline` call them to build each rank's ``RankLoad``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from app.planner.shape import FP32, ModelShape
from workers.config import share_bounds

#: Bytes per element on the wire of a DiLoCo sync (``RunSettings.sync_dtype``).
SYNC_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "sgd", "adafactor")
PRECISIONS = ("fp32", "bf16")

#: Optimizer state in fp32 elements per parameter (Adafactor's is counted per tensor by
#: :func:`adafactor_state_elems`; 1.0 here is its worst case: only 1-D parameters).
STATE_PER_PARAM = {"adamw": 2.0, "sgd": 1.0, "adafactor": 1.0}
#: Temporaries of one optimizer step, in units of the largest parameter tensor.  AdamW and
#: SGD are torch's fused ones (``workers.engine.make_optimizer``): one in-place pass per
#: tensor, none (measured for AdamW: the optimizer phase's peak RSS no higher than
#: backward's, gpt2-s and distilbert, ``bench/data/plan_calibration_2026-12-03d.json``; the
#: foreach AdamW it replaced made two largest-tensor temporaries).  Adafactor materialises
#: ``row_var @ col_var`` (one full-size tensor) and updates it in place
#: (``clamp_().rsqrt_().mul_(grad)``): one, read from torch 2.13's single-tensor
#: implementation; not measured.
OPT_TMP_PER_TENSOR = {"adamw": 0.0, "sgd": 0.0, "adafactor": 1.0}
#: Optimizer step time relative to the calibrated (fused) AdamW, per parameter and per
#: tensor: ``bench/optimizer_step.py --all`` (one thread, CPU time) on gpt2-s (fused AdamW
#: 0.167 s, fused SGD 0.129 s, Adafactor 1.79 s: its factored statistics and three
#: ``.item()`` synchronisations per tensor) and on tiny-gpt2 for the per-tensor share
#: (1, 1 and 7 ms).
OPT_TIME_PER_PARAM = {"adamw": 1.0, "sgd": 0.78, "adafactor": 10.7}
OPT_TIME_PER_TENSOR = {"adamw": 1.0, "sgd": 1.0, "adafactor": 7.0}
#: Activation checkpointing re-runs each block's forward in backward: forward is one of
#: the three FLOP units of forward + backward (backward computes input and weight
#: gradients), so the blocks' FLOPs and their element-wise work grow by a third.
RECOMPUTE_FRACTION = 1.0 / 3.0
#: bf16 autocast: matmul inputs/outputs and what they save are bf16 (2 bytes), the
#: LayerNorm and softmax statistics stay fp32; "roughly halved", not calibrated.
BF16_ACT_FACTOR = 0.5
#: Bytes per weight of autocast's bf16 copies (cached for the forward, saved for backward).
BF16_COPY_BYTES = 2
#: Relative speeds within this fraction count as equal: DP keeps equal shares.  Two
#: profiles of the same idle core read up to ~15 % apart on a shared host, and uneven
#: shares from that noise make one device the straggler; boards that really differ
#: differ by 2-4x.
SHARE_TOLERANCE = 0.15


def optimizer_of(st: Any) -> str:
    """The run's optimizer name (``adamw`` for settings that predate the knob)."""
    opt = str(getattr(st, "optimizer", "adamw") or "adamw").lower()
    if opt not in OPTIMIZERS:
        raise ValueError(f"optimizer {opt!r} is not one of {', '.join(OPTIMIZERS)}")
    return opt


def precision_of(st: Any) -> str:
    """``fp32`` or ``bf16``."""
    prec = str(getattr(st, "precision", "fp32") or "fp32").lower()
    if prec not in PRECISIONS:
        raise ValueError(f"precision {prec!r} is not one of {', '.join(PRECISIONS)}")
    return prec


def checkpointing(st: Any) -> bool:
    return bool(getattr(st, "activation_checkpointing", False))


def accumulation(st: Any) -> int:
    return max(1, int(getattr(st, "grad_accumulation", 1) or 1))


def supports_bf16(spec: Any) -> bool:
    """Whether a device runs bf16 autocast usefully.

    ``DeviceSpec`` has no such field yet: CPU devices (all of EdgeTrain's today) count as
    not supporting it unless a spec carries ``supports_bf16`` / ``bf16`` set true.
    """
    return bool(getattr(spec, "supports_bf16", False) or getattr(spec, "bf16", False))


# --------------------------------------------------------------------------- optimizer state


def _factored(rows: int, cols: int) -> int:
    return rows + cols


def block_state_elems(shape: ModelShape, tp: int = 1) -> float:
    """Adafactor state of one block: row + column factors per matrix, 1-D params in full.

    GPT-2 has a fused ``c_attn`` (h x 3h) and ``c_proj`` (h x h); DistilBERT and OPT
    four h x h projections.  Under tensor parallelism one dimension of each matrix and
    the sharded biases shrink by ``tp`` (the factors are tiny either way).
    """
    h, f = shape.hidden, shape.ffn
    t = max(1, tp)
    if shape.family == "gpt2":
        mats = _factored(h, 3 * h // t) + _factored(h // t, h)
    else:
        mats = 3 * _factored(h // t, h) + _factored(h, h // t)
    mats += _factored(h, f // t) + _factored(f // t, h)
    vec = 6 * h + (3 * h + f) / t  # LayerNorms and row-parallel biases replicated
    return float(mats + vec)


def edge_state_elems(shape: ModelShape, first: bool, last: bool) -> float:
    """Adafactor state of the embeddings (``first``) and the head (``last``)."""
    h, c, v, p = shape.hidden, shape.num_labels, shape.vocab_size, shape.max_positions
    n = 0
    if first:
        if shape.family == "gpt2":
            n += _factored(v, h) + _factored(p, h)
        elif shape.family == "bert":
            n += _factored(v, h) + _factored(p, h) + 2 * h
        else:
            n += _factored(v, shape.proj) + _factored(p + 2, h)
            n += _factored(h, shape.proj) if shape.proj != h else 0
    if last:
        if shape.family == "gpt2":
            n += 2 * h + _factored(c, h)
        elif shape.family == "bert":
            n += _factored(h, h) + h + _factored(c, h) + c
        else:
            n += _factored(c, shape.proj) + (2 * h if shape.pre_ln else 0)
            n += _factored(shape.proj, h) if shape.proj != h else 0
    return float(n)


def state_elems(optimizer: str, params: float, factored: float) -> float:
    """fp32 optimizer-state elements for ``params`` parameters (``factored``: Adafactor's count)."""
    if optimizer == "adafactor":
        return float(factored)
    return STATE_PER_PARAM[optimizer] * params


# --------------------------------------------------------------------------- activations


def activation_bytes(shape: ModelShape, st: Any, tokens: float, n_blocks: int, first: bool, last: bool,
                     tp: int = 1) -> tuple[float, float, float]:
    """Saved activations of ``n_blocks`` blocks (+ embeddings/head) for ``tokens`` tokens.

    Returns
    -------
    (kept, transient, produced)
        ``kept``: bytes kept per micro-batch until its backward; ``transient``: bytes
        alive once on top while backward recomputes one block (checkpointing, else 0);
        ``produced``: bytes produced over forward, recompute and backward (the time term
        of the cost model; fp32-sized: element-wise work on CPUs without bf16 is no faster).
    """
    prec = BF16_ACT_FACTOR if precision_of(st) == "bf16" else 1.0
    block = tokens * FP32 * shape.block_saved_floats_per_token(tp)
    edges = tokens * FP32 * ((shape.embed_saved_floats_per_token() if first else 0.0)
                             + (shape.head_saved_floats_per_token() if last else 0.0))
    if checkpointing(st) and n_blocks > 0:
        # the block input is the fp32 residual stream: autocast does not shrink it
        inputs = n_blocks * tokens * FP32 * shape.hidden
        return inputs + edges * prec, block * prec, n_blocks * block * (1 + RECOMPUTE_FRACTION) + edges
    return (n_blocks * block + edges) * prec, 0.0, n_blocks * block + edges


def block_flops_factor(st: Any) -> float:
    """FLOPs of a block per forward FLOP: 3 (forward + backward), 4 with recompute."""
    return 3.0 * (1 + RECOMPUTE_FRACTION) if checkpointing(st) else 3.0


# --------------------------------------------------------------------------- DP shares


def normalised(shares: Sequence[float]) -> list[float]:
    """Shares scaled to sum to 1.

    Raises
    ------
    ValueError
        When a share is negative or they sum to zero.
    """
    vals = [float(s) for s in shares]
    if any(s < 0 or not math.isfinite(s) for s in vals) or sum(vals) <= 0:
        raise ValueError(f"dp_shares {list(shares)!r}: expected non-negative numbers with a positive sum")
    total = sum(vals)
    return [s / total for s in vals]


def share_counts(n: int, shares: Sequence[float] | None, world: int) -> list[int]:
    """Samples per rank: what the DP workers take of a batch of ``n``.

    ``None``: the contiguous near-equal split (``workers.engine.rank_slice``); shares:
    ``workers.config.share_bounds`` (floors of the cumulative shares).

    Raises
    ------
    ValueError
        Shares that leave a rank no sample (``share_bounds``'s message).
    """
    if shares is None:
        base, extra = divmod(n, world)
        return [base + (1 if r < extra else 0) for r in range(world)]
    bounds = share_bounds(n, list(shares))
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def speed_shares(specs: Sequence[Any], tolerance: float = SHARE_TOLERANCE) -> list[float] | None:
    """DP shares proportional to the devices' matmul rates (``gflops``).

    ``None`` (equal shares) when the fastest is within ``tolerance`` of the slowest.
    """
    rates = [max(1e-9, float(s.gflops)) for s in specs]
    if len(rates) < 2 or max(rates) <= (1 + tolerance) * min(rates):
        return None
    return [round(r, 6) for r in normalised(rates)]
