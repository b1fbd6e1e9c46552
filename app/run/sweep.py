"""The paper's study as one action: run every parallelism on the same devices and report
energy and latency per sample, throughput and peak memory side by side.

Each cell is an ordinary run (same launcher, same run record), so a sweep's report links
to full records.  A cell that fails (out of memory, a device error) is reported as such
and the sweep goes on: an OOM is a result of the study, not a crash of it.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from app.devices.inventory import Inventory
from app.paths import atomic_write_text, default_runs_dir
from app.planner.plan import Plan
from app.planner.shape import UnknownModelError
from app.run.jobs import prepare_run
from app.run.launcher import Launcher, LaunchError
from app.run.planning import plan_for_run
from app.run.runstate import RunState
from workers.config import PARALLELISMS, Parallelism, RunSettings, Schedule


@dataclass
class CellPrediction:
    """What the planner predicted for a cell, before it ran."""

    latency_per_sample_s: float | None = None   # the median step's, as the run summary measures it
    energy_per_sample_j: float | None = None
    oom: bool = False
    oom_devices: list[str] = field(default_factory=list)
    note: str = ""                              # why there is no prediction, when there is none

    @classmethod
    def from_plan(cls, plan: Plan) -> "CellPrediction":
        t = plan.totals
        return cls(latency_per_sample_s=t.get("median_latency_per_sample_s"),
                   energy_per_sample_j=t.get("energy_per_sample_j"), oom=plan.oom,
                   oom_devices=[p.name for p in plan.predictions if p.oom],
                   note="" if plan.predictions else plan.explanation)


@dataclass
class SweepCell:
    """One run of the sweep."""

    label: str                       # 'single', 'dp', 'pp-1f1b', ...
    parallelism: str
    devices: list[str]
    outcome: str = "pending"
    run_id: str | None = None
    latency_per_sample_s: float | None = None
    energy_per_sample_j: float | None = None
    energy_methods: list[str] = field(default_factory=list)
    throughput_sps: float | None = None
    peak_mem_bytes: dict[str, int] = field(default_factory=dict)
    predicted: CellPrediction = field(default_factory=CellPrediction)
    message: str = ""
    model: str = ""                  # '' = the sweep's settings' model (filled in when the cell runs)


def _plan(inv: Inventory, names: list[str], settings: RunSettings) -> tuple[Plan | None, CellPrediction]:
    """The planner's plan for a cell (the run then follows it) and what it predicts."""
    try:
        plan = plan_for_run(inv, names, settings)
    except (UnknownModelError, ValueError) as exc:
        return None, CellPrediction(note=f"no prediction: {exc}")
    return plan, CellPrediction.from_plan(plan)


def _fill(cell: SweepCell, state: RunState) -> None:
    s = state.summary()
    cell.outcome = s["outcome"] or "failed"
    cell.run_id = state.run_id
    cell.latency_per_sample_s = s["latency_per_sample_s"]
    # steady state, as the planner predicts it (the first step's warm-up left out)
    cell.energy_per_sample_j = s["steady_energy_per_sample_j"] or s["energy_per_sample_j"]
    cell.energy_methods = s["energy_methods"]
    cell.throughput_sps = s["throughput_sps"]
    cell.peak_mem_bytes = {d["device"]: d["peak_mem_bytes"] for d in s["devices"]}
    bad = [e.message for e in state.events if e.kind in ("oom", "error", "failure")]
    cell.message = bad[0] if bad else ""


def plan_cells(names: list[str], parallelisms: tuple[str, ...] | list[str], single: bool = True,
               schedules: tuple[str, ...] = (Schedule.GPIPE.value,),
               models: list[str] | tuple[str, ...] | None = None) -> list[SweepCell]:
    """The cells of a sweep: for each model, an optional one-device baseline, then each
    parallelism.

    Parameters
    ----------
    names
        The devices, in rank order (the baseline runs on the first).
    parallelisms, schedules
        What to compare; a pipelined parallelism gets one cell per schedule when there are
        several.
    single
        Include the one-device baseline.
    models
        Presets to sweep, model-major (the paper's figures group by model); ``None``: the
        sweep's settings' model only.
    """
    cells: list[SweepCell] = []
    for model in models or [""]:
        if single:
            cells.append(SweepCell("single", "dp", names[:1], model=model))
        for p in parallelisms:
            if Parallelism(p).pipelined and len(schedules) > 1:
                cells += [SweepCell(f"{p}-{s}", p, list(names), model=model) for s in schedules]
            else:
                cells.append(SweepCell(p, p, list(names), model=model))
    return cells


