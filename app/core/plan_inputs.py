"""Planner inputs for inventory devices: cached profiles, testbed presets or a default.

For each device, in order of preference:

1. its cached profile (``app.core.profile.load_cached_profiles``: measured matmul rate,
   memory limit, power figures), when the profile module and a cache entry exist;
2. its testbed preset (``labels.preset``, an ``app.core.emulation`` device preset);
3. a generic laptop-like device, flagged "no profile: run edgetrain profile".

Emulated devices of the local testbed (``labels.testbed == "local"``) share the host's
cores: their rate is scaled by ``host cpus / threads of the devices in the run`` when
that is below 1, since they compute at the same time.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from . import costmodel as cm
from .costmodel import DeviceSpec, Links

#: Loopback gloo (2 and 4 one-thread ranks, 16-64 MiB all-reduce and send/recv): 3-10
#: Gbit/s effective on the shared 2-core host, more on an idle one; small collectives
#: ~0.3 ms when idle.  The testbed's default link.
TESTBED_LINK = dict(default_mbps=6000.0, default_rtt_ms=0.3)


def host_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _is_testbed(device: Any) -> bool:
    return (getattr(device, "labels", None) or {}).get("testbed") == "local"


def _cached_profiles(names: list[str]) -> dict[str, Any]:
    try:
        from .profile import load_cached_profiles
    except (ImportError, AttributeError):
        return {}
    try:
        return dict(load_cached_profiles(names))
    except (OSError, ValueError):
        return {}


def _cached_links() -> dict[str, Any]:
    try:
        from .profile import ProfileCache
        return dict(ProfileCache().load_links())
    except (ImportError, AttributeError, OSError, ValueError):
        return {}


def specs_for_devices(devices: Sequence[Any], all_devices: Sequence[Any] | None = None,
                      use_cache: bool = True, n_cpus: int | None = None,
                      gflops_per_thread: float | None = None) -> tuple[list[DeviceSpec], Links]:
    """Device specs (rank order = ``devices`` order) and links for a run.

    Parameters
    ----------
    devices
        Inventory ``Device`` objects in the run (``name`` and ``labels`` are used).
    all_devices
        The whole inventory (testbed thread shares depend on how many devices it has).
    use_cache
        Read cached profiles and links.
    n_cpus
        Host CPUs shared by testbed devices (default: this host's).
    gflops_per_thread
        Host matmul rate per thread for preset-based testbed devices (default: the
        calibration host's).
    """
    from .emulation import PRESETS as DEVICE_PRESETS

    names = [d.name for d in devices]
    profiles = _cached_profiles(names) if use_cache else {}
    cpus = n_cpus or host_cpus()
    n_testbed = sum(1 for d in (all_devices or devices) if _is_testbed(d)) or 1
    share = max(1, cpus // n_testbed)
    per_thread = gflops_per_thread or cm.HOST_GFLOPS_PER_THREAD
    specs: list[DeviceSpec] = []
    for dev in devices:
        labels = getattr(dev, "labels", None) or {}
        preset = DEVICE_PRESETS.get(labels.get("preset", ""))
        if dev.name in profiles:
            spec = cm.spec_from_profile(profiles[dev.name])
        elif preset is not None:
            # the testbed's thread rule (app.core.emulation.plan_devices)
            threads = min(preset.threads or share, share) if _is_testbed(dev) else preset.threads
            spec = cm.spec_from_preset(dev.name, preset, threads=threads, gflops_per_thread=per_thread)
        else:
            spec = cm.generic_spec(dev.name)
        specs.append(spec)
    testbed = [s for s, d in zip(specs, devices) if _is_testbed(d)]
    busy = sum(s.threads for s in testbed)
    if busy > cpus:
        for s in testbed:
            s.gflops *= cpus / busy
            s.source += f" (shares {cpus} host cpus)"
    defaults = TESTBED_LINK if devices and all(_is_testbed(d) for d in devices) else {}
    pairs = _cached_links() if use_cache else {}
    links = Links.from_pairs(pairs, **defaults) if pairs else Links(**defaults)
    return specs, links


def plan_for_run(inventory: Any, names: Sequence[str] | None, settings: Any, use_cache: bool = True,
                 gflops_per_thread: float | None = None) -> Any:
    """The :class:`~app.core.plan.Plan` of a run (for ``jobs.prepare_run(plan=...)``).

    ``inventory`` is an ``Inventory``; ``names`` the devices in rank order (all when
    empty); ``settings`` a ``RunSettings`` (its ``stages``, when given, are predicted
    as they are instead of partitioned).
    """
    from .plan import make_plan

    devices = inventory.select(list(names) if names else None)
    specs, links = specs_for_devices(devices, inventory.devices, use_cache=use_cache,
                                     gflops_per_thread=gflops_per_thread)
    return make_plan(settings.model, settings.parallelism, specs, links, settings,
                     stages=getattr(settings, "stages", None) or None)
