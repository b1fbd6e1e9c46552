"""Per-parallelism cost of a training step: what each rank holds, computes and sends.

One function per parallelism turns (model shape, settings, devices in rank order,
links) into an :class:`Evaluation`: a :class:`DevicePrediction` per rank, the step
time with its critical-path parts, the bytes per link and the JobConfig ``stages``.
They mirror what the workers do:

* **dp**: every rank a DDP replica on its slice of the global batch (``dp_shares``, or
  equal), run in ``grad_accumulation`` micro-batches; gradients all-reduced (ring)
  every ``sync_every`` iterations, when the optimizer also steps.
* **sp**: every rank all weights and a contiguous slice of every sequence; keys and
  values all-gathered per block (reduce-scattered in backward), gradients all-reduced.
* **tp**: Megatron split of each block (heads and FFN columns over ranks, two
  all-reduces of the hidden state per block forward and two backward); embeddings
  and head replicated.
* **pp** and **hybrid**: :mod:`app.planner.pipeline`, on the shared pieces here
  (:class:`DevicePrediction`, :class:`Evaluation`, per-rank prediction, link bytes).

Every parallelism applies the memory knobs of :mod:`app.planner.knobs` (optimizer
state, activation checkpointing, bf16) to what each rank holds and computes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from app.planner import costmodel as cm
from app.planner import knobs
from app.planner.costmodel import DeviceSpec, RankLoad
from app.planner.links import (
    Links,
    allreduce_bytes_per_rank,
    ring_allgather_s,
    ring_allreduce_s,
    ring_links,
    slowest_hop,
)
from app.planner.shape import FP32, ModelShape
from workers.config import RunSettings

_TENSORS_PER_BLOCK = {"gpt2": 12, "bert": 16, "opt": 16}
_TP_LINEARS = {"gpt2": 4, "bert": 6, "opt": 6}  # workers.parallel.tp._PLANS
_EDGE_TENSORS = 4  # embeddings or head: a handful of tensors
SP_BUCKET = 16 * 1024 * 1024      # workers.parallel.sp.BUCKET_ELEMS
#: Parallelisms whose ranks build the whole model before keeping their part, so loading
#: peaks at the full size: none now (pp/hybrid build their stage only; tp builds and
#: shards one block at a time).
FULL_MODEL_AT_LOAD: frozenset[str] = frozenset()


@dataclass
class DevicePrediction:
    """One rank's predictions (the per-device part of the plan JSON)."""

    name: str
    rank: int
    role: str
    mem_bytes: dict[str, int]
    virtual_bytes: dict[str, int]
    peak_rss_bytes: int
    peak_virtual_bytes: int
    limit_bytes: int | None
    limit_kind: str
    margin_bytes: int | None
    margin: float | None
    oom: bool
    oom_phase: str | None
    compute_s: float
    optimizer_s: float
    comm_s: float
    comm_bytes: float
    step_s: float
    latency_per_sample_s: float
    energy_per_sample_j: float
    energy_method: str
    spec_source: str
    profiled: bool
    stage: int | None = None
    layers: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def capped_peak_bytes(self) -> int:
        """The predicted peak in the quantity the device's limit caps: virtual size under an
        address-space cap, resident memory otherwise."""
        return self.peak_virtual_bytes if self.limit_kind == "virtual" else self.peak_rss_bytes


@dataclass
class Evaluation:
    """Predicted cost of one parallelism on an ordered set of devices."""

    parallelism: str
    feasible: bool
    reason: str = ""
    order: list[str] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    devices: list[DevicePrediction] = field(default_factory=list)
    step_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    link_bytes: dict[str, float] = field(default_factory=dict)
    slowest_link: tuple[str, str, float] | None = None
    critical: str = ""
    typical_step_s: float | None = None
    proposed_order: list[str] | None = None
    proposed_step_s: float | None = None

    @property
    def oom(self) -> bool:
        return any(d.oom for d in self.devices)


