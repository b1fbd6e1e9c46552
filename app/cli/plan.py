"""``edgetrain plan``: predicted memory, latency, energy and OOM before a run.

    edgetrain plan --model gpt2-s --parallelism pp            # the running testbed's devices
    edgetrain plan --inventory inv.yaml --devices a,b --compare --objective energy
    edgetrain plan ... --json                                  # the plan JSON (version 2)

A plan predicted to run out of memory also says which knobs (1F1B and micro-batches,
gradient accumulation, activation checkpointing, another optimizer) would make it fit;
``--compare`` says it per parallelism.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from app.cli.flags import add_device_flags, add_settings_flags, device_names, inventory_from_args, settings_from_args
from app.paths import atomic_write_text
from app.planner.plan import OBJECTIVES, Comparison, Plan, compare, make_plan
from app.run.planning import device_specs


def _gib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f} ms"


def _knobs_text(st: dict) -> str:
    """The memory knobs that differ from the defaults, for the header line."""
    parts = []
    if st.get("optimizer", "adamw") != "adamw":
        parts.append(str(st["optimizer"]))
    if st.get("activation_checkpointing"):
        parts.append("activation checkpointing")
    if (st.get("grad_accumulation") or 1) > 1:
        parts.append(f"grad accumulation {st['grad_accumulation']}")
    if st.get("precision", "fp32") != "fp32":
        parts.append(str(st["precision"]))
    return "".join(f", {p}" for p in parts)


def _fit_text(plan: Plan) -> str:
    """``as is``, ``with knobs`` or ``no`` (no knob makes it fit)."""
    if plan.feasible and not plan.oom:
        return "as is"
    return "with knobs" if (plan.suggestion or {}).get("fits") else "no"


def print_plan(plan: Plan, out: TextIO | None = None) -> None:
    """Per-device memory per phase, OOM flags, time and energy; then the totals."""
    out = out or sys.stdout
    st = plan.settings
    print(f"plan: {plan.model} {plan.parallelism.upper()} on {', '.join(plan.devices)}  (batch {st['batch_size']}, "
          f"seq {st['seq_len']}, {st['micro_batches']} micro-batches, sync every {st['sync_every']}, "
          f"{st['schedule']}{_knobs_text(st)})", file=out)
    if plan.dp_shares:
        print("DP shares (by device speed unless given): " + ", ".join(
            f"{n} {100 * s:.0f}%" for n, s in zip(plan.devices, plan.dp_shares)), file=out)
    if not plan.predictions:
        print(f"not feasible: {plan.explanation}", file=out)
        return
    hdr = (f"{'device':<12} {'rank':>4} {'role':<18} {'layers':<8} {'load':>7} {'fwd':>7} {'bwd':>7} {'optim':>7} "
           f"{'virtual':>8} {'limit':>8} {'margin':>7} {'OOM':<10} {'compute':>9} {'comm':>9} {'J/sample':>9}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for d in plan.predictions:
        layers = f"{d.layers[0]}-{d.layers[1]}" if d.layers else "all"
        m = d.mem_bytes
        limit = f"{_gib(d.limit_bytes)}{'v' if d.limit_kind == 'virtual' else ''}" if d.limit_bytes else "-"
        margin = f"{100 * d.margin:+.0f}%" if d.margin is not None else "-"
        oom = f"OOM {d.oom_phase}" if d.oom else "ok"
        print(f"{d.name:<12} {d.rank:>4} {d.role[:18]:<18} {layers:<8} {_gib(m['load']):>7} {_gib(m['forward']):>7} "
              f"{_gib(m['backward']):>7} {_gib(m['optimizer']):>7} {_gib(d.peak_virtual_bytes):>8} {limit:>8} "
              f"{margin:>7} {oom:<10} {d.compute_s:8.3f}s {d.comm_s:8.3f}s {d.energy_per_sample_j:9.4f}", file=out)
    t = plan.totals
    print(f"predicted: latency {_ms(t['latency_per_sample_s'])}/sample ({t['step_s']:.3f} s/step), "
          f"energy {t['energy_per_sample_j']:.4f} J/sample ({', '.join(t['energy_methods'])}), "
          f"{'OOM' if t['oom'] else 'no OOM'}", file=out)
    print("memory: RSS per phase; 'virtual' is the address-space peak, compared with caps marked v "
          "(emulated RLIMIT_AS)", file=out)
    print(plan.explanation, file=out)
    if plan.stages:
        print("stages: " + "  ".join(f"{s['ranks']}:{s['layers'][0]}-{s['layers'][1]}" for s in plan.stages), file=out)
    for w in plan.warnings:
        print(f"note: {w}", file=out)
    if plan.suggestion:
        label = "to fit" if plan.suggestion.get("fits") else "no fit"
        print(f"{label}: {plan.suggestion['text']}", file=out)


def print_comparison(cmp: Comparison, out: TextIO | None = None) -> None:
    """All parallelisms side by side, then the ranking with one line of reason each."""
    out = out or sys.stdout
    hdr = f"{'':<22}" + "".join(f"{p.parallelism.upper():>12}" for p in cmp.plans)
    print(hdr, file=out)
    print("-" * len(hdr), file=out)

    def row(label: str, fn) -> None:
        print(f"{label:<22}" + "".join(f"{fn(p):>12}" for p in cmp.plans), file=out)

    def tot(p: Plan, k: str):
        return p.totals.get(k) if p.predictions else None

    row("latency/sample", lambda p: _ms(tot(p, "latency_per_sample_s")))
    row("energy/sample (J)", lambda p: "-" if tot(p, "energy_per_sample_j") is None else
        f"{tot(p, 'energy_per_sample_j'):.4f}")
    row("step (s)", lambda p: "-" if tot(p, "step_s") is None else f"{tot(p, 'step_s'):.3f}")
    row("peak RSS (max dev)", lambda p: _gib(tot(p, "peak_rss_bytes")))
    row("comm/step", lambda p: "-" if tot(p, "comm_bytes_per_step") is None else
        f"{tot(p, 'comm_bytes_per_step') / 1e6:.1f} MB")
    row("OOM devices", lambda p: str(sum(d.oom for d in p.predictions)) if p.predictions else "-")
    row("feasible", lambda p: "yes" if p.feasible and not p.oom else "no")
    row("fits", _fit_text)
    print(f"\nranking by {cmp.objective}:", file=out)
    for line in cmp.lines:
        print(f"  {line}", file=out)
    best = cmp.best
    if best is None and cmp.best_with_knobs is not None:
        print(f"recommendation: none as is; {cmp.best_with_knobs.suggestion['text']}", file=out)
    else:
        print(f"recommendation: {best.parallelism.upper() if best else 'none (nothing fits)'}", file=out)
    notes = {w for p in cmp.plans for w in p.warnings if w.startswith("no profile")}
    for w in sorted(notes):
        print(f"note: {w}", file=out)


def cmd_plan(args: argparse.Namespace) -> int:
    inv = inventory_from_args(args)
    devices = inv.select(device_names(args))
    specs, links = device_specs(devices, inv.devices, use_cache=not args.no_cache)
    settings = settings_from_args(args)
    if args.compare:
        cmp = compare(settings.model, specs, links, settings, objective=args.objective, weight=args.weight)
        data = cmp.to_dict()
        if args.json:
            print(json.dumps(data, indent=1))
        else:
            print_comparison(cmp)
        ok = bool(cmp.ranking)
    else:
        plan = make_plan(settings.model, settings.parallelism, specs, links, settings)
        data = plan.to_dict()
        if args.json:
            print(plan.to_json())
        else:
            print_plan(plan)
        ok = plan.feasible and not plan.oom
    if args.output:
        atomic_write_text(args.output, json.dumps(data, indent=1))
    # 0: runnable; 1: predicted OOM or infeasible (scripts can gate a run on it)
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict memory, latency, energy and OOM; compare parallelisms")
    add_device_flags(p)
    add_settings_flags(p)
    p.add_argument("--compare", action="store_true", help="plan every parallelism and recommend one")
    p.add_argument("--objective", default="latency", choices=list(OBJECTIVES),
                   help="ranking for --compare (mix: weighted latency and energy)")
    p.add_argument("--weight", type=float, default=0.5, help="latency weight of --objective mix")
    p.add_argument("--json", action="store_true", help="print the plan (or comparison) as JSON")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--no-cache", action="store_true", help="ignore cached device profiles and links")
    p.set_defaults(func=cmd_plan)
