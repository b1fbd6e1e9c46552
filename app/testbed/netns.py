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

By default only 10.77.0.0/24, the bridge ``etbr0`` and namespaces ``et-<n>`` are used;
``netns_up(..., prefix=, bridge=, subnet=)`` names another tier (``NetnsNames.tagged()``:
private names for tests and benches, see ``netns_names.py``).  The names and everything
created are recorded in ``dir/netns-state.json`` as it is created, so ``netns_down``
removes exactly that, even after a failed ``netns_up``, and never a namespace or bridge
it did not create.  sshd running as root ignores its clients' signals, so ``netns_down``
kills every process inside the tier's namespaces by PID.
"""
from __future__ import annotations

import getpass
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

from app.paths import atomic_write_text
from app.testbed.netns_names import (
    BRIDGE,
    NS_PREFIX,
    STATE_FILE,
    SUBNET,
    NetnsError,
    NetnsNames,
    State,
    link_exists,
    namespaces,
    run,
)

BRIDGE_ADDR = SUBNET + "254"
SSHD = "/usr/sbin/sshd"
_REPO = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------------------- shaping

def _tbf_args(rate_mbit: float) -> list[str]:
    rate_bytes = rate_mbit * 1e6 / 8
    # burst: at least a few full-size frames, and ~4 ms of traffic so the shaper's timer
    # granularity does not cap the rate; latency bounds the queue (50 ms of data)
    burst = max(int(rate_bytes * 0.004), 32 * 1024)
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"]


def _shape(dev: NetnsDevice, rate_mbit: float) -> None:
    run("tc", "qdisc", "replace", "dev", dev.veth, "root", *_tbf_args(rate_mbit))
    run("tc", "-n", dev.namespace, "qdisc", "replace", "dev", "eth0", "root", *_tbf_args(rate_mbit))


def set_rate(dir: Path | str, rate_mbit: float) -> None:
    """Reshape every link of the running tier to ``rate_mbit`` (both directions)."""
    st = State(Path(dir))
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
             python: str | None = None, timeout: float = 20.0, prefix: str = NS_PREFIX, bridge: str = BRIDGE,
             subnet: str = SUBNET) -> NetnsTestbed:
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
    prefix, bridge, subnet
        The tier's names: namespaces ``<prefix><i>``, the bridge, and the first three
        octets of its /24 (default ``et-``, ``etbr0``, ``10.77.0.``, the user's tier;
        ``**asdict(NetnsNames.tagged())`` gives private ones).

    Returns
    -------
    NetnsTestbed

    Raises
    ------
    NetnsError
        Not root, sshd missing, names too long (Linux: 15 characters per interface),
        names or addresses taken, or a step failed (everything created so far is removed
        again).
    """
    why = unavailable_reason()
    if why:
        raise NetnsError(f"the namespace testbed {why}")
    names = NetnsNames(prefix, bridge, subnet)
    names.check(n)
    d = Path(dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    if (d / STATE_FILE).exists():
        netns_down(d)
    taken = names.conflicts(n)
    if taken:
        raise NetnsError(f"{taken} already exist (another namespace testbed?). Fix: run 'edgetrain "
                         "netns-testbed down --dir DIR' with its directory (for the default names "
                         "et-N/etbr0: 'edgetrain netns-testbed down --force'), or use other names")
    python = python or sys.executable
    st = State(d)
    st.set_names(names)
    try:
        return _build(d, n, rate_mbit, advertise, python, timeout, st)
    except BaseException:
        netns_down(d)
        raise


def _build(d: Path, n: int, rate_mbit: float, advertise: bool, python: str, timeout: float,
           st: State) -> NetnsTestbed:
    user = getpass.getuser()
    client = _key(d / "client_key", f"edgetrain-netns@{user}")
    pub = client.export_public_key("openssh").decode().strip()
    (d / "client_key.pub").write_text(pub + "\n")
    (d / "authorized_keys").write_text(pub + "\n")
    names = st.names
    run("ip", "link", "add", names.bridge, "type", "bridge")
    st.add("bridge", names.bridge)
    run("ip", "addr", "add", f"{names.bridge_addr}/24", "dev", names.bridge)
    run("ip", "link", "set", names.bridge, "up")
    devices = []
    for i in range(n):
        dev = NetnsDevice(name=f"et{i}", namespace=names.namespace(i), host=names.host(i), veth=names.veth(i))
        (d / "devices" / dev.name / "work").mkdir(parents=True, exist_ok=True)
        run("ip", "netns", "add", dev.namespace)
        st.add("namespaces", dev.namespace)
        run("ip", "link", "add", dev.veth, "type", "veth", "peer", "name", "eth0", "netns", dev.namespace)
        st.add("veths", dev.veth)
        run("ip", "link", "set", dev.veth, "master", names.bridge)
        run("ip", "link", "set", dev.veth, "up")
        run("ip", "-n", dev.namespace, "link", "set", "lo", "up")
        run("ip", "-n", dev.namespace, "addr", "add", f"{dev.host}/24", "dev", "eth0")
        run("ip", "-n", dev.namespace, "link", "set", "eth0", "up")
        _shape(dev, rate_mbit)
        _key(d / "devices" / dev.name / "host_key", f"{dev.name}@edgetrain-netns")
        dev.sshd_pid = _start_sshd(d, dev)
        _record_pid(st, dev.sshd_pid)
        devices.append(dev)
    st.add("rate_mbit", rate_mbit)
    ready_files = []
    if advertise:
        for dev in devices:
            dev.advertiser_pid, ready = _start_advertiser(d, dev, python)
            _record_pid(st, dev.advertiser_pid)
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
    tb = NetnsTestbed(d, devices, rate_mbit, d / "inventory.yaml", d / "known_hosts", d / "client_key",
                      names.bridge, names.bridge_addr)
    _write_files(tb, python)
    return tb


def _write_files(tb: NetnsTestbed, python: str) -> None:
    lines = []
    for dev in tb.devices:
        key = asyncssh.read_private_key(str(tb.dir / "devices" / dev.name / "host_key"))
        lines.append(f"{dev.host} {key.export_public_key('openssh').decode().strip()}\n")
    atomic_write_text(tb.known_hosts_path, "".join(lines))
    inv = {"version": 1, "known_hosts": tb.known_hosts_path.name, "devices": [{
        "name": dev.name, "host": dev.host, "port": 22, "user": getpass.getuser(), "key": "client_key",
        "python": python, "workdir": str(tb.dir / "devices" / dev.name / "work"),
        "labels": {"testbed": "netns", "rate_mbit": f"{tb.rate_mbit:g}"}} for dev in tb.devices]}
    tb.inventory_path.write_text("# Written by `edgetrain netns-testbed up`.\n" + yaml.safe_dump(inv, sort_keys=False))


def netns_info(dir: Path | str) -> NetnsTestbed | None:
    """The namespace tier recorded in ``dir``, or None."""
    d = Path(dir).resolve()
    st = State(d)
    if not st.load() or not st.data["devices"]:
        return None
    names = st.names
    return NetnsTestbed(d, [NetnsDevice(**x) for x in st.data["devices"]], float(st.data["rate_mbit"] or 0),
                        d / "inventory.yaml", d / "known_hosts", d / "client_key", names.bridge, names.bridge_addr)


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
    st = State(tb.dir)
    st.load()
    dev.sshd_pid = _start_sshd(tb.dir, dev)
    st.data["devices"] = [asdict(x) for x in tb.devices]
    _record_pid(st, dev.sshd_pid)
    _wait_ssh(dev.host, 60)
    return key.get_fingerprint("sha256")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which a reused PID does not share."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record_pid(st: State, pid: int) -> None:
    st.data.setdefault("started", {})[str(pid)] = _started(pid)
    st.add("pids", pid)


def _same_process(pid: int, rec: dict) -> bool:
    """``pid`` is alive and still the process the state recorded (not a reused PID)."""
    started = rec.get("started") or {}
    if str(pid) not in started:  # a state file written before start times were recorded
        return _alive(pid)
    return started[str(pid)] is not None and _started(pid) == started[str(pid)]


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
    out = run("ip", "netns", "pids", ns, check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def netns_down(dir: Path | str | None = None, force: bool = False) -> bool:
    """Remove what ``netns_up`` created in ``dir``: processes, namespaces, links, state.

    Only what ``dir``'s state file records is removed: a namespace or bridge of another
    tier, or one made by hand, is left alone even when its name looks like ours.
    ``force`` (the CLI's ``down --force``) also removes namespaces ``<prefix><n>`` and the
    bridge of this testbed's names that no state file records (leftovers of a crashed
    run): the names ``dir`` records, or the defaults ``et-<n>``/``etbr0`` when it records
    none.  Returns whether anything was removed.
    """
    st = State(Path(dir).resolve()) if dir is not None else None
    recorded = bool(st and st.load())
    rec = (st or State(Path())).data  # nothing recorded: no resources, the default names
    names = NetnsNames.from_state(rec)
    ours = list(rec["namespaces"])
    if force:
        ours += sorted(ns for ns in namespaces() if names.owns(ns))
    ours = list(dict.fromkeys(ours))
    pids = [p for ns in ours for p in _ns_pids(ns)]
    pids += [p for p in rec["pids"] if _same_process(p, rec) and p not in pids]
    # every process in our namespaces is ours: sshd, its sessions, probes, workers
    _kill(pids)
    removed = bool(pids)
    for ns in ours:
        if ns in namespaces():
            run("ip", "netns", "del", ns, check=False)
            removed = True
    for veth in rec["veths"]:
        if link_exists(veth):
            run("ip", "link", "del", veth, check=False)
    bridges = [rec["bridge"]] if rec["bridge"] else []
    if force and names.bridge not in bridges:
        bridges.append(names.bridge)
    for br in bridges:
        if link_exists(br):
            run("ip", "link", "del", br, check=False)
            removed = True
    if recorded and st:
        st.path.unlink(missing_ok=True)
        removed = True
    return removed


__all__ = ["BRIDGE", "BRIDGE_ADDR", "NS_PREFIX", "STATE_FILE", "SUBNET", "NetnsDevice", "NetnsError", "NetnsNames",
           "NetnsTestbed", "netns_down", "netns_info", "netns_up", "rekey", "set_rate", "unavailable_reason"]
