"""``edgetrain run`` and ``edgetrain demo``: a run with live progress and a summary."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from app.cli.autoprofile import profile_missing
from app.cli.flags import (
    add_device_flags,
    add_settings_flags,
    device_names,
    inventory_from_args,
    runs_dir_from_args,
    settings_from_args,
)
from app.paths import edgetrain_home
from app.run.jobs import prepare_run
from app.run.launcher import LaunchError
from app.run.runstate import RunState
from app.run.supervise import run_supervised
from app.run.timeline import describe, recovery_timeline
from app.testbed import daemon as testbed
from workers.qnli import generate_qnli


def _fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else format(v, spec) + unit


class Progress:
    """Live progress on stderr: a bar plus per-device rates, redrawn at most 4x/s."""

    def __init__(self, state: RunState, steps: int, stream=sys.stderr) -> None:
        self.state, self.steps, self.stream = state, max(1, steps), stream
        self.tty = stream.isatty()
        self._last = 0.0
        self._last_step = -1
        self._last_eval = -1
        state.record.connect(self._on_record)
        state.event.connect(self._on_event)

    def _on_event(self, ev) -> None:
        if ev.kind in ("oom", "error", "failure", "lost", "drill"):
            self._line(f"!! {ev.message}")
        elif ev.device is None:  # the run's own news: checkpoints, resume, stop
            self._line(f"-- {ev.message}")

    def _on_record(self, rec: dict) -> None:
        if rec["type"] == "eval":
            self._on_eval(rec)
        if rec["type"] != "step":
            return
        now = time.monotonic()
        step = max(d.steps for d in self.state.devices.values())
        if self.tty and now - self._last < 0.25 and step < self.steps:
            return
        if not self.tty and step == self._last_step:
            return
        self._last, self._last_step = now, step
        frac = step / self.steps
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        rates = "  ".join(
            f"{d.name}:{d.local_samples / d.busy_s:.0f}/s" for d in self.state.devices.values() if d.busy_s)
        loss = next((d.last_loss for d in self.state.devices.values() if d.last_loss is not None), None)
        text = f"[{bar}] step {step}/{self.steps}  loss {_fmt(loss, '.4f')}  {rates}"
        if self.tty:
            self.stream.write("\r" + text[:160].ljust(160))
            self.stream.flush()
        else:
            self._line(text)

    def _on_eval(self, rec: dict) -> None:
        # every rank that knows the result reports it: one line per evaluation
        if rec["step"] == self._last_eval:
            return
        self._last_eval = rec["step"]
        self._line(f"eval  step {rec['step']}/{self.steps}  eval loss {rec['loss']:.4f}  "
                   f"accuracy {rec['accuracy']:.1%}  ({rec['samples']} held-out samples)")

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 160 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def print_summary(state: RunState, out=sys.stdout) -> None:
    s = state.summary()
    print(f"\nrun {s['run_id']}: {s['outcome']}  steps {s['steps']}  samples {s['samples']}  "
          f"wall {s['wall_s']:.1f} s", file=out)
    methods = ",".join(s["energy_methods"]) or "none"
    print(f"throughput {_fmt(s['throughput_sps'], '.1f', ' samples/s')}  "
          f"latency/sample {_fmt(s['latency_per_sample_s'] and s['latency_per_sample_s'] * 1e3, '.3f', ' ms')}  "
          f"energy/sample {_fmt(s['energy_per_sample_j'], '.4f', ' J')} ({methods})", file=out)
    if s.get("eval_accuracy") is not None:
        print(f"held-out eval after step {s['eval_step']}: loss {s['eval_loss']:.4f}  "
              f"accuracy {s['eval_accuracy']:.1%}  ({s['evals'][-1]['samples']} samples)", file=out)
    hdr = f"{'device':<12} {'rank':>4} {'role':<18} {'status':<8} {'steps':>5} {'lat/sample':>11} " \
          f"{'samples/s':>9} {'energy J':>9} {'method':<16} {'peak mem':>10}"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for d in s["devices"]:
        lat = d["latency_per_sample_s"]
        print(f"{d['device']:<12} {d['rank']:>4} {(d['role'] or '-')[:18]:<18} {d['status']:<8} {d['steps']:>5} "
              f"{_fmt(lat and lat * 1e3, '.3f', ' ms'):>11} {_fmt(d['local_throughput_sps'], '.1f'):>9} "
              f"{d['energy_j']:>9.2f} {(d['energy_method'] or '-'):<16} {_fmt_bytes(d['peak_mem_bytes']):>10}",
              file=out)
    pred = (state.plan or {}).get("totals") or {}
    if pred.get("median_latency_per_sample_s") and s["latency_per_sample_s"]:
        p_lat, m_lat = pred["median_latency_per_sample_s"], s["latency_per_sample_s"]
        flags = [p["name"] for p in state.plan.get("predictions", []) if p.get("oom")]
        print(f"plan predicted {p_lat * 1e3:.3f} ms/sample (measured {m_lat * 1e3:.3f}, "
              f"{(m_lat - p_lat) / p_lat:+.0%}); predicted OOM: {', '.join(flags) or 'none'}", file=out)
    for ev in state.events:
        if ev.kind in ("oom", "error", "failure"):
            print(f"  {ev.kind.upper()}: {ev.message}", file=out)
    for line in describe(recovery_timeline(state.events)):
        print(f"recovery: {line}", file=out)
    done = [c for c in s["checkpoints"] if c.get("complete")]
    if done:
        last = done[-1]
        print(f"checkpoints: {len(done)} (last: step {last['step']}, {last['kind']}); "
              f"continue with: edgetrain resume {s['run_id']}", file=out)
    if s.get("model_dir"):
        print(f"trained model: {s['model_dir']}", file=out)
    if state.run_dir:
        print(f"run record: {state.run_dir / 'record.json'}", file=out)


def _stop_on_signals(launcher) -> None:
    """Ctrl-C and SIGTERM stop the run (the devices checkpoint first; a second one kills)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, launcher.request_stop)
        except (NotImplementedError, RuntimeError):
            pass


