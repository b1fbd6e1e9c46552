"""Does the planner's split beat the even one on boards of different speeds?

On the heterogeneous testbed (as root: 2 x Jetson Nano, TX2, Xavier NX, each a cgroup
with its board's memory and a CPU quota keeping the boards' relative speeds), train the
same job twice per parallelism, alternating, and compare the median latency per sample:

* DP: equal batch shares (``dp_shares`` 1/4 each) against the planner's shares
  (proportional to device speed);
* PP: an even split of the blocks over the 4 stages in the inventory's order against the
  planner's order and split (balanced by predicted stage time; the order it proposes, as
  the GUI's Auto-arrange applies it).

``--sync-every k`` synchronises DP every k steps; the figure is the mean latency per sample
over the steps after the first (slowest device), so the synchronising steps count.

    .venv/bin/python bench/hetero_split.py [--model gpt2-s] [--steps 4] [--batch-size 16] [--reps 1]
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
from app.planner.plan import plan_stages  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.run.planning import plan_for_run  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402


async def one(inv, tmp: Path, s: RunSettings, names: list[str] | None = None) -> tuple[float | None, str]:
    launcher, state = prepare_run(inv, names, s, tmp / "runs")
    outcome = await launcher.run()
    how = (f"shares {[round(x, 2) for x in launcher.job.dp_shares]}" if launcher.job.dp_shares
           else f"stages {[tuple(st['layers']) for st in launcher.job.stages]} on {','.join(launcher.job.devices)}"
           if launcher.job.stages else "")
    # the mean over the steps after the first (slowest device): with --sync-every k the
    # median would skip the steps that synchronise
    means = [statistics.mean(d.latencies[1:] or d.latencies) for d in state.devices.values() if d.latencies]
    lat = max(means) if outcome == "done" and means else None
    return lat, f"{outcome} {how}"


async def main_async(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        async with Testbed(Path(tmp) / "tb", preset="heterogeneous", port=0, base_addr="127.0.36.1") as tb:
            print("testbed: " + ", ".join(f"{d.name} cpu {d.cpu_share:.2f}" if d.cpu_share else d.name
                                          for d in tb.devices), flush=True)
            inv = load_inventory(tb.inventory_path)
            base = dict(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=32,
                        sync_every=args.sync_every,
                        micro_batches=4, checkpoint_every=0, checkpoint_minutes=0, eval_every=0, timeout_s=600)
            n = len(tb.devices)
            even_pp = RunSettings(parallelism="pp", **base)
            even_pp.stages = plan_stages(even_pp, n)  # blocks split evenly, in rank order
            cases = {"dp": (RunSettings(parallelism="dp", dp_shares=[1.0 / n] * n, **base),
                            RunSettings(parallelism="dp", **base)),
                     "pp": (even_pp, RunSettings(parallelism="pp", **base))}
            for par in args.parallelisms.split(","):
                even, planned = cases[par]
                got = {"even": [], "planner": []}
                for _ in range(args.reps):
                    for label, s in (("even", even), ("planner", planned)):
                        # the planner's PP also orders the stages (the GUI's Auto-arrange):
                        # the embedding stage on the fastest board
                        names = (plan_for_run(inv, None, s).proposed_order if par == "pp" and label == "planner"
                                 else None)
                        lat, how = await one(inv, Path(tmp), s, names)
                        print(f"  {par} {label:<8} {how}: {lat and lat * 1e3:.1f} ms/sample", flush=True)
                        if lat:
                            got[label].append(lat)
                rows.append((par, got))
    print(f"\n{args.model}, batch {args.batch_size} x 32, {args.steps} steps, heterogeneous testbed (cgroup caps)")
    print(f"{'par':<5} {'even ms/sample':>15} {'planner ms/sample':>18} {'planner speed-up':>17}")
    for par, got in rows:
        e = statistics.median(got["even"]) if got["even"] else None
        p = statistics.median(got["planner"]) if got["planner"] else None
        ratio = f"{e / p:.2f}x" if e and p else "-"
        print(f"{par:<5} {e and e * 1e3 or 0:>15.1f} {p and p * 1e3 or 0:>18.1f} {ratio:>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--parallelisms", default="dp,pp")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sync-every", type=int, default=1, help="DP: gradients synchronised every k steps")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
