"""``edgetrain sweep``: the paper's DP/SP/TP/PP comparison as one command and a report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.inventory import load_inventory
from .core.jobs import edgetrain_home
from .core.sweep import PARALLELISMS, plan_cells, run_sweep_blocking, sweep_dir, write_report


def cmd_sweep(args: argparse.Namespace) -> int:
    from .cli import settings_from_args

    inv = load_inventory(args.inventory or edgetrain_home() / "testbed" / "inventory.yaml")
    names = args.devices.split(",") if args.devices else [d.name for d in inv.devices]
    pars = [p for p in args.parallelisms.split(",") if p]
    bad = [p for p in pars if p not in PARALLELISMS]
    if bad:
        print(f"error: unknown parallelism {bad[0]!r}; choose from {', '.join(PARALLELISMS)}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    schedules = tuple(args.schedules.split(","))
    cells = plan_cells(names, pars, single=not args.no_single, schedules=schedules)
    out = Path(args.out) if args.out else sweep_dir(Path(args.runs_dir) if args.runs_dir else None)
    print(f"sweep of {len(cells)} runs on {', '.join(names)} -> {out}", file=sys.stderr)

    def progress(cell) -> None:
        lat = f"{cell.latency_per_sample_s * 1e3:.3f} ms/sample" if cell.latency_per_sample_s else "-"
        en = f"{cell.energy_per_sample_j:.4f} J/sample" if cell.energy_per_sample_j else "-"
        print(f"  {cell.label:<12} {cell.outcome:<8} {lat:>18} {en:>18}  {cell.message[:80]}", file=sys.stderr)

    cells = run_sweep_blocking(inv, names, settings, cells, Path(args.runs_dir) if args.runs_dir else None, progress)
    report = write_report(cells, settings, out)
    print(report.read_text())
    print(f"report: {report} (and report.csv, sweep.json)")
    return 0 if any(c.outcome == "done" for c in cells) else 1


def register(sub: argparse._SubParsersAction) -> None:
    from .cli import _add_run_flags

    p = sub.add_parser("sweep", help="run every parallelism on the same devices and write a comparison report")
    p.add_argument("--inventory", help="inventory YAML (default: the running testbed's)")
    p.add_argument("--devices", help="comma-separated device names in rank order (default: all)")
    p.add_argument("--parallelisms", default=",".join(PARALLELISMS))
    p.add_argument("--schedules", default="gpipe", help="pipeline schedules to compare, e.g. gpipe,1f1b")
    p.add_argument("--no-single", action="store_true", help="skip the one-device baseline")
    p.add_argument("--out", help="report directory (default: runs dir / sweep-<time>)")
    _add_run_flags(p, steps=5)
    p.set_defaults(func=cmd_sweep)