async def run_sweep(inv: Inventory, names: list[str] | None, base: RunSettings, cells: list[SweepCell] | None = None,
                    runs_dir: Path | None = None, on_cell: Callable[[SweepCell], None] | None = None,
                    on_start: Callable[[SweepCell, Launcher], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> list[SweepCell]:
    """Run the cells one after another on the same devices; returns them filled in.

    Parameters
    ----------
    on_cell
        Called with each cell once it has its outcome (on the loop's thread).
    on_start
        Called with each cell and its launcher just before the cell runs, so a front end
        can show it and stop it (``launcher.request_stop`` on this loop).
    should_stop
        Asked before each cell; once true, the cells left are marked ``skipped`` (and
        announced through ``on_cell``) instead of run.
    """
    names = [d.name for d in inv.select(names)]
    cells = cells or plan_cells(names, PARALLELISMS)
    for cell in cells:
        cell.model = cell.model or base.model
        if should_stop is not None and should_stop():
            cell.outcome, cell.message = "skipped", "the sweep was stopped before this cell"
            if on_cell:
                on_cell(cell)
            continue
        schedule = cell.label.split("-", 1)[1] if "-" in cell.label and Parallelism(cell.parallelism).pipelined \
            else base.schedule
        settings = replace(base, model=cell.model, parallelism=cell.parallelism, schedule=schedule, stages=None)
        plan, cell.predicted = _plan(inv, cell.devices, settings)
        try:
            launcher, state = prepare_run(inv, cell.devices, settings, runs_dir,
                                          plan=plan.to_dict() if plan is not None else None)
        except (ValueError, KeyError) as exc:
            cell.outcome, cell.message = "invalid", str(exc)
            if on_cell:
                on_cell(cell)
            continue
        if on_start:
            on_start(cell, launcher)
        try:
            await launcher.run()
        except Exception as exc:  # noqa: BLE001 - one failed cell is a result; the sweep goes on
            cell.message = str(exc) if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
        _fill(cell, state)
        if on_cell:
            on_cell(cell)
    return cells


def _fmt(v: float | None, scale: float = 1.0, spec: str = ".3f") -> str:
    return "-" if v is None else format(v * scale, spec)


def write_report(cells: list[SweepCell], settings: RunSettings, out_dir: Path) -> Path:
    """Write ``report.md``, ``report.csv`` and ``sweep.json``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(c.model or settings.model for c in cells)) or [settings.model]
    # each model's own baseline: a ratio across models would compare different work
    bases = {m: next((c for c in cells if c.label == "single" and c.outcome == "done"
                      and (c.model or settings.model) == m), None) for m in models}
    rows = []
    for c in cells:
        base = bases.get(c.model or settings.model)
        peak = max(c.peak_mem_bytes.values()) if c.peak_mem_bytes else None
        pred = c.predicted
        rows.append({
            "cell": c.label, "model": c.model or settings.model, "devices": len(c.devices), "outcome": c.outcome,
            "latency_ms_per_sample": _fmt(c.latency_per_sample_s, 1e3),
            "vs_single": _fmt(c.latency_per_sample_s / base.latency_per_sample_s, 1, ".2f")
            if base and c.latency_per_sample_s and base.latency_per_sample_s else "-",
            "energy_j_per_sample": _fmt(c.energy_per_sample_j, 1, ".4f"),
            "energy_method": ",".join(c.energy_methods) or "-",
            "throughput_sps": _fmt(c.throughput_sps, 1, ".1f"),
            "max_peak_mem_mib": _fmt(peak, 1 / 2**20, ".0f") if peak else "-",
            "predicted_latency_ms": _fmt(pred.latency_per_sample_s, 1e3),
            "predicted_energy_j_per_sample": _fmt(pred.energy_per_sample_j, 1, ".4f"),
            "predicted_oom": ("yes: " + ",".join(pred.oom_devices)) if pred.oom else
            ("no" if pred.latency_per_sample_s is not None else "-"),
            "run_id": c.run_id or "-", "note": c.message[:120],
        })
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["cell"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / "report.csv", buf.getvalue())
    atomic_write_text(out_dir / "sweep.json", json.dumps(
        {"settings": settings.to_dict(), "cells": [asdict(c) for c in cells]}, indent=1, default=str))
    cols = ["cell", "model", "devices", "outcome", "latency_ms_per_sample", "vs_single", "energy_j_per_sample",
            "energy_method", "throughput_sps", "max_peak_mem_mib", "predicted_latency_ms",
            "predicted_energy_j_per_sample", "predicted_oom", "note"]
    lines = [f"# EdgeTrain sweep: {', '.join(models)}, batch {settings.batch_size} x seq {settings.seq_len}, "
             f"{settings.steps} steps", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Energy is labelled with how it was obtained "
             "(`estimated` = CPU-share power model, not a sensor).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def sweep_dir(runs_dir: Path | None = None) -> Path:
    """A new sweep's report directory: ``<runs dir>/sweep-<time>``."""
    return (runs_dir or default_runs_dir()) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def run_sweep_blocking(inv: Inventory, names: list[str] | None, base: RunSettings, cells: list[SweepCell],
                       runs_dir: Path | None = None, on_cell=None) -> list[SweepCell]:
    """:func:`run_sweep` on a fresh asyncio loop (the CLI's)."""
    return asyncio.run(run_sweep(inv, names, base, cells, runs_dir, on_cell))
