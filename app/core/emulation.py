"""Emulated edge devices: board profiles and the SSH endpoint of one device.

A :class:`DevicePreset` describes one kind of board (memory, a thread budget, idle and peak
power). :func:`plan_devices` turns a testbed request ("4 devices", "heterogeneous", an explicit
list of presets) into one :class:`DeviceSpec` per device, and :func:`emulation_env` /
:func:`make_preexec` apply a spec to a command started on that device.
:class:`EmulatedDevice` serves one device over SSH (see :mod:`app.core.testbed` for the
behaviour); the testbed module runs several of them and manages their files.

What is and is not emulated (no root needed, so no cgroups):

* **Memory** is capped with ``RLIMIT_AS`` on each command's process, set in the child before
  ``exec``. Exceeding it is a real allocation failure (``MemoryError`` in Python,
  ``RuntimeError: ... can't allocate memory`` in torch). The limit is on *virtual* size, not
  resident memory: ``import torch`` alone maps ~0.65 GB and a gloo rank ~1 GB, and every thread
  stack counts, so a cap is stricter than the same amount of physical RAM on a board. The cap
  is per process, not per device: two commands on one device each get the full cap.
* **CPU** is not capped (no CPU quota without root cgroups). Each device gets a thread budget
  (``OMP_NUM_THREADS``) so that the emulated devices together do not oversubscribe the host:
  ``min(preset.threads, max(1, host_cpus // n_devices))`` unless overridden.
* **Power** figures are only exported to the command's environment for energy models.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.sftp import MIN_SFTP_VERSION
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

log = logging.getLogger("edgetrain.testbed")

GIB = 1024**3

__all__ = [
    "DEFAULT_N_DEVICES",
    "DEFAULT_PRESET",
    "DevicePreset",
    "DeviceSpec",
    "EmulatedDevice",
    "PRESETS",
    "TESTBED_PRESETS",
    "TestbedError",
    "emulation_env",
    "get_preset",
    "host_cpus",
    "make_preexec",
    "parse_size",
    "plan_devices",
]


@dataclass(frozen=True)
class DevicePreset:
    """One kind of emulated board.

    Attributes
    ----------
    name : str
        Preset name, e.g. ``"jetson-nano"``.
    mem_bytes : int or None
        Memory cap applied to each command (``RLIMIT_AS``); None means no cap.
    threads : int or None
        Thread budget that approximates the board's CPU throughput relative to one core of
        the host (a Nano's four A57 cores are worth about one desktop core); None: no limit
        beyond the host share.
    p_idle_w, p_max_w : float
        Idle and peak board power in watts; 0.0 means no power model.
    short : str
        Prefix for device names (``nano`` -> ``nano0``, ``nano1``).
    description : str
        Human description with the published figures used.
    """

    name: str
    mem_bytes: int | None
    threads: int | None
    p_idle_w: float
    p_max_w: float
    short: str
    description: str


PRESETS: dict[str, DevicePreset] = {
    p.name: p
    for p in (
        DevicePreset(
            "jetson-nano", 4 * GIB, 1, 1.25, 10.0, "nano",
            "NVIDIA Jetson Nano 4 GB: 4x Cortex-A57 @ 1.43 GHz, 5 W / 10 W power modes, "
            "~1.25 W idle",
        ),
        DevicePreset(
            "jetson-tx2", 8 * GIB, 2, 2.5, 15.0, "tx2",
            "NVIDIA Jetson TX2 8 GB: 2x Denver2 + 4x Cortex-A57, 7.5 W (Max-Q) / 15 W (Max-P), "
            "~2.5 W idle",
        ),
        DevicePreset(
            "jetson-nx", 8 * GIB, 2, 3.0, 15.0, "nx",
            "NVIDIA Jetson Xavier NX 8 GB: 6x Carmel ARMv8.2, 10 W / 15 W power modes, "
            "~3 W idle",
        ),
        DevicePreset(
            "laptop", 16 * GIB, 4, 8.0, 45.0, "laptop",
            "Laptop with 16 GB and a 45 W mobile CPU, ~8 W idle",
        ),
        DevicePreset(
            "unlimited", None, None, 0.0, 0.0, "dev",
            "The host itself: no memory cap, no power model",
        ),
    )
}

DEFAULT_PRESET = "unlimited"
DEFAULT_N_DEVICES = 4

TESTBED_PRESETS: dict[str, tuple[str, ...]] = {
    "homogeneous": ("jetson-nano",) * 4,
    "heterogeneous": ("jetson-nano", "jetson-nano", "jetson-tx2", "jetson-nx"),
}


@dataclass(frozen=True)
class DeviceSpec:
    """The emulation applied to one device of a testbed.

    Attributes
    ----------
    name : str
        Device name (``nano0``, ``tx2-0``, ``dev1``...).
    preset : DevicePreset
        The board it emulates.
    mem_bytes : int or None
        Effective memory cap (preset value or override); None means no cap.
    threads : int
        Effective thread budget (``OMP_NUM_THREADS``).
    """

    name: str
    preset: DevicePreset
    mem_bytes: int | None
    threads: int


def get_preset(name: str) -> DevicePreset:
    """Return the device preset called ``name``.

    Raises
    ------
    ValueError
        If there is no such preset; the message lists the known ones.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown device preset {name!r}; known: {', '.join(PRESETS)}"
        ) from None


