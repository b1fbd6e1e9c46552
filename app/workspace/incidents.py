"""The recovery timeline as a model the views follow: run events in, timeline marks out.

The GUI receives run events as plain dicts (queued from the asyncio thread); this keeps
them and recomputes the marks with :func:`app.run.timeline.recovery_timeline`, the same
function the CLI prints from, so the two never tell a different story.
"""
from __future__ import annotations

import time
from typing import Any

from app.run.runstate import RunEvent
from app.run.timeline import Mark, recovery_timeline


class Incidents:
    """Run events of one run and the recovery marks they make."""

    def __init__(self) -> None:
        self._events: list[RunEvent] = []
        self.marks: list[Mark] = []

    def add(self, ev: dict[str, Any]) -> bool:
        """Take one run event (``t``, ``device``, ``kind``, ``message``); returns whether
        the marks changed."""
        self._events.append(RunEvent(float(ev.get("t") or time.time()), ev.get("device"),
                                     str(ev.get("kind") or "info"), str(ev.get("message") or "")))
        marks = recovery_timeline(self._events)
        changed = marks != self.marks
        self.marks = marks
        return changed

    def clear(self) -> None:
        self._events, self.marks = [], []
