"""A minimal Qt-free signal: models announce changes, views subscribe.

The Qt layer bridges these to queued Qt signals when they fire on a worker thread.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("edgetrain.signals")


class Signal:
    """Ordered list of callbacks; an exception in one is logged, never breaks the others."""

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> Callable[..., Any]:
        if slot not in self._slots:
            self._slots.append(slot)
        return slot

    def disconnect(self, slot: Callable[..., Any]) -> None:
        if slot in self._slots:
            self._slots.remove(slot)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            try:
                slot(*args)
            except Exception:  # noqa: BLE001 - a broken view must not stop the run
                log.exception("signal slot %r failed", slot)
