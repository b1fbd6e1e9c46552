"""How good are the planner's predictions?  Real runs of the workers, predicted first.

Three parts:

* accuracy (default): for each model x parallelism, plan on emulated devices (no memory
  cap, one thread each), run it, and compare predicted with measured latency per sample
  (the run summary's statistic: median over the steps after the first, slowest device)
  and peak RSS per device.  Prints the errors and their medians.
* ``--oom``: cells (model, parallelism, device presets, memory caps) on capped testbeds:
  the planner's OOM flag against what happened when the run was forced.
* ``--timing``: planner speed, 64 devices x 36 blocks x every parallelism.

Launchers: by default the local testbed (``app.testbed.local.start_testbed``) and the
same path as ``edgetrain run`` (``jobs.prepare_run`` with the plan, so the run record
holds the predictions next to the measured values, then ``Launcher.run``).
``--direct`` starts the same worker command (``python -m workers.train``, same JobConfig,
same emulation environment and ``RLIMIT_AS`` cap) as local processes without SSH, for
hosts without asyncssh; the record is written the same way.

The device specs are what ``edgetrain plan`` uses for testbed devices (their preset,
sharing the host's cores) with the host's per-thread matmul rate measured just before
each cell (``workers.probe.matmul_gflops`` on one thread, as ``edgetrain profile``
does), so load from other processes on a shared host is in the prediction's input.

    .venv/bin/python bench/plan_accuracy.py                       # ~10 min
    .venv/bin/python bench/plan_accuracy.py --models tiny-gpt2 --parallelisms dp
    .venv/bin/python bench/plan_accuracy.py --oom
    .venv/bin/python bench/plan_accuracy.py --timing
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.planner.costmodel import GIB, DeviceSpec  # noqa: E402
from app.planner.inputs import TESTBED_LINK  # noqa: E402
from app.planner.links import Links  # noqa: E402
from app.planner.plan import Plan, compare, make_plan  # noqa: E402
from workers.config import RunSettings  # noqa: E402
from workers.dist import free_port  # noqa: E402

PARALLELISMS = ("dp", "sp", "tp", "pp", "hybrid")
DEVICES = {"dp": 2, "sp": 2, "tp": 2, "pp": 2, "hybrid": 4}
# tiny presets at the paper's batch; small ones at a batch that keeps 4 ranks in RAM
TINY = {"batch_size": 128, "steps": 8}
SMALL = {"batch_size": 32, "steps": 4}
MODELS = {"tiny-gpt2": TINY, "tiny-bert": TINY, "tiny-opt": TINY, "distilbert": SMALL, "gpt2-s": SMALL}
# (model, parallelism, device presets, memory cap per device or None for the presets', batch)
OOM_CELLS = [
    ("tiny-gpt2", "dp", ["jetson-nano"] * 2, None, 128),
    ("tiny-gpt2", "pp", ["jetson-nano"] * 2, None, 128),
    ("tiny-gpt2", "dp", ["jetson-nano"] * 2, "1.5G", 128),
    ("tiny-gpt2", "dp", ["jetson-nano"] * 2, "0.95G", 128),
    ("tiny-gpt2", "tp", ["jetson-nano"] * 2, "0.95G", 128),
    ("gpt2-s", "dp", ["jetson-nano"] * 2, None, 128),
    ("gpt2-s", "pp", ["jetson-nano"] * 2, None, 16),
    ("gpt2-s", "dp", ["jetson-nano"] * 2, None, 8),
    ("gpt2-s", "tp", ["jetson-nano"] * 2, "2.5G", 8),
    ("distilbert", "dp", ["jetson-nano"] * 2, "2G", 8),
    ("distilbert", "dp", ["jetson-nano"] * 2, "3G", 8),
    ("gpt2-l", "pp", ["jetson-nano", "jetson-nano", "jetson-tx2", "jetson-nx"], None, 8),
    # near the line for physical memory (cgroup caps), where the cells above are far from it
    ("tiny-gpt2", "dp", ["jetson-nano"] * 2, "0.4G", 128),
    ("tiny-gpt2", "dp", ["jetson-nano"] * 2, "0.6G", 128),
    ("distilbert", "dp", ["jetson-nano"] * 2, "1.2G", 8),
    ("gpt2-s", "pp", ["jetson-nano"] * 2, "1.5G", 16),
]


# --------------------------------------------------------------------------- inputs


def host_gflops_per_thread() -> float:
    """One-thread fp32 matmul rate now (the probe's own method, in a fresh process; the
    best of three: a single short measurement was 40 % low once on an idle host)."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from workers.probe import matmul_gflops\n"
            "print(max(matmul_gflops('float32', 'cpu', 0.3) for _ in range(3)))")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class _Unlimited:
    """``app.testbed.emulation``'s ``unlimited`` preset, for hosts where that module cannot
    be imported (it serves SSH: asyncssh)."""

    name: str = "unlimited"
    mem_bytes: int | None = None
    threads: int | None = None
    p_idle_w: float = 0.0
    p_max_w: float = 0.0


