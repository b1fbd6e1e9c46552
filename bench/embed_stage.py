"""A pipeline's embedding stage with dense and with sparse embedding gradients.

Builds the embeddings and the first block of ``--model`` (``workers.models``, one thread,
the worker's allocator settings), runs ``--micro-batches`` micro-batches of 4 x 32
forward and backward, then the fused AdamW step, as a pipeline stage does; with
``sparse`` the tables take sparse gradients made dense once per step
(``workers.engine.sparse_embedding_grads`` / ``densify_grads``, what
``workers/parallel/pp.py`` does).  Prints CPU seconds per step (median of 5 after one
warm-up step), minor page faults per step and the peak RSS, each mode in its own process,
alternated ``--reps`` times.

    .venv/bin/python bench/embed_stage.py [--model gpt2-s] [--micro-batches 4] [--reps 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(model_name: str, sparse: bool, micro_batches: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from workers.memory import tune_allocator
    tune_allocator()  # before torch loads, as a worker does
    import torch

    from workers.engine import densify_grads, sparse_embedding_grads
    from workers.models import build_model
    torch.set_num_threads(1)
    m = build_model(model_name, parts=["embed", 0])
    tables = sparse_embedding_grads(m) if sparse else []
    opt = torch.optim.AdamW([p for p in m.parameters() if not p.is_meta], fused=True)
    ids = torch.randint(4, 1000, (micro_batches, 4, 32))

    def step() -> None:
        for mb in ids:
            m.blocks[0](m.embed(mb)).sum().backward()
        densify_grads(tables)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    cpu, faults = [], []
    for _ in range(5):
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        step()
        cpu.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0.ru_minflt)
    return {"cpu_s": statistics.median(cpu), "faults": statistics.median(faults),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child == "sparse", args.micro_batches)))
        return
    for rep in range(args.reps):
        for mode in ("dense", "sparse"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model,
                                  "--micro-batches", str(args.micro_batches)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:<6} rep {rep + 1}  CPU/step {r['cpu_s']:.3f} s  minor faults/step {r['faults']:>8,.0f}  "
                  f"peak RSS {r['peak_mb']:,.0f} MB", flush=True)


if __name__ == "__main__":
    main()
