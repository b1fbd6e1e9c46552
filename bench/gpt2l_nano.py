"""The paper's case study: GPT2-L on 4 emulated Jetson Nanos (4 GB each), batch 128 x seq 32.

The paper reports that on 4 x Jetson Nano GPT2-L trains with TP and PP, while one device,
DP and SP run out of memory.  Here, on the homogeneous testbed (as root: each Nano a
cgroup with 4 GiB of physical memory and a CPU quota), through real SSH:

1. one device, DP and SP: the planner predicts OOM (and finds no knob that fits); forced
   to run one step anyway, each is OOM-killed by the kernel and reported as ``oom``
   naming the device and the phase;
2. PP and TP: the planner predicts OOM as configured and suggests knobs that fit
   (micro-batches, schedule, activation checkpointing, optimizer); the run uses them
   (they are in its record) and trains ``--steps`` steps.

    .venv/bin/python bench/gpt2l_nano.py [--steps 2] [--only single,dp,sp,pp,tp]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.devices.inventory import load_inventory  # noqa: E402
from app.planner.suggest import apply_suggestion  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.run.planning import plan_for_run  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402

GIB = 2**30
KNOBS = ("schedule", "micro_batches", "activation_checkpointing", "optimizer", "grad_accumulation", "precision")


def _knobs(s: RunSettings) -> str:
    base = RunSettings()
    return ", ".join(f"{k}={getattr(s, k)}" for k in KNOBS if getattr(s, k) != getattr(base, k)) or "defaults"


async def case(tb: Testbed, tmp: Path, name: str, steps: int) -> bool:
    inv = load_inventory(tb.inventory_path)
    names = [d.name for d in inv.devices][: 1 if name == "single" else 4]
    par = "dp" if name == "single" else name
    s = RunSettings(model="gpt2-l", parallelism=par, steps=steps, batch_size=128, seq_len=32, micro_batches=4,
                    timeout_s=1800, stall_s=900, checkpoint_every=0, checkpoint_minutes=0, eval_every=0)
    plan = plan_for_run(inv, names, s)
    peak = max(p.peak_rss_bytes for p in plan.predictions)
    expect_oom = name in ("single", "dp", "sp")
    sug = (plan.to_dict().get("suggestion") or {}).get("text", "")
    print(f"\n{name}: planned {'OOM' if plan.oom else 'fits'} (peak {peak / GIB:.2f} GiB of "
          f"{(plan.predictions[0].limit_bytes or 0) / GIB:.2f}); {sug or 'no suggestion'}", flush=True)
    if not expect_oom:
        try:
            s = apply_suggestion(s, plan)
        except ValueError as exc:  # no knob fits on paper: run with the lightest the workers support
            print(f"  the planner finds no fit ({exc}); running with checkpointing and SGD anyway", flush=True)
            s.activation_checkpointing, s.optimizer = True, "sgd"
        plan = plan_for_run(inv, names, s)
        print(f"  running with the planner's knobs: {_knobs(s)}; predicted peak "
              f"{max(p.peak_rss_bytes for p in plan.predictions) / GIB:.2f} GiB, "
              f"{plan.totals.get('step_s') or 0:.0f} s/step", flush=True)
    else:
        s.steps = 1  # forced: it is predicted not to fit
    launcher, state = prepare_run(inv, names, s, tmp / "runs")
    t0 = time.monotonic()
    outcome = await launcher.run()
    took = time.monotonic() - t0
    ooms = [e for e in state.events if e.kind == "oom"]
    print(f"  outcome {outcome} after {took:.0f} s (run {state.run_id}; knobs in its record: {_knobs(s)})")
    for e in ooms[:2]:
        print(f"  OOM: {e.message[:200]}")
    pred = {p.name: p for p in plan.predictions}
    for d in state.devices.values():
        p = pred.get(d.name)
        print(f"  {d.name:<7} {d.role:<12} {d.status:<7} steps {d.steps}  peak RSS {d.peak_mem_bytes / GIB:.2f} GiB"
              f"  predicted {p.peak_rss_bytes / GIB if p else 0:.2f} GiB  cap {d.mem_limit_kind or '?'}")
    if expect_oom:
        return outcome == "oom" and bool(ooms) and plan.oom
    return outcome == "done" and all(d.steps == steps for d in state.devices.values())


async def main_async(args) -> bool:
    ok = True
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch  # --keep: the run records (telemetry, summary) stay there
        Path(tmp).mkdir(parents=True, exist_ok=True)
        async with Testbed(Path(tmp) / "tb", preset="homogeneous", port=0, base_addr="127.0.32.1") as tb:
            print("testbed: " + ", ".join(f"{d.name} {d.mem_bytes / GIB:.0f} GiB {d.mem_cap}"
                                          f"{f' cpu {d.cpu_share:.2f}' if d.cpu_share else ''}" for d in tb.devices))
            for name in args.only.split(","):
                ok = await case(tb, Path(tmp), name, args.steps) and ok
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", default="single,dp,sp,pp,tp")
    ap.add_argument("--keep", help="keep the testbed and run records in this directory")
    ok = asyncio.run(main_async(ap.parse_args()))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
