"""The run history: past runs read back from their records, newest first.

Each run leaves ``runs/<id>/record.json`` and ``telemetry.jsonl`` (written by
:mod:`app.run.runstate`); the history panel and the run viewer read them here.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def load_record(run_dir: Path | str) -> dict:
    """Read a saved run record (``runs/<id>/record.json``)."""
    return json.loads((Path(run_dir) / "record.json").read_text())


@dataclass
class RunInfo:
    """One past run, as listed in the history."""

    run_id: str
    path: Path
    started: float | None
    outcome: str | None
    model: str | None
    parallelism: str | None
    devices: list[str]
    steps: int | None
    energy_per_sample_j: float | None = None
    latency_per_sample_s: float | None = None

    @property
    def label(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started)) if self.started else "?"
        return (f"{when}  {self.outcome or 'incomplete'}  {self.model or '?'} {self.parallelism or ''} "
                f"on {len(self.devices)} device(s)")


def read_run_info(run_dir: Path) -> RunInfo | None:
    """A :class:`RunInfo` from ``run_dir/record.json`` (``None`` when unreadable)."""
    try:
        rec = json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError):
        return None
    settings = (rec.get("config") or {}).get("settings") or {}
    summary = rec.get("summary") or {}
    devs = [d.get("device") for d in summary.get("devices", []) if d.get("device")]
    return RunInfo(run_id=str(rec.get("run_id") or run_dir.name), path=run_dir, started=rec.get("started"),
                   outcome=rec.get("outcome"), model=settings.get("model"),
                   parallelism=settings.get("parallelism"), devices=devs, steps=summary.get("steps"),
                   energy_per_sample_j=summary.get("energy_per_sample_j"),
                   latency_per_sample_s=summary.get("latency_per_sample_s"))


def list_runs(runs_dir: Path | str) -> list[RunInfo]:
    """Past runs with a record in ``runs_dir``, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    out = [info for d in runs_dir.iterdir() if d.is_dir() and (info := read_run_info(d)) is not None]
    out.sort(key=lambda r: (r.started or 0.0, r.run_id), reverse=True)
    return out


def iter_telemetry(run_dir: Path | str) -> Iterator[dict]:
    """The records of ``run_dir/telemetry.jsonl`` (lines that do not parse are skipped)."""
    path = Path(run_dir) / "telemetry.jsonl"
    try:
        f = open(path)
    except OSError:
        return
    with f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(rec, dict):
                yield rec
