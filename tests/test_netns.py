"""The netns tier (root only): real sshd per namespace, tc-shaped links, mDNS on the bridge.

One tier of 3 devices serves the whole file; its finalizer always removes the namespaces,
links and processes, even when a test fails.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import asyncssh
import pytest

from app.devices.discovery import DeviceList, MdnsBrowser
from app.devices.inventory import load_inventory
from app.devices.profile import CONTROLLER, profile_devices
from app.devices.ssh import KnownHosts
from app.testbed import netns

REASON = netns.unavailable_reason()
pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=f"netns tier: {REASON}")]


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    d = tmp_path_factory.mktemp("netns")
    # a run killed mid-test (CI timeout) leaves et-N/etbr0 behind with its state file in a
    # vanished temp dir: clear them, or every later run would fail on "already exist"
    netns.netns_down(None, force=True)
    try:
        yield netns.netns_up(d, n=3, rate_mbit=1000)
    finally:
        netns.netns_down(d)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_sshd_is_key_only(tier):
    dev = tier.devices[0]

    async def with_password() -> None:
        await asyncssh.connect(dev.host, 22, username="root", password="root", client_keys=None,
                               known_hosts=None, agent_path=None, preferred_auth=("password", "keyboard-interactive"))

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(asyncio.wait_for(with_password(), 10))
    cfg = (tier.dir / "devices" / dev.name / "sshd_config").read_text()
    assert "PasswordAuthentication no" in cfg and "KbdInteractiveAuthentication no" in cfg


def test_bandwidth_within_15_percent_of_shaped_rate(tier, tmp_path):
    inv = load_inventory(tier.inventory_path)
    known = KnownHosts(tier.known_hosts_path)
    for rate in (50, 200):
        netns.set_rate(tier.dir, rate)
        t0 = time.monotonic()
        profiles, m = asyncio.run(profile_devices(inv.devices, known, tmp_path / "cache", refresh=True,
                                                  bench_seconds=0.1, link_seconds=0.5))
        took = time.monotonic() - t0
        names = [d.name for d in inv.devices] + [CONTROLLER]
        for a in names:
            for b in names:
                if a == b:
                    continue
                bw = m.bandwidth(a, b)
                assert bw is not None and abs(bw - rate) <= 0.15 * rate, (rate, a, b, bw, m.bandwidth_mbps)
                assert m.rtt(a, b) is not None and m.rtt(a, b) < 50  # no delay emulated (sub-ms unless loaded)
        assert all(p.versions["torch"] for p in profiles)
        assert took < 30, took


def test_mdns_finds_devices_within_2s_merged_with_inventory(tier):
    inv = load_inventory(tier.inventory_path)
    dl = DeviceList(KnownHosts(tier.known_hosts_path))
    dl.load_inventory(inv)
    t0 = time.monotonic()
    with MdnsBrowser.for_list(dl, [tier.bridge_addr]):
        while time.monotonic() - t0 < 5:
            if all(len(e.mdns_instances) == 2 for e in dl):  # _edgetrain._tcp and _ssh._tcp
                break
            time.sleep(0.02)
        took = time.monotonic() - t0
        assert took < 2.0, f"{took:.2f} s: {[(e.name, e.mdns_instances) for e in dl]}"
        assert sorted(e.name for e in dl) == [d.name for d in inv.devices]  # no duplicates
        for e in dl:
            assert e.sources == {"inventory", "mdns"} and not e.candidate
            assert e.status == "online" and e.addresses == [e.device.host]
        # a device stops advertising: offline, still listed
        victim = tier.devices[0]
        os.kill(victim.advertiser_pid, signal.SIGTERM)
        entry = dl.get(victim.name)
        deadline = time.monotonic() + 5
        while entry.status != "offline" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert entry.status == "offline" and dl.get(victim.name) is entry and len(dl) == len(inv.devices)


def test_cli_down_removes_everything(tier):
    from app.cli.main import main

    pids = [p for d in tier.devices for p in (d.sshd_pid, d.advertiser_pid) if p]
    assert main(["netns-testbed", "status", "--dir", str(tier.dir)]) == 0
    assert main(["netns-testbed", "down", "--dir", str(tier.dir)]) == 0
    left = {ns for ns in _namespaces() if ns.startswith(netns.NS_PREFIX)}
    assert not left & {d.namespace for d in tier.devices}
    assert subprocess.run(["ip", "link", "show", netns.BRIDGE], capture_output=True).returncode != 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
    assert not (tier.dir / netns.STATE_FILE).exists()
    assert main(["netns-testbed", "down", "--dir", str(tier.dir)]) == 0  # idempotent
