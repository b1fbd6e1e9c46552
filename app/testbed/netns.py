"""The realistic testbed tier (root only): each device in its own network namespace.

``netns_up(dir, n)`` builds, on this machine::

    controller (root namespace) 10.77.0.254 -- etbr0 (Linux bridge)
        |-- etv0 ==veth== eth0 10.77.0.1  in namespace et-0  (sshd, mDNS advertiser)
        |-- etv1 ==veth== eth0 10.77.0.2  in namespace et-1
        ...

* every namespace runs a real OpenSSH ``sshd`` with its own config and host key,
  key-only authentication (no passwords, no keyboard-interactive, no PAM);
* every link is shaped with ``tc tbf`` on *both* ends of its veth pair (the bridge side
  shapes traffic towards the device, the namespace side traffic from it), so any path
  between two endpoints crosses two shapers of the same rate: the bottleneck is the rate.
  Default 1000 Mbit/s, the paper's wireless testbed;
* **no delay is emulated**: this kernel has no ``netem`` and tbf/htb only shape rate, so
  round-trip times are those of the veth/bridge path (tens of microseconds);
* every device is advertised over mDNS (``_edgetrain._tcp`` and ``_ssh._tcp``) by a
  zeroconf process inside its namespace, bound to the namespace's address only;
* ``inventory.yaml``, ``known_hosts`` and ``client_key`` are written to ``dir`` as the
  asyncssh testbed does (devices log in as the current user, root).

Only 10.77.0.0/24, the bridge ``etbr0`` and namespaces ``et-<n>`` are used.  Everything
created is recorded in ``dir/netns-state.json`` as it is created, so ``netns_down`` removes
exactly that, even after a failed ``netns_up``.  sshd running as root ignores its clients'
signals, so ``netns_down`` kills every process inside the namespaces by PID.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncssh
import yaml

BRIDGE = "etbr0"
NS_PREFIX = "et-"
SUBNET = "10.77.0."
BRIDGE_ADDR = SUBNET + "254"
SSHD = "/usr/sbin/sshd"
STATE_FILE = "netns-state.json"
_REPO = Path(__file__).resolve().parents[2]


class NetnsError(RuntimeError):
    """The namespace tier cannot be set up or torn down (the message says what to do)."""


@dataclass
class NetnsDevice:
    """One device of the namespace tier."""

    name: str
    namespace: str
    host: str
    veth: str
    sshd_pid: int | None = None
    advertiser_pid: int | None = None


@dataclass
class NetnsTestbed:
    """A running namespace tier and the files to reach it."""

    __test__ = False

    dir: Path
    devices: list[NetnsDevice]
    rate_mbit: float
    inventory_path: Path
    known_hosts_path: Path
    client_key_path: Path
    bridge: str = BRIDGE
    bridge_addr: str = BRIDGE_ADDR


def unavailable_reason() -> str | None:
    """Why the namespace tier cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, tc and sshd as root)"
    if not Path(SSHD).exists():
        return f"OpenSSH server missing ({SSHD}); install it: apt-get install -y openssh-server"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found; install iproute2"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetnsError(f"'{' '.join(argv)}' failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _link_exists(name: str, ns: str | None = None) -> bool:
    argv = ["ip"] + (["-n", ns] if ns else []) + ["link", "show", name]
    return _run(*argv, check=False).returncode == 0


