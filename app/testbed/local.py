"""A local testbed of emulated edge devices, each a real SSH endpoint (no root needed).

Every device is an asyncssh server on its own loopback address (127.0.10.1, 127.0.10.2, ...;
all of 127.0.0.0/8 reaches ``lo`` on Linux) with its own ed25519 host key, key-only auth for
the current user name, and a home directory ``<dir>/devices/<name>/home``. Commands run as
real ``/bin/sh -c CMD`` subprocesses, in their own session, under the device's emulation
(:mod:`app.testbed.emulation`; the per-device server is :mod:`app.testbed.server`). Like OpenSSH without a pty: output streams live, the exit status
or exit *signal* is reported, the session waits until the command's stdout/stderr close, a
client signal request is sent to the command's process group, and a client that goes away
only closes the pipes (a command dies of SIGPIPE on its next write, or keeps running). SFTP
and scp are served chrooted at the device's home.

Files in the testbed directory (``$EDGETRAIN_HOME/testbed``, ``~/.edgetrain/testbed``)::

    client_key, client_key.pub   the only key authorized on every device (ed25519)
    known_hosts                  OpenSSH format, "[ip]:port key" per device
    inventory.yaml               devices for the rest of EdgeTrain
    state.json                   daemon pid, devices, start time (:mod:`app.testbed.daemon`)
    pids                         "pid start-time device" of every command session
    testbed.log                  the daemon's log
    devices/<name>/host_key      kept across restarts, so known_hosts stays valid
    devices/<name>/home/         cwd, $HOME and SFTP root of the device's commands
"""

from __future__ import annotations

import asyncio
import getpass
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import psutil
import yaml

from app.paths import atomic_write_text
from app.testbed import cgroups as cgroup_limits
from app.testbed.emulation import TestbedError, plan_devices
from app.testbed.server import EmulatedDevice

log = logging.getLogger("edgetrain.testbed")

DEFAULT_BASE_ADDR = "127.0.10.1"
DEFAULT_PORT = 2222


@dataclass
class DeviceInfo:
    """One emulated device as the rest of EdgeTrain sees it."""

    name: str
    host: str
    port: int
    preset: str
    mem_bytes: int | None
    threads: int
    home: Path
    host_key: Path
    mem_cap: str = "address-space"     # what enforces mem_bytes: "cgroup" (physical) or "address-space"
    cpu_share: float | None = None     # CPU quota in host cores (cgroup), None: not capped


@dataclass
class TestbedInfo:
    """A running testbed: its devices and the files to reach them."""

    __test__ = False

    dir: Path
    devices: list[DeviceInfo]
    inventory_path: Path
    known_hosts_path: Path
    client_key_path: Path
    log_path: Path | None = None
    pid: int | None = None
    started: str = ""


@dataclass
class DeviceStatus:
    """Reachability of one device (``detail``: the SSH banner or the error)."""

    name: str
    host: str
    port: int
    preset: str
    reachable: bool
    detail: str = ""
    mem_cap: str = "address-space"
    cpu_share: float | None = None


def default_testbed_dir() -> Path:
    """``$EDGETRAIN_HOME/testbed``, with ``EDGETRAIN_HOME`` defaulting to ``~/.edgetrain``."""
    return Path(os.environ.get("EDGETRAIN_HOME", "~/.edgetrain")).expanduser() / "testbed"


def resolve_dir(d: str | os.PathLike[str] | None) -> Path:
    return (Path(d).expanduser() if d is not None else default_testbed_dir()).resolve()


# ---------------------------------------------------------------- keys and files

def _write_private(path: Path, data: bytes) -> None:
    # 0600 from the start: OpenSSH refuses keys that others can read.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_or_create_key(path: Path, comment: str) -> asyncssh.SSHKey:
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    _write_private(path, key.export_private_key())
    return key


def _public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def device_addresses(base: str, n: int) -> list[str]:
    try:
        first = ipaddress.IPv4Address(base)
    except ValueError:
        raise TestbedError(f"--base-addr {base!r} is not an IPv4 address") from None
    return [str(first + i) for i in range(n)]


# ---------------------------------------------------------------- process tracking

def read_pids(path: Path) -> list[tuple[int, float]]:
    entries = []
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                entries.append((int(parts[0]), float(parts[1])))
    except (OSError, ValueError):
        pass
    return entries


def is_alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    # psutil.wait_procs waits on zombies that nobody reaps (PID 1 in some containers): a
    # zombie is dead for our purposes.
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if is_alive(p)]
    return alive


def kill_sessions(entries: Sequence[tuple[int, float]], grace: float = 1.0) -> int:
    """Kill every live process of the recorded command sessions; return how many.

    Each command is a session leader (sid == pid), so its background children share its sid
    even after it exits. The start time (psutil: ~1 s resolution) guards against a recycled
    pid.
    """
    starts = dict(entries)
    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["create_time"]):
        try:
            sid = os.getsid(p.pid)
        except OSError:
            continue
        t0 = starts.get(sid)
        if t0 is not None and p.pid != me and p.info["create_time"] >= t0 - 2.0 and is_alive(p):
            procs.append(p)
    found = len(procs)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        procs = wait_gone(procs, wait)
        if not procs:
            break
    return found


