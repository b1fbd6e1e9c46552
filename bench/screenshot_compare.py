"""Screenshot of two past runs compared from the history (docs/screenshot-compare.png).

Starts an in-process testbed of emulated boards (a Jetson NX and a TX2 by default), opens
the main window, ticks the devices, runs tiny-gpt2 once per parallelism (DP, then a
two-stage pipeline by default) from the window, then selects both runs in the History tab,
presses Compare and grabs the comparison window.

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1400x900x24" \\
        .venv/bin/python bench/screenshot_compare.py --out docs/screenshot-compare.png
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.screenshot_main import wait_until, window_on_testbed  # noqa: E402  (one event-pumping wait for the scripts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/screenshot-compare.png")
    ap.add_argument("--presets", default="jetson-nx,jetson-tx2", help="one board preset per device (app/boards.py)")
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--parallelisms", default="dp,pp", help="one run per parallelism, compared")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for each run")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="edgetrain-shot-"))
    atexit.register(shutil.rmtree, home, True)  # the runs it shows leave checkpoints (GBs)
    os.environ["EDGETRAIN_HOME"] = str(home)

    from workers.config import RunSettings
    presets = [p for p in args.presets.split(",") if p]
    with window_on_testbed(presets, home) as (app, window):
        t0 = time.monotonic()
        run_ids = []
        for par in args.parallelisms.split(","):
            window.run_config.set_settings(RunSettings(model=args.model, parallelism=par, steps=args.steps,
                                                       batch_size=args.batch_size, seq_len=32, micro_batches=4,
                                                       sync_every=1, eval_every=args.eval_every))
            wait_until(app, lambda: not window.planner.busy, 10)
            window.summary.clear()
            window.launch()
            if not window.run.running:
                print(f"the {par} run did not start", file=sys.stderr)
                return 1
            wait_until(app, lambda: window.summary.summary is not None, args.timeout)
            s = window.summary.summary
            if s is None:
                print(f"the {par} run did not finish in time; stopping it", file=sys.stderr)
                window.stop_run()
                wait_until(app, lambda: window.summary.summary is not None, 120)
                s = window.summary.summary or {}
            run_ids.append(s.get("run_id"))
            print(f"{time.monotonic() - t0:6.0f} s  {par}: run {s.get('run_id')} {s.get('outcome')}", file=sys.stderr)
        window.history.refresh()
        window.bottom_tabs.setCurrentWidget(window.history)
        window.history.select(run_ids)
        window.history.compare_button.click()
        if not window.history_actions.compare_views:
            print("no comparison window", file=sys.stderr)
            return 1
        view = window.history_actions.compare_views[-1]
        view.resize(1360, 860)
        view.show()
        view.raise_()
        wait_until(app, lambda: False, 1.5)   # laid out and painted
        view.table.setCurrentItem(None)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        view.grab().save(str(out))
        for r in range(view.table.rowCount()):
            cells = [view.table.item(r, c).text() for c in range(view.table.columnCount())]
            print(f"  {view.table.verticalHeaderItem(r).text():42s} " + " | ".join(cells), file=sys.stderr)
        print(f"saved {out} ({view.width()}x{view.height()}) after {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
