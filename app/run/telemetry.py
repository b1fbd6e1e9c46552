"""Controller side of telemetry v1: turn worker stdout lines into validated records.

The schema itself is defined once, in ``workers.protocol``; on top of it every number is
checked here before the controller believes it (:func:`check_values`): finite, not
negative where it cannot be, within sane bounds, and the rank the sender was started
with.  A rejected line never stops a run: it is counted per device and per reason
(:class:`Reject`), the first few are logged with the reason, and a run state that
listens (``on_reject``) puts the counts in the run record.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from workers.protocol import VERSION, ProtocolError, parse_line

log = logging.getLogger("edgetrain.telemetry")
__all__ = ["TelemetryParser", "ProtocolError", "VERSION", "Reject", "check_values", "BadValue"]

DAY_S = 86_400.0
#: No edge device (nor a checkpoint of one) holds 16 TiB: a larger byte count is garbage.
MAX_BYTES = 16 * 2**40
MAX_COUNT = 10**12        # steps, samples: a trillion is far past any run
MAX_RANKS = 1 << 16


class Reject(StrEnum):
    """Why a telemetry line was not believed (the run record counts each per device)."""

    SCHEMA = "schema"              # not protocol v1: a field missing or of the wrong type
    NOT_FINITE = "not finite"      # NaN or infinity where a measurement belongs
    NEGATIVE = "negative"          # a latency, count, energy, size ... below zero
    OUT_OF_RANGE = "out of range"  # beyond what any real run reports (a day-long step, 16 TiB)
    RANK = "rank"                  # a rank outside the world, or not the sender's own
    DEVICE = "device"              # a record claiming to come from another device
    NOT_APPLIED = "not applied"    # valid, but the run state could not apply it


#: Numeric fields and the closed range each must lie in (``None`` or absent is fine for
#: the optional ones; ``workers.protocol`` already requires the required ones).
BOUNDS: dict[str, tuple[float, float]] = {
    "t": (0.0, 1e11),                   # unix seconds: up to the year 5138
    "world_size": (1, MAX_RANKS),
    "pid": (1, 2**31 - 1),
    "step": (0, MAX_COUNT), "steps": (0, MAX_COUNT),
    "samples": (0, MAX_COUNT), "local_samples": (0, MAX_COUNT),
    "latency_s": (0.0, DAY_S), "latency_per_sample_s": (0.0, DAY_S), "comm_s": (0.0, DAY_S),
    "cpu_s": (0.0, DAY_S), "period_s": (0.0, DAY_S),
    "seconds": (0.0, DAY_S),            # one evaluation, checkpoint save or resume
    "wall_s": (0.0, 366 * DAY_S),       # a whole run may take days
    "throughput_sps": (0.0, 1e9),
    "energy_j": (0.0, 1e12),            # a year at 30 kW
    "rss_bytes": (0, MAX_BYTES), "peak_mem_bytes": (0, MAX_BYTES), "peak_rss_bytes": (0, MAX_BYTES),
    "limit_bytes": (0, MAX_BYTES), "mem_limit_bytes": (0, MAX_BYTES),
    "bytes": (0, MAX_BYTES), "total_bytes": (0, MAX_BYTES),
    "oom_kills": (0, MAX_COUNT), "generation": (0, MAX_COUNT),
    "accuracy": (0.0, 1.0),
}
#: A diverged model reports a NaN or infinite loss: believed (the charts show it), but
#: a cross-entropy is never negative.
MAY_DIVERGE = {"loss": (0.0, math.inf)}


@dataclass(frozen=True)
class BadValue:
    """Why a record's values cannot be believed."""

    kind: Reject
    message: str


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}... ({len(text)} digits)"


