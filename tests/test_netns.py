"""The netns tier (root only): real sshd per namespace, tc-shaped links, mDNS on the bridge.

Every tier here has its own random names (``NetnsNames.tagged()``: namespaces
``ett<tag>-N``, bridge ``ettbr<tag>``, a free 10.x.y.0/24), and is torn down from its own
state file: a tier the user runs (``et-N``/``etbr0``) or another test's tier is never
touched.  Tests that change a tier (kill an advertiser, take it down) bring up their own;
the shared read-only tier is left as it was found.  No test has a time limit: waits end on
the event, with a timeout that only catches hangs (timings: ``bench/resource_timing.py``).
"""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

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
HANG = 120.0  # seconds: only a hang takes this long


def tier_up(d: Path, n: int, names: netns.NetnsNames | None = None, **kw) -> netns.NetnsTestbed:
    """A tier with this test's own names (nothing another tier or the user uses)."""
    return netns.netns_up(d, n=n, timeout=HANG, **asdict(names or netns.NetnsNames.tagged()), **kw)


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    """3 devices for the tests that only read (each restores what it changes)."""
    d = tmp_path_factory.mktemp("netns")
    try:
        yield tier_up(d, 3, rate_mbit=1000)
    finally:
        netns.netns_down(d)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], check=False, capture_output=True).returncode == 0


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def _until(pred, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not pred():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.02)


def test_sshd_is_key_only(tier):
    dev = tier.devices[0]

    async def with_password() -> None:
        await asyncssh.connect(dev.host, 22, username="root", password="root", client_keys=None,
                               known_hosts=None, agent_path=None, preferred_auth=("password", "keyboard-interactive"))

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(asyncio.wait_for(with_password(), HANG))
    cfg = (tier.dir / "devices" / dev.name / "sshd_config").read_text()
    assert "PasswordAuthentication no" in cfg and "KbdInteractiveAuthentication no" in cfg


def test_bandwidth_within_15_percent_of_shaped_rate(tier, tmp_path):
    inv = load_inventory(tier.inventory_path)
    known = KnownHosts(tier.known_hosts_path)
    try:
        for rate in (50, 200):
            netns.set_rate(tier.dir, rate)  # each measurement sets the rate it checks
            profiles, m = asyncio.run(profile_devices(inv.devices, known, tmp_path / "cache", refresh=True,
                                                      bench_seconds=0.1, link_seconds=0.5))
            names = [d.name for d in inv.devices] + [CONTROLLER]
            for a in names:
                for b in names:
                    if a == b:
                        continue
                    bw = m.bandwidth(a, b)
                    assert bw is not None and abs(bw - rate) <= 0.15 * rate, (rate, a, b, bw, m.bandwidth_mbps)
                    assert m.rtt(a, b) is not None and m.rtt(a, b) > 0  # measured (its size: the bench)
            assert all(p.versions["torch"] for p in profiles)
    finally:
        netns.set_rate(tier.dir, tier.rate_mbit)  # the shared tier as it was


def test_mdns_finds_devices_merged_with_inventory_and_marks_offline(tmp_path):
    tb = tier_up(tmp_path / "tier", 2)  # its own tier: one advertiser is killed below
    try:
        inv = load_inventory(tb.inventory_path)
        dl = DeviceList(KnownHosts(tb.known_hosts_path))
        dl.load_inventory(inv)
        with MdnsBrowser.for_list(dl, [tb.bridge_addr]):
            _until(lambda: all(len(e.mdns_instances) == 2 for e in dl),  # _edgetrain._tcp and _ssh._tcp
                   "both mDNS records of every device")
            assert sorted(e.name for e in dl) == [d.name for d in inv.devices]  # no duplicates
            for e in dl:
                assert e.sources == {"inventory", "mdns"} and not e.candidate
                assert e.status == "online" and e.addresses == [e.device.host]
            # a device stops advertising: offline, still listed
            victim = tb.devices[0]
            os.kill(victim.advertiser_pid, signal.SIGTERM)
            entry = dl.get(victim.name)
            _until(lambda: entry.status == "offline", f"{victim.name} marked offline")
            assert dl.get(victim.name) is entry and len(dl) == len(inv.devices)
            assert dl.get(tb.devices[1].name).status == "online"
    finally:
        netns.netns_down(tb.dir)


