"""One optimizer step of a model on CPU, torch's default AdamW against its fused one.

Builds ``--model`` (``workers.models``), gives every parameter a random gradient and times
``opt.step()`` in CPU seconds on one thread, with the minor page faults each step takes
(``getrusage``), after the worker's allocator settings (``workers.memory.tune_allocator``).
The default (foreach) AdamW makes temporaries the size of each parameter; those above
glibc's largest mmap threshold (32 MiB: gpt2-s's token embedding) are mapped afresh every
step.  Alternates the two ``--reps`` times, each on a freshly built model.

    .venv/bin/python bench/optimizer_step.py [--model gpt2-s] [--steps 4] [--reps 2]
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


def measure(model_name: str, fused: bool, steps: int) -> tuple[list[float], list[int]]:
    import torch

    from workers.models import build_model
    model = build_model(model_name, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0, fused=fused or None)
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
    args = ap.parse_args()
    tune_allocator()
    import torch
    torch.set_num_threads(1)
    for rep in range(args.reps):
        for fused in (False, True):
            secs, faults = measure(args.model, fused, args.steps)
            print(f"rep {rep + 1} {'fused' if fused else 'default':<8} AdamW step: median "
                  f"{statistics.median(secs):.3f} s CPU (min {min(secs):.3f}, max {max(secs):.3f}), "
                  f"page faults per step {statistics.median(faults):.0f}", flush=True)


if __name__ == "__main__":
    main()