def execute(launcher, state: RunState, steps: int, inv=None, runs_dir=None, export: bool = False) -> int:
    """Run with live progress and print the summary; returns the exit code.

    With ``inv``, a run that loses devices it cannot continue without restarts on the
    survivors from its last checkpoint (:func:`app.run.supervise.run_supervised`).
    """
    progress = [Progress(state, steps)]
    final = [state]

    def follow(new_launcher, new_state: RunState) -> None:
        progress[0].close()
        print(f"run {new_state.run_id}: restarting on {', '.join(new_state.devices)}", file=sys.stderr)
        progress[0], final[0] = Progress(new_state, steps), new_state
        _stop_on_signals(new_launcher)

    async def go() -> str:
        _stop_on_signals(launcher)
        if inv is None:
            return await launcher.run()
        outcome, final[0] = await run_supervised(launcher, state, inv, runs_dir, export=export, on_restart=follow)
        return outcome
    try:
        outcome = asyncio.run(go())
    except LaunchError as exc:
        progress[0].close()
        print(f"error: {exc}", file=sys.stderr)
        print_summary(final[0])
        return 2
    progress[0].close()
    print_summary(final[0])
    return 0 if outcome == "done" else 1


def cmd_run(args: argparse.Namespace) -> int:
    inv = inventory_from_args(args)
    if not args.no_profile:
        # the plan's prediction, printed next to the measurement, is made from measured speeds
        profile_missing(inv, device_names(args))
    launcher, state = prepare_run(inv, device_names(args), settings_from_args(args), runs_dir_from_args(args),
                                  export=not args.no_export)
    print(f"run {state.run_id}: {args.model} {args.parallelism} on "
          f"{', '.join(state.devices)} ({args.steps} steps, batch {args.batch_size})", file=sys.stderr)
    return execute(launcher, state, args.steps, inv, runs_dir_from_args(args), export=not args.no_export)


def cmd_demo(args: argparse.Namespace) -> int:
    """testbed up -> a short DP run of tiny-gpt2 -> summary -> testbed down."""
    tb_dir = Path(args.dir) if args.dir else edgetrain_home() / "demo-testbed"
    info = testbed.start_testbed(tb_dir, n_devices=args.devices, port=args.port, base_addr=args.base_addr)
    try:
        print(f"demo testbed: {len(info.devices)} emulated devices on "
              f"{', '.join(d.host for d in info.devices)} (SSH port {args.port})", file=sys.stderr)
        run_args = argparse.Namespace(**vars(args))
        run_args.inventory = str(info.inventory_path)
        run_args.devices = None
        if not run_args.dataset:
            # the demo trains on a generated QNLI-format data set, copied to the devices
            run_args.dataset = str(generate_qnli(tb_dir / "qnli-demo.tsv", n_rows=2048, seed=0))
            print(f"demo data: {run_args.dataset} (generated, QNLI format)", file=sys.stderr)
        return cmd_run(run_args)
    finally:
        testbed.stop_testbed(tb_dir)




def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="train on devices from an inventory")
    add_device_flags(run)
    add_settings_flags(run)
    run.add_argument("--no-export", action="store_true",
                     help="do not bring the trained model home as a Hugging Face directory")
    run.add_argument("--no-profile", action="store_true",
                     help="plan devices that have no profile from their board presets instead of "
                          "measuring them first")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="testbed up, a short run, summary, testbed down")
    demo.add_argument("--devices", type=int, default=2)
    demo.add_argument("--base-addr", default="127.0.11.1")
    demo.add_argument("--port", type=int, default=2222)
    demo.add_argument("--dir", help=argparse.SUPPRESS)
    add_settings_flags(demo, steps=20)
    demo.add_argument("--no-export", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)
