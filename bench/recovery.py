"""How fast training continues after a device is lost, next to restarting and relaunching.

On a local testbed of 4 devices (real SSH, real workers), a run is started, one worker
(rank 2) is killed (``kill -9``) once every rank has done ``--kill-at`` steps, and we time
from the kill to the first step the survivors complete, and count the steps lost, three ways:

* ``in place``: the survivors re-form their group and continue from memory (DP only);
* ``restart``: the survivors are restarted from the last checkpoint, re-planned
  (what EdgeTrain does where in-place recovery is impossible; torchrun's restart-all);
* ``relaunch``: a fresh run on the survivors from step 0 (no checkpoint).

Times come from the workers' telemetry (device clocks = this machine's clock).

Usage::

    .venv/bin/python bench/recovery.py [--model tiny-gpt2] [--parallelisms dp,pp,hybrid]
        [--steps 30] [--kill-at 6] [--every 4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.devices.inventory import load_inventory  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.run.supervise import run_supervised  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402


def _records(state) -> list[dict]:
    return [json.loads(ln) for ln in (state.run_dir / "telemetry.jsonl").read_text().splitlines()]


def _first_step_after(states, t: float) -> tuple[float, int] | None:
    """(time, iteration) of the first step record after ``t`` on any survivor."""
    steps = [(r["t"], r["step"]) for s in states for r in _records(s) if r["type"] == "step" and r["t"] > t]
    return min(steps) if steps else None


async def scenario(inv, runs: Path, s: RunSettings, mode: str, kill_at: int) -> dict:
    launcher, state = prepare_run(inv, None, s, runs)
    launcher.recovery.in_place = mode == "in place"
    states = [state]

    def follow(new_launcher, new_state) -> None:
        new_launcher.recovery.in_place = False
        states.append(new_state)

    task = asyncio.ensure_future(run_supervised(launcher, state, inv, runs, on_restart=follow)
                                 if mode != "relaunch" else launcher.run())
    while min(d.steps for d in state.devices.values()) < kill_at:
        await asyncio.sleep(0.005)
    reached = max(d.steps for d in state.devices.values())
    os.kill(state.devices["dev2"].pid, signal.SIGKILL)
    t_kill = time.time()
    result = await task
    if mode == "relaunch":
        survivors = [n for n in state.devices if n != "dev2"]
        s2 = s.settings()
        s2.stages = None
        launcher, fresh = prepare_run(inv, survivors, s2, runs)
        states.append(fresh)
        result = await launcher.run()
    outcome = result[0] if isinstance(result, tuple) else result
    after = t_kill
    if mode == "in place":  # a step in flight at the kill may still complete: count from the new group
        regrouped = [r["t"] for r in _records(state) if r.get("name") == "regrouped" and r["t"] > t_kill]
        after = min(regrouped) if regrouped else t_kill
    first = _first_step_after(states[-1:] if mode != "in place" else states, after)
    if first is None:
        return {"outcome": outcome, "seconds": None, "lost": None}
    return {"outcome": outcome, "seconds": first[0] - t_kill, "lost": max(0, reached - first[1])}


async def main_async(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        async with Testbed(Path(tmp) / "tb", n_devices=4, port=0, base_addr="127.0.78.1") as tb:
            inv = load_inventory(tb.inventory_path)
            for par in args.parallelisms.split(","):
                s = RunSettings(model=args.model, parallelism=par, steps=args.steps, batch_size=args.batch_size,
                                seq_len=32, sync_every=1, micro_batches=4, checkpoint_every=args.every,
                                checkpoint_minutes=0, eval_every=0)
                if par == "hybrid":
                    s.stages = [{"ranks": [0, 1], "layers": [0, 2]}, {"ranks": [2, 3], "layers": [2, 4]}]
                modes = (["in place"] if par == "dp" else []) + ["restart", "relaunch"]
                for mode in modes:
                    r = await scenario(inv, Path(tmp) / "runs", s, mode, args.kill_at)
                    rows.append((par, mode, r))
                    print(f"  {par:<7} {mode:<9} {r}", file=sys.stderr)
    print(f"{args.model}, batch {args.batch_size} x 32, 4 testbed devices, {args.steps} steps, "
          f"rank 2 killed after step {args.kill_at}, a checkpoint every {args.every} steps")
    print(f"{'par':<7} {'recovery':<9} {'outcome':<8} {'s to next step':>15} {'steps lost':>11} {'vs restart':>11}")
    for par, mode, r in rows:
        restart = next((x for p, m, x in rows if p == par and m == "restart"), None)
        ratio = (restart["seconds"] / r["seconds"]) if restart and restart["seconds"] and r["seconds"] else None
        sec = f"{r['seconds']:.2f}" if r["seconds"] is not None else "-"
        print(f"{par:<7} {mode:<9} {r['outcome']:<8} {sec:>15} {str(r['lost']):>11} "
              f"{(f'{ratio:.1f}x' if ratio else '-'):>11}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--parallelisms", default="dp,pp,hybrid")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", type=int, default=6)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
