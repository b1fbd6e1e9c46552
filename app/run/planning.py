"""The planner's inputs for real devices: cached profiles and links, read once, then the plan.

The planner is pure; this is where the controller gathers what it knows about the
devices (``$EDGETRAIN_HOME/profiles``) and asks it.  ``edgetrain plan``, the run record
and the GUI's preview all plan through here, so they agree.
"""
from __future__ import annotations

from typing import Sequence

from app.boards import host_cpus
from app.devices.inventory import Device, Inventory
from app.devices.profile import ProfileCache, load_cached_profiles
from app.planner.costmodel import DeviceSpec
from app.planner.inputs import specs_for_devices
from app.planner.links import Links
from app.planner.plan import Plan, make_plan
from workers.config import RunSettings


def device_specs(devices: Sequence[Device], all_devices: Sequence[Device] | None = None, use_cache: bool = True,
                 gflops_per_thread: float | None = None) -> tuple[list[DeviceSpec], Links]:
    """Planner specs (rank order = ``devices``) and links, from cached profiles when ``use_cache``.

    An unreadable cache counts as no cache: the plan then says which devices are unprofiled.
    """
    profiles = load_cached_profiles([d.name for d in devices]) if use_cache else {}
    pairs = ProfileCache().load_links() if use_cache else {}
    return specs_for_devices(devices, all_devices, profiles=profiles, link_pairs=pairs, n_cpus=host_cpus(),
                             gflops_per_thread=gflops_per_thread)


def plan_for_run(inventory: Inventory, names: Sequence[str] | None, settings: RunSettings, use_cache: bool = True,
                 gflops_per_thread: float | None = None) -> Plan:
    """The :class:`~app.planner.plan.Plan` of a run over ``names`` (rank order; all when empty).

    ``settings.stages``, when given, are predicted as they are instead of partitioned.
    """
    devices = inventory.select(list(names) if names else None)
    specs, links = device_specs(devices, inventory.devices, use_cache=use_cache, gflops_per_thread=gflops_per_thread)
    return make_plan(settings.model, settings.parallelism, specs, links, settings, stages=settings.stages or None)
