"""``edgetrain gui``: the desktop control panel."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from app.cli.flags import testbed_inventory

GUI_PACKAGES = ("PySide6", "pyqtgraph")


def cmd_gui(args: argparse.Namespace) -> int:
    missing = [m for m in GUI_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: the GUI needs {' and '.join(missing)}. Fix: pip install 'edgetrain[gui]'", file=sys.stderr)
        return 2
    # Imported here, not at the top: PySide6 is the optional [gui] extra, and every other
    # command must start without it.
    from app.qt.qt_app import has_display, run_gui

    if not has_display():
        print("error: no display. Fix: run on a desktop, or set QT_QPA_PLATFORM=offscreen "
              "(or use xvfb-run)", file=sys.stderr)
        return 2
    inventory = args.inventory
    if inventory is None and args.session is None:
        default = testbed_inventory()
        inventory = str(default) if default.is_file() else None
    return run_gui(inventory=inventory, session=args.session, runs_dir=args.runs_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gui", help="open the desktop control panel")
    p.add_argument("--inventory", help="inventory YAML to load (default: the running testbed's, if any)")
    p.add_argument("--session", help="session YAML to restore (devices, order, settings)")
    p.add_argument("--runs-dir", help="where run records go (default: $EDGETRAIN_HOME/runs)")
    p.set_defaults(func=cmd_gui)
