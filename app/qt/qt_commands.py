"""Undoable gestures on the topology (one :class:`QUndoCommand` per gesture).

A gesture never touches the model directly: it pushes a command, the command changes the
:class:`app.workspace.topology.Topology`, and the views follow the model's signals.  A drag is
one :class:`QtMoveNodeCommand`, pushed on mouse release.
"""
from __future__ import annotations

from PySide6.QtGui import QUndoCommand

from app.workspace.topology import Topology


class QtMoveNodeCommand(QUndoCommand):
    """Move one participant from ``old`` to ``new`` in the stage order."""

    def __init__(self, topology: Topology, node_id: str, old: int, new: int) -> None:
        super().__init__(f"Move {node_id} to position {new + 1}")
        self.topology, self.node_id, self.old, self.new = topology, node_id, old, new

    def redo(self) -> None:
        if self.node_id in self.topology:
            self.topology.move(self.node_id, self.new)

    def undo(self) -> None:
        if self.node_id in self.topology:
            self.topology.move(self.node_id, self.old)


class QtSetParticipantCommand(QUndoCommand):
    """Tick (``on``) or untick a device; undo puts it back where it was."""

    def __init__(self, topology: Topology, node_id: str, on: bool) -> None:
        super().__init__(f"{'Add' if on else 'Remove'} {node_id}")
        self.topology, self.node_id, self.on = topology, node_id, on
        self.index = topology.index(node_id) if node_id in topology else None

    def redo(self) -> None:
        if self.on:
            self.topology.add(self.node_id, self.index)
        else:
            self.index = self.topology.remove(self.node_id)

    def undo(self) -> None:
        if self.on:
            self.topology.remove(self.node_id)
        else:
            self.topology.add(self.node_id, self.index)


class QtSetOrderCommand(QUndoCommand):
    """Replace the whole order (auto-arrange, loading a session)."""

    def __init__(self, topology: Topology, new: list[str], text: str = "Auto-arrange") -> None:
        super().__init__(text)
        self.topology, self.old, self.new = topology, topology.participants, list(new)

    def redo(self) -> None:
        if sorted(self.new) == sorted(self.topology.participants):
            self.topology.set_order(self.new)

    def undo(self) -> None:
        if sorted(self.old) == sorted(self.topology.participants):
            self.topology.set_order(self.old)
