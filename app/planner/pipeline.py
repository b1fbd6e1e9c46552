"""Pipeline cost (pp and hybrid): the stage split, the schedule's bubble, activations in flight.

Contiguous block ranges per stage (:mod:`app.planner.partition`), the batch in
``micro_batches`` micro-batches, GPipe or 1F1B (same bubble; 1F1B keeps fewer
micro-batches' activations: ``stages - stage index``).  Hybrid runs ``R`` replicas of
every stage: replica ``r`` of every stage forms pipeline ``r`` on ``1/R`` of the batch, and
each stage's group all-reduces its gradients.

The memory knobs (:mod:`app.planner.knobs`) apply per stage: with activation
checkpointing a micro-batch in flight keeps only its blocks' inputs, and one block's
activations are recomputed at a time; the optimizer state follows the stage's tensors.
The split is memory-aware: a stage's block count is capped by what fits its devices
(the embedding stage also holds the tables and their optimizer state), so the
partitioner moves blocks off a stage the time-balanced split would overfill."""
from __future__ import annotations

from typing import Callable

from app.planner import costmodel as cm
from app.planner import knobs
from app.planner.costmodel import DeviceSpec, RankLoad
from app.planner.links import Links, allreduce_bytes_per_rank, p2p_s, ring_allreduce_s, ring_links
from app.planner.parallel import (
    FULL_MODEL_AT_LOAD,
    Evaluation,
    add_link_bytes,
    add_ring_bytes,
    embed_bytes,
    largest_tensor,
    predict_rank,
    rank_share,
    tensor_count,
    weights_and_state,
)
from app.planner.partition import Partition, partition, propose_order
from app.planner.shape import FP32, ModelShape
from workers.config import RunSettings, Schedule

HYBRID_BUCKET = 4 * 1024 * 1024   # workers.parallel.hybrid.BUCKET_ELEMS
#: Largest block count that fits, per (stage, device, settings): the order search asks often.
FIT_CACHE: dict[tuple, int] = {}


