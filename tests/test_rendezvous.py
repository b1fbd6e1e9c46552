"""The rendezvous only the run's workers can reach (``workers/rendezvous.py``, ``workers/dist.py``).

Real sockets, real processes: the gate and relay in front of a byte-echo "store", a
stranger in another process, torch's own ``TCPStore``, and a whole run over the testbed's
SSH servers with strangers knocking at its rendezvous while it trains.
"""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from app.devices.inventory import load_inventory
from app.run.jobs import prepare_run
from app.testbed.local import Testbed
from tests.test_e2e_spine import _until, base_addr, gone
from workers.config import RunSettings
from workers.dist import free_port, rendezvous_store, shutdown
from workers.rendezvous import MAGIC, NONCE_BYTES, Gate, HandshakeError, Relay, prove

SECRET = "a3" * 32


class _Echo:
    """A loopback server that echoes every byte back (stands in for the store)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)


def _closed_at_once(sock: socket.socket, within_s: float = 2.0) -> bool:
    """Whether the peer closes ``sock`` (end of file or reset) within ``within_s``."""
    sock.settimeout(within_s)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _listening(port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


@pytest.fixture
def gate():
    echo = _Echo()
    g = Gate("127.0.0.1", 0, echo.port, SECRET)
    yield g
    g.close()
    echo.sock.close()


def test_relay_with_the_secret_gets_through_and_strangers_are_cut(gate):
    relay = Relay("127.0.0.1", gate.port, SECRET)
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            c.sendall(b"set k v")
            assert c.recv(100) == b"set k v"          # through relay, gate, to the store and back
        # another run's worker: wrong secret, cut, and the relay says why
        other = Relay("127.0.0.1", gate.port, "b4" * 32)
        with socket.create_connection(("127.0.0.1", other.port), timeout=5) as c:
            c.sendall(b"set k evil")
            assert _closed_at_once(c)
        assert "different run secrets" in other.error
        other.close()
        # a port scanner, or a TCPStore client, speaking first: refused on its first byte
        with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as c:
            c.sendall(b"\x00\x01garbage")
            t0 = time.monotonic()
            assert _closed_at_once(c) and time.monotonic() - t0 < 1.0
        assert gate.refused == 2
        # the gate still serves its own
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            c.sendall(b"get k")
            assert c.recv(100) == b"get k"
    finally:
        relay.close()
    assert not _listening(relay.port)                  # closed means closed


def test_a_recorded_handshake_cannot_be_replayed(gate):
    key = SECRET.encode()
    nc = os.urandom(NONCE_BYTES)
    with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as c:
        c.sendall(MAGIC + nc)
        ns = c.recv(NONCE_BYTES, socket.MSG_WAITALL)
        proof = hmac.new(key, b"client" + ns + nc, hashlib.sha256).digest()
        c.sendall(proof)
        assert c.recv(32, socket.MSG_WAITALL) == hmac.new(key, b"gate" + ns + nc, hashlib.sha256).digest()
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
    # the same client nonce and proof again: the gate's fresh nonce makes the old proof wrong
    with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as c:
        c.sendall(MAGIC + nc)
        assert c.recv(NONCE_BYTES, socket.MSG_WAITALL) != ns
        c.sendall(proof)
        assert _closed_at_once(c)
    assert gate.refused == 1


def test_a_gate_without_the_secret_is_not_trusted(gate):
    # the client checks the gate's answer too: an impostor on the port learns nothing
    async def main() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", gate.port)
        try:
            await prove(r, w, "c5" * 32)
        finally:
            w.close()
    with pytest.raises((HandshakeError, asyncio.IncompleteReadError)):
        asyncio.run(main())


def test_relay_serves_only_its_own_process(gate):
    relay = Relay("127.0.0.1", gate.port, SECRET)
    try:
        code = ("import socket,sys;c=socket.create_connection(('127.0.0.1',int(sys.argv[1])));"
                "c.sendall(b'x');c.settimeout(5);print(repr(c.recv(10)))")
        out = subprocess.run([sys.executable, "-c", code, str(relay.port)], capture_output=True, text=True,
                             timeout=30)
        assert out.stdout.strip() in ("b''", "") and relay.refused == 1, out
        assert gate.refused == 0                       # it never reached the gate
    finally:
        relay.close()


def test_torch_store_behind_the_gate_binds_to_the_device_address():
    addr = base_addr()
    port = free_port(addr)
    timeout = datetime.timedelta(seconds=20)
    joined: dict = {}
    worker = threading.Thread(target=lambda: joined.update(
        store=rendezvous_store(1, 2, addr, port, timeout, SECRET)))
    worker.start()
    master = rendezvous_store(0, 2, addr, port, timeout, SECRET)
    worker.join(30)
    try:
        master.set("k", "v")
        assert joined["store"].get("k") == b"v"
        assert _listening(port) == [addr]              # the device's address, not 0.0.0.0
        # torch's own client pointed at the gate: it never gets to write a key
        with pytest.raises(dist.DistError):
            dist.TCPStore(addr, port, 2, False, datetime.timedelta(seconds=2)).set("evil", "1")
        master.set_timeout(datetime.timedelta(seconds=1))
        with pytest.raises(dist.DistError):
            master.get("evil")
    finally:
        del master, joined["store"]
        shutdown()
    assert not _listening(port)


def _knock(addr: str, port: int) -> list[str]:
    """What strangers get from the run's rendezvous (run on a thread: torch's client blocks)."""
    seen = []
    with socket.create_connection((addr, port), timeout=5) as c:
        c.sendall(b"\x01\x02\x03\x04 hello store")
        seen.append("garbage cut" if _closed_at_once(c) else "garbage kept")

    async def wrong_secret() -> str:
        r, w = await asyncio.open_connection(addr, port)
        try:
            await prove(r, w, "d6" * 32)
            return "wrong secret admitted"
        except (HandshakeError, asyncio.IncompleteReadError, ConnectionError):
            return "wrong secret refused"
        finally:
            w.close()
    seen.append(asyncio.run(wrong_secret()))
    try:  # last: torch's client retries until its timeout
        dist.TCPStore(addr, port, 2, False, datetime.timedelta(seconds=1)).set("evil", "1")
        seen.append("TCPStore wrote a key")
    except dist.DistError:
        seen.append("TCPStore refused")
    return seen


@pytest.mark.slow
def test_strangers_are_refused_the_run_completes_and_nothing_is_left_listening(tmp_path: Path):
    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            settings = RunSettings(model="tiny-gpt2", parallelism="dp", steps=200, batch_size=8, seq_len=16,
                                   sync_every=2, checkpoint_every=0, eval_every=0)
            launcher, state = prepare_run(inv, None, settings, tmp_path / "runs")
            task = asyncio.ensure_future(launcher.run())
            # every rank has been through the rendezvous: the strangers come while the
            # workers load the model and train
            await _until(lambda: len({e.device for e in state.events if "joined process group" in e.message}) == 2
                         or task.done(), 90)
            assert not task.done(), state.events
            job, secret = launcher.job, launcher._secret
            pid0 = state.devices["dev0"].pid
            listens = [c.laddr for c in psutil.Process(pid0).net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN]
            cmdlines = [" ".join(psutil.Process(d.pid).cmdline()) for d in state.devices.values()]
            knocks = await asyncio.to_thread(_knock, job.master_addr, job.master_port)
            during = task.done()
            outcome = await asyncio.wait_for(task, 120)
            return outcome, state, job, secret, listens, cmdlines, knocks, during

    outcome, state, job, secret, listens, cmdlines, knocks, during = asyncio.run(main())
    assert knocks == ["garbage cut", "wrong secret refused", "TCPStore refused"]
    assert not during, "the run ended before the strangers knocked: give it more steps"
    assert outcome == "done", state.events
    assert all(d.status == "done" and d.steps == 200 for d in state.devices.values())
    # each stranger is in the run's events, from the device whose gate refused it
    refused = [e for e in state.events if e.device == "dev0" and "refused" in e.message.lower()]
    assert len(refused) >= 2, [e.message for e in state.events]
    # rank 0 listened on its device address (the gate, gloo) and loopback (the store), never everywhere
    assert (job.master_addr, job.master_port) in [(a.ip, a.port) for a in listens]
    assert {a.ip for a in listens} == {job.master_addr, "127.0.0.1"}, listens
    # the secret was never on a command line nor in anything the run wrote
    assert all(secret not in c for c in cmdlines)
    for f in state.run_dir.rglob("*"):
        if f.is_file():
            assert secret not in f.read_text(errors="replace"), f
    # the run is over: its workers are gone and nothing listens on its ports
    assert all(gone(d.pid) for d in state.devices.values())
    assert not any(_listening(a.port) for a in listens)
