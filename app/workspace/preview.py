"""The plan preview the control panel shows: the planner's plan, plus its advice.

:func:`compute_preview` plans the participants in their current order exactly as
``edgetrain plan`` and the run record do (:func:`app.run.planning.device_specs`, then
:func:`app.planner.plan.make_plan`), ranks the other parallelisms for a recommendation,
and returns a :class:`PlanPreview`.  There is no second estimate: when the planner cannot
plan (a model it has no shape for), the preview says so and shows no figures.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

from app.devices.inventory import Device
from app.planner.parallel import DevicePrediction
from app.planner.plan import Plan, compare, make_plan
from app.planner.shape import UnknownModelError, resolve_model
from app.run.planning import device_specs
from workers.config import RunSettings

log = logging.getLogger("edgetrain.preview")


class CapKind(str, Enum):
    """What enforces a device's memory limit, as the views name it."""

    NONE = "no cap"
    RAM = "RAM"                          # a real board's physical memory
    CGROUP = "cgroup"                    # a testbed device's memory cgroup (physical memory)
    ADDRESS_SPACE = "address space"      # RLIMIT_AS on a testbed device (virtual size)


@dataclass(frozen=True)
class MemoryFigures:
    """One device's predicted memory, split so that every figure names its quantity.

    Attributes
    ----------
    peak_rss_bytes
        Predicted peak resident memory: what the memory chart measures, under
        :data:`app.workspace.series.MEMORY_LABEL`.
    cap_bytes, cap_kind
        The device's limit and what enforces it.
    address_space_bytes
        Predicted peak virtual size, only for a device capped on its address space
        (``RLIMIT_AS``), where that, not the resident memory, is what runs out.
    fraction
        The capped quantity's share of the cap (``None`` without a cap).
    """

    name: str
    peak_rss_bytes: int
    cap_bytes: int | None
    cap_kind: CapKind
    address_space_bytes: int | None
    fraction: float | None
    oom: bool

    @classmethod
    def of(cls, d: DevicePrediction, mem_cap: str | None = None) -> MemoryFigures:
        """From a device's prediction and its ``mem_cap`` label (``cgroup`` on a testbed as root)."""
        if not d.limit_bytes or d.limit_kind == "none":
            kind = CapKind.NONE
        elif d.limit_kind == "virtual":
            kind = CapKind.ADDRESS_SPACE
        else:
            kind = CapKind.CGROUP if mem_cap == "cgroup" else CapKind.RAM
        capped = d.capped_peak_bytes
        return cls(d.name, int(d.peak_rss_bytes), d.limit_bytes or None, kind,
                   int(d.peak_virtual_bytes) if kind is CapKind.ADDRESS_SPACE else None,
                   capped / d.limit_bytes if d.limit_bytes and capped else None, bool(d.oom))

    @property
    def level(self) -> str:
        """``oom``, ``warning`` (85 % of the cap or more), ``ok`` or ``unknown``."""
        if self.oom:
            return "oom"
        if self.fraction is None:
            return "unknown"
        return "warning" if self.fraction >= 0.85 else "ok"


@dataclass
class PlanPreview:
    """The plan for the participants in their current order, with the planner's advice.

    Attributes
    ----------
    plan
        The planner's plan (``None`` when it could not plan: see ``recommendation``).
    recommendation
        Lines for the user: what dominates, a better parallelism, a better order, warnings.
    suggested_order
        Participants in the order the planner suggests (Auto-arrange applies it).
    error
        Why planning failed, when it did.
    mem_caps
        Each participant's ``mem_cap`` label (``cgroup``, ``address-space``, or none), which
        tells a testbed's memory cgroup from a board's RAM in :meth:`memory`.
    """

    plan: Plan | None = None
    recommendation: str = ""
    suggested_order: list[str] = field(default_factory=list)
    error: str | None = None
    mem_caps: dict[str, str] = field(default_factory=dict)

    def memory(self, name: str) -> MemoryFigures | None:
        """The predicted memory of ``name`` as the views show it (``None`` if not planned)."""
        d = self.device(name)
        return None if d is None else MemoryFigures.of(d, self.mem_caps.get(name))

    @property
    def devices(self) -> list[DevicePrediction]:
        return list(self.plan.predictions) if self.plan is not None else []

    def device(self, name: str) -> DevicePrediction | None:
        return next((d for d in self.devices if d.name == name), None)

    @property
    def fit_changes(self) -> dict[str, Any] | None:
        """The settings that would make an OOM plan fit (``Plan.suggestion``), if any do."""
        sug = (self.plan.suggestion if self.plan is not None else None) or {}
        return dict(sug["changes"]) if sug.get("fits") and sug.get("changes") else None

    @property
    def any_oom(self) -> bool:
        return any(d.oom for d in self.devices)

    def total(self, key: str) -> Any:
        """A plan total (``latency_per_sample_s``, ``energy_per_sample_j``, ...), ``None`` if absent."""
        return self.plan.totals.get(key) if self.plan is not None else None

    @property
    def stages(self) -> list[dict] | None:
        if self.plan is None:
            return None
        return [dict(s) for s in self.plan.stages] or None


