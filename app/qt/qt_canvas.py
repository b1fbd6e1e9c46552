"""The topology canvas: one node per participant, in pipeline order, links between them.

The scene mirrors :class:`app.workspace.topology.Topology` through a model id -> item map and
never holds state of its own: a node item reads its node from the model when it paints.
Dragging a node moves it freely and shows where it would land; on release the scene
emits :attr:`QtTopologyScene.move_requested` and the owner pushes one undo command.  The
model's ``order_changed`` then lays every item out again (a refused move snaps back).

Nodes are laid out row-major in slots (a grid that wraps, so 64 devices stay usable);
the link from node *i* to *i+1* is labelled with the measured bandwidth.
"""
from __future__ import annotations

import math
from typing import Callable

from PySide6.QtCore import QPoint, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QFontMetrics, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import (
    QGraphicsItem,
    QGraphicsObject,
    QGraphicsScene,
    QGraphicsView,
    QStyleOptionGraphicsItem,
    QWidget,
)

from app.workspace.topology import Topology, TopologyNode

from .qt_style import MEM_BAR_COLOURS, MEM_COLOURS, STATUS_COLOURS, fmt_bytes

NODE_W, NODE_H = 184.0, 96.0
GAP_X, GAP_Y = 84.0, 52.0
SLOT_W, SLOT_H = NODE_W + GAP_X, NODE_H + GAP_Y


def columns_for(n: int) -> int:
    """Default slots per row (no view yet): one row up to 5 nodes, then a ~3:1 grid."""
    if n <= 5:
        return max(1, n)
    return max(5, math.ceil(math.sqrt(n * 3)))


MARGIN = GAP_X / 2 + 12  # room for the links that wrap around a row's ends


def scene_size(n: int, cols: int) -> tuple[float, float]:
    rows = max(1, math.ceil(max(n, 1) / cols))
    return cols * SLOT_W - GAP_X + 2 * MARGIN, rows * SLOT_H - GAP_Y + 2 * MARGIN


def best_columns(n: int, width: float, height: float) -> tuple[int, float]:
    """Columns that show ``n`` nodes largest in a ``width`` x ``height`` view, and the scale."""
    best = (1, 0.0)
    for cols in range(1, max(1, n) + 1):
        w, h = scene_size(n, cols)
        scale = min(width / w, height / h, 1.0)
        if scale >= best[1] - 1e-9:
            best = (cols, scale)
    return best


