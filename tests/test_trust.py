"""The trusted domain: unknown host keys are refused until trusted, changed keys always are.

Run against the asyncssh testbed (no root) and against real OpenSSH sshd in the netns tier
(root only; skipped otherwise).  The CLI runs as a separate process, as a user would run it.
The netns test brings up a tier with its own random names and removes exactly that tier:
a tier the user runs (``et-N``/``etbr0``) is never touched.
"""
from __future__ import annotations

import asyncio
import getpass
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import asyncssh
import pytest

from app.devices.inventory import load_inventory
from app.devices.ssh import HostKeyError, KnownHosts, connect
from app.testbed import netns
from app.testbed.daemon import start_testbed, stop_testbed

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
HANG = 120  # seconds: only a hang takes this long


def _cli(args: list[str], home: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGETRAIN_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, input=stdin,
                          check=False, capture_output=True, text=True, timeout=HANG)


def _fp(key_file: Path) -> str:
    return asyncssh.read_private_key(str(key_file)).get_fingerprint("sha256")


def _connect_ok(inv_path: Path, known: Path) -> None:
    async def go() -> None:
        conn = await connect(load_inventory(inv_path).devices[0], KnownHosts(known))
        res = await conn.run("echo hi", check=True)
        assert str(res.stdout).strip() == "hi"
        conn.close()
    asyncio.run(go())


def _connect_refused(inv_path: Path, known: Path) -> HostKeyError:
    with pytest.raises(HostKeyError) as exc:
        asyncio.run(connect(load_inventory(inv_path).devices[0], KnownHosts(known)))
    return exc.value


def trust_flow(tmp: Path, host: str, port: int, user: str, key: Path, host_key: Path,
               change_key: Callable[[], None]) -> None:
    """add -> refused (unknown) -> trust -> works -> key changes -> refused -> --replace."""
    home = tmp / "home"
    inv = tmp / "inventory.yaml"
    known = home / "known_hosts"  # the inventory names none: EdgeTrain's own store
    res = _cli(["devices", "add", "edge1", host, "--port", str(port), "--user", user, "--key", str(key),
                "--inventory", str(inv)], home)
    assert res.returncode == 0, res.stderr
    assert "password" not in inv.read_text().lower()
    res = _cli(["devices", "list", "--inventory", str(inv)], home)
    assert "edge1" in res.stdout and "untrusted" in res.stdout, res.stdout

    err = _connect_refused(inv, known)
    assert err.kind == "unknown" and err.fingerprint == _fp(host_key)
    assert "edgetrain devices trust edge1" in str(err)

    # the user is shown the fingerprint and declines: still refused
    res = _cli(["devices", "trust", "edge1", "--inventory", str(inv)], home, stdin="n\n")
    assert res.returncode == 1 and _fp(host_key) in res.stdout
    _connect_refused(inv, known)
    # ... then accepts
    res = _cli(["devices", "trust", "edge1", "--inventory", str(inv)], home, stdin="y\n")
    assert res.returncode == 0, res.stdout + res.stderr
    _connect_ok(inv, known)
    assert "already trusted" in _cli(["devices", "trust", "edge1", "--yes", "--inventory", str(inv)], home).stdout

    # the device now presents another key: refused although the endpoint was trusted
    change_key()
    err = _connect_refused(inv, known)
    assert err.kind == "changed" and "HOST KEY CHANGED" in str(err) and err.fingerprint == _fp(host_key)
    before = known.read_text()
    res = _cli(["devices", "trust", "edge1", "--yes", "--inventory", str(inv)], home)
    assert res.returncode == 2 and "HOST KEY CHANGED" in res.stderr and "--replace" in res.stderr
    assert known.read_text() == before
    _connect_refused(inv, known)
    # verified out of band: replace it
    res = _cli(["devices", "trust", "edge1", "--replace", "--yes", "--inventory", str(inv)], home)
    assert res.returncode == 0, res.stderr
    _connect_ok(inv, known)
    assert len(KnownHosts(known).lookup(host, port)) == 1


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def test_trust_flow_asyncssh_testbed(tmp_path):
    addr = "127.0.12.31"
    port = _free_port(addr)  # fixed, so that a restart keeps the endpoint
    tb = tmp_path / "tb"
    info = start_testbed(tb, n_devices=1, base_addr=addr, port=port)
    dev = info.devices[0]

    def reinstall() -> None:
        stop_testbed(tb)
        dev.host_key.unlink()
        start_testbed(tb, n_devices=1, base_addr=addr, port=port)

    try:
        trust_flow(tmp_path, addr, port, getpass.getuser(),
                   info.client_key_path, dev.host_key, reinstall)
    finally:
        stop_testbed(tb)


@pytest.mark.root
@pytest.mark.skipif(netns.unavailable_reason() is not None, reason=f"netns tier: {netns.unavailable_reason()}")
def test_trust_flow_real_openssh_in_netns(tmp_path):
    d = tmp_path / "ns"
    try:
        tb = netns.netns_up(d, n=1, advertise=False, timeout=HANG, **asdict(netns.NetnsNames.tagged()))
        dev = tb.devices[0]
        trust_flow(tmp_path, dev.host, 22, "root", tb.client_key_path, d / "devices" / dev.name / "host_key",
                   lambda: netns.rekey(d, dev.name))
    finally:
        netns.netns_down(d)
