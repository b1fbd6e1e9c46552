"""From user settings to a finished run: the one path the CLI and the GUI share.

settings + inventory -> :class:`JobConfig` (+ plan) -> :class:`Launcher` -> :class:`RunState`
-> run record under the runs directory.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import yaml

from app.devices.inventory import Device, Inventory
from app.devices.ssh import KnownHosts
from app.paths import atomic_write_text, default_runs_dir
from app.planner.plan import plan_stages
from app.planner.shape import UnknownModelError
from app.run.checkpoints import Found
from app.run.launcher import Launcher, new_run_id
from app.run.planning import fallback_plans, plan_for_run
from app.run.runstate import RunState
from workers.config import JobConfig, Parallelism, RunSettings

log = logging.getLogger("edgetrain.jobs")


def make_job(settings: RunSettings, devices: list[Device], stages: list[dict] | None = None,
             run_id: str | None = None) -> JobConfig:
    """The job description for ``devices`` (rank order = list order)."""
    base = settings.settings().to_dict()
    base["stages"] = stages or settings.stages or []
    return JobConfig(**base, run_id=run_id or new_run_id(), world_size=len(devices),
                     master_addr=devices[0].host, master_port=0, addrs=[d.host for d in devices],
                     devices=[d.name for d in devices])


def _plan_or_none(inv: Inventory, names: list[str], settings: RunSettings) -> dict | None:
    """The planner's predictions for the run record.

    A model the planner has no shape for (a local Hugging Face directory) still runs,
    without predictions; the log says why.
    """
    try:
        return plan_for_run(inv, names, settings).to_dict()
    except (UnknownModelError, ValueError) as exc:
        log.warning("no plan for this run: %s", exc)
        return None


def prepare_run(inv: Inventory, names: list[str] | None, settings: RunSettings,
                runs_dir: Path | None = None, plan: dict | None = None,
                resume: Found | None = None, export: bool = False) -> tuple[Launcher, RunState]:
    """Build the launcher and run state for a run (nothing is contacted yet).

    With ``resume`` (a checkpoint brought home), the run continues from its step; with
    ``export``, the trained model comes home at the end.
    """
    devices = inv.select(names)
    if plan is None:
        plan = _plan_or_none(inv, [d.name for d in devices], settings)
    shares = (plan or {}).get("dp_shares")
    if settings.parallelism is Parallelism.DP and settings.dp_shares is None and shares and len(shares) == len(devices):
        # the planner's shares by device speed, as the plan predicted them; the user's win
        settings = replace(settings, dp_shares=list(shares))
    planned = (plan or {}).get("stages") if settings.parallelism.pipelined else None
    # the run follows the plan the user saw (the planner's balanced split), unless the
    # user gave stages explicitly
    stages = settings.stages or planned
    if settings.parallelism.pipelined and not stages:
        stages = plan_stages(settings, len(devices))
    job = make_job(settings, devices, stages)
    run_dir = (runs_dir or default_runs_dir()) / job.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    # keep what the run used next to its record: re-running it must not depend on the
    # user's current inventory file
    inv_copy = Inventory(devices=devices, known_hosts=inv.known_hosts)
    inv_copy.save(run_dir / "inventory.yaml")
    config = {"settings": settings.settings().to_dict(), "job": job.to_dict()}
    if resume is not None:
        m = resume.manifest
        config["resumed_from"] = {"run_id": m.run_id, "step": m.step, "kind": m.kind,
                                  "parallelism": m.parallelism, "devices": m.devices}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    state = RunState(job.run_id, [d.name for d in devices], config, run_dir=run_dir, plan=plan)
    known = KnownHosts(inv.known_hosts_file())
    launcher = Launcher(devices, job, known, state, stall_s=settings.stall_s, resume=resume, export=export)
    if plan is not None and len(devices) > 1:
        # "one device gone", planned while the run starts so that a loss is answered at once
        launcher.recovery.planner = partial(fallback_plans, inv, [d.name for d in devices], settings)
    return launcher, state
