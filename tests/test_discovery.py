"""Discovery: the merged device list, real mDNS over loopback, and statuses from real SSH.

The netns tier's discovery test (mDNS across namespaces) is in test_netns.py.  Waits end
on the event, with a timeout that only catches hangs; how long discovery takes is measured
by ``bench/resource_timing.py``.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
import time

import pytest

from app.devices.discovery import (
    EDGETRAIN_TYPE,
    SSH_TYPE,
    WORKSTATION_TYPE,
    DeviceList,
    MdnsBrowser,
    MdnsService,
    advertise,
    browse,
)
from app.devices.inventory import Device, Inventory, load_inventory
from app.devices.ssh import KnownHosts
from app.testbed.local import Testbed

LO = "127.0.0.1"
HANG = 120.0  # seconds: only a hang takes this long


def _wait(pred, timeout: float = HANG) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _advertise_all(specs: list[tuple]) -> list:
    """Register several advertisers side by side (each probes its names for ~1.5 s)."""
    out: list = [None] * len(specs)

    def one(i: int, spec: tuple) -> None:
        name, addr, port, types = spec
        out[i] = advertise(name, addr, port, [LO], {"user": "edge"}, types=types)

    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out), "an advertiser failed to register"
    return out


def test_mdns_merges_with_inventory_without_duplicates_and_marks_offline():
    tok = secrets.token_hex(3)
    inv = Inventory(devices=[Device(f"inv-{tok}-a", "127.0.14.1", 2201, "edge"),
                             Device(f"inv-{tok}-b", "127.0.14.2", 2202, "edge")])
    # a: advertised under another name, same endpoint (edgetrain + ssh records);
    # b: inventory only; c: not in the inventory; w: a plain workstation (candidate)
    advs = _advertise_all([(f"adv-{tok}-a", "127.0.14.1", 2201, (EDGETRAIN_TYPE, SSH_TYPE)),
                           (f"adv-{tok}-c", "127.0.14.3", 2203, (EDGETRAIN_TYPE, SSH_TYPE)),
                           (f"ws-{tok}", "127.0.14.4", 9, (WORKSTATION_TYPE,))])
    dl = DeviceList()
    dl.load_inventory(inv)
    events: list[str] = []
    dl.added.connect(lambda e: events.append(f"added {e.name}"))
    dl.changed.connect(lambda e: events.append(f"changed {e.name}"))
    try:
        with MdnsBrowser.for_list(dl, [LO]):
            ours = lambda: [e for e in dl.entries() if tok in e.name]  # noqa: E731
            assert _wait(lambda: sum("mdns" in e.sources for e in ours()) >= 3 and
                         len(dl.get(f"inv-{tok}-a").mdns_instances) == 2), [
                (e.name, e.sources) for e in ours()]
            a = dl.get(f"inv-{tok}-a")
            assert a.sources == {"inventory", "mdns"} and a.status == "online" and not a.candidate
            assert a.device.user == "edge" and a.device.port == 2201  # the inventory's description wins
            assert dl.get(f"inv-{tok}-b").sources == {"inventory"}
            c = dl.get(f"adv-{tok}-c")
            assert c.sources == {"mdns"} and (c.device.host, c.device.port) == ("127.0.14.3", 2203)
            ws = dl.get(f"ws-{tok}")
            assert ws.candidate and ws.device.port == 22  # the workstation record's port 9 is not SSH
            names = [e.name for e in ours()]
            assert sorted(names) == sorted([f"inv-{tok}-a", f"inv-{tok}-b", f"adv-{tok}-c", f"ws-{tok}"])
            assert f"ws-{tok}" not in [d.name for d in dl.devices()]
            assert any(ev.startswith("added adv-") for ev in events)
            # the advertised device goes away: marked offline, not deleted
            advs[0].close()
            assert _wait(lambda: a.status == "offline"), (a.status, a.mdns_instances)
            assert dl.get(f"inv-{tok}-a") is a and "mdns" in a.sources
    finally:
        for adv in advs:
            adv.close()


def test_browse_and_interfaces_are_required():
    with pytest.raises(ValueError, match="interface"):
        MdnsBrowser([], lambda s: None, lambda n: None)
    with pytest.raises(ValueError, match="interface"):
        advertise("x", "127.0.0.1", 22, [])
    tok = secrets.token_hex(3)
    with advertise(f"b-{tok}", "127.0.14.9", 2222, [LO], types=(EDGETRAIN_TYPE,)):
        found = browse([LO], HANG, types=(EDGETRAIN_TYPE,),  # returns as soon as it is found
                       until=lambda f: any(tok in s.instance for s in f))
    mine = [s for s in found if tok in s.instance]
    assert len(mine) == 1
    assert mine[0].addresses == ["127.0.14.9"] and mine[0].port == 2222
    assert mine[0].properties["name"] == f"b-{tok}" and mine[0].server == f"b-{tok}.local."


def _svc(kind: str, name: str, addr: str, port: int) -> MdnsService:
    t = {"edgetrain": EDGETRAIN_TYPE, "ssh": SSH_TYPE, "workstation": WORKSTATION_TYPE}[kind]
    return MdnsService(t, f"{name}.{t}", f"{name}.local.", [addr], port, {"name": name})


def test_merge_rules_manual_hostnames_and_name_clashes():
    dl = DeviceList()
    # a candidate (ssh only) becomes a device once it advertises EdgeTrain
    dl.service_seen(_svc("ssh", "box", "10.1.0.5", 22))
    assert dl.get("box").candidate
    dl.service_seen(_svc("edgetrain", "box", "10.1.0.5", 22))
    assert len(dl) == 1 and not dl.get("box").candidate
    # a manual add of the same endpoint merges (user's name and key win), no duplicate
    dl.add_manual("mybox", "10.1.0.5", 22, user="pi")
    assert [e.name for e in dl] == ["mybox"]
    assert dl.get("mybox").sources == {"manual", "mdns"} and dl.get("mybox").device.user == "pi"
    # the inventory names a host by its mDNS name: still the same device
    dl.service_seen(_svc("edgetrain", "nano", "10.1.0.6", 22))
    dl.load_inventory(Inventory(devices=[Device("nano-inv", "nano.local", 22, "edge")]))
    assert sorted(e.name for e in dl) == ["mybox", "nano-inv"]
    # same port on another address is another device; a clashing advertised name is renamed
    dl.service_seen(_svc("edgetrain", "mybox", "10.1.0.7", 22))
    assert sorted(e.name for e in dl) == ["mybox", "mybox-2", "nano-inv"]
    with pytest.raises(ValueError, match="already exists"):
        dl.add_manual("mybox", "10.1.0.99", 22)
    removed: list[str] = []
    dl.removed.connect(removed.append)
    dl.remove("mybox-2")
    assert removed == ["mybox-2"] and len(dl) == 2


def test_check_sets_online_untrusted_offline_from_real_ssh(tmp_path):
    async def scenario() -> dict[str, str]:
        async with Testbed(tmp_path / "tb", n_devices=2, base_addr="127.0.12.1", port=0) as tb:
            inv = load_inventory(tb.inventory_path)
            known = KnownHosts(tmp_path / "known_hosts")
            d0 = inv.devices[0]
            known.trust(d0.host, d0.port, KnownHosts(tb.known_hosts_path).lookup(d0.host, d0.port)[0])
            dl = DeviceList(known)
            dl.load_inventory(inv)
            assert dl.get(inv.devices[1].name).status == "untrusted"  # no key stored yet
            dl.add_manual("gone", "127.0.12.99", 1)
            await dl.check(known)
            return {e.name: e.status for e in dl}

    statuses = asyncio.run(scenario())
    assert statuses == {"dev0": "online", "dev1": "untrusted", "gone": "offline"}
