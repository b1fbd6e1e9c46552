"""Issue 4, acceptance 2: GPT2-L split over 4 pipeline stages loads on 4 GB devices.

Each stage runs in its own spawned process capped with ``RLIMIT_AS`` (default 4 GiB, a
Jetson Nano's memory), joins a real 4-rank process group (``edgegloo`` on 127.0.0.x),
builds only its parts (``build_model(parts=model_parts(cfg, rank))``) and the pipeline
trainer (``PipelineStage`` + schedule + optimizer).  It prints its block range, the
parameters it holds, RSS, peak RSS and peak virtual size after load, and whether it got
past load.  Then one process under the same cap tries the whole model, as a single
device would: once as a bare ``build_model`` and once as an EdgeTrain worker does it (a
1-rank gloo group, then the DP trainer); an allocation failure is caught and reported.

``--step`` also runs one training step per stage (batch 4 x 32 tokens, 4 micro-batches)
to show whether the stages' *training* state (gradients + AdamW's two moments, 4x the
parameters) fits too.  Parameters are fp32 and randomly initialised (seeded per part).

Usage::

    .venv/bin/python bench/gpt2l_pp_load.py [--cap-gib 4] [--stages 4] [--step]
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.dist import free_port  # noqa: E402

GIB = 1024 ** 3


def _vm_peak() -> int:
    """Peak virtual size (``VmPeak``): what ``RLIMIT_AS`` bounds."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    return 0