def host_cpus() -> int:
    """Number of CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a memory size such as ``"1.5G"``, ``"512MiB"``, ``"2GB"`` or ``"1048576"``.

    ``K/M/G/T`` alone and ``KiB/MiB/GiB/TiB`` are binary (powers of 1024); ``KB/MB/GB/TB``
    are decimal.

    Raises
    ------
    ValueError
        If the text is not a size.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (try 1.5G, 512MiB, 4GB)")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = "kmgt".find(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base**power)


def _device_names(presets: Sequence[DevicePreset]) -> list[str]:
    counts: dict[str, int] = {}
    names = []
    for p in presets:
        i = counts.get(p.short, 0)
        counts[p.short] = i + 1
        # "tx2-0" rather than "tx20", which reads as a twentieth TX.
        sep = "-" if p.short[-1].isdigit() else ""
        names.append(f"{p.short}{sep}{i}")
    return names


def plan_devices(
    n_devices: int | None = None,
    preset: str | None = None,
    device_presets: Sequence[str] | None = None,
    mem_overrides: Mapping[str | int, int | str | None] | int | str | None = None,
    threads: int | None = None,
    n_cpus: int | None = None,
) -> list[DeviceSpec]:
    """Decide which boards a testbed emulates.

    Parameters
    ----------
    n_devices : int, optional
        Number of devices. Defaults to the length of the preset list, else 4.
    preset : str, optional
        A device preset (``jetson-nano``; every device is one) or a testbed preset
        (``homogeneous``: N x jetson-nano, 4 by default; ``heterogeneous``: 2 x jetson-nano,
        jetson-tx2, jetson-nx). Defaults to ``unlimited``.
    device_presets : sequence of str, optional
        One device preset per device; takes precedence over ``preset``.
    mem_overrides : mapping or int or str, optional
        Memory cap per device, keyed by device name or index (None value: no cap); a single
        value applies to every device. Sizes may be strings (``"1.5G"``).
    threads : int, optional
        Thread budget for every device, replacing the host-share rule.
    n_cpus : int, optional
        Host CPUs to share (defaults to :func:`host_cpus`).

    Returns
    -------
    list of DeviceSpec

    Raises
    ------
    ValueError
        For unknown presets, a device count that contradicts the presets, or overrides that
        name no device.
    """
    if device_presets:
        names = list(device_presets)
        if n_devices is not None and n_devices != len(names):
            raise ValueError(f"{n_devices} devices requested but {len(names)} presets given")
    elif preset in TESTBED_PRESETS:
        names = list(TESTBED_PRESETS[preset])
        if n_devices is not None and n_devices != len(names):
            if preset != "homogeneous":
                raise ValueError(f"testbed preset {preset!r} has exactly {len(names)} devices")
            names = [names[0]] * n_devices
    else:
        n = DEFAULT_N_DEVICES if n_devices is None else n_devices
        names = [preset or DEFAULT_PRESET] * n
    if not names:
        raise ValueError("a testbed needs at least one device")
    presets = [get_preset(n) for n in names]
    dev_names = _device_names(presets)

    if mem_overrides is None:
        overrides: dict[str | int, int | str | None] = {}
    elif isinstance(mem_overrides, (int, str)):
        overrides = {i: mem_overrides for i in range(len(presets))}
    else:
        overrides = dict(mem_overrides)
    unknown = [k for k in overrides if k not in dev_names and k not in range(len(presets))]
    if unknown:
        raise ValueError(f"memory override for unknown device(s) {unknown}; devices: {dev_names}")

    share = max(1, (n_cpus or host_cpus()) // len(presets))
    specs = []
    for i, (name, p) in enumerate(zip(dev_names, presets)):
        mem: int | str | None = p.mem_bytes
        if name in overrides:
            mem = overrides[name]
        elif i in overrides:
            mem = overrides[i]
        mem_b = None if mem is None else parse_size(mem)
        t = threads if threads is not None else min(p.threads or share, share)
        specs.append(DeviceSpec(name, p, mem_b, max(1, t)))
    return specs


def emulation_env(spec: DeviceSpec) -> dict[str, str]:
    """Environment variables that tell a command which board it runs on.

    ``EDGETRAIN_EMU_MEM_BYTES`` is ``"0"`` when there is no cap; the power figures are left
    out when the preset has no power model, so the worker's meter falls back to its own
    labelled defaults instead of reading 0 W.
    """
    t = str(spec.threads)
    env = {
        "EDGETRAIN_EMU_PRESET": spec.preset.name,
        "EDGETRAIN_EMU_MEM_BYTES": str(spec.mem_bytes or 0),
        "EDGETRAIN_EMU_THREADS": t,
        "EDGETRAIN_EMU_P_IDLE_W": repr(spec.preset.p_idle_w),
        "EDGETRAIN_EMU_P_MAX_W": repr(spec.preset.p_max_w),
        # torch sizes its intra-op pool from OMP_NUM_THREADS; MKL/OpenBLAS if present.
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
    }
    if not (spec.preset.p_idle_w > 0 and spec.preset.p_max_w > 0):
        del env["EDGETRAIN_EMU_P_IDLE_W"], env["EDGETRAIN_EMU_P_MAX_W"]
    return env


def make_preexec(mem_bytes: int | None) -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that applies the memory cap in the child, or None.

    The hard limit is lowered too, so the command cannot raise it back (a board cannot grow
    RAM); it is clamped to the current hard limit, which an unprivileged process cannot raise.
    """
    if mem_bytes is None:
        return None
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mem_bytes if hard == resource.RLIM_INFINITY else min(mem_bytes, hard)

    def _apply() -> None:
        # Runs between fork and exec: keep it to one system call.
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return _apply