class _ProcessTracker:
    """Records each command session in memory and in ``DIR/pids``.

    The file lets ``stop_testbed`` kill leftovers even when the daemon died of SIGKILL.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[tuple[int, float]] = []

    def add(self, pid: int, t0: float, device: str) -> None:
        self.entries.append((pid, t0))
        with open(self.path, "a") as f:
            f.write(f"{pid} {t0:.3f} {device}\n")


# ---------------------------------------------------------------- in-process testbed

class Testbed:
    """Emulated devices served from the running asyncio loop (tests, the daemon).

    Examples
    --------
    >>> async with Testbed(tmp_path, n_devices=2, port=0) as tb:   # doctest: +SKIP
    ...     conn = await asyncssh.connect(tb.devices[0].host, tb.devices[0].port,
    ...         client_keys=[tb.client_key_path], known_hosts=str(tb.known_hosts_path))

    ``port=0`` gives every device its own free port (tests); the default, 2222 on every
    address, is what ``edgetrain testbed up`` uses. Arguments as in :func:`start_testbed`.
    """

    __test__ = False

    def __init__(self, dir: str | os.PathLike[str] | None = None, n_devices: int | None = None,
                 preset: str | None = None, base_addr: str = DEFAULT_BASE_ADDR,
                 port: int = DEFAULT_PORT, device_presets: Sequence[str] | None = None,
                 mem_overrides: Mapping[str | int, int | str | None] | int | str | None = None,
                 threads: int | None = None, cgroups: bool | None = None) -> None:
        self.dir = resolve_dir(dir)
        # real board limits as root (None: when possible), else address-space caps
        self.use_cgroups = cgroups if cgroups is not None else cgroup_limits.unavailable_reason() is None
        self.specs = plan_devices(n_devices, preset, device_presets, mem_overrides, threads)
        self.addresses = device_addresses(base_addr, len(self.specs))
        self.port = port
        self.inventory_path = self.dir / "inventory.yaml"
        self.known_hosts_path = self.dir / "known_hosts"
        self.client_key_path = self.dir / "client_key"
        self.devices: list[DeviceInfo] = []
        self.started = ""
        self._devices: list[EmulatedDevice] = []
        self._tracker = _ProcessTracker(self.dir / "pids")

    async def __aenter__(self) -> Testbed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def info(self) -> TestbedInfo:
        """The testbed as a :class:`TestbedInfo` (no daemon pid)."""
        return TestbedInfo(self.dir, list(self.devices), self.inventory_path,
                           self.known_hosts_path, self.client_key_path, started=self.started)

    async def start(self) -> None:
        """Create keys, listen on every device address and write the inventory files.

        Raises
        ------
        TestbedError
            If an address cannot be bound (the message says which and what to do).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        user = getpass.getuser()
        client_key = _load_or_create_key(self.client_key_path, f"edgetrain-testbed@{user}")
        pub = self.client_key_path.with_name("client_key.pub")
        pub.write_text(_public_line(client_key) + "\n")
        authorized = asyncssh.import_authorized_keys(_public_line(client_key) + "\n")
        try:
            for spec, addr in zip(self.specs, self.addresses):
                ddir = self.dir / "devices" / spec.name
                (ddir / "home").mkdir(parents=True, exist_ok=True)
                key = _load_or_create_key(ddir / "host_key", f"{spec.name}@edgetrain-testbed")
                dev = EmulatedDevice(spec, addr, ddir / "home", key, user, authorized,
                                     self._tracker.add, cgroup=self._cgroup(spec))
                await dev.listen(self.port)
                self._devices.append(dev)
        except BaseException:
            await self.stop()
            raise
        self.devices = [
            DeviceInfo(d.spec.name, d.host, d.port, d.spec.preset.name, d.spec.mem_bytes,
                       d.spec.threads, d.home, d.home.parent / "host_key", d.mem_kind,
                       d.spec.cpu_share if d.cgroup is not None else None)
            for d in self._devices]
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write_files()
        log.info("testbed up: %s", ", ".join(f"{d.name}={d.host}:{d.port}" for d in self.devices))

    def _cgroup(self, spec) -> cgroup_limits.DeviceCgroup | None:
        if not self.use_cgroups:
            return None
        try:
            return cgroup_limits.create(self.dir, spec.name, spec.mem_bytes, spec.cpu_share)
        except OSError as exc:
            log.warning("%s: no cgroup limits (%s); capping address space instead", spec.name, exc)
            return None

    def _write_files(self) -> None:
        lines = []
        for d, dev in zip(self.devices, self._devices):
            pattern = d.host if d.port == 22 else f"[{d.host}]:{d.port}"
            lines.append(f"{pattern} {_public_line(dev.host_key.convert_to_public())}\n")
        atomic_write_text(self.known_hosts_path, "".join(lines))
        inventory = {
            "version": 1,
            "devices": [{
                "name": d.name, "host": d.host, "port": d.port, "user": getpass.getuser(),
                "key": self.client_key_path.name, "python": sys.executable,
                # the planner reads what the cap means (physical or address space) and the speed
                "labels": {"preset": d.preset, "testbed": "local", "mem_cap": d.mem_cap,
                           **({"cpu_share": f"{d.cpu_share:.4g}"} if d.cpu_share else {})},
            } for d in self.devices],
            "known_hosts": self.known_hosts_path.name,
        }
        header = "# Written by `edgetrain testbed up`; relative paths are relative to this file.\n"
        atomic_write_text(self.inventory_path, header + yaml.safe_dump(inventory, sort_keys=False))

    async def stop(self) -> None:
        """Kill every command the devices started, close connections, stop listening."""
        for dev in self._devices:
            dev.stop_listening()
        # Kill first so clients still attached see the exit signal, as when a board halts.
        await asyncio.to_thread(kill_sessions, list(self._tracker.entries))
        await asyncio.sleep(0.05)
        for dev in self._devices:
            await dev.close()
        if self.use_cgroups:
            # also after a start that failed between creating a device's cgroup and
            # listening (its device is not in _devices then); removes nothing if none exist
            await asyncio.to_thread(cgroup_limits.remove, self.dir)
        self._devices.clear()
        self._tracker.path.unlink(missing_ok=True)
