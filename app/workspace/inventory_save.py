"""Saving the device list to an inventory YAML: discovered and hand-added devices kept for later.

:func:`save_devices` writes the devices in the format :func:`app.devices.inventory.load_inventory`
reads, and never loses what the file held: saving into an existing inventory merges (a
device of the list replaces the entry with its name or its address, the other entries stay),
and a file that is not an inventory is refused, not overwritten.  Every entry is validated
before anything is written, and the write is atomic.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from app.devices.inventory import INVENTORY_VERSION, Device, Inventory, InventoryError, load_inventory, parse_inventory
from app.devices.ssh import KnownHosts


@dataclass(frozen=True)
class SavedInventory:
    """What :func:`save_devices` wrote.

    Attributes
    ----------
    path
        The inventory file.
    saved
        Names of the list's devices written.
    kept
        Names of entries the file already held that were kept as they were.
    """

    path: Path
    saved: list[str]
    kept: list[str]


def _merge(ours: Sequence[Device], old: Sequence[Device]) -> list[Device]:
    # an old entry with the name or the endpoint of one of ours is replaced where it stood
    out: list[Device] = []
    placed: set[str] = set()
    for o in old:
        match = [d for d in ours if d.name == o.name or (d.host, d.port) == (o.host, o.port)]
        if not match:
            out.append(o)
        for d in match:
            if d.name not in placed:
                out.append(d)
                placed.add(d.name)
    return out + [d for d in ours if d.name not in placed]


def save_devices(devices: Sequence[Device], path: Path | str, known_hosts: Path | str | None = None
                 ) -> SavedInventory:
    """Write ``devices`` to the inventory ``path`` (merging with the inventory already there).

    Parameters
    ----------
    devices
        The devices to save (the list's usable devices, not mDNS candidates).
    path
        The inventory YAML.
    known_hosts
        The trusted-domain file the devices' host keys are in.  A new inventory points at
        it; an existing one keeps its own, and the devices' trusted keys are added to it so
        they stay trusted when the inventory is loaded.

    Raises
    ------
    InventoryError
        No devices, an entry that would not load back (the message names the device, the
        field and the fix), or an existing file that is not an inventory.
    """
    path = Path(path)
    if not devices:
        raise InventoryError(f"{path}: there are no devices to save. Fix: start the local testbed, discover "
                             "devices or add one first")
    old: Inventory | None = None
    if path.exists():
        try:
            old = load_inventory(path)
        except InventoryError as exc:
            raise InventoryError(f"{path} exists and is not an EdgeTrain inventory, so it is not overwritten "
                                 f"({exc}). Fix: choose another file name") from None
    merged = _merge(devices, old.devices if old is not None else [])
    kh = old.known_hosts if old is not None and old.known_hosts is not None else known_hosts
    inv = Inventory(devices=merged, path=path, known_hosts=Path(kh) if kh is not None else None)
    base = path.parent.resolve()
    # the same check loading does, before anything is written
    parse_inventory({"version": INVENTORY_VERSION, "devices": [d.to_dict(relative_to=base) for d in merged]}, path)
    if known_hosts is not None and kh is not None and Path(kh).resolve() != Path(known_hosts).resolve():
        _carry_trust(devices, KnownHosts(known_hosts), KnownHosts(kh))
    path.parent.mkdir(parents=True, exist_ok=True)
    inv.save(path)
    names = {d.name for d in devices}
    return SavedInventory(path, [d.name for d in merged if d.name in names],
                          [d.name for d in merged if d.name not in names])


def _carry_trust(devices: Sequence[Device], src: KnownHosts, dst: KnownHosts) -> None:
    # only keys the user already trusts are copied, and only where ``dst`` trusts no key for
    # the endpoint: a different key there stays a changed key, for the user to decide
    for d in devices:
        if not dst.lookup(d.host, d.port):
            for key in src.lookup(d.host, d.port):
                dst.trust(d.host, d.port, key)
