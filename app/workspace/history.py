"""The run history: past runs read back from their records, newest first.

Each run leaves ``runs/<id>/record.json`` and ``telemetry.jsonl`` (written by
:mod:`app.run.runstate`); the history panel and the run viewer read them here.  The
history's actions on a past run start here too: its settings and devices for a re-run,
and the export of its trained model.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from app.devices.ssh import KnownHosts
from app.run.resume import ResumeError, bring_home, export_model, load_past_run
from workers.config import RunSettings

#: What the export runs on this machine (``python -m workers.export``).
EXPORT_MODULES = ("torch", "transformers", "tokenizers")


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


# ------------------------------------------------------------------ actions on a past run


@dataclass
class Rerun:
    """What a re-run of a past run starts from: its settings and its devices."""

    run_id: str
    settings: RunSettings
    devices: list[str]        # rank order


def rerun_of(runs_dir: Path | str, run_id: str) -> Rerun:
    """The settings (``config.yaml``) and devices of ``run_id``, for a new run like it.

    Raises
    ------
    ResumeError
        No such run, or a record that cannot be read (naming the file).
    """
    run = load_past_run(Path(runs_dir), run_id)
    return Rerun(run_id, run.settings.settings(), list(run.devices))


def export_unavailable() -> str | None:
    """Why this machine cannot export a model (``None``: it can).

    The export runs the worker code here, which needs torch, transformers and tokenizers;
    the check finds them without importing them (the controller stays torch-free).
    """
    missing = [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"Exporting a model runs the worker code on this machine, which needs {', '.join(missing)}. "
            "Fix: install the worker dependencies here (pip install torch transformers tokenizers, "
            "or packaging/setup.sh)")


def export_target(chosen: Path | str, run_id: str) -> Path:
    """Where the model goes for a directory the user chose: the directory itself when it is
    empty or new, else a new ``<run_id>-model`` folder in it (the user's files stay)."""
    chosen = Path(chosen)
    if not chosen.exists() or (chosen.is_dir() and not any(chosen.iterdir())):
        return chosen
    return chosen / f"{run_id}-model"


@dataclass
class Exported:
    """A model exported from a run's checkpoint."""

    run_id: str
    out_dir: Path
    step: int
    kind: str                 # the checkpoint's kind (final, periodic, stop, ...)


async def export_run_model(runs_dir: Path | str, run_id: str, out_dir: Path | str) -> Exported:
    """Bring ``run_id``'s newest complete checkpoint home and export it to ``out_dir`` as a
    Hugging Face directory (what ``edgetrain export RUN_ID --out DIR`` does).

    Runs on the asyncio thread: the checkpoint is looked for on the run's devices (with the
    run's own inventory and known hosts) and under its record; the export itself is a
    subprocess on a worker thread.

    Raises
    ------
    ResumeError
        No such run, no complete checkpoint, this machine cannot export (see
        :func:`export_unavailable`), or an ``out_dir`` that is not empty (never overwritten).
    """
    why = export_unavailable()
    if why is not None:
        raise ResumeError(why)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ResumeError(f"{out_dir} exists and is not an empty directory; the model is not written over it. "
                          "Fix: choose an empty or new directory")
    run = load_past_run(Path(runs_dir), run_id)
    found = await bring_home(run, KnownHosts(run.inventory.known_hosts_file()))
    result = await asyncio.to_thread(export_model, run, found, out_dir, False)
    return Exported(run_id, Path(result.get("out_dir") or out_dir), found.manifest.step, found.manifest.kind)
