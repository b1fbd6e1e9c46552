"""The probe agent: ``python -m workers.probe agent`` on one device, driven over SSH.

One long-lived channel per device: the controller sends JSON requests (measure compute,
memory, sensors; open a link sink; send to a peer) and reads one JSON reply per line.
Keeping the channel open avoids paying a shell start-up per measurement."""
from __future__ import annotations

import asyncio
import json
import shlex
import time
from typing import Any

import asyncssh

from app.devices.inventory import Device
from app.devices.remote import kill_remote, push_workers

# --------------------------------------------------------------------------- the agent

class ProfileError(RuntimeError):
    """Profiling failed on a device; ``device`` names it and the message says how to fix it."""

    def __init__(self, message: str, device: str | None = None) -> None:
        super().__init__(message)
        self.device = device


class ProbeAgent:
    """``python -m workers.probe agent`` on one device, driven by JSON lines over SSH."""

    def __init__(self, device: Device, conn: asyncssh.SSHClientConnection) -> None:
        self.device, self.conn = device, conn
        self.proc: asyncssh.SSHClientProcess | None = None
        self.pid: int | None = None
        self.sink_port: int | None = None
        self.hello: dict[str, Any] = {}
        self.remote_dir = ""
        self._next_id = 0
        self._lock = asyncio.Lock()

    async def start(self, timeout: float = 30.0) -> None:
        """Push the worker code, start the agent and wait for its hello.

        Raises
        ------
        ProfileError
            When the device's Python cannot run the probe (message: why and the fix).
        """
        d = self.device
        self.remote_dir = await push_workers(self.conn, d)
        rd = shlex.quote(self.remote_dir)
        cmd = (f"cd {rd} && exec env PYTHONPATH={rd} PYTHONUNBUFFERED=1 {shlex.quote(d.python)} "
               f"-m workers.probe agent --bind {shlex.quote(d.host)}")
        self.proc = await self.conn.create_process(cmd)
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            line = ""
        try:
            hello = json.loads(line) if line else None
        except ValueError:
            hello = None
        if not hello or hello.get("event") != "hello":
            raise ProfileError(await self._diagnose(line), d.name)
        self.hello = hello
        self.pid, self.sink_port = int(hello["pid"]), int(hello["sink_port"])

    async def _diagnose(self, first_line: str) -> str:
        assert self.proc is not None
        d = self.device
        err: Any = ""
        try:
            # wait() returns what is left of stdout/stderr (reading them after it gives '')
            err = (await asyncio.wait_for(self.proc.wait(), 5)).stderr or ""
        except (asyncio.TimeoutError, asyncssh.Error):
            pass
        status = self.proc.exit_status
        if status is None:
            self.proc.close()
        tail = " ".join((first_line + "\n" + str(err)).strip().splitlines()[-3:])[:400]
        if status == 127 or "not found" in tail or "No such file" in tail:
            return (f"device '{d.name}': Python interpreter '{d.python}' was not found ({tail}). "
                    f"Fix: install Python 3.10+ on the device, or set 'python:' for '{d.name}' in the "
                    "inventory to the interpreter's full path")
        if "SyntaxError" in tail:
            return (f"device '{d.name}': '{d.python}' is too old to run the worker code ({tail}). "
                    f"Fix: install Python 3.10 or newer and point 'python:' in the inventory at it")
        return (f"device '{d.name}': the probe did not start (exit status {status}): {tail or 'no output'}. "
                f"Fix: run '{d.python} -c \"import sys; print(sys.version)\"' on the device to check the interpreter")

    async def request(self, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """Send one command and return the agent's answer (raises ``ProfileError``)."""
        if self.proc is None:
            raise ProfileError(f"device '{self.device.name}': probe agent not started", self.device.name)
        async with self._lock:
            self._next_id += 1
            rid = self._next_id
            self.proc.stdin.write(json.dumps({"id": rid, "cmd": cmd, **args}) + "\n")
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                try:
                    line = await asyncio.wait_for(self.proc.stdout.readline(), max(left, 0.01))
                except asyncio.TimeoutError:
                    raise ProfileError(f"device '{self.device.name}': probe command '{cmd}' timed out "
                                       f"after {timeout:.0f} s", self.device.name) from None
                if not line:
                    raise ProfileError(f"device '{self.device.name}': the probe exited during '{cmd}'",
                                       self.device.name)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue  # stray output of a library; answers are whole JSON lines
                if msg.get("id") == rid:
                    break
        if not msg.get("ok"):
            raise ProfileError(f"device '{self.device.name}': probe command '{cmd}' failed: "
                               f"{msg.get('error')}", self.device.name)
        return dict(msg.get("result") or {})

    async def close(self) -> None:
        """Stop the agent; kill it by PID when it does not exit (root sshd ignores signals)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            proc.stdin.write_eof()
            await asyncio.wait_for(proc.wait(), 2)
            return
        except (asyncio.TimeoutError, asyncssh.Error, OSError, BrokenPipeError):
            pass
        if self.pid is not None:
            await kill_remote(self.conn, self.pid, grace_s=1.0)
        proc.close()