class QtNodeItem(QGraphicsObject):
    """A participant: name, role, layer range or shard, predicted memory vs capacity."""

    def __init__(self, scene: QtTopologyScene, node_id: str) -> None:
        super().__init__()
        self._scene_ref = scene
        self.node_id = node_id
        self.setFlags(QGraphicsItem.ItemIsMovable | QGraphicsItem.ItemIsSelectable)
        self.setAcceptHoverEvents(True)
        self.setCursor(Qt.OpenHandCursor)
        self.setZValue(1)
        self._pressed_at: QPointF | None = None

    def boundingRect(self) -> QRectF:
        return QRectF(-2, -2, NODE_W + 4, NODE_H + 4)

    def node(self) -> TopologyNode | None:
        return self._scene_ref.topology.node(self.node_id)

    def paint(self, p: QPainter, option: QStyleOptionGraphicsItem, widget: QWidget | None = None) -> None:
        node = self.node()
        if node is None:
            return  # the model dropped it; the scene removes the item right after
        fonts = self._scene_ref.fonts
        level = node.mem_level
        rect = QRectF(0, 0, NODE_W, NODE_H)
        if node.status == "lost":
            p.setOpacity(0.45)  # the run goes on without it: greyed out, still in its place
        border = QColor("#2f6fb5") if self.isSelected() else QColor("#9aa5b1")
        p.setPen(QPen(border, 2 if self.isSelected() else 1))
        p.setBrush(QBrush(QColor("#e9ecef") if node.status == "lost" else MEM_COLOURS[level]))
        p.drawRoundedRect(rect, 6, 6)
        # the device's colour: same as its chart curves
        p.setPen(Qt.NoPen)
        p.setBrush(self._scene_ref.colour_of(node.id))
        p.drawRoundedRect(QRectF(0, 0, 6, NODE_H), 3, 3)
        x = 13.0
        p.setPen(QColor("#1b1f24"))
        p.setFont(fonts["title"])
        title = QFontMetrics(fonts["title"]).elidedText(node.id, Qt.ElideRight, int(NODE_W - 70))
        p.drawText(QRectF(x, 5, NODE_W - 70, 18), Qt.AlignLeft | Qt.AlignVCenter, title)
        p.setFont(fonts["small"])
        p.setPen(QColor("#6c757d"))
        p.drawText(QRectF(NODE_W - 60, 5, 52, 18), Qt.AlignRight | Qt.AlignVCenter, f"rank {node.position}")
        p.setPen(QColor("#343a40"))
        p.drawText(QRectF(x, 24, NODE_W - x - 6, 16), Qt.AlignLeft | Qt.AlignVCenter, node.role)
        p.setPen(QColor("#495057"))
        p.drawText(QRectF(x, 40, NODE_W - x - 6, 16), Qt.AlignLeft | Qt.AlignVCenter, node.shard)
        if node.status:
            p.setPen(STATUS_COLOURS.get(node.status, QColor("#495057")))
            p.drawText(QRectF(x, 56, NODE_W - x - 6, 14), Qt.AlignLeft | Qt.AlignVCenter, f"● {node.status}")
        # predicted memory against capacity
        bar = QRectF(x, NODE_H - 22, NODE_W - x - 8, 8)
        p.setPen(Qt.NoPen)
        p.setBrush(QColor("#dee2e6"))
        p.drawRoundedRect(bar, 3, 3)
        frac = node.mem_fraction
        if frac is not None:
            p.setBrush(MEM_BAR_COLOURS[level])
            p.drawRoundedRect(QRectF(bar.x(), bar.y(), bar.width() * min(frac, 1.0), bar.height()), 3, 3)
        p.setPen(QColor("#b71c1c") if level == "oom" else QColor("#495057"))
        p.setFont(fonts["tiny"])
        if node.mem_pred_bytes is None:
            text = "memory: not planned"
        else:
            cap = fmt_bytes(node.mem_capacity_bytes) if node.mem_capacity_bytes else "no cap"
            text = f"{'OOM  ' if level == 'oom' else ''}{fmt_bytes(node.mem_pred_bytes)} / {cap}"
        p.drawText(QRectF(x, NODE_H - 13, NODE_W - x - 8, 12), Qt.AlignLeft | Qt.AlignVCenter, text)

    def contextMenuEvent(self, event) -> None:  # noqa: N802 - Qt override
        self._scene_ref.context_requested.emit(self.node_id, event.screenPos())
        event.accept()

    # ------------------------------------------------------------------ drag
    def mousePressEvent(self, event) -> None:  # noqa: N802 - Qt override
        self._pressed_at = self.pos()
        self.setZValue(10)
        self.setCursor(Qt.ClosedHandCursor)
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        super().mouseMoveEvent(event)
        self._scene_ref.drag_moved(self)

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        super().mouseReleaseEvent(event)
        self.setZValue(1)
        self.setCursor(Qt.OpenHandCursor)
        moved = self._pressed_at is not None and (self.pos() - self._pressed_at).manhattanLength() > 2
        self._pressed_at = None
        if moved:
            self._scene_ref.drag_finished(self)

    def hoverEnterEvent(self, event) -> None:  # noqa: N802
        node = self.node()
        if node is not None:
            self.setToolTip(self._scene_ref.tooltip_of(node))
        super().hoverEnterEvent(event)