@dataclass(frozen=True)
class _Emu:
    name: str
    preset: Any
    mem_bytes: int | None
    threads: int


def emulated(presets: list[str], caps: str | None, threads: int = 1) -> list[Any]:
    """``app.testbed.emulation.DeviceSpec`` per device (names dev0, nano0, ... as the testbed)."""
    try:
        from app.testbed.emulation import plan_devices
    except ImportError:
        if set(presets) != {"unlimited"} or caps:
            raise
        return [_Emu(f"dev{i}", _Unlimited(), None, threads) for i in range(len(presets))]
    return plan_devices(device_presets=presets, mem_overrides=caps, threads=threads)


def _emulation_env(e: Any) -> tuple[dict[str, str], Any]:
    """Environment and preexec of a device (``app.testbed.emulation`` where importable)."""
    try:
        from app.testbed.emulation import emulation_env, make_preexec
        return emulation_env(e), make_preexec(e.mem_bytes)
    except ImportError:
        t = str(e.threads)
        # no power figures: the worker's meter falls back to its generic ones
        return {"EDGETRAIN_EMU_PRESET": e.preset.name, "EDGETRAIN_EMU_MEM_BYTES": "0", "EDGETRAIN_EMU_THREADS": t,
                "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t}, None


def physical_caps(direct: bool) -> bool:
    """Whether a capped testbed device's cap is physical memory (a cgroup limit: as root
    with writable controllers) rather than address space (``RLIMIT_AS``, and always for
    ``--direct``, which starts processes under ``RLIMIT_AS`` only)."""
    if direct:
        return False
    try:
        from app.testbed.cgroups import unavailable_reason
    except ImportError:
        return False
    return unavailable_reason() is None


def planner_specs(emu: list[Any], gflops: float, n_cpus: int, physical: bool = False) -> list[DeviceSpec]:
    """What ``plan_inputs.specs_for_devices`` gives for these testbed devices (memory only:
    the CPU quota of a cgroup testbed slows every cell alike and is not what this bench is for)."""
    from app.planner.costmodel import spec_from_preset
    specs = [spec_from_preset(e.name, e.preset, threads=e.threads, gflops_per_thread=gflops) for e in emu]
    for s, e in zip(specs, emu):
        s.mem_bytes, s.mem_is_virtual = e.mem_bytes, e.mem_bytes is not None and not physical
    busy = sum(s.threads for s in specs)
    if busy > n_cpus:  # devices on one host share its cores
        for s in specs:
            s.gflops *= n_cpus / busy
    return specs


# --------------------------------------------------------------------------- launchers




def launch_direct(emu: list[Any], cfg: dict, plan: Plan, runs_dir: Path) -> Any:
    """Start every rank as a local ``python -m workers.train`` under its emulation."""
    from app.run.runstate import RunState
    from app.run.telemetry import TelemetryParser
    from workers.config import JobConfig

    names = [e.name for e in emu]
    run_id = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()
    job = JobConfig(run_id=run_id, world_size=len(emu), master_addr="127.0.0.1", master_port=free_port(),
                    addrs=["127.0.0.1"] * len(emu), devices=names, **cfg)
    job.validate()
    state = RunState(run_id, names, {"job": job.__dict__}, run_dir=runs_dir / run_id, plan=plan.to_dict())
    parser, lock = TelemetryParser(), threading.Lock()
    procs = []
    for rank, e in enumerate(emu):
        emu_env, preexec = _emulation_env(e)
        env = dict(os.environ, PYTHONPATH=str(ROOT), **emu_env)
        err = open(state.run_dir / f"stderr-{e.name}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "workers.train", "--rank", str(rank),
                                       "--config-b64", job.to_b64()], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=err, preexec_fn=preexec))
        err.close()

    def pump(name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            rec = parser.feed(name, line)
            if rec is not None:
                with lock:
                    state.feed(rec)

    threads = [threading.Thread(target=pump, args=(n, p), daemon=True) for n, p in zip(names, procs)]
    for t in threads:
        t.start()
    first_fail = None
    while any(p.poll() is None for p in procs):
        if first_fail is None and any(p.poll() not in (None, 0) for p in procs):
            first_fail = time.monotonic()
        if first_fail is not None and time.monotonic() - first_fail > 15:
            for p in procs:  # a peer of a dead rank fails fast; this is for stragglers
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=5)
    statuses = [d.status for d in state.devices.values()]
    outcome = "oom" if "oom" in statuses else "done" if all(s == "done" for s in statuses) else "failed"
    state.finish(outcome)
    return state


