"""A device leaves: the recovery timeline, read from a run's events.

Each incident is a sequence of marks: *failure* (a drill injected it, when one did),
*detected* (the controller named the lost device), *re-planned* (the run was planned for
the survivors) and *resumed* (the survivors completed a step again), each with its time
after the incident began.  The CLI prints it and the GUI shows it; both read the same
:class:`~app.run.runstate.RunEvent` list, so they never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

#: Event kind -> timeline phase.  ``failure`` events name a device whose worker ended
#: (a pipeline's lost stage); ``lost`` ones a device the run goes on without.
PHASE_OF = {"drill": "failure", "lost": "detected", "failure": "detected", "replan": "re-planned",
            "resumed": "resumed"}
PHASES = ("failure", "detected", "re-planned", "resumed")


class _Event(Protocol):
    t: float
    device: str | None
    kind: str
    message: str


@dataclass(frozen=True)
class Mark:
    """One step of an incident's recovery."""

    incident: int       # 1, 2, ... in the order incidents began
    phase: str          # one of PHASES
    t: float            # wall-clock time (s since the epoch)
    after_s: float      # seconds since the incident began
    device: str | None
    message: str


def recovery_timeline(events: Iterable[_Event]) -> list[Mark]:
    """The marks of every incident in ``events`` (in order), one mark per phase.

    An incident begins with a drill or with a device detected lost, and ends when
    training resumes; a later phase already seen in the incident (peers failing after
    the first device, a second re-plan) is not repeated.
    """
    marks: list[Mark] = []
    n, start, seen = 0, 0.0, set()
    for ev in sorted(events, key=lambda e: e.t):
        phase = PHASE_OF.get(ev.kind)
        if phase is None:
            continue
        ongoing = n > 0 and "resumed" not in seen
        if not ongoing or (phase == "failure" and phase not in seen):
            if phase not in ("failure", "detected"):
                continue  # a re-plan or resume with no failure before it
            n, start, seen = n + 1, ev.t, set()
        elif phase in seen:
            continue  # peers failing after the first device, a second drill: one incident
        seen.add(phase)
        marks.append(Mark(n, phase, ev.t, ev.t - start, ev.device, ev.message))
    return marks


def describe(marks: list[Mark]) -> list[str]:
    """One line per incident: ``dev2: failure → detected +0.3 s → re-planned +0.3 s → resumed +4.1 s``."""
    lines = []
    for i in sorted({m.incident for m in marks}):
        ms = [m for m in marks if m.incident == i]
        who = next((m.device for m in ms if m.device), None) or "a device"
        steps = [m.phase if m.after_s == 0 and k == 0 else f"{m.phase} +{m.after_s:.1f} s" for k, m in enumerate(ms)]
        if "resumed" not in {m.phase for m in ms}:
            steps.append("not resumed")
        lines.append(f"{who}: " + " → ".join(steps))
    return lines
