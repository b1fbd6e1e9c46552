"""Live mDNS discovery into the control panel's device list.

:class:`LiveDiscovery` runs an :class:`~app.devices.discovery.MdnsBrowser` on the
interfaces the user picked (never on every interface: see :mod:`app.devices.discovery`)
and feeds the workspace's :class:`~app.devices.discovery.DeviceList`.  A device known only
from mDNS leaves the list when it stops advertising; one that is also in the inventory,
was added by hand or is a participant stays, marked offline.  :func:`net_interfaces`
lists this machine's IPv4 interfaces for the user to pick from.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Callable, Sequence

import psutil

from app.devices.discovery import DeviceList, DiscoveredDevice, MdnsBrowser

log = logging.getLogger("edgetrain.workspace.discovery")
#: Interfaces of containers and virtual machines: their peers are not edge devices.
VIRTUAL_PREFIXES = ("docker", "veth", "virbr", "br-", "vmnet", "vboxnet", "cni", "flannel", "tun", "tap", "wg")


@dataclass(frozen=True)
class NetInterface:
    """One IPv4 address of one network interface of this machine."""

    name: str
    address: str

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback

    @property
    def suggested(self) -> bool:
        """Whether to browse it unless the user says otherwise: a real LAN interface."""
        ip = ipaddress.ip_address(self.address)
        return not (ip.is_loopback or ip.is_link_local or self.name.startswith(VIRTUAL_PREFIXES))

    def label(self) -> str:
        """``eth0 — 192.168.1.20`` (loopback says it reaches this machine only)."""
        return f"{self.name} — {self.address}" + ("  (this machine only)" if self.loopback else "")


def net_interfaces() -> list[NetInterface]:
    """This machine's IPv4 addresses on interfaces that are up, LAN ones first."""
    stats = psutil.net_if_stats()
    out = [NetInterface(name, a.address) for name, addrs in psutil.net_if_addrs().items()
           if name in stats and stats[name].isup for a in addrs if a.family == socket.AF_INET]
    return sorted(out, key=lambda i: (not i.suggested, i.loopback, i.name))


class LiveDiscovery:
    """Browses mDNS into ``devices`` until stopped.

    Parameters
    ----------
    devices
        The list to feed (thread-safe; events arrive on zeroconf's thread).
    keep
        ``keep(name)``: whether a device known only from mDNS stays listed (offline) when
        it stops advertising, e.g. because it is a participant.
    """

    def __init__(self, devices: DeviceList, keep: Callable[[str], bool] | None = None) -> None:
        self.devices = devices
        self.keep = keep or (lambda _name: False)
        self.interfaces: list[str] = []
        self._browser: MdnsBrowser | None = None

    @property
    def running(self) -> bool:
        return self._browser is not None

    def start(self, interfaces: Sequence[str]) -> None:
        """Browse on these interface addresses (replacing an earlier browse).

        Raises
        ------
        ValueError
            No interface given.
        OSError
            Zeroconf cannot bind an interface (the message names it).
        """
        self.stop()
        browser = MdnsBrowser(interfaces, self.devices.service_seen, self._gone)
        try:
            browser.start()
        except OSError as exc:
            browser.close()
            raise OSError(f"mDNS cannot use {', '.join(interfaces)}: {exc}. Fix: pick another interface") from exc
        self._browser, self.interfaces = browser, list(browser.interfaces)
        log.info("mDNS discovery on %s", ", ".join(self.interfaces))

    def _gone(self, instance: str) -> None:
        self.devices.service_gone(instance, drop=self._drop)

    def _drop(self, entry: DiscoveredDevice) -> bool:
        return not self.keep(entry.name)

    def stop(self) -> None:
        """Stop browsing (devices found stay listed)."""
        browser, self._browser = self._browser, None
        self.interfaces = []
        if browser is not None:
            browser.close()
