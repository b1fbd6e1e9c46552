"""The device inventory: a YAML file listing the user's trusted devices.

Format (``version: 1``)::

    version: 1
    known_hosts: known_hosts        # optional; relative to this file
    devices:
      - name: nano0                 # unique, letters/digits/-/_/.
        host: 192.168.1.20          # address or host name
        port: 22                    # optional, default 22
        user: edge                  # optional, default: the current user
        key: ~/.ssh/id_ed25519      # private key; relative paths are relative to this file
        python: python3             # optional interpreter on the device
        workdir: .edgetrain         # optional, relative to the device's home
        labels: {room: lab}         # optional free-form strings

Validation names the file, the entry and the field, and says how to fix it.
"""
from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.paths import atomic_write_text, default_known_hosts, read_user_text

INVENTORY_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DEVICE_KEYS = {"name", "host", "port", "user", "key", "python", "workdir", "labels"}


class InventoryError(ValueError):
    """A problem in an inventory file; the message says where and how to fix it."""


@dataclass
class Device:
    """One device the user owns and reaches over SSH."""

    name: str
    host: str
    port: int = 22
    user: str = field(default_factory=getpass.getuser)
    key: str | None = None
    python: str = "python3"
    workdir: str = ".edgetrain"
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "host": self.host, "port": self.port, "user": self.user}
        if self.key:
            key = Path(self.key)
            if relative_to is not None:
                try:
                    key = key.relative_to(relative_to)
                except ValueError:
                    pass
            out["key"] = str(key)
        out["python"] = self.python
        if self.workdir != ".edgetrain":
            out["workdir"] = self.workdir
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


@dataclass
class Inventory:
    """Devices plus the known_hosts file that holds their trusted host keys."""

    devices: list[Device]
    path: Path | None = None
    known_hosts: Path | None = None

    def by_name(self, name: str) -> Device:
        for dev in self.devices:
            if dev.name == name:
                return dev
        names = ", ".join(d.name for d in self.devices) or "none"
        raise KeyError(f"no device named {name!r} in the inventory (devices: {names})")

    def select(self, names: list[str] | None) -> list[Device]:
        """The devices named, in the order given (all devices when ``names`` is empty)."""
        if not names:
            return list(self.devices)
        dup = sorted({n for n in names if list(names).count(n) > 1})
        if dup:
            raise ValueError(f"device {dup[0]!r} is selected twice; each device runs one worker")
        return [self.by_name(n) for n in names]

    def known_hosts_file(self) -> Path:
        """The known_hosts this inventory's devices are checked against."""
        return Path(self.known_hosts) if self.known_hosts else default_known_hosts()

    def save(self, path: Path | str) -> None:
        """Write atomically (a crash mid-write never loses the user's inventory)."""
        path = Path(path)
        base = path.parent.resolve()
        data: dict[str, Any] = {"version": INVENTORY_VERSION}
        if self.known_hosts is not None:
            kh = Path(self.known_hosts)
            try:
                kh = kh.resolve().relative_to(base)
            except ValueError:
                pass
            data["known_hosts"] = str(kh)
        data["devices"] = [d.to_dict(relative_to=base) for d in self.devices]
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _err(path: Path, where: str, problem: str, fix: str) -> InventoryError:
    return InventoryError(f"{path}: {where}: {problem}. Fix: {fix}")


def _str_field(path: Path, where: str, entry: dict, key: str, required: bool) -> str | None:
    if key not in entry or entry[key] is None:
        if required:
            raise _err(path, where, f"field '{key}' is missing", f"add '{key}: ...' to this device")
        return None
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _err(path, f"{where}, field '{key}'", f"expected text, got {type(value).__name__} {value!r}",
                   f"write '{key}' as a plain string")
    value = str(value).strip()
    if not value:
        raise _err(path, f"{where}, field '{key}'", "is empty", f"give '{key}' a value or remove the line")
    return value


