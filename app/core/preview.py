"""The plan preview the control panel shows: one call, plain data, safe on any thread.

:func:`compute_preview` asks the planner (:mod:`app.core.plan`) for per-device memory,
latency and energy per sample, OOM flags, its recommendation and its suggested order,
and flattens the answer into a :class:`PlanPreview`.  While the planner is missing or
fails, a coarse closed-form estimate from :mod:`app.core.plan_model` stands in,
labelled ``source="estimate"`` so nobody mistakes it for the planner's word.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .jobs import RunSettings
from .plan_model import FP32, UnknownModelError, resolve_model
from .topology import even_split

log = logging.getLogger("edgetrain.preview")
GIB = 2**30
#: Virtual size of a gloo rank with torch imported (FEASIBILITY: ~1 GB), before the model.
RUNTIME_BYTES = 1.0 * GIB
#: Fraction of matmul peak a training step reaches on CPU (FEASIBILITY: 60-65 %).
EFFICIENCY = 0.6
DEFAULT_GFLOPS = 40.0
DEFAULT_P_MAX_W = 15.0


@dataclass
class DevicePrediction:
    """What the plan expects of one device."""

    device: str
    mem_bytes: int | None = None
    capacity_bytes: int | None = None
    oom: bool = False
    latency_per_sample_s: float | None = None
    energy_per_sample_j: float | None = None
    throughput_sps: float | None = None
    note: str = ""
    rss_bytes: int | None = None


@dataclass
class PlanPreview:
    """The preview of a plan for the participants in their current order."""

    devices: list[DevicePrediction] = field(default_factory=list)
    latency_per_sample_s: float | None = None
    energy_per_sample_j: float | None = None
    throughput_sps: float | None = None
    recommendation: str = ""
    suggested_order: list[str] = field(default_factory=list)
    stages: list[dict] | None = None
    n_layers: int = 0
    source: str = "estimate"
    error: str | None = None
    plan: dict[str, Any] | None = None

    def device(self, name: str) -> DevicePrediction | None:
        return next((d for d in self.devices if d.device == name), None)

    @property
    def any_oom(self) -> bool:
        return any(d.oom for d in self.devices)


def compute_preview(settings: RunSettings, order: list[str], devices: list[Any] | None = None,
                    all_devices: list[Any] | None = None, profiles: dict[str, Any] | None = None,
                    use_cache: bool = True, compare_all: bool = True) -> PlanPreview:
    """Plan ``settings`` over ``order`` (rank order); never raises.

    Parameters
    ----------
    settings
        The run settings as the user has them now.
    order
        Participant device names in rank/stage order.
    devices, all_devices
        The participants' inventory ``Device`` objects (in ``order``) and every device of
        the list: the planner's inputs come from them exactly as for ``edgetrain plan``
        (cached profile, else the testbed preset in the labels, else a generic device).
    profiles
        ``DeviceProfile`` per device name, for the coarse estimate only.
    use_cache
        Read cached profiles and measured links (``$EDGETRAIN_HOME/profiles``).
    compare_all
        Also rank the other parallelisms and recommend the best one.
    """
    profiles = profiles or {}
    if not order:
        return PlanPreview(recommendation="Tick at least one device to plan a run.")
    try:
        shape = resolve_model(settings.model)
    except UnknownModelError:
        shape = None
    try:
        from . import plan as planner  # written alongside; optional until it lands
    except ImportError:
        planner = None
    if planner is not None and shape is not None:
        try:
            return _from_planner(planner, settings, order, devices, all_devices, use_cache, shape, compare_all)
        except Exception as exc:  # noqa: BLE001 - a planner bug must not take the GUI down
            log.exception("planner failed; falling back to the estimate")
            est = _estimate(settings, order, profiles, shape)
            est.error = f"planner failed: {exc}"
            return est
    return _estimate(settings, order, profiles, shape)


def _from_planner(planner: Any, settings: RunSettings, order: list[str], devices: list[Any] | None,
                  all_devices: list[Any] | None, use_cache: bool, shape: Any, compare_all: bool) -> PlanPreview:
    from .plan_inputs import specs_for_devices

    if devices is None or [d.name for d in devices] != list(order):
        devices = [SimpleNamespace(name=n, labels={}) for n in order]  # generic devices
    specs, lk = specs_for_devices(devices, all_devices, use_cache=use_cache)
    plan = planner.make_plan(shape, settings.parallelism, specs, lk, settings)
    devs = []
    for p in plan.predictions:
        virtual = p.limit_kind == "virtual"
        devs.append(DevicePrediction(
            device=p.name, mem_bytes=int(p.peak_virtual_bytes if virtual else p.peak_rss_bytes),
            capacity_bytes=p.limit_bytes, oom=bool(p.oom), latency_per_sample_s=p.latency_per_sample_s,
            energy_per_sample_j=p.energy_per_sample_j,
            throughput_sps=settings.batch_size / p.step_s if p.step_s else None,
            note=p.role, rss_bytes=int(p.peak_rss_bytes)))
    t = plan.totals
    rec = [plan.explanation] if plan.explanation else []
    if compare_all and len(order) > 0:
        try:
            cmp = planner.compare(shape, specs, lk, settings)
            best = cmp.best
            if best is not None and best.parallelism != settings.parallelism:
                bt = best.totals
                rec.append(f"Recommended: {best.parallelism.upper()} — {bt['latency_per_sample_s'] * 1e3:.3g} ms and "
                           f"{bt['energy_per_sample_j']:.3g} J per sample.")
            elif best is not None:
                rec.append(f"{settings.parallelism.upper()} is the planner's best choice for these devices.")
            elif not cmp.ranking:
                rec.append("No parallelism fits these devices without running out of memory.")
        except Exception as exc:  # noqa: BLE001 - the comparison is advice; the plan stands
            log.warning("planner comparison failed: %s", exc)
    if plan.proposed_order:
        rec.append("Auto-arrange applies the faster order " + " → ".join(plan.proposed_order) + ".")
    rec += [w for w in plan.warnings if not w.startswith("order ")]
    return PlanPreview(
        devices=devs, latency_per_sample_s=t.get("latency_per_sample_s"),
        energy_per_sample_j=t.get("energy_per_sample_j"), throughput_sps=t.get("throughput_sps"),
        recommendation="\n".join(rec), suggested_order=list(plan.proposed_order or order),
        stages=[dict(s) for s in plan.stages] or None, n_layers=shape.n_layer, source="planner",
        plan=plan.to_dict())


def _estimate(settings: RunSettings, order: list[str], profiles: dict[str, Any], shape: Any) -> PlanPreview:
    """Closed-form stand-in: weights + grads + AdamW, saved activations, the runtime."""
    n = len(order)
    if shape is None:
        return PlanPreview(suggested_order=list(order), source="estimate",
                           recommendation=f"No estimate for model {settings.model!r}: it is not a preset.")
    par = settings.parallelism
    batch, seq = settings.batch_size, settings.seq_len
    micro = max(1, settings.micro_batches)
    block_p, total_p = shape.block_params(), shape.total_params()
    stages = None
    if par in ("pp", "hybrid"):
        replicas = 2 if par == "hybrid" and n >= 4 and n % 2 == 0 else 1
        ranges = even_split(shape.n_layer, max(1, n // replicas))
        stages = [{"ranks": list(range(s * replicas, (s + 1) * replicas)), "layers": list(r)}
                  for s, r in enumerate(ranges)]
    preds = []
    worst_lat = 0.0
    energy = 0.0
    for rank, name in enumerate(order):
        prof = profiles.get(name)
        if par in ("pp", "hybrid") and stages:
            st = next(s for s in stages if rank in s["ranks"])
            blocks = st["layers"][1] - st["layers"][0]
            params = blocks * block_p
            params += shape.embed_params() if st["layers"][0] == 0 else 0
            params += shape.head_params() if st["layers"][1] == shape.n_layer else 0
            tokens_live = batch / len(st["ranks"]) * seq / micro * min(micro, len(stages))
            tokens_work = batch / len(st["ranks"]) * seq
        elif par in ("tp", "sp"):
            blocks, params = shape.n_layer, total_p / n
            tokens_live = tokens_work = batch * seq / (n if par == "sp" else 1)
        else:
            blocks, params = shape.n_layer, total_p
            tokens_live = tokens_work = batch / n * seq
        act = blocks * shape.block_saved_floats_per_token(n if par == "tp" else 1) * tokens_live * FP32
        mem = int(RUNTIME_BYTES + params * FP32 * 4 + act)
        cap = getattr(prof, "mem_limit_bytes", None) if prof else None
        gflops = (getattr(prof, "gflops_fp32", None) if prof else None) or DEFAULT_GFLOPS
        p_max = (getattr(prof, "p_max_w", None) if prof else None) or DEFAULT_P_MAX_W
        step_s = 6 * params * tokens_work / (gflops * 1e9 * EFFICIENCY)
        lat = step_s / batch
        worst_lat = max(worst_lat, lat)
        e = p_max * step_s / batch
        energy += e
        preds.append(DevicePrediction(name, mem, cap, bool(cap and mem > cap), lat, e,
                                      batch / n / step_s if par == "dp" and step_s else None))
    oom = [p.device for p in preds if p.oom]
    if oom:
        fix = "use pipeline parallelism or more micro-batches" if par in ("dp", "tp", "sp") else \
            "move fewer layers to it or add micro-batches"
        rec = f"{', '.join(oom)} would run out of memory: {fix}."
    else:
        rec = (f"Fits on every device; about {worst_lat * 1e3:.2f} ms and {energy:.3f} J per sample "
               f"(coarse estimate: the planner is not available).")
    # fastest devices first: in a pipeline the first stages hold the embeddings
    speed = {name: (getattr(profiles.get(name), "gflops_fp32", None) or 0.0) for name in order}
    suggested = sorted(order, key=lambda nm: -speed[nm]) if any(speed.values()) else list(order)
    return PlanPreview(devices=preds, latency_per_sample_s=worst_lat, energy_per_sample_j=energy,
                       throughput_sps=1.0 / worst_lat if worst_lat else None, recommendation=rec,
                       suggested_order=suggested, stages=stages, n_layers=shape.n_layer, source="estimate")
