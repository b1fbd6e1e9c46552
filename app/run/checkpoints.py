"""Checkpoints seen from the controller: find them on the devices, bring them home, stage them.

Workers write each checkpoint on their own devices (:mod:`workers.checkpoint`):
``<workdir>/checkpoints/<run_id>/step-NNNNNNNN/`` with every rank's DCP files and, last,
``manifest.json``.  To resume on other devices or another layout, or to export the model,
the controller first makes a *home copy* under the run's record
(``runs/<run_id>/checkpoints/step-NNNNNNNN/``), every file checked against the manifest's
sha256, and then copies to each device only the files it lacks.  The home copy also keeps
the run's work when a device is gone for good.
"""
from __future__ import annotations

import asyncio
import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from app.devices.inventory import Device
from app.devices.ssh import KnownHosts, SSHError, connect
from app.paths import atomic_write_text
from workers.checkpoint_manifest import MANIFEST_NAME, Manifest, parse_step_dirname, sha256_file, step_dirname

log = logging.getLogger("edgetrain.checkpoints")

CHECKPOINTS = "checkpoints"
_MANIFEST_MAX = 4 << 20  # a manifest lists a few files per rank; anything bigger is not one


def device_dir(device: Device, run_id: str, step: int | None = None) -> str:
    """The checkpoint directory on ``device`` (an SFTP path: relative = under the login home)."""
    base = f"{device.workdir.rstrip('/')}/{CHECKPOINTS}/{run_id}"
    return base if step is None else f"{base}/{step_dirname(step)}"


def worker_dir(run_id: str, step: int | None = None) -> str:
    """The same directory as the worker sees it: relative to its ``<workdir>/workers-<hash>``,
    so devices with different workdirs share one job description."""
    base = f"../{CHECKPOINTS}/{run_id}"
    return base if step is None else f"{base}/{step_dirname(step)}"


def home_dir(run_dir: Path, step: int | None = None) -> Path:
    base = run_dir / CHECKPOINTS
    return base if step is None else base / step_dirname(step)


class CheckpointError(Exception):
    """No usable checkpoint, or one that cannot be copied; the message says which and why."""


@dataclass
class Found:
    """The newest complete checkpoint of a run, and what was passed over on the way."""

    manifest: Manifest
    home: Path                 # the verified home copy
    skipped: list[str] = field(default_factory=list)


def home_manifest(path: Path) -> Manifest | None:
    """The manifest of a complete home copy (every file present with its size), else None."""
    try:
        man = Manifest.from_json((path / MANIFEST_NAME).read_bytes(), str(path / MANIFEST_NAME))
    except (OSError, ValueError):
        return None
    ok = all((path / f.name).is_file() and (path / f.name).stat().st_size == f.bytes for f in man.files)
    return man if ok else None


async def _sftp_size(sftp: asyncssh.SFTPClient, path: str) -> int | None:
    try:
        return (await sftp.stat(path)).size
    except (asyncssh.SFTPError, OSError):
        return None


async def _read_manifest(sftp: asyncssh.SFTPClient, path: str, where: str) -> Manifest | None:
    size = await _sftp_size(sftp, path)
    if size is None:
        return None
    if size > _MANIFEST_MAX:
        raise ValueError(f"{where}: {size} bytes is too big for a manifest")
    async with sftp.open(path, "rb") as fh:
        return Manifest.from_json(await fh.read(), where)


class Devices:
    """SSH connections to a run's devices, opened on demand and closed together."""

    def __init__(self, devices: list[Device], known_hosts: KnownHosts) -> None:
        self.by_name = {d.name: d for d in devices}
        self.known_hosts = known_hosts
        self.conns: dict[str, asyncssh.SSHClientConnection] = {}
        self.unreachable: dict[str, str] = {}

    async def open(self) -> None:
        async def one(d: Device) -> None:
            try:
                self.conns[d.name] = await connect(d, self.known_hosts)
            except (SSHError, OSError, asyncssh.Error) as exc:
                self.unreachable[d.name] = str(exc)
        await asyncio.gather(*(one(d) for d in self.by_name.values() if d.name not in self.conns))

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()


async def _survey(devs: Devices, run_id: str) -> dict[int, dict[str, Manifest | None]]:
    """step -> device -> its manifest (None: the directory is there but has none)."""
    found: dict[int, dict[str, Manifest | None]] = {}

    async def one(name: str, conn: asyncssh.SSHClientConnection) -> None:
        device = devs.by_name[name]
        async with conn.start_sftp_client() as sftp:
            try:
                names = await sftp.listdir(device_dir(device, run_id))
            except (asyncssh.SFTPError, OSError):
                return
            for entry in names:
                step = parse_step_dirname(entry)
                if step is None:
                    continue
                path = f"{device_dir(device, run_id, step)}/{MANIFEST_NAME}"
                try:
                    man = await _read_manifest(sftp, path, f"device '{name}': {path}")
                except (ValueError, asyncssh.SFTPError, OSError) as exc:
                    log.warning("%s", exc)
                    man = None
                found.setdefault(step, {})[name] = man
    await asyncio.gather(*(one(n, c) for n, c in devs.conns.items()))
    return found


