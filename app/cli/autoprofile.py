"""Measure the devices a run has no profile for, before it is planned.

Without a profile the planner falls back to board presets and this host's calibration,
which can be off by 2x on a machine of another speed (the local testbed computes with the
host's cores, whatever the preset says).  ``edgetrain run`` and ``edgetrain demo`` profile
such devices once, saying so, so the prediction printed next to the measurement is made
from measured speeds; the profile cache makes later runs skip it, except for a local
testbed that was started again since (its speed is the host's at that time).
"""
from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from app.devices.inventory import Inventory
from app.devices.probe_agent import ProfileError
from app.devices.profile import is_stale, load_cached_profiles, profile_devices
from app.devices.ssh import KnownHosts, SSHError


def profile_missing(inv: Inventory, names: list[str] | None, out: TextIO = sys.stderr,
                    bench_seconds: float = 0.3) -> list[str]:
    """Profile the devices of ``names`` (all when ``None``) that have no cached profile,
    or a stale one (:func:`app.devices.profile.is_stale`).

    Returns the names profiled.  A device that cannot be profiled is named with the reason
    and the run goes on with preset figures for it: the launch itself says what is wrong.
    """
    devices = inv.select(names)
    cached = load_cached_profiles([d.name for d in devices])
    missing = [d for d in devices if d.name not in cached]
    stale = [d for d in devices if d.name in cached and is_stale(cached[d.name], d, inv.path)]
    if not missing and not stale:
        return []
    listed = ", ".join(d.name for d in missing + stale)
    why = []
    if missing:
        why.append("no measured speed yet")
    if stale:
        why.append(f"{', '.join(d.name for d in stale)} measured before {'its' if len(stale) == 1 else 'their'} "
                   "testbed started or at another address")
    print(f"profiling {listed} ({'; '.join(why)}; cached for later runs)", file=out)
    missing = missing + stale
    try:
        asyncio.run(profile_devices(missing, KnownHosts(inv.known_hosts_file()), bench_seconds=bench_seconds,
                                    link_seconds=0.2))
    except (ProfileError, SSHError, OSError, asyncio.TimeoutError) as exc:
        print(f"warning: could not profile {listed} ({exc}); the plan uses board presets for them. "
              "Fix: edgetrain profile", file=out)
        return []
    return [d.name for d in missing]