# Signal names of RFC 4254 (what OpenSSH accepts and reports without an @openssh.com suffix).
_SSH_SIGNALS = {n: getattr(signal, "SIG" + n) for n in (
    "ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
    "USR1", "USR2")}


class TestbedError(RuntimeError):
    """The testbed cannot start, or is not in the expected state."""

    __test__ = False  # not a pytest class


# ---------------------------------------------------------------- the device's SSH endpoint

def _signal_name(signum: int) -> str:
    for name, num in _SSH_SIGNALS.items():
        if num == signum:
            return name
    try:
        return f"{signal.Signals(signum).name[3:]}@openssh.com"
    except ValueError:
        return f"{signum}@openssh.com"


class _PipeProtocol(asyncio.SubprocessProtocol):
    """Queues a child's stdout/stderr in arrival order; pauses the pipes when far behind."""

    HIGH_WATER = 1 << 20

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int, bytes | None]] = asyncio.Queue()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.SubprocessTransport | None = None
        self._buffered = 0
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.queue.put_nowait((fd, data))
        self._buffered += len(data)
        if self._buffered > self.HIGH_WATER and not self._paused:
            self._paused = True
            self._each_pipe("pause_reading")

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self.queue.put_nowait((fd, None))

    def process_exited(self) -> None:
        assert self.transport is not None
        if not self.exited.done():
            self.exited.set_result(self.transport.get_returncode() or 0)

    def connection_lost(self, exc: Exception | None) -> None:
        # The child has exited and every pipe is closed: closing the transport now can neither
        # kill the child nor drop output (earlier, it would do both).
        if self.transport is not None:
            self.transport.close()

    def consumed(self, n: int) -> None:
        self._buffered -= n
        if self._paused and self._buffered < self.HIGH_WATER // 2:
            self._paused = False
            self._each_pipe("resume_reading")

    def close_pipes(self, fds: Sequence[int] = (0, 1, 2)) -> None:
        for fd in fds:
            pipe = self.transport.get_pipe_transport(fd) if self.transport else None
            if pipe is not None and not pipe.is_closing():
                pipe.close()

    def _each_pipe(self, method: str) -> None:
        for fd in (1, 2):
            pipe = self.transport.get_pipe_transport(fd) if self.transport else None
            if pipe is not None and not pipe.is_closing():
                getattr(pipe, method)()


