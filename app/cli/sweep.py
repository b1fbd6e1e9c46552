"""``edgetrain sweep``: the paper's DP/SP/TP/PP comparison as one command and a report."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from app.cli.flags import (
    add_device_flags,
    add_settings_flags,
    device_names,
    inventory_from_args,
    runs_dir_from_args,
    settings_from_args,
)
from app.planner.shape import UnknownModelError, resolve_model
from app.run.figure import write_figure
from app.run.sweep import plan_cells, run_sweep_blocking, sweep_dir, write_report
from workers.config import PARALLELISMS, SCHEDULES


def write_png(svg: Path) -> Path | None:
    """The figure as PNG when PySide6 (the ``[gui]`` extra) is installed, else ``None``."""
    if importlib.util.find_spec("PySide6") is None:
        return None
    # Imported here, not at the top: PySide6 is the optional [gui] extra, and the sweep
    # must run without it (then only the SVG is written).
    from app.qt.qt_figure import svg_to_png

    return svg_to_png(svg)


def cmd_sweep(args: argparse.Namespace) -> int:
    inv = inventory_from_args(args)
    names = device_names(args) or [d.name for d in inv.devices]
    pars = [p for p in args.parallelisms.split(",") if p]
    schedules = tuple(s for s in args.schedules.split(",") if s)
    for kind, given, known in (("parallelism", pars, PARALLELISMS), ("schedule", schedules, SCHEDULES)):
        bad = [x for x in given if x not in known]
        if bad:
            print(f"error: unknown {kind} {bad[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
    settings = settings_from_args(args)
    models = [m for m in (args.models or "").split(",") if m]
    for m in models:   # a typo in the list fails now, not as an invalid cell an hour in
        try:
            resolve_model(m)
        except UnknownModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    models = models or [settings.model]
    settings.model = models[0]
    cells = plan_cells(names, pars, single=not args.no_single, schedules=schedules, models=models)
    runs_dir = runs_dir_from_args(args)
    out = Path(args.out) if args.out else sweep_dir(runs_dir)
    print(f"sweep of {len(cells)} runs on {', '.join(names)} -> {out}", file=sys.stderr)

    def progress(cell) -> None:
        lat = f"{cell.latency_per_sample_s * 1e3:.3f} ms/sample" if cell.latency_per_sample_s else "-"
        en = f"{cell.energy_per_sample_j:.4f} J/sample" if cell.energy_per_sample_j else "-"
        print(f"  {cell.model:<12} {cell.label:<12} {cell.outcome:<8} {lat:>18} {en:>18}  {cell.message[:80]}",
              file=sys.stderr)

    cells = run_sweep_blocking(inv, names, settings, cells, runs_dir, progress)
    report = write_report(cells, settings, out)
    print(report.read_text())
    print(f"report: {report} (and report.csv, sweep.json)")
    svg = write_figure(cells, settings, out)
    png = write_png(svg)
    print(f"figure: {svg}" + (f" and {png}" if png else
                              " (SVG only: PNG needs PySide6, pip install 'edgetrain[gui]')"))
    return 0 if any(c.outcome == "done" for c in cells) else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run every parallelism on the same devices and write a comparison report "
                                     "and figure")
    add_device_flags(p)
    p.add_argument("--parallelisms", default=",".join(PARALLELISMS))
    p.add_argument("--schedules", default=SCHEDULES[0], help="pipeline schedules to compare, e.g. gpipe,1f1b")
    p.add_argument("--no-single", action="store_true", help="skip the one-device baseline")
    p.add_argument("--models", help="comma-separated presets to compare, one group each in the figure "
                                    "(default: --model)")
    p.add_argument("--out", help="report directory (default: runs dir / sweep-<time>)")
    add_settings_flags(p, steps=5)
    p.set_defaults(func=cmd_sweep)
