"""``edgetrain resume RUN_ID`` and ``edgetrain export RUN_ID``: continue a run from its last
checkpoint (on the same devices and plan, or others), and bring its trained model home."""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from app.cli.flags import device_names, inventory_path, runs_dir_or_default
from app.cli.run import execute
from app.devices.inventory import load_inventory
from app.devices.ssh import KnownHosts
from app.run.jobs import prepare_run
from app.run.resume import ResumeError, bring_home, export_model, load_past_run, resumed_settings
from workers.config import PARALLELISMS


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_resume(args: argparse.Namespace) -> int:
    runs_dir = runs_dir_or_default(args)
    try:
        run = load_past_run(runs_dir, args.run_id)
    except ResumeError as exc:
        return _fail(exc)
    # the devices to continue on: by default the run's own, as they were; other devices
    # come from --inventory or the running testbed's
    names = device_names(args)
    known = {d.name for d in run.inventory.devices}
    if args.inventory or (names and not set(names) <= known):
        inv = load_inventory(inventory_path(args))
    else:
        inv, names = run.inventory, names or list(run.devices)
    targets = inv.select(names)
    try:
        found = asyncio.run(bring_home(run, KnownHosts(inv.known_hosts_file()), extra=targets))
        for msg in found.skipped:
            print(f"-- {msg}", file=sys.stderr)
        settings = resumed_settings(run, found, parallelism=args.parallelism, steps=args.steps,
                                    n_devices=len(targets))
    except ResumeError as exc:
        return _fail(exc)
    m = found.manifest
    launcher, state = prepare_run(inv, [d.name for d in targets], settings, runs_dir, resume=found,
                                  export=not args.no_export)
    print(f"run {state.run_id}: resuming run {run.run_id} at step {m.step} ({m.kind} checkpoint, "
          f"{m.parallelism} on {m.world_size}) as {settings.parallelism} on {', '.join(state.devices)}, "
          f"to step {settings.steps}", file=sys.stderr)
    return execute(launcher, state, settings.steps, inv, runs_dir, export=not args.no_export)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        run = load_past_run(runs_dir_or_default(args), args.run_id)
        found = asyncio.run(bring_home(run, KnownHosts(run.inventory.known_hosts_file())))
        result = export_model(run, found, Path(args.out) if args.out else None, overwrite=args.overwrite)
    except ResumeError as exc:
        return _fail(exc)
    print(f"run {run.run_id}, step {found.manifest.step} ({found.manifest.kind} checkpoint): {result.get('out_dir')}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    res = sub.add_parser("resume", help="continue a run from its last complete checkpoint")
    res.add_argument("run_id")
    res.add_argument("--inventory", help="inventory of the devices to continue on (default: the run's own)")
    res.add_argument("--devices", help="comma-separated device names in rank order (default: the run's)")
    res.add_argument("--parallelism", choices=PARALLELISMS, help="continue with another parallelism")
    res.add_argument("--steps", type=int, help="train to this step (default: the run's)")
    res.add_argument("--no-export", action="store_true", help="do not bring the trained model home")
    res.add_argument("--runs-dir", help="where run records are (default: $EDGETRAIN_HOME/runs)")
    res.set_defaults(func=cmd_resume)

    exp = sub.add_parser("export", help="bring a run's trained model home as a Hugging Face directory")
    exp.add_argument("run_id")
    exp.add_argument("--out", help="directory to create (default: runs/<run_id>/model)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    exp.add_argument("--runs-dir", help="where run records are (default: $EDGETRAIN_HOME/runs)")
    exp.set_defaults(func=cmd_export)
