"""A run that survives losing a device even where its parallelism cannot re-form in place.

Data-parallel replicas continue in place (:mod:`app.run.recovery`).  A pipeline that loses
a stage, a tensor-parallel shard, or rank 0 (it hosts the rendezvous) cannot: the run
ends, and :func:`run_supervised` restarts it on the survivors from its last complete
checkpoint, re-planned for them, as a new run record that says where it came from
(``resumed_from``).  What happened is told as events of the new run.
"""
from __future__ import annotations

import logging
from pathlib import Path

from app.devices.inventory import Inventory
from app.run.jobs import prepare_run
from app.run.launcher import Launcher
from app.run.planning import Fallback
from app.run.resume import ResumeError, bring_home, load_past_run, resumed_settings
from app.run.runstate import RunState

log = logging.getLogger("edgetrain.supervise")


def lost_devices(state: RunState) -> list[str]:
    """Devices whose worker was lost (killed, frozen, unreachable), not ones that failed on
    their own (an error, out of memory) nor peers that failed because of them."""
    return [d.name for d in state.devices.values()
            if d.status == "lost" or (d.status == "failed" and (d.exit or "").startswith("signal"))]


async def run_supervised(launcher: Launcher, state: RunState, inv: Inventory, runs_dir: Path | None,
                         export: bool = False, max_restarts: int = 3, on_restart=None) -> tuple[str, RunState]:
    """Run; when it fails because devices were lost, restart the survivors from the last
    checkpoint (at most ``max_restarts`` times).  Returns the last outcome and run state.

    ``on_restart(launcher, state)`` is called before each restarted run (the CLI follows it).
    """
    outcome = await launcher.run()
    for _ in range(max_restarts):
        lost = lost_devices(state)
        survivors = [n for n in state.devices if n not in lost]
        if outcome != "failed" or not lost or not survivors or state.run_dir is None:
            break
        run = load_past_run(state.run_dir.parent, state.run_id)
        try:
            found = await bring_home(run, launcher.known_hosts)
            settings = resumed_settings(run, found, n_devices=len(survivors))
        except ResumeError as exc:
            state.add_event(None, "error", f"device(s) {', '.join(lost)} lost and the run cannot restart "
                                           f"without them: {exc}")
            state.save()
            break
        m = found.manifest
        msg = (f"device(s) {', '.join(lost)} lost; {run.settings.parallelism} cannot continue in place, so the "
               f"{len(survivors)} survivors ({', '.join(survivors)}) restart from the {m.kind} checkpoint at step "
               f"{m.step} of run {run.run_id}, re-planned for them")
        try:
            new_launcher, new_state = prepare_run(inv, survivors, settings, runs_dir, resume=found, export=export)
        except (ValueError, KeyError) as exc:  # e.g. hybrid: 3 survivors make no grid of replicas
            state.add_event(None, "error", f"device(s) {', '.join(lost)} lost and no plan fits the "
                                           f"{len(survivors)} survivors ({exc}); resume on other devices with "
                                           f"edgetrain resume {run.run_id} --devices ... --parallelism ...")
            state.save()
            break
        msg += "; " + Fallback(lost[0], survivors, new_state.plan).describe(state.plan)
        for name in lost:
            state.set_status(name, "lost")
        state.add_event(None, "replan", msg)
        state.save()
        # the new run's record tells the whole incident: how the loss was detected, then
        # its re-plan and resume (:mod:`app.run.timeline`)
        new_state.events[:0] = [e for e in state.events if e.kind in ("drill", "lost", "failure")]
        launcher, state = new_launcher, new_state
        state.add_event(None, "replan", msg)
        if on_restart is not None:
            on_restart(launcher, state)
        outcome = await launcher.run()
    return outcome, state
