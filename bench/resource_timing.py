"""How long resource selection takes: the timings the tests no longer assert.

The tests wait for events (a device found, a device offline, a profile written) with a
timeout that only catches hangs; the durations they used to bound are measured here and
printed next to the limits those tests had, so a slow machine shows up as a number, not
as a flaky test:

* mDNS discovery over loopback (``tests/test_discovery.py``: found within 2 s, offline
  within 5 s);
* ``edgetrain profile --refresh`` on 4 heterogeneous asyncssh testbed devices, then from
  the cache in a new process (``tests/test_profile.py``: under 30 s; cached faster);
* root only, the netns tier (``tests/test_netns.py``): ``netns_up``/``netns_down`` of 3
  devices with mDNS (up within ``netns_up``'s default 20 s timeout), mDNS discovery on
  the bridge (within 2 s, offline within 5 s), and a profile of the 3 devices at 50 and
  200 Mbit/s (under 30 s each; links within 15 % of the rate; RTT under 50 ms).

Every netns tier here has its own random names (``NetnsNames.tagged()``) and is removed
from its own state file: a tier the user runs is never touched.

    .venv/bin/python bench/resource_timing.py [--repeat 3] [--no-netns]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.devices.discovery import EDGETRAIN_TYPE, SSH_TYPE, DeviceList, MdnsBrowser, advertise
from app.devices.inventory import Device, Inventory, load_inventory
from app.devices.profile import CONTROLLER, profile_devices
from app.devices.ssh import KnownHosts
from app.testbed import netns
from app.testbed.daemon import start_testbed, stop_testbed

HANG = 120.0
LO = "127.0.0.1"


def _until(pred, what: str) -> float:
    """Seconds until ``pred()`` holds (raises after HANG)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > HANG:
            raise TimeoutError(f"hung waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def mdns_loopback() -> dict[str, float]:
    tok = secrets.token_hex(3)
    inv = Inventory(devices=[Device(f"inv-{tok}-a", "127.0.16.1", 2201, "edge")])
    specs = [(f"adv-{tok}-a", "127.0.16.1", 2201), (f"adv-{tok}-c", "127.0.16.3", 2203)]
    advs: list = [None] * len(specs)

    def one(i: int) -> None:
        name, addr, port = specs[i]
        advs[i] = advertise(name, addr, port, [LO], {"user": "edge"}, types=(EDGETRAIN_TYPE, SSH_TYPE))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        dl = DeviceList()
        dl.load_inventory(inv)
        t0 = time.monotonic()
        with MdnsBrowser.for_list(dl, [LO]):
            ours = lambda: [e for e in dl.entries() if tok in e.name and "mdns" in e.sources]
            _until(lambda: len(ours()) >= 2 and len(dl.get(f"inv-{tok}-a").mdns_instances) == 2, "loopback mDNS")
            found = time.monotonic() - t0
            a = dl.get(f"inv-{tok}-a")
            advs[0].close()
            offline = _until(lambda: a.status == "offline", "offline over loopback")
        return {"found": found, "offline": offline}
    finally:
        for adv in advs:
            if adv:
                adv.close()


def profile_cli(tmp: Path) -> dict[str, float]:
    info = start_testbed(tmp / "tb4", n_devices=4, preset="heterogeneous", base_addr="127.0.15.11", port=0)
    env = {**os.environ, "EDGETRAIN_HOME": str(tmp / "home")}
    out = {}
    try:
        for key, extra in (("refresh", ["--refresh"]), ("cached", [])):
            t0 = time.monotonic()
            res = subprocess.run([sys.executable, "-m", "app.cli", "profile", "--inventory", str(info.inventory_path),
                                  *extra], cwd=ROOT, env=env, check=False, capture_output=True, text=True,
                                 timeout=600)
            out[key] = time.monotonic() - t0
            if res.returncode != 0:
                raise RuntimeError(res.stderr)
    finally:
        stop_testbed(tmp / "tb4")
    return out


def netns_tier(tmp: Path) -> dict[str, float]:
    d = tmp / "netns"
    out: dict[str, float] = {}
    t0 = time.monotonic()
    tb = netns.netns_up(d, n=3, rate_mbit=1000, timeout=HANG, **asdict(netns.NetnsNames.tagged()))
    out["up"] = time.monotonic() - t0
    try:
        inv = load_inventory(tb.inventory_path)
        known = KnownHosts(tb.known_hosts_path)
        dl = DeviceList(known)
        dl.load_inventory(inv)
        t0 = time.monotonic()
        with MdnsBrowser.for_list(dl, [tb.bridge_addr]):
            _until(lambda: all(len(e.mdns_instances) == 2 for e in dl), "netns mDNS")
            out["found"] = time.monotonic() - t0
            entry = dl.get(tb.devices[0].name)
            os.kill(tb.devices[0].advertiser_pid, signal.SIGTERM)
            out["offline"] = _until(lambda: entry.status == "offline", "offline in netns")
        names = [x.name for x in inv.devices] + [CONTROLLER]
        for rate in (50, 200):
            netns.set_rate(tb.dir, rate)
            t0 = time.monotonic()
            _, m = asyncio.run(profile_devices(inv.devices, known, tmp / f"cache{rate}", refresh=True,
                                               bench_seconds=0.1, link_seconds=0.5))
            out[f"profile{rate}"] = time.monotonic() - t0
            pairs = [(a, b) for a in names for b in names if a != b]
            out[f"bw_err{rate}"] = max(abs(m.bandwidth(a, b) - rate) / rate for a, b in pairs) * 100
            out[f"rtt{rate}"] = max(m.rtt(a, b) for a, b in pairs)
    finally:
        t0 = time.monotonic()
        netns.netns_down(d)
        out["down"] = time.monotonic() - t0
    return out


ROWS = [  # (key, what, unit, old limit, the test that had it)
    ("lo.found", "mDNS over loopback: 2 devices found", "s", 2.0, "test_discovery"),
    ("lo.offline", "mDNS over loopback: withdrawn -> offline", "s", 5.0, "test_discovery"),
    ("cli.refresh", "profile --refresh, 4 testbed devices (CLI)", "s", 30.0, "test_profile"),
    ("cli.cached", "profile from cache, new process (CLI)", "s", None, "test_profile: < refresh"),
    ("ns.up", "netns_up, 3 devices with sshd + mDNS", "s", 20.0, "netns_up default timeout"),
    ("ns.found", "netns mDNS: 3 devices x 2 records found", "s", 2.0, "test_netns"),
    ("ns.offline", "netns mDNS: advertiser killed -> offline", "s", 5.0, "test_netns"),
    ("ns.profile50", "netns profile, 3 devices at 50 Mbit/s", "s", 30.0, "test_netns"),
    ("ns.profile200", "netns profile, 3 devices at 200 Mbit/s", "s", 30.0, "test_netns"),
    ("ns.bw_err50", "  worst link error vs 50 Mbit/s", "%", 15.0, "test_netns (still tested)"),
    ("ns.bw_err200", "  worst link error vs 200 Mbit/s", "%", 15.0, "test_netns (still tested)"),
    ("ns.rtt50", "  worst round-trip time at 50 Mbit/s", "ms", 50.0, "test_netns"),
    ("ns.rtt200", "  worst round-trip time at 200 Mbit/s", "ms", 50.0, "test_netns"),
    ("ns.down", "netns_down, 3 devices", "s", None, "-"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="measure this many times (median and max shown)")
    ap.add_argument("--no-netns", action="store_true", help="skip the netns tier (needs root)")
    args = ap.parse_args()
    why = "skipped (--no-netns)" if args.no_netns else netns.unavailable_reason()
    samples: dict[str, list[float]] = {}
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="et-timing-") as tmp:
            parts = [("lo", mdns_loopback), ("cli", lambda: profile_cli(Path(tmp)))]
            if why is None:
                parts.append(("ns", lambda: netns_tier(Path(tmp))))
            for prefix, fn in parts:
                for k, v in fn().items():
                    samples.setdefault(f"{prefix}.{k}", []).append(v)
        print(f"run {i + 1}/{args.repeat} done", file=sys.stderr)
    print(f"{'measure':<46} {'median':>8} {'max':>8}  {'old limit':>9}  within  limit from")
    for key, what, unit, limit, where in ROWS:
        vals = samples.get(key)
        if not vals:
            print(f"{what:<46} {'-':>8} {'-':>8}  {'':>9}  -       netns tier: {why}")
            continue
        med, worst = statistics.median(vals), max(vals)
        if key == "cli.cached":
            ok = all(c < r for c, r in zip(vals, samples["cli.refresh"]))
            lim = "< refresh"
        else:
            ok = limit is None or worst < limit
            lim = "-" if limit is None else f"{limit:g} {unit}"
        print(f"{what:<46} {med:>6.2f} {unit:<2}{worst:>6.2f} {unit:<2} {lim:>9}  {'yes' if ok else 'NO':<6}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