def launch_testbed(emu_presets: list[str], caps: str | None, settings: Any, plan: Plan, work: Path,
                   tag: str, base_addr: str) -> Any:
    """The ``edgetrain run`` path on a fresh local testbed with these devices."""
    from app.run.jobs import prepare_run
    from app.testbed import daemon as testbed

    tb_dir = work / f"testbed-{tag}"
    info = testbed.start_testbed(tb_dir, device_presets=emu_presets, mem_overrides=caps, threads=1,
                                 base_addr=base_addr, port=0)
    try:
        from app.devices.inventory import load_inventory
        inv = load_inventory(info.inventory_path)
        launcher, state = prepare_run(inv, [d.name for d in info.devices], settings, work / "runs",
                                      plan=plan.to_dict())
        try:
            asyncio.run(launcher.run())
        except Exception as exc:  # noqa: BLE001 - report the cell and go on
            state.add_event(None, "error", f"launcher: {exc}")
            state.finish("failed")
        return state
    finally:
        testbed.stop_testbed(tb_dir)


# --------------------------------------------------------------------------- one cell


def run_cell(model: str, par: str, presets: list[str], caps: str | None, batch: int, steps: int,
             args: argparse.Namespace, work: Path, sync_every: int = 5) -> dict:
    gflops = args.gflops or host_gflops_per_thread()
    emu = emulated(presets, caps)
    n_cpus = os.cpu_count() or 1
    physical = physical_caps(args.direct)
    specs = planner_specs(emu, gflops, n_cpus, physical)
    links = Links(**TESTBED_LINK)
    cfg = dict(model=model, parallelism=par, batch_size=batch, seq_len=32, micro_batches=4,
               sync_every=sync_every, steps=steps, timeout_s=120.0)
    plan = make_plan(model, par, specs, links, RunSettings(**cfg), propose=False)
    cfg["stages"] = plan.stages
    t0 = time.monotonic()
    if args.direct:
        state = launch_direct(emu, cfg, plan, work / "runs")
    else:
        settings = RunSettings(**{k: v for k, v in cfg.items() if k != "stages"}, stages=plan.stages or None)
        state = launch_testbed(presets, caps, settings, plan, work, f"{model}-{par}", args.base_addr)
    devs = state.devices
    med = {n: statistics.median(d.latencies[1:] or d.latencies) for n, d in devs.items() if d.latencies}
    mean = {n: statistics.mean(d.latencies[1:] or d.latencies) for n, d in devs.items() if d.latencies}
    return {
        "model": model, "parallelism": par, "presets": presets, "caps": caps or "preset", "batch_size": batch,
        "steps": steps, "outcome": state.outcome, "cap_kind": "cgroup" if physical else "address-space",
        "wall_s": time.monotonic() - t0, "gflops_per_thread": gflops,
        "run_dir": str(state.run_dir), "stages": plan.stages, "explanation": plan.explanation,
        "pred_latency_per_sample_s": plan.totals.get("median_latency_per_sample_s"),
        "meas_latency_per_sample_s": max(med.values()) if med else None,
        "pred_mean_latency_per_sample_s": plan.totals.get("latency_per_sample_s"),
        "meas_mean_latency_per_sample_s": max(mean.values()) if mean else None,
        "pred_energy_per_sample_j": plan.totals.get("energy_per_sample_j"),
        "meas_energy_per_sample_j": state.summary().get("energy_per_sample_j"),
        "pred_oom": plan.oom, "meas_oom": any(d.status == "oom" for d in devs.values()),
        "oom_devices": [n for n, d in devs.items() if d.status == "oom"],
        "oom_messages": [e.message for e in state.events if e.kind == "oom"][:4],
        "oom_phases": {n: (d.message or "").replace("out of memory during ", "").split(" ")[0]
                       for n, d in devs.items() if d.status == "oom"},
        "memory": [{"device": p.name, "role": p.role, "pred_peak_rss": p.peak_rss_bytes,
                    "pred_peak_virtual": p.peak_virtual_bytes, "limit": p.limit_bytes, "margin": p.margin,
                    "oom": p.oom, "oom_phase": p.oom_phase, "meas_peak_rss": devs[p.name].peak_mem_bytes}
                   for p in plan.predictions],
    }


