"""EdgeTrain DP next to the bare engine: the throughput ratio, with its spread.

Alternates, ``--reps`` times each:

* **bare**: ``torchrun --nproc-per-node N bench/bare_ddp.py`` (DDP, same model, same global
  batches and slices, AdamW, sync every ``--sync-every`` steps, one thread per rank), as a
  user writes it (torch's default AdamW, glibc's defaults);
* **bare tuned** (``--tuned``): the same with the two settings an EdgeTrain worker makes
  (fused AdamW, the worker's allocator thresholds), so that the ratio against it is the
  framework's own cost (``--no-tuned`` leaves it out);
* **EdgeTrain**: the ``edgetrain run`` path (``prepare_run`` + ``Launcher.run``) on a local
  testbed of N uncapped devices (no cgroups: the bare processes have none either), one
  thread each, over real SSH, with telemetry, heartbeats and the rendezvous gate, no
  checkpoints or evaluation.

Each run's figure is the median step period after the first step: from one step's end to
the next one's, so whatever a loop does between steps counts (EdgeTrain: the slowest
rank's ``period_s`` telemetry; bare: rank 0's, whose ranks meet at every sync).  Prints
each run, the medians and spreads, the ratio within each rep (runs minutes apart: less
exposed to the host's drift), and last the EdgeTrain/bare throughput ratios.

    .venv/bin/python bench/overhead.py [--model gpt2-s] [--batch-size 32] [--steps 6] [--reps 3] [--no-tuned]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.devices.inventory import load_inventory  # noqa: E402
from app.run.jobs import prepare_run  # noqa: E402
from app.testbed.local import Testbed  # noqa: E402
from workers.config import RunSettings  # noqa: E402
from workers.dist import free_port  # noqa: E402


def minor_faults(pid: int) -> int | None:
    """Minor page faults of process ``pid`` so far (``/proc/<pid>/stat``, field 10)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


def bare(args: argparse.Namespace, tuned: bool) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.devices}",
           f"--master-port={free_port()}", str(ROOT / "bench" / "bare_ddp.py"), "--model", args.model,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--sync-every", str(args.sync_every)]
    cmd += ["--tuned"] if tuned else []
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"bare DDP failed: {out.stderr[-2000:]}")
    got = json.loads(line)
    print(f"      bare rank 0: step CPU {got['median_step_cpu_s']:.4f} s, "
          f"{got['faults_per_step']:.0f} page faults per step", flush=True)
    return float(got["median_step_s"])


async def edgetrain(tb: Testbed, work: Path, args: argparse.Namespace) -> float:
    s = RunSettings(model=args.model, parallelism="dp", steps=args.steps, batch_size=args.batch_size, seq_len=32,
                    sync_every=args.sync_every, checkpoint_every=0, checkpoint_minutes=0, eval_every=0,
                    timeout_s=600, lr=5e-5)
    launcher, state = prepare_run(load_inventory(tb.inventory_path), None, s, work / "runs")
    # the controller's CPU while the devices train (after the steps the figures skip), apart
    # from its start-up: step records mark the window
    window: list[float] = []
    faults: dict[str, list[int]] = {}

    def mark(rec: dict) -> None:
        if rec.get("type") == "step" and rec.get("step") in (1, args.steps - 1):
            window.append(time.process_time())
            # the worker's minor page faults (a local testbed: its /proc is this host's)
            pid = state.devices[rec["device"]].pid
            if pid:
                faults.setdefault(rec["device"], []).append(minor_faults(pid))

    state.record.connect(mark)
    c0 = time.process_time()
    outcome = await launcher.run()
    # this process is the controller and the testbed's SSH servers: on a host whose cores
    # the devices share, its CPU is taken from the workers' (bare has neither)
    ctl_cpu = time.process_time() - c0
    if outcome != "done":
        raise RuntimeError(f"EdgeTrain run {outcome}: {[e.message for e in state.events][-3:]}")
    # the period end to end (step, telemetry, sampling, the control all-reduce) of the steps
    # after the first two, as bare_ddp.py
    periods = {d.name: statistics.median([p for p in d.periods[2:] if p is not None]) for d in state.devices.values()}
    # where a period goes: the step itself, and the loop between steps (data, telemetry,
    # sampling, the control all-reduce)
    for d in state.devices.values():
        between = [p - lat * args.batch_size for p, lat in zip(d.periods[2:], d.latencies[2:]) if p is not None]
        cpu = [c for c in d.cpu_times[2:] if c is not None]
        f = faults.get(d.name, [])
        per_step = f"{(f[-1] - f[0]) / (args.steps - 2):.0f}" if len(f) >= 2 and None not in f else "?"
        print(f"      {d.name}: period {periods[d.name]:.4f} s, between steps {statistics.median(between) * 1e3:.2f} ms, "
              f"step CPU {statistics.median(cpu):.4f} s, {per_step} page faults per step, "
              f"peak {d.peak_mem_bytes / 2**20:.0f} MiB", flush=True)
    steady = (window[-1] - window[1]) / (args.steps - 2) if len(window) >= 4 else float("nan")
    print(f"      controller + testbed SSH: {steady * 1e3:.1f} ms CPU per step while training "
          f"({ctl_cpu:.2f} s over the whole run, start-up included)", flush=True)
    return max(periods.values())


async def main_async(args: argparse.Namespace) -> None:
    names = ["bare", "bare-tuned", "edgetrain"] if args.tuned else ["bare", "edgetrain"]
    got: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        async with Testbed(Path(tmp) / "tb", n_devices=args.devices, port=0, base_addr="127.0.38.1",
                           threads=1, cgroups=False) as tb:
            for rep in range(args.reps):
                # alternate which goes first, so a drift in the host's load hits both alike
                order = names if rep % 2 == 0 else names[::-1]
                for name in order:
                    t = await edgetrain(tb, Path(tmp), args) if name == "edgetrain" else bare(args, name == "bare-tuned")
                    got[name].append(t)
                    print(f"  rep {rep + 1} {name:<9} {t:8.3f} s/step  {args.batch_size / t:7.2f} samples/s", flush=True)
    print(f"\n{args.model}, {args.devices} devices x 1 thread, batch {args.batch_size} x 32, sync every "
          f"{args.sync_every}, {args.steps} steps (median after the first), {args.reps} runs each, alternated")
    med = {}
    for name, ts in got.items():
        med[name] = statistics.median(ts)
        print(f"{name:<11} median {med[name]:.3f} s/step  (min {min(ts):.3f}, max {max(ts):.3f}; "
              f"spread {100 * (max(ts) - min(ts)) / med[name]:.0f}%)")
    # Each rep's runs follow one another within minutes, so the ratio within a rep is
    # less exposed to the host's slow drift than the ratio of medians over all reps.
    for name in names[:-1]:
        pairs = [b / e for b, e in zip(got[name], got["edgetrain"])]
        print(f"EdgeTrain/{name} within each rep: " + ", ".join(f"{r:.3f}" for r in pairs)
              + f"; median {statistics.median(pairs):.3f}")
    if args.tuned:
        print(f"EdgeTrain/bare tuned throughput (the framework's own cost): {med['bare-tuned'] / med['edgetrain']:.3f}")
    print(f"EdgeTrain/bare throughput: {med['bare'] / med['edgetrain']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sync-every", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tuned", action=argparse.BooleanOptionalAction, default=True,
                    help="also run bare DDP with EdgeTrain's fused AdamW and allocator settings")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