def predict_rank(spec: DeviceSpec, rank: int, role: str, load: RankLoad, cost: cm.RankCost, comm_s: float,
             comm_bytes: float, step_s: float, batch: int, **extra: Any) -> DevicePrediction:
    verdict = cm.memory_verdict(cost, spec)
    busy = cost.compute_s + cost.optimizer_s
    energy = cm.energy_joules(spec, step_s, busy)
    return DevicePrediction(
        name=spec.name, rank=rank, role=role,
        mem_bytes={k: int(v) for k, v in cost.rss.items()},
        virtual_bytes={k: int(v) for k, v in cost.virtual.items()},
        peak_rss_bytes=int(cost.peak_rss), peak_virtual_bytes=int(cost.peak_virtual),
        limit_bytes=verdict.limit_bytes, limit_kind=verdict.limit_kind,
        margin_bytes=None if verdict.margin_bytes is None else int(verdict.margin_bytes),
        margin=verdict.margin, oom=verdict.oom, oom_phase=verdict.oom_phase,
        compute_s=cost.compute_s, optimizer_s=cost.optimizer_s, comm_s=comm_s, comm_bytes=comm_bytes,
        step_s=step_s, latency_per_sample_s=step_s / batch, energy_per_sample_j=energy / batch,
        energy_method=cm.energy_method(spec), spec_source=spec.source, profiled=spec.profiled, **extra)


def tensor_count(shape: ModelShape, n_blocks: int, first: bool, last: bool) -> int:
    return (_TENSORS_PER_BLOCK.get(shape.family, 16) * n_blocks + (_EDGE_TENSORS if first else 0)
            + (_EDGE_TENSORS if last else 0))


def embed_bytes(shape: ModelShape) -> float:
    """The dense token-embedding gradient (see ``Calibration.embed_grad_s_per_byte``)."""
    return float(shape.vocab_size * shape.proj * FP32)


def weights_and_state(shape: ModelShape, st: RunSettings, params: int, n_blocks: int, first: bool, last: bool,
                      tp: int = 1) -> dict[str, Any]:
    """``RankLoad`` fields of the knobs that depend on what a rank holds: the optimizer,
    its state (Adafactor: factored per tensor) and autocast's bf16 weight copies (every
    weight but the embedding tables, which are looked up, not multiplied)."""
    opt = knobs.optimizer_of(st)
    factored = (n_blocks * knobs.block_state_elems(shape, tp) + knobs.edge_state_elems(shape, first, last))
    tables = shape.embed_params() if first else 0
    cast = max(0, params - tables) if knobs.precision_of(st) == "bf16" else 0
    return {"optimizer": opt, "opt_state_elems": knobs.state_elems(opt, params, factored), "cast_params": cast}


def largest_tensor(shape: ModelShape, first: bool) -> int:
    block = max(shape.hidden * shape.ffn, 3 * shape.hidden ** 2)
    return max(block, shape.vocab_size * shape.proj) if first else block


def add_link_bytes(link_bytes: dict[str, float], a: str, b: str, nbytes: float) -> None:
    key = f"{a}->{b}"
    link_bytes[key] = link_bytes.get(key, 0.0) + nbytes


# --------------------------------------------------------------------------- dp / sp / tp


def add_ring_bytes(link_bytes: dict[str, float], names: list[str], per_rank: float) -> None:
    for a, b in ring_links(names):
        add_link_bytes(link_bytes, a, b, per_rank)


