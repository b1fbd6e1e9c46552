"""``edgetrain devices|profile|preflight|netns-testbed``: resource selection from the command line.

* ``devices list``   the merged device list (inventory + mDNS on the given interfaces)
* ``devices add``    append a device to the inventory (key authentication only)
* ``devices trust``  show a device's host key fingerprint and add it to the trusted domain
* ``profile``        measure devices and links (cached; ``--refresh`` remeasures)
* ``preflight``      check that a worker can run on each device, with a fix per failure
* ``netns-testbed``  the root-only namespace tier (real sshd, tc-shaped links, mDNS)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from app.cli.flags import inventory_path
from app.devices.discovery import DeviceList, MdnsBrowser
from app.devices.inventory import Inventory, InventoryError, load_inventory, parse_device
from app.devices.preflight import format_reports, preflight
from app.devices.profile import ProfileError, profile_devices
from app.devices.ssh import KnownHosts, fetch_host_key, fingerprint
from app.paths import default_known_hosts


def _names(values: list[str] | None) -> list[str] | None:
    names = [n for v in (values or []) for n in v.split(",") if n]
    return names or None


def _fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.1f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


# ----------------------------------------------------------------------------- devices

def cmd_devices_list(args: argparse.Namespace) -> int:
    path = inventory_path(args)
    inv = None
    if path.exists() or not args.mdns:
        inv = load_inventory(path)
    known = KnownHosts(inv.known_hosts_file() if inv else default_known_hosts())
    dl = DeviceList(known)
    if inv is not None:
        dl.load_inventory(inv)
    if args.mdns:
        with MdnsBrowser.for_list(dl, args.mdns):
            time.sleep(args.seconds)
    if args.check:
        asyncio.run(dl.check(known))
    rows = dl.entries()
    print(f"{'NAME':<14} {'ADDRESS':<22} {'USER':<10} {'SOURCES':<20} {'STATUS':<10} DETAIL")
    for e in rows:
        sources = ",".join(sorted(e.sources)) + (" (candidate)" if e.candidate else "")
        print(f"{e.name:<14} {e.device.address:<22} {e.device.user:<10} {sources:<20} {e.status:<10} {e.detail}")
    if not rows:
        print("no devices (add one with: edgetrain devices add NAME HOST --key KEY)")
    return 0


def cmd_devices_add(args: argparse.Namespace) -> int:
    path = inventory_path(args)
    inv = load_inventory(path) if path.exists() else Inventory(devices=[], path=path)
    entry: dict = {"name": args.name, "host": args.host, "port": args.port, "python": args.python}
    if args.user:
        entry["user"] = args.user
    if args.key:
        entry["key"] = str(Path(args.key).expanduser().resolve())
    if args.workdir:
        entry["workdir"] = args.workdir
    dev = parse_device(entry, path, len(inv.devices) + 1)  # the inventory's own validation
    for other in inv.devices:
        if other.name == dev.name:
            raise InventoryError(f"{path}: a device named '{dev.name}' already exists. Fix: choose another name")
        if (other.host, other.port) == (dev.host, dev.port):
            raise InventoryError(f"{path}: {dev.address} is already device '{other.name}'. Fix: remove it first "
                                 "or use another host/port")
    inv.devices.append(dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    inv.save(path)
    print(f"added {dev.name} ({dev.user}@{dev.address}) to {path}")
    print(f"next: check its host key and trust it with: edgetrain devices trust {dev.name}"
          + (f" --inventory {path}" if getattr(args, "inventory", None) else ""))
    return 0


def cmd_devices_trust(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args))
    dev = inv.by_name(args.name)
    known = KnownHosts(inv.known_hosts_file())
    key = asyncio.run(fetch_host_key(dev))
    fp = fingerprint(key)
    stored = known.lookup(dev.host, dev.port)
    if any(k == key for k in stored):
        print(f"{dev.name} ({dev.address}) is already trusted: {key.get_algorithm()} {fp}")
        return 0
    if stored and not args.replace:
        old = ", ".join(fingerprint(k) for k in stored)
        print("@" * 68, file=sys.stderr)
        print(f"@  HOST KEY CHANGED for '{dev.name}' ({dev.address})", file=sys.stderr)
        print("@" * 68, file=sys.stderr)
        print(f"trusted:   {old}\npresented: {fp}\nSomeone may be impersonating the device, or it was reinstalled. "
              f"Refusing. If you verified the new fingerprint on the device itself "
              f"(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), run: "
              f"edgetrain devices trust {dev.name} --replace", file=sys.stderr)
        return 2
    print(f"{dev.name} ({dev.address}) presents a {key.get_algorithm()} host key:\n  {fp}")
    if not args.yes:
        print("Compare it with the device's own fingerprint (on the device: "
              "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub).")
        try:
            answer = input("Trust this key? [y/N] ").strip().lower()
        except EOFError:
            answer = ""
        if answer not in ("y", "yes"):
            print("not trusted", file=sys.stderr)
            return 1
    known.trust(dev.host, dev.port, key, replace=bool(stored))
    print(f"trusted {dev.name}: {fp} stored in {known.path}")
    return 0


# ----------------------------------------------------------------------------- profile

def print_profiles(profiles: list, matrix, out=sys.stdout) -> None:
    hdr = (f"{'device':<12} {'arch':<8} {'thr':>3} {'mem limit':>9} {'GFLOP/s':>8} {'fp16':>7} "
           f"{'gpu':<16} {'torch':<12} {'power':<9} {'age':>6}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    now = time.time()
    for p in profiles:
        gf = f"{p.gflops_fp32:.1f}" if p.gflops_fp32 else "-"
        f16 = f"{p.gflops_fp16:.0f}" if p.gflops_fp16 else "-"
        gpu = f"{p.gpu.name[:10]} {_fmt_bytes(p.gpu.mem_bytes)}" if p.gpu else "-"
        age = now - p.collected_at
        age_s = f"{age:.0f}s" if age < 120 else (f"{age / 60:.0f}m" if age < 7200 else f"{age / 3600:.0f}h")
        print(f"{p.name:<12} {p.arch:<8} {p.threads:>3} {_fmt_bytes(p.mem_limit_bytes):>9} {gf:>8} {f16:>7} "
              f"{gpu:<16} {str(p.versions.get('torch') or 'MISSING'):<12} {p.power_source:<9} "
              f"{age_s + ('*' if p.from_cache else ''):>6}", file=out)
        if p.torch_error:
            print(f"  {p.name}: torch unusable ({p.torch_error}); run: edgetrain preflight {p.name}", file=out)
    if any(p.from_cache for p in profiles):
        print("* from the cache (edgetrain profile --refresh remeasures)", file=out)
    for title, rows, spec in (("bandwidth (Mbit/s), row -> column", matrix.bandwidth_mbps, ".0f"),
                              ("round-trip time (ms)", matrix.rtt_ms, ".3f")):
        print(f"\n{title}", file=out)
        print(f"{'':<12}" + "".join(f"{n[:10]:>11}" for n in matrix.names), file=out)
        for name, row in zip(matrix.names, rows):
            print(f"{name[:12]:<12}" + "".join(f"{format(v, spec) if v is not None else '-':>11}" for v in row),
                  file=out)


def cmd_profile(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args))
    devices = inv.select(_names(args.names))
    known = KnownHosts(inv.known_hosts_file())
    say = (lambda m: print(m, file=sys.stderr)) if not args.quiet else None
    t0 = time.monotonic()
    try:
        profiles, matrix = asyncio.run(profile_devices(devices, known, refresh=args.refresh,
                                                       pairs=not args.no_pairs, directed=args.directed,
                                                       progress=say))
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"profiles": [p.to_dict() for p in profiles], "links": matrix.to_dict()}, indent=1))
    else:
        print_profiles(profiles, matrix)
        print(f"\n{len(profiles)} device(s) in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    inv = load_inventory(inventory_path(args))
    devices = inv.select(_names(args.names))
    known = KnownHosts(inv.known_hosts_file())
    reports = asyncio.run(preflight(devices, known, min_free_bytes=int(args.min_free_gb * 2**30),
                                    max_skew_s=args.max_skew))
    print(format_reports(reports))
    return 0 if all(r.ok for r in reports) else 1


# ----------------------------------------------------------------------------- parser

def register(sub: argparse._SubParsersAction) -> None:
    """Add ``devices``, ``profile`` and ``preflight`` to ``edgetrain``."""
    inv_help = "inventory YAML (default: the running testbed's)"
    dev = sub.add_parser("devices", help="list, add and trust devices")
    dsub = dev.add_subparsers(dest="devices_cmd", required=True)

    ls = dsub.add_parser("list", help="the merged device list (inventory + mDNS)")
    ls.add_argument("--inventory", help=inv_help)
    ls.add_argument("--mdns", action="append", metavar="IFACE_ADDR",
                    help="browse mDNS on the interface with this address (repeatable; never all interfaces)")
    ls.add_argument("--seconds", type=float, default=2.0, help="how long to browse")
    ls.add_argument("--check", action="store_true", help="connect to each device to tell online/untrusted/offline")
    ls.set_defaults(func=cmd_devices_list)

    add = dsub.add_parser("add", help="add a device to the inventory (key authentication only)")
    add.add_argument("name")
    add.add_argument("host")
    add.add_argument("--port", type=int, default=22)
    add.add_argument("--user")
    add.add_argument("--key", help="private key file (never a password)")
    add.add_argument("--python", default="python3", help="interpreter on the device")
    add.add_argument("--workdir")
    add.add_argument("--inventory", help=inv_help)
    add.set_defaults(func=cmd_devices_add)

    tr = dsub.add_parser("trust", help="show a device's host key fingerprint and trust it")
    tr.add_argument("name")
    tr.add_argument("--replace", action="store_true", help="replace a different key trusted before")
    tr.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    tr.add_argument("--inventory", help=inv_help)
    tr.set_defaults(func=cmd_devices_trust)

    pr = sub.add_parser("profile", help="measure devices and the links between them")
    pr.add_argument("names", nargs="*", help="device names (default: all)")
    pr.add_argument("--refresh", action="store_true", help="remeasure instead of using the cache")
    pr.add_argument("--no-pairs", action="store_true", help="only controller links, not device pairs")
    pr.add_argument("--directed", action="store_true", help="measure both directions of each pair")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--quiet", action="store_true", help="no progress lines")
    pr.add_argument("--inventory", help=inv_help)
    pr.set_defaults(func=cmd_profile)

    pf = sub.add_parser("preflight", help="check that workers can run, with a fix per failure")
    pf.add_argument("names", nargs="*", help="device names (default: all)")
    pf.add_argument("--min-free-gb", type=float, default=2.0)
    pf.add_argument("--max-skew", type=float, default=1.0, help="tolerated clock skew in seconds")
    pf.add_argument("--inventory", help=inv_help)
    pf.set_defaults(func=cmd_preflight)
