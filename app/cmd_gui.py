"""``edgetrain gui``: the desktop control panel."""
from __future__ import annotations

import argparse
import sys

from .core.jobs import edgetrain_home


def cmd_gui(args: argparse.Namespace) -> int:
    try:
        from .qt.qt_app import has_display, run_gui
    except ImportError as exc:  # PySide6 / pyqtgraph are the optional [gui] extra
        print(f"error: the GUI needs PySide6 and pyqtgraph ({exc}). Fix: pip install 'edgetrain[gui]'",
              file=sys.stderr)
        return 2
    if not has_display():
        print("error: no display. Fix: run on a desktop, or set QT_QPA_PLATFORM=offscreen "
              "(or use xvfb-run)", file=sys.stderr)
        return 2
    inventory = args.inventory
    if inventory is None and args.session is None:
        default = edgetrain_home() / "testbed" / "inventory.yaml"
        inventory = str(default) if default.is_file() else None
    return run_gui(inventory=inventory, session=args.session, runs_dir=args.runs_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gui", help="open the desktop control panel")
    p.add_argument("--inventory", help="inventory YAML to load (default: the running testbed's, if any)")
    p.add_argument("--session", help="session YAML to restore (devices, order, settings)")
    p.add_argument("--runs-dir", help="where run records go (default: $EDGETRAIN_HOME/runs)")
    p.set_defaults(func=cmd_gui)