class QtLinkItem(QGraphicsItem):
    """The link from slot ``i`` to slot ``i + 1``, labelled with its bandwidth."""

    def __init__(self, scene: QtTopologyScene, a: str, b: str, start: QPointF, end: QPointF, wrap_y: float | None):
        super().__init__()
        self._scene_ref, self.a, self.b = scene, a, b
        self.path = QPainterPath(start)
        if wrap_y is None:
            self.path.lineTo(end)
            self.label_at = QPointF((start.x() + end.x()) / 2, start.y() - 10)
        else:  # to the first slot of the next row: right, down, back left, down, in
            self.path.lineTo(start.x() + GAP_X / 2, start.y())
            self.path.lineTo(start.x() + GAP_X / 2, wrap_y)
            self.path.lineTo(end.x() - GAP_X / 2, wrap_y)
            self.path.lineTo(end.x() - GAP_X / 2, end.y())
            self.path.lineTo(end)
            self.label_at = QPointF(start.x() - NODE_W / 2, wrap_y - 8)
        self.setZValue(0)

    def label(self) -> str:
        mbps = self._scene_ref.bandwidth_of(self.a, self.b)
        if mbps is None:
            return "? Mbit/s"
        return f"{mbps / 1000:.2f} Gbit/s" if mbps >= 1000 else f"{mbps:.0f} Mbit/s"

    def boundingRect(self) -> QRectF:
        return self.path.boundingRect().united(QRectF(self.label_at.x() - 60, self.label_at.y() - 10, 120, 20)) \
            .adjusted(-4, -4, 4, 4)

    def paint(self, p: QPainter, option: QStyleOptionGraphicsItem, widget: QWidget | None = None) -> None:
        p.setPen(QPen(QColor("#7b8794"), 1.5))
        p.setBrush(Qt.NoBrush)
        p.drawPath(self.path)
        end = self.path.currentPosition()
        p.setBrush(QColor("#7b8794"))
        p.drawPolygon([end, end + QPointF(-7, -4), end + QPointF(-7, 4)])
        p.setFont(self._scene_ref.fonts["tiny"])
        p.setPen(QColor("#52606d"))
        p.drawText(QRectF(self.label_at.x() - 60, self.label_at.y() - 8, 120, 16), Qt.AlignCenter, self.label())


