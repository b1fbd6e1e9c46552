"""Sessions and run history.

A *session* is what the control panel shows and the user chose: the inventory file,
devices added by hand, the participants in stage order and the run settings.  It is
saved as YAML (atomically: a crash mid-write never loses the previous file)::

    version: 1
    inventory: /home/me/.edgetrain/testbed/inventory.yaml
    participants: [dev2, dev0, dev1]     # ticked devices, in pipeline/rank order
    manual_devices:                      # devices typed in, not in the inventory
      - {name: nano3, host: 192.168.1.23, port: 22, user: edge}
    settings: {model: tiny-gpt2, parallelism: pp, batch_size: 128, ...}

The *run history* lists ``runs/<id>/`` directories written by :mod:`app.core.runstate`
(``record.json`` + ``telemetry.jsonl``), newest first.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import yaml

from .jobs import RunSettings

SESSION_VERSION = 1


class SessionError(ValueError):
    """A session file that cannot be used; the message says where and how to fix it."""


@dataclass
class Session:
    """Everything needed to put the control panel back as it was."""

    inventory: str | None = None
    participants: list[str] = field(default_factory=list)
    settings: RunSettings = field(default_factory=RunSettings)
    manual_devices: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": SESSION_VERSION, "inventory": self.inventory,
                "participants": list(self.participants), "manual_devices": [dict(d) for d in self.manual_devices],
                "settings": settings_to_dict(self.settings)}


def settings_to_dict(settings: RunSettings) -> dict[str, Any]:
    return asdict(settings)


def settings_from_dict(data: dict[str, Any], where: str = "settings") -> RunSettings:
    """A :class:`RunSettings` from a mapping; unknown keys are an error (typos must show)."""
    if not isinstance(data, dict):
        raise SessionError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(RunSettings)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SessionError(f"{where}: unknown setting {unknown[0]!r}. Fix: use only {', '.join(known)}")
    out = {}
    for k, v in data.items():
        hint = str(known[k].type)
        numeric = hint.startswith(("int", "float"))
        if v is not None and numeric and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SessionError(f"{where}.{k}: expected a number, got {v!r}")
        out[k] = float(v) if hint.startswith("float") and v is not None else v
    return RunSettings(**out)


def save_session(path: Path | str, session: Session) -> Path:
    """Write ``session`` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# EdgeTrain session\n" + yaml.safe_dump(session.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path


def load_session(path: Path | str) -> Session:
    """Read a session file.

    Raises
    ------
    SessionError
        Missing file, bad YAML, wrong version or a field of the wrong type.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SessionError(f"{path}: cannot read the session ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SessionError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SessionError(f"{path}: expected a mapping with 'version: {SESSION_VERSION}'")
    if data.get("version") != SESSION_VERSION:
        raise SessionError(f"{path}: session version {data.get('version')!r} is not supported "
                           f"(this EdgeTrain reads version {SESSION_VERSION})")
    parts = data.get("participants") or []
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise SessionError(f"{path}: 'participants' must be a list of device names")
    manual = data.get("manual_devices") or []
    if not isinstance(manual, list) or not all(isinstance(d, dict) and "name" in d and "host" in d for d in manual):
        raise SessionError(f"{path}: 'manual_devices' must be a list of mappings with name and host")
    inv = data.get("inventory")
    return Session(inventory=str(inv) if inv else None, participants=list(parts),
                   settings=settings_from_dict(data.get("settings") or {}, f"{path}: settings"),
                   manual_devices=[dict(d) for d in manual])


# --------------------------------------------------------------------------- history

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
        import time
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