def _err(pred: float | None, meas: float | None) -> float | None:
    if not pred or not meas:
        return None
    return pred / meas - 1


def _pct(e: float | None) -> str:
    return "-" if e is None else f"{100 * e:+.0f}%"


# --------------------------------------------------------------------------- modes


def accuracy(args: argparse.Namespace, work: Path) -> list[dict]:
    results = []
    for model in args.models:
        cfg = MODELS.get(model, SMALL)
        for par in args.parallelisms:
            res = run_cell(model, par, ["unlimited"] * DEVICES[par], None, args.batch_size or cfg["batch_size"],
                           args.steps or cfg["steps"], args, work)
            results.append(res)
            lat = (f"lat {res['pred_latency_per_sample_s'] * 1e3:.3f}/"
                   f"{(res['meas_latency_per_sample_s'] or 0) * 1e3:.3f} ms "
                   f"({_pct(_err(res['pred_latency_per_sample_s'], res['meas_latency_per_sample_s']))})")
            mem = "  ".join(f"{m['device']} {m['pred_peak_rss'] / 2**20:.0f}/{m['meas_peak_rss'] / 2**20:.0f}M "
                            f"({_pct(_err(m['pred_peak_rss'], m['meas_peak_rss']))})" for m in res["memory"])
            print(f"{model:<11} {par:<6} {res['outcome'] or '-':<6} {res['gflops_per_thread']:4.0f}GF  {lat}  "
                  f"mem pred/meas {mem}", flush=True)
    lat = [abs(e) for r in results if r["outcome"] == "done"
           for e in [_err(r["pred_latency_per_sample_s"], r["meas_latency_per_sample_s"])] if e is not None]
    mem = [abs(e) for r in results if r["outcome"] == "done" for m in r["memory"]
           for e in [_err(m["pred_peak_rss"], m["meas_peak_rss"])] if e is not None]
    print(f"\ncells done: {sum(r['outcome'] == 'done' for r in results)}/{len(results)}")
    if lat:
        print(f"latency/sample: median |error| {100 * statistics.median(lat):.1f}% "
              f"(max {100 * max(lat):.0f}%, {len(lat)} cells)")
    if mem:
        print(f"peak memory:    median |error| {100 * statistics.median(mem):.1f}% "
              f"(max {100 * max(mem):.0f}%, {len(mem)} devices)")
    return results