async def _missing(devs: Devices, man: Manifest, home: Path) -> list[str]:
    """Why ``man``'s checkpoint cannot be assembled (empty: it can)."""
    problems = []
    for f in man.files:
        local = home / f.name
        if local.is_file() and local.stat().st_size == f.bytes:
            continue
        conn = devs.conns.get(f.device)
        if conn is None:
            why = devs.unreachable.get(f.device, "not in this run's inventory")
            problems.append(f"{f.name} of rank {f.rank} is on device '{f.device}', which is unreachable ({why})")
            continue
        async with conn.start_sftp_client() as sftp:
            size = await _sftp_size(sftp, f"{device_dir(devs.by_name[f.device], man.run_id, man.step)}/{f.name}")
        if size != f.bytes:
            problems.append(f"{f.name} of rank {f.rank} on device '{f.device}' is "
                            f"{'missing' if size is None else f'{size} bytes, not {f.bytes}'}")
    return problems


async def fetch(devs: Devices, man: Manifest, home: Path) -> Path:
    """Copy ``man``'s files home, each checked against its sha256; the manifest last.

    Raises
    ------
    CheckpointError
        A file whose hash does not match (named, with its device).
    """
    home.mkdir(parents=True, exist_ok=True)
    for f in man.files:
        local = home / f.name
        if local.is_file() and local.stat().st_size == f.bytes and await asyncio.to_thread(sha256_file, local) == f.sha256:
            continue
        device = devs.by_name[f.device]
        part = local.with_name(local.name + ".part")
        async with devs.conns[f.device].start_sftp_client() as sftp:
            await sftp.get(f"{device_dir(device, man.run_id, man.step)}/{f.name}", str(part))
        digest = await asyncio.to_thread(sha256_file, part)
        if digest != f.sha256:
            part.unlink(missing_ok=True)
            raise CheckpointError(f"checkpoint step {man.step} of run {man.run_id}: {f.name} from device "
                                  f"'{f.device}' does not match its manifest (sha256 {digest[:12]}…, expected "
                                  f"{f.sha256[:12]}…); the device's copy is damaged")
        part.replace(local)
    atomic_write_text(home / MANIFEST_NAME, man.to_json())
    return home


async def find_latest(devs: Devices, run_id: str, run_dir: Path) -> Found:
    """The newest checkpoint of ``run_id`` that is complete, brought home and verified.

    Looks at the home copies and at every reachable device; a step directory without a
    manifest (interrupted while writing) or with a file no one can supply is passed over,
    and said so in :attr:`Found.skipped`.

    Raises
    ------
    CheckpointError
        No complete checkpoint anywhere (with every reason).
    """
    await devs.open()
    on_devices = await _survey(devs, run_id)
    at_home: dict[int, Manifest] = {}
    if home_dir(run_dir).is_dir():
        for d in home_dir(run_dir).iterdir():
            step = parse_step_dirname(d.name)
            man = home_manifest(d) if step is not None else None
            if man is not None:
                at_home[step] = man
    skipped: list[str] = []
    for step in sorted(set(on_devices) | set(at_home), reverse=True):
        mans = [m for m in on_devices.get(step, {}).values() if m is not None]
        man = at_home.get(step) or (mans[0] if mans else None)
        if man is None:
            where = ", ".join(sorted(on_devices.get(step, {})))
            skipped.append(f"checkpoint {step_dirname(step)} (on {where}) is incomplete: no manifest, it was "
                           "interrupted while being written; skipped")
            continue
        problems = await _missing(devs, man, home_dir(run_dir, step))
        if problems:
            skipped.append(f"checkpoint {step_dirname(step)} cannot be assembled: {'; '.join(problems)}; skipped")
            continue
        home = await fetch(devs, man, home_dir(run_dir, step))
        return Found(man, home, skipped)
    unreachable = "".join(f"; device '{n}' unreachable: {why}" for n, why in devs.unreachable.items())
    raise CheckpointError(f"run {run_id} has no complete checkpoint" + (": " + "; ".join(skipped) if skipped else
                          " on its devices or under its record") + unreachable)


async def stage(conn: asyncssh.SSHClientConnection, device: Device, man: Manifest, home: Path) -> None:
    """Give ``device`` the whole checkpoint: copy the files it lacks from the home copy, the
    manifest last (so a copy cut short is never taken for a checkpoint)."""
    remote = device_dir(device, man.run_id, man.step)
    async with conn.start_sftp_client() as sftp:
        await sftp.makedirs(remote, exist_ok=True)
        try:
            there = await _read_manifest(sftp, f"{remote}/{MANIFEST_NAME}", remote)
        except (ValueError, asyncssh.SFTPError, OSError):
            there = None
        trusted = there is not None and there.step == man.step and there.run_id == man.run_id
        for f in man.files:
            # a file under a complete manifest was written by DCP and fsynced: its size
            # is enough; elsewhere it might be a torn copy
            if trusted and await _sftp_size(sftp, f"{remote}/{f.name}") == f.bytes:
                continue
            tmp = posixpath.join(remote, f".{f.name}.part")
            await sftp.put(str(home / f.name), tmp)
            await sftp.posix_rename(tmp, f"{remote}/{f.name}")
        if not trusted:
            tmp = posixpath.join(remote, f".{MANIFEST_NAME}.part")
            async with sftp.open(tmp, "w") as fh:
                await fh.write(man.to_json())
            await sftp.posix_rename(tmp, f"{remote}/{MANIFEST_NAME}")