def balanced_stages(name: str, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges with near-equal parameter counts (embed counts to stage 0).

    Built on ``meta``: nothing is allocated.
    """
    from workers.models import build_model

    model = build_model(name, parts=[])
    sizes = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    embed = sum(p.numel() for p in model.embed.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    total = embed + sum(sizes) + head
    before = [embed]  # before[i]: parameters ahead of block i
    for size in sizes:
        before.append(before[-1] + size)
    cuts = [0]
    for s in range(1, n_stages):
        # the cut closest to s/n of the model, leaving a block for every later stage
        options = range(cuts[-1] + 1, len(sizes) - (n_stages - s) + 1)
        cuts.append(min(options, key=lambda i: abs(before[i] - total * s / n_stages)))
    cuts.append(len(sizes))
    return list(zip(cuts[:-1], cuts[1:]))


def _stage_main(rank: int, cfg, cap: int, step: bool, out_dir: str) -> None:
    from workers.memory import apply_memory_limit, is_oom_error, peak_rss_bytes, rss_bytes

    apply_memory_limit(cap)  # first thing: everything below runs under the device's cap
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res: dict = {"rank": rank, "layers": cfg.stages[rank]["layers"]}
    phase = "import"
    try:
        import torch

        from workers import dist as edist
        from workers import engine
        from workers.parallel.pp import model_parts

        torch.set_num_threads(1)
        phase = "rendezvous"
        edist.init(rank, cfg.world_size, cfg.master_addr, cfg.master_port, cfg.addrs[rank],
                   timeout_s=cfg.timeout_s)
        from workers.models import build_model

        phase = "load"
        t0 = time.perf_counter()
        parts = model_parts(cfg, rank)
        model = build_model(cfg.model, seed=cfg.seed, parts=parts)
        trainer = engine.build(cfg, rank, model, torch.device("cpu"))
        res.update(loaded=True, load_s=time.perf_counter() - t0, role=trainer.role,
                   parts=[str(p) for p in parts if not isinstance(p, int)],
                   params=sum(p.numel() for p in trainer.module.parameters()),
                   rss=rss_bytes(), peak=peak_rss_bytes(), vm_peak=_vm_peak())
        if step:
            phase = "step"
            ids = torch.randint(1, model.preset.vocab_size, (cfg.batch_size, cfg.seq_len),
                                generator=torch.Generator().manual_seed(0))
            labels = torch.randint(0, 2, (cfg.batch_size,), generator=torch.Generator().manual_seed(1))
            t0 = time.perf_counter()
            out = trainer.train_step(0, ids, labels)
            res.update(stepped=True, step_s=time.perf_counter() - t0, loss=out.loss,
                       step_peak=peak_rss_bytes(), step_vm_peak=_vm_peak())
        edist.shutdown()
    except BaseException as exc:  # noqa: BLE001 - report any failure, then exit
        if phase == "step":
            phase = f"step/{trainer.phase}"  # forward, backward or optimizer
        res.update(failed_phase=phase, oom=is_oom_error(exc),
                   error=(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160],
                   fail_rss=rss_bytes(), fail_peak=peak_rss_bytes(), fail_vm_peak=_vm_peak())
        if not res["oom"]:
            res["traceback"] = traceback.format_exc().splitlines()[-4:]
    with open(Path(out_dir) / f"stage{rank}.pkl", "wb") as f:
        pickle.dump(res, f)
    # A peer that failed leaves gloo threads behind; don't wait for them.
    os._exit(0)


def _single_main(_: int, name: str, cap: int, worker: bool, out_dir: str) -> None:
    """The whole model in one capped process: a bare build, or (``worker``) what an
    EdgeTrain worker on one device does: join a 1-rank gloo group, build, DP trainer."""
    from workers.memory import apply_memory_limit, is_oom_error, peak_rss_bytes, rss_bytes

    apply_memory_limit(cap)
    res: dict = {}
    phase = "import"
    try:
        import torch

        from workers import dist as edist
        from workers import engine
        from workers.config import JobConfig
        from workers.models import build_model

        torch.set_num_threads(1)
        if worker:
            cfg = JobConfig(run_id="single", world_size=1, master_addr="127.0.0.1",
                            master_port=free_port(), addrs=["127.0.0.1"], devices=["nano"],
                            model=name, parallelism="dp", batch_size=4, steps=1)
            phase = "rendezvous"
            edist.init(0, 1, cfg.master_addr, cfg.master_port, cfg.addrs[0], timeout_s=60)
        phase = "load: build_model"
        t0 = time.perf_counter()
        model = build_model(name)
        if worker:
            phase = "load: DP trainer (DDP gradient buckets)"
            engine.build(cfg, 0, model, torch.device("cpu"))
        res.update(loaded=True, load_s=time.perf_counter() - t0,
                   params=sum(p.numel() for p in model.parameters()))
    except BaseException as exc:  # noqa: BLE001
        res.update(loaded=False, phase=phase, oom=is_oom_error(exc), error_type=type(exc).__name__,
                   error=(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160])
    res.update(rss=rss_bytes(), peak=peak_rss_bytes(), vm_peak=_vm_peak())
    with open(Path(out_dir) / f"single{int(worker)}.pkl", "wb") as f:
        pickle.dump(res, f)
    os._exit(0)


def _gb(n: int | None) -> str:
    return f"{n / GIB:5.2f} GiB" if n else "    -    "


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-l")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--cap-gib", type=float, default=4.0, help="RLIMIT_AS per process")
    ap.add_argument("--step", action="store_true", help="also run one training step per stage")
    ap.add_argument("--skip-single", action="store_true")
    args = ap.parse_args(argv)

    import torch.multiprocessing as mp

    from workers.config import JobConfig
    from workers.models import param_count

    cap = int(args.cap_gib * GIB)
    ranges = balanced_stages(args.model, args.stages)
    n = args.stages
    cfg = JobConfig(run_id="gpt2l-load", world_size=n, master_addr="127.0.0.1", master_port=free_port(),
                    addrs=[f"127.0.0.{i + 1}" for i in range(n)], devices=[f"nano{i}" for i in range(n)],
                    model=args.model, parallelism="pp", batch_size=4, seq_len=32, micro_batches=4,
                    steps=1, stages=[{"ranks": [i], "layers": list(r)} for i, r in enumerate(ranges)],
                    schedule="gpipe", timeout_s=600)
    total = param_count(args.model)
    print(f"{args.model}: {total / 1e6:.0f}M params = {total * 4 / 1e9:.2f} GB fp32; "
          f"{n} stages, RLIMIT_AS {args.cap_gib:g} GiB per process")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.start_processes(_stage_main, args=(cfg, cap, args.step, tmp), nprocs=n,
                           start_method="spawn", join=True)
        print(f"\npipeline stages ({time.perf_counter() - t0:.0f} s incl. spawn and imports):")
        print("stage  blocks    extra        params    RSS        peak RSS   peak VM    past load")
        for r in range(n):
            res = pickle.loads((Path(tmp) / f"stage{r}.pkl").read_bytes())
            a, b = res["layers"]
            loaded = res.get("loaded", False)
            ok &= loaded
            at = "" if loaded else "fail_"
            print(f"{r:>5}  [{a:>2},{b:>2})   {'+'.join(res.get('parts', [])) or '-':<11}"
                  f"{res.get('params', 0) / 1e6:7.1f}M  {_gb(res[at + 'rss'])}  {_gb(res[at + 'peak'])}  "
                  f"{_gb(res[at + 'vm_peak'])}  {'yes' if loaded else 'NO'}"
                  + (f"  (load {res['load_s']:.1f} s)" if loaded else
                     f"  failed in {res['failed_phase']}: {res['error']}"))
            if "traceback" in res:
                print("        " + "\n        ".join(res["traceback"]))
        if args.step:
            print("\none training step (batch 4 x 32, 4 micro-batches, AdamW):")
            for r in range(n):
                res = pickle.loads((Path(tmp) / f"stage{r}.pkl").read_bytes())
                if res.get("stepped"):
                    print(f"  stage {r}: ok in {res['step_s']:.1f} s, peak RSS {_gb(res['step_peak'])}, "
                          f"peak VM {_gb(res['step_vm_peak'])}, loss {res['loss']}")
                elif res.get("loaded"):
                    print(f"  stage {r}: failed in {res['failed_phase']}"
                          f"{' (allocation failure)' if res.get('oom') else ''}: {res['error']}")
        if not args.skip_single:
            for worker in (False, True):
                mp.start_processes(_single_main, args=(args.model, cap, worker, tmp), nprocs=1,
                                   start_method="spawn", join=True)
                res = pickle.loads((Path(tmp) / f"single{int(worker)}.pkl").read_bytes())
                what = ("as an EdgeTrain worker (1-rank gloo group + DP trainer)" if worker
                        else "bare process, build_model only")
                print(f"\nsingle device, whole {args.model}, same cap, {what}:")
                if res.get("loaded"):
                    print(f"  loaded ({res['params'] / 1e6:.0f}M params) in {res['load_s']:.1f} s; "
                          f"RSS {_gb(res['rss'])}, peak VM {_gb(res['vm_peak'])}")
                else:
                    kind = "allocation failure (caught)" if res["oom"] else "error"
                    print(f"  {kind} in {res['phase']}: {res['error_type']}: {res['error']}")
                    print(f"  at failure: RSS {_gb(res['rss'])}, peak RSS {_gb(res['peak'])}, "
                          f"peak VM {_gb(res['vm_peak'])}")
    print(f"\nresult: {'every stage got past load' if ok else 'some stage did NOT get past load'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
