"""Operations on a device over an open SSH connection: install the worker code, copy
assets, end a remote process.

Everything the launcher and the profiler do to a device besides running a worker lives
here, so both use one content-hashed install and one way to kill.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import asyncssh

import workers
from app.devices.inventory import Device

log = logging.getLogger("edgetrain.remote")
WORKERS_DIR = Path(workers.__file__).resolve().parent


def worker_files() -> list[Path]:
    """The files a device needs to run a worker (the ``workers`` package)."""
    return sorted(p for p in WORKERS_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def workers_digest() -> str:
    """Content hash of the worker code: names the install directory on each device."""
    h = hashlib.sha256()
    for p in worker_files():
        h.update(str(p.relative_to(WORKERS_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


async def push_workers(conn: asyncssh.SSHClientConnection, device: Device, digest: str | None = None) -> str:
    """Make the worker code available on the device; returns its directory there.

    The directory is named after the code's hash and completed with a marker file, so
    an unchanged install is reused and a half-finished copy is never trusted.
    """
    digest = digest or workers_digest()
    remote = f"{device.workdir.rstrip('/')}/workers-{digest}"
    async with conn.start_sftp_client() as sftp:
        if await sftp.exists(f"{remote}/.complete"):
            return remote
        for p in worker_files():
            rel = p.relative_to(WORKERS_DIR.parent).as_posix()
            await sftp.makedirs(f"{remote}/{Path(rel).parent.as_posix()}", exist_ok=True)
            await sftp.put(str(p), f"{remote}/{rel}")
        async with sftp.open(f"{remote}/.complete", "w") as f:
            await f.write(digest + "\n")
    return remote


ASSET_FIELDS = ("dataset", "weights", "tokenizer")


def asset_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def remote_home_path(device: Device, rel: str) -> str:
    """A device path under the device's workdir, spelled so the worker can expand it."""
    base = device.workdir.rstrip("/")
    return f"{base}/{rel}" if base.startswith("/") else f"~/{base}/{rel}"


async def push_asset(conn: asyncssh.SSHClientConnection, device: Device, local: Path,
                     digest: str | None = None) -> str:
    """Copy a local file or directory (dataset, weights, tokenizer) to the device once.

    Stored under ``<workdir>/assets/<content hash>/<name>`` with a completion marker,
    so re-runs reuse it and an interrupted copy is redone.  Returns the device path.
    """
    digest = digest or asset_digest(local)
    rel_dir = f"assets/{digest}"
    remote_dir = f"{device.workdir.rstrip('/')}/{rel_dir}"
    async with conn.start_sftp_client() as sftp:
        if not await sftp.exists(f"{remote_dir}/.complete"):
            await sftp.makedirs(remote_dir, exist_ok=True)
            await sftp.put(str(local), f"{remote_dir}/{local.name}", recurse=local.is_dir())
            async with sftp.open(f"{remote_dir}/.complete", "w") as f:
                await f.write(digest + "\n")
    return remote_home_path(device, f"{rel_dir}/{local.name}")


async def kill_remote(conn: asyncssh.SSHClientConnection, pid: int, grace_s: float = 2.0) -> None:
    """TERM then KILL a remote process group (the worker leads its own session)."""
    cmd = (f"kill -TERM -{pid} 2>/dev/null || kill -TERM {pid} 2>/dev/null; "
           f"for i in $(seq {int(grace_s * 10)}); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.1; done; "
           f"kill -KILL -{pid} 2>/dev/null || kill -KILL {pid} 2>/dev/null; exit 0")
    try:
        await asyncio.wait_for(conn.run(cmd, check=False, encoding="utf-8", errors="replace"), grace_s + 5)
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        log.warning("could not kill remote pid %s: %s", pid, exc)