class QtTopologyScene(QGraphicsScene):
    """Mirrors a :class:`Topology`; emits ``move_requested(node_id, old, new)`` on a drop."""

    move_requested = Signal(str, int, int)
    context_requested = Signal(str, QPoint)   # a right-click on a node: its id, the global position
    relaid = Signal()   # the nodes were laid out again (the view refits)

    def __init__(self, topology: Topology, colour_of: Callable[[str], QColor] | None = None,
                 bandwidth_of: Callable[[str, str], float | None] | None = None,
                 parent=None) -> None:
        super().__init__(parent)
        self.topology = topology
        self.colour_of = colour_of or (lambda _id: QColor("#1f77b4"))
        self.bandwidth_of = bandwidth_of or (lambda _a, _b: None)
        self.tooltip_of: Callable[[TopologyNode], str] = lambda n: f"{n.id}: {n.role}, {n.shard}"
        self.locked = False
        self.columns: int | None = None   # set by the view to fit its shape; None: columns_for(n)
        base = QFont()
        self.fonts = {"title": QFont(base.family(), 10, QFont.Bold), "small": QFont(base.family(), 8),
                      "tiny": QFont(base.family(), 8)}
        self._items: dict[str, QtNodeItem] = {}
        self._links: list[QtLinkItem] = []
        self._marker = self.addRect(QRectF(0, 0, 4, NODE_H), QPen(Qt.NoPen), QBrush(QColor("#2f6fb5")))
        self._marker.setVisible(False)
        self._marker.setZValue(5)
        self.setBackgroundBrush(QColor("#fbfcfd"))
        self._conns = [(topology.node_added, self._on_added), (topology.node_removed, self._on_removed),
                       (topology.order_changed, self._on_order), (topology.node_changed, self._on_changed)]
        for sig, slot in self._conns:
            sig.connect(slot)
        for nid in topology.participants:
            self._on_added(nid)
        self.relayout()

    def detach(self) -> None:
        """Stop following the model (before the scene is deleted)."""
        for sig, slot in self._conns:
            sig.disconnect(slot)
        self._conns = []

    # ------------------------------------------------------------------ model -> items
    def item(self, node_id: str) -> QtNodeItem | None:
        return self._items.get(node_id)

    def items_by_id(self) -> dict[str, QtNodeItem]:
        return dict(self._items)

    def _on_added(self, node_id: str) -> None:
        if node_id in self._items:
            return
        item = QtNodeItem(self, node_id)
        item.setFlag(QGraphicsItem.ItemIsMovable, not self.locked)
        self._items[node_id] = item
        self.addItem(item)

    def _on_removed(self, node_id: str) -> None:
        item = self._items.pop(node_id, None)
        if item is not None:
            self.removeItem(item)

    def _on_order(self, _ids: list[str]) -> None:
        self.relayout()

    def _on_changed(self, node_id: str) -> None:
        item = self._items.get(node_id)
        if item is not None:
            item.update()

    # ------------------------------------------------------------------ layout
    def n_columns(self) -> int:
        n = len(self.topology)
        return max(1, min(self.columns, max(n, 1))) if self.columns else columns_for(n)

    def set_columns(self, cols: int | None) -> None:
        if cols != self.columns:
            self.columns = cols
            self.relayout()

    def slot_pos(self, index: int) -> QPointF:
        cols = self.n_columns()
        return QPointF((index % cols) * SLOT_W, (index // cols) * SLOT_H)

    def slot_at(self, center: QPointF) -> int:
        """The slot index nearest to a node centred at ``center``."""
        n = len(self.topology)
        cols = self.n_columns()
        col = max(0, min(cols - 1, round((center.x() - NODE_W / 2) / SLOT_W)))
        row = max(0, round((center.y() - NODE_H / 2) / SLOT_H))
        return max(0, min(n - 1, row * cols + col))

    def relayout(self) -> None:
        order = self.topology.participants
        for link in self._links:
            self.removeItem(link)
        self._links = []
        for i, nid in enumerate(order):
            item = self._items.get(nid)
            if item is not None:
                item.setPos(self.slot_pos(i))
                item.update()
        cols = self.n_columns()
        for i in range(len(order) - 1):
            a, b = self.slot_pos(i), self.slot_pos(i + 1)
            start = a + QPointF(NODE_W, NODE_H / 2)
            end = b + QPointF(0, NODE_H / 2)
            wrap = a.y() + NODE_H + GAP_Y / 2 if (i + 1) % cols == 0 else None
            link = QtLinkItem(self, order[i], order[i + 1], start, end, wrap)
            self._links.append(link)
            self.addItem(link)
        w, h = scene_size(len(order), cols)
        self.setSceneRect(QRectF(-MARGIN, -MARGIN, w, h))
        self._marker.setVisible(False)
        self.relaid.emit()

    def refresh(self) -> None:
        """Repaint every node and link (profiles or bandwidths changed)."""
        for item in self._items.values():
            item.update()
        for link in self._links:
            link.update()

    def set_locked(self, locked: bool) -> None:
        """Lock the order (during a run the ranks are fixed)."""
        self.locked = locked
        for item in self._items.values():
            item.setFlag(QGraphicsItem.ItemIsMovable, not locked)

    # ------------------------------------------------------------------ drag feedback
    def drag_moved(self, item: QtNodeItem) -> None:
        center = item.pos() + QPointF(NODE_W / 2, NODE_H / 2)
        target = self.slot_at(center)
        pos = self.slot_pos(target)
        self._marker.setRect(QRectF(pos.x() - GAP_X / 2 - 2, pos.y(), 4, NODE_H))
        self._marker.setVisible(True)

    def drag_finished(self, item: QtNodeItem) -> None:
        self._marker.setVisible(False)
        if item.node_id not in self.topology:
            return
        old = self.topology.index(item.node_id)
        new = self.slot_at(item.pos() + QPointF(NODE_W / 2, NODE_H / 2))
        if new != old and not self.locked:
            self.move_requested.emit(item.node_id, old, new)
        # if the model did not change (refused, same slot), put the node back in its slot
        if self.topology.participants and self.topology.index(item.node_id) == old:
            self.relayout()


class QtTopologyView(QGraphicsView):
    """Shows the scene scaled to fit (never enlarged, never below 35 %)."""

    def __init__(self, scene: QtTopologyScene, parent: QWidget | None = None) -> None:
        super().__init__(scene, parent)
        self.setRenderHint(QPainter.Antialiasing, True)
        self.setRenderHint(QPainter.TextAntialiasing, True)
        self.setViewportUpdateMode(QGraphicsView.SmartViewportUpdate)
        self.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        self.setMinimumHeight(150)
        self._fitting = False
        scene.relaid.connect(self.fit)

    def fit(self) -> None:
        """Pick the columns that show the nodes largest, then scale the scene to fit."""
        if self._fitting:
            return
        self._fitting = True
        try:
            scene = self.scene()
            vp = self.viewport().rect()
            if vp.width() < 50 or vp.height() < 50:
                return
            cols, _ = best_columns(len(scene.topology), vp.width(), vp.height())
            if not any(item.isUnderMouse() and item._pressed_at is not None for item in scene.items_by_id().values()):
                scene.set_columns(cols)  # never re-flow under a drag
            rect = self.sceneRect()
            scale = min(vp.width() / rect.width(), vp.height() / rect.height(), 1.0)
            self.resetTransform()
            self.scale(max(scale, 0.35), max(scale, 0.35))
        finally:
            self._fitting = False

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        self.fit()
