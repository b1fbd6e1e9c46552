"""The planner: predictions for a run, the stage split, and a ranking of parallelisms.

:func:`make_plan` evaluates one parallelism on devices in the user's order (the canvas
order) and returns a :class:`Plan`: per-device memory per phase (RSS and virtual size),
OOM flags with margins, compute/communication time, latency and energy per sample,
the JobConfig ``stages`` and a one-line explanation.  :func:`compare` plans every
parallelism and ranks the feasible ones by an objective.  :func:`plan_stages` is what
``app.run.jobs.prepare_run`` calls when the user gave no split.

The plan JSON (``Plan.to_dict``, ``"version": 2``; version 1 plans, without
``dp_shares`` and ``suggestion``, still load) is what the launcher and the run record
keep: ``stages`` is exactly ``JobConfig.stages``; ``dp_shares`` the DP batch shares the
planner picked by device speed; ``suggestion`` the knobs that make an OOM plan fit
(:mod:`app.planner.suggest`); ``Plan.to_job_fields()`` gives the JobConfig fields the
plan decides.  Torch-free and fast: 64 devices x 36
blocks x every parallelism plans in well under a second (``bench/plan_accuracy.py
--timing``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from app.planner import costmodel as cm
from app.planner import knobs
from app.planner.costmodel import DeviceSpec
from app.planner.links import Links
from app.planner.parallel import DevicePrediction, Evaluation, eval_replicated, eval_tp
from app.planner.pipeline import best_order, eval_pipeline, hybrid_replica_options
from app.planner.shape import ModelShape, resolve_model
from app.planner.suggest import fits, search_knobs
from workers.config import PARALLELISMS, Parallelism, RunSettings

PLAN_VERSION = 2
#: Versions :meth:`Plan.from_dict` reads (1: before ``dp_shares`` and ``suggestion``).
READABLE_PLAN_VERSIONS = (1, 2)
OBJECTIVES = ("latency", "energy", "mix")


@dataclass
class Plan:
    """A versioned plan: what to run and what it is predicted to cost.

    Attributes
    ----------
    parallelism, model
        As in JobConfig.
    settings
        batch_size, seq_len, micro_batches, sync_every, schedule, and the memory knobs
        (optimizer, activation_checkpointing, grad_accumulation, precision).
    devices
        Device names in rank order.
    stages
        ``JobConfig.stages`` (pp/hybrid; empty otherwise).
    predictions
        One :class:`DevicePrediction` per rank.
    totals
        step_s, latency_per_sample_s (mean over a sync period: what throughput sees),
        median_latency_per_sample_s (a typical step: what the run summary's median
        shows), energy_per_sample_j, oom, feasible, bubble_s, ...
    explanation
        One line: what dominates the step (or why it cannot run).
    proposed_order
        A device order predicted to be faster (pp/hybrid), or ``None``.
    dp_shares
        DP: each rank's fraction of the global batch the plan assumes (the user's, or
        picked proportional to device speed); ``None``: equal shares.
    suggestion
        When the plan OOMs: the knobs that make it fit (``fits``, ``changes``, ``text``,
        ...; see :func:`app.planner.suggest.search_knobs`), or ``None``.
    """

    parallelism: str
    model: str
    settings: dict[str, Any]
    devices: list[str]
    stages: list[dict]
    predictions: list[DevicePrediction]
    totals: dict[str, Any]
    explanation: str
    proposed_order: list[str] | None = None
    link_bytes: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dp_shares: list[float] | None = None
    suggestion: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    @property
    def feasible(self) -> bool:
        return bool(self.totals.get("feasible"))

    @property
    def oom(self) -> bool:
        return bool(self.totals.get("oom"))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "parallelism": self.parallelism, "model": self.model,
                "settings": dict(self.settings), "devices": list(self.devices), "stages": self.stages,
                "predictions": [p.to_dict() for p in self.predictions], "totals": dict(self.totals),
                "explanation": self.explanation, "proposed_order": self.proposed_order,
                "link_bytes": dict(self.link_bytes), "warnings": list(self.warnings),
                "dp_shares": None if self.dp_shares is None else list(self.dp_shares),
                "suggestion": None if self.suggestion is None else dict(self.suggestion)}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if data.get("version") not in READABLE_PLAN_VERSIONS:
            raise ValueError(f"plan version {data.get('version')!r} is not supported "
                             f"(expected one of {', '.join(map(str, READABLE_PLAN_VERSIONS))})")
        preds = [DevicePrediction(**p) for p in data.get("predictions", [])]
        return cls(parallelism=data["parallelism"], model=data["model"], settings=data["settings"],
                   devices=data["devices"], stages=data.get("stages", []), predictions=preds,
                   totals=data.get("totals", {}), explanation=data.get("explanation", ""),
                   proposed_order=data.get("proposed_order"), link_bytes=data.get("link_bytes", {}),
                   warnings=data.get("warnings", []), dp_shares=data.get("dp_shares"),
                   suggestion=data.get("suggestion"))

    def to_job_fields(self) -> dict[str, Any]:
        """The JobConfig fields this plan decides (``devices`` is the rank order)."""
        out = {"parallelism": self.parallelism, "model": self.model, "devices": list(self.devices),
               "stages": [dict(s) for s in self.stages]}
        for k in ("batch_size", "seq_len", "micro_batches", "sync_every", "schedule", *_KNOBS):
            if k in self.settings:  # a version-1 plan has no knobs
                out[k] = self.settings[k]
        if self.parallelism == Parallelism.DP.value:
            out["dp_shares"] = None if self.dp_shares is None else list(self.dp_shares)
        return out


_KNOBS = ("optimizer", "activation_checkpointing", "grad_accumulation", "precision")


# --------------------------------------------------------------------------- planning


def _evaluate(par: Parallelism, shape: ModelShape, st: RunSettings, specs: list[DeviceSpec], links: Links,
              stages: list[dict] | None, cal: cm.Calibration) -> Evaluation:
    name = par.value  # plans and their JSON carry the plain name
    if par in (Parallelism.DP, Parallelism.SP):
        return eval_replicated(name, shape, st, specs, links, cal)
    if par == Parallelism.TP:
        return eval_tp(shape, st, specs, links, cal)
    if par == Parallelism.PP:
        return eval_pipeline(name, shape, st, specs, links, 1, stages, cal)
    if stages:  # hybrid with a given split
        return eval_pipeline(name, shape, st, specs, links, stages=stages, cal=cal)
    options = hybrid_replica_options(len(specs), shape.n_layer)
    if not options:
        return Evaluation(name, False, f"HYBRID: {len(specs)} devices do not form >= 2 stages of >= 2 replicas",
                          order=cm.names_of(specs))
    evals = [eval_pipeline(name, shape, st, specs, links, r, None, cal) for r in options]
    return min(evals, key=_rank_key)


def _rank_key(ev: Evaluation) -> tuple[int, int, float]:
    return (0 if ev.feasible else 1, 1 if ev.oom else 0, ev.step_s)


def make_plan(model: Any, parallelism: Parallelism | str, specs: Sequence[DeviceSpec], links: Links | None = None,
              settings: RunSettings | None = None, stages: list[dict] | None = None, propose: bool = True,
              cal: cm.Calibration = cm.CALIBRATION, suggest: bool = True) -> Plan:
    """Plan ``parallelism`` for ``model`` on ``specs`` (rank order = list order).

    Parameters
    ----------
    model
        Preset name, ``workers.presets.Preset`` or :class:`ModelShape`.
    parallelism
        ``dp``, ``sp``, ``tp``, ``pp`` or ``hybrid``.
    specs
        Devices in the user's order.
    links
        Measured links (default: 1 Gbit/s, 0.5 ms everywhere).
    settings
        The run settings (batch, sequence, micro-batches, sync period, schedule; default: the defaults).
    stages
        A fixed JobConfig ``stages`` split to predict instead of partitioning.
    propose
        pp/hybrid: also search for a better device order (reported, not applied).
    suggest
        When the plan OOMs, search the memory knobs for a combination that fits
        (``Plan.suggestion``; apply it with :func:`app.planner.suggest.apply_suggestion`).

    Returns
    -------
    Plan
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism {parallelism!r} is not one of {', '.join(PARALLELISMS)}")
    parallelism = Parallelism(parallelism)
    shape = resolve_model(model)
    st = settings if settings is not None else RunSettings()
    specs = list(specs)
    if not specs:
        raise ValueError("a plan needs at least one device")
    links = links or Links()
    st, share_notes = _dp_shares(parallelism, shape, st, specs, links, cal)
    ev = _evaluate(parallelism, shape, st, specs, links, stages, cal)
    plan = _to_plan(ev, shape, st)
    plan.warnings += share_notes
    if parallelism == Parallelism.DP and st.dp_shares is not None:
        given = settings is not None and settings.dp_shares is not None and st.dp_shares == settings.dp_shares
        # the planner's own picks travel exactly as evaluated (prepare_run hands them to the workers)
        plan.dp_shares = knobs.normalised(st.dp_shares) if given else list(st.dp_shares)
    if suggest and ev.devices and ev.oom:
        plan.suggestion = search_knobs(parallelism, st, specs,
                                       lambda s: _evaluate(parallelism, shape, s, specs, links, stages, cal), ev)
    if propose and parallelism.pipelined and ev.feasible and not stages and len(specs) > 2:
        def evaluate(order: list[int]) -> Evaluation:
            return _evaluate(parallelism, shape, st, [specs[i] for i in order], links, None, cal)

        order, better = best_order(evaluate, specs)
        if order != list(range(len(specs))) and (ev.oom and not better.oom or
                                                  better.step_s < 0.95 * ev.step_s and better.oom == ev.oom):
            plan.proposed_order = [specs[i].name for i in order]
            plan.totals["proposed_step_s"] = better.step_s
            plan.warnings.append(f"order {', '.join(plan.proposed_order)} is predicted "
                                 f"{ev.step_s / max(better.step_s, 1e-12):.2f}x faster"
                                 + (" and fits memory" if ev.oom and not better.oom else ""))
    unprofiled = [s.name for s in specs if not s.profiled]
    if unprofiled:
        plan.warnings.append(f"no profile for {', '.join(unprofiled)}: generic laptop figures used "
                             "(run edgetrain profile)")
    return plan


