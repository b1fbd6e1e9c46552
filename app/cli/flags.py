"""Flags shared by the commands that take run settings: one place, defaults from
:class:`workers.config.RunSettings`, so the CLI never restates a default."""
from __future__ import annotations

import argparse
from pathlib import Path

from app.devices.inventory import Inventory, load_inventory
from app.paths import default_runs_dir, edgetrain_home
from workers.config import (
    DEVICE_KINDS,
    DP_MODES,
    OPTIMIZERS,
    PARALLELISMS,
    PRECISIONS,
    SCHEDULES,
    SYNC_DTYPES,
    RunSettings,
)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """``--inventory`` and ``--devices`` (rank order)."""
    p.add_argument("--inventory", help="inventory YAML (default: the running testbed's)")
    p.add_argument("--devices", help="comma-separated device names in rank order (default: all)")


def testbed_inventory() -> Path:
    """The inventory the local testbed writes (``edgetrain testbed up``)."""
    return edgetrain_home() / "testbed" / "inventory.yaml"


def inventory_path(args: argparse.Namespace) -> Path:
    """The inventory named by ``--inventory``, else the running local testbed's."""
    return Path(args.inventory) if getattr(args, "inventory", None) else testbed_inventory()


def inventory_from_args(args: argparse.Namespace) -> Inventory:
    return load_inventory(inventory_path(args))


def device_names(args: argparse.Namespace) -> list[str] | None:
    return [n for n in args.devices.split(",") if n] if args.devices else None


def add_settings_flags(p: argparse.ArgumentParser, steps: int | None = None) -> None:
    """Every :class:`RunSettings` field a user sets from the command line.

    ``steps`` overrides the default step count (the demo and the sweep run fewer).
    """
    d = RunSettings()
    p.add_argument("--model", default=d.model, help="preset name (see workers/presets.py)")
    p.add_argument("--parallelism", default=d.parallelism.value, choices=PARALLELISMS)
    p.add_argument("--steps", type=int, default=d.steps if steps is None else steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global mini-batch (paper: 128)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--micro-batches", type=int, default=d.micro_batches, help="pp/hybrid: micro-batches per step")
    p.add_argument("--sync-every", type=int, default=d.sync_every, help="DP: synchronise gradients every k steps")
    p.add_argument("--schedule", default=d.schedule.value, choices=SCHEDULES, help="pp/hybrid pipeline schedule")
    p.add_argument("--lr", type=float, default=d.lr, help="default: 1e-3 for tiny presets, 5e-5 otherwise")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dataset", help="QNLI-format TSV: a local file is copied to the devices, "
                                     "another path is read on the devices (default: generated data)")
    p.add_argument("--weights", help="Hugging Face model directory (local: copied to the devices)")
    p.add_argument("--tokenizer", help="tokenizer directory (local: copied to the devices)")
    p.add_argument("--device", default=d.device, choices=DEVICE_KINDS)
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds a collective waits for a silent peer")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="a checkpoint every N steps (0: off; one is always written at the end)")
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes,
                   help="a checkpoint every M minutes (0: off)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="complete checkpoints kept on each device")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="held-out evaluation every N steps (0: at the end only)")
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help="adamw (two moments per parameter), sgd (momentum: one) or adafactor (factored)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   default=d.activation_checkpointing,
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--grad-accumulation", type=int, default=d.grad_accumulation,
                   help="DP: run each replica's slice in this many micro-batches")
    p.add_argument("--dp-shares", type=_shares, default=d.dp_shares, metavar="S0,S1,...",
                   help="DP: each device's share of the batch in rank order, e.g. 0.4,0.3,0.3 "
                        "(normalised; default: equal)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="bf16: autocast the forward where the device supports it")
    p.add_argument("--dp-mode", default=d.dp_mode, choices=DP_MODES,
                   help="DP: ddp (gradients every --sync-every steps) or diloco (low-communication for slow "
                        "links: replicas step alone, their moves averaged every --sync-every steps)")
    p.add_argument("--outer-lr", type=float, default=d.outer_lr, help="DiLoCo: the outer step's learning rate")
    p.add_argument("--outer-momentum", type=float, default=d.outer_momentum,
                   help="DiLoCo: the outer step's Nesterov momentum (0: none)")
    p.add_argument("--sync-dtype", default=d.sync_dtype, choices=SYNC_DTYPES,
                   help="DiLoCo: the precision of the averaged moves on the wire")
    p.add_argument("--runs-dir", help="where run records go (default: $EDGETRAIN_HOME/runs)")


def _shares(text: str) -> list[float]:
    """``0.4,0.3,0.3`` as a list of positive numbers (argparse names the flag on error)."""
    try:
        shares = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers "
                                         "(e.g. 0.4,0.3,0.3)") from None
    if not shares or any(not 0 < x < float("inf") for x in shares):
        raise argparse.ArgumentTypeError(f"{text!r}: every share must be a positive number (e.g. 0.4,0.3,0.3)")
    return shares


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The settings the flags describe.

    Raises
    ------
    ValueError
        A memory knob that cannot work whatever the devices (``--grad-accumulation 0``);
        the share count is checked against the devices when the run is launched.
    """
    s = RunSettings(model=args.model, parallelism=args.parallelism, steps=args.steps,
                       batch_size=args.batch_size, seq_len=args.seq_len, micro_batches=args.micro_batches,
                       sync_every=args.sync_every, lr=args.lr, seed=args.seed, schedule=args.schedule,
                       dataset=args.dataset, weights=args.weights, tokenizer=args.tokenizer,
                       device=args.device, timeout_s=args.timeout, checkpoint_every=args.checkpoint_every,
                       checkpoint_minutes=args.checkpoint_minutes, keep_checkpoints=args.keep_checkpoints,
                       eval_every=args.eval_every, optimizer=args.optimizer,
                       activation_checkpointing=args.activation_checkpointing,
                       grad_accumulation=args.grad_accumulation, dp_shares=args.dp_shares,
                       precision=args.precision, dp_mode=args.dp_mode, outer_lr=args.outer_lr,
                       outer_momentum=args.outer_momentum, sync_dtype=args.sync_dtype)
    s.check_knobs()
    return s


def runs_dir_from_args(args: argparse.Namespace) -> Path | None:
    return Path(args.runs_dir) if args.runs_dir else None


def runs_dir_or_default(args: argparse.Namespace) -> Path:
    return runs_dir_from_args(args) or default_runs_dir()