def eval_replicated(par: str, shape: ModelShape, st: RunSettings, specs: list[DeviceSpec], links: Links,
                    cal: cm.Calibration = cm.CALIBRATION) -> Evaluation:
    """DP (batch slices) or SP (sequence slices): every rank holds the whole model."""
    names = cm.names_of(specs)
    w = len(specs)
    if par == "sp" and st.seq_len < w:
        return Evaluation(par, False, f"SP: sequence length {st.seq_len} < {w} devices", order=names)
    params = shape.total_params()
    k = max(1, st.sync_every) if par == "dp" else 1
    g = knobs.accumulation(st) if par == "dp" else 1
    if par == "dp" and st.dp_shares is not None and len(st.dp_shares) != w:
        return Evaluation(par, False, f"DP: {len(st.dp_shares)} dp_shares for {w} devices", order=names)
    try:
        counts = knobs.share_counts(st.batch_size, st.dp_shares if par == "dp" else None, w)
    except ValueError as exc:
        return Evaluation(par, False, f"DP: {exc}", order=names)
    ckpt, prec = knobs.checkpointing(st), (knobs.BF16_ACT_FACTOR if knobs.precision_of(st) == "bf16" else 1.0)
    held = weights_and_state(shape, st, params, shape.n_layer, True, True)
    diloco = par == "dp" and getattr(st, "dp_mode", "ddp") == "diloco"
    # DiLoCo all-reduces the replicas' moves in sync_dtype instead of fp32 gradients
    wire = knobs.SYNC_BYTES[getattr(st, "sync_dtype", "fp32")] if diloco else FP32
    sync_s = ring_allreduce_s(wire * params, names, links)
    sync_bytes = allreduce_bytes_per_rank(wire * params, w)
    if diloco:
        # the anchor (fp32 parameters) and the outer Nesterov momentum live beside the
        # inner optimizer's state
        held["opt_state_elems"] += params * (1 + (getattr(st, "outer_momentum", 0.0) > 0))
    link_bytes: dict[str, float] = {}
    add_ring_bytes(link_bytes, names, sync_bytes / k)
    loads, comm = [], []
    for r in range(w):
        if par == "dp":
            samples, seq = counts[r], st.seq_len
            tokens = samples * seq
            extra_act, comm_s, comm_b = 0.0, sync_s / k, sync_bytes / k
        else:
            samples, seq = st.batch_size, rank_share(st.seq_len, r, w)
            tokens = samples * seq
            # keys and values of the whole sequence, gathered per block and kept for backward;
            # the masked sdpa (math path) also keeps scores and probabilities per head.
            # Checkpointed blocks keep neither (one block's at a time) but gather again
            # when backward recomputes them.
            kv = 2 * shape.hidden * st.batch_size * st.seq_len * FP32
            scores = 2 * shape.heads * tokens * st.seq_len * FP32
            extra_act = (1 if ckpt else shape.n_layer) * (kv + scores) * prec
            gathers = (3 if ckpt else 2) * shape.n_layer  # forward (+ recompute) + backward
            gather_s = gathers * ring_allgather_s(kv, names, links)
            gather_b = gathers * kv * (w - 1) / w
            comm_s, comm_b = sync_s + gather_s, sync_bytes + gather_b
            add_ring_bytes(link_bytes, names, gather_b)
        flops = (knobs.block_flops_factor(st) * shape.n_layer * shape.block_fwd_flops(tokens, st.seq_len)
                 + 3 * (shape.embed_fwd_flops(tokens) + shape.head_fwd_flops(samples)))
        # the peak holds one accumulation micro-batch's activations (the largest: ceil);
        # a slice smaller than g runs one sample per micro-batch (workers.parallel.dp)
        g_r = max(1, min(g, samples))
        kept, transient, _ = knobs.activation_bytes(shape, st, -(-samples // g_r) * seq, shape.n_layer, True, True)
        _, _, produced = knobs.activation_bytes(shape, st, tokens, shape.n_layer, True, True)
        # DDP buckets hold every gradient; SP all-reduces flat buckets of <= 16 M elements;
        # DiLoCo's outer step flattens the moves (fp32) and casts them for the wire
        bucket = (params * (FP32 + wire) / FP32 if diloco else params if par == "dp"
                  else max(min(params, SP_BUCKET), largest_tensor(shape, True)))
        loads.append(RankLoad(params=params, bucket_params=bucket, ddp=par == "dp" and not diloco,
                              largest_tensor=largest_tensor(shape, True),
                              n_tensors=tensor_count(shape, shape.n_layer, True, True),
                              # gathered K/V are single allocations: memory, not element-wise time
                              saved_act_bytes=kept + transient + extra_act, act_bytes_per_step=produced,
                              family=shape.family, flops_per_step=flops, embed_grad_bytes=embed_bytes(shape),
                              block_passes=shape.n_layer * g_r, micro_steps=g_r, opt_every=1 if diloco else k,
                              accumulate=par == "dp" and ((k > 1 and not diloco) or g_r > 1), peers=w - 1,
                              store=r == 0 and w > 1,
                              **held))
        comm.append((comm_s, comm_b))
    costs = [cm.rank_cost(ld, s, cal) for ld, s in zip(loads, specs)]
    # ranks meet at every collective: the slowest rank sets the pace
    step = max(c.compute_s for c in costs) + max(c.optimizer_s for c in costs) + comm[0][0]
    # with k > 1 most DP iterations neither all-reduce nor step the optimizer (DiLoCo's
    # step their inner optimizer but do not communicate)
    typical = (max(c.compute_s + c.optimizer_s for c in costs) if diloco and k > 1
               else max(c.compute_s for c in costs) if k > 1 else step)
    crit = max(range(w), key=lambda i: costs[i].compute_s)
    role = "replica" if par == "dp" else "shard"
    devices = [predict_rank(specs[r], r, f"{role} {r}", loads[r], costs[r], comm[r][0], comm[r][1], step,
                        st.batch_size) for r in range(w)]
    slow = slowest_hop(names, links) if w > 1 else None
    return Evaluation(par, True, order=names, devices=devices, step_s=step, typical_step_s=typical,
                      parts={"compute_s": costs[crit].compute_s, "optimizer_s": max(c.optimizer_s for c in costs),
                             "comm_s": comm[0][0], "bubble_s": 0.0},
                      link_bytes=link_bytes, slowest_link=(slow[0], slow[1], links.mbps(slow[0], slow[1])) if slow else None,
                      critical=specs[crit].name)


def rank_share(n: int, r: int, w: int) -> int:
    """``workers.engine.rank_slice`` length: contiguous near-equal split."""
    base, extra = divmod(n, w)
    return base + (1 if r < extra else 0)


def eval_tp(shape: ModelShape, st: RunSettings, specs: list[DeviceSpec], links: Links,
            cal: cm.Calibration = cm.CALIBRATION) -> Evaluation:
    """Tensor parallelism over all devices (one group)."""
    names = cm.names_of(specs)
    w = len(specs)
    if shape.heads % w or shape.ffn % w:
        return Evaluation("tp", False, f"TP: {shape.heads} heads / FFN {shape.ffn} do not split over {w} devices",
                          order=names)
    h = shape.hidden
    replicated_per_block = 6 * h  # two LayerNorms and the row-parallel biases
    blk = (shape.block_params() - replicated_per_block) // w + replicated_per_block
    params = shape.embed_params() + shape.head_params() + shape.n_layer * blk
    tokens = st.batch_size * st.seq_len
    flops = (knobs.block_flops_factor(st) * shape.n_layer * shape.block_fwd_flops(tokens, st.seq_len) / w
             + 3 * (shape.embed_fwd_flops(tokens) + shape.head_fwd_flops(st.batch_size)))
    # gradient accumulation runs the batch in g chunks: one chunk's activations at a time
    g = min(knobs.accumulation(st), st.batch_size)
    kept, transient, _ = knobs.activation_bytes(shape, st, tokens / g, shape.n_layer, True, True, tp=w)
    produced = knobs.activation_bytes(shape, st, tokens, shape.n_layer, True, True, tp=w)[2]
    msg = tokens * h * FP32
    # two all-reduces per block forward, two backward; a checkpointed block's recompute
    # runs its forward (and its two all-reduces) again
    n_reduce = (6 if knobs.checkpointing(st) else 4) * shape.n_layer
    comm_s = n_reduce * ring_allreduce_s(msg, names, links)
    comm_b = n_reduce * allreduce_bytes_per_rank(msg, w)
    link_bytes: dict[str, float] = {}
    add_ring_bytes(link_bytes, names, comm_b)
    # blocks are built one at a time and sharded at once: the load peak is the shards
    # plus one whole block
    full = shape.total_params() + params if "tp" in FULL_MODEL_AT_LOAD else params + shape.block_params()
    loads = [RankLoad(params=params, load_params=full, largest_tensor=largest_tensor(shape, True),
                      n_tensors=tensor_count(shape, shape.n_layer, True, True), saved_act_bytes=kept + transient,
                      act_bytes_per_step=produced, family=shape.family, flops_per_step=flops,
                      embed_grad_bytes=embed_bytes(shape),
                      tp_modules=shape.n_layer * _TP_LINEARS.get(shape.family, 6),
                      block_passes=shape.n_layer, micro_steps=g, peers=w - 1, store=r == 0 and w > 1,
                      **weights_and_state(shape, st, params, shape.n_layer, True, True, tp=w))
             for r in range(w)]
    costs = [cm.rank_cost(ld, s, cal) for ld, s in zip(loads, specs)]
    step = max(c.compute_s for c in costs) + max(c.optimizer_s for c in costs) + comm_s
    crit = max(range(w), key=lambda i: costs[i].compute_s)
    devices = [predict_rank(specs[r], r, f"shard {r}/{w}", loads[r], costs[r], comm_s, comm_b, step, st.batch_size)
               for r in range(w)]
    slow = slowest_hop(names, links) if w > 1 else None
    return Evaluation("tp", True, order=names, devices=devices, step_s=step,
                      parts={"compute_s": costs[crit].compute_s, "optimizer_s": max(c.optimizer_s for c in costs),
                             "comm_s": comm_s, "bubble_s": 0.0},
                      link_bytes=link_bytes, slowest_link=(slow[0], slow[1], links.mbps(slow[0], slow[1])) if slow else None,
                      critical=specs[crit].name)