class EmulatedDevice:
    """One emulated board: an SSH server on ``host`` running commands under ``spec``.

    Parameters
    ----------
    spec : DeviceSpec
        Name and emulation of the device.
    host : str
        The device's own address (a loopback address such as 127.0.10.1).
    home : Path
        Working directory, ``$HOME`` and SFTP root of its commands.
    host_key : asyncssh.SSHKey
        The device's private host key.
    user : str
        The only user name accepted.
    authorized : asyncssh.SSHAuthorizedKeys
        The only client keys accepted (no passwords, no other methods).
    on_command : callable, optional
        Called as ``on_command(pid, start_time, device_name)`` for every command started, so
        the owner can kill the command's session later.
    """

    def __init__(self, spec: DeviceSpec, host: str, home: Path, host_key: asyncssh.SSHKey,
                 user: str, authorized: asyncssh.SSHAuthorizedKeys,
                 on_command: Callable[[int, float, str], None] | None = None) -> None:
        self.spec = spec
        self.host = host
        self.home = home
        self.host_key = host_key
        self.user = user
        self.authorized = authorized
        self.on_command = on_command
        self.port = 0
        self.acceptor: asyncssh.SSHAcceptor | None = None
        self.conns: set[asyncssh.SSHServerConnection] = set()
        self.preexec = make_preexec(spec.mem_bytes)
        self.base_env = dict(os.environ)
        self.base_env.update(emulation_env(spec))
        self.base_env.update({
            "HOME": str(home), "PWD": str(home), "USER": user, "LOGNAME": user,
            "SHELL": "/bin/sh", "EDGETRAIN_DEVICE": spec.name, "EDGETRAIN_DEVICE_ADDR": host,
        })

    def command_env(self, chan: asyncssh.SSHServerChannel) -> dict[str, str]:
        """Environment of a command started on ``chan``."""
        env = dict(self.base_env)
        peer = chan.get_extra_info("peername")
        sock = chan.get_extra_info("sockname")
        env["SSH_CONNECTION"] = f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}"
        env["SSH_CLIENT"] = f"{peer[0]} {peer[1]} {sock[1]}"
        # Like Debian's sshd_config (AcceptEnv LANG LC_*): other client variables would work
        # here and silently not on a real board.
        for k, v in chan.get_environment().items():
            if k == "LANG" or k.startswith("LC_"):
                env[k] = str(v)
        return env

    async def listen(self, port: int) -> None:
        """Start serving on ``host:port`` (0: a free port, then in :attr:`port`).

        Raises
        ------
        TestbedError
            If the address is taken or absent; the message says what to do.
        """
        try:
            self.acceptor = await asyncssh.listen(
                self.host, port, server_factory=lambda: _DeviceServer(self),
                server_host_keys=[self.host_key], encoding=None,
                authorized_client_keys=None, password_auth=False, kbdint_auth=False,
                host_based_auth=False, gss_host=None, allow_pty=False,
                agent_forwarding=False, x11_forwarding=False)
        except OSError as exc:
            where = f"{self.host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                raise TestbedError(
                    f"cannot listen on {where} for device {self.spec.name}: address already "
                    "in use. A testbed may still be running: run `edgetrain testbed down`, or "
                    "pick another --base-addr (or --port).") from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise TestbedError(
                    f"cannot listen on {where}: the address does not exist on this machine; "
                    f"use a loopback --base-addr such as 127.0.10.1.") from exc
            raise TestbedError(f"cannot listen on {where}: {exc}") from exc
        self.port = self.acceptor.get_port()

    def stop_listening(self) -> None:
        """Refuse new connections; open ones stay."""
        if self.acceptor is not None:
            self.acceptor.close()

    async def close(self) -> None:
        """Stop listening and drop every connection (commands are left to the caller)."""
        self.stop_listening()
        for conn in list(self.conns):
            conn.close()
        if self.acceptor is not None:
            await self.acceptor.wait_closed()


class _SFTPServer(asyncssh.SFTPServer):
    def exit(self) -> None:
        # sftp-server under sshd ends with exit status 0; OpenSSH's scp (SFTP mode) counts a
        # channel closed without one as a failure.
        try:
            self.channel.exit(0)
        except OSError:
            pass