def _dp_shares(par: Parallelism, shape: ModelShape, st: RunSettings, specs: list[DeviceSpec], links: Links,
               cal: cm.Calibration) -> tuple[RunSettings, list[str]]:
    """The settings to plan DP with: the user's shares, or shares proportional to speed.

    The planner picks shares only when the user gave none (or gave a number that does
    not match the devices: a re-plan on survivors) and the devices differ in speed by
    more than :data:`app.planner.knobs.SHARE_TOLERANCE`; it keeps equal shares when the
    speed shares would run a device out of memory and equal ones would not.
    """
    if par != Parallelism.DP:
        return st, []
    notes = []
    if st.dp_shares is not None:
        if len(st.dp_shares) == len(specs):
            # planned as given: the workers split by the same numbers (normalised there)
            return st, []
        notes.append(f"{len(st.dp_shares)} dp_shares for {len(specs)} devices: shares picked by device speed")
    picked = knobs.speed_shares(specs)
    equal = replace(st, dp_shares=None)
    try:
        knobs.share_counts(st.batch_size, picked, len(specs))
    except ValueError:
        picked = None  # a slow device would get no sample at all: keep equal shares
    if picked is None:
        return equal, notes
    by_speed = replace(st, dp_shares=picked)
    if (eval_replicated("dp", shape, by_speed, specs, links, cal).oom
            and fits(eval_replicated("dp", shape, equal, specs, links, cal))):
        return equal, notes + ["equal DP shares: shares by device speed would run out of memory"]
    return by_speed, notes