def oom_check(args: argparse.Namespace, work: Path) -> list[dict]:
    results = []
    for model, par, presets, cap, batch in OOM_CELLS:
        if args.models and model not in args.models:
            continue
        res = run_cell(model, par, presets, cap, batch, 2, args, work, sync_every=1)
        results.append(res)
        margins = ", ".join(f"{m['device']} {100 * m['margin']:+.0f}%" for m in res["memory"]
                            if m["margin"] is not None)
        pred_ph = {m["device"]: m["oom_phase"] for m in res["memory"] if m["oom"]}
        phases = "; ".join(f"{d}: {pred_ph.get(d, '-')}/{ph}" for d, ph in res["oom_phases"].items())
        mem = " ".join(f"{m['device']} {m['pred_peak_rss'] / 2**20:.0f}/{m['meas_peak_rss'] / 2**20:.0f}M"
                       f"({_pct(_err(m['pred_peak_rss'], m['meas_peak_rss']))})" for m in res["memory"]
                       if res["outcome"] == "done")
        print(f"{model:<10} {par:<6} b{batch:<4} caps {res['caps']:<7} {res['cap_kind']:<13} predicted "
              f"{'OOM' if res['pred_oom'] else 'safe':<4} ran {res['outcome'] or '-':<7} "
              f"{'MATCH' if res['pred_oom'] == res['meas_oom'] else 'MISMATCH'}  margins {margins}"
              + (f"  phase pred/ran {phases}" if phases else "") + (f"  rss pred/meas {mem}" if mem else ""),
              flush=True)
    agree = sum(r["pred_oom"] == r["meas_oom"] for r in results)
    print(f"\nOOM prediction matched {agree}/{len(results)} cells")
    errs = [abs(e) for r in results if r["outcome"] == "done" for m in r["memory"]
            for e in [_err(m["pred_peak_rss"], m["meas_peak_rss"])] if e is not None]
    if errs:
        print(f"peak memory (RSS) on the cells that ran: median |error| {100 * statistics.median(errs):.1f}% "
              f"(max {100 * max(errs):.0f}%, {len(errs)} devices)")
    return results


def timing() -> None:
    specs = [DeviceSpec(f"d{i}", 100.0 + 10 * (i % 7), (4 + 4 * (i % 3)) * GIB, threads=1,
                        mem_is_virtual=True) for i in range(64)]
    for model in ("gpt2-l", "gpt2-s"):
        t0 = time.perf_counter()
        cmp = compare(model, specs, Links(), RunSettings(model=model, batch_size=128))
        print(f"compare({model}, 64 devices, {len(cmp.plans)} parallelisms): "
              f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
    t0 = time.perf_counter()
    for _ in range(10):
        make_plan("gpt2-s", "pp", specs[:4], Links(), RunSettings(model="gpt2-s", batch_size=128))
    print(f"make_plan(gpt2-s, pp, 4 devices, with order search): {(time.perf_counter() - t0) * 100:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--parallelisms", nargs="+", default=list(PARALLELISMS), choices=PARALLELISMS)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--gflops", type=float, default=None, help="host GFLOP/s per thread (default: measure)")
    ap.add_argument("--direct", action="store_true", help="local worker processes instead of the SSH testbed")
    ap.add_argument("--oom", action="store_true", help="check OOM predictions on capped testbeds")
    ap.add_argument("--timing", action="store_true", help="planner speed only")
    ap.add_argument("--base-addr", default="127.0.17.1")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the runs, their records and checkpoints")
    args = ap.parse_args()
    if args.timing:
        timing()
        return
    work = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    os.environ["EDGETRAIN_HOME"] = str(work)
    if args.oom:
        results = oom_check(args, work)
    else:
        args.models = args.models or list(MODELS)
        results = accuracy(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.keep:
        print(f"runs and records: {work}")
    else:
        # the runs' checkpoints and exported models take GBs (15 GB for the default set)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
