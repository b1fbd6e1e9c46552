"""Memory of a 2-stage pipeline's ranks against the micro-batch count (heap kept by the allocator).

Two ranks in one host over gloo, gpt2-s split 6 + 6 blocks, 1F1B, micro-batches of 2
samples x 32 tokens, AdamW, each rank through ``workers.engine.build`` and
``train_step`` as a worker runs them (one thread, the worker's allocator settings, or
``--allocator unmap``: blocks from 1 MiB unmapped on free).  Per rank and step: seconds
and CPU seconds, RSS after the step, the peak so far (``VmHWM``), and RSS after
``malloc_trim(0)`` (what of it was freed memory the allocator kept).  ``--trim-each``
trims at the start of every micro-batch's forward instead (a candidate fix, with its cost).

    .venv/bin/python bench/pp_stage_memory.py --micro-batches 4,32 [--allocator unmap] [--trim-each]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rank_main(rank: int, m: int, port: int, allocator: str, trim_each: bool, steps: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from workers.memory import peak_rss_bytes, release_freed_memory, rss_bytes, tune_allocator, unmap_large_frees
    if allocator == "unmap":
        unmap_large_frees()
    else:
        tune_allocator()
    import torch

    from workers import dist as edist
    from workers import engine
    from workers.config import JobConfig
    from workers.data import global_batch, load_dataset, split_eval
    from workers.models import build_model
    from workers.parallel.pp import model_parts
    torch.set_num_threads(1)
    cfg = JobConfig(run_id="pp-memory", world_size=2, master_addr="127.0.0.1", master_port=port,
                    addrs=["127.0.0.1"] * 2, devices=["d0", "d1"], model="gpt2-s", parallelism="pp",
                    batch_size=2 * m, seq_len=32, micro_batches=m, steps=steps, schedule="1f1b",
                    stages=[{"ranks": [0], "layers": [0, 6]}, {"ranks": [1], "layers": [6, 12]}], timeout_s=300)
    edist.init(rank, 2, "127.0.0.1", port, "127.0.0.1", timeout_s=300)
    model = build_model(cfg.model, seed=0, parts=model_parts(cfg, rank))
    data = split_eval(load_dataset(None, model.family, model.preset.vocab_size, 32, 0)[0], 0)[0]
    tr = engine.build(cfg, rank, model, torch.device("cpu"))
    if trim_each:
        phase = tr.module._on_phase

        def on_phase(p: str) -> None:
            if p == "forward":
                release_freed_memory()
            phase(p)
        tr.module._on_phase = on_phase
    mib = 1 << 20
    for it in range(steps):
        ids, labels = global_batch(data, it, cfg.batch_size, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        tr.train_step(it, ids, labels)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        after, peak = rss_bytes(), peak_rss_bytes()
        trimmed = ""
        if it == steps - 1:
            release_freed_memory()
            trimmed = f"  after malloc_trim {rss_bytes() / mib:6.0f} MB"
        print(f"M {m:>3}  {tr.role:<10} step {it}  {dt:6.2f} s (CPU {cpu:5.2f})  RSS after {after / mib:6.0f} MB"
              f"  peak {peak / mib:6.0f} MB{trimmed}", flush=True)
    edist.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", default="4,32")
    ap.add_argument("--allocator", choices=["worker", "unmap"], default="worker")
    ap.add_argument("--trim-each", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    import torch.multiprocessing as mp
    for m in map(int, args.micro_batches.split(",")):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.start_processes(rank_main, args=(m, port, args.allocator, args.trim_each, args.steps), nprocs=2,
                           start_method="spawn", join=True)


if __name__ == "__main__":
    main()
