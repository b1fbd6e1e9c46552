"""Predictions where users see them: the demo, ``edgetrain run`` and the GUI's preview.

Three consecutive rounds on this machine's testbed, each of:

* **demo**: ``edgetrain demo`` as README runs it (its own 2-device testbed; it profiles its
  devices when they have no profile yet, so round 1 measures and later rounds use the
  cache); the "plan predicted ... (measured ...)" line it prints;
* **run**: ``edgetrain run`` of ``--run-args`` on a testbed started with ``edgetrain
  testbed up``; the same line;
* **gui**: the control panel (offscreen) on a testbed of ``--gui-preset`` boards
  (``heterogeneous``: 2 x Jetson Nano, TX2, Xavier NX; cgroup memory and CPU caps as
  root), ``--gui-args`` settings, every device ticked: the preview's headline prediction (mean latency per
  sample over a sync period) against the measured latency per sample of the run launched
  from the window as its run view shows it (the run summary: the slowest device's median
  over the steps after the first, as the demo and run lines measure; until 2026-12-04 this
  case took the mean, which a second warm-up step moves: see ``bench/RESULTS.md``).

Every figure is latency per sample in steady state (the first step, which builds the
optimizer state and warms the allocator, is left out of both).  Prints each figure, its
error, the host's one-thread matmul rate before and after the case (this VM's speed
drifts by up to 2x within minutes), and last whether all nine are within +-20 %.

    .venv/bin/python bench/predictions.py [--rounds 3] [--cases demo,run,gui]

The GUI case also prints each stage's predicted step and compute time against its measured
step and CPU seconds per step.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EDGETRAIN = [sys.executable, "-m", "app.cli"]
LINE = re.compile(r"^plan predicted ([0-9.]+) ms/sample \(measured ([0-9.]+)", re.MULTILINE)


def cli(home: Path, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGETRAIN_HOME": str(home)}
    return subprocess.run([*EDGETRAIN, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def from_line(r: subprocess.CompletedProcess[str], what: str) -> tuple[float, float]:
    m = LINE.search(r.stdout)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return float(m[1]), float(m[2])


def gui_round(home: Path, inventory: Path, settings_args: list[str]) -> tuple[float, float]:
    """Open the window on ``inventory``, read the preview, run from the window, measure."""
    os.environ["EDGETRAIN_HOME"] = str(home)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    from app.cli.flags import add_settings_flags, settings_from_args
    from app.qt.qt_main import QtMainWindow
    from bench.screenshot_main import wait_until

    ap = argparse.ArgumentParser()
    add_settings_flags(ap)
    settings = settings_from_args(ap.parse_args(settings_args))
    app = QApplication.instance() or QApplication([])
    window = QtMainWindow(inventory=inventory, runs_dir=home / "runs")
    try:
        window.show()
        for name in window.devices_panel.model.names():
            window.toggle_participant(name, True)
        window.run_config.set_settings(settings)
        wait_until(app, lambda: False, 0.5)
        if not wait_until(app, lambda: window.planner.latest is not None and not window.planner.busy
                          and window.planner.latest.plan is not None, 60):
            raise RuntimeError("the preview did not come")
        predicted = window.planner.latest.total("latency_per_sample_s")
        window.launch()
        if not wait_until(app, lambda: window.run.state is not None and window.run.state.outcome is not None
                          and not window.run.running, 900):
            raise RuntimeError("the run from the window did not end")
        state = window.run.state
        if state.outcome != "done":
            raise RuntimeError(f"the run from the window: {state.outcome}")
        # what the window's run view shows (the run summary): the slowest device's median
        # over the steps after the first, as the demo and run lines measure it too
        measured = state.summary()["latency_per_sample_s"]
        means = [statistics.mean(d.latencies[1:] or d.latencies) for d in state.devices.values() if d.latencies]
        print(f"    measured: median {measured * 1e3:.1f} ms/sample (mean {max(means) * 1e3:.1f})", flush=True)
        print_stages(state, window.planner.latest, settings.batch_size)
        return predicted * 1e3, measured * 1e3
    finally:
        window.close()
        window.deleteLater()
        app.processEvents()


def print_stages(state, preview, batch: int) -> None:
    """Each stage's predicted step and compute seconds against its measured mean step
    (after the first) and CPU seconds per step, and its steps: where a gap is."""
    pred = {d.name: d for d in preview.devices}
    nan = float("nan")
    for d in sorted(state.devices.values(), key=lambda d: d.rank):
        p, cpu = pred.get(d.name), [c for c in d.cpu_times[1:] if c is not None]
        print(f"    {d.name:8} layers {getattr(p, 'layers', None)!s:9} step predicted "
              f"{p.step_s if p else nan:6.2f} s (compute {p.compute_s if p else nan:5.2f}) "
              f"measured {statistics.mean(d.latencies[1:] or d.latencies) * batch:6.2f} s, "
              f"cpu {statistics.mean(cpu) if cpu else nan:5.2f} s; steps "
              f"{' '.join(f'{x * batch:.1f}' for x in d.latencies)}", flush=True)


def host_gflops() -> float:
    """This host's one-thread matmul rate now (best of three 0.2 s windows, as a profile
    measures it): printed before and after each case, so the host's own drift during a
    case stands next to the prediction's error."""
    import torch

    from workers.probe import matmul_gflops
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return max(matmul_gflops("float32", "cpu", 0.2) or 0.0 for _ in range(3))
    finally:
        torch.set_num_threads(before)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--run-args", default="--model tiny-gpt2 --parallelism pp --steps 20 --micro-batches 4",
                    help="settings of the edgetrain run case")
    ap.add_argument("--gui-args", default="--model gpt2-s --parallelism pp --steps 8 --batch-size 16 "
                                          "--micro-batches 4", help="settings of the GUI case")
    ap.add_argument("--gui-preset", default="heterogeneous", help="testbed preset of the GUI case")
    ap.add_argument("--cases", default="demo,run,gui", help="which of demo, run, gui to measure")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    home = Path(tempfile.mkdtemp(prefix="edgetrain-predictions-"))
    tb = home / "tb"
    base = "127.0.52.1"
    up = cli(home, "testbed", "up", "--devices", str(args.devices), "--dir", str(tb), "--base-addr", base)
    gui_tb = home / "tb-gui"
    up_gui = cli(home, "testbed", "up", "--preset", args.gui_preset, "--dir", str(gui_tb), "--base-addr", "127.0.54.1")
    if up.returncode != 0 or up_gui.returncode != 0:
        print(up.stdout + up.stderr + up_gui.stdout + up_gui.stderr, file=sys.stderr)
        cli(home, "testbed", "down", "--dir", str(tb))
        cli(home, "testbed", "down", "--dir", str(gui_tb))
        return 2
    # the GUI measures the boards of a testbed it starts itself; this one was started from
    # the command line, so measure them as the window's Re-profile would
    cli(home, "profile", "--inventory", str(gui_tb / "inventory.yaml"))
    rows: list[tuple[int, str, float, float]] = []
    try:
        for rnd in range(1, args.rounds + 1):
            t0 = time.monotonic()
            speeds = [host_gflops()]
            done = len(rows)
            if "demo" in cases:
                demo = cli(home, "demo", "--base-addr", "127.0.53.1", "--port", "2222", "--no-export")
                rows.append((rnd, "demo", *from_line(demo, "demo")))
                speeds.append(host_gflops())
            if "run" in cases:
                run = cli(home, "run", "--inventory", str(tb / "inventory.yaml"), "--no-export",
                          *shlex.split(args.run_args))
                rows.append((rnd, "run", *from_line(run, "edgetrain run")))
                speeds.append(host_gflops())
            if "gui" in cases:
                rows.append((rnd, "gui", *gui_round(home, gui_tb / "inventory.yaml", shlex.split(args.gui_args))))
                speeds.append(host_gflops())
            for i, r in enumerate(rows[done:]):
                print(f"round {r[0]}  {r[1]:<5} predicted {r[2]:8.3f} ms/sample  measured {r[3]:8.3f}  "
                      f"{(r[3] - r[2]) / r[2]:+6.0%}   host {speeds[i]:4.0f} -> {speeds[i + 1]:4.0f} GFLOP/s",
                      flush=True)
            print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        cli(home, "testbed", "down", "--dir", str(tb))
        cli(home, "testbed", "down", "--dir", str(gui_tb))
        # every round leaves its runs' checkpoints (a gpt2-s one is ~1.4 GiB): ~10 GB a bench
        shutil.rmtree(home, ignore_errors=True)
    print(f"\ndemo: tiny-gpt2 dp (its defaults); run: {args.run_args} on {args.devices} testbed devices; "
          f"gui: {args.gui_args} on the {args.gui_preset} preset")
    worst = max(abs(m - p) / p for _, _, p, m in rows)
    errs = ", ".join(f"{(m - p) / p:+.0%}" for _, _, p, m in rows)
    print(f"errors (measured vs predicted): {errs}")
    print(f"all {len(rows)} within +-20%: {'yes' if worst <= 0.20 else 'no'} (worst {worst:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
