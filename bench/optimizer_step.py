"""One optimizer step of a model on CPU, torch's default AdamW against its fused one.

Builds ``--model`` (``workers.models``), gives every parameter a random gradient and times
``opt.step()`` in CPU seconds on one thread, with the minor page faults each step takes
(``getrusage``), after the worker's allocator settings (``workers.memory.tune_allocator``).
The default (foreach) AdamW makes temporaries the size of each parameter; those above
glibc's largest mmap threshold (32 MiB: gpt2-s's token embedding) are mapped afresh every
step.  The worker uses the fused one (``workers.engine.make_optimizer``); ``--all`` adds
its SGD and Adafactor, whose times relative to AdamW the planner uses
(``app/planner/knobs.py: OPT_TIME_PER_PARAM``).  Alternates them ``--reps`` times, each on
a freshly built model.

    .venv/bin/python bench/optimizer_step.py [--model gpt2-s] [--steps 4] [--reps 2] [--all]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.memory import tune_allocator  # noqa: E402


def measure(model_name: str, kind: str, steps: int) -> tuple[list[float], list[int]]:
    """CPU seconds and page faults of each step after the first; ``kind``: ``default``
    (torch's AdamW as a user writes it) or one of the worker's optimizers (``adamw``, which
    is the fused one, ``sgd``, ``adafactor``: ``workers.engine.make_optimizer``)."""
    import torch

    from workers.config import JobConfig
    from workers.engine import make_optimizer
    from workers.models import build_model
    model = build_model(model_name, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    if kind == "default":
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    else:
        cfg = JobConfig(run_id="opt", world_size=1, master_addr="127.0.0.1", master_port=0, addrs=["127.0.0.1"],
                        devices=["d0"], model=model_name, optimizer=kind, lr=5e-5)
        opt = make_optimizer(model.parameters(), cfg)
    opt.step()  # the first step creates the moments
    secs, faults = [], []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        opt.step()
        secs.append(time.process_time() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return secs, faults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="also the worker's SGD and Adafactor")
    args = ap.parse_args()
    tune_allocator()
    import torch
    torch.set_num_threads(1)
    kinds = ["default", "adamw"] + (["sgd", "adafactor"] if args.all else [])
    for rep in range(args.reps):
        for kind in kinds:
            secs, faults = measure(args.model, kind, args.steps)
            label = {"default": "default AdamW", "adamw": "fused AdamW"}.get(kind, kind)
            print(f"rep {rep + 1} {label:<13} step: median "
                  f"{statistics.median(secs):.3f} s CPU (min {min(secs):.3f}, max {max(secs):.3f}), "
                  f"page faults per step {statistics.median(faults):.0f}", flush=True)


if __name__ == "__main__":
    main()
