"""One emulated device as an SSH endpoint: an asyncssh server that runs real commands.

Like OpenSSH without a pty: output streams live, the exit status or exit *signal* is
reported, the session waits until the command's stdout/stderr close, a client signal
request goes to the command's process group, and a client that goes away only closes the
pipes.  Each command runs under the device's emulation (:mod:`app.testbed.emulation`).
SFTP and scp are served chrooted at the device's home.
"""
from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.sftp import MIN_SFTP_VERSION
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from app.testbed.cgroups import DeviceCgroup, joiner
from app.testbed.emulation import DeviceSpec, TestbedError, emulation_env, log, make_preexec

# ---------------------------------------------------------------- the device's SSH endpoint

_SSH_SIGNALS = {n: getattr(signal, "SIG" + n) for n in (
    "ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
    "USR1", "USR2")}


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
    cgroup : DeviceCgroup, optional
        The device's cgroup (physical memory and CPU quota): every command joins it before
        ``exec``.  Without one, memory is capped with ``RLIMIT_AS`` per command.
    """

    def __init__(self, spec: DeviceSpec, host: str, home: Path, host_key: asyncssh.SSHKey,
                 user: str, authorized: asyncssh.SSHAuthorizedKeys,
                 on_command: Callable[[int, float, str], None] | None = None,
                 cgroup: DeviceCgroup | None = None) -> None:
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
        self.cgroup = cgroup
        self.mem_kind = "cgroup" if cgroup is not None else "address-space"
        self.preexec = joiner(cgroup) if cgroup is not None else make_preexec(spec.mem_bytes)
        self.base_env = dict(os.environ)
        self.base_env.update(emulation_env(spec, self.mem_kind))
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
