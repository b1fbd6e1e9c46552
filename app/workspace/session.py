"""Sessions: what the control panel shows, saved and restored.

A *session* is what the control panel shows and the user chose: the inventory file,
devices added by hand, the participants in stage order and the run settings.  It is
saved as YAML (atomically: a crash mid-write never loses the previous file)::

    version: 1
    inventory: /home/me/.edgetrain/testbed/inventory.yaml
    participants: [dev2, dev0, dev1]     # ticked devices, in pipeline/rank order
    manual_devices:                      # devices typed in, not in the inventory
      - {name: nano3, host: 192.168.1.23, port: 22, user: edge}
    settings: {model: tiny-gpt2, parallelism: pp, batch_size: 128, ...}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.paths import atomic_write_text
from workers.config import RunSettings

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
                "settings": self.settings.to_dict()}


def _settings(data: Any, path: Path) -> RunSettings:
    try:
        return RunSettings.from_dict(data)
    except ValueError as exc:
        raise SessionError(f"{path}: settings: {exc}") from None


def save_session(path: Path | str, session: Session) -> Path:
    """Write ``session`` to ``path`` atomically; returns the path."""
    return atomic_write_text(path, "# EdgeTrain session\n" + yaml.safe_dump(session.to_dict(), sort_keys=False))


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
                   settings=_settings(data.get("settings") or {}, path),
                   manual_devices=[dict(d) for d in manual])
