"""GPT2-S (batch 128 x seq 32) with each parallelism on 4 emulated devices, side by side
with one-device training: latency per sample and peak memory per device.

Every cell is a real run over SSH on a local testbed (``app.run.sweep``), so the numbers
include what a user pays: process start, rendezvous, gloo collectives on loopback.

    .venv/bin/python bench/parallelisms.py [--model gpt2-s] [--steps 3] [--devices 4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.devices.inventory import load_inventory  # noqa: E402
from app.run.sweep import PARALLELISMS, plan_cells, run_sweep_blocking, write_report  # noqa: E402
from app.testbed.daemon import start_testbed, stop_testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--parallelisms", default=",".join(PARALLELISMS))
    ap.add_argument("--base-addr", default="127.0.30.1")
    args = ap.parse_args()
    settings = RunSettings(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           micro_batches=args.micro_batches, sync_every=1, timeout_s=600)
    with tempfile.TemporaryDirectory() as tmp:
        info = start_testbed(Path(tmp) / "tb", n_devices=args.devices, base_addr=args.base_addr)
        try:
            inv = load_inventory(info.inventory_path)
            names = [d.name for d in inv.devices]
            cells = plan_cells(names, args.parallelisms.split(","), single=True)
            t0 = time.time()
            cells = run_sweep_blocking(inv, names, settings, cells, Path(tmp) / "runs",
                                       on_cell=lambda c: print(f"  {c.label}: {c.outcome} {c.message[:100]}",
                                                               file=sys.stderr, flush=True))
            out = ROOT / "bench" / "out" / f"parallelisms-{args.model}"
            write_report(cells, settings, out)
        finally:
            stop_testbed(Path(tmp) / "tb")
    base = cells[0].latency_per_sample_s if cells and cells[0].outcome == "done" else None
    print(f"{args.model}, batch {args.batch_size} x seq {args.seq_len}, {args.steps} steps, "
          f"{args.devices} emulated devices on this host ({time.time() - t0:.0f} s)")
    print(f"{'cell':<8} {'outcome':<8} {'ms/sample':>10} {'vs single':>9}  peak memory per device (MiB)")
    for c in cells:
        lat = c.latency_per_sample_s
        ratio = f"{lat / base:.2f}" if lat and base else "-"
        mem = "  ".join(f"{n}:{b / 2**20:.0f}" for n, b in c.peak_mem_bytes.items())
        print(f"{c.label:<8} {c.outcome:<8} {(lat or 0) * 1e3:>10.2f} {ratio:>9}  {mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
