"""Continue a run from its last checkpoint, and bring its trained model home.

Both start from the run's record directory (``runs/<run_id>/``): ``config.yaml`` holds the
settings and the job (its devices in rank order), ``inventory.yaml`` the devices as they
were.  The checkpoint is found on those devices (or in the home copy) by
:func:`app.run.checkpoints.find_latest`.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.devices.inventory import Device, Inventory, InventoryError, load_inventory
from app.devices.ssh import KnownHosts
from app.extras import worker_extra_problem
from app.run.checkpoints import CheckpointError, Devices, Found, find_latest
from app.run.runstate import RunState
from workers.config import RunSettings

#: Where the exported model of a run goes, under its record.
MODEL_DIR = "model"


class ResumeError(Exception):
    """A run that cannot be resumed or exported; the message names the run and the fix."""


@dataclass
class PastRun:
    """What a run's record says about it."""

    run_id: str
    run_dir: Path
    settings: RunSettings
    devices: list[str]            # rank order
    inventory: Inventory          # the devices as they were when it ran


def load_past_run(runs_dir: Path, run_id: str) -> PastRun:
    """Read ``runs_dir/run_id``.

    Raises
    ------
    ResumeError
        No such run, or a record that cannot be read (naming the file).
    """
    run_dir = runs_dir / run_id
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ResumeError(f"no run {run_id!r} under {runs_dir} (no {cfg_path.name}). "
                          "Fix: check the run id (edgetrain runs lists them) or pass --runs-dir")
    try:
        config = yaml.safe_load(cfg_path.read_text())
        settings = RunSettings.from_dict(config["settings"])
        devices = [str(d) for d in config["job"]["devices"]]
        inventory = load_inventory(run_dir / "inventory.yaml")
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, InventoryError) as exc:
        raise ResumeError(f"the record of run {run_id} in {run_dir} cannot be read: {exc}") from None
    return PastRun(run_id, run_dir, settings, devices, inventory)


async def bring_home(run: PastRun, known_hosts: KnownHosts, extra: list[Device] = ()) -> Found:
    """The run's newest complete checkpoint, verified, in its home copy.

    Raises
    ------
    ResumeError
        No complete checkpoint (every reason given).
    """
    by_name = {d.name: d for d in run.inventory.devices}
    by_name.update({d.name: d for d in extra if d.name not in by_name})
    devs = Devices([by_name[n] for n in run.devices if n in by_name], known_hosts)
    try:
        return await find_latest(devs, run.run_id, run.run_dir)
    except CheckpointError as exc:
        raise ResumeError(str(exc)) from None
    finally:
        devs.close()


def resumed_settings(run: PastRun, found: Found, *, parallelism: str | None = None, steps: int | None = None,
                     n_devices: int | None = None) -> RunSettings:
    """The settings of the continuation: the run's own, with what the user changed.

    A new parallelism or device count drops the old stage split (the planner makes one).

    Raises
    ------
    ResumeError
        The checkpoint is already at or past the steps to train.
    """
    s = run.settings.settings()
    if parallelism is not None and parallelism != s.parallelism.value:
        s.parallelism, s.stages, s.dp_shares = parallelism, None, None
    if n_devices is not None and n_devices != len(run.devices):
        s.stages = None
        s.dp_shares = None  # one share per device: the planner picks them for the new devices
    if steps is not None:
        s.steps = steps
    if found.manifest.step >= s.steps:
        raise ResumeError(f"run {run.run_id}'s checkpoint is at step {found.manifest.step}, and the run trains "
                          f"{s.steps} steps: nothing left to do. Fix: pass --steps with more than "
                          f"{found.manifest.step}")
    return s


def export_model(run: PastRun, found: Found, out: Path | None = None, overwrite: bool = False) -> dict:
    """Assemble a Hugging Face directory from the home copy of a checkpoint.

    Runs ``python -m workers.export`` on this machine (the worker code, with torch), so the
    controller itself stays free of torch.  Returns the export's result (paths, hashes).

    Raises
    ------
    ResumeError
        The export failed (its message).
    """
    problem = worker_extra_problem(f"exporting run {run.run_id}",
                                   "the export assembles the model with torch and transformers here")
    if problem:
        raise ResumeError(problem)
    out = out or run.run_dir / MODEL_DIR
    s = run.settings
    cmd = [sys.executable, "-m", "workers.export", "--checkpoint", str(found.home), "--out", str(out),
           "--seq-len", str(s.seq_len), "--seed", str(s.seed)]
    for flag, value in (("--weights", s.weights), ("--dataset", s.dataset), ("--tokenizer", s.tokenizer)):
        if value and Path(value).expanduser().exists():
            cmd += [flag, str(Path(value).expanduser())]
    if overwrite:
        cmd.append("--overwrite")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise ResumeError(f"exporting run {run.run_id} (step {found.manifest.step}) failed: {why}")
    return json.loads(lines[-1])


async def bring_model_home(state: RunState, known_hosts: KnownHosts) -> str | None:
    """After a finished run: its final checkpoint home, exported as a Hugging Face directory
    under the run's record; the run state says where (``model_dir``) or why not (an event)."""
    if state.run_dir is None:
        return None
    try:
        run = load_past_run(state.run_dir.parent, state.run_id)
        found = await bring_home(run, known_hosts)
        result = await asyncio.to_thread(export_model, run, found, None, True)
    except ResumeError as exc:
        state.add_event(None, "error", f"the trained model could not be brought home: {exc}")
        return None
    state.model_dir = str(result.get("out_dir") or run.run_dir / MODEL_DIR)
    state.add_event(None, "info", f"the trained model (step {found.manifest.step}) is home: {state.model_dir}")
    return state.model_dir