class _DeviceServer(asyncssh.SSHServer):
    """Per-connection handler: key-only auth for the device's user, sessions."""

    def __init__(self, device: EmulatedDevice) -> None:
        self._device = device
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._device.conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._device.conns.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        # Only the testbed's user exists on the device; any other name gets no usable method.
        if username == self._device.user and self._conn is not None:
            self._conn.set_authorized_keys(self._device.authorized)
        else:
            log.info("%s: refusing user %r", self._device.spec.name, username)
        return True

    def session_requested(self) -> SSHServerStreamSession:
        return _DeviceSession(self._device)


class _DeviceSession(SSHServerStreamSession):
    """One SSH session channel: a command, a shell (``/bin/sh`` fed from stdin), SFTP or scp."""

    def __init__(self, device: EmulatedDevice) -> None:
        home = os.fsencode(device.home)
        super().__init__(self._run, lambda chan: _SFTPServer(chan, chroot=home),
                         MIN_SFTP_VERSION, True)
        self._device = device
        self._pid: int | None = None

    def pty_requested(self, *args: Any) -> bool:
        return False  # commands always get pipes; say so rather than pretend

    def signal_received(self, signal_name: str) -> None:
        # Delivered at once (the stream base class would queue it behind stdin data).
        sig = _SSH_SIGNALS.get(signal_name)
        if self._pid is not None and sig is not None:
            try:
                os.killpg(self._pid, sig)
            except ProcessLookupError:
                pass

    async def _run(self, stdin: SSHReader[bytes], stdout: SSHWriter[bytes],
                   stderr: SSHWriter[bytes]) -> None:
        dev = self._device
        chan = stdin.channel
        command = chan.get_command()
        argv = ["/bin/sh"] if command is None else ["/bin/sh", "-c", command]
        t0 = time.time()
        try:
            transport, proto = await asyncio.get_running_loop().subprocess_exec(
                _PipeProtocol, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=dev.home, env=dev.command_env(chan),
                start_new_session=True, preexec_fn=dev.preexec)
        except (OSError, subprocess.SubprocessError) as exc:
            stderr.write(f"edgetrain testbed: cannot start {argv[0]}: {exc}\n".encode())
            chan.exit(127)
            return
        self._pid = pid = transport.get_pid()
        if dev.on_command is not None:
            dev.on_command(pid, t0, dev.spec.name)
        log.info("%s: pid %d: %s", dev.spec.name, pid, "<shell>" if command is None else command)
        feeder = asyncio.ensure_future(self._feed_stdin(stdin, proto))
        try:
            client_gone = await self._pump(proto, stdout, stderr)
            rc = await proto.exited
        finally:
            feeder.cancel()
            proto.close_pipes()
        log.info("%s: pid %d exited with %d%s", dev.spec.name, pid, rc,
                 " (client gone)" if client_gone else "")
        if client_gone:
            return
        try:
            if rc < 0:
                chan.exit_with_signal(_signal_name(-rc))
            else:
                chan.exit(rc)
        except OSError:
            pass

    @staticmethod
    async def _pump(proto: _PipeProtocol, stdout: SSHWriter[bytes],
                    stderr: SSHWriter[bytes]) -> bool:
        """Forward output until both pipes close; return whether the client went away."""
        open_fds = {1, 2}
        gone = False
        while open_fds:
            fd, data = await proto.queue.get()
            if data is None:
                open_fds.discard(fd)
                continue
            proto.consumed(len(data))
            if gone:
                continue
            writer = stdout if fd == 1 else stderr
            try:
                writer.write(data)
                await writer.drain()
            except (OSError, asyncssh.Error):
                # As sshd does: drop our read ends, the command gets EPIPE on its next write.
                gone = True
                proto.close_pipes((1, 2))
        return gone

    @staticmethod
    async def _feed_stdin(stdin: SSHReader[bytes], proto: _PipeProtocol) -> None:
        assert proto.transport is not None
        pipe = proto.transport.get_pipe_transport(0)
        try:
            while True:
                try:
                    data = await stdin.read(65536)
                except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
                    continue
                if not data:
                    break
                if pipe.is_closing():
                    continue  # the command closed its stdin; discard like sshd
                pipe.write(data)
                while pipe.get_write_buffer_size() > (1 << 20) and not pipe.is_closing():
                    await asyncio.sleep(0.01)
        except (OSError, asyncssh.Error):
            pass
        finally:
            pipe.close()  # EOF for the command
