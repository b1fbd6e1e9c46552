"""Whether this machine can run worker code: the worker extra (torch, transformers).

The controller never imports torch; a few of its actions run worker code here (the
local testbed's devices, the export of a trained model) and say so up front, with the
fix, instead of failing half-way with ``No module named 'torch'``.  Standard library
only, so every part of the controller may ask.
"""
from __future__ import annotations

import importlib.util
import sys

#: The worker extra's packages that worker code imports on this machine.
WORKER_PACKAGES = ("torch", "transformers", "tokenizers")
WORKER_EXTRA_FIX = "pip install 'edgetrain[worker]'"


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_worker_packages() -> list[str]:
    """The worker extra's packages this Python cannot import (found, not imported)."""
    return [p for p in WORKER_PACKAGES if not _installed(p)]


def worker_extra_problem(what: str, why: str) -> str | None:
    """Why ``what`` cannot run here (``why``: what it runs here), with the fix; ``None``
    when the worker extra is installed."""
    missing = missing_worker_packages()
    if not missing:
        return None
    if getattr(sys, "frozen", False):
        return (f"{what} needs the worker extra ({', '.join(missing)} missing: {why}); the desktop bundle is "
                f"the controller only. Fix: run it from a pip install: {WORKER_EXTRA_FIX}")
    return f"{what} needs the worker extra ({', '.join(missing)} missing: {why}). Fix: {WORKER_EXTRA_FIX}"
