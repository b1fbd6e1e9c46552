"""One live list of devices from every source: the inventory, mDNS/DNS-SD and manual adds.

:class:`DeviceList` is a Qt-free model (the GUI shows it through its signals).  Each
:class:`DiscoveredDevice` keeps the sources it came from; entries that describe the same
machine are merged by endpoint (address/host name and SSH port), so a device in the
inventory that also advertises itself over mDNS appears once.  A device that stops
advertising is marked ``offline`` (or, known only from mDNS, may leave the list).

:class:`MdnsBrowser` browses ``_edgetrain._tcp`` (devices that run EdgeTrain's
advertiser; the SRV port is the device's SSH port, the TXT record carries ``name`` and
``user``) and lists ``_ssh._tcp`` / ``_workstation._tcp`` hosts as *candidates*.  It
always binds zeroconf to the interfaces it is given: by default zeroconf would send
multicast out of every interface of the machine.

Discovery never implies trust: host keys are checked on connection against EdgeTrain's
own known_hosts (:mod:`app.devices.ssh`), and ``status`` says ``untrusted`` until the user
trusts the key.

``python -m app.devices.discovery advertise NAME ADDR PORT --interface ADDR`` runs an
advertiser (what a device, or the netns testbed, runs); ``browse --interface ADDR``
prints what it finds.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from app.devices.inventory import Device, Inventory
from app.devices.ssh import HostKeyError, KnownHosts, SSHError, connect
from app.signals import Signal

EDGETRAIN_TYPE = "_edgetrain._tcp.local."
SSH_TYPE = "_ssh._tcp.local."
WORKSTATION_TYPE = "_workstation._tcp.local."
BROWSE_TYPES = (EDGETRAIN_TYPE, SSH_TYPE, WORKSTATION_TYPE)
_KIND = {EDGETRAIN_TYPE: "edgetrain", SSH_TYPE: "ssh", WORKSTATION_TYPE: "workstation"}
_BAD_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class MdnsService:
    """One resolved DNS-SD service instance."""

    service_type: str
    instance: str
    server: str
    addresses: list[str]
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return _KIND.get(self.service_type, "other")

    @property
    def hostnames(self) -> set[str]:
        """The host's names as an inventory might spell them (``nano0.local.`` -> both forms)."""
        s = self.server.rstrip(".")
        return {s, s[:-6]} if s.endswith(".local") else {s}


@dataclass
class DiscoveredDevice:
    """A device in the live list: the inventory-style :class:`Device` plus where it came from.

    ``reachable``/``trusted`` are ``None`` until known; :attr:`status` summarises them.
    """

    device: Device
    sources: set[str] = field(default_factory=set)
    last_seen: float | None = None
    mdns_instances: set[str] = field(default_factory=set)
    hostname: str | None = None
    addresses: list[str] = field(default_factory=list)
    candidate: bool = False
    reachable: bool | None = None
    trusted: bool | None = None
    detail: str = ""

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def status(self) -> str:
        """``offline``, ``untrusted``, ``online`` or ``unknown`` (never checked)."""
        if self.reachable is False:
            return "offline"
        if self.trusted is False:
            return "untrusted"
        if self.reachable:
            return "online"
        return "unknown"

    def matches(self, svc: MdnsService) -> bool:
        """Whether ``svc`` describes this device (same instance, or same host and port)."""
        if svc.instance in self.mdns_instances:
            return True
        names = {self.device.host} | set(self.addresses) | ({self.hostname} if self.hostname else set())
        hosts = set(svc.addresses) | svc.hostnames
        if not names & hosts:
            return False
        # a workstation record's port (9) says nothing about SSH: the address is enough
        return svc.kind == "workstation" or svc.port == self.device.port


