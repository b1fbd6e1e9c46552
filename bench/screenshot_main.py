"""Screenshot of the control panel mid-run on a local testbed (docs/screenshot-main.png).

With ``--drill``: a DP run in which one device's worker is killed from the failure drill,
grabbed once the survivors train again, with the Recovery tab showing the timeline
(docs/screenshot-recovery.png).

Starts an in-process testbed (heterogeneous boards, one with a small memory cap), opens
the main window, ticks the devices, picks pipeline parallelism, launches a run, waits
until the charts hold points (and a few held-out evaluations: the loss and accuracy
plots), and grabs the window.

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1400x900x24" \\
        .venv/bin/python bench/screenshot_main.py --out docs/screenshot-main.png
    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1400x900x24" \\
        .venv/bin/python bench/screenshot_main.py --drill --out docs/screenshot-recovery.png

With ``--empty``: no testbed, no inventory: the first run's empty devices panel
(docs/screenshot-first-run.png).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@contextlib.contextmanager
def window_on_testbed(presets: list[str], home: Path, profile: bool = True):
    """A control panel over a fresh in-process testbed of ``presets`` (every device ticked):
    yields ``(app, window)``; closes the window and stops the testbed after.  With
    ``profile`` the devices are profiled first (as the window does for a testbed it starts):
    the profile columns, measured links and predictions from this host's speed."""
    from PySide6.QtWidgets import QApplication

    from app.qt.qt_main import QtMainWindow
    from app.qt.qt_style import apply_app_style
    from app.testbed.local import Testbed
    from app.workspace.loop import AsyncLoop

    app = QApplication.instance() or QApplication([])
    apply_app_style(app)
    tb_loop = AsyncLoop("testbed").start()
    base = f"127.{random.randint(40, 250)}.{random.randint(0, 250)}.1"
    tb = Testbed(home / "testbed", n_devices=len(presets), port=0, base_addr=base, device_presets=presets)
    tb_loop.submit(tb.start()).result(30)
    window = None
    try:
        window = QtMainWindow(inventory=tb.inventory_path, runs_dir=home / "runs")
        window.show()
        names = [d.name for d in tb.devices]
        for n in names:
            window.toggle_participant(n, True)
        if profile:
            window.device_actions.reprofile(names)
            if not wait_until(app, lambda: len(window.workspace.profiles) == len(names) and window.workspace.link_mbps, 120):
                print("profiling did not finish in time", file=sys.stderr)
        yield app, window
    finally:
        if window is not None:
            window.close()
            window.deleteLater()
            app.processEvents()
        tb_loop.submit(tb.stop()).result(30)
        tb_loop.stop()


def wait_until(app, pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        app.processEvents()
        if pred():
            return True
        time.sleep(0.02)
    return False


def shoot_empty(out: Path, home: Path) -> int:
    """The window as a first run opens it: no devices, the empty state's hint and buttons."""
    from PySide6.QtWidgets import QApplication

    from app.qt.qt_main import QtMainWindow
    from app.qt.qt_style import apply_app_style

    app = QApplication.instance() or QApplication([])
    apply_app_style(app)
    window = QtMainWindow(runs_dir=home / "runs")
    window.show()
    wait_until(app, lambda: False, 1.5)  # layout, the first (empty) plan preview
    out.parent.mkdir(parents=True, exist_ok=True)
    window.grab().save(str(out))
    print(f"saved {out} ({window.width()}x{window.height()})")
    window.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/screenshot-main.png")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--points", type=int, default=60, help="latency points to wait for before the grab")
    ap.add_argument("--evals", type=int, default=4, help="held-out evaluations to wait for before the grab")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    ap.add_argument("--drill", action="store_true", help="DP; kill the third device mid-run; show the recovery")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip profiling the devices")
    ap.add_argument("--empty", action="store_true", help="no testbed, no devices: the first run's window")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="edgetrain-shot-"))
    atexit.register(shutil.rmtree, home, True)  # the runs it shows leave checkpoints (GBs)
    os.environ["EDGETRAIN_HOME"] = str(home)
    if args.empty:
        return shoot_empty(Path(args.out), home)

    from workers.config import RunSettings

    presets = ["laptop", "jetson-nx", "jetson-tx2", "jetson-nano"][: args.devices]
    with window_on_testbed(presets, home, profile=args.profile) as (app, window):
        names = list(window.workspace.topology.participants)
        window.run_config.set_settings(RunSettings(model="tiny-gpt2", parallelism="dp" if args.drill else "pp",
                                                   steps=args.steps, sync_every=1,
                                                   batch_size=64, seq_len=32, micro_batches=4,
                                                   eval_every=args.eval_every))
        wait_until(app, lambda: window.planner.latest is not None and not window.planner.busy, 10)
        # one drag-equivalent reorder, so the canvas shows a user-chosen order
        window.move_node(names[-1], len(names) - 1, 1)
        wait_until(app, lambda: not window.planner.busy, 10)
        window.launch()
        ok = wait_until(app, lambda: window.charts.point_count("latency") >= args.points
                        and window.charts.point_count("energy") > 0
                        and window.charts.point_count("accuracy") >= args.evals, 240)
        if not ok:
            print("no live points in time; the screenshot shows what there is", file=sys.stderr)
        if args.drill:
            from app.workspace.drill import Fault
            window.drill.drill(names[2], Fault.KILL)
            if not wait_until(app, lambda: any(p == "resumed" for _, p, _ in window.timeline.phases()), 60):
                print("the run did not resume in time", file=sys.stderr)
            n = window.charts.point_count("latency")
            wait_until(app, lambda: window.charts.point_count("latency") >= n + 30, 60)
            window.bottom_tabs.setCurrentWidget(window.timeline)
        wait_until(app, lambda: False, 1.0)  # a few chart frames
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        window.grab().save(str(out))
        print(f"saved {out} ({window.width()}x{window.height()}, "
              f"{window.charts.point_count('latency')} latency points, "
              f"{window.charts.point_count('accuracy')} accuracy points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
