"""The control panel's state without Qt: devices, topology, profiles, links, the run settings.

:class:`Workspace` is what the window shows and what its actions change.  It owns the
device list, the participants in stage order (:class:`~app.workspace.topology.Topology`),
the profiles and measured link rates, and it knows how to turn them into a plan preview,
a session file and a prepared run.  The Qt window is a view over it: its panels read the
workspace, its action classes call the methods here, and nothing writes into the window's
fields.  Coroutines here run on the window's asyncio thread; the plain methods run on the
GUI thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import asyncssh

from app.devices.discovery import DeviceList
from app.devices.inventory import Inventory, load_inventory
from app.devices.profile import DeviceProfile, LinkMatrix, ProfileCache, is_stale, load_cached_profiles, profile_devices
from app.devices.ssh import KnownHosts, fetch_host_key, fingerprint
from app.paths import default_known_hosts, default_runs_dir, edgetrain_home
from app.planner.shape import UnknownModelError, resolve_model
from app.run.jobs import prepare_run
from app.run.launcher import Launcher
from app.run.resume import ResumeError, bring_home, load_past_run, resumed_settings
from app.run.runstate import RunState
from app.run.supervise import run_supervised
from app.signals import Signal
from app.workspace.session import Session, load_session, save_session
from app.workspace.topology import Topology
from workers.config import RunSettings

log = logging.getLogger("edgetrain.workspace")


@dataclass
class HostKeyOffer:
    """The key a device presents now, and how it compares with the trusted one."""

    name: str
    address: str
    key: asyncssh.SSHKey
    fingerprint: str
    kind: str     # "unknown" (never trusted), "changed" (another key is trusted), "trusted"

    @property
    def key_type(self) -> str:
        """The key's algorithm (``ssh-ed25519``, ``ecdsa-sha2-nistp256``, ...)."""
        return self.key.get_algorithm()