class DeviceList:
    """The merged, live device list (thread-safe: mDNS events arrive on zeroconf's thread).

    Signals (emitted outside the lock, possibly from another thread): ``added(entry)``,
    ``changed(entry)``, ``removed(name)``.
    """

    def __init__(self, known_hosts: KnownHosts | None = None) -> None:
        self.known_hosts = known_hosts
        self.added, self.changed, self.removed = Signal(), Signal(), Signal()
        self._entries: dict[str, DiscoveredDevice] = {}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- reading
    def entries(self) -> list[DiscoveredDevice]:
        with self._lock:
            return list(self._entries.values())

    def __iter__(self) -> Iterator[DiscoveredDevice]:
        return iter(self.entries())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, name: str) -> DiscoveredDevice | None:
        with self._lock:
            return self._entries.get(name)

    def find(self, host: str, port: int) -> DiscoveredDevice | None:
        with self._lock:
            for e in self._entries.values():
                if port == e.device.port and (host == e.device.host or host in e.addresses or host == e.hostname):
                    return e
        return None

    def devices(self, include_candidates: bool = False) -> list[Device]:
        """The devices usable for a run (candidates only on request)."""
        return [e.device for e in self.entries() if include_candidates or not e.candidate]

    # ---------------------------------------------------------------- sources
    def _trust_of(self, dev: Device) -> bool | None:
        if self.known_hosts is None:
            return None
        return bool(self.known_hosts.lookup(dev.host, dev.port))

    def _add_or_merge(self, dev: Device, source: str) -> DiscoveredDevice:
        events: list[tuple[Signal, Any]] = []
        with self._lock:
            entry = self.find(dev.host, dev.port)
            clash = self._entries.get(dev.name)
            if clash is not None and clash is not entry:
                if not clash.sources <= {"mdns"}:
                    raise ValueError(f"a device named {dev.name!r} already exists at {clash.device.address}; "
                                     "choose another name")
                # a discovered device took the name the user gives another machine: the user wins
                del self._entries[dev.name]
                clash.device.name = self._unique_name(dev.name)
                self._entries[clash.name] = clash
                events += [(self.removed, dev.name), (self.added, clash)]
            if entry is None:
                entry = DiscoveredDevice(dev, trusted=self._trust_of(dev))
                self._entries[dev.name] = entry
                events.append((self.added, entry))
            else:
                if source in ("inventory", "manual") and "inventory" not in entry.sources:
                    # the user's own description (key, python, user) wins over an advertised one
                    old = entry.name
                    entry.device = dev
                    entry.trusted = self._trust_of(dev)
                    if old != dev.name:
                        del self._entries[old]
                        self._entries[dev.name] = entry
                        events += [(self.removed, old), (self.added, entry)]
                events.append((self.changed, entry))
            entry.sources.add(source)
            entry.candidate = False
        for sig, arg in events:
            sig.emit(arg)
        return entry

    def load_inventory(self, inv: Inventory) -> list[DiscoveredDevice]:
        """Add every inventory device (merging with entries already discovered)."""
        return [self._add_or_merge(d, "inventory") for d in inv.devices]

    def add_manual(self, name: str, host: str, port: int = 22, user: str | None = None, key: str | None = None,
                   python: str = "python3") -> DiscoveredDevice:
        """A device the user typed in (no password is ever taken: key authentication only)."""
        dev = Device(name=name, host=host, port=port, user=user or getpass.getuser(), key=key, python=python)
        return self._add_or_merge(dev, "manual")

    def remove(self, name: str) -> None:
        """Drop an entry (the user's explicit action; disappearance only marks it offline)."""
        with self._lock:
            gone = self._entries.pop(name, None)
        if gone is not None:
            self.removed.emit(name)

    def _unique_name(self, wanted: str) -> str:
        base = _BAD_NAME.sub("-", wanted).strip("-.") or "device"
        name, i = base, 2
        while name in self._entries:
            name, i = f"{base}-{i}", i + 1
        return name

    def service_seen(self, svc: MdnsService) -> DiscoveredDevice:
        """Merge a resolved mDNS service (from :class:`MdnsBrowser`)."""
        now = time.time()
        with self._lock:
            entry = next((e for e in self._entries.values() if e.matches(svc)), None)
            new = entry is None
            if entry is None:
                label = svc.properties.get("name") or svc.instance.split(".")[0]
                v4 = [a for a in svc.addresses if ":" not in a]
                host = (v4 or svc.addresses or [svc.server.rstrip(".")])[0]
                port = 22 if svc.kind == "workstation" else svc.port
                dev = Device(name=self._unique_name(label), host=host, port=port,
                             user=svc.properties.get("user") or getpass.getuser(),
                             python=svc.properties.get("python") or "python3")
                entry = DiscoveredDevice(dev, candidate=svc.kind != "edgetrain", trusted=self._trust_of(dev))
                self._entries[dev.name] = entry
            elif svc.kind == "edgetrain":
                entry.candidate = False
            entry.sources.add("mdns")
            entry.mdns_instances.add(svc.instance)
            entry.hostname = svc.server.rstrip(".")
            entry.addresses = sorted(set(entry.addresses) | set(svc.addresses))
            entry.last_seen = now
            entry.reachable = True
            entry.detail = f"advertised as {svc.instance}"
        (self.added if new else self.changed).emit(entry)
        return entry

    def service_gone(self, instance: str, drop: Callable[[DiscoveredDevice], bool] | None = None
                     ) -> DiscoveredDevice | None:
        """An mDNS service went away: the device is offline once none of its services remain, or
        leaves the list if known only from mDNS and ``drop(entry)`` (under the lock: no race)."""
        with self._lock:
            entry = next((e for e in self._entries.values() if instance in e.mdns_instances), None)
            if entry is None:
                return None
            entry.mdns_instances.discard(instance)
            gone = not entry.mdns_instances and entry.sources == {"mdns"} and drop is not None and drop(entry)
            if gone:
                del self._entries[entry.name]
            elif not entry.mdns_instances:
                entry.reachable = False
                entry.detail = f"stopped advertising at {time.strftime('%H:%M:%S')}"
        self.removed.emit(entry.name) if gone else self.changed.emit(entry)
        return entry

    def set_state(self, name: str, reachable: bool | None, trusted: bool | None, detail: str = "") -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            entry.reachable, entry.trusted, entry.detail = reachable, trusted, detail
            if reachable:
                entry.last_seen = time.time()
        self.changed.emit(entry)

    async def check(self, known_hosts: KnownHosts, names: Sequence[str] | None = None,
                    timeout: float = 5.0) -> None:
        """Connect to each entry (strict host keys) and record online/untrusted/offline."""
        targets = [e for e in self.entries() if names is None or e.name in names]

        async def one(e: DiscoveredDevice) -> None:
            try:
                conn = await connect(e.device, known_hosts, timeout=timeout)
            except HostKeyError as exc:
                self.set_state(e.name, True, False, f"host key {exc.kind}: {exc.fingerprint}")
                return
            except SSHError as exc:
                self.set_state(e.name, False, e.trusted, str(exc).split(". Fix:")[0])
                return
            conn.close()
            self.set_state(e.name, True, True, "SSH ok")

        await asyncio.gather(*(one(e) for e in targets))


