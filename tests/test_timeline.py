"""The recovery timeline read from run events (:mod:`app.run.timeline`)."""
from __future__ import annotations

from app.run.runstate import RunEvent
from app.run.timeline import describe, recovery_timeline


def ev(t: float, kind: str, device: str | None = None) -> RunEvent:
    return RunEvent(t, device, kind, f"{kind} at {t}")


def test_a_drill_its_detection_replan_and_resume_make_one_incident():
    events = [ev(1, "info", "dev0"), ev(10, "drill", "dev2"), ev(10.3, "lost", "dev2"), ev(10.3, "replan"),
              ev(11, "failure", "dev1"),   # a peer failing after the first device: same incident
              ev(14.5, "resumed"), ev(20, "info")]
    marks = recovery_timeline(events)
    assert [(m.incident, m.phase) for m in marks] == [(1, "failure"), (1, "detected"), (1, "re-planned"),
                                                      (1, "resumed")]
    assert [round(m.after_s, 1) for m in marks] == [0.0, 0.3, 0.3, 4.5]
    assert describe(marks) == ["dev2: failure → detected +0.3 s → re-planned +0.3 s → resumed +4.5 s"]


def test_a_second_loss_after_resuming_is_a_second_incident_and_an_unfinished_one_says_so():
    events = [ev(5, "lost", "dev2"), ev(5.1, "replan"), ev(8, "resumed"),
              ev(30, "failure", "dev3")]
    marks = recovery_timeline(events)
    assert [(m.incident, m.phase, m.device) for m in marks] == [
        (1, "detected", "dev2"), (1, "re-planned", None), (1, "resumed", None), (2, "detected", "dev3")]
    assert describe(marks)[1] == "dev3: detected → not resumed"


def test_a_replan_or_resume_without_a_failure_is_no_incident():
    # a user's resume of a stopped run re-plans and resumes, but nothing was lost
    assert recovery_timeline([ev(1, "replan"), ev(2, "resumed"), ev(3, "info")]) == []


def test_the_cli_summary_prints_the_timeline_from_the_run_state():
    import io
    import time

    from app.cli.run import print_summary
    from app.run.runstate import RunState

    state = RunState("r1", ["dev0", "dev1", "dev2"], {"settings": {"steps": 4}})
    state.add_event("dev2", "drill", "drill: kill the worker of device 'dev2'")
    state.add_event("dev2", "lost", "device 'dev2' lost")
    state.add_event(None, "replan", "re-planned for 2 devices")
    state.feed({"type": "event", "device": "dev0", "name": "regrouped", "message": "continuing"})
    time.sleep(0.05)
    state.feed({"type": "step", "device": "dev0", "step": 3, "samples": 8, "latency_s": 0.1,
                "latency_per_sample_s": 0.01})
    assert [e.kind for e in state.events][-1] == "resumed"   # the first step after the re-form
    out = io.StringIO()
    print_summary(state, out=out)
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("recovery:"))
    assert line.startswith("recovery: dev2: failure → detected +") and "→ resumed +" in line
