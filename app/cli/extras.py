"""Which commands need the worker extra (torch, transformers) on this machine.

The controller itself never imports torch: the base install (``pip install edgetrain``)
plans, launches and watches runs on remote devices.  A few commands run worker code
here, and say so up front instead of failing half-way with ``No module named 'torch'``.
"""
from __future__ import annotations

import argparse

from app.extras import missing_worker_packages
from app.extras import worker_extra_problem as _problem

__all__ = ["NEEDS_WORKER", "missing_worker_packages", "worker_extra_problem"]
#: (command, action) pairs that run worker code on this machine, with what for.
NEEDS_WORKER: dict[tuple[str, str | None], str] = {
    ("demo", None): "the demo trains on emulated devices on this machine",
    ("testbed", "up"): "the local testbed's devices run their workers with this Python",
    ("netns-testbed", "up"): "the namespace testbed's devices run their workers with this Python",
    ("export", None): "the export assembles the model with torch and transformers here",
}


def worker_extra_problem(args: argparse.Namespace) -> str | None:
    """Why the parsed command cannot run here without the worker extra, with the fix;
    ``None`` when it needs no worker code here or the extra is installed."""
    key = (args.cmd, getattr(args, "action", None))
    why = NEEDS_WORKER.get(key) or NEEDS_WORKER.get((args.cmd, None))
    if why is None:
        return None
    name = " ".join(k for k in key if k)
    return _problem(f"'edgetrain {name}'", why)
