"""A local testbed of emulated edge devices, each a real SSH endpoint (no root needed).

Every device is an asyncssh server on its own loopback address (127.0.10.1, 127.0.10.2, ...;
all of 127.0.0.0/8 reaches ``lo`` on Linux) with its own ed25519 host key, key-only auth for
the current user name, and a home directory ``<dir>/devices/<name>/home``. Commands run as
real ``/bin/sh -c CMD`` subprocesses, in their own session, under the device's emulation
(:mod:`app.core.emulation`, which also holds the per-device server). Like OpenSSH without a pty: output streams live, the exit status
or exit *signal* is reported, the session waits until the command's stdout/stderr close, a
client signal request is sent to the command's process group, and a client that goes away
only closes the pipes (a command dies of SIGPIPE on its next write, or keeps running). SFTP
and scp are served chrooted at the device's home.

Files in the testbed directory (``$EDGETRAIN_HOME/testbed``, ``~/.edgetrain/testbed``)::

    client_key, client_key.pub   the only key authorized on every device (ed25519)
    known_hosts                  OpenSSH format, "[ip]:port key" per device
    inventory.yaml               devices for the rest of EdgeTrain
    state.json                   daemon pid, devices, start time (daemon only)
    pids                         "pid start-time device" of every command session
    testbed.log                  the daemon's log
    devices/<name>/host_key      kept across restarts, so known_hosts stays valid
    devices/<name>/home/         cwd, $HOME and SFTP root of the device's commands
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncssh
import psutil
import yaml

from app.core.emulation import EmulatedDevice, TestbedError, parse_size, plan_devices

__all__ = [
    "DEFAULT_BASE_ADDR", "DEFAULT_PORT", "DeviceInfo", "DeviceStatus", "Testbed", "TestbedError",
    "TestbedInfo", "build_parser", "default_testbed_dir", "main", "start_testbed",
    "stop_testbed", "testbed_info", "testbed_status",
]

log = logging.getLogger("edgetrain.testbed")

DEFAULT_BASE_ADDR = "127.0.10.1"
DEFAULT_PORT = 2222
_PKG_ROOT = Path(__file__).resolve().parents[2]
# Daemons started by this process, kept so they can be reaped (no zombie, no ResourceWarning).
_DAEMONS: dict[int, subprocess.Popen[bytes]] = {}


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


def default_testbed_dir() -> Path:
    """``$EDGETRAIN_HOME/testbed``, with ``EDGETRAIN_HOME`` defaulting to ``~/.edgetrain``."""
    return Path(os.environ.get("EDGETRAIN_HOME", "~/.edgetrain")).expanduser() / "testbed"


def _resolve_dir(d: str | os.PathLike[str] | None) -> Path:
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


def _device_addresses(base: str, n: int) -> list[str]:
    try:
        first = ipaddress.IPv4Address(base)
    except ValueError:
        raise TestbedError(f"--base-addr {base!r} is not an IPv4 address") from None
    return [str(first + i) for i in range(n)]


# ---------------------------------------------------------------- process tracking

def _read_pids(path: Path) -> list[tuple[int, float]]:
    entries = []
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                entries.append((int(parts[0]), float(parts[1])))
    except (OSError, ValueError):
        pass
    return entries


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    # psutil.wait_procs waits on zombies that nobody reaps (PID 1 in some containers): a
    # zombie is dead for our purposes.
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _alive(p)]
    return alive


def _kill_sessions(entries: Sequence[tuple[int, float]], grace: float = 1.0) -> int:
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
        if t0 is not None and p.pid != me and p.info["create_time"] >= t0 - 2.0 and _alive(p):
            procs.append(p)
    found = len(procs)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        procs = _wait_gone(procs, wait)
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
                 threads: int | None = None) -> None:
        self.dir = _resolve_dir(dir)
        self.specs = plan_devices(n_devices, preset, device_presets, mem_overrides, threads)
        self.addresses = _device_addresses(base_addr, len(self.specs))
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
                                     self._tracker.add)
                await dev.listen(self.port)
                self._devices.append(dev)
        except BaseException:
            await self.stop()
            raise
        self.devices = [
            DeviceInfo(d.spec.name, d.host, d.port, d.spec.preset.name, d.spec.mem_bytes,
                       d.spec.threads, d.home, d.home.parent / "host_key")
            for d in self._devices]
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write_files()
        log.info("testbed up: %s", ", ".join(f"{d.name}={d.host}:{d.port}" for d in self.devices))

    def _write_files(self) -> None:
        lines = []
        for d, dev in zip(self.devices, self._devices):
            pattern = d.host if d.port == 22 else f"[{d.host}]:{d.port}"
            lines.append(f"{pattern} {_public_line(dev.host_key.convert_to_public())}\n")
        self.known_hosts_path.write_text("".join(lines))
        inventory = {
            "version": 1,
            "devices": [{
                "name": d.name, "host": d.host, "port": d.port, "user": getpass.getuser(),
                "key": self.client_key_path.name, "python": sys.executable,
                "labels": {"preset": d.preset, "testbed": "local"},
            } for d in self.devices],
            "known_hosts": self.known_hosts_path.name,
        }
        header = "# Written by `edgetrain testbed up`; relative paths are relative to this file.\n"
        self.inventory_path.write_text(header + yaml.safe_dump(inventory, sort_keys=False))

    async def stop(self) -> None:
        """Kill every command the devices started, close connections, stop listening."""
        for dev in self._devices:
            dev.stop_listening()
        # Kill first so clients still attached see the exit signal, as when a board halts.
        await asyncio.to_thread(_kill_sessions, list(self._tracker.entries))
        await asyncio.sleep(0.05)
        for dev in self._devices:
            await dev.close()
        self._devices.clear()
        self._tracker.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- the daemon and its control

def _read_state(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _info_from_state(d: Path, state: Mapping[str, Any]) -> TestbedInfo:
    devices = [DeviceInfo(**{**x, "home": Path(x["home"]), "host_key": Path(x["host_key"])})
               for x in state["devices"]]
    return TestbedInfo(d, devices, d / "inventory.yaml", d / "known_hosts", d / "client_key",
                       d / "testbed.log", state.get("pid"), state.get("started", ""))


def _daemon_process(state: Mapping[str, Any]) -> psutil.Process | None:
    """The live daemon of ``state``, or None (a recycled pid has another start time)."""
    try:
        p = psutil.Process(int(state["pid"]))
        if abs(p.create_time() - float(state["pid_create_time"])) > 0.5 or not _alive(p):
            return None
        return p
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def testbed_info(dir: str | os.PathLike[str] | None = None) -> TestbedInfo | None:
    """The testbed whose daemon is running in ``dir``, or None."""
    d = _resolve_dir(dir)
    state = _read_state(d)
    if state is None or _daemon_process(state) is None:
        return None
    return _info_from_state(d, state)


def _probe(host: str, port: int, timeout: float = 1.0) -> tuple[bool, str]:
    # Reading the banner shows an SSH server answers, without authenticating.
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            banner = s.recv(256).split(b"\r\n")[0].decode(errors="replace")
    except OSError as exc:
        return False, str(exc)
    return banner.startswith("SSH-"), banner or "no SSH banner"


def _tail(path: Path, offset: int = 0, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _mem_args(mem_overrides: Mapping[str | int, int | str | None] | int | str | None
              ) -> list[str]:
    if mem_overrides is None:
        return []
    if not isinstance(mem_overrides, Mapping):
        mem_overrides = {"all": mem_overrides}
    out = []
    for k, v in mem_overrides.items():
        out += ["--mem", f"{k}={'none' if v is None else parse_size(v)}"]
    return out


def _parse_mem_args(values: Sequence[str] | None
                    ) -> dict[str | int, int | None] | int | None:
    if not values:
        return None
    out: dict[str | int, int | None] = {}
    for item in values:
        key, sep, size = item.rpartition("=")
        key = key or "all"
        mem = None if size.lower() in ("none", "unlimited") else parse_size(size)
        if key == "all":
            if len(values) == 1:
                return mem
            raise ValueError("--mem all=SIZE cannot be combined with per-device --mem")
        out[int(key) if key.isdigit() else key] = mem
    return out


def start_testbed(dir: str | os.PathLike[str] | None = None, n_devices: int | None = None,
                  preset: str | None = None, base_addr: str = DEFAULT_BASE_ADDR,
                  port: int = DEFAULT_PORT, device_presets: Sequence[str] | None = None,
                  mem_overrides: Mapping[str | int, int | str | None] | int | str | None = None,
                  threads: int | None = None, timeout: float = 15.0) -> TestbedInfo:
    """Start the testbed daemon in the background and wait until every device answers SSH.

    Parameters
    ----------
    dir : path, optional
        Testbed directory (default :func:`default_testbed_dir`).
    n_devices, preset, device_presets, mem_overrides, threads
        What to emulate; see :func:`app.core.emulation.plan_devices`.
    base_addr : str
        Address of the first device; the others follow (127.0.10.1, 127.0.10.2, ...).
    port : int
        SSH port on every address (0: a free port per device).
    timeout : float
        Seconds to wait for the devices.

    Returns
    -------
    TestbedInfo

    Raises
    ------
    TestbedError
        If a testbed already runs in ``dir``, or the daemon fails or is not ready in time
        (the message includes the end of ``testbed.log``).
    ValueError
        For an invalid device plan.
    """
    d = _resolve_dir(dir)
    plan_devices(n_devices, preset, device_presets, mem_overrides, threads)  # fail here, early
    _device_addresses(base_addr, 1)
    state = _read_state(d)
    if state is not None and _daemon_process(state) is not None:
        raise TestbedError(f"a testbed is already running in {d} (pid {state['pid']}); "
                           "run `edgetrain testbed down` first")
    stop_testbed(d)  # leftovers of a daemon that died
    d.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "app.core.testbed", "serve", "--dir", str(d),
            "--base-addr", base_addr, "--port", str(port)]
    if n_devices is not None:
        argv += ["--devices", str(n_devices)]
    if preset:
        argv += ["--preset", preset]
    if device_presets:
        argv += ["--device-presets", ",".join(device_presets)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    argv += _mem_args(mem_overrides)
    log_path = d / "testbed.log"
    with open(log_path, "ab") as logf:
        offset = logf.tell()
        # cwd: `python -m` puts it on sys.path, so `app` imports without touching PYTHONPATH
        # (which the device commands inherit).
        proc = subprocess.Popen(argv, cwd=_PKG_ROOT, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise TestbedError(f"the testbed daemon exited with status {rc}:\n"
                               f"{_tail(log_path, offset)}")
        state = _read_state(d)
        if state is not None and state.get("pid") == proc.pid:
            info = _info_from_state(d, state)
            if all(_probe(x.host, x.port)[0] for x in info.devices):
                _DAEMONS[proc.pid] = proc
                return info
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            stop_testbed(d)
            raise TestbedError(f"the testbed was not ready after {timeout:.0f} s "
                               f"(log: {log_path}):\n{_tail(log_path, offset)}")
        time.sleep(0.05)


def stop_testbed(dir: str | os.PathLike[str] | None = None, grace: float = 5.0) -> bool:
    """Stop the daemon (SIGTERM, SIGKILL after ``grace`` s) and kill what its devices started.

    Commands are found through ``DIR/pids``, so this also cleans up after a daemon that was
    killed. Returns whether anything was still running.
    """
    d = _resolve_dir(dir)
    for pid, child in list(_DAEMONS.items()):
        if child.poll() is not None:  # died on its own: reap it
            del _DAEMONS[pid]
    state = _read_state(d)
    running = False
    daemon = _daemon_process(state) if state is not None else None
    if daemon is not None:
        running = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                daemon.send_signal(sig)
            except psutil.Error:
                pass
            if not _wait_gone([daemon], wait):
                break
        child = _DAEMONS.pop(daemon.pid, None)
        if child is not None:
            child.poll()  # reap it
    if _kill_sessions(_read_pids(d / "pids")):
        running = True
    (d / "state.json").unlink(missing_ok=True)
    (d / "pids").unlink(missing_ok=True)
    return running


def testbed_status(dir: str | os.PathLike[str] | None = None,
                   timeout: float = 1.0) -> list[DeviceStatus]:
    """Each device of the testbed in ``dir`` and whether it answers SSH (empty: none)."""
    d = _resolve_dir(dir)
    state = _read_state(d)
    if state is None:
        return []
    out = []
    for x in _info_from_state(d, state).devices:
        ok, detail = _probe(x.host, x.port, timeout)
        out.append(DeviceStatus(x.name, x.host, x.port, x.preset, ok, detail))
    return out


async def _serve(ns: argparse.Namespace) -> None:
    tb = Testbed(ns.dir, ns.devices, ns.preset, ns.base_addr, ns.port, ns.device_presets,
                 _parse_mem_args(ns.mem), ns.threads)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with tb:
        me = psutil.Process()
        state = {"version": 1, "pid": me.pid, "pid_create_time": me.create_time(),
                 "started": tb.started, "devices": [
                     {**asdict(x), "home": str(x.home), "host_key": str(x.host_key)}
                     for x in tb.devices]}
        tmp = tb.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(tb.dir / "state.json")  # atomic: `up` polls for it
        await stop.wait()
        log.info("stopping")
    st = _read_state(tb.dir)
    if st is not None and st.get("pid") == os.getpid():
        (tb.dir / "state.json").unlink(missing_ok=True)


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Parser for ``python -m app.core.testbed up|down|status|serve``."""
    parser = argparse.ArgumentParser(prog="edgetrain testbed",
                                     description="Local testbed of emulated edge devices.")
    sub = parser.add_subparsers(dest="action", required=True)
    for name, text in (("up", "start the testbed daemon"), ("down", "stop it"),
                       ("status", "show the devices"), ("serve", "run in the foreground")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, default=None,
                       help="testbed directory (default $EDGETRAIN_HOME/testbed)")
        if name in ("up", "serve"):
            p.add_argument("--devices", "-n", type=int, default=None)
            p.add_argument("--preset", default=None,
                           help="device preset or homogeneous/heterogeneous")
            p.add_argument("--device-presets", type=lambda s: s.split(","), default=None,
                           help="comma-separated preset per device")
            p.add_argument("--base-addr", default=DEFAULT_BASE_ADDR)
            p.add_argument("--port", type=int, default=DEFAULT_PORT)
            p.add_argument("--mem", action="append", metavar="DEVICE=SIZE",
                           help="memory cap override (device name, index or 'all'; 'none')")
            p.add_argument("--threads", type=int, default=None)
    return parser


