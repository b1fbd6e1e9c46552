"""``edgetrain gui``: the desktop control panel; ``gui --check``: can Qt start here?"""
from __future__ import annotations

import argparse
import sys

from app.cli import qtcheck
from app.cli.flags import testbed_inventory
from app.testbed.daemon import testbed_info


def cmd_gui(args: argparse.Namespace) -> int:
    if args.check:
        findings = qtcheck.diagnose()
        qtcheck.print_findings(findings)
        return 0 if all(f.ok for f in findings) else 1
    # Qt aborts the process on a missing library or display: look first, and explain
    findings = qtcheck.diagnose(probe=False)
    if not all(f.ok for f in findings):
        print("error: the control panel cannot open here:", file=sys.stderr)
        qtcheck.print_findings([f for f in findings if not f.ok], out=sys.stderr)
        return 2
    # Imported here, not at the top: PySide6 is the optional [gui] extra, and every other
    # command must start without it.
    from app.qt.qt_app import probe_platform, run_gui

    if args.qt_probe:
        print(f"qt-probe ok {probe_platform()}")
        return 0
    return run_gui(inventory=start_inventory(args), session=args.session, runs_dir=args.runs_dir)


def start_inventory(args: argparse.Namespace) -> str | None:
    """The inventory the window opens with: ``--inventory``; else, when no session is
    asked for, a running local testbed's (not a stopped one's: its devices would all show
    offline); else none (the window reopens the last session, or shows its empty state)."""
    if args.inventory is not None or args.session is not None:
        return args.inventory
    default = testbed_inventory()
    return str(default) if default.is_file() and testbed_info(default.parent) is not None else None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gui", help="open the desktop control panel")
    p.add_argument("--inventory", help="inventory YAML to load (default: the running testbed's, if any)")
    p.add_argument("--session", help="session YAML to restore (devices, order, settings)")
    p.add_argument("--runs-dir", help="where run records go (default: $EDGETRAIN_HOME/runs)")
    p.add_argument("--check", action="store_true",
                   help="say whether Qt can start here (packages, libraries, display) and how to fix it; "
                        "opens no window")
    # the last step of --check, in a child process: Qt aborts its process when it cannot start
    p.add_argument("--qt-probe", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_gui)
