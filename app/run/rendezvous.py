"""The run's rendezvous as the controller sets it up: a one-time port on rank 0's device, a
per-run secret, and the worker command that takes that secret on its stdin.

The secret never appears on a command line (``ps`` on the device shows every argument),
in the job (it travels base64 on the command line and is written to the run record) or
in a file: the launcher writes it as the first line of each worker's stdin, and the
worker's shell reads it into ``$EDGETRAIN_RUN_SECRET`` before ``exec``-ing Python
(:data:`workers.config.SECRET_ENV`).  The workers' side is :mod:`workers.rendezvous`.
"""
from __future__ import annotations

import secrets
import shlex

import asyncssh

from app.devices.inventory import Device
from workers.config import SECRET_ENV, JobConfig

#: The first line a worker's shell prints: its PID (``exec`` keeps it for the worker).
PID_TAG = "EDGETRAIN_PID"


def new_secret() -> str:
    """A fresh secret for one run (256 random bits, hex)."""
    return secrets.token_hex(32)


async def pick_port(conn: asyncssh.SSHClientConnection, device: Device) -> int:
    """A free TCP port on the rendezvous device's own address, chosen by the device itself.

    Raises
    ------
    ValueError
        The device's python did not print a port (the message holds its error output).
    """
    code = (f"import socket;s=socket.socket();s.bind(({device.host!r},0));"
            "print(s.getsockname()[1])")
    res = await conn.run(f"{shlex.quote(device.python)} -c {shlex.quote(code)}", check=False,
                         encoding="utf-8", errors="replace")
    try:
        return int(str(res.stdout).strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ValueError(f"{device.python} did not print a free port on {device.host} "
                         f"({str(res.stderr).strip()[:300] or 'no output'})") from None


def worker_command(device: Device, remote_dir: str, rank: int, job: JobConfig) -> str:
    """The shell command that starts rank ``rank``'s worker on ``device``.

    It prints :data:`PID_TAG` and its PID, reads the run's secret from the first line of
    stdin into the worker's environment, then ``exec``-s the worker (same PID); the rest
    of stdin is the worker's lifeline (:mod:`workers.lifeline`).  ``read`` takes stdin a
    byte at a time, so nothing after that first line is consumed.
    """
    py, d = shlex.quote(device.python), shlex.quote(remote_dir)
    return (f"cd {d} && echo {PID_TAG} $$ && IFS= read -r {SECRET_ENV} && export {SECRET_ENV} && "
            f"exec env PYTHONPATH={d} PYTHONUNBUFFERED=1 {py} -m workers.train --rank {rank} "
            f"--config-b64 {job.to_b64()}")