# ------------------------------------------------------------------------- zeroconf


def _require_interfaces(interfaces: Sequence[str]) -> list[str]:
    ifaces = [str(i) for i in interfaces]
    if not ifaces:
        raise ValueError("mDNS needs the interface address(es) to use (e.g. ['192.168.1.10']); "
                         "EdgeTrain never multicasts on every interface by default")
    return ifaces


def _to_text(d: dict[Any, Any]) -> dict[str, str]:
    out = {}
    for k, v in (d or {}).items():
        key = k.decode(errors="replace") if isinstance(k, bytes) else str(k)
        val = v.decode(errors="replace") if isinstance(v, bytes) else ("" if v is None else str(v))
        out[key] = val
    return out


class MdnsBrowser:
    """Browse DNS-SD service types on the given interfaces, reporting resolved services.

    Parameters
    ----------
    interfaces
        Interface addresses to bind (required; never all interfaces).
    on_seen, on_gone
        ``on_seen(MdnsService)`` when a service appears or changes; ``on_gone(instance)``
        when it is withdrawn.  Called on zeroconf's browser thread.
    types
        Service types (default ``_edgetrain._tcp``, ``_ssh._tcp``, ``_workstation._tcp``).
    """

    def __init__(self, interfaces: Sequence[str], on_seen: Callable[[MdnsService], None],
                 on_gone: Callable[[str], None], types: Sequence[str] = BROWSE_TYPES) -> None:
        self.interfaces = _require_interfaces(interfaces)
        self.on_seen, self.on_gone, self.types = on_seen, on_gone, list(types)
        self._zc: Any = None
        self._browser: Any = None

    @classmethod
    def for_list(cls, devices: DeviceList, interfaces: Sequence[str],
                 types: Sequence[str] = BROWSE_TYPES) -> MdnsBrowser:
        """A browser feeding ``devices`` (start it with :meth:`start`)."""
        return cls(interfaces, devices.service_seen, devices.service_gone, types)

    def start(self) -> MdnsBrowser:
        from zeroconf import ServiceBrowser, Zeroconf
        self._zc = Zeroconf(interfaces=self.interfaces)
        self._browser = ServiceBrowser(self._zc, self.types, handlers=[self._handler])
        return self

    def _handler(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange
        if state_change is ServiceStateChange.Removed:
            self.on_gone(name)
            return
        # blocking is fine here: this is the browser's own thread, not zeroconf's loop
        info = zeroconf.get_service_info(service_type, name, timeout=1500)
        if info is None:
            return
        self.on_seen(MdnsService(service_type, name, str(info.server or ""), list(info.parsed_addresses()),
                                 int(info.port or 0), _to_text(info.properties)))

    def close(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._zc is not None:
            self._zc.close()
            self._zc = None

    def __enter__(self) -> MdnsBrowser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def browse(interfaces: Sequence[str], seconds: float = 2.0, types: Sequence[str] = BROWSE_TYPES,
           until: Callable[[list[MdnsService]], bool] | None = None) -> list[MdnsService]:
    """Services seen within ``seconds`` (or until ``until(found)`` is true), last state wins."""
    found: dict[str, MdnsService] = {}
    lock = threading.Lock()
    done = threading.Event()

    def seen(svc: MdnsService) -> None:
        with lock:
            found[svc.instance] = svc
            if until is not None and until(list(found.values())):
                done.set()

    def gone(instance: str) -> None:
        with lock:
            found.pop(instance, None)

    with MdnsBrowser(interfaces, seen, gone, types):
        done.wait(seconds)
    with lock:
        return list(found.values())


class Advertiser:
    """Registered DNS-SD services of one device; :meth:`close` withdraws them."""

    def __init__(self, zc: Any, infos: list[Any]) -> None:
        self._zc, self.infos = zc, infos

    def close(self) -> None:
        if self._zc is None:
            return
        try:
            self._zc.unregister_all_services()
        finally:
            self._zc.close()
            self._zc = None

    def __enter__(self) -> Advertiser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def advertise(name: str, addr: str, port: int, interfaces: Sequence[str],
              properties: dict[str, str] | None = None,
              types: Sequence[str] = (EDGETRAIN_TYPE, SSH_TYPE)) -> Advertiser:
    """Announce a device (its SSH endpoint) over mDNS on ``interfaces``.

    Parameters
    ----------
    name
        Device name (instance name and ``<name>.local.`` host name).
    addr, port
        The device's address and SSH port.
    interfaces
        Interface addresses to announce on (required).
    properties
        TXT record entries; ``name`` is always included.

    Returns
    -------
    Advertiser
        Registered (probing done, ~1.5 s); close it to withdraw the services.
    """
    from zeroconf import ServiceInfo, Zeroconf
    zc = Zeroconf(interfaces=_require_interfaces(interfaces))
    props = {"name": name, **(properties or {})}
    infos = [ServiceInfo(t, f"{name}.{t}", addresses=[socket.inet_aton(addr)], port=port,
                         properties=props, server=f"{name}.local.") for t in types]
    errors: list[BaseException] = []

    def register(info: Any) -> None:
        try:
            zc.register_service(info, allow_name_change=True)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    # each registration probes the name for ~1.5 s first: do them side by side
    threads = [threading.Thread(target=register, args=(i,)) for i in infos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        zc.close()
        raise errors[0]
    return Advertiser(zc, infos)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.devices.discovery")
    sub = ap.add_subparsers(dest="mode", required=True)
    adv = sub.add_parser("advertise", help="announce a device until killed")
    adv.add_argument("name")
    adv.add_argument("addr")
    adv.add_argument("port", type=int)
    adv.add_argument("--interface", action="append", required=True)
    adv.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE")
    adv.add_argument("--ready-file", help="created once the services are registered")
    br = sub.add_parser("browse", help="print services seen")
    br.add_argument("--interface", action="append", required=True)
    br.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    if args.mode == "browse":
        for s in browse(args.interface, args.seconds):
            print(f"{s.instance}  {s.server}  {','.join(s.addresses)}:{s.port}  {s.properties}")
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    props = dict(p.split("=", 1) for p in args.prop)
    with advertise(args.name, args.addr, args.port, args.interface, props):
        if args.ready_file:
            Path(args.ready_file).write_text("ready\n")
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