def _to_plan(ev: Evaluation, shape: ModelShape, st: RunSettings) -> Plan:
    settings = {"batch_size": st.batch_size, "seq_len": st.seq_len, "micro_batches": st.micro_batches,
                "sync_every": st.sync_every, "schedule": st.schedule.value,
                "optimizer": knobs.optimizer_of(st), "activation_checkpointing": knobs.checkpointing(st),
                "grad_accumulation": knobs.accumulation(st), "precision": knobs.precision_of(st)}
    if not ev.feasible and not ev.devices:
        totals = {"feasible": False, "oom": False, "step_s": None, "latency_per_sample_s": None,
                  "energy_per_sample_j": None}
        return Plan(ev.parallelism, shape.name, settings, ev.order, [], [], totals, ev.reason)
    energy = sum(d.energy_per_sample_j for d in ev.devices)
    totals = {
        "feasible": ev.feasible and not ev.reason, "oom": ev.oom, "step_s": ev.step_s,
        "latency_per_sample_s": ev.step_s / st.batch_size, "throughput_sps": st.batch_size / ev.step_s,
        # what the run summary reports: the median step (DP with k > 1: one without sync)
        "median_latency_per_sample_s": (ev.typical_step_s or ev.step_s) / st.batch_size,
        "energy_per_sample_j": energy, "energy_methods": sorted({d.energy_method for d in ev.devices}),
        "peak_rss_bytes": max(d.peak_rss_bytes for d in ev.devices),
        "comm_bytes_per_step": sum(ev.link_bytes.values()), "critical_device": ev.critical,
        **{k: v for k, v in ev.parts.items()},
    }
    if ev.reason:
        totals["feasible"] = False
    return Plan(ev.parallelism, shape.name, settings, ev.order, ev.stages, ev.devices, totals,
                explain(ev), link_bytes=ev.link_bytes)


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def explain(ev: Evaluation) -> str:
    """One line saying what dominates the predicted step (or why it cannot run)."""
    name = ev.parallelism.upper()
    if not ev.devices:
        return ev.reason
    oom = [d for d in ev.devices if d.oom]
    if oom:
        d = oom[0]
        kind = "address space" if d.limit_kind == "virtual" else "memory"
        need = d.virtual_bytes[d.oom_phase] if d.limit_kind == "virtual" else d.mem_bytes[d.oom_phase]
        more = f" (+{len(oom) - 1} more)" if len(oom) > 1 else ""
        return (f"{name}: OOM on {d.name}{more} in {d.oom_phase}: needs {need / 2**30:.2f} GiB of "
                f"{kind}, limit {(d.limit_bytes or 0) / 2**30:.2f} GiB")
    parts = ev.parts
    step = max(ev.step_s, 1e-12)
    top = max(("compute_s", "comm_s", "bubble_s", "optimizer_s"), key=lambda k: parts.get(k, 0.0))
    pct = 100 * parts.get(top, 0.0) / step
    if top == "comm_s":
        per_link = max(ev.link_bytes.values(), default=0.0)
        link = ev.slowest_link
        where = f"the slowest link ({link[0]}->{link[1]}, {link[2]:.0f} Mbit/s)" if link else "the links"
        return f"{name}: {_gb(per_link)}/step over {where} dominates ({pct:.0f}% of the step)"
    if top == "bubble_s":
        n_st = len(ev.stages)
        return f"{name}: pipeline bubble is {pct:.0f}% of the step ({n_st} stages)"
    if top == "optimizer_s":
        return f"{name}: the AdamW update dominates ({pct:.0f}% of the step)"
    return f"{name}: compute on {ev.critical} dominates ({parts['compute_s']:.3g} s of {step:.3g} s per step)"