class _Pipeline:
    """Stage costs for the partitioner: O(1) time per (stage, a, b), memory as a cap
    on the number of blocks per stage (memory grows with blocks)."""

    def __init__(self, par: str, shape: ModelShape, st: RunSettings, groups: list[list[DeviceSpec]],
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
        produced = knobs.activation_bytes(self.shape, self.st, self.tokens_mb, nb, first, last)[2]
        # the embedding stage's sparse gradient costs nothing per micro-batch worth
        # modelling; it is made dense once per step (``densify_s``)
        return cm.compute_seconds(spec, self._flops_mb(nb, first, last), produced, nb, 1, self.cal)

    def densify_s(self) -> float:
        """The embedding stage's dense gradient, made from its sparse pieces after its
        last backward (slowest replica): nothing overlaps it."""
        return max(cm.densify_seconds(spec, embed_bytes(self.shape), self.cal) for spec in self.groups[0])

    def _flops_mb(self, nb: int, first: bool, last: bool) -> float:
        sh = self.shape
        return (knobs.block_flops_factor(self.st) * nb * sh.block_fwd_flops(self.tokens_mb, self.st.seq_len)
                + 3 * ((sh.embed_fwd_flops(self.tokens_mb) if first else 0.0)
                       + (sh.head_fwd_flops(self.mb_samples) if last else 0.0)))

    def p2p_one(self, s: int, other: int) -> float:
        """One boundary message from stage ``s`` to ``other`` (slowest replica's link)."""
        if not 0 <= other < self.n_stages:
            return 0.0
        # the fixed part is CPU work on the stage (gloo, the schedule's bookkeeping)
        return max(p2p_s(self.msg, a.name, b.name, self.links) + self.cal.p2p_s * cm.slowness(a, self.cal)
                   for a, b in zip(self.groups[s], self.groups[other]))

    def _p2p(self, s: int) -> float:
        """Stage ``s``'s messages per micro-batch: activations forward to the next
        stage, gradients backward to the previous one."""
        return self.p2p_one(s, s + 1) + self.p2p_one(s, s - 1)

    def in_flight(self, s: int) -> int:
        return self.m if self.st.schedule != Schedule.ONE_F_ONE_B else min(self.m, self.n_stages - s)

    def load(self, s: int, nb: int, replica: int) -> RankLoad:
        sh = self.shape
        first, last = s == 0, s == self.n_stages - 1
        params = (nb * sh.block_params() + (sh.embed_params() if first else 0)
                  + (sh.head_params() if last else 0))
        kept, transient, produced = knobs.activation_bytes(sh, self.st, self.tokens_mb, nb, first, last)
        flops_mb = self._flops_mb(nb, first, last)
        # hybrid all-reduces flat buckets of <= 4 M elements; a bigger tensor goes alone
        bucket = max(min(params, HYBRID_BUCKET), largest_tensor(sh, first)) if self.replicas > 1 else 0
        return RankLoad(params=params, bucket_params=bucket,
                        load_params=sh.total_params() if self.par in FULL_MODEL_AT_LOAD else 0,
                        largest_tensor=largest_tensor(sh, first), n_tensors=tensor_count(sh, nb, first, last),
                        # every micro-batch in flight keeps its part; a recompute is one at a time
                        saved_act_bytes=kept * self.in_flight(s) + transient, act_bytes_per_step=produced * self.m,
                        family=sh.family, flops_per_step=flops_mb * self.m, block_passes=nb * self.m,
                        embed_grad_bytes=embed_bytes(sh) if first else 0.0, sparse_embed=True,
                        micro_steps=self.m, peers=self.peers,
                        store=s == 0 and replica == 0 and self.peers > 0,
                        **weights_and_state(sh, self.st, params, nb, first, last))

    def _max_blocks(self, s: int, group: list[DeviceSpec]) -> int:
        """Most blocks stage ``s`` can hold on every replica (memory grows with blocks)."""
        return min(self._fit(s, r, spec) for r, spec in enumerate(group))

    def _fit(self, s: int, replica: int, spec: DeviceSpec) -> int:
        """Binary search over block counts, memoised: devices of one kind repeat."""
        first, last = s == 0, s == self.n_stages - 1
        store = s == 0 and replica == 0 and self.peers > 0
        key = (self.par, self.shape, self.st.batch_size, self.st.seq_len, self.m, self.replicas, self.in_flight(s), first,
               last, store, self.peers, spec.mem_bytes, spec.mem_is_virtual, spec.threads, id(self.cal),
               knobs.optimizer_of(self.st), knobs.checkpointing(self.st), knobs.precision_of(self.st))
        hit = FIT_CACHE.get(key)
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
        if len(FIT_CACHE) > 20000:
            FIT_CACHE.clear()
        FIT_CACHE[key] = lo
        return lo

    def time_of(self, s: int, a: int, b: int) -> float:
        return self.fixed[s] + self.per_block[s] * (b - a)

    def fits(self, s: int, a: int, b: int) -> bool:
        return b - a <= self.max_blocks[s]

    def split(self) -> Partition:
        return partition(self.n_stages, self.shape.n_layer, self.time_of, self.fits)


def eval_pipeline(par: str, shape: ModelShape, st: RunSettings, specs: list[DeviceSpec], links: Links,
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
    shares = {rank_share(st.batch_size, j, replicas) for j in range(replicas)}
    if m < 1 or any(b % m for b in shares):
        return Evaluation(par, False, f"{par.upper()}: batch share {min(shares)} does not split into {m} "
                          "equal micro-batches", order=names)
    if st.schedule == Schedule.ONE_F_ONE_B and m < len(groups):
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
        sync_s[s] = ring_allreduce_s(nbytes, group, links)
        sync_b[s] = allreduce_bytes_per_rank(nbytes, len(group))
        add_ring_bytes(link_bytes, group, sync_b[s])
        if s + 1 < S:
            for a, b in zip(ranks[s], ranks[s + 1]):
                add_link_bytes(link_bytes, names[a], names[b], m * pipe.msg)
                add_link_bytes(link_bytes, names[b], names[a], m * pipe.msg)
    opt_s = max(c.optimizer_s for c in costs.values())
    densify = pipe.densify_s()
    step = pipe_s + densify + max(sync_s.values()) + opt_s
    devices = []
    for s, (a, b) in enumerate(part.ranges):
        p2p = m * (pipe.p2p_one(s, s + 1) + pipe.p2p_one(s, s - 1))
        nbytes = m * pipe.msg * ((s + 1 < S) + (s > 0))
        for i, r in enumerate(ranks[s]):
            role = f"stage {s}" + (f" replica {i}" if pipe.replicas > 1 else "")
            devices.append(predict_rank(specs[r], r, role, loads[r], costs[r], p2p + sync_s[s], nbytes + sync_b[s],
                                    step, st.batch_size, stage=s, layers=[a, b]))
    devices.sort(key=lambda d: d.rank)
    crit_s = max(range(S), key=lambda s: fwd[s] + bwd[s])
    crit_compute = m * (fwd[crit_s] + bwd[crit_s])
    comm_crit = max(d.comm_s for d in devices)
    hops = [(names[a], names[b]) for s in range(S - 1) for a, b in zip(ranks[s], ranks[s + 1])]
    hops += [h for s in range(S) for h in ring_links([names[r] for r in ranks[s]])]
    slow = min(hops, key=lambda h: links.bytes_per_s(*h)) if hops else None
    return Evaluation(
        par, True, order=names, devices=devices, step_s=step,
        stages=[{"ranks": list(ranks[s]), "layers": [a, b]} for s, (a, b) in enumerate(part.ranges)],
        parts={"compute_s": crit_compute + densify, "optimizer_s": opt_s, "comm_s": comm_crit,
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
