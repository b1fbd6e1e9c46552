"""What would make it fit: a search over the memory knobs for a plan predicted to OOM.

When a configuration runs out of memory on some device, :func:`search_knobs` tries the
knobs of :mod:`app.planner.knobs` in tiers, cheapest first, and reports the first tier's
fastest combination that fits every device:

0. knobs that keep the maths and only cost time: the 1F1B schedule with more
   micro-batches (pp/hybrid: GPipe keeps every micro-batch's activations, 1F1B at most
   ``stages - index``), gradient accumulation (dp), activation checkpointing;
1. bf16 autocast, where every device supports it (none of today's CPU devices);
2. another optimizer (Adafactor, SGD with momentum): less state, different training.

Within a tier the planner's predicted step time decides.  The result is plain data that
the plan carries (``Plan.suggestion``); :func:`apply_suggestion` turns it into settings.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Callable, Sequence

from app.planner import knobs
from app.planner.parallel import Evaluation
from workers.config import Parallelism, RunSettings, Schedule

#: Largest micro-batch / accumulation count the search tries (more only adds overhead).
MAX_SPLIT = 64
_OPT_NAMES = {"adamw": "AdamW", "sgd": "SGD (momentum)", "adafactor": "Adafactor"}


#: A suggested configuration leaves this share of every device's limit free: the planner's
#: memory figures are good to about 15 % (measured: GPT2-L PP on 4 GiB Nanos with the first
#: suggestion, predicted 3.46 GiB on its last stage, was OOM-killed in the optimizer).
SUGGEST_HEADROOM = 0.15


def roomy(ev: Evaluation) -> bool:
    """Fits with :data:`SUGGEST_HEADROOM` to spare on every capped device."""
    return fits(ev) and all(d.margin is None or d.margin >= SUGGEST_HEADROOM for d in ev.devices)


def fits(ev: Evaluation) -> bool:
    """Runs and fits every device's memory."""
    return bool(ev.feasible and not ev.reason and ev.devices and not ev.oom)


def _splits(n: int, current: int, at_least: int = 1) -> list[int]:
    """Divisors of ``n`` from ``current`` up (at most :data:`MAX_SPLIT`)."""
    lo = max(current, at_least)
    return [d for d in range(lo, min(n, MAX_SPLIT) + 1) if n % d == 0]


