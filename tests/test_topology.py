"""The Qt-free topology model: membership, order, roles, predictions, signals."""
from __future__ import annotations

import pytest

from app.workspace.topology import Topology, even_split


def recorder(topo: Topology) -> list[tuple]:
    log: list[tuple] = []
    topo.node_added.connect(lambda i: log.append(("added", i)))
    topo.node_removed.connect(lambda i: log.append(("removed", i)))
    topo.order_changed.connect(lambda ids: log.append(("order", tuple(ids))))
    topo.node_changed.connect(lambda i: log.append(("changed", i)))
    return log


def test_add_remove_move_and_signals():
    topo = Topology("dp", 4)
    log = recorder(topo)
    assert topo.add("a") and topo.add("b") and topo.add("c")
    assert not topo.add("a")
    assert topo.participants == ["a", "b", "c"]
    assert ("added", "c") in log and log[-1] == ("order", ("a", "b", "c"))
    assert topo.move("a", 2)
    assert topo.participants == ["b", "c", "a"]
    assert not topo.move("a", 2)                      # no change, no signal
    assert topo.move("a", 99) is False                # clamped to the end: unchanged
    assert topo.remove("c") == 1
    assert topo.remove("zzz") is None
    assert topo.participants == ["b", "a"]
    assert [n.position for n in topo.nodes()] == [0, 1]
    with pytest.raises(KeyError):
        topo.move("c", 0)


def test_set_participants_and_order():
    topo = Topology("pp", 6)
    topo.set_participants(["x", "y", "z"])
    log = recorder(topo)
    topo.set_participants(["z", "y", "w"])
    assert topo.participants == ["z", "y", "w"]
    assert ("removed", "x") in log and ("added", "w") in log
    assert topo.set_order(["w", "z", "y"])
    assert topo.participants == ["w", "z", "y"]
    with pytest.raises(ValueError):
        topo.set_order(["w", "z"])


def test_pipeline_roles_follow_the_order():
    topo = Topology("pp", 12)
    topo.set_participants(["a", "b", "c", "d"])
    nodes = {n.id: n for n in topo.nodes()}
    assert nodes["a"].role == "pipeline stage 1/4" and nodes["a"].layers == (0, 3)
    assert nodes["d"].shard == "layers 9–11"
    topo.move("d", 0)
    d = topo.node("d")
    assert d.stage == 0 and d.layers == (0, 3) and d.role.startswith("pipeline stage 1/")


def test_planner_stages_are_used_while_they_match():
    topo = Topology("pp", 12)
    topo.set_participants(["a", "b"])
    topo.configure(stages=[{"ranks": [0], "layers": [0, 2]}, {"ranks": [1], "layers": [2, 12]}])
    assert topo.node("a").layers == (0, 2) and topo.node("b").layers == (2, 12)
    topo.add("c")  # three participants: the two-stage split no longer fits, an even one is used
    assert [n.layers for n in topo.nodes()] == [(0, 4), (4, 8), (8, 12)]


def test_other_parallelisms():
    topo = Topology("hybrid", 8)
    topo.set_participants(["a", "b", "c", "d"])
    a, c = topo.node("a"), topo.node("c")
    assert (a.stage, a.replica) == (0, 0) and (c.stage, c.replica) == (1, 0)
    assert "DP replica" in topo.node("b").role
    topo.configure(parallelism="tp")
    assert topo.node("b").role == "TP shard 2/4" and topo.node("b").shard == "1/4 of every layer"
    topo.configure(parallelism="sp")
    assert topo.node("d").role == "SP shard 4/4"
    topo.configure(parallelism="dp")
    assert topo.node("a").role == "DP replica 1/4" and topo.node("a").shard == "all layers"
    with pytest.raises(ValueError):
        topo.configure(parallelism="zz")


def test_predictions_levels_and_unknown_ids():
    topo = Topology("dp", 4)
    topo.set_participants(["a"])
    log = recorder(topo)
    topo.set_prediction("a", 500, 1000, False)
    assert topo.node("a").mem_level == "ok"
    topo.set_prediction("a", 900, 1000, False)
    assert topo.node("a").mem_level == "warning"
    topo.set_prediction("a", 1100, 1000, True)
    assert topo.node("a").mem_level == "oom"
    assert log.count(("changed", "a")) == 3
    topo.set_prediction("gone", 1, 2, False)   # a result for a node that is gone: dropped
    topo.set_status("gone", "running")
    topo.set_status("a", "running")
    assert topo.node("a").status == "running"
    assert topo.node("a").mem_fraction == pytest.approx(1.1)


def test_even_split():
    assert even_split(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    assert even_split(4, 1) == [(0, 4)]


def test_64_nodes_reorder():
    topo = Topology("pp", 36)
    names = [f"n{i}" for i in range(64)]
    topo.set_participants(names)
    topo.move("n63", 0)
    assert topo.participants[0] == "n63" and topo.node("n63").stage == 0
    assert sum(n.layers[1] - n.layers[0] for n in topo.nodes()) == 36