# --------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    """Every parallelism planned on the same devices, ranked by ``objective``."""

    objective: str
    plans: list[Plan]
    ranking: list[str]
    lines: list[str]

    @property
    def best(self) -> Plan | None:
        return next((p for p in self.plans if p.parallelism == self.ranking[0]), None) if self.ranking else None

    @property
    def best_with_knobs(self) -> Plan | None:
        """When nothing fits as is: the plan whose suggested knobs fit best by the objective."""
        fixable = [p for p in self.plans if (p.suggestion or {}).get("fits")]
        key = "energy_per_sample_j" if self.objective == "energy" else "latency_per_sample_s"
        return min(fixable, key=lambda p: p.suggestion[key], default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "objective": self.objective, "ranking": self.ranking,
                "lines": self.lines, "plans": [p.to_dict() for p in self.plans]}


def score(plan: Plan, objective: str, best_latency: float, best_energy: float, weight: float = 0.5) -> float:
    """Lower is better: latency, energy per sample, or ``weight`` x latency + the rest
    energy, each relative to the best feasible plan."""
    lat = plan.totals["latency_per_sample_s"]
    en = plan.totals["energy_per_sample_j"]
    if objective == "latency":
        return lat
    if objective == "energy":
        return en
    return weight * lat / max(best_latency, 1e-30) + (1 - weight) * en / max(best_energy, 1e-30)


