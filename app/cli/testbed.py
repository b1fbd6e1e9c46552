"""``edgetrain testbed``: emulated edge devices on this machine (asyncssh or, as root,
network namespaces with OpenSSH)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.paths import edgetrain_home
from app.testbed import daemon as testbed
from app.testbed import netns


def cmd_testbed(args: argparse.Namespace) -> int:
    if getattr(args, "netns", False):
        return cmd_netns_testbed(args)
    tb_dir = Path(args.dir) if args.dir else edgetrain_home() / "testbed"
    if args.action == "up":
        info = testbed.start_testbed(tb_dir, n_devices=args.devices, preset=args.preset,
                                     base_addr=args.base_addr, port=args.port,
                                     cgroups=False if args.no_cgroups else None)
        print(f"testbed up: {len(info.devices)} devices; inventory {info.inventory_path}")
        for d in info.devices:
            cap = "no memory cap" if d.mem_bytes is None else \
                f"{d.mem_bytes / 2**30:.1f} GiB {'physical (cgroup)' if d.mem_cap == 'cgroup' else 'address space (not root)'}"
            cpu = f", cpu {d.cpu_share:.2f} cores" if d.cpu_share else ""
            print(f"  {d.name:<10} {d.host}:{d.port}  {d.preset:<12} {cap}{cpu}")
        return 0
    if args.action == "down":
        was = testbed.stop_testbed(tb_dir)
        print("testbed stopped" if was else "no testbed was running")
        return 0
    rows = testbed.testbed_status(tb_dir)
    if not rows:
        print("no testbed running (start one with: edgetrain testbed up --devices 2)")
        return 1
    for r in rows:
        cpu = f", cpu {r.cpu_share:.2f} cores" if r.cpu_share else ""
        print(f"  {r.name:<10} {r.host}:{r.port}  {'reachable' if r.reachable else 'UNREACHABLE'}  "
              f"limits: memory {r.mem_cap}{cpu}")
    return 0



def cmd_netns_testbed(args: argparse.Namespace) -> int:
    """``up``/``down``/``status`` of the namespace tier (also callable from ``testbed --netns``)."""
    d = Path(args.dir) if getattr(args, "dir", None) else edgetrain_home() / "netns-testbed"
    try:
        return _netns_action(args, d)
    except netns.NetnsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _netns_action(args: argparse.Namespace, d: Path) -> int:
    if args.action == "up":
        tb = netns.netns_up(d, n=getattr(args, "devices", None) or 2, rate_mbit=getattr(args, "rate", None) or 1000.0,
                            advertise=not getattr(args, "no_mdns", False))
        print(f"netns testbed up: {len(tb.devices)} devices on {tb.bridge} ({tb.bridge_addr}/24), "
              f"links shaped to {tb.rate_mbit:g} Mbit/s (tbf; no delay emulation: no netem on this kernel)")
        for x in tb.devices:
            print(f"  {x.name:<6} {x.host:<12} namespace {x.namespace:<6} sshd pid {x.sshd_pid}")
        print(f"inventory: {tb.inventory_path}\nmDNS: edgetrain devices list --inventory {tb.inventory_path} "
              f"--mdns {tb.bridge_addr}")
        return 0
    if args.action == "down":
        was = netns.netns_down(d, force=getattr(args, "force", False))
        print("netns testbed removed" if was else "no netns testbed was running")
        return 0
    if args.action == "rate":
        if not getattr(args, "rate", None):
            print("error: give the new rate with --rate MBIT", file=sys.stderr)
            return 2
        netns.set_rate(d, args.rate)
        print(f"links reshaped to {args.rate:g} Mbit/s")
        return 0
    tb = netns.netns_info(d)
    if tb is None:
        print(f"no netns testbed in {d}")
        return 1
    for x in tb.devices:
        print(f"  {x.name:<6} {x.host:<12} namespace {x.namespace:<6} {tb.rate_mbit:g} Mbit/s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``testbed`` and ``netns-testbed`` to ``edgetrain``."""
    tb = sub.add_parser("testbed", help="emulated edge devices on this machine")
    tb.add_argument("action", choices=["up", "down", "status"])
    tb.add_argument("--devices", type=int, default=None, help="number of devices (default 2, or the preset's)")
    tb.add_argument("--preset", choices=["homogeneous", "heterogeneous"], default=None)
    tb.add_argument("--base-addr", default="127.0.10.1")
    tb.add_argument("--port", type=int, default=2222)
    tb.add_argument("--dir", help="testbed directory (default: $EDGETRAIN_HOME/testbed)")
    tb.add_argument("--netns", action="store_true",
                    help="root only: devices in network namespaces with real OpenSSH sshd, tc-shaped links, mDNS")
    tb.add_argument("--rate", type=float, default=None, help="--netns: link rate in Mbit/s (default 1000)")
    tb.add_argument("--no-cgroups", action="store_true",
                    help="cap memory by address space (RLIMIT_AS) even as root: no physical limit, no CPU quota")
    tb.set_defaults(func=cmd_testbed)

    nt = sub.add_parser("netns-testbed", help="root only: devices in network namespaces with real sshd")
    nt.add_argument("action", choices=["up", "down", "status", "rate"])
    nt.add_argument("--devices", type=int, default=2)
    nt.add_argument("--rate", type=float, default=None, help="link rate in Mbit/s (default 1000)")
    nt.add_argument("--no-mdns", action="store_true", help="do not advertise the devices")
    nt.add_argument("--force", action="store_true",
                    help="down: also remove unrecorded namespaces and the bridge with this testbed's names "
                         "(default et-N, etbr0)")
    nt.add_argument("--dir", help="state directory (default: $EDGETRAIN_HOME/netns-testbed)")
    nt.set_defaults(func=cmd_netns_testbed)
