"""The run's topology: which devices take part, in which order, doing what.

A Qt-free model (the canvas in ``app/qt/qt_canvas.py`` only mirrors it).  The order of
the participants is the rank order the launcher uses, which for pipeline parallelism is
the stage order.  Each participant is a :class:`TopologyNode` whose ``id`` is the device
name (unique in the device list, stable across reorders).  Roles, layer ranges and
shards are derived from the order, the parallelism and the stage split on every change,
so a view never computes them.

Signals
-------
node_added(id)      a device became a participant
node_removed(id)    a device stopped being one
order_changed(ids)  the participant order changed (also after add/remove)
node_changed(id)    a node's role, layers, prediction or run status changed
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from app.signals import Signal
from workers.config import PARALLELISMS, Parallelism

#: Fraction of capacity above which a node is drawn as a warning.
WARN_FRACTION = 0.85


@dataclass
class TopologyNode:
    """One participant.

    Attributes
    ----------
    id
        The device name.
    position
        Rank (0-based): the place in the pipeline for pp/hybrid.
    stage, replica
        Pipeline stage and data-parallel replica index (``None`` when not applicable).
    role
        Human-readable role, e.g. ``"pipeline stage 2/4"`` or ``"DP replica 1/3"``.
    shard
        What part of the model this node holds: ``"layers 0-5"``, ``"all layers"``,
        ``"1/2 of every layer"``.
    layers
        ``(first, end)`` block range (end exclusive), ``None`` when the node holds a shard
        of every layer.
    mem_pred_bytes, mem_capacity_bytes, oom
        The planner's predicted peak memory, the device's usable memory and its verdict.
    status
        The device's status in the current run (``""`` when no run).
    """

    id: str
    position: int = 0
    stage: int | None = None
    replica: int | None = None
    role: str = ""
    shard: str = ""
    layers: tuple[int, int] | None = None
    mem_pred_bytes: int | None = None
    mem_capacity_bytes: int | None = None
    oom: bool = False
    status: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mem_fraction(self) -> float | None:
        """Predicted memory over capacity (``None`` when either is unknown)."""
        if not self.mem_pred_bytes or not self.mem_capacity_bytes:
            return None
        return self.mem_pred_bytes / self.mem_capacity_bytes

    @property
    def mem_level(self) -> str:
        """``ok``, ``warning``, ``oom`` or ``unknown``: what colour the node gets."""
        frac = self.mem_fraction
        if self.oom or (frac is not None and frac > 1.0):
            return "oom"
        if frac is None:
            return "unknown"
        return "warning" if frac >= WARN_FRACTION else "ok"


def even_split(n_blocks: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous near-equal block ranges (the first stages take the remainder)."""
    n_stages = max(1, n_stages)
    base, extra = divmod(n_blocks, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        out.append((start, end))
        start = end
    return out


class Topology:
    """Participants in rank/stage order plus what each one does.

    Parameters
    ----------
    parallelism
        A :class:`workers.config.Parallelism` (or its value).
    n_layers
        Transformer blocks of the model (for layer ranges when no stage split is given).
    """

    def __init__(self, parallelism: Parallelism | str = Parallelism.DP, n_layers: int = 0) -> None:
        self.node_added, self.node_removed = Signal(), Signal()
        self.order_changed, self.node_changed = Signal(), Signal()
        self._order: list[str] = []
        self._nodes: dict[str, TopologyNode] = {}
        self._parallelism = Parallelism(parallelism)
        self._n_layers = n_layers
        self._stages: list[dict] | None = None

    # ---------------------------------------------------------------- reading
    @property
    def participants(self) -> list[str]:
        """Node ids in rank (pipeline) order."""
        return list(self._order)

    @property
    def parallelism(self) -> Parallelism:
        return self._parallelism

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def stages(self) -> list[dict] | None:
        """The stage split in use (``{"ranks": [...], "layers": [a, b]}`` per stage)."""
        return [dict(s) for s in self._stages] if self._stages else None

    def nodes(self) -> list[TopologyNode]:
        return [self._nodes[i] for i in self._order]

    def node(self, node_id: str) -> TopologyNode | None:
        return self._nodes.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._order)

    def index(self, node_id: str) -> int:
        return self._order.index(node_id)

    # ---------------------------------------------------------------- membership
    def add(self, node_id: str, index: int | None = None) -> bool:
        """Make ``node_id`` a participant at ``index`` (default: last); False if it was one."""
        if node_id in self._nodes:
            return False
        index = len(self._order) if index is None else max(0, min(index, len(self._order)))
        self._order.insert(index, node_id)
        self._nodes[node_id] = TopologyNode(node_id)
        self._relabel()
        self.node_added.emit(node_id)
        self.order_changed.emit(self.participants)
        return True

    def remove(self, node_id: str) -> int | None:
        """Drop a participant; returns the index it had (``None`` if it was not one)."""
        if node_id not in self._nodes:
            return None
        index = self._order.index(node_id)
        self._order.remove(node_id)
        del self._nodes[node_id]
        self._relabel()
        self.node_removed.emit(node_id)
        self.order_changed.emit(self.participants)
        return index

    def set_participant(self, node_id: str, on: bool) -> bool:
        """Tick/untick a device; returns whether anything changed."""
        return self.add(node_id) if on else self.remove(node_id) is not None

    def set_participants(self, ids: Iterable[str]) -> None:
        """Exactly ``ids``, in that order (one ``order_changed`` at the end)."""
        ids = list(dict.fromkeys(ids))
        gone = [i for i in self._order if i not in ids]
        new = [i for i in ids if i not in self._nodes]
        for i in gone:
            del self._nodes[i]
        for i in new:
            self._nodes[i] = TopologyNode(i)
        changed = bool(gone or new) or ids != self._order
        self._order = ids
        self._relabel()
        for i in gone:
            self.node_removed.emit(i)
        for i in new:
            self.node_added.emit(i)
        if changed:
            self.order_changed.emit(self.participants)

    # ---------------------------------------------------------------- order
    def move(self, node_id: str, index: int) -> bool:
        """Move a participant to ``index`` (clamped); returns whether the order changed."""
        if node_id not in self._nodes:
            raise KeyError(f"{node_id!r} is not a participant")
        index = max(0, min(index, len(self._order) - 1))
        old = self._order.index(node_id)
        if old == index:
            return False
        self._order.pop(old)
        self._order.insert(index, node_id)
        self._relabel()
        self.order_changed.emit(self.participants)
        return True

    def set_order(self, ids: list[str]) -> bool:
        """Reorder to ``ids`` (the same participants); returns whether the order changed.

        Raises
        ------
        ValueError
            When ``ids`` is not a permutation of the participants.
        """
        if sorted(ids) != sorted(self._order):
            raise ValueError(f"new order {ids} does not hold the participants {self._order}")
        if ids == self._order:
            return False
        self._order = list(ids)
        self._relabel()
        self.order_changed.emit(self.participants)
        return True

    # ---------------------------------------------------------------- configuration
    def configure(self, parallelism: Parallelism | str | None = None, n_layers: int | None = None,
                  stages: list[dict] | None = None) -> None:
        """Set the parallelism, the model's block count and/or the stage split.

        ``stages`` (as the planner and ``workers.config`` spell them) is used only while it
        matches the number of participants; otherwise an even split is derived.
        """
        if parallelism is not None:
            if parallelism not in PARALLELISMS:
                raise ValueError(f"unknown parallelism {parallelism!r}; one of {', '.join(PARALLELISMS)}")
            self._parallelism = Parallelism(parallelism)
        if n_layers is not None:
            self._n_layers = n_layers
        self._stages = [dict(s) for s in stages] if stages else None
        self._relabel(emit=True)

    def set_prediction(self, node_id: str, mem_pred_bytes: int | None, mem_capacity_bytes: int | None,
                       oom: bool, **extra: Any) -> None:
        """Attach the planner's memory verdict to a node (unknown ids are ignored)."""
        node = self._nodes.get(node_id)
        if node is None:
            return  # a plan computed for a participant that is gone since: drop it
        new = (mem_pred_bytes, mem_capacity_bytes, bool(oom), {**node.extra, **extra})
        if new == (node.mem_pred_bytes, node.mem_capacity_bytes, node.oom, node.extra):
            return
        node.mem_pred_bytes, node.mem_capacity_bytes, node.oom, node.extra = new
        self.node_changed.emit(node_id)

    def clear_predictions(self) -> None:
        for node in self.nodes():
            self.set_prediction(node.id, None, None, False)

    def set_status(self, node_id: str, status: str) -> None:
        """The device's status in the running run (unknown ids are ignored)."""
        node = self._nodes.get(node_id)
        if node is None or node.status == status:
            return
        node.status = status
        self.node_changed.emit(node_id)

    # ---------------------------------------------------------------- roles
    def _stage_plan(self) -> list[dict]:
        """Stages matching the current participants (given, else an even split)."""
        n = len(self._order)
        if self._stages and sorted(r for s in self._stages for r in s.get("ranks", [])) == list(range(n)):
            return self._stages
        replicas = 1
        if self._parallelism == Parallelism.HYBRID and n >= 4 and n % 2 == 0:
            replicas = 2
        n_stages = max(1, n // replicas)
        return [{"ranks": list(range(s * replicas, (s + 1) * replicas)), "layers": list(rng)}
                for s, rng in enumerate(even_split(self._n_layers, n_stages))]

    def _relabel(self, emit: bool = False) -> None:
        """Recompute every node's position, role and shard from the order."""
        n = len(self._order)
        par = self._parallelism
        stages = self._stage_plan() if par.pipelined else []
        by_rank: dict[int, tuple[int, int, dict]] = {}
        for s, st in enumerate(stages):
            for r_i, rank in enumerate(st.get("ranks", [])):
                by_rank[rank] = (s, r_i, st)
        for pos, nid in enumerate(self._order):
            node = self._nodes[nid]
            before = (node.position, node.stage, node.replica, node.role, node.shard, node.layers)
            node.position = pos
            node.stage = node.replica = None
            node.layers = None
            if par.pipelined and pos in by_rank:
                s, r_i, st = by_rank[pos]
                lay = st.get("layers") or [0, 0]
                node.stage, node.layers = s, (int(lay[0]), int(lay[1]))
                first, last = int(lay[0]), int(lay[1]) - 1
                node.shard = (f"layers {first}–{last}" if last > first else f"layer {first}" if last == first
                              else "no layers")
                if par == Parallelism.HYBRID:
                    node.replica = r_i
                    node.role = f"stage {s + 1}/{len(stages)} · DP replica {r_i + 1}/{len(st['ranks'])}"
                else:
                    node.role = f"pipeline stage {s + 1}/{len(stages)}"
            elif par == "tp":
                node.role, node.shard = f"TP shard {pos + 1}/{n}", f"1/{n} of every layer"
            elif par == "sp":
                node.role, node.shard = f"SP shard {pos + 1}/{n}", f"sequence part {pos + 1}/{n}"
            else:
                node.replica = pos
                node.role, node.shard = f"DP replica {pos + 1}/{n}", "all layers"
                node.layers = (0, self._n_layers) if self._n_layers else None
            after = (node.position, node.stage, node.replica, node.role, node.shard, node.layers)
            if emit and after != before:
                self.node_changed.emit(nid)
