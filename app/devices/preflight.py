"""Preflight: can a worker run on each selected device?  Every failure comes with a fix.

Checks, per device (a failed check skips those that depend on it):

``ssh``          reachable, host key trusted, key authentication accepted
``python``       the inventory's interpreter runs the probe and is >= 3.10
``torch``        ``import torch`` works and the version is in the supported range
``torch-match``  every selected device has the same torch major.minor (gloo peers must)
``transformers`` installed and recent enough (the model code imports it)
``disk``         free space where the worker code and run files go
``clock``        skew against the controller (telemetry timestamps, run records)
``rendezvous``   a TCP port opened by this device is reachable from every other device
                 (rank 0's store and gloo's pairwise connections need exactly that)
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from app.devices.inventory import Device
from app.devices.probe_agent import ProbeAgent, ProfileError
from app.devices.ssh import HostKeyError, KnownHosts, SSHError, connect

PYTHON_MIN = (3, 10)
#: Mirrors pyproject.toml's ``torch>=2.4,<2.15``.
TORCH_MIN, TORCH_MAX = (2, 4), (2, 15)
TRANSFORMERS_MIN = (4, 45)
TORCH_PIN = "2.13.0"


@dataclass
class Check:
    """One check's outcome; ``fix`` is a concrete action when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    severity: str = "error"  # 'error' blocks a run, 'warning' does not


@dataclass
class DeviceReport:
    """All checks of one device."""

    name: str
    address: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok or c.severity != "error" for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def add(self, name: str, ok: bool, detail: str, fix: str = "", severity: str = "error") -> Check:
        check = Check(name, ok, detail, "" if ok else fix, severity)
        self.checks.append(check)
        return check


