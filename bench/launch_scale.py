"""How the launcher scales with the number of devices (the planner and GUI have their
own scale tests).  Starts N emulated devices, then times, over real SSH:

* connect to all (strict host-key checks) and push the worker code,
* a full tiny-gpt2 DP run of a few steps on all N (``--run``; N worker processes on this
  host's cores, so it measures the controller's overhead, not training speed).

    .venv/bin/python bench/launch_scale.py --devices 8 16 32 [--run]
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
from app.devices.remote import push_workers  # noqa: E402
from app.devices.ssh import KnownHosts, connect  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402


async def one(n: int, run: bool, tmp: Path) -> str:
    async with Testbed(tmp / f"tb{n}", n_devices=n, port=0, base_addr=f"127.0.{40 + n}.1", threads=1) as tb:
        inv = load_inventory(tb.inventory_path)
        known = KnownHosts(tb.known_hosts_path)
        t0 = time.perf_counter()
        conns = await asyncio.gather(*(connect(d, known) for d in inv.devices))
        t_conn = time.perf_counter() - t0
        await asyncio.gather(*(push_workers(c, d) for c, d in zip(conns, inv.devices)))
        t_push = time.perf_counter() - t0 - t_conn
        for c in conns:
            c.close()
        line = f"{n:>4} devices: connect {t_conn:6.2f} s   push workers {t_push:6.2f} s"
        if run:
            settings = RunSettings(model="tiny-gpt2", steps=3, batch_size=max(32, n), timeout_s=300)
            launcher, state = prepare_run(inv, None, settings, tmp / "runs")
            first: list[float] = []
            state.record.connect(lambda r: first.append(time.perf_counter()) if r["type"] == "step" and not first
                                 else None)
            t1 = time.perf_counter()
            outcome = await launcher.run()
            total = time.perf_counter() - t1
            ttfs = first[0] - t1 if first else float("nan")
            line += f"   run {outcome}: first step after {ttfs:6.1f} s, whole run {total:6.1f} s"
        return line


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--run", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            print(asyncio.run(one(n, args.run, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