def compare(model: Any, specs: Sequence[DeviceSpec], links: Links | None = None, settings: RunSettings | None = None,
            objective: str = "latency", parallelisms: Iterable[str] = PARALLELISMS, weight: float = 0.5,
            cal: cm.Calibration = cm.CALIBRATION) -> Comparison:
    """Plan every parallelism and rank those that run without OOM by ``objective``.

    A plan that OOMs carries the knobs that would make it fit (``Plan.suggestion``); the
    lines say so, and :attr:`Comparison.best_with_knobs` picks among them.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    plans = [make_plan(model, p, specs, links, settings, cal=cal) for p in parallelisms]
    ok = [p for p in plans if p.feasible and not p.oom]
    best_lat = min((p.totals["latency_per_sample_s"] for p in ok), default=1.0)
    best_en = min((p.totals["energy_per_sample_j"] for p in ok), default=1.0)
    ok.sort(key=lambda p: score(p, objective, best_lat, best_en, weight))
    lines = []
    for i, p in enumerate(ok, 1):
        t = p.totals
        lines.append(f"{i}. {p.parallelism.upper():<6} {t['latency_per_sample_s'] * 1e3:9.3f} ms/sample "
                     f"{t['energy_per_sample_j']:9.4f} J/sample  {p.explanation}")
    for p in plans:
        if p not in ok:
            fix = f"; to fit: {p.suggestion['text']}" if (p.suggestion or {}).get("fits") else (
                f"; {p.suggestion['text']}" if p.suggestion else "")
            lines.append(f"-. {p.parallelism.upper():<6} not recommended: {p.explanation}{fix}")
    return Comparison(objective, plans, [p.parallelism for p in ok], lines)


# --------------------------------------------------------------------------- stage split


def plan_stages(settings: RunSettings, n_devices: int, specs: Sequence[DeviceSpec] | None = None,
                links: Links | None = None) -> list[dict]:
    """JobConfig ``stages`` for ``settings`` (pp/hybrid) on ``n_devices`` devices.

    Without ``specs`` every device is taken as equal (generic), which balances blocks
    by cost and keeps the embedding-heavy first stage lighter.  Non-pipeline
    parallelisms get ``[]``.
    """
    par = settings.parallelism
    if not par.pipelined:
        return []
    model = settings.model
    specs = list(specs) if specs is not None else [
        DeviceSpec(f"d{i}", gflops=cm.HOST_GFLOPS_PER_THREAD, mem_bytes=None, source="uniform")
        for i in range(n_devices)]
    if len(specs) != n_devices:
        raise ValueError(f"{len(specs)} device specs for {n_devices} devices")
    plan = make_plan(model, par, specs, links, settings, propose=False)
    if not plan.stages:
        raise ValueError(plan.explanation or f"cannot plan {par} on {n_devices} devices")
    return plan.stages
