"""What checkpoints cost: save and load seconds, bytes per device, overhead at the default interval.

For each parallelism (DP, PP) a short run on a local testbed (real SSH, real workers, one
workdir per device) writes a checkpoint every ``--every`` steps; a second run resumes from
the first run's last checkpoint.  From their telemetry:

* step seconds: median over the run's steps (the first, warm-up, left out);
* save seconds: the slowest rank's time for each checkpoint (the others wait for it),
  median over the run's checkpoints;
* load seconds: the slowest rank's ``resumed`` event;
* overhead at the default interval (``RunSettings.checkpoint_every`` steps) =
  save / (interval x step + save): the fraction of wall time spent checkpointing when
  training at that interval.  Measured saves, measured steps; the run itself is short.

Usage::

    .venv/bin/python bench/checkpoint.py [--model gpt2-s] [--steps 4] [--every 2] [--devices 2]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.devices.inventory import load_inventory  # noqa: E402
from app.devices.ssh import KnownHosts  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.run.resume import bring_home, load_past_run, resumed_settings  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402


def _stats(state, rank_steps=True) -> tuple[float, list[float], dict[str, int]]:
    recs = [r for r in _records(state) if r["type"] == "step"]
    by_step: dict[int, float] = {}
    for r in recs:
        by_step[r["step"]] = max(by_step.get(r["step"], 0.0), r["latency_s"])
    steps = [by_step[k] for k in sorted(by_step)][1:] or list(by_step.values())
    saves = [max(r["seconds"] or 0.0 for r in c["ranks"].values())
             for c in state.checkpoints.values() if c.get("complete")]
    per_dev: dict[str, int] = {}
    for c in state.checkpoints.values():
        for r in c["ranks"].values():
            per_dev[r["device"]] = max(per_dev.get(r["device"], 0), r["bytes"])
    return statistics.median(steps), saves, per_dev


def _records(state) -> list[dict]:
    import json
    return [json.loads(ln) for ln in (state.run_dir / "telemetry.jsonl").read_text().splitlines()]


async def one(tb: Testbed, runs: Path, args, parallelism: str) -> dict:
    inv = load_inventory(tb.inventory_path)
    s = RunSettings(model=args.model, parallelism=parallelism, steps=args.steps, batch_size=args.batch_size,
                    seq_len=args.seq_len, micro_batches=4, sync_every=1, checkpoint_every=args.every,
                    checkpoint_minutes=0, eval_every=0)
    launcher, state = prepare_run(inv, None, s, runs)
    outcome = await launcher.run()
    assert outcome == "done", state.events
    step_s, saves, per_dev = _stats(state)
    run = load_past_run(runs, state.run_id)
    found = await bring_home(run, KnownHosts(inv.known_hosts_file()))
    r = resumed_settings(run, found, steps=found.manifest.step + 1)
    launcher, resumed = prepare_run(inv, None, r, runs, resume=found)
    outcome = await launcher.run()
    assert outcome == "done", resumed.events
    loads = [rec["seconds"] for rec in _records(resumed) if rec.get("name") == "resumed"]
    return {"step_s": step_s, "save_s": statistics.median(saves), "load_s": max(loads),
            "bytes": per_dev, "n_saves": len(saves)}


async def main_async(args) -> None:
    interval = RunSettings().checkpoint_every
    with tempfile.TemporaryDirectory() as tmp:
        async with Testbed(Path(tmp) / "tb", n_devices=args.devices, port=0, base_addr="127.0.77.1") as tb:
            rows = {p: await one(tb, Path(tmp) / "runs", args, p) for p in ("dp", "pp")}
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len}, {args.devices} testbed devices, "
          f"{args.steps} steps, a checkpoint every {args.every} steps; default interval {interval} steps")
    print(f"{'par':<4} {'step s':>8} {'save s':>8} {'load s':>8} {'MiB/device':>22} "
          f"{'overhead @' + str(interval):>14}")
    for p, r in rows.items():
        over = r["save_s"] / (interval * r["step_s"] + r["save_s"])
        mib = "/".join(f"{b / 2**20:.0f}" for b in r["bytes"].values())
        print(f"{p:<4} {r['step_s']:>8.2f} {r['save_s']:>8.2f} {r['load_s']:>8.2f} {mib:>22} {over:>13.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=32)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
