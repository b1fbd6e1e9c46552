"""GPT2-L on emulated Jetson Nanos (4 GiB each), through the real SSH testbed.

1. One nano, whole model (DP on one device): must end in an ``oom`` event naming the
   device and the phase, within 30 s, with no worker process left.
2. Four nanos (the paper's homogeneous testbed), pipeline- then tensor-parallel: every
   device must get past model load; prints memory per device.  ``--steps`` > 0 also trains.

    .venv/bin/python bench/gpt2l_nano.py [--steps 0]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.devices.inventory import load_inventory  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402


def _gone(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def single(tmp: Path) -> bool:
    async with Testbed(tmp / "tb1", preset="jetson-nano", n_devices=1, port=0, base_addr="127.0.31.1") as tb:
        inv = load_inventory(tb.inventory_path)
        launcher, state = prepare_run(inv, None, RunSettings(model="gpt2-l", steps=1, batch_size=128), tmp / "runs")
        t0 = time.monotonic()
        outcome = await launcher.run()
        took = time.monotonic() - t0
    ooms = [e for e in state.events if e.kind == "oom"]
    left = [d.pid for d in state.devices.values() if not _gone(d.pid)]
    print(f"1 x jetson-nano, whole gpt2-l: outcome {outcome} after {took:.1f} s; "
          f"{ooms[0].message[:160] if ooms else 'no oom event'}; processes left: {left or 'none'}")
    return outcome == "oom" and took < 30 and not left


async def split(tmp: Path, steps: int, parallelism: str) -> bool:
    async with Testbed(tmp / f"tb4{parallelism}", preset="homogeneous", port=0, base_addr="127.0.32.1") as tb:
        inv = load_inventory(tb.inventory_path)
        settings = RunSettings(model="gpt2-l", parallelism=parallelism, steps=steps, batch_size=8,
                               micro_batches=4, timeout_s=600)
        launcher, state = prepare_run(inv, None, settings, tmp / "runs")
        loaded: dict[str, int] = {}
        state.record.connect(lambda r: loaded.__setitem__(r["device"], r.get("rss_bytes") or 0)
                             if r["type"] == "event" and r["name"] == "ready" else None)
        t0 = time.monotonic()
        outcome = await launcher.run()
        took = time.monotonic() - t0
    stages = {s["ranks"][0]: s["layers"] for s in launcher.job.stages}
    print(f"4 x jetson-nano, gpt2-l {parallelism} ({steps} steps): outcome {outcome} after {took:.1f} s")
    for d in state.devices.values():
        rss = loaded.get(d.name)
        where = f"blocks {stages.get(d.rank)}" if stages else "1/4 of every block"
        print(f"  {d.name:<7} {d.role:<10} {where}  past load: {'yes' if rss else 'NO'}  "
              f"RSS after load {rss / 2**30 if rss else 0:.2f} GiB  peak {d.peak_mem_bytes / 2**30:.2f} GiB  "
              f"status {d.status} {d.message or ''}")
    return len(loaded) == 4


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ok1 = asyncio.run(single(Path(tmp)))
        ok2 = asyncio.run(split(Path(tmp), args.steps, "pp"))
        ok3 = asyncio.run(split(Path(tmp), args.steps, "tp"))
    ok = ok1 and ok2 and ok3
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
