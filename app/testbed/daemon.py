"""The local testbed as a background process: ``edgetrain testbed up|down|status``.

:func:`start_testbed` starts ``python -m app.testbed.daemon serve`` detached, which runs a
:class:`~app.testbed.local.Testbed` until it is told to stop; ``state.json`` in the testbed
directory names the daemon (pid and start time, so a recycled pid is never mistaken for
it).  :func:`stop_testbed` ends the daemon and every command session its devices started.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from app.paths import atomic_write_text
from app.testbed.emulation import TestbedError, parse_size, plan_devices
from app.testbed.local import (
    DEFAULT_BASE_ADDR,
    DEFAULT_PORT,
    DeviceInfo,
    DeviceStatus,
    Testbed,
    TestbedInfo,
    device_addresses,
    is_alive,
    kill_sessions,
    read_pids,
    resolve_dir,
    wait_gone,
)

PKG_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("edgetrain.testbed")
# Daemons started by this process, kept so they can be reaped (no zombie, no ResourceWarning).
_DAEMONS: dict[int, subprocess.Popen[bytes]] = {}


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
        if abs(p.create_time() - float(state["pid_create_time"])) > 0.5 or not is_alive(p):
            return None
        return p
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def testbed_info(dir: str | os.PathLike[str] | None = None) -> TestbedInfo | None:
    """The testbed whose daemon is running in ``dir``, or None."""
    d = resolve_dir(dir)
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
                  threads: int | None = None, timeout: float = 15.0, cgroups: bool | None = None) -> TestbedInfo:
    """Start the testbed daemon in the background and wait until every device answers SSH.

    Parameters
    ----------
    dir : path, optional
        Testbed directory (default :func:`default_testbed_dir`).
    n_devices, preset, device_presets, mem_overrides, threads
        What to emulate; see :func:`app.testbed.emulation.plan_devices`.
    base_addr : str
        Address of the first device; the others follow (127.0.10.1, 127.0.10.2, ...).
    port : int
        SSH port on every address (0: a free port per device).
    timeout : float
        Seconds to wait for the devices.
    cgroups : bool, optional
        Real board limits (a cgroup per device: physical memory, CPU quota); None: when
        running as root.  False caps address space (``RLIMIT_AS``) instead.

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
    d = resolve_dir(dir)
    plan_devices(n_devices, preset, device_presets, mem_overrides, threads)  # fail here, early
    device_addresses(base_addr, 1)
    state = _read_state(d)
    if state is not None and _daemon_process(state) is not None:
        raise TestbedError(f"a testbed is already running in {d} (pid {state['pid']}); "
                           "run `edgetrain testbed down` first")
    stop_testbed(d)  # leftovers of a daemon that died
    d.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "app.testbed.daemon", "serve", "--dir", str(d),
            "--base-addr", base_addr, "--port", str(port)]
    if n_devices is not None:
        argv += ["--devices", str(n_devices)]
    if preset:
        argv += ["--preset", preset]
    if device_presets:
        argv += ["--device-presets", ",".join(device_presets)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if cgroups is False:
        argv += ["--no-cgroups"]
    argv += _mem_args(mem_overrides)
    log_path = d / "testbed.log"
    with open(log_path, "ab") as logf:
        offset = logf.tell()
        # cwd: `python -m` puts it on sys.path, so `app` imports without touching PYTHONPATH
        # (which the device commands inherit).
        proc = subprocess.Popen(argv, cwd=PKG_ROOT, stdin=subprocess.DEVNULL, stdout=logf,
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
    d = resolve_dir(dir)
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
            if not wait_gone([daemon], wait):
                break
        child = _DAEMONS.pop(daemon.pid, None)
        if child is not None:
            child.poll()  # reap it
    if kill_sessions(read_pids(d / "pids")):
        running = True
    (d / "state.json").unlink(missing_ok=True)
    (d / "pids").unlink(missing_ok=True)
    return running


def testbed_status(dir: str | os.PathLike[str] | None = None,
                   timeout: float = 1.0) -> list[DeviceStatus]:
    """Each device of the testbed in ``dir`` and whether it answers SSH (empty: none)."""
    d = resolve_dir(dir)
    state = _read_state(d)
    if state is None:
        return []
    out = []
    for x in _info_from_state(d, state).devices:
        ok, detail = _probe(x.host, x.port, timeout)
        out.append(DeviceStatus(x.name, x.host, x.port, x.preset, ok, detail, x.mem_cap, x.cpu_share))
    return out


async def _serve(ns: argparse.Namespace) -> None:
    tb = Testbed(ns.dir, ns.devices, ns.preset, ns.base_addr, ns.port, ns.device_presets,
                 _parse_mem_args(ns.mem), ns.threads, cgroups=False if ns.no_cgroups else None)
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
        atomic_write_text(tb.dir / "state.json", json.dumps(state, indent=2))  # atomic: `up` polls for it
        await stop.wait()
        log.info("stopping")
    st = _read_state(tb.dir)
    if st is not None and st.get("pid") == os.getpid():
        (tb.dir / "state.json").unlink(missing_ok=True)


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Parser for ``python -m app.testbed.daemon up|down|status|serve``."""
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
            p.add_argument("--no-cgroups", action="store_true",
                           help="cap memory with RLIMIT_AS even as root (no physical limit, no CPU quota)")
    return parser


def _fmt_mem(n: int | None) -> str:
    return "no cap" if n is None else f"{n / 1024**3:.1f} GiB"


def _fmt_cap(kind: str, n: int | None) -> str:
    if n is None:
        return "none"
    return "physical, cgroup" if kind == "cgroup" else "address space, RLIMIT_AS: not root"


def _fmt_cpu(share: float | None) -> str:
    return f"  cpu {share:.2f} cores (cgroup quota)" if share else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m app.testbed.daemon``; returns the exit status."""
    ns = build_parser().parse_args(argv)
    try:
        if ns.action == "serve":
            logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                                format="%(asctime)s %(levelname)s %(message)s")
            asyncio.run(_serve(ns))
        elif ns.action == "up":
            info = start_testbed(ns.dir, ns.devices, ns.preset, ns.base_addr, ns.port,
                                 ns.device_presets, _parse_mem_args(ns.mem), ns.threads,
                                 cgroups=False if ns.no_cgroups else None)
            print(f"testbed up (pid {info.pid}) in {info.dir}")
            for x in info.devices:
                print(f"  {x.name:<10} {x.host}:{x.port:<6} {x.preset:<12} "
                      f"mem {_fmt_mem(x.mem_bytes):<8} ({_fmt_cap(x.mem_cap, x.mem_bytes)}) threads {x.threads}"
                      f"{_fmt_cpu(x.cpu_share)}")
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
                      f"{'up' if s.reachable else 'DOWN'}  memory: {s.mem_cap}{_fmt_cpu(s.cpu_share)}  {s.detail}")
            return 0 if all(s.reachable for s in statuses) else 1
    except (TestbedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
