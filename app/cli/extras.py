"""Which commands need the worker extra (torch, transformers) on this machine.

The controller itself never imports torch: the base install (``pip install edgetrain``)
plans, launches and watches runs on remote devices.  A few commands run worker code
here, and say so up front instead of failing half-way with ``No module named 'torch'``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

#: The worker extra's packages that worker code imports on this machine.
WORKER_PACKAGES = ("torch", "transformers", "tokenizers")
WORKER_EXTRA_FIX = "pip install 'edgetrain[worker]'"
#: (command, action) pairs that run worker code on this machine, with what for.
NEEDS_WORKER: dict[tuple[str, str | None], str] = {
    ("demo", None): "the demo trains on emulated devices on this machine",
    ("testbed", "up"): "the local testbed's devices run their workers with this Python",
    ("netns-testbed", "up"): "the namespace testbed's devices run their workers with this Python",
    ("export", None): "the export assembles the model with torch and transformers here",
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_worker_packages() -> list[str]:
    """The worker extra's packages this Python cannot import (found, not imported)."""
    return [p for p in WORKER_PACKAGES if not _installed(p)]


def worker_extra_problem(args: argparse.Namespace) -> str | None:
    """Why the parsed command cannot run here without the worker extra, with the fix;
    ``None`` when it needs no worker code here or the extra is installed."""
    key = (args.cmd, getattr(args, "action", None))
    why = NEEDS_WORKER.get(key) or NEEDS_WORKER.get((args.cmd, None))
    if why is None:
        return None
    missing = missing_worker_packages()
    if not missing:
        return None
    name = " ".join(k for k in key if k)
    if getattr(sys, "frozen", False):
        return (f"'edgetrain {name}' needs the worker extra ({', '.join(missing)} missing: {why}); the desktop "
                f"bundle is the controller only. Fix: run it from a pip install: {WORKER_EXTRA_FIX}")
    return (f"'edgetrain {name}' needs the worker extra ({', '.join(missing)} missing: {why}). "
            f"Fix: {WORKER_EXTRA_FIX}")
