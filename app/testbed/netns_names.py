"""The names a namespace tier owns on this machine, and its state file.

A tier is named by three things: a namespace prefix (namespaces ``<prefix><i>``), a
bridge and a /24 subnet (devices ``<subnet><i + 1>``, the bridge ``<subnet>254``).  The
veths on the bridge side are ``<prefix without a trailing '-'>v<i>``.  The defaults
(``et-``, ``etbr0``, ``10.77.0.``) are the user's tier; :meth:`NetnsNames.tagged` gives a
private set (random tag, a free subnet) for tests and benches, so that two tiers never
share a name and tearing one down cannot touch the other.

Linux interface names are at most 15 characters (``IFNAMSIZ`` 16 with the NUL): the
bridge and every veth are checked before anything is created.
"""
from __future__ import annotations

import ipaddress
import json
import re
import secrets
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from app.paths import atomic_write_text

BRIDGE = "etbr0"
NS_PREFIX = "et-"
SUBNET = "10.77.0."
STATE_FILE = "netns-state.json"
IFNAMSIZ = 15  # longest Linux interface name
MAX_DEVICES = 200
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class NetnsError(RuntimeError):
    """The namespace tier cannot be set up or torn down (the message says what to do)."""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (``ip``, ``tc``); raise :class:`NetnsError` on failure when ``check``."""
    res = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsError(f"'{' '.join(argv)}' failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def link_exists(name: str, ns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", ns] if ns else []) + ["link", "show", name]
    return run(*argv, check=False).returncode == 0


def namespaces() -> set[str]:
    """Every named network namespace on this machine."""
    out = run("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Networks of this machine's IPv4 addresses and routes (not the default route)."""
    nets = []
    for line in run("ip", "-4", "-o", "addr", "show", check=False).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in run("ip", "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest and dest not in ("default", "broadcast", "local", "multicast", "unreachable"):
            try:
                nets.append(ipaddress.ip_network(dest, strict=False))
            except ValueError:
                continue
    return [n for n in nets if n.prefixlen > 0]


@dataclass(frozen=True)
class NetnsNames:
    """The namespaces, bridge and subnet of one tier (``asdict`` gives ``netns_up``'s keywords)."""

    prefix: str = NS_PREFIX
    bridge: str = BRIDGE
    subnet: str = SUBNET

    @classmethod
    def tagged(cls, tag: str | None = None) -> NetnsNames:
        """Private names: ``ett<tag>-<i>``, ``ettbr<tag>`` and a random 10.x.y.0/24 that no
        address or route of this machine overlaps."""
        tag = tag or secrets.token_hex(3)
        used = _host_networks()
        for _ in range(100):
            subnet = f"10.{128 + secrets.randbelow(127)}.{secrets.randbelow(256)}."
            net = ipaddress.ip_network(subnet + "0/24")
            if not any(net.overlaps(u) for u in used):
                return cls(prefix=f"ett{tag}-", bridge=f"ettbr{tag}", subnet=subnet)
        raise NetnsError("no free 10.x.y.0/24 subnet found for a tagged namespace tier")

    @classmethod
    def from_state(cls, data: dict) -> NetnsNames:
        """The names a state file records (files written before names were recorded: the defaults)."""
        return cls(**data["names"]) if data.get("names") else cls()

    @property
    def bridge_addr(self) -> str:
        return self.subnet + "254"

    def namespace(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def veth(self, i: int) -> str:
        return f"{self.prefix.rstrip('-')}v{i}"

    def host(self, i: int) -> str:
        return f"{self.subnet}{i + 1}"

    def owns(self, ns: str) -> bool:
        """Whether ``ns`` has this tier's form ``<prefix><digits>`` (what ``--force`` removes)."""
        return ns.startswith(self.prefix) and ns[len(self.prefix):].isdigit()

    def check(self, n: int) -> None:
        """Raise :class:`NetnsError` when these names cannot hold ``n`` devices."""
        if not 1 <= n <= MAX_DEVICES:
            raise NetnsError(f"n={n}: use 1 to {MAX_DEVICES} devices")
        for what, name in (("prefix", self.prefix.rstrip("-")), ("bridge", self.bridge)):
            if not _NAME.match(name):
                raise NetnsError(f"namespace tier {what} {name!r}: use letters, digits, '_' and '-'")
        longest = self.veth(n - 1)
        for what, name in (("bridge", self.bridge), ("veth", longest)):
            if len(name) > IFNAMSIZ:
                raise NetnsError(f"{what} name {name!r} is {len(name)} characters; Linux allows "
                                 f"{IFNAMSIZ}: use a shorter prefix or bridge name")
        parts = self.subnet.split(".")
        if len(parts) != 4 or parts[3] or not all(p.isdigit() and int(p) < 256 for p in parts[:3]):
            raise NetnsError(f"subnet {self.subnet!r}: give the first three octets of a /24, e.g. '10.77.0.'")

    def conflicts(self, n: int) -> list[str]:
        """Which of the names for ``n`` devices already exist on this machine."""
        have = namespaces()
        taken = [ns for ns in (self.namespace(i) for i in range(n)) if ns in have]
        taken += [x for x in [self.bridge] + [self.veth(i) for i in range(n)] if link_exists(x)]
        net = ipaddress.ip_network(self.subnet + "0/24")
        out = run("ip", "-4", "-o", "addr", "show", check=False).stdout.split()
        taken += [a for a in out if "/" in a and _in(a, net)]
        return taken


def _in(cidr: str, net: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_interface(cidr).ip in net
    except ValueError:
        return False


class State:
    """``dir/netns-state.json``, rewritten after every resource created."""

    def __init__(self, d: Path) -> None:
        self.path = d / STATE_FILE
        self.data: dict = {"names": None, "bridge": None, "namespaces": [], "veths": [], "pids": [],
                           "devices": [], "rate_mbit": None}

    def load(self) -> bool:
        try:
            self.data.update(json.loads(self.path.read_text()))
            return True
        except (OSError, ValueError):
            return False

    @property
    def names(self) -> NetnsNames:
        return NetnsNames.from_state(self.data)

    def set_names(self, names: NetnsNames) -> None:
        self.data["names"] = asdict(names)
        self.save()

    def add(self, key: str, value: object) -> None:
        if isinstance(self.data.get(key), list):
            self.data[key].append(value)
        else:
            self.data[key] = value
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


__all__ = ["BRIDGE", "IFNAMSIZ", "NS_PREFIX", "STATE_FILE", "SUBNET", "NetnsError", "NetnsNames", "State",
           "link_exists", "namespaces", "run"]