def _structure(par: Parallelism, st: RunSettings, n_devices: int) -> list[dict[str, Any]]:
    """Tier-0 changes that split the work finer: schedule/micro-batches, accumulation."""
    out: list[dict[str, Any]] = [{}]
    if par.pipelined:
        # GPipe keeps all micro-batches' activations whatever their number: only 1F1B helps
        stages_min = 2 if par == Parallelism.HYBRID else n_devices
        for m in _splits(st.batch_size, st.micro_batches, stages_min):
            ch: dict[str, Any] = {}
            if st.schedule != Schedule.ONE_F_ONE_B:
                ch["schedule"] = Schedule.ONE_F_ONE_B.value
            if m != st.micro_batches:
                ch["micro_batches"] = m
            if ch:
                out.append(ch)
    elif par == Parallelism.DP:
        # the largest slice decides the peak; a larger g than a slice's rows runs one row at a time
        largest = -(-st.batch_size // max(1, n_devices))
        if st.dp_shares:
            largest = max(knobs.share_counts(st.batch_size, st.dp_shares, n_devices))
        g0 = knobs.accumulation(st)
        out += [{"grad_accumulation": g} for g in (2, 4, 8, 16, 32, 64) if g0 < g <= largest]
    elif par == Parallelism.TP:
        # every shard runs the whole batch: chunks of it cut the activations
        g0 = knobs.accumulation(st)
        out += [{"grad_accumulation": g} for g in (2, 4, 8, 16, 32, 64) if g0 < g <= st.batch_size]
    return out


def candidate_tiers(par: Parallelism, st: RunSettings, specs: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """The changes to try, tier by tier (see the module doc); the empty change is left out."""
    structure = _structure(par, st, len(specs))
    ckpt = [{}] if knobs.checkpointing(st) else [{}, {"activation_checkpointing": True}]
    base = [{**a, **b} for a, b in itertools.product(structure, ckpt)]
    bf16 = knobs.precision_of(st) != "bf16" and all(knobs.supports_bf16(s) for s in specs)
    precision = [{}, {"precision": "bf16"}] if bf16 else [{}]
    tiers = [[c for c in base if c]]
    if bf16:
        tiers.append([{**c, "precision": "bf16"} for c in base])
    # torch's Adafactor cannot step DTensor shards (its factored moments need whole
    # matrices), so the workers refuse it with TP: never suggest it there
    opts = [o for o in ("adafactor", "sgd") if o != knobs.optimizer_of(st)
            and not (o == "adafactor" and par == Parallelism.TP)]
    tiers.append([{**c, **p, "optimizer": o} for o in opts for c in base for p in precision])
    return [t for t in tiers if t]


def describe(par: Parallelism, st: RunSettings, changes: dict[str, Any]) -> str:
    """``PP with 1F1B, 8 micro-batches and activation checkpointing`` (``as is`` when empty)."""
    parts = []
    if "schedule" in changes or "micro_batches" in changes:
        sched = changes.get("schedule", st.schedule.value)
        parts.append(f"{sched.upper() if sched == '1f1b' else sched}, "
                     f"{changes.get('micro_batches', st.micro_batches)} micro-batches")
    if "grad_accumulation" in changes:
        parts.append(f"gradient accumulation {changes['grad_accumulation']}")
    if changes.get("activation_checkpointing"):
        parts.append("activation checkpointing")
    if "precision" in changes:
        parts.append(f"{changes['precision']} autocast")
    if "optimizer" in changes:
        parts.append(_OPT_NAMES.get(changes["optimizer"], changes["optimizer"]))
    if not parts:
        return f"{par.value.upper()} as is"
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{par.value.upper()} with {text}"


def _tightest(ev: Evaluation) -> Any:
    limited = [d for d in ev.devices if d.limit_bytes]
    return min(limited, key=lambda d: d.margin if d.margin is not None else 1.0) if limited else None


def search_knobs(par: Parallelism, st: RunSettings, specs: Sequence[Any],
                 evaluate: Callable[[RunSettings], Evaluation], base: Evaluation) -> dict[str, Any]:
    """The first tier's fastest knob combination that makes ``par`` fit, as plan data.

    Parameters
    ----------
    par, st, specs
        The configuration predicted to OOM (``st`` with the plan's DP shares applied).
    evaluate
        The planner's evaluation of ``par`` on ``specs`` under other settings.
    base
        The evaluation of ``st`` itself (the step time the text compares with).

    Returns
    -------
    dict
        ``fits``; ``changes`` (RunSettings fields to set); ``text`` (one line);
        when it fits, ``step_s``, ``latency_per_sample_s``, ``energy_per_sample_j``,
        ``device`` (the tightest), ``need_bytes`` and ``limit_bytes`` there.
    """
    tried: set[str] = set()
    for tier in candidate_tiers(par, st, specs):
        found: list[tuple[float, int, dict[str, Any], Evaluation]] = []
        for changes in tier:
            tried.update(changes)
            try:
                ev = evaluate(replace(st, **changes))
            except ValueError:
                continue
            if roomy(ev):
                found.append((ev.step_s, len(changes), changes, ev))
        if found:
            step, _, changes, ev = min(found, key=lambda f: (f[0], f[1]))
            d = _tightest(ev)
            text = describe(par, st, changes)
            if d is not None:
                text += (f": {d.capped_peak_bytes / 2**30:.1f} of {d.limit_bytes / 2**30:.1f} GiB on {d.name}")
            if base.step_s > 0:
                text += f", {step:.3g} s/step ({100 * (step / base.step_s - 1):+.0f}%)"
            return {"fits": True, "changes": dict(changes), "text": text, "step_s": step,
                    "latency_per_sample_s": step / st.batch_size,
                    "energy_per_sample_j": sum(p.energy_per_sample_j for p in ev.devices),
                    "device": d.name if d else None, "need_bytes": d.capped_peak_bytes if d else None,
                    "limit_bytes": d.limit_bytes if d else None}
    names = {"schedule": "1F1B", "micro_batches": "more micro-batches", "grad_accumulation": "gradient accumulation",
             "activation_checkpointing": "activation checkpointing", "precision": "bf16",
             "optimizer": "SGD" if par == Parallelism.TP else "Adafactor/SGD"}
    what = ", ".join(names[k] for k in names if k in tried) or "no knob applies"
    return {"fits": False, "changes": {}, "text": f"{par.value.upper()} does not fit with any of: {what}"}


def apply_suggestion(settings: RunSettings, plan: Any) -> RunSettings:
    """``settings`` with the plan's suggested knobs applied (a copy).

    Parameters
    ----------
    settings
        The settings the plan was made for.
    plan
        A :class:`~app.planner.plan.Plan` or its ``to_dict()``.

    Returns
    -------
    RunSettings
        A copy: unchanged when the plan fits as it is, else with ``suggestion.changes``.

    Raises
    ------
    ValueError
        When the plan does not fit and no combination of knobs makes it fit.
    """
    data = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    totals = data.get("totals") or {}
    if totals.get("feasible") and not totals.get("oom"):
        return replace(settings)
    sug = data.get("suggestion") or {}
    if not sug.get("fits"):
        raise ValueError(sug.get("text") or data.get("explanation") or "the plan does not fit and has no suggestion")
    return replace(settings, **sug["changes"])
