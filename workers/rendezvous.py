"""A rendezvous only the run's workers can reach: an authenticating gate in front of torch's store.

torch's ``TCPStore`` has no authentication, and its server listens on every interface.
So rank 0 runs the real store on loopback only (``workers.dist``), and this module puts
a gate in front of it:

* :class:`Gate` (rank 0) listens on rank 0's device address and the run's port.  Each
  connection must prove it holds the run's secret (an HMAC challenge-response, a fresh
  random nonce from each side, so a recorded exchange cannot be replayed) before a
  single byte reaches the store; then the gate pipes bytes to the loopback store.  It
  proves itself back, so a worker never talks to an impostor holding the port.
* :class:`Relay` (every other rank) listens on ``127.0.0.1`` for this process's own
  store client, authenticates to the gate for it, then pipes.  Connections from any
  other process on the device are refused (Linux: the peer's socket must be one of this
  process's descriptors).

A client that fails the handshake is closed at once and logged (stderr, and
``on_refused``); the run goes on.  The secret is made per run by the controller and
reaches the worker in its environment (``workers.config.SECRET_ENV``, read from the
worker's stdin by its shell, never on a command line).  Everything runs on one asyncio
thread per process, closed with the store (``workers.dist.shutdown``) or with the
process.

Handshake (``ns``/``nc``: the gate's/client's 32-byte nonces, ``K``: the run secret)::

    client -> gate   MAGIC || nc
    gate   -> client ns
    client -> gate   HMAC-SHA256(K, "client" || ns || nc)
    gate   -> client HMAC-SHA256(K, "gate" || ns || nc)

Standard library only.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
from typing import Callable

log = logging.getLogger("edgetrain.rendezvous")

MAGIC = b"EDGETRAIN-RDV1\n"
NONCE_BYTES = 32
#: Seconds a connection has to complete the handshake before it is refused.
HANDSHAKE_S = 10.0
#: Handshakes in progress at once; more connections are refused on arrival (a flood
#: must not exhaust rank 0's memory or descriptors).
MAX_PENDING = 64
_CHUNK = 1 << 16


class HandshakeError(Exception):
    """The peer did not prove it holds the run's secret."""


def _mac(secret: str, label: bytes, ns: bytes, nc: bytes) -> bytes:
    return hmac.new(secret.encode(), label + ns + nc, hashlib.sha256).digest()


async def _read_magic(reader: asyncio.StreamReader) -> None:
    # byte by byte against the prefix: a stranger (a TCPStore client, a port scanner)
    # is refused on its first wrong byte instead of at the handshake's timeout
    got = b""
    while len(got) < len(MAGIC):
        chunk = await reader.read(len(MAGIC) - len(got))
        if not chunk:
            raise HandshakeError("closed before the handshake")
        got += chunk
        if not MAGIC.startswith(got):
            raise HandshakeError("not an EdgeTrain rendezvous client")


async def admit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: str) -> None:
    """The gate's side of the handshake; raises :class:`HandshakeError` on a wrong proof."""
    await _read_magic(reader)
    nc = await reader.readexactly(NONCE_BYTES)
    ns = secrets.token_bytes(NONCE_BYTES)
    writer.write(ns)
    await writer.drain()
    proof = await reader.readexactly(hashlib.sha256().digest_size)
    if not hmac.compare_digest(proof, _mac(secret, b"client", ns, nc)):
        raise HandshakeError("wrong proof of the run secret")
    writer.write(_mac(secret, b"gate", ns, nc))
    await writer.drain()


async def prove(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: str) -> None:
    """The client's side of the handshake; raises :class:`HandshakeError` when the gate
    cannot prove it holds the secret (another run's gate, an impostor on the port)."""
    nc = secrets.token_bytes(NONCE_BYTES)
    writer.write(MAGIC + nc)
    await writer.drain()
    ns = await reader.readexactly(NONCE_BYTES)
    writer.write(_mac(secret, b"client", ns, nc))
    await writer.drain()
    answer = await reader.readexactly(hashlib.sha256().digest_size)
    if not hmac.compare_digest(answer, _mac(secret, b"gate", ns, nc)):
        raise HandshakeError("the rendezvous did not prove the run secret (another run's, or not ours)")


