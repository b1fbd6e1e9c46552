"""The bare engine: a torchrun DDP script training what an EdgeTrain DP run trains.

Same model (``workers.models.build_model``), same global batches (``workers.data``),
the same slice per rank, AdamW, gradients synchronised every ``--sync-every`` steps
(``no_sync`` in between), one thread per rank; nothing else (no telemetry, no
heartbeats, no checkpoints, no SSH).  As a user would write it, with torch's and glibc's
defaults (foreach AdamW, glibc's starting mmap threshold), or with ``--tuned`` with the two
settings an EdgeTrain worker makes (fused AdamW, ``workers.memory.tune_allocator``), so
that what is left between the two is the framework's own cost.  Rank 0 prints one JSON line: the median and every
step's period (end to end) after the first two.  Used by ``bench/overhead.py``:

    torchrun --nproc-per-node 2 bench/bare_ddp.py --model gpt2-s --batch-size 32 --steps 6
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if "--tuned" in sys.argv[1:]:  # the worker's allocator settings take effect only before torch loads
    from workers.memory import tune_allocator  # noqa: E402
    tune_allocator()
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from workers.data import global_batch, load_dataset, split_eval  # noqa: E402
from workers.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sync-every", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--tuned", action="store_true", help="fused AdamW and the worker's allocator settings")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(args.model, seed=0)
    data, _ = load_dataset(None, model.family, model.preset.vocab_size, args.seq_len, 0)
    data = split_eval(data, 0)[0]
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.0, fused=args.tuned or None)
    per = args.batch_size // world
    times, cpus, faults = [], [], []
    last = None
    for it in range(args.steps):
        ids, labels = global_batch(data, it, args.batch_size, 0)
        x, y = ids[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]
        sync = (it + 1) % args.sync_every == 0
        c0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with contextlib.nullcontext() if sync else ddp.no_sync():
            loss = F.cross_entropy(ddp(x).float(), y)
            loss.backward()
        if sync:
            opt.step()
            opt.zero_grad(set_to_none=True)
        # the period from one step's end to the next one's, as EdgeTrain's period_s
        now = time.perf_counter()
        cpus.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        if last is not None:
            times.append(now - last)
        last = now
    dist.barrier()
    if rank == 0:
        steady = times[1:] or times   # periods from the second step's end on
        print(json.dumps({"median_step_s": statistics.median(steady), "steps_s": steady,
                          "median_step_cpu_s": statistics.median(cpus[2:] or cpus),
                          "faults_per_step": statistics.median(faults[2:] or faults),
                          "samples_per_s": args.batch_size / statistics.median(steady)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
