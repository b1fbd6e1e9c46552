"""From user settings to a finished run: the one path the CLI and the GUI share.

settings + inventory -> :class:`JobConfig` (+ plan) -> :class:`Launcher` -> :class:`RunState`
-> run record under the runs directory.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from workers.config import JobConfig

from .inventory import Device, Inventory
from .launch import Launcher, new_run_id
from .runstate import RunState
from .ssh import KnownHosts

log = logging.getLogger("edgetrain.jobs")


def edgetrain_home() -> Path:
    """Where EdgeTrain keeps its state (``$EDGETRAIN_HOME``, default ``~/.edgetrain``)."""
    return Path(os.environ.get("EDGETRAIN_HOME") or Path.home() / ".edgetrain")


def default_runs_dir() -> Path:
    return edgetrain_home() / "runs"


def default_known_hosts(inv: Inventory) -> Path:
    return inv.known_hosts or edgetrain_home() / "known_hosts"


@dataclass
class RunSettings:
    """What a user chooses for a run (CLI flags or the GUI's run panel)."""

    model: str = "tiny-gpt2"
    parallelism: str = "dp"
    steps: int = 10
    batch_size: int = 128
    seq_len: int = 32
    micro_batches: int = 4
    sync_every: int = 5
    lr: float | None = None   # None: 1e-3 for tiny presets, 5e-5 (fine-tuning) otherwise
    seed: int = 0
    schedule: str = "gpipe"
    dataset: str | None = None
    weights: str | None = None
    tokenizer: str | None = None
    device: str = "cpu"
    timeout_s: float = 60.0
    stall_s: float = 30.0     # no telemetry for this long: check for a frozen device
    stages: list[dict] | None = None


def even_stages(n_blocks: int, n_stages: int, replicas: int = 1) -> list[dict]:
    """Contiguous near-equal block ranges, ``replicas`` consecutive ranks per stage."""
    base, extra = divmod(n_blocks, n_stages)
    stages, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        stages.append({"ranks": list(range(s * replicas, (s + 1) * replicas)), "layers": [start, end]})
        start = end
    return stages


def default_lr(settings: RunSettings) -> float:
    if settings.lr is not None:
        return settings.lr
    return 1e-3 if settings.model.startswith("tiny-") else 5e-5


def make_job(settings: RunSettings, devices: list[Device], stages: list[dict] | None = None,
             run_id: str | None = None) -> JobConfig:
    """The job description for ``devices`` (rank order = list order)."""
    job = JobConfig(
        run_id=run_id or new_run_id(), world_size=len(devices), master_addr=devices[0].host, master_port=0,
        addrs=[d.host for d in devices], devices=[d.name for d in devices], model=settings.model,
        weights=settings.weights, tokenizer=settings.tokenizer, parallelism=settings.parallelism,
        batch_size=settings.batch_size, seq_len=settings.seq_len, micro_batches=settings.micro_batches,
        sync_every=settings.sync_every, steps=settings.steps, lr=default_lr(settings), seed=settings.seed,
        schedule=settings.schedule, dataset=settings.dataset, device=settings.device,
        timeout_s=settings.timeout_s, stages=stages or settings.stages or [])
    return job


def default_stages_for(settings: RunSettings, n_devices: int) -> list[dict]:
    """Stages when the user gave none: the planner's balanced split, else an even one."""
    if settings.parallelism not in ("pp", "hybrid"):
        return []
    try:
        from .plan import plan_stages  # the planner, when present, balances by profile
        return plan_stages(settings, n_devices)
    except ImportError:
        from workers.presets import PRESETS
        n_blocks = PRESETS[settings.model].n_layer if settings.model in PRESETS else 2
        replicas = 2 if settings.parallelism == "hybrid" and n_devices % 2 == 0 and n_devices >= 4 else 1
        return even_stages(n_blocks, n_devices // replicas, replicas)


def _plan_or_none(inv: Inventory, names: list[str], settings: RunSettings) -> dict | None:
    """The planner's predictions for the run record; a run never fails for want of them."""
    try:
        from .plan_inputs import plan_for_run
        return plan_for_run(inv, names, settings).to_dict()
    except Exception as exc:  # noqa: BLE001
        log.warning("no plan for this run: %s", exc)
        return None


def prepare_run(inv: Inventory, names: list[str] | None, settings: RunSettings,
                runs_dir: Path | None = None, plan: dict | None = None) -> tuple[Launcher, RunState]:
    """Build the launcher and run state for a run (nothing is contacted yet)."""
    devices = inv.select(names)
    if plan is None:
        plan = _plan_or_none(inv, [d.name for d in devices], settings)
    planned = (plan or {}).get("stages") if settings.parallelism in ("pp", "hybrid") else None
    # the run follows the plan the user saw (the planner's balanced split), unless the
    # user gave stages explicitly
    stages = settings.stages or planned or default_stages_for(settings, len(devices))
    job = make_job(settings, devices, stages)
    run_dir = (runs_dir or default_runs_dir()) / job.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    # keep what the run used next to its record: re-running it must not depend on the
    # user's current inventory file
    inv_copy = Inventory(devices=devices, known_hosts=inv.known_hosts)
    inv_copy.save(run_dir / "inventory.yaml")
    config = {"settings": settings.__dict__, "job": {k: v for k, v in job.__dict__.items()}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state = RunState(job.run_id, [d.name for d in devices], config, run_dir=run_dir, plan=plan)
    known = KnownHosts(default_known_hosts(inv))
    return Launcher(devices, job, known, state, stall_s=settings.stall_s), state