def compute_preview(settings: RunSettings, order: list[str], devices: Sequence[Device] | None = None,
                    all_devices: Sequence[Device] | None = None, use_cache: bool = True,
                    compare_all: bool = True) -> PlanPreview:
    """Plan ``settings`` over ``order`` (rank order); never raises.

    Parameters
    ----------
    settings
        The run settings as the user has them now.
    order
        Participant device names in rank/stage order.
    devices, all_devices
        The participants' inventory devices (in ``order``) and every device of the list;
        without them every participant is planned as a generic device.
    use_cache
        Read cached profiles and measured links (``$EDGETRAIN_HOME/profiles``).
    compare_all
        Also rank the other parallelisms and recommend the best one.
    """
    if not order:
        return PlanPreview(recommendation="Tick at least one device to plan a run.")
    try:
        shape = resolve_model(settings.model)
    except UnknownModelError:
        return PlanPreview(suggested_order=list(order),
                           recommendation=f"No plan for model {settings.model!r}: the planner knows the presets' "
                                          "shapes only, so memory and latency are not predicted.")
    if devices is None or [d.name for d in devices] != list(order):
        devices = [Device(n, "0.0.0.0") for n in order]  # unknown devices: generic figures
    try:
        specs, links = device_specs(devices, all_devices, use_cache=use_cache)
        plan = make_plan(shape, settings.parallelism, specs, links, settings)
    except Exception as exc:  # noqa: BLE001 - a planner bug must not take the GUI down; it is shown
        log.exception("the planner failed")
        return PlanPreview(suggested_order=list(order), error=f"planner failed: {exc}",
                           recommendation="The planner failed on these settings; the run can still be launched.")
    rec = [plan.explanation] if plan.explanation else []
    if compare_all:
        rec += _advice(shape, specs, links, settings)
    if plan.proposed_order:
        rec.append("Auto-arrange applies the faster order " + " → ".join(plan.proposed_order) + ".")
    rec += [w for w in plan.warnings if not w.startswith("order ")]
    sug = plan.suggestion or {}
    if sug.get("text"):
        # what would make it fit, as `edgetrain plan` says it (Apply in the view sets it)
        rec.insert(0, ("To fit: " if sug.get("fits") else "") + sug["text"])
    caps = {d.name: d.labels.get("mem_cap", "") for d in devices}
    return PlanPreview(plan=plan, recommendation="\n".join(rec), suggested_order=list(plan.proposed_order or order),
                       mem_caps=caps)


def _advice(shape: Any, specs: list, links: Any, settings: RunSettings) -> list[str]:
    cmp = compare(shape, specs, links, settings)
    best = cmp.best
    if best is None:
        fix = cmp.best_with_knobs
        if fix is None:
            return ["No parallelism fits these devices, with or without the memory knobs."]
        if fix.parallelism == settings.parallelism:
            return [f"{settings.parallelism.upper()} with those knobs is the planner's best choice."]
        return [f"Nothing fits as set; with knobs the best is {fix.suggestion['text']}."]
    if best.parallelism != settings.parallelism:
        bt = best.totals
        return [f"Recommended: {best.parallelism.upper()} — {bt['latency_per_sample_s'] * 1e3:.3g} ms and "
                f"{bt['energy_per_sample_j']:.3g} J per sample."]
    return [f"{settings.parallelism.upper()} is the planner's best choice for these devices."]
