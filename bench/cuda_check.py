"""Check the CUDA/NCCL worker path on a machine with an NVIDIA GPU.

Runs the real worker (``python -m workers.train``) as one rank with ``device=cuda``
(process group ``cpu:edgegloo,cuda:nccl``) and prints what its telemetry says: energy
source and method (NVML), latency per sample, GPU peak memory.  Then the same worker
with the GPU capped (``EDGETRAIN_EMU_MEM_BYTES``, enforced by the CUDA caching allocator)
must report an ``oom`` record with its phase.

    python bench/cuda_check.py [--model gpt2-s] [--steps 6]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.config import JobConfig  # noqa: E402
from workers.dist import free_port  # noqa: E402
from workers.protocol import parse_line  # noqa: E402


def run_worker(cfg: JobConfig, env_extra: dict[str, str]) -> tuple[int, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    out = subprocess.run([sys.executable, "-m", "workers.train", "--rank", "0", "--config-b64", cfg.to_b64()],
                         capture_output=True, text=True, env=env, timeout=600)
    recs = []
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            recs.append(parse_line(line))
    if out.returncode not in (0, 3):
        print(out.stderr[-3000:])
    return out.returncode, recs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-s")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    cfg = JobConfig(run_id="cuda-check", world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                    addrs=["127.0.0.1"], devices=["gpu0"], model=args.model, parallelism="dp",
                    batch_size=args.batch_size, seq_len=32, steps=args.steps, sync_every=1, device="cuda")
    code, recs = run_worker(cfg, {})
    steps = [r for r in recs if r["type"] == "step"]
    done = [r for r in recs if r["type"] == "done"]
    print(f"worker exit {code}; {len(steps)} step records")
    for r in steps:
        print(f"  step {r['step']}: latency/sample {r['latency_per_sample_s'] * 1e3:.3f} ms  "
              f"energy {r['energy_j']:.2f} J ({r['energy_source']}/{r['energy_method']})  "
              f"gpu peak {r['peak_mem_bytes'] / 2**20:.0f} MiB  loss {r['loss']:.4f}")
    if done:
        d = done[0]
        print(f"  done: {d['samples']} samples, energy {d['energy_j']:.1f} J "
              f"({d['energy_source']}/{d['energy_method']}), energy/sample {d['energy_j'] / d['samples']:.4f} J")
    ok = code == 0 and done and done[0]["energy_source"] == "nvml"
    cfg.master_port = free_port()
    cfg.steps = 2
    code2, recs2 = run_worker(cfg, {"EDGETRAIN_EMU_MEM_BYTES": str(1 * 2**30)})
    ooms = [r for r in recs2 if r["type"] == "oom"]
    print(f"capped at 1 GiB: worker exit {code2}; oom records: "
          + "; ".join(f"phase {r['phase']}: {r['message'][:100]}" for r in ooms))
    ok = ok and code2 == 3 and bool(ooms)
    print("CUDA path OK" if ok else "CUDA path FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
