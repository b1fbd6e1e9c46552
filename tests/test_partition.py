"""The stage partitioner: min-max DP against brute force, speed and memory heterogeneity."""
from __future__ import annotations

import random

import pytest

from app.planner.costmodel import GIB, DeviceSpec
from app.planner.links import Links
from app.planner.partition import brute_force, partition, propose_order, stages_json
from app.planner.plan import make_plan
from workers.config import JobConfig, RunSettings


def _random_case(rng: random.Random, n_stages: int, n_blocks: int):
    speed = [rng.uniform(0.5, 3.0) for _ in range(n_stages)]
    fixed = [rng.uniform(0.0, 2.0) for _ in range(n_stages)]
    cost = [rng.uniform(0.5, 2.0) for _ in range(n_blocks)]
    cap = [rng.randint(1, n_blocks) for _ in range(n_stages)]

    def time_of(s: int, a: int, b: int) -> float:
        return fixed[s] + sum(cost[a:b]) / speed[s]

    def fits(s: int, a: int, b: int) -> bool:
        return b - a <= cap[s]

    return time_of, fits


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    n_stages = rng.randint(1, 5)
    n_blocks = rng.randint(n_stages, 10)
    time_of, fits = _random_case(rng, n_stages, n_blocks)
    for f in (None, fits):
        got = partition(n_stages, n_blocks, time_of, f)
        want = brute_force(n_stages, n_blocks, time_of, f)
        if want is None:
            assert not got.feasible
            continue
        assert got.feasible
        assert got.bottleneck == pytest.approx(want.bottleneck, rel=1e-12)
        ranges = got.ranges
        assert got.bounds[0] == 0 and got.bounds[-1] == n_blocks
        assert all(b > a for a, b in ranges)
        assert max(time_of(s, a, b) for s, (a, b) in enumerate(ranges)) == pytest.approx(got.bottleneck)
        if f is not None:
            assert all(f(s, a, b) for s, (a, b) in enumerate(ranges))


def test_infeasible_memory_falls_back_to_fastest_split():
    part = partition(3, 6, lambda s, a, b: b - a, lambda s, a, b: b - a <= 1)
    assert not part.feasible
    assert part.bounds == [0, 2, 4, 6]


def test_more_stages_than_blocks_is_an_error():
    with pytest.raises(ValueError, match="at least one block"):
        partition(5, 4, lambda s, a, b: 1.0)


def _spec(name: str, gflops: float = 200.0, mem: int | None = None) -> DeviceSpec:
    return DeviceSpec(name, gflops=gflops, mem_bytes=mem, threads=1)


def _blocks(plan) -> list[int]:
    return [s["layers"][1] - s["layers"][0] for s in plan.stages]


def test_twice_as_fast_device_gets_about_twice_the_layers():
    # 8 : 4 of gpt2-s's 12 blocks, give or take the stage holding the embeddings
    # (their dense gradient costs time): 9 : 3 when the slow device holds them
    specs = [_spec("slow", 100.0), _spec("fast", 200.0)]
    plan = make_plan("gpt2-s", "pp", specs, Links(default_mbps=1e5), RunSettings(batch_size=32), propose=False)
    slow, fast = _blocks(plan)
    assert slow + fast == 12
    assert (slow, fast) in ((4, 8), (3, 9))
    plan = make_plan("gpt2-s", "pp", specs[::-1], Links(default_mbps=1e5), RunSettings(batch_size=32), propose=False)
    fast, slow = _blocks(plan)
    assert (slow, fast) in ((4, 8), (5, 7))


def test_proportional_over_four_devices():
    specs = [_spec("a", 100.0), _spec("b", 300.0), _spec("c", 200.0), _spec("d", 100.0)]
    plan = make_plan("gpt2-l", "pp", specs, Links(default_mbps=1e5), RunSettings(batch_size=32), propose=False)
    blocks = _blocks(plan)
    assert sum(blocks) == 36
    # 1 : 3 : 2 : 1 of 36 blocks is about 5 : 15 : 10 : 5
    for got, want in zip(blocks, (36 / 7, 3 * 36 / 7, 2 * 36 / 7, 36 / 7)):
        assert abs(got - want) <= 1.5


def test_device_with_little_memory_gets_fewer_layers():
    free = [_spec("a"), _spec("b")]
    even = _blocks(make_plan("gpt2-s", "pp", free, settings=RunSettings(batch_size=32), propose=False))
    assert even in ([6, 6], [5, 7], [7, 5])
    small = [_spec("a"), _spec("b", mem=int(1.6 * GIB))]
    plan = make_plan("gpt2-s", "pp", small, settings=RunSettings(batch_size=32), propose=False)
    blocks = _blocks(plan)
    assert blocks[1] < even[1]
    assert not plan.oom and plan.feasible
    assert plan.predictions[1].margin is not None and plan.predictions[1].margin >= 0


def test_no_split_fits_reports_oom_with_the_fastest_split():
    specs = [_spec("a", mem=int(1.2 * GIB)), _spec("b", mem=int(1.2 * GIB))]
    plan = make_plan("gpt2-s", "pp", specs, settings=RunSettings(batch_size=32), propose=False)
    assert plan.oom and not plan.feasible
    assert sum(_blocks(plan)) == 12


def test_proposed_order_moves_the_big_memory_device_to_the_embedding_stage():
    # the embeddings (39 M parameters) sit on stage 0: a small first device cannot hold them
    # (with their gradients and AdamW state, ~0.6 GiB, and the ~0.4 GiB runtime)
    specs = [_spec("small", mem=int(0.8 * GIB)), _spec("big1", mem=16 * GIB), _spec("big2", mem=16 * GIB)]
    plan = make_plan("gpt2-s", "pp", specs, settings=RunSettings(batch_size=8))
    assert plan.proposed_order is not None
    assert plan.proposed_order[0] != "small"
    assert plan.devices == ["small", "big1", "big2"]  # proposed, not applied


def test_propose_order_local_search_for_many_devices():
    values = {i: float(i) for i in range(10)}

    def evaluate(order: list[int]) -> float:  # best when sorted ascending
        return sum(abs(o - i) * values[o] for i, o in enumerate(order))

    start = [9, 1, 2, 3, 4, 5, 6, 7, 8, 0]
    order, v = propose_order(start, evaluate, keys=(lambda i: values[i],))
    assert order == list(range(10)) and v == 0


def test_stages_json_is_what_jobconfig_validates():
    part = partition(3, 6, lambda s, a, b: float(b - a))
    stages = stages_json(part, [[0], [1], [2]])
    assert stages == [{"ranks": [0], "layers": [0, 2]}, {"ranks": [1], "layers": [2, 4]},
                      {"ranks": [2], "layers": [4, 6]}]
    job = JobConfig(run_id="x", world_size=3, master_addr="127.0.0.1", master_port=1, addrs=["a"] * 3,
                    devices=["a", "b", "c"], parallelism="pp", stages=stages)
    job.validate()


def test_hybrid_chooses_stage_groups_of_equal_size():
    specs = [_spec(f"d{i}") for i in range(8)]
    plan = make_plan("gpt2-s", "hybrid", specs, settings=RunSettings(batch_size=64), propose=False)
    sizes = {len(s["ranks"]) for s in plan.stages}
    assert len(sizes) == 1 and 1 < sizes.pop() < 8
    ranks = sorted(r for s in plan.stages for r in s["ranks"])
    assert ranks == list(range(8))
    assert sum(_blocks(plan)) == 12
