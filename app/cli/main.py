"""``edgetrain``: the headless control panel (same powers as the GUI)."""
from __future__ import annotations

import argparse
import logging
import sys

from app.cli import devices, gui, plan, resume, run, sweep, testbed
from app.cli.extras import worker_extra_problem
from app.devices.inventory import InventoryError
from app.devices.ssh import SSHError
from app.run.launcher import LaunchError
from app.testbed.emulation import TestbedError

#: Each command group registers its own subcommands, next to what it drives.
COMMAND_GROUPS = (testbed, run, resume, devices, plan, sweep, gui)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgetrain", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    for group in COMMAND_GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    problem = worker_extra_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (InventoryError, LaunchError, SSHError, TestbedError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
