"""What per-step telemetry costs a worker, relative to a tiny training step.

Per step a worker resets a :class:`~workers.memory.PeakTracker`, trains, reads its
energy meter, reads the window's peak memory, and writes one JSON ``step`` record of
~15 fields through :class:`~workers.protocol.Emitter` to a pipe that a thread drains
(as the controller does with a worker's stdout).  This script times those parts
against the step itself and prints overhead % = telemetry time / step time (means).

The training step is a stand-in, not a real EdgeTrain model (those live elsewhere): a
4-layer, width-64 transformer-shaped ``nn.Sequential`` of LayerNorm + Linear(64, 256) +
GELU + Linear(256, 64) blocks on a 128 x 32-token batch, forward + backward + Adam.
It is deliberately about the smallest step a worker runs, so the percentage is an
upper bound for real models.

Usage::

    .venv/bin/python bench/telemetry_overhead.py [--steps 200] [--sink pipe|devnull]
        [--prefer rapl] [--sysfs-root /sys] [--fake-ina3221]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from workers.energy import select_meter  # noqa: E402
from workers.memory import PeakTracker, rss_bytes  # noqa: E402
from workers.protocol import Emitter  # noqa: E402

WIDTH, LAYERS, BATCH, SEQ = 64, 4, 128, 32


def stand_in_model() -> nn.Sequential:
    """Transformer-shaped MLP blocks (no attention): a placeholder for the real models."""
    blocks: list[nn.Module] = []
    for _ in range(LAYERS):
        blocks += [nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)]
    return nn.Sequential(*blocks)


def open_sink(kind: str) -> tuple[IO[str], Callable[[], None]]:
    """A text stream to write records to, and a function that closes it."""
    if kind == "devnull":
        f = open(os.devnull, "w")
        return f, f.close
    r, w = os.pipe()

    def drain() -> None:  # stands in for the controller reading the worker's stdout
        while os.read(r, 1 << 16):
            pass
        os.close(r)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stream = os.fdopen(w, "w")

    def close() -> None:
        stream.close()
        reader.join(timeout=2)

    return stream, close


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark and print the table; returns overhead in percent."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--sink", choices=("pipe", "devnull"), default="pipe")
    ap.add_argument("--prefer", default=None, help="energy source to try first")
    ap.add_argument("--sysfs-root", default="/sys")
    ap.add_argument("--fake-ina3221", action="store_true",
                    help="use a fixture INA3221 so the 10 Hz sampling thread runs during training")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tmp = None
    if args.fake_ina3221:
        tmp = tempfile.TemporaryDirectory()
        hw = Path(tmp.name) / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon0"
        hw.mkdir(parents=True)
        for name, text in {"in1_label": "VDD_IN", "in1_input": "5000", "curr1_input": "1500"}.items():
            (hw / name).write_text(text + "\n")
        args.sysfs_root, args.prefer = tmp.name, "ina3221"

    t = time.perf_counter()
    meter = select_meter("cpu", sysfs_root=args.sysfs_root, prefer=args.prefer)
    meter.start()
    tracker = PeakTracker("cpu")
    setup_s = time.perf_counter() - t

    model = stand_in_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH * SEQ, WIDTH)
    y = torch.randn(BATCH * SEQ, WIDTH)
    stream, close_sink = open_sink(args.sink)
    emitter = Emitter("bench", 0, "local", stream)

    parts: dict[str, list[float]] = {"step": [], "peak reset": [], "energy read": [],
                                     "peak read": [], "record+write": []}
    reading = None
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        tracker.reset()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        t2 = time.perf_counter()
        reading = meter.read()
        t3 = time.perf_counter()
        peak = tracker.peak()
        t4 = time.perf_counter()
        step_s = t2 - t1
        emitter.emit("step", step=i, samples=BATCH, latency_s=step_s,
                     latency_per_sample_s=step_s / BATCH, tokens=BATCH * SEQ, loss=loss_value,
                     lr=1e-3, energy_j=reading.joules, energy_s=reading.seconds,
                     energy_source=reading.source, energy_method=reading.method,
                     peak_rss_bytes=peak, peak_exact=tracker.exact, rss_bytes=rss_bytes(),
                     phase="train")
        t5 = time.perf_counter()
        if i >= args.warmup:
            for name, dt in zip(parts, (step_s, t1 - t0, t3 - t2, t4 - t3, t5 - t4)):
                parts[name].append(dt)
    close_sink()
    meter.close()
    if tmp is not None:
        tmp.cleanup()

    step_mean = statistics.fmean(parts["step"])
    telemetry = [sum(v) for v in zip(*(parts[k] for k in parts if k != "step"))]
    tel_mean = statistics.fmean(telemetry)
    overhead = 100.0 * tel_mean / step_mean
    assert reading is not None
    print(f"meter: {reading.source}/{reading.method} ({reading.detail})")
    print(f"peak tracker exact: {tracker.exact}; torch threads: {torch.get_num_threads()}; "
          f"sink: {args.sink}; steps: {args.steps} (+{args.warmup} warm-up)")
    print(f"one-off select_meter + start + PeakTracker: {setup_s * 1e3:.2f} ms")
    print(f"{'part':<16}{'mean us':>10}{'median us':>11}{'p99 us':>10}")
    for name, values in list(parts.items()) + [("telemetry total", telemetry)]:
        q = sorted(values)
        print(f"{name:<16}{statistics.fmean(q) * 1e6:>10.1f}{statistics.median(q) * 1e6:>11.1f}"
              f"{q[min(len(q) - 1, int(0.99 * len(q)))] * 1e6:>10.1f}")
    verdict = "OK" if overhead < 2.0 else "OVER BUDGET"
    print(f"overhead: {overhead:.3f} % of step time (budget 2 %): {verdict}")
    return overhead


if __name__ == "__main__":
    sys.exit(0 if main() < 2.0 else 1)
