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

from app.paths import atomic_write_text, read_user_text
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
    if isinstance(data, dict):
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise SessionError(f"{path}: settings: {odd[0]!r} is not a setting name. Fix: remove it or "
                               "write the setting's name (e.g. batch_size: 64)")
    try:
        return RunSettings.from_dict(data)
    except (TypeError, ValueError) as exc:
        fix = "" if "Fix:" in str(exc) else ". Fix: correct that setting, or save the session again"
        raise SessionError(f"{path}: settings: {exc}{fix}") from None


def save_session(path: Path | str, session: Session) -> Path:
    """Write ``session`` to ``path`` atomically; returns the path."""
    return atomic_write_text(path, "# EdgeTrain session\n" + yaml.safe_dump(session.to_dict(), sort_keys=False))


def load_session(path: Path | str) -> Session:
    """Read a session file.

    Raises
    ------
    SessionError
        Missing, unreadable or oversized file (over 16 MiB), a folder, bytes that are not
        UTF-8, bad YAML, wrong version or a field of the wrong type; the message names the
        file and the fix.  The file is only read.
    """
    path = Path(path)
    text = read_user_text(path, "session", SessionError,
                          missing_fix="open a session saved with File → Save session, or check the path")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SessionError(f"{path}: not valid YAML ({exc}). Fix: correct the line named, "
                           "or save the session again from the control panel") from None
    except RecursionError:
        raise SessionError(f"{path}: not a session: its YAML is nested too deeply. Fix: save the session "
                           "again from the control panel") from None
    except (ValueError, OverflowError) as exc:
        # a value that looks like a date but is not one (2024-13-45)
        raise SessionError(f"{path}: not a session: the YAML cannot be read ({type(exc).__name__}: "
                           f"{str(exc)[:200]}). Fix: save the session again from the control panel") from None
    if not isinstance(data, dict):
        raise SessionError(f"{path}: expected a mapping with 'version: {SESSION_VERSION}', got "
                           f"{type(data).__name__}. Fix: open a session saved by EdgeTrain, or save it again")
    if data.get("version") != SESSION_VERSION:
        raise SessionError(f"{path}: session version {data.get('version')!r} is not supported "
                           f"(this EdgeTrain reads version {SESSION_VERSION}). Fix: save the session again "
                           "with this EdgeTrain")
    parts = data.get("participants") or []
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise SessionError(f"{path}: 'participants' must be a list of device names. Fix: write it as "
                           "'participants: [dev0, dev1]'")
    manual = data.get("manual_devices") or []
    if not isinstance(manual, list) or not all(isinstance(d, dict) and "name" in d and "host" in d for d in manual):
        raise SessionError(f"{path}: 'manual_devices' must be a list of mappings with name and host. Fix: "
                           "write each as '- {name: nano3, host: 192.168.1.23}'")
    inv = data.get("inventory")
    return Session(inventory=str(inv) if inv else None, participants=list(parts),
                   settings=_settings(data.get("settings") or {}, path),
                   manual_devices=[dict(d) for d in manual])
