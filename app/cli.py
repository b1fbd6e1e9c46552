"""``edgetrain``: the headless control panel (same powers as the GUI)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from .core.inventory import InventoryError, load_inventory
from .core.jobs import RunSettings, edgetrain_home, prepare_run
from .core.launch import LaunchError
from .core.runstate import RunState
from .core.ssh import SSHError


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
        state.record.connect(self._on_record)
        state.event.connect(self._on_event)

    def _on_event(self, ev) -> None:
        if ev.kind in ("oom", "error", "failure"):
            self._line(f"!! {ev.message}")

    def _on_record(self, rec: dict) -> None:
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
    if state.run_dir:
        print(f"run record: {state.run_dir / 'record.json'}", file=out)


async def _run_async(launcher, state: RunState) -> str:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, launcher.request_stop)
        except (NotImplementedError, RuntimeError):
            pass
    return await launcher.run()


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    return RunSettings(model=args.model, parallelism=args.parallelism, steps=args.steps,
                       batch_size=args.batch_size, seq_len=args.seq_len, micro_batches=args.micro_batches,
                       sync_every=args.sync_every, lr=args.lr, seed=args.seed, schedule=args.schedule,
                       dataset=args.dataset, weights=args.weights, tokenizer=args.tokenizer,
                       device=args.device, timeout_s=args.timeout)


def cmd_run(args: argparse.Namespace) -> int:
    inv_path = args.inventory or edgetrain_home() / "testbed" / "inventory.yaml"
    inv = load_inventory(inv_path)
    names = args.devices.split(",") if args.devices else None
    launcher, state = prepare_run(inv, names, settings_from_args(args),
                                  Path(args.runs_dir) if args.runs_dir else None)
    print(f"run {state.run_id}: {args.model} {args.parallelism} on "
          f"{', '.join(state.devices)} ({args.steps} steps, batch {args.batch_size})", file=sys.stderr)
    progress = Progress(state, args.steps)
    try:
        outcome = asyncio.run(_run_async(launcher, state))
    except LaunchError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        print_summary(state)
        return 2
    progress.close()
    print_summary(state)
    return 0 if outcome == "done" else 1


def cmd_testbed(args: argparse.Namespace) -> int:
    from .core import testbed

    if getattr(args, "netns", False):
        from .cmd_devices import cmd_netns_testbed
        return cmd_netns_testbed(args)
    tb_dir = Path(args.dir) if args.dir else edgetrain_home() / "testbed"
    if args.action == "up":
        info = testbed.start_testbed(tb_dir, n_devices=args.devices, preset=args.preset,
                                     base_addr=args.base_addr, port=args.port)
        print(f"testbed up: {len(info.devices)} devices; inventory {info.inventory_path}")
        for d in info.devices:
            print(f"  {d.name:<10} {d.host}:{d.port}  {d.preset}")
        return 0
    if args.action == "down":
        was = testbed.stop_testbed(tb_dir)
        print("testbed stopped" if was else "no testbed was running")
        return 0
    rows = testbed.testbed_status(tb_dir)
    if not rows:
        print("no testbed running (start one with: edgetrain testbed up --devices 2)")
        return 1
    for r in rows:
        print(f"  {r.name:<10} {r.host}:{r.port}  {'reachable' if r.reachable else 'UNREACHABLE'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """testbed up -> a short DP run of tiny-gpt2 -> summary -> testbed down."""
    from .core import testbed

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
            from workers.data import generate_qnli
            run_args.dataset = str(generate_qnli(tb_dir / "qnli-demo.tsv", n_rows=2048, seed=0))
            print(f"demo data: {run_args.dataset} (generated, QNLI format)", file=sys.stderr)
        return cmd_run(run_args)
    finally:
        testbed.stop_testbed(tb_dir)


def _add_run_flags(p: argparse.ArgumentParser, steps: int = 10, model: str = "tiny-gpt2") -> None:
    p.add_argument("--model", default=model, help="preset name or a local Hugging Face model directory")
    if not any(a.dest == "parallelism" for a in p._actions):
        p.add_argument("--parallelism", default="dp", choices=["dp", "sp", "tp", "pp", "hybrid"])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=128, help="global mini-batch (paper: 128)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--sync-every", type=int, default=5, help="DP: synchronise gradients every k steps")
    p.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 for tiny presets, 5e-5 otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", help="QNLI-format TSV: a local file is copied to the devices, "
                                     "another path is read on the devices (default: generated data)")
    p.add_argument("--weights", help="Hugging Face model directory (local: copied to the devices)")
    p.add_argument("--tokenizer", help="tokenizer directory (local: copied to the devices)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a collective waits for a silent peer")
    p.add_argument("--runs-dir", help="where run records go (default: $EDGETRAIN_HOME/runs)")


COMMAND_MODULES = ("app.cmd_devices", "app.cmd_plan", "app.cmd_gui", "app.cmd_sweep")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgetrain", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    tb = sub.add_parser("testbed", help="emulated edge devices on this machine")
    tb.add_argument("action", choices=["up", "down", "status"])
    tb.add_argument("--devices", type=int, default=None, help="number of devices (default 2, or the preset's)")
    tb.add_argument("--preset", choices=["homogeneous", "heterogeneous"], default=None)
    tb.add_argument("--base-addr", default="127.0.10.1")
    tb.add_argument("--port", type=int, default=2222)
    tb.add_argument("--dir", help="testbed directory (default: $EDGETRAIN_HOME/testbed)")
    tb.add_argument("--netns", action="store_true",
                    help="root only: devices in network namespaces with real OpenSSH sshd, tc-shaped links, mDNS")
    tb.add_argument("--rate", type=float, default=None, help="--netns: link rate in Mbit/s (default 1000)")
    tb.set_defaults(func=cmd_testbed)

    run = sub.add_parser("run", help="train on devices from an inventory")
    run.add_argument("--inventory", help="inventory YAML (default: the running testbed's)")
    run.add_argument("--devices", help="comma-separated device names in rank order (default: all)")
    _add_run_flags(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="testbed up, a short run, summary, testbed down")
    demo.add_argument("--devices", type=int, default=2)
    demo.add_argument("--base-addr", default="127.0.11.1")
    demo.add_argument("--port", type=int, default=2222)
    demo.add_argument("--dir", help=argparse.SUPPRESS)
    _add_run_flags(demo, steps=20)
    demo.set_defaults(func=cmd_demo)

    # Other command groups live next to what they drive; each adds its own subparsers.
    import importlib
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        module.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (InventoryError, LaunchError, SSHError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
