"""Pipeline efficiency: the measured PP step against the bubble-limited ideal.

On the homogeneous testbed (4 emulated Jetson Nanos; as root each is a cgroup with a CPU
quota, so the 4 stages are 4 devices of equal speed instead of 4 processes fighting over
this host's cores), train gpt2-s with 4 stages and 8 micro-batches, once per schedule
(GPipe, 1F1B), through the ``edgetrain run`` path, and compare:

* **measured**: the step time (median over the steps after the first; the slowest stage's,
  from its telemetry);
* **ideal**: ``(M + S - 1) / M x`` the slowest stage's own time per step, from the same
  run: each worker reports the CPU seconds its step used (``cpu_s``, its work without its
  waits); under a CPU quota of ``q`` cores that work takes ``cpu_s / q`` seconds of wall
  time, without a quota ``cpu_s`` (then stages also wait for this host's cores, which the
  ideal does not count).

Efficiency = ideal / measured (1.0: nothing but the bubble).  Stages also run the
optimizer, which has no bubble, so the ideal is slightly pessimistic.

    .venv/bin/python bench/pp_efficiency.py [--model gpt2-s] [--batch-size 32] [--micro-batches 8] [--steps 5]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.devices.inventory import load_inventory  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402


def _median_after_first(values: list[float | None]) -> float | None:
    got = [v for v in values[1:] if v is not None] or [v for v in values if v is not None]
    return statistics.median(got) if got else None


async def one(inv, tmp: Path, args: argparse.Namespace, schedule: str, quotas: dict[str, float | None]) -> dict:
    s = RunSettings(model=args.model, parallelism="pp", schedule=schedule, steps=args.steps,
                    batch_size=args.batch_size, seq_len=32, micro_batches=args.micro_batches,
                    checkpoint_every=0, checkpoint_minutes=0, eval_every=0, timeout_s=900)
    launcher, state = prepare_run(inv, None, s, tmp / "runs")
    outcome = await launcher.run()
    if outcome != "done":
        raise RuntimeError(f"{schedule}: run {outcome}: {[e.message for e in state.events][-3:]}")
    stages = [tuple(st["layers"]) for st in launcher.job.stages]
    per_stage = []
    for d in sorted(state.devices.values(), key=lambda d: d.rank):
        step_s = _median_after_first([lat * args.batch_size for lat in d.latencies])
        cpu = _median_after_first(d.cpu_times)
        q = quotas.get(d.name)
        per_stage.append({"device": d.name, "step_s": step_s, "cpu_s": cpu,
                          "own_s": cpu / q if (cpu is not None and q) else cpu, "quota": q})
    m, n = args.micro_batches, len(per_stage)
    slowest = max(p["own_s"] for p in per_stage)
    ideal = (m + n - 1) / m * slowest
    measured = max(p["step_s"] for p in per_stage)
    return {"schedule": schedule, "stages": stages, "per_stage": per_stage, "ideal_s": ideal,
            "measured_s": measured, "efficiency": ideal / measured}


async def main_async(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        async with Testbed(Path(tmp) / "tb", preset="homogeneous", port=0, base_addr="127.0.39.1") as tb:
            quotas = {d.name: d.cpu_share for d in tb.devices}
            print("testbed: " + ", ".join(f"{d.name} cpu {d.cpu_share:.2f}" if d.cpu_share else f"{d.name} (no quota)"
                                          for d in tb.devices), flush=True)
            inv = load_inventory(tb.inventory_path)
            for schedule in args.schedules:
                r = await one(inv, Path(tmp), args, schedule, quotas)
                rows.append(r)
                print(f"\n{schedule}: stages {r['stages']}", flush=True)
                for p in r["per_stage"]:
                    q = f"quota {p['quota']:.2f}" if p["quota"] else "no quota"
                    print(f"  {p['device']:<8} step {p['step_s']:7.3f} s  cpu {p['cpu_s']:7.3f} s  "
                          f"own {p['own_s']:7.3f} s ({q})", flush=True)
    m = args.micro_batches
    print(f"\n{args.model}, batch {args.batch_size} x 32, {len(rows[0]['per_stage'])} stages, {m} micro-batches, "
          f"{args.steps} steps (median after the first)")
    print(f"{'schedule':<8} {'slowest stage':>14} {'ideal':>9} {'measured':>9} {'efficiency':>10}")
    for r in rows:
        slowest = max(p["own_s"] for p in r["per_stage"])
        print(f"{r['schedule']:<8} {slowest:12.3f} s {r['ideal_s']:7.3f} s {r['measured_s']:7.3f} s "
              f"{r['efficiency']:10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