def parse_device(entry: Any, path: Path, index: int) -> Device:
    """Validate one ``devices:`` entry (``index`` counts from 1 for messages)."""
    where = f"device #{index}"
    if not isinstance(entry, dict):
        raise _err(path, where, f"expected a mapping with name/host/..., got {type(entry).__name__}",
                   "write each device as '- name: ...' followed by indented 'host: ...' lines")
    if isinstance(entry.get("name"), str):
        where = f"device #{index} ('{entry['name']}')"
    unknown = sorted(set(map(str, entry)) - _DEVICE_KEYS)
    if unknown:
        raise _err(path, f"{where}, field '{unknown[0]}'", "is not a known field",
                   f"use only {', '.join(sorted(_DEVICE_KEYS))} (check the spelling)")
    name = _str_field(path, where, entry, "name", True)
    assert name is not None
    if not _NAME_RE.match(name):
        raise _err(path, f"{where}, field 'name'", f"{name!r} is not a valid device name",
                   "use letters, digits, '-', '_' or '.', starting with a letter or digit")
    host = _str_field(path, where, entry, "host", True)
    assert host is not None
    if any(c.isspace() for c in host) or "/" in host:
        raise _err(path, f"{where}, field 'host'", f"{host!r} is not a host name or address",
                   "give an IP address or a DNS name, without scheme or path")
    port_raw = entry.get("port", 22)
    if isinstance(port_raw, bool) or not isinstance(port_raw, int) or not 1 <= port_raw <= 65535:
        raise _err(path, f"{where}, field 'port'", f"{port_raw!r} is not a TCP port",
                   "use a whole number from 1 to 65535 (SSH is usually 22)")
    user = _str_field(path, where, entry, "user", False) or getpass.getuser()
    key = _str_field(path, where, entry, "key", False)
    if key is not None:
        key_path = Path(os.path.expanduser(key))
        if not key_path.is_absolute():
            key_path = path.parent / key_path
        if not key_path.is_file():
            raise _err(path, f"{where}, field 'key'", f"private key file {key_path} does not exist",
                       "point 'key' at an existing private key (ssh-keygen -t ed25519 makes one)")
        key = str(key_path.resolve())
    python = _str_field(path, where, entry, "python", False) or "python3"
    workdir = _str_field(path, where, entry, "workdir", False) or ".edgetrain"
    labels_raw = entry.get("labels") or {}
    if not isinstance(labels_raw, dict):
        raise _err(path, f"{where}, field 'labels'", f"expected a mapping, got {type(labels_raw).__name__}",
                   "write labels as 'labels: {room: lab}'")
    labels = {str(k): str(v) for k, v in labels_raw.items()}
    return Device(name=name, host=host, port=port_raw, user=user, key=key, python=python,
                  workdir=workdir, labels=labels)


def parse_inventory(data: Any, path: Path) -> Inventory:
    """Validate decoded YAML ``data`` read from ``path``."""
    if data is None:
        raise _err(path, "top level", "the file is empty", "add 'version: 1' and a 'devices:' list")
    if not isinstance(data, dict):
        raise _err(path, "top level", f"expected a mapping, got {type(data).__name__}",
                   "start the file with 'version: 1' and 'devices:'")
    version = data.get("version", INVENTORY_VERSION)
    if version != INVENTORY_VERSION:
        raise _err(path, "field 'version'", f"version {version!r} is not supported",
                   f"set 'version: {INVENTORY_VERSION}'")
    unknown = sorted(set(map(str, data)) - {"version", "devices", "known_hosts"})
    if unknown:
        raise _err(path, f"top level, field '{unknown[0]}'", "is not a known field",
                   "use only version, devices and known_hosts")
    raw = data.get("devices")
    if not isinstance(raw, list) or not raw:
        raise _err(path, "field 'devices'", "must be a non-empty list",
                   "list your devices under 'devices:' as '- name: ... host: ...' entries")
    devices = [parse_device(entry, path, i) for i, entry in enumerate(raw, start=1)]
    seen: dict[str, int] = {}
    for i, dev in enumerate(devices, start=1):
        if dev.name in seen:
            raise _err(path, f"device #{i} ('{dev.name}'), field 'name'",
                       f"duplicates the name of device #{seen[dev.name]}", "give every device a unique name")
        seen[dev.name] = i
    endpoints: dict[tuple[str, int], str] = {}
    for i, dev in enumerate(devices, start=1):
        ep = (dev.host, dev.port)
        if ep in endpoints:
            raise _err(path, f"device #{i} ('{dev.name}'), field 'host'",
                       f"{dev.host}:{dev.port} is already device '{endpoints[ep]}'",
                       "remove the duplicate entry or fix its host/port")
        endpoints[ep] = dev.name
    known_hosts = None
    if data.get("known_hosts") is not None:
        kh = Path(os.path.expanduser(str(data["known_hosts"])))
        known_hosts = kh if kh.is_absolute() else (path.parent / kh)
    return Inventory(devices=devices, path=path, known_hosts=known_hosts)


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file.

    Parameters
    ----------
    path
        The YAML file.

    Returns
    -------
    Inventory

    Raises
    ------
    InventoryError
        For a missing, unreadable or oversized file (over 16 MiB), a folder, bytes that
        are not UTF-8, bad YAML or any invalid entry; the message names the file, the
        entry and the field, and how to fix it.  The file is only read.
    """
    path = Path(path)
    text = read_user_text(path, "inventory", InventoryError,
                          missing_fix="pass an existing file with --inventory, or run 'edgetrain testbed up' "
                                      "to create one for the local testbed")
    return parse_inventory(load_yaml(text, path), path)


def load_yaml(text: str, path: Path) -> Any:
    """Decode an inventory's YAML; any way it can fail becomes an :class:`InventoryError`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML syntax"
        problem = getattr(exc, "problem", None) or str(exc)
        raise _err(path, where, f"not valid YAML ({problem})",
                   "check indentation (spaces, not tabs) and that every 'key: value' has a space after ':'") from None
    except (ValueError, OverflowError) as exc:
        # a value that looks like a date but is not one (2024-13-45)
        raise _err(path, "YAML value", f"cannot be read ({exc})", "quote the value to make it plain text") from None
    except RecursionError:
        raise _err(path, "YAML structure", "is nested too deeply", "an inventory is a flat list of devices") from None