def _vtuple(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _pip(device: Device, spec: str) -> str:
    return f"{device.python} -m pip install '{spec}'"


def _check_python(rep: DeviceReport, dev: Device, hello: dict[str, Any]) -> bool:
    ver = hello.get("versions", {}).get("python")
    vt = _vtuple(ver)
    ok = vt is not None and vt >= PYTHON_MIN
    rep.add("python", ok, f"{dev.python} is Python {ver} ({hello.get('versions', {}).get('executable')})",
            f"install Python {PYTHON_MIN[0]}.{PYTHON_MIN[1]}+ on '{dev.name}' and set 'python:' in the "
            "inventory to it")
    return ok


def _check_torch(rep: DeviceReport, dev: Device, status: dict[str, Any]) -> tuple[int, ...] | None:
    if not status.get("ok"):
        rep.add("torch", False, f"{dev.python} cannot import torch: {status.get('error')}",
                f"install torch on '{dev.name}': {_pip(dev, f'torch=={TORCH_PIN}')} (CPU-only boards: add "
                "--index-url https://download.pytorch.org/whl/cpu; Jetson: NVIDIA's JetPack wheel), or set "
                "'python:' in the inventory to an interpreter that has torch")
        return None
    ver = status.get("full_version") or status.get("version")
    vt = _vtuple(ver)
    ok = vt is not None and TORCH_MIN <= vt < TORCH_MAX
    rep.add("torch", ok, f"torch {ver} (import took {status.get('seconds', 0):.1f} s)",
            f"torch {ver} is outside the supported range {TORCH_MIN[0]}.{TORCH_MIN[1]} to "
            f"<{TORCH_MAX[0]}.{TORCH_MAX[1]}: {_pip(dev, f'torch=={TORCH_PIN}')}")
    return vt if ok else None


async def _device_checks(dev: Device, conn: asyncssh.SSHClientConnection, rep: DeviceReport,
                         min_free_bytes: int, max_skew_s: float
                         ) -> tuple[ProbeAgent | None, tuple[int, ...] | None]:
    """The checks one device answers alone; returns its running agent and torch version."""
    tv = None
    agent = ProbeAgent(dev, conn)
    try:
        await agent.start()
    except (ProfileError, asyncssh.Error, OSError) as exc:
        rep.add("python", False, str(exc).split(". Fix: ")[0],
                str(exc).split("Fix: ", 1)[-1] if "Fix: " in str(exc) else
                f"check that '{dev.python}' runs on '{dev.name}' and that its workdir is writable")
        await agent.close()
        return None, None
    if not _check_python(rep, dev, agent.hello):
        return agent, None
    try:
        status = await agent.request("torch", timeout=180)
        tv = _check_torch(rep, dev, status)
        tf = agent.hello.get("versions", {}).get("transformers")
        tft = _vtuple(tf)
        rep.add("transformers", tft is not None and tft >= TRANSFORMERS_MIN,
                f"transformers {tf or 'not installed'}",
                f"{_pip(dev, f'transformers>={TRANSFORMERS_MIN[0]}.{TRANSFORMERS_MIN[1]}')}")
        disk = await agent.request("disk", path=".")
        free = int(disk["free_bytes"])
        rep.add("disk", free >= min_free_bytes,
                f"{free / 2**30:.1f} GiB free at {disk['path']}",
                f"free at least {min_free_bytes / 2**30:.1f} GiB on '{dev.name}' (old run files live in "
                f"{dev.workdir}), or set 'workdir:' in the inventory to a larger filesystem")
        t0 = time.time()
        remote = float((await agent.request("time"))["time"])
        t1 = time.time()
        skew = remote - (t0 + t1) / 2
        uncertainty = (t1 - t0) / 2
        rep.add("clock", abs(skew) <= max_skew_s + uncertainty,
                f"clock differs from the controller's by {skew:+.3f} s (+-{uncertainty:.3f} s)",
                f"synchronise the clocks: on '{dev.name}' and on this machine run "
                "'sudo timedatectl set-ntp true' (or install chrony), then check 'timedatectl status'")
    except ProfileError as exc:
        rep.add("probe", False, str(exc), f"run 'edgetrain -v preflight {dev.name}' and check the device's log")
    return agent, tv


async def _rendezvous(agents: dict[str, ProbeAgent], reports: dict[str, DeviceReport], timeout: float) -> None:
    names = list(agents)
    unreachable: dict[str, list[str]] = {n: [] for n in names}

    async def from_source(src: str) -> None:
        for dst in names:
            if dst == src:
                continue
            target = agents[dst]
            try:
                res = await agents[src].request("check_port", timeout=timeout + 10, host=target.device.host,
                                                port=target.sink_port, timeout_s=timeout)
                ok = bool(res.get("ok"))
                why = res.get("error", "")
            except ProfileError as exc:
                ok, why = False, str(exc)
            if not ok:
                unreachable[dst].append(f"{src} ({why})")

    await asyncio.gather(*(from_source(n) for n in names))
    for n in names:
        dev = agents[n].device
        bad = unreachable[n]
        reports[n].add("rendezvous", not bad,
                       f"TCP port {agents[n].sink_port} on {dev.host} reachable from "
                       f"{len(names) - 1 - len(bad)}/{len(names) - 1} other device(s)"
                       + (f"; not from {', '.join(bad)}" if bad else ""),
                       f"allow incoming TCP from the other devices on '{n}' (e.g. 'sudo ufw allow from "
                       f"<subnet>' or 'sudo iptables -I INPUT -s <peer> -p tcp -j ACCEPT'), and make sure "
                       f"'{dev.host}' is the address the other devices reach '{n}' at")


async def preflight(devices: list[Device], known_hosts: KnownHosts, *, min_free_bytes: int = 2 * 2**30,
                    max_skew_s: float = 1.0, port_timeout_s: float = 3.0) -> list[DeviceReport]:
    """Run every check on every device (in parallel) and return one report per device.

    Parameters
    ----------
    devices
        The devices a run would use.
    known_hosts
        EdgeTrain's trusted-domain store (unknown or changed keys fail the ``ssh`` check).
    min_free_bytes
        Free space required where the device keeps worker code and run files.
    max_skew_s
        Largest tolerated clock difference from the controller.
    port_timeout_s
        How long a device waits for another device's port.

    Returns
    -------
    list of DeviceReport
        In the order of ``devices``; ``report.ok`` is False when an error-level check failed.
    """
    reports = {d.name: DeviceReport(d.name, d.address) for d in devices}
    conns: dict[str, asyncssh.SSHClientConnection] = {}

    async def reach(dev: Device) -> None:
        rep = reports[dev.name]
        try:
            conns[dev.name] = await connect(dev, known_hosts)
        except HostKeyError as exc:
            fix = (f"edgetrain devices trust {dev.name}" if exc.kind == "unknown" else
                   f"verify the device was reinstalled, then: edgetrain devices trust {dev.name} --replace")
            rep.add("ssh", False, str(exc).split(" If this is")[0].split(" This may be")[0], fix)
            return
        except SSHError as exc:
            msg = str(exc)
            rep.add("ssh", False, msg.split(". Fix: ")[0], msg.split("Fix: ", 1)[-1] if "Fix: " in msg else
                    "check the device's address, port and user in the inventory")
            return
        rep.add("ssh", True, f"connected to {dev.user}@{dev.address} (trusted host key, key auth)")

    await asyncio.gather(*(reach(d) for d in devices))
    agents: dict[str, ProbeAgent] = {}
    try:
        by_name = {d.name: d for d in devices}
        started = await asyncio.gather(*(
            _device_checks(by_name[n], c, reports[n], min_free_bytes, max_skew_s) for n, c in conns.items()))
        torch_versions = {}
        for n, (agent, tv) in zip(list(conns), started):
            if agent is not None:
                agents[n] = agent
            if tv is not None:
                torch_versions[n] = tv
        _torch_match(reports, torch_versions)
        if len(agents) > 1:
            await _rendezvous(agents, reports, port_timeout_s)
    finally:
        await asyncio.gather(*(a.close() for a in agents.values()), return_exceptions=True)
        for c in conns.values():
            c.close()
    return [reports[d.name] for d in devices]


def _torch_match(reports: dict[str, DeviceReport], have: dict[str, tuple[int, ...]]) -> None:
    if len(set(have.values())) <= 1:
        return
    # the most common version is taken as the intended one
    counts: dict[tuple[int, ...], int] = {}
    for v in have.values():
        counts[v] = counts.get(v, 0) + 1
    target = max(counts, key=lambda v: (counts[v], v))
    for n, v in have.items():
        ok = v == target
        reports[n].add("torch-match", ok, f"torch {v[0]}.{v[1]} here, {target[0]}.{target[1]} on "
                       f"{counts[target]} other device(s)",
                       f"install the same torch everywhere, e.g. on '{n}': python -m pip install "
                       f"'torch=={target[0]}.{target[1]}.*'")


def format_reports(reports: list[DeviceReport]) -> str:
    """Human-readable report: one line per check, failures followed by their fix."""
    lines = []
    for rep in reports:
        lines.append(f"{rep.name} ({rep.address}): {'OK' if rep.ok else 'FAILED'}")
        for c in rep.checks:
            mark = "ok  " if c.ok else ("FAIL" if c.severity == "error" else "warn")
            lines.append(f"  [{mark}] {c.name:<12} {c.detail}")
            if not c.ok and c.fix:
                lines.append(f"         fix: {c.fix}")
    bad = [r.name for r in reports if not r.ok]
    lines.append(f"preflight: {len(reports) - len(bad)}/{len(reports)} device(s) ready"
                 + (f"; not ready: {', '.join(bad)}" if bad else ""))
    return "\n".join(lines)


__all__ = ["Check", "DeviceReport", "format_reports", "preflight"]
