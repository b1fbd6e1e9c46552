"""Contiguous layer ranges per pipeline stage: min-max dynamic programming.

Stage ``s`` (in the user's device order) gets blocks ``[a_s, a_{s+1})``; stage 0 also
holds the embeddings and the last stage the head.  The objective is the bottleneck,
the slowest stage's time per micro-batch, subject to every stage fitting its device's
memory.  The caller supplies both as functions of ``(stage, a, b)`` (O(1) each, from
prefix sums), so this module knows nothing about models or devices:

    best[s][j] = min over i of max(best[s-1][i], time(s-1, i, j))   if fits(s-1, i, j)

``O(S * L^2)`` evaluations: 64 stages x 36 blocks is ~40k, a few ms in Python.
:func:`brute_force` enumerates every split (small cases, for the tests);
:func:`propose_order` searches device orders with the same DP.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

StageTime = Callable[[int, int, int], float]
StageFits = Callable[[int, int, int], bool]
INF = math.inf


@dataclass
class Partition:
    """Block boundaries ``bounds`` (``len = stages + 1``, ``bounds[0] = 0``) and the
    bottleneck time; ``feasible`` is False when no split fits every device's memory
    (then ``bounds`` is the fastest split ignoring memory, so a plan can still be shown
    with its OOM flags)."""

    bounds: list[int]
    bottleneck: float
    feasible: bool

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))


def _solve(n_stages: int, n_blocks: int, time_of: StageTime, fits: StageFits | None) -> Partition | None:
    if n_stages < 1 or n_blocks < n_stages:
        return None
    # best[s][j]: bottleneck of stages 0..s-1 covering blocks [0, j); arg[s][j] the split
    best = [[INF] * (n_blocks + 1) for _ in range(n_stages + 1)]
    arg = [[-1] * (n_blocks + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        # every later stage needs at least one block: j <= n_blocks - (n_stages - s)
        j_lo, j_hi = s, n_blocks - (n_stages - s)
        for j in range(j_lo, j_hi + 1):
            row_prev = best[s - 1]
            b, a = INF, -1
            for i in range(s - 1, j):
                prev = row_prev[i]
                if prev >= b:
                    continue
                if fits is not None and not fits(s - 1, i, j):
                    continue
                t = time_of(s - 1, i, j)
                cand = prev if prev > t else t
                if cand < b:
                    b, a = cand, i
            best[s][j], arg[s][j] = b, a
    if best[n_stages][n_blocks] == INF:
        return None
    bounds = [n_blocks]
    j = n_blocks
    for s in range(n_stages, 0, -1):
        j = arg[s][j]
        bounds.append(j)
    bounds.reverse()
    return Partition(bounds, best[n_stages][n_blocks], True)


def partition(n_stages: int, n_blocks: int, time_of: StageTime, fits: StageFits | None = None) -> Partition:
    """Contiguous split of ``n_blocks`` blocks over ``n_stages`` stages (in order).

    Parameters
    ----------
    n_stages, n_blocks
        Each stage gets at least one block, so ``n_blocks >= n_stages``.
    time_of
        ``time_of(stage, a, b)``: the stage's time per micro-batch with blocks ``[a, b)``.
    fits
        ``fits(stage, a, b)``: whether that fits the stage's memory (``None``: always).

    Returns
    -------
    Partition
        The min-max split that fits; when none fits, the fastest split with
        ``feasible=False``.

    Raises
    ------
    ValueError
        When there are fewer blocks than stages.
    """
    if n_blocks < n_stages or n_stages < 1:
        raise ValueError(f"cannot split {n_blocks} blocks over {n_stages} pipeline stages "
                         "(every stage needs at least one block)")
    part = _solve(n_stages, n_blocks, time_of, fits)
    if part is not None:
        return part
    part = _solve(n_stages, n_blocks, time_of, None)
    assert part is not None
    part.feasible = False
    return part


def brute_force(n_stages: int, n_blocks: int, time_of: StageTime, fits: StageFits | None = None) -> Partition | None:
    """Every contiguous split, for checking :func:`partition` on small cases."""
    best: Partition | None = None
    for cuts in itertools.combinations(range(1, n_blocks), n_stages - 1):
        bounds = [0, *cuts, n_blocks]
        ranges = list(zip(bounds[:-1], bounds[1:]))
        if fits is not None and not all(fits(s, a, b) for s, (a, b) in enumerate(ranges)):
            continue
        t = max(time_of(s, a, b) for s, (a, b) in enumerate(ranges))
        if best is None or t < best.bottleneck:
            best = Partition(bounds, t, True)
    return best


def stages_json(part: Partition, ranks_per_stage: Sequence[Sequence[int]]) -> list[dict]:
    """``JobConfig.stages``: ``[{"ranks": [...], "layers": [a, b]}, ...]`` in stage order."""
    return [{"ranks": list(r), "layers": [a, b]} for r, (a, b) in zip(ranks_per_stage, part.ranges)]


def propose_order(items: Sequence[int], evaluate: Callable[[list[int]], float],
                  keys: Sequence[Callable[[int], float]] = (), max_exhaustive: int = 6,
                  max_evals: int = 400) -> tuple[list[int], float]:
    """A device order with a lower bottleneck than ``items``' own, if one is found.

    Tries every permutation for up to ``max_exhaustive`` devices; otherwise the given
    order, the orders sorted by each of ``keys`` (both directions), then adjacent swaps
    from the best so far (first improvement), within ``max_evals`` evaluations.

    Parameters
    ----------
    items
        Device indices in the user's order.
    evaluate
        Bottleneck (lower is better, ``inf`` when infeasible) of an order.
    keys
        Sort keys to seed the search (e.g. speed, memory).

    Returns
    -------
    (order, value)
        The best order found and its value (the user's order when nothing is better).
    """
    start = list(items)
    best, best_v = start, evaluate(start)
    evals = 1
    if len(start) <= max_exhaustive:
        for perm in itertools.permutations(start):
            v = evaluate(list(perm))
            if v < best_v - 1e-12:
                best, best_v = list(perm), v
        return best, best_v
    for key in keys:
        for rev in (False, True):
            cand = sorted(start, key=key, reverse=rev)
            v = evaluate(cand)
            evals += 1
            if v < best_v - 1e-12:
                best, best_v = cand, v
    improved = True
    while improved and evals < max_evals:
        improved = False
        for i in range(len(best) - 1):
            cand = best[:i] + [best[i + 1], best[i]] + best[i + 2:]
            v = evaluate(cand)
            evals += 1
            if v < best_v - 1e-12:
                best, best_v, improved = cand, v, True
            if evals >= max_evals:
                break
    return best, best_v