class Workspace:
    """The devices, participants, profiles and links the control panel works on.

    Parameters
    ----------
    runs_dir
        Where run records go (default ``$EDGETRAIN_HOME/runs``).

    Signals
    -------
    profiles_changed()   profiles or link rates changed (the views repaint, the plan reruns)
    """

    def __init__(self, runs_dir: Path | str | None = None) -> None:
        self.runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
        self.inventory_path: Path | None = None
        self.known_hosts = KnownHosts(default_known_hosts())
        self.devices = DeviceList(self.known_hosts)
        self.topology = Topology()
        self.profiles: dict[str, DeviceProfile] = {}
        self.link_mbps: dict[tuple[str, str], float] = {}
        self.profiles_changed = Signal()

    # ------------------------------------------------------------------ devices
    def load_inventory(self, path: Path | str) -> Inventory:
        """Add the inventory's devices to the list (raises ``InventoryError`` naming the file)."""
        inv = load_inventory(path)
        self.inventory_path = Path(path)
        if inv.known_hosts is not None:
            self.known_hosts = KnownHosts(inv.known_hosts)
            self.devices.known_hosts = self.known_hosts
        self.devices.load_inventory(inv)
        self.load_cached_profiles()
        return inv

    def add_manual(self, name: str, host: str, port: int = 22, user: str | None = None, key: str | None = None,
                   python: str = "python3") -> None:
        """A device typed in by hand (raises ``ValueError`` for a bad name or address)."""
        self.devices.add_manual(name, host, port, user, key, python)

    def bandwidth(self, a: str, b: str) -> float | None:
        """Measured Mbit/s between two devices (either direction), ``None`` if never measured."""
        return self.link_mbps.get((a, b)) or self.link_mbps.get((b, a))

    def n_layers(self, settings: RunSettings) -> int:
        """Blocks of the chosen model (0 when the planner has no shape for it)."""
        try:
            return resolve_model(settings.model).n_layer
        except UnknownModelError:
            return 0

    # ------------------------------------------------------------------ profiles
    def load_cached_profiles(self) -> None:
        """Profiles and link rates measured earlier (nothing is contacted)."""
        entries = {e.name: e for e in self.devices.entries()}
        self.profiles.update(load_cached_profiles(list(entries)))
        # a stale one (its testbed started again since) is dropped: the window measures again
        for n in [n for n, p in self.profiles.items()
                  if n in entries and is_stale(p, entries[n].device, self.inventory_path)]:
            del self.profiles[n]
        for key, val in ProfileCache().load_links().items():
            a, _, b = key.partition("->")
            if val.get("mbps"):
                self.link_mbps[(a, b)] = float(val["mbps"])
        self.profiles_changed.emit()

    async def measure(self, names: Sequence[str], progress: Callable[[str], None] | None = None
                      ) -> tuple[list[DeviceProfile], LinkMatrix]:
        """Profile the devices again (asyncio thread); hand the result to :meth:`apply_profiles`."""
        devices = [e.device for n in names if (e := self.devices.get(n)) is not None]
        return await profile_devices(devices, self.known_hosts, refresh=True, progress=progress)

    def apply_profiles(self, profiles: Sequence[DeviceProfile], links: LinkMatrix) -> None:
        """Keep fresh measurements (devices that left the list meanwhile are ignored)."""
        for p in profiles:
            if self.devices.get(p.name) is not None:
                self.profiles[p.name] = p
        for i, a in enumerate(links.names):
            for j, b in enumerate(links.names):
                if links.bandwidth_mbps[i][j]:
                    self.link_mbps[(a, b)] = float(links.bandwidth_mbps[i][j])
        self.profiles_changed.emit()

    # ------------------------------------------------------------------ trust
    async def check(self, names: Sequence[str] | None = None) -> None:
        """Connect to the devices with strict host keys: online, offline or untrusted."""
        await self.devices.check(self.known_hosts, names)

    async def offer_host_key(self, name: str) -> HostKeyOffer | None:
        """The key ``name`` presents now (``None`` if it left the list)."""
        entry = self.devices.get(name)
        if entry is None:
            return None
        dev = entry.device
        key = await fetch_host_key(dev)
        known = self.known_hosts.lookup(dev.host, dev.port)
        kind = "trusted" if any(k == key for k in known) else "changed" if known else "unknown"
        return HostKeyOffer(name, dev.address, key, fingerprint(key), kind)

    def trust(self, offer: HostKeyOffer) -> bool:
        """Trust the offered key (replacing a changed one); ``False`` if the device left."""
        entry = self.devices.get(offer.name)
        if entry is None:
            return False
        if offer.kind != "trusted":
            dev = entry.device
            self.known_hosts.trust(dev.host, dev.port, offer.key, replace=offer.kind == "changed")
        return True

    # ------------------------------------------------------------------ plan, run, session
    def plan_inputs(self, settings: RunSettings) -> dict[str, Any]:
        """Keyword arguments of :func:`app.workspace.preview.compute_preview` for now
        (snapshots: the planner thread must not see later edits)."""
        parts = self.topology.participants
        entries = [self.devices.get(n) for n in parts]
        return {"settings": settings, "order": list(parts),
                "devices": [e.device for e in entries] if all(entries) else None,
                "all_devices": self.devices.devices()}

    def prepare_run(self, settings: RunSettings, plan: dict | None) -> tuple[Launcher, RunState]:
        """A run over the participants in their order, following the canvas's stage split.

        Raises ``ValueError``/``KeyError`` for settings or devices that cannot run.
        """
        names = self.topology.participants
        if not names:
            raise ValueError("no participants: tick at least one device in the devices panel")
        if settings.parallelism.pipelined and self.topology.stages:
            settings.stages = self.topology.stages  # run exactly the split the canvas shows
        inv = Inventory(devices=[self.devices.get(n).device for n in names], known_hosts=self.known_hosts.path)
        return prepare_run(inv, names, settings, self.runs_dir, plan=plan, export=True)

    async def prepare_resume(self, run_id: str) -> tuple[Launcher, RunState]:
        """Continue a past run from its newest complete checkpoint (the history's Resume).

        On the participants when there are any (in their order; another count or split
        reshards the checkpoint), else on the run's own devices.  Runs on the asyncio thread:
        the checkpoint is found on the devices and brought home first.

        Raises
        ------
        ResumeError
            No such run, no complete checkpoint, or nothing left to train (the message
            says why and what to do).
        """
        run = load_past_run(self.runs_dir, run_id)
        names = self.topology.participants or list(run.devices)
        known = {d.name: d for d in run.inventory.devices}
        devices = [e.device if (e := self.devices.get(n)) is not None else known.get(n) for n in names]
        missing = [n for n, d in zip(names, devices) if d is None]
        if missing:
            raise ResumeError(f"device(s) {', '.join(missing)} of run {run_id} are not in the device list. "
                              "Fix: load the inventory that has them, or pick participants")
        found = await bring_home(run, self.known_hosts, extra=devices)
        settings = resumed_settings(run, found, n_devices=len(devices))
        if settings.parallelism.pipelined and self.topology.participants and self.topology.stages:
            settings.stages = self.topology.stages
        inv = Inventory(devices=devices, known_hosts=self.known_hosts.path)
        return prepare_run(inv, names, settings, self.runs_dir, resume=found, export=True)

    def testbed_dirs(self) -> list[Path]:
        """Where a namespace testbed of these devices may be recorded (a drill cuts its links)."""
        dirs = [edgetrain_home() / "netns-testbed"]
        if self.inventory_path is not None:
            dirs.insert(0, Path(self.inventory_path).parent)
        return dirs

    async def run_supervised(self, launcher: Launcher, state: RunState,
                             on_restart: Callable[[Launcher, RunState], None] | None = None) -> str:
        """Run; a run that loses a device it cannot go on without in place restarts on the
        survivors from its last checkpoint (:func:`app.run.supervise.run_supervised`).
        ``on_restart(launcher, state)`` is called, on the asyncio thread, before each restart."""
        inv = Inventory(devices=[e.device for e in self.devices.entries()],
                        known_hosts=self.known_hosts.path)
        outcome, _ = await run_supervised(launcher, state, inv, self.runs_dir, export=True, on_restart=on_restart)
        return outcome

    def session(self, settings: RunSettings) -> Session:
        manual = [e.device.to_dict() for e in self.devices.entries()
                  if "manual" in e.sources and "inventory" not in e.sources]
        return Session(inventory=str(self.inventory_path) if self.inventory_path else None,
                       participants=self.topology.participants, settings=settings, manual_devices=manual)

    def save_session(self, path: Path | str, settings: RunSettings) -> Path:
        return save_session(path, self.session(settings))

    def open_session(self, path: Path | str) -> tuple[Session, list[str]]:
        """Restore devices and participants from a session file.

        Returns the session (its settings are for the run form) and the participants that
        are not in the device list.  Raises ``SessionError`` or ``InventoryError`` naming
        the file.
        """
        ses = load_session(path)
        if ses.inventory and (self.inventory_path is None or Path(ses.inventory) != self.inventory_path):
            self.load_inventory(ses.inventory)
        for d in ses.manual_devices:
            if self.devices.get(d["name"]) is None:
                try:
                    self.add_manual(d["name"], d["host"], int(d.get("port", 22)), d.get("user"), d.get("key"),
                                    d.get("python", "python3"))
                except ValueError as exc:  # the participant is then reported missing too
                    log.warning("session %s: device %s skipped: %s", path, d["name"], exc)
        missing = [p for p in ses.participants if self.devices.get(p) is None]
        self.topology.set_participants([p for p in ses.participants if p not in missing])
        return ses, missing
