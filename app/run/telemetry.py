"""Controller side of telemetry v1: turn worker stdout lines into validated records.

The schema itself is defined once, in ``workers.protocol``.  A malformed line never
stops a run: it is counted per device and the first few are logged with the reason.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from workers.protocol import VERSION, ProtocolError, parse_line

log = logging.getLogger("edgetrain.telemetry")
__all__ = ["TelemetryParser", "ProtocolError", "VERSION"]


@dataclass
class TelemetryParser:
    """Parses lines, counting rejects per device; keeps the first reasons for the record."""

    max_logged: int = 5
    rejected: Counter = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)

    def feed(self, device: str, line: str) -> dict | None:
        """Return the record of a telemetry line, or ``None`` for anything else.

        Lines that do not look like JSON (library warnings, prints) are ignored;
        JSON lines that break the schema are rejected, counted and logged.
        """
        text = line.strip()
        if not text:
            return None
        if not text.startswith("{"):
            return None
        try:
            rec = parse_line(text)
        except ProtocolError as exc:
            self.rejected[device] += 1
            if len(self.reasons) < self.max_logged:
                self.reasons.append(f"{device}: {exc}")
                log.warning("rejected telemetry line from %s: %s", device, exc)
            return None
        if rec["device"] != device:
            # a worker must speak for the device it runs on; anything else is a bug or spoof
            self.rejected[device] += 1
            if len(self.reasons) < self.max_logged:
                self.reasons.append(f"{device}: record claims device {rec['device']!r}")
            return None
        return rec

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())
