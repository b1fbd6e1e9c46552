"""Per-parallelism cost of a training step: what each rank holds, computes and sends.

One function per parallelism turns (model shape, settings, devices in rank order,
links) into an :class:`Evaluation`: a :class:`DevicePrediction` per rank, the step
time with its critical-path parts, the bytes per link and the JobConfig ``stages``.
They mirror what the workers do:

* **dp**: every rank a DDP replica on an equal slice of the global batch; gradients
  all-reduced (ring) every ``sync_every`` iterations, when the optimizer also steps.
* **sp**: every rank all weights and a contiguous slice of every sequence; keys and
  values all-gathered per block (reduce-scattered in backward), gradients all-reduced.
* **tp**: Megatron split of each block (heads and FFN columns over ranks, two
  all-reduces of the hidden state per block forward and two backward); embeddings
  and head replicated.
* **pp**: contiguous block ranges per stage (:mod:`app.core.partition`), the batch in
  ``micro_batches`` micro-batches, GPipe or 1F1B (same bubble, 1F1B keeps fewer
  micro-batches' activations: ``stages - stage index``).
* **hybrid**: PP over stage groups of ``R`` replicas; replica ``r`` of every stage forms
  pipeline ``r`` on ``1/R`` of the batch; each group all-reduces its stage's gradients.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from . import costmodel as cm
from .costmodel import DeviceSpec, Links, RankLoad
from .partition import Partition, partition, propose_order
from .plan_model import FP32, ModelShape

PARALLELISMS = ("dp", "sp", "tp", "pp", "hybrid")
_TENSORS_PER_BLOCK = {"gpt2": 12, "bert": 16, "opt": 16}
_TP_LINEARS = {"gpt2": 4, "bert": 6, "opt": 6}  # workers.parallel.tp._PLANS
_EDGE_TENSORS = 4  # embeddings or head: a handful of tensors
SP_BUCKET = 16 * 1024 * 1024      # workers.parallel.sp.BUCKET_ELEMS
HYBRID_BUCKET = 4 * 1024 * 1024   # workers.parallel.hybrid.BUCKET_ELEMS
#: Parallelisms whose workers build the whole model before keeping their shard or stage,
#: so loading peaks at the full size: ``workers.train`` builds ``engine.model_parts(cfg,
#: rank)``, which only ``workers.parallel.pp`` defines (stages build just their parts).
# Parallelisms whose ranks build the whole model before keeping their part: none now
# (pp/hybrid build their stage only; tp builds and shards one block at a time).
FULL_MODEL_AT_LOAD: frozenset[str] = frozenset()
_FIT_CACHE: dict[tuple, int] = {}


@dataclass
class PlanSettings:
    """The run settings the cost depends on (a subset of ``jobs.RunSettings``)."""

    batch_size: int = 128
    seq_len: int = 32
    micro_batches: int = 4
    sync_every: int = 5
    schedule: str = "gpipe"

    @classmethod
    def from_any(cls, obj: Any) -> "PlanSettings":
        """From ``RunSettings``, an argparse namespace or a dict (missing: defaults)."""
        get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
        out = cls()
        for k in ("batch_size", "seq_len", "micro_batches", "sync_every", "schedule"):
            v = get(k, None)
            if v is not None:
                setattr(out, k, v)
        return out


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


def _predict(spec: DeviceSpec, rank: int, role: str, load: RankLoad, cost: cm.RankCost, comm_s: float,
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


def _tensors(shape: ModelShape, n_blocks: int, first: bool, last: bool) -> int:
    return (_TENSORS_PER_BLOCK.get(shape.family, 16) * n_blocks + (_EDGE_TENSORS if first else 0)
            + (_EDGE_TENSORS if last else 0))


def _embed_bytes(shape: ModelShape) -> float:
    """The dense token-embedding gradient (see ``Calibration.embed_grad_s_per_byte``)."""
    return float(shape.vocab_size * shape.proj * FP32)


def _largest(shape: ModelShape, first: bool) -> int:
    block = max(shape.hidden * shape.ffn, 3 * shape.hidden ** 2)
    return max(block, shape.vocab_size * shape.proj) if first else block


def _add(link_bytes: dict[str, float], a: str, b: str, nbytes: float) -> None:
    key = f"{a}->{b}"
    link_bytes[key] = link_bytes.get(key, 0.0) + nbytes


# --------------------------------------------------------------------------- dp / sp / tp


def _ring_bytes(link_bytes: dict[str, float], names: list[str], per_rank: float) -> None:
    for a, b in cm.ring_links(names):
        _add(link_bytes, a, b, per_rank)


def eval_replicated(par: str, shape: ModelShape, st: PlanSettings, specs: list[DeviceSpec], links: Links,
                    cal: cm.Calibration = cm.CALIBRATION) -> Evaluation:
    """DP (batch slices) or SP (sequence slices): every rank holds the whole model."""
    names = cm.names_of(specs)
    w = len(specs)
    if par == "sp" and st.seq_len < w:
        return Evaluation(par, False, f"SP: sequence length {st.seq_len} < {w} devices", order=names)
    params = shape.total_params()
    k = max(1, st.sync_every) if par == "dp" else 1
    per_tok = (shape.n_layer * shape.block_saved_floats_per_token() + shape.embed_saved_floats_per_token()
               + shape.head_saved_floats_per_token())
    sync_s = cm.ring_allreduce_s(FP32 * params, names, links)
    sync_bytes = cm.allreduce_bytes_per_rank(FP32 * params, w)
    link_bytes: dict[str, float] = {}
    _ring_bytes(link_bytes, names, sync_bytes / k)
    loads, comm = [], []
    for r in range(w):
        if par == "dp":
            samples, seq = _share(st.batch_size, r, w), st.seq_len
            tokens = samples * seq
            extra_act, comm_s, comm_b = 0.0, sync_s / k, sync_bytes / k
        else:
            samples, seq = st.batch_size, _share(st.seq_len, r, w)
            tokens = samples * seq
            # keys and values of the whole sequence, gathered per block and kept for backward;
            # the masked sdpa (math path) also keeps scores and probabilities per head
            kv = 2 * shape.hidden * st.batch_size * st.seq_len * FP32
            scores = 2 * shape.heads * tokens * st.seq_len * FP32
            extra_act = shape.n_layer * (kv + scores)
            gather_s = 2 * shape.n_layer * cm.ring_allgather_s(kv, names, links)  # forward + backward
            gather_b = 2 * shape.n_layer * kv * (w - 1) / w
            comm_s, comm_b = sync_s + gather_s, sync_bytes + gather_b
            _ring_bytes(link_bytes, names, gather_b)
        flops = 3 * (shape.n_layer * shape.block_fwd_flops(tokens, st.seq_len) + shape.embed_fwd_flops(tokens)
                     + shape.head_fwd_flops(samples))
        act = tokens * FP32 * per_tok
        # DDP buckets hold every gradient; SP all-reduces flat buckets of <= 16 M elements
        bucket = params if par == "dp" else max(min(params, SP_BUCKET), _largest(shape, True))
        loads.append(RankLoad(params=params, bucket_params=bucket, ddp=par == "dp",
                              largest_tensor=_largest(shape, True),
                              n_tensors=_tensors(shape, shape.n_layer, True, True),
                              # gathered K/V are single allocations: memory, not element-wise time
                              saved_act_bytes=act + extra_act, act_bytes_per_step=act, family=shape.family,
                              flops_per_step=flops, embed_grad_bytes=_embed_bytes(shape),
                              block_passes=shape.n_layer, micro_steps=1, opt_every=k,
                              accumulate=par == "dp" and k > 1, peers=w - 1, store=r == 0 and w > 1))
        comm.append((comm_s, comm_b))
    costs = [cm.rank_cost(ld, s, cal) for ld, s in zip(loads, specs)]
    # ranks meet at every collective: the slowest rank sets the pace
    step = max(c.compute_s for c in costs) + max(c.optimizer_s for c in costs) + comm[0][0]
    # with k > 1 most DP iterations neither all-reduce nor step the optimizer
    typical = max(c.compute_s for c in costs) if k > 1 else step
    crit = max(range(w), key=lambda i: costs[i].compute_s)
    role = "replica" if par == "dp" else "shard"
    devices = [_predict(specs[r], r, f"{role} {r}", loads[r], costs[r], comm[r][0], comm[r][1], step,
                        st.batch_size) for r in range(w)]
    slow = cm.slowest_hop(names, links) if w > 1 else None
    return Evaluation(par, True, order=names, devices=devices, step_s=step, typical_step_s=typical,
                      parts={"compute_s": costs[crit].compute_s, "optimizer_s": max(c.optimizer_s for c in costs),
                             "comm_s": comm[0][0], "bubble_s": 0.0},
                      link_bytes=link_bytes, slowest_link=(slow[0], slow[1], links.mbps(slow[0], slow[1])) if slow else None,
                      critical=specs[crit].name)


def _share(n: int, r: int, w: int) -> int:
    """``workers.engine.rank_slice`` length: contiguous near-equal split."""
    base, extra = divmod(n, w)
    return base + (1 if r < extra else 0)


def eval_tp(shape: ModelShape, st: PlanSettings, specs: list[DeviceSpec], links: Links,
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
    flops = 3 * (shape.n_layer * shape.block_fwd_flops(tokens, st.seq_len) / w + shape.embed_fwd_flops(tokens)
                 + shape.head_fwd_flops(st.batch_size))
    act = tokens * FP32 * (shape.n_layer * shape.block_saved_floats_per_token(tp=w)
                           + shape.embed_saved_floats_per_token() + shape.head_saved_floats_per_token())
    msg = tokens * h * FP32
    n_reduce = 4 * shape.n_layer  # two all-reduces per block forward, two backward
    comm_s = n_reduce * cm.ring_allreduce_s(msg, names, links)
    comm_b = n_reduce * cm.allreduce_bytes_per_rank(msg, w)
    link_bytes: dict[str, float] = {}
    _ring_bytes(link_bytes, names, comm_b)
    # blocks are built one at a time and sharded at once: the load peak is the shards
    # plus one whole block
    full = shape.total_params() + params if "tp" in FULL_MODEL_AT_LOAD else params + shape.block_params()
    loads = [RankLoad(params=params, load_params=full, largest_tensor=_largest(shape, True),
                      n_tensors=_tensors(shape, shape.n_layer, True, True), saved_act_bytes=act,
                      act_bytes_per_step=act, family=shape.family, flops_per_step=flops,
                      embed_grad_bytes=_embed_bytes(shape),
                      tp_modules=shape.n_layer * _TP_LINEARS.get(shape.family, 6),
                      block_passes=shape.n_layer, micro_steps=1, peers=w - 1, store=r == 0 and w > 1)
             for r in range(w)]
    costs = [cm.rank_cost(ld, s, cal) for ld, s in zip(loads, specs)]
    step = max(c.compute_s for c in costs) + max(c.optimizer_s for c in costs) + comm_s
    crit = max(range(w), key=lambda i: costs[i].compute_s)
    devices = [_predict(specs[r], r, f"shard {r}/{w}", loads[r], costs[r], comm_s, comm_b, step, st.batch_size)
               for r in range(w)]
    slow = cm.slowest_hop(names, links) if w > 1 else None
    return Evaluation("tp", True, order=names, devices=devices, step_s=step,
                      parts={"compute_s": costs[crit].compute_s, "optimizer_s": max(c.optimizer_s for c in costs),
                             "comm_s": comm_s, "bubble_s": 0.0},
                      link_bytes=link_bytes, slowest_link=(slow[0], slow[1], links.mbps(slow[0], slow[1])) if slow else None,
                      critical=specs[crit].name)


# --------------------------------------------------------------------------- pp / hybrid


class _Pipeline:
    """Stage costs for the partitioner: O(1) time per (stage, a, b), memory as a cap
    on the number of blocks per stage (memory grows with blocks)."""

    def __init__(self, par: str, shape: ModelShape, st: PlanSettings, groups: list[list[DeviceSpec]],
                 links: Links, cal: cm.Calibration) -> None:
        self.par, self.shape, self.st, self.groups, self.links, self.cal = par, shape, st, groups, links, cal
        self.n_stages = len(groups)
        self.replicas = len(groups[0])
        self.m = max(1, st.micro_batches)
        self.mb_samples = st.batch_size / self.replicas / self.m
        self.tokens_mb = self.mb_samples * st.seq_len
        self.msg = self.tokens_mb * shape.hidden * FP32  # hidden state at a stage boundary
        world = self.n_stages * self.replicas
        self.peers = world - 1
        # per stage: seconds per block and fixed seconds per micro-batch, on its slowest replica
        self.per_block, self.fixed, self.max_blocks = [], [], []
        for s, group in enumerate(groups):
            first, last = s == 0, s == self.n_stages - 1
            t1 = max(self._mb_compute(spec, 1, first, last) for spec in group)
            t0 = max(self._mb_compute(spec, 0, first, last) for spec in group)
            self.per_block.append(t1 - t0)
            self.fixed.append(t0 + self._p2p(s))
            self.max_blocks.append(self._max_blocks(s, group))

    def _mb_compute(self, spec: DeviceSpec, nb: int, first: bool, last: bool) -> float:
        sh = self.shape
        flops = 3 * (nb * sh.block_fwd_flops(self.tokens_mb, self.st.seq_len)
                     + (sh.embed_fwd_flops(self.tokens_mb) if first else 0.0)
                     + (sh.head_fwd_flops(self.mb_samples) if last else 0.0))
        return cm.compute_seconds(spec, flops, self._act_mb(nb, first, last), nb, 1, self.cal,
                                  _embed_bytes(sh) if first else 0.0)

    def _act_mb(self, nb: int, first: bool, last: bool) -> float:
        sh = self.shape
        return self.tokens_mb * FP32 * (nb * sh.block_saved_floats_per_token()
                                        + (sh.embed_saved_floats_per_token() if first else 0.0)
                                        + (sh.head_saved_floats_per_token() if last else 0.0))

    def p2p_one(self, s: int, other: int) -> float:
        """One boundary message from stage ``s`` to ``other`` (slowest replica's link)."""
        if not 0 <= other < self.n_stages:
            return 0.0
        return max(cm.p2p_s(self.msg, a.name, b.name, self.links)
                   for a, b in zip(self.groups[s], self.groups[other])) + self.cal.p2p_s

    def _p2p(self, s: int) -> float:
        """Stage ``s``'s messages per micro-batch: activations forward to the next
        stage, gradients backward to the previous one."""
        return self.p2p_one(s, s + 1) + self.p2p_one(s, s - 1)

    def in_flight(self, s: int) -> int:
        return self.m if self.st.schedule != "1f1b" else min(self.m, self.n_stages - s)

    def load(self, s: int, nb: int, replica: int) -> RankLoad:
        sh = self.shape
        first, last = s == 0, s == self.n_stages - 1
        params = (nb * sh.block_params() + (sh.embed_params() if first else 0)
                  + (sh.head_params() if last else 0))
        act_mb = self._act_mb(nb, first, last)
        flops_mb = 3 * (nb * sh.block_fwd_flops(self.tokens_mb, self.st.seq_len)
                        + (sh.embed_fwd_flops(self.tokens_mb) if first else 0.0)
                        + (sh.head_fwd_flops(self.mb_samples) if last else 0.0))
        # hybrid all-reduces flat buckets of <= 4 M elements; a bigger tensor goes alone
        bucket = max(min(params, HYBRID_BUCKET), _largest(sh, first)) if self.replicas > 1 else 0
        return RankLoad(params=params, bucket_params=bucket,
                        load_params=sh.total_params() if self.par in FULL_MODEL_AT_LOAD else 0,
                        largest_tensor=_largest(sh, first), n_tensors=_tensors(sh, nb, first, last),
                        saved_act_bytes=act_mb * self.in_flight(s), act_bytes_per_step=act_mb * self.m,
                        family=sh.family, flops_per_step=flops_mb * self.m, block_passes=nb * self.m,
                        embed_grad_bytes=_embed_bytes(sh) if first else 0.0,
                        micro_steps=self.m, peers=self.peers,
                        store=s == 0 and replica == 0 and self.peers > 0)

    def _max_blocks(self, s: int, group: list[DeviceSpec]) -> int:
        """Most blocks stage ``s`` can hold on every replica (memory grows with blocks)."""
        return min(self._fit(s, r, spec) for r, spec in enumerate(group))

    def _fit(self, s: int, replica: int, spec: DeviceSpec) -> int:
        """Binary search over block counts, memoised: devices of one kind repeat."""
        first, last = s == 0, s == self.n_stages - 1
        store = s == 0 and replica == 0 and self.peers > 0
        key = (self.par, self.shape, self.st.batch_size, self.st.seq_len, self.m, self.replicas, self.in_flight(s), first,
               last, store, self.peers, spec.mem_bytes, spec.mem_is_virtual, spec.threads, id(self.cal))
        hit = _FIT_CACHE.get(key)
        if hit is not None:
            return hit

        def ok(nb: int) -> bool:
            return not cm.memory_verdict(cm.rank_cost(self.load(s, nb, replica), spec, self.cal), spec).oom

        lo, hi = 0, self.shape.n_layer  # ok(lo) assumed, find the largest ok
        if ok(hi):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        if len(_FIT_CACHE) > 20000:
            _FIT_CACHE.clear()
        _FIT_CACHE[key] = lo
        return lo

    def time_of(self, s: int, a: int, b: int) -> float:
        return self.fixed[s] + self.per_block[s] * (b - a)

    def fits(self, s: int, a: int, b: int) -> bool:
        return b - a <= self.max_blocks[s]

    def split(self) -> Partition:
        return partition(self.n_stages, self.shape.n_layer, self.time_of, self.fits)


def eval_pipeline(par: str, shape: ModelShape, st: PlanSettings, specs: list[DeviceSpec], links: Links,
                  replicas: int = 1, stages: list[dict] | None = None,
                  cal: cm.Calibration = cm.CALIBRATION) -> Evaluation:
    """PP (``replicas=1``) or hybrid PP x DP with stage groups of ``replicas`` devices.

    ``stages`` (JobConfig format) fixes the split instead of partitioning; its ranks
    index ``specs``.
    """
    names = cm.names_of(specs)
    n = len(specs)
    if stages:
        groups = [[specs[r] for r in s["ranks"]] for s in stages]
        replicas = len(groups[0])
        if any(len(g) != replicas for g in groups):
            return Evaluation(par, False, f"{par.upper()}: stages with unequal replica counts", order=names)
    else:
        if n % replicas:
            return Evaluation(par, False, f"{par.upper()}: {n} devices do not form groups of {replicas}", order=names)
        groups = [specs[i:i + replicas] for i in range(0, n, replicas)]
    if len(groups) > shape.n_layer:
        return Evaluation(par, False, f"{par.upper()}: {len(groups)} stages > {shape.n_layer} blocks", order=names)
    m = st.micro_batches
    shares = {_share(st.batch_size, j, replicas) for j in range(replicas)}
    if m < 1 or any(b % m for b in shares):
        return Evaluation(par, False, f"{par.upper()}: batch share {min(shares)} does not split into {m} "
                          "equal micro-batches", order=names)
    if st.schedule == "1f1b" and m < len(groups):
        return Evaluation(par, False, f"{par.upper()}: 1F1B needs micro-batches >= stages ({m} < {len(groups)})",
                          order=names)
    pipe = _Pipeline(par, shape, st, groups, links, cal)
    if stages:
        part = Partition([s["layers"][0] for s in stages] + [stages[-1]["layers"][1]], 0.0,
                         all(pipe.fits(i, *s["layers"]) for i, s in enumerate(stages)))
        ranks = [list(s["ranks"]) for s in stages]
    else:
        part = pipe.split()
        ranks = [list(range(i * replicas, (i + 1) * replicas)) for i in range(len(groups))]
    return _pipeline_eval(par, pipe, part, ranks, names, specs, links, cal)


def _pipeline_eval(par: str, pipe: _Pipeline, part: Partition, ranks: list[list[int]], names: list[str],
                   specs: list[DeviceSpec], links: Links, cal: cm.Calibration) -> Evaluation:
    st, m, S = pipe.st, pipe.m, pipe.n_stages
    fwd, bwd = [], []
    for s, (a, b) in enumerate(part.ranges):
        comp = pipe.time_of(s, a, b) - pipe._p2p(s)
        p2p_next, p2p_prev = pipe.p2p_one(s, s + 1), pipe.p2p_one(s, s - 1)
        # backward is two thirds of the FLOPs (input and weight gradients)
        fwd.append(comp / 3 + p2p_next)
        bwd.append(2 * comp / 3 + p2p_prev)
    pipe_s = sum(fwd) + (m - 1) * max(fwd) + sum(bwd) + (m - 1) * max(bwd)
    loads = {r: pipe.load(s, b - a, i) for s, (a, b) in enumerate(part.ranges) for i, r in enumerate(ranks[s])}
    costs = {r: cm.rank_cost(loads[r], specs[r], cal) for r in loads}
    link_bytes: dict[str, float] = {}
    sync_s, sync_b = {}, {}
    for s in range(S):
        group = [names[r] for r in ranks[s]]
        nbytes = FP32 * loads[ranks[s][0]].params
        sync_s[s] = cm.ring_allreduce_s(nbytes, group, links)
        sync_b[s] = cm.allreduce_bytes_per_rank(nbytes, len(group))
        _ring_bytes(link_bytes, group, sync_b[s])
        if s + 1 < S:
            for a, b in zip(ranks[s], ranks[s + 1]):
                _add(link_bytes, names[a], names[b], m * pipe.msg)
                _add(link_bytes, names[b], names[a], m * pipe.msg)
    opt_s = max(c.optimizer_s for c in costs.values())
    step = pipe_s + max(sync_s.values()) + opt_s
    devices = []
    for s, (a, b) in enumerate(part.ranges):
        p2p = m * (pipe.p2p_one(s, s + 1) + pipe.p2p_one(s, s - 1))
        nbytes = m * pipe.msg * ((s + 1 < S) + (s > 0))
        for i, r in enumerate(ranks[s]):
            role = f"stage {s}" + (f" replica {i}" if pipe.replicas > 1 else "")
            devices.append(_predict(specs[r], r, role, loads[r], costs[r], p2p + sync_s[s], nbytes + sync_b[s],
                                    step, st.batch_size, stage=s, layers=[a, b]))
    devices.sort(key=lambda d: d.rank)
    crit_s = max(range(S), key=lambda s: fwd[s] + bwd[s])
    crit_compute = m * (fwd[crit_s] + bwd[crit_s])
    comm_crit = max(d.comm_s for d in devices)
    hops = [(names[a], names[b]) for s in range(S - 1) for a, b in zip(ranks[s], ranks[s + 1])]
    hops += [h for s in range(S) for h in cm.ring_links([names[r] for r in ranks[s]])]
    slow = min(hops, key=lambda h: links.bytes_per_s(*h)) if hops else None
    return Evaluation(
        par, True, order=names, devices=devices, step_s=step,
        stages=[{"ranks": list(ranks[s]), "layers": [a, b]} for s, (a, b) in enumerate(part.ranges)],
        parts={"compute_s": crit_compute, "optimizer_s": opt_s, "comm_s": comm_crit,
               "bubble_s": max(0.0, pipe_s - crit_compute)},
        link_bytes=link_bytes, slowest_link=(slow[0], slow[1], links.mbps(*slow)) if slow else None,
        critical=specs[ranks[crit_s][0]].name, reason="" if part.feasible else "no split fits every device's memory")


def hybrid_replica_options(n: int, n_layer: int) -> list[int]:
    """Group sizes R for hybrid: 1 < R < n, R divides n, n/R stages fit the blocks."""
    return [r for r in range(2, n) if n % r == 0 and 2 <= n // r <= n_layer]


def best_order(evaluate: Callable[[list[int]], Evaluation], specs: list[DeviceSpec]) -> tuple[list[int], Evaluation]:
    """A device order that lowers the step time (OOM-free first), via :func:`propose_order`."""
    cache: dict[tuple[int, ...], Evaluation] = {}

    def score(order: list[int]) -> float:
        key = tuple(order)
        if key not in cache:
            cache[key] = evaluate(order)
        ev = cache[key]
        if not ev.feasible:
            return float("inf")
        return ev.step_s * (1e6 if ev.oom else 1.0)

    keys = (lambda i: specs[i].gflops, lambda i: specs[i].mem_bytes or 0)
    # each evaluation partitions again: keep the search short for large device sets
    budget = 60 if len(specs) <= 16 else 8
    order, _ = propose_order(list(range(len(specs))), score, keys=keys, max_exhaustive=5, max_evals=budget)
    return order, cache[tuple(order)]