def _namespaces() -> set[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# ---------------------------------------------------------------------------- state

class _State:
    """``dir/netns-state.json``, rewritten after every resource created."""

    def __init__(self, d: Path) -> None:
        self.path = d / STATE_FILE
        self.data: dict = {"bridge": None, "namespaces": [], "veths": [], "pids": [], "devices": [],
                           "rate_mbit": None}

    def load(self) -> bool:
        try:
            self.data.update(json.loads(self.path.read_text()))
            return True
        except (OSError, ValueError):
            return False

    def add(self, key: str, value: object) -> None:
        if isinstance(self.data.get(key), list):
            self.data[key].append(value)
        else:
            self.data[key] = value
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------- shaping

def _tbf_args(rate_mbit: float) -> list[str]:
    rate_bytes = rate_mbit * 1e6 / 8
    # burst: at least a few full-size frames, and ~4 ms of traffic so the shaper's timer
    # granularity does not cap the rate; latency bounds the queue (50 ms of data)
    burst = max(int(rate_bytes * 0.004), 32 * 1024)
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"]


def _shape(dev: NetnsDevice, rate_mbit: float) -> None:
    _run("tc", "qdisc", "replace", "dev", dev.veth, "root", *_tbf_args(rate_mbit))
    _run("tc", "-n", dev.namespace, "qdisc", "replace", "dev", "eth0", "root", *_tbf_args(rate_mbit))


def set_rate(dir: Path | str, rate_mbit: float) -> None:
    """Reshape every link of the running tier to ``rate_mbit`` (both directions)."""
    st = _State(Path(dir))
    if not st.load():
        raise NetnsError(f"no namespace testbed in {dir}")
    for d in st.data["devices"]:
        _shape(NetnsDevice(**d), rate_mbit)
    st.add("rate_mbit", rate_mbit)


# ---------------------------------------------------------------------------- sshd

def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key(path: Path, comment: str, fresh: bool = False) -> asyncssh.SSHKey:
    if path.exists() and not fresh:
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    _write_private(path, key.export_private_key("openssh"))
    return key


def _sshd_config(d: Path, dev: NetnsDevice) -> Path:
    ddir = d / "devices" / dev.name
    cfg = ddir / "sshd_config"
    cfg.write_text("\n".join([
        f"ListenAddress {dev.host}:22",
        f"HostKey {ddir / 'host_key'}",
        f"PidFile {ddir / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        "UsePAM no",
        "StrictModes no",  # the files live under a world-writable temp directory in tests
        "PermitRootLogin prohibit-password",
        "UseDNS no",
        "Subsystem sftp internal-sftp",
        f"SetEnv EDGETRAIN_NETNS_DEVICE={dev.name}",
        "LogLevel ERROR",
    ]) + "\n")
    return cfg


def _wait_ssh(host: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, 22), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise NetnsError(f"sshd on {host}:22 did not answer within {timeout:.0f} s ({last})")


def _start_sshd(d: Path, dev: NetnsDevice) -> int:
    Path("/run/sshd").mkdir(exist_ok=True)  # OpenSSH's privilege-separation directory
    cfg = _sshd_config(d, dev)
    log = open(d / "devices" / dev.name / "sshd.log", "ab")
    with log:
        proc = subprocess.Popen(["ip", "netns", "exec", dev.namespace, SSHD, "-D", "-e", "-f", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return proc.pid


def _start_advertiser(d: Path, dev: NetnsDevice, python: str) -> tuple[int, Path]:
    ready = d / "devices" / dev.name / "mdns.ready"
    ready.unlink(missing_ok=True)
    log = open(d / "devices" / dev.name / "mdns.log", "ab")
    with log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", dev.namespace, python, "-m", "app.devices.discovery", "advertise", dev.name,
             dev.host, "22", "--interface", dev.host, "--prop", f"user={getpass.getuser()}",
             "--prop", "testbed=netns", "--ready-file", str(ready)],
            cwd=_REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return proc.pid, ready


# ---------------------------------------------------------------------------- up / down

def netns_up(dir: Path | str, n: int = 2, rate_mbit: float = 1000.0, advertise: bool = True,
             python: str | None = None, timeout: float = 20.0) -> NetnsTestbed:
    """Create ``n`` namespaced devices on a bridge, each with sshd, shaping and mDNS.

    Parameters
    ----------
    dir
        Where keys, configs, logs, the inventory and the state file go.
    n
        Number of devices (1 to 200).
    rate_mbit
        tbf rate of every link, in Mbit/s.
    advertise
        Run an mDNS advertiser in each namespace.
    python
        Interpreter for the advertisers and the devices' ``python:`` (default: this one).
    timeout
        Seconds to wait for sshd and the advertisers.

    Returns
    -------
    NetnsTestbed

    Raises
    ------
    NetnsError
        Not root, sshd missing, names or addresses taken, or a step failed (everything
        created so far is removed again).
    """
    why = unavailable_reason()
    if why:
        raise NetnsError(f"the namespace testbed {why}")
    if not 1 <= n <= 200:
        raise NetnsError(f"n={n}: use 1 to 200 devices")
    d = Path(dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    if (d / STATE_FILE).exists():
        netns_down(d)
    taken = [ns for ns in (f"{NS_PREFIX}{i}" for i in range(n)) if ns in _namespaces()]
    if _link_exists(BRIDGE) or taken:
        raise NetnsError(f"{BRIDGE} or namespaces {taken} already exist (another namespace testbed?). "
                         "Fix: run 'edgetrain netns-testbed down --dir DIR' with its directory, or "
                         "'edgetrain netns-testbed down --force'")
    python = python or sys.executable
    st = _State(d)
    st.save()
    try:
        return _build(d, n, rate_mbit, advertise, python, timeout, st)
    except BaseException:
        netns_down(d)
        raise


def _build(d: Path, n: int, rate_mbit: float, advertise: bool, python: str, timeout: float,
           st: _State) -> NetnsTestbed:
    user = getpass.getuser()
    client = _key(d / "client_key", f"edgetrain-netns@{user}")
    pub = client.export_public_key("openssh").decode().strip()
    (d / "client_key.pub").write_text(pub + "\n")
    (d / "authorized_keys").write_text(pub + "\n")
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    st.add("bridge", BRIDGE)
    _run("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    devices = []
    for i in range(n):
        dev = NetnsDevice(name=f"et{i}", namespace=f"{NS_PREFIX}{i}", host=f"{SUBNET}{i + 1}", veth=f"etv{i}")
        (d / "devices" / dev.name / "work").mkdir(parents=True, exist_ok=True)
        _run("ip", "netns", "add", dev.namespace)
        st.add("namespaces", dev.namespace)
        _run("ip", "link", "add", dev.veth, "type", "veth", "peer", "name", "eth0", "netns", dev.namespace)
        st.add("veths", dev.veth)
        _run("ip", "link", "set", dev.veth, "master", BRIDGE)
        _run("ip", "link", "set", dev.veth, "up")
        _run("ip", "-n", dev.namespace, "link", "set", "lo", "up")
        _run("ip", "-n", dev.namespace, "addr", "add", f"{dev.host}/24", "dev", "eth0")
        _run("ip", "-n", dev.namespace, "link", "set", "eth0", "up")
        _shape(dev, rate_mbit)
        _key(d / "devices" / dev.name / "host_key", f"{dev.name}@edgetrain-netns")
        dev.sshd_pid = _start_sshd(d, dev)
        st.add("pids", dev.sshd_pid)
        devices.append(dev)
    st.add("rate_mbit", rate_mbit)
    ready_files = []
    if advertise:
        for dev in devices:
            dev.advertiser_pid, ready = _start_advertiser(d, dev, python)
            st.add("pids", dev.advertiser_pid)
            ready_files.append(ready)
    st.data["devices"] = [asdict(x) for x in devices]
    st.save()
    deadline = time.monotonic() + timeout
    for dev in devices:
        _wait_ssh(dev.host, max(1.0, deadline - time.monotonic()))
    for dev, ready in zip(devices, ready_files):
        while not ready.exists():
            if time.monotonic() > deadline:
                log = (d / "devices" / dev.name / "mdns.log").read_text()[-600:]
                raise NetnsError(f"the mDNS advertiser of {dev.name} did not start: {log}")
            time.sleep(0.05)
    tb = NetnsTestbed(d, devices, rate_mbit, d / "inventory.yaml", d / "known_hosts", d / "client_key")
    _write_files(tb, python)
    return tb


def _write_files(tb: NetnsTestbed, python: str) -> None:
    lines = []
    for dev in tb.devices:
        key = asyncssh.read_private_key(str(tb.dir / "devices" / dev.name / "host_key"))
        lines.append(f"{dev.host} {key.export_public_key('openssh').decode().strip()}\n")
    tb.known_hosts_path.write_text("".join(lines))
    inv = {"version": 1, "known_hosts": tb.known_hosts_path.name, "devices": [{
        "name": dev.name, "host": dev.host, "port": 22, "user": getpass.getuser(), "key": "client_key",
        "python": python, "workdir": str(tb.dir / "devices" / dev.name / "work"),
        "labels": {"testbed": "netns", "rate_mbit": f"{tb.rate_mbit:g}"}} for dev in tb.devices]}
    tb.inventory_path.write_text("# Written by `edgetrain netns-testbed up`.\n" + yaml.safe_dump(inv, sort_keys=False))


def netns_info(dir: Path | str) -> NetnsTestbed | None:
    """The namespace tier recorded in ``dir``, or None."""
    d = Path(dir).resolve()
    st = _State(d)
    if not st.load() or not st.data["devices"]:
        return None
    return NetnsTestbed(d, [NetnsDevice(**x) for x in st.data["devices"]], float(st.data["rate_mbit"] or 0),
                        d / "inventory.yaml", d / "known_hosts", d / "client_key")


def rekey(dir: Path | str, name: str) -> str:
    """Give device ``name`` a new host key and restart its sshd (a reinstalled device).

    Returns the new key's SHA256 fingerprint.  known_hosts is deliberately not updated.
    """
    tb = netns_info(dir)
    if tb is None:
        raise NetnsError(f"no namespace testbed in {dir}")
    dev = next((x for x in tb.devices if x.name == name), None)
    if dev is None:
        raise NetnsError(f"no device {name!r} in the namespace testbed")
    key = _key(tb.dir / "devices" / name / "host_key", f"{name}@edgetrain-netns", fresh=True)
    if dev.sshd_pid:
        _kill([dev.sshd_pid])
    st = _State(tb.dir)
    st.load()
    dev.sshd_pid = _start_sshd(tb.dir, dev)
    st.data["pids"].append(dev.sshd_pid)
    st.data["devices"] = [asdict(x) for x in tb.devices]
    st.save()
    _wait_ssh(dev.host, 10)
    return key.get_fingerprint("sha256")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pids: list[int], grace: float = 1.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            for p in pids:  # reap our own children (they would stay zombies)
                try:
                    os.waitpid(p, os.WNOHANG)
                except ChildProcessError:
                    pass
            time.sleep(0.02)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _ns_pids(ns: str) -> list[int]:
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def netns_down(dir: Path | str | None = None, force: bool = False) -> bool:
    """Remove what ``netns_up`` created in ``dir``: processes, namespaces, links, state.

    ``force`` also removes the bridge ``etbr0`` and namespaces ``et-<n>`` that no state file
    records (leftovers of a crashed run).  Returns whether anything was removed.
    """
    st = _State(Path(dir).resolve()) if dir is not None else None
    recorded = st is not None and st.load()
    namespaces = list(st.data["namespaces"]) if recorded and st else []
    if force:
        namespaces += [ns for ns in _namespaces() if ns.startswith(NS_PREFIX) and ns[len(NS_PREFIX):].isdigit()]
    namespaces = list(dict.fromkeys(namespaces))
    pids = [p for ns in namespaces for p in _ns_pids(ns)]
    if recorded and st:
        pids += [p for p in st.data["pids"] if _alive(p) and p not in pids]
    # every process in our namespaces is ours: sshd, its sessions, probes, workers
    _kill(pids)
    removed = bool(pids)
    for ns in namespaces:
        if ns in _namespaces():
            _run("ip", "netns", "del", ns, check=False)
            removed = True
    for veth in (st.data["veths"] if recorded and st else []):
        if _link_exists(veth):
            _run("ip", "link", "del", veth, check=False)
    if ((recorded and st and st.data["bridge"]) or force) and _link_exists(BRIDGE):
        _run("ip", "link", "del", BRIDGE, check=False)
        removed = True
    if recorded and st:
        st.path.unlink(missing_ok=True)
        removed = True
    return removed


__all__ = ["BRIDGE", "BRIDGE_ADDR", "NetnsDevice", "NetnsError", "NetnsTestbed", "netns_down", "netns_info",
           "netns_up", "rekey", "set_rate", "unavailable_reason"]