async def _pipe(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy bytes both ways until either side ends; then close both."""
    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(_CHUNK):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass

    tasks = [asyncio.ensure_future(copy(a[0], b[1])), asyncio.ensure_future(copy(b[0], a[1]))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for w in (a[1], b[1]):
            w.transport.abort()


def _proc_addr(ip: str, port: int, v6: bool) -> str:
    """``ip:port`` as ``/proc/net/tcp`` (or ``tcp6``, v4-mapped) prints it: 32-bit words
    in host byte order."""
    raw = (b"\0" * 10 + b"\xff\xff" if v6 else b"") + socket.inet_aton(ip)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _peer_is_this_process(sock: socket.socket) -> bool:
    """Whether a loopback connection accepted on ``sock`` comes from this process.

    Linux: the peer's socket (found by its address pair in ``/proc/self/net/tcp``, or
    ``tcp6`` for a dual-stack client such as torch's) must be one of this process's
    descriptors.  Where ``/proc`` cannot tell, the answer is yes.
    """
    try:
        lip, lport = sock.getsockname()[:2]
        pip, pport = sock.getpeername()[:2]
        tables = {}
        for v6, name in ((False, "tcp"), (True, "tcp6")):
            try:
                with open(f"/proc/self/net/{name}") as f:
                    tables[v6] = f.read().splitlines()[1:]
            except FileNotFoundError:
                tables[v6] = []
    except OSError:
        return True
    inode = None
    for v6, rows in tables.items():
        want = (_proc_addr(pip, pport, v6), _proc_addr(lip, lport, v6))
        inode = next((cols[9] for cols in map(str.split, rows)
                      if len(cols) > 9 and (cols[1], cols[2]) == want), inode)
    if inode is None:
        return False
    mine = f"socket:[{inode}]"
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == mine:
                return True
        except OSError:
            continue
    return False


class _Endpoint:
    """An asyncio server on its own thread, with every connection it opened tracked so
    :meth:`close` leaves nothing open."""

    def __init__(self, secret: str, on_refused: Callable[[str], None] | None, name: str) -> None:
        if not secret:
            raise ValueError(f"the {name} needs the run's secret")
        self._secret, self._on_refused, self._name = secret, on_refused, name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._pending = 0
        self.refused = 0
        self.port = 0

    def _run(self, coro, timeout: float | None = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _listen(self, host: str, port: int) -> None:
        self._thread.start()
        try:
            self._server = self._run(asyncio.start_server(self._handle, host, port, backlog=128))
        except OSError as exc:
            self.close()
            raise OSError(f"the {self._name} cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]

    def _refuse(self, writer: asyncio.StreamWriter, why: str) -> None:
        self.refused += 1
        peer = writer.get_extra_info("peername") or ("?", 0)
        msg = f"{self._name} refused a connection from {peer[0]}:{peer[1]}: {why}"
        if self.refused <= 20 or self.refused % 100 == 0:  # a flood must not flood stderr
            log.warning("%s", msg)
        if self._on_refused is not None:
            try:
                self._on_refused(msg)
            except Exception:  # noqa: BLE001 - a reporting hook must not stop the gate
                log.exception("rendezvous on_refused hook failed")
        writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            await self._serve(reader, writer)
        finally:
            self._open.discard(writer)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _connect(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection(host, port)
        self._open.add(w)
        return r, w

    async def _pipe(self, a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                    b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        try:
            await _pipe(a, b)
        finally:
            self._drop(b[1])

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()
        self._open.discard(writer)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._open):
            w.transport.abort()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def close(self) -> None:
        """Stop listening and cut every connection (idempotent)."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                self._run(self._shutdown(), timeout=5)
            except Exception:  # noqa: BLE001 - closing must always get to the end
                log.exception("closing %s", self._name)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


class Gate(_Endpoint):
    """Rank 0's listener on ``(addr, port)``: authenticated connections are piped to the
    loopback store on ``127.0.0.1:target_port``; every other one is refused at once.

    Parameters
    ----------
    addr, port
        Rank 0's device address and the run's rendezvous port (never a wildcard address).
    target_port
        The real store's port on ``127.0.0.1``.
    secret
        The run's secret.
    on_refused
        Called (on the gate's thread) with a message for every refused connection.
    """

    def __init__(self, addr: str, port: int, target_port: int, secret: str,
                 on_refused: Callable[[str], None] | None = None) -> None:
        if addr in ("", "0.0.0.0", "::"):
            raise ValueError(f"the rendezvous gate must bind to the device's own address, not {addr!r}")
        super().__init__(secret, on_refused, "rendezvous gate")
        self.addr, self.target_port = addr, target_port
        self._listen(addr, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._pending >= MAX_PENDING:
            self._refuse(writer, f"over {MAX_PENDING} handshakes in progress")
            return
        self._pending += 1
        try:
            await asyncio.wait_for(admit(reader, writer, self._secret), HANDSHAKE_S)
        except asyncio.TimeoutError:
            self._refuse(writer, f"no handshake within {HANDSHAKE_S:.0f} s")
            return
        except (HandshakeError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._refuse(writer, str(exc) or type(exc).__name__)
            return
        finally:
            self._pending -= 1
        try:
            upstream = await self._connect("127.0.0.1", self.target_port)
        except OSError as exc:  # the store itself is gone (rank 0 is ending)
            log.error("rendezvous gate: the store on 127.0.0.1:%d does not answer: %s", self.target_port, exc)
            return
        await self._pipe((reader, writer), upstream)


class Relay(_Endpoint):
    """A loopback listener for this process's store client: each connection is carried to
    the gate at ``(gate_addr, gate_port)`` after the handshake.

    ``connect_s`` bounds how long a connection waits for the gate to appear (rank 0 may
    still be starting).  :attr:`error` holds why the last connection to the gate failed,
    for an error message that names the cause instead of torch's "connection reset".
    """

    def __init__(self, gate_addr: str, gate_port: int, secret: str, connect_s: float = 60.0,
                 on_refused: Callable[[str], None] | None = None) -> None:
        super().__init__(secret, on_refused, "rendezvous relay")
        self.gate_addr, self.gate_port, self.connect_s = gate_addr, gate_port, connect_s
        self.error = ""
        self._listen("127.0.0.1", 0)

    async def _reach_gate(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self.connect_s, 0.05
        while True:
            try:
                return await asyncio.wait_for(self._connect(self.gate_addr, self.gate_port), 5)
            except (OSError, asyncio.TimeoutError) as exc:
                if loop.time() + pause > deadline:
                    raise OSError(f"rank 0's rendezvous at {self.gate_addr}:{self.gate_port} did not answer "
                                  f"within {self.connect_s:.0f} s ({exc or type(exc).__name__})") from None
                await asyncio.sleep(pause)
                pause = min(0.5, pause * 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is None or not _peer_is_this_process(sock):
            self._refuse(writer, "not this worker's own store client")
            return
        up = None
        try:
            up = await self._reach_gate()
            await asyncio.wait_for(prove(up[0], up[1], self._secret), HANDSHAKE_S)
        except (HandshakeError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError) as exc:
            if up is not None:
                self._drop(up[1])
            why = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.IncompleteReadError):
                why = ("rank 0's rendezvous refused this worker's proof: they hold different run secrets "
                       "(a worker of another run, or another program on the run's port)")
            self.error = why
            log.error("rendezvous relay: %s", why)
            return
        await self._pipe((reader, writer), up)