def test_cli_down_removes_everything(tmp_path):
    from app.cli.main import main

    tb = tier_up(tmp_path / "tier", 1)  # its own tier: taken down below
    try:
        pids = [p for d in tb.devices for p in (d.sshd_pid, d.advertiser_pid) if p]
        assert len(pids) == 2
        assert main(["netns-testbed", "status", "--dir", str(tb.dir)]) == 0
        assert main(["netns-testbed", "down", "--dir", str(tb.dir)]) == 0
        assert not _namespaces() & {d.namespace for d in tb.devices}
        assert not _link(tb.bridge) and not any(_link(d.veth) for d in tb.devices)
        for pid in pids:
            assert _gone(pid), pid
        assert not (tb.dir / netns.STATE_FILE).exists()
        assert main(["netns-testbed", "down", "--dir", str(tb.dir)]) == 0  # idempotent
    finally:
        netns.netns_down(tb.dir)


@pytest.mark.parametrize("force", [False, True], ids=["down", "down-force"])
def test_down_removes_only_what_this_tier_owns(tmp_path, force):
    """Decoys: a namespace in the user's style (et-N), another tier's namespace and bridge,
    and a namespace with this tier's prefix that this tier did not create (a leftover:
    ``force`` removes it, a plain down does not)."""
    names, other = netns.NetnsNames.tagged(), netns.NetnsNames.tagged()
    user_style = f"{netns.NS_PREFIX}9{secrets.randbelow(10**5):05d}"
    leftover = names.namespace(7)
    decoy_ns = [user_style, other.namespace(0), leftover]
    d = tmp_path / "tier"
    made: list[str] = []
    try:
        # the decoys exist first, as a user's tier would when the tests start
        for ns in decoy_ns:
            assert ns not in _namespaces(), ns
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made.append(ns)
        subprocess.run(["ip", "link", "add", other.bridge, "type", "bridge"], check=True)
        made.append(other.bridge)
        tb = tier_up(d, 1, names, advertise=False)

        assert netns.netns_down(tb.dir, force=force)

        left = _namespaces()
        assert not left & {x.namespace for x in tb.devices} and not _link(tb.bridge)
        assert user_style in left and other.namespace(0) in left and _link(other.bridge)
        assert (leftover in left) is not force
    finally:
        netns.netns_down(d)
        for x in made:  # the decoys: made by this test, so removed by it
            if x == other.bridge:
                subprocess.run(["ip", "link", "del", x], check=False, capture_output=True)
            else:
                subprocess.run(["ip", "netns", "del", x], check=False, capture_output=True)
        leaked = _namespaces() & set(decoy_ns)
        assert not leaked and not _link(other.bridge), leaked


def test_names_are_checked_before_anything_is_created(tmp_path):
    with pytest.raises(netns.NetnsError, match="bridge name .* Linux allows 15"):
        netns.netns_up(tmp_path, n=1, prefix="ettx-", bridge="ettbr0123456789a", subnet="10.200.3.")
    with pytest.raises(netns.NetnsError, match="veth name 'ett0123456789abv10' .* Linux allows 15"):
        netns.netns_up(tmp_path, n=11, prefix="ett0123456789ab-", bridge="ettbrx", subnet="10.200.3.")
    with pytest.raises(netns.NetnsError, match="subnet"):
        netns.netns_up(tmp_path, n=1, prefix="ettx-", bridge="ettbrx", subnet="10.300.0.")
    assert not (tmp_path / netns.STATE_FILE).exists()
    assert not {ns for ns in _namespaces() if ns.startswith(("ett0123456789ab-", "ettx-"))}
    assert not _link("ettbrx") and not _link("ettbr0123456789")  # nor a truncated name
    # the defaults keep the user's names; tagged ones fit Linux's 15 characters at 200 devices
    d = netns.NetnsNames()
    assert (d.namespace(0), d.veth(0), d.bridge, d.bridge_addr) == ("et-0", "etv0", "etbr0", "10.77.0.254")
    t = netns.NetnsNames.tagged()
    t.check(200)
    assert len(t.veth(199)) <= 15 and len(t.bridge) <= 15 and not t.owns("et-0") and t.owns(t.namespace(3))
