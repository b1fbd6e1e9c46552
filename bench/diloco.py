"""Low-bandwidth DP (DiLoCo) against plain DP over a slow, shaped link.

On the network-namespace tier (root: each device its own namespace, OpenSSH, links
shaped with ``tc`` to ``--mbit``), train the same job with DDP synchronising every step
and with DiLoCo (``--inner`` local steps, bf16 sync, outer Nesterov), alternating the two
``--reps`` times, and report for each:

* bytes moved: the devices' veth transmit counters over the run (everything on the wire:
  gradients or moves, the rendezvous and telemetry);
* time per sample: the run summary's median latency per sample;
* the loss after the same number of samples: the training loss of the last step (the
  replicas' mean), and the held-out loss and accuracy at the end.

    .venv/bin/python bench/diloco.py [--model tiny-gpt2] [--steps 200] [--mbit 50] [--inner 8] [--reps 1]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.devices.inventory import load_inventory  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.testbed import netns  # noqa: E402
from workers.config import RunSettings  # noqa: E402


def tx_bytes(tb: netns.NetnsTestbed) -> int:
    """Bytes the devices have sent so far (their veth ends in the namespaces are the
    bridge side's receive; the host side's counters are readable without entering them)."""
    total = 0
    for d in tb.devices:
        total += int(Path(f"/sys/class/net/{d.veth}/statistics/rx_bytes").read_text())
    return total


async def one(tb: netns.NetnsTestbed, work: Path, s: RunSettings) -> dict:
    inv = load_inventory(tb.inventory_path)
    before = tx_bytes(tb)
    launcher, state = prepare_run(inv, None, s, work / "runs")
    outcome = await launcher.run()
    moved = tx_bytes(tb) - before
    summ = state.summary()
    # each replica's loss on its slice of the last step (equal slices: their mean is the batch's)
    last = [d.last_loss for d in state.devices.values() if d.last_loss is not None]
    return {"outcome": outcome, "bytes": moved, "lat": summ.get("latency_per_sample_s"),
            "train_loss": statistics.mean(last) if last else None, "eval_loss": summ.get("eval_loss"),
            "accuracy": summ.get("eval_accuracy"), "plan_bytes": (launcher.plan or {}).get("totals", {})
            .get("comm_bytes_per_step") if getattr(launcher, "plan", None) else None}


async def main_async(args: argparse.Namespace) -> None:
    why = netns.unavailable_reason()
    if why:
        sys.exit(f"bench/diloco.py needs the namespace tier: {why}")
    base = dict(model=args.model, parallelism="dp", steps=args.steps, batch_size=args.batch_size, seq_len=32,
                checkpoint_every=0, checkpoint_minutes=0, eval_every=0, timeout_s=600)
    modes = {"ddp": RunSettings(**base, sync_every=1),
             "diloco": RunSettings(**base, sync_every=args.inner, dp_mode="diloco")}
    got: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ns"
        tb = netns.netns_up(d, n=args.devices, rate_mbit=args.mbit, advertise=False, timeout=120,
                            **asdict(netns.NetnsNames.tagged()))
        try:
            for _ in range(args.reps):
                for name, s in modes.items():
                    r = await one(tb, Path(tmp), s)
                    got[name].append(r)
                    print(f"  {name:<7} {r['outcome']:<5} {r['bytes'] / 1e6:8.1f} MB  "
                          f"{(r['lat'] or 0) * 1e3:7.2f} ms/sample  train loss {r['train_loss'] or 0:.4f}  "
                          f"eval loss {r['eval_loss'] or 0:.4f}", flush=True)
        finally:
            netns.netns_down(d)
    print(f"\n{args.model}, {args.devices} devices at {args.mbit:g} Mbit/s (tc), batch {args.batch_size} x 32, "
          f"{args.steps} steps; DDP syncs every step, DiLoCo every {args.inner} (bf16, outer Nesterov 0.7/0.9)")
    print(f"{'mode':<8} {'MB moved':>9} {'ms/sample':>10} {'train loss':>11} {'eval loss':>10} {'eval acc':>9}")
    med = {}
    for name, rows in got.items():
        ok = [r for r in rows if r["outcome"] == "done"]
        if not ok:
            print(f"{name:<8} failed")
            continue
        m = {k: statistics.median(r[k] for r in ok if r[k] is not None) if any(r[k] is not None for r in ok)
             else None for k in ("bytes", "lat", "train_loss", "eval_loss", "accuracy")}
        med[name] = m
        print(f"{name:<8} {m['bytes'] / 1e6:9.1f} {(m['lat'] or 0) * 1e3:10.2f} {m['train_loss'] or 0:11.4f} "
              f"{m['eval_loss'] or 0:10.4f} {100 * (m['accuracy'] or 0):8.1f}%")
    if len(med) == 2:
        a, b = med["ddp"], med["diloco"]
        print(f"DiLoCo / DDP: {b['bytes'] / a['bytes']:.3f}x the bytes, {(b['lat'] or 0) / (a['lat'] or 1):.2f}x "
              f"the time per sample")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mbit", type=float, default=50.0)
    ap.add_argument("--inner", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
