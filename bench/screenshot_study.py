"""Screenshot of the Study window after a study on a local testbed (docs/screenshot-study.png).

Starts an in-process testbed of emulated boards (a Jetson Nano and a TX2 by default, each
with its board's memory cap; ``--presets`` for the paper's four), opens the main window,
ticks the devices, opens *Run → Study…*, runs the chosen models × parallelisms, waits for
the last cell, and grabs the Study window.  ``--figure`` also copies the study's SVG figure
(docs/study-figure.svg).

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1400x900x24" \\
        .venv/bin/python bench/screenshot_study.py --out docs/screenshot-study.png \\
        --figure docs/study-figure.svg
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

from bench.screenshot_main import wait_until, window_on_testbed  # noqa: E402  (one event-pumping wait for both scripts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/screenshot-study.png")
    ap.add_argument("--figure", help="also copy the study's figure.svg here")
    ap.add_argument("--presets", default="jetson-nano,jetson-tx2",
                    help="one board preset per device (app/boards.py)")
    ap.add_argument("--models", default="tiny-bert,tiny-gpt2")
    ap.add_argument("--parallelisms", default="dp,sp,tp,pp")
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip the one-device baseline")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the study")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="edgetrain-shot-"))
    atexit.register(shutil.rmtree, home, True)  # the runs it shows leave checkpoints (GBs)
    os.environ["EDGETRAIN_HOME"] = str(home)

    presets = [p for p in args.presets.split(",") if p]
    with window_on_testbed(presets, home) as (app, window):
        window.study.open_study()
        study = window.study
        study.choose(args.models.split(","), args.parallelisms.split(","), single=args.single, steps=args.steps,
                     batch_size=args.batch_size, seq_len=args.seq_len)
        t0 = time.monotonic()
        if not study.start():
            print("the study did not start", file=sys.stderr)
            return 1
        last = -1
        while study.running and time.monotonic() - t0 < args.timeout:
            wait_until(app, lambda: study.progress.value() != last or not study.running, 5)
            if study.progress.value() != last:
                last = study.progress.value()
                print(f"{time.monotonic() - t0:6.0f} s  {study.progress.text()}  {study.current.text()}",
                      file=sys.stderr)
        if study.running:
            print("the study did not finish in time; stopping it", file=sys.stderr)
            study.stop()
            wait_until(app, lambda: not study.running, 120)
        wait_until(app, lambda: False, 1.0)   # the last repaint
        study.table.resizeColumnsToContents()
        study.table.setCurrentItem(None)   # no focus frame on the first cell in the picture
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        study.grab().save(str(out))
        for row in study.rows():
            print("  ".join(row), file=sys.stderr)
        print(f"saved {out} ({study.width()}x{study.height()}) after {time.monotonic() - t0:.0f} s")
        if args.figure and study.result is not None:
            shutil.copyfile(study.result.figure, args.figure)
            print(f"saved {args.figure} (from {study.result.out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