def check_values(rec: dict[str, Any], rank: int | None = None, world_size: int | None = None) -> BadValue | None:
    """Why a schema-valid record's numbers are not believable, or ``None`` when they are.

    Parameters
    ----------
    rec
        A record that passed :func:`workers.protocol.validate`.
    rank, world_size
        The rank the sending device was started with and the run's world size; when
        given, ``rank`` must equal the first and lie within the second (as must a
        ``hello``'s ``world_size``).

    Returns
    -------
    BadValue or None
        The first problem found, naming the field and the value.
    """
    kind = rec.get("type")
    for name, value in rec.items():
        if value is None or isinstance(value, (str, bool, list, dict)):
            if value is not None and name in BOUNDS:
                return BadValue(Reject.SCHEMA, f"{kind} record field {name!r} is {type(value).__name__}, not a number")
            continue
        if not _number(value):
            continue
        low, high = MAY_DIVERGE.get(name) or BOUNDS.get(name) or (-math.inf, math.inf)
        # an int is always finite (math.isfinite would overflow on a 400-digit one)
        if name not in MAY_DIVERGE and isinstance(value, float) and not math.isfinite(value):
            return BadValue(Reject.NOT_FINITE, f"{kind} record field {name!r} is {value!r}")
        if value < low:
            what = Reject.NEGATIVE if value < 0 else Reject.OUT_OF_RANGE
            return BadValue(what, f"{kind} record field {name!r} is {_show(value)}, below {low!r}")
        if value > high:
            return BadValue(Reject.OUT_OF_RANGE, f"{kind} record field {name!r} is {_show(value)}, above {high!r}")
    r = rec.get("rank")
    if not _number(r) or r < 0:
        return BadValue(Reject.RANK, f"{kind} record rank {r!r} is negative")
    if world_size is not None and r >= world_size:
        return BadValue(Reject.RANK, f"{kind} record rank {r} lies outside the world of {world_size} ranks")
    if rank is not None and r != rank:
        return BadValue(Reject.RANK, f"{kind} record claims rank {r}; this device was started as rank {rank}")
    if kind == "hello" and world_size is not None and rec.get("world_size") != world_size:
        return BadValue(Reject.RANK, f"hello record says world_size {rec.get('world_size')!r}; "
                                     f"the run has {world_size} ranks")
    return None


@dataclass
class TelemetryParser:
    """Parses lines, counting rejects per device and reason; keeps the first reasons.

    Attributes
    ----------
    ranks
        Device name -> the rank it was started with (empty: ranks are only checked for
        being non-negative).  Its size is the world size.
    on_reject
        Called as ``on_reject(device, reason kind, message)`` for every rejected line
        (:meth:`app.run.runstate.RunState.note_rejected` records them).
    """

    ranks: Mapping[str, int] = field(default_factory=dict)
    on_reject: Callable[[str, str, str], None] | None = None
    max_logged: int = 5
    rejected: Counter = field(default_factory=Counter)
    by_reason: dict[str, Counter] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @classmethod
    def for_run(cls, state: Any) -> TelemetryParser:
        """A parser for the devices of a :class:`~app.run.runstate.RunState` (their ranks,
        the world size) that reports every rejected line to it."""
        return cls(ranks={name: dev.rank for name, dev in state.devices.items()}, on_reject=state.note_rejected)

    def feed(self, device: str, line: str) -> dict | None:
        """Return the record of a telemetry line, or ``None`` for anything else.

        Lines that do not look like JSON (library warnings, prints) are ignored;
        JSON lines that break the schema or carry unbelievable numbers are rejected,
        counted and logged.
        """
        text = line.strip()
        if not text:
            return None
        if not text.startswith("{"):
            return None
        try:
            rec = parse_line(text)
        except (ValueError, TypeError) as exc:
            # ProtocolError, or what slips past it: json's own refusals that are not decode
            # errors (an integer of over 4300 digits), an unhashable "type" ([] or {})
            self.reject(device, Reject.SCHEMA, f"{type(exc).__name__}: {exc}"[:300]
                        if not isinstance(exc, ProtocolError) else str(exc))
            return None
        if rec["device"] != device:
            # a worker must speak for the device it runs on; anything else is a bug or spoof
            self.reject(device, Reject.DEVICE, f"record claims device {rec['device']!r}")
            return None
        bad = check_values(rec, self.ranks.get(device), len(self.ranks) or None)
        if bad is not None:
            self.reject(device, bad.kind, bad.message)
            return None
        return rec

    def reject(self, device: str, kind: Reject | str, message: str) -> None:
        """Count one rejected line of ``device`` (also for records the run state refused)."""
        kind = str(kind)
        self.rejected[device] += 1
        self.by_reason.setdefault(device, Counter())[kind] += 1
        if len(self.reasons) < self.max_logged:
            self.reasons.append(f"{device}: {message}")
            log.warning("rejected telemetry line from %s (%s): %s", device, kind, message)
        if self.on_reject is not None:
            self.on_reject(device, kind, message)

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())
