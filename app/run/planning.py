"""The planner's inputs for real devices: cached profiles and links, read once, then the plan.

The planner is pure; this is where the controller gathers what it knows about the
devices (``$EDGETRAIN_HOME/profiles``) and asks it.  ``edgetrain plan``, the run record
and the GUI's preview all plan through here, so they agree.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from app.boards import host_cpus
from app.devices.inventory import Device, Inventory
from app.devices.profile import ProfileCache, is_stale, load_cached_profiles
from app.planner.costmodel import DeviceSpec
from app.planner.inputs import specs_for_devices
from app.planner.links import Links
from app.planner.plan import Plan, make_plan
from app.planner.shape import UnknownModelError
from workers.config import RunSettings


def device_specs(devices: Sequence[Device], all_devices: Sequence[Device] | None = None, use_cache: bool = True,
                 gflops_per_thread: float | None = None) -> tuple[list[DeviceSpec], Links]:
    """Planner specs (rank order = ``devices``) and links, from cached profiles when ``use_cache``.

    An unreadable cache counts as no cache, and a device's profile from another address as
    none: the plan then says which devices are unprofiled.
    """
    profiles = load_cached_profiles([d.name for d in devices]) if use_cache else {}
    # a profile measured at another address is another machine's (two testbeds both name
    # their devices dev0, dev1, ...): such a device is planned from its preset instead
    by_name = {d.name: d for d in devices}
    profiles = {n: p for n, p in profiles.items() if not is_stale(p, by_name[n], None)}
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


@dataclass(frozen=True)
class Fallback:
    """The plan for a run's devices less one: what losing ``lost`` switches to.

    Computed for every device at launch (:func:`fallback_plans`), so a loss is answered
    at once with the survivors' stages, shares, predicted latency and memory.
    """

    lost: str
    devices: list[str]
    plan: dict[str, Any] | None     # Plan.to_dict(); None when nothing can run on the survivors
    reason: str = ""                # why there is no plan

    @property
    def oom(self) -> list[str]:
        """Survivors predicted to run out of memory."""
        return [p["name"] for p in (self.plan or {}).get("predictions", []) if p.get("oom")]

    def describe(self, was: dict[str, Any] | None = None) -> str:
        """What changes for the survivors, in one line (``was``: the run's own plan)."""
        if self.plan is None:
            return f"no plan for the {len(self.devices)} survivors: {self.reason}"
        if not (self.plan.get("totals") or {}).get("feasible", True):
            return f"no feasible plan for the {len(self.devices)} survivors: {self.plan.get('explanation')}"
        parts = []
        stages = self.plan.get("stages") or []
        if stages:
            parts.append("stages " + ", ".join(
                f"{'+'.join(self.devices[r] for r in st['ranks'])} layers {st['layers'][0]}–{st['layers'][1]}"
                for st in stages))
        new = _latency(self.plan)
        old = _latency(was)
        if new is not None:
            parts.append(f"predicted {old * 1e3:.2f} → {new * 1e3:.2f} ms/sample" if old is not None
                         else f"predicted {new * 1e3:.2f} ms/sample")
        if self.oom:
            parts.append("predicted to run out of memory on " + ", ".join(self.oom))
        else:
            margins = [(p["margin"], p["name"]) for p in self.plan.get("predictions", [])
                       if p.get("margin") is not None]
            if margins:
                m, name = min(margins)
                parts.append(f"memory fits (tightest: {name}, {m:.0%} free)")
        return "; ".join(parts)


def _latency(plan: dict[str, Any] | None) -> float | None:
    totals = (plan or {}).get("totals") or {}
    return totals.get("median_latency_per_sample_s") or totals.get("latency_per_sample_s")


def fallback_plans(inventory: Inventory, names: Sequence[str], settings: RunSettings,
                   use_cache: bool = True) -> dict[str, Fallback]:
    """For each device of a run, the plan of the others.

    Tens of milliseconds each (64 DP devices: a few seconds in all), so the launcher
    computes them on a thread while the run starts (:meth:`app.run.recovery.Recovery.plan_ahead`).
    """
    out = {}
    base = replace(settings.settings(), stages=None)
    for lost in names:
        rest = [n for n in names if n != lost]
        # DP survivors keep their planned batch shares, renormalised (workers.engine.survivor_shares)
        st = base if not base.dp_shares or len(base.dp_shares) != len(names) else \
            replace(base, dp_shares=[base.dp_shares[names.index(n)] for n in rest] or None)
        try:
            plan = plan_for_run(inventory, rest, st, use_cache=use_cache).to_dict() if rest else None
            out[lost] = Fallback(lost, rest, plan, "" if rest else "no device left")
        except (UnknownModelError, ValueError, KeyError) as exc:
            out[lost] = Fallback(lost, rest, None, str(exc))
    return out