def _fmt_mem(n: int | None) -> str:
    return "no cap" if n is None else f"{n / 1024**3:.1f} GiB"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m app.core.testbed``; returns the exit status."""
    ns = build_parser().parse_args(argv)
    try:
        if ns.action == "serve":
            logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                                format="%(asctime)s %(levelname)s %(message)s")
            asyncio.run(_serve(ns))
        elif ns.action == "up":
            info = start_testbed(ns.dir, ns.devices, ns.preset, ns.base_addr, ns.port,
                                 ns.device_presets, _parse_mem_args(ns.mem), ns.threads)
            print(f"testbed up (pid {info.pid}) in {info.dir}")
            for x in info.devices:
                print(f"  {x.name:<10} {x.host}:{x.port:<6} {x.preset:<12} "
                      f"mem {_fmt_mem(x.mem_bytes):<8} threads {x.threads}")
            print(f"inventory: {info.inventory_path}")
        elif ns.action == "down":
            print("testbed stopped" if stop_testbed(ns.dir) else "no testbed was running")
        else:
            statuses = testbed_status(ns.dir)
            if not statuses:
                print("no testbed")
                return 1
            for s in statuses:
                print(f"  {s.name:<10} {s.host}:{s.port:<6} {s.preset:<12} "
                      f"{'up' if s.reachable else 'DOWN'}  {s.detail}")
            return 0 if all(s.reachable for s in statuses) else 1
    except (TestbedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
