"""Measure what the planner's cost model needs, on this machine, with the real worker code.

Each configuration runs in a fresh process (``--child``): import torch/transformers,
join a one-rank gloo group exactly as a worker does (``workers.dist.init``), build the
preset with ``workers.models``, wrap it in the DP trainer (DDP, AdamW) and time forward,
backward and optimizer separately over a few steps, resetting the kernel's RSS
high-water mark (``/proc/self/clear_refs``) before each phase.  The parent fits the
constants of ``app/planner/costmodel.py`` and prints them.

Usage::

    .venv/bin/python bench/plan_calibrate.py --save out.json   # measure + fit (~4 min)
    .venv/bin/python bench/plan_calibrate.py --load bench/data/plan_calibration.json  # refit
    .venv/bin/python bench/plan_calibrate.py --saved    # saved-activation floats per token
    .venv/bin/python bench/plan_calibrate.py --overhead # RSS/virtual of a bare worker runtime
    .venv/bin/python bench/plan_calibrate.py --embed    # cost of the dense embedding gradient
    .venv/bin/python bench/plan_calibrate.py --pipeline # per-message cost of a pipeline (p2p_s)

The time fit uses one-thread runs and *CPU* time (``time.process_time``): torch runs its
ops on the calling thread then, so the figure is the work's own cost even when other
processes share the host (wall time on the shared 2-core calibration host varied 2x).

Run it on an otherwise idle machine: the timings are the calibration.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.dist import free_port  # noqa: E402

# (label, preset overrides, batch, seq, threads, steps); custom shapes vary h / L / ffn
# independently so that matmul FLOPs, activation traffic and per-block overhead separate.
CONFIGS = [
    ("tiny-gpt2", {}, 32, 32, 1, 6),
    ("tiny-gpt2", {}, 128, 32, 1, 6),
    ("tiny-gpt2", {}, 512, 32, 1, 4),
    ("tiny-bert", {}, 128, 32, 1, 6),
    ("tiny-bert", {}, 512, 32, 1, 4),
    ("tiny-opt", {}, 128, 32, 1, 6),
    ("tiny-gpt2", {"n_layer": 12}, 128, 32, 1, 5),
    ("tiny-gpt2", {"hidden": 256, "ffn": 1024}, 128, 32, 1, 4),
    ("tiny-gpt2", {"hidden": 256, "ffn": 1024, "n_layer": 8}, 64, 64, 1, 4),
    ("distilbert", {}, 16, 32, 1, 3),
    ("gpt2-s", {}, 8, 32, 1, 3),
    ("gpt2-s", {}, 32, 32, 1, 3),
    ("tiny-gpt2", {}, 128, 32, 2, 6),
    ("gpt2-s", {}, 16, 32, 2, 3),
    ("tiny-opt", {}, 512, 32, 1, 4),
    ("tiny-opt", {"hidden": 256, "ffn": 1024, "word_embed_proj_dim": 128}, 128, 32, 1, 4),
    ("tiny-opt", {"hidden": 256, "ffn": 1024, "n_layer": 6, "do_layer_norm_before": True,
                  "word_embed_proj_dim": None}, 128, 32, 1, 4),
]


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmSize", "VmPeak"):
                out[key] = int(val.split()[0]) * 1024
    return out


def _clear_refs() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")




def matmul_gflops(torch, seconds: float = 0.6, clock=time.perf_counter, n: int = 512) -> float:
    """fp32 GEMM rate on n^3; 512 is what ``workers.probe`` (a profile's gflops_fp32) uses."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, clock()
    while clock() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (clock() - t0) / 1e9


def child(spec: dict) -> dict:
    """One configuration in this process (see module doc)."""
    from dataclasses import replace

    from workers.memory import tune_allocator
    tune_allocator()  # as a worker does (workers/train.py), before torch loads

    import torch
    torch.set_num_threads(spec["threads"])
    import torch.nn.functional as F

    from workers import dist as edist
    from workers import engine
    from workers.config import JobConfig
    from workers.data import global_batch, load_dataset
    from workers.models import _MODEL_CLASSES, PRESETS, StagedModel, hf_config

    marks: dict[str, dict[str, int]] = {}
    port = free_port()
    cfg = JobConfig(run_id="cal", world_size=1, master_addr="127.0.0.1", master_port=port,
                    addrs=["127.0.0.1"], devices=["d0"], model=spec["preset"], batch_size=spec["batch"],
                    seq_len=spec["seq"], steps=spec["steps"], sync_every=1)
    dev = edist.init(0, 1, "127.0.0.1", port, "127.0.0.1")
    marks["runtime"] = _status()
    # The best of three: other processes on the host only ever slow a measurement down.
    gflops = max(matmul_gflops(torch, 0.3) for _ in range(3))
    # On one thread, CPU time is what the work costs; wall time also counts the time
    # slices other processes on a shared host took (the calibration host is shared).
    gflops_cpu = max(matmul_gflops(torch, 0.3, time.process_time) for _ in range(3))
    # what a profile measures of the non-matmul work (workers.compute_probe.op_seconds): the
    # fit's fixed terms are at this figure, which the planner scales devices' by
    from workers.compute_probe import op_seconds
    op_probe_s = min(op_seconds(0.3) for _ in range(3))
    preset = replace(PRESETS[spec["preset"]], **spec["overrides"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = StagedModel(_MODEL_CLASSES[preset.family](hf_config(preset)), preset)
    model.train()
    data, _ = load_dataset(None, model.family, preset.vocab_size, spec["seq"], 0)
    marks["model"] = _status()
    trainer = engine.build(cfg, 0, model, dev)
    marks["trainer"] = _status()
    phases: dict[str, list[float]] = {"fwd": [], "bwd": [], "opt": []}
    cpu: dict[str, list[float]] = {"fwd": [], "bwd": [], "opt": []}
    hwm: dict[str, list[int]] = {"fwd": [], "bwd": [], "opt": []}
    vm: dict[str, list[int]] = {"fwd": [], "bwd": [], "opt": []}

    def timed(phase: str, fn) -> object:
        _clear_refs()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        phases[phase].append(time.perf_counter() - t0)
        cpu[phase].append(time.process_time() - c0)
        s = _status()
        hwm[phase].append(s["VmHWM"])
        vm[phase].append(s["VmSize"])
        return out

    def opt_step() -> None:
        trainer.opt.step()
        trainer.opt.zero_grad(set_to_none=True)

    for it in range(spec["steps"]):
        ids, labels = global_batch(data, it, spec["batch"], 0)
        loss = timed("fwd", lambda: F.cross_entropy(trainer.ddp(ids), labels))
        timed("bwd", loss.backward)
        timed("opt", opt_step)
    marks["end"] = _status()
    return {"spec": spec, "gflops": gflops, "gflops_cpu": gflops_cpu, "op_probe_s": op_probe_s, "marks": marks, "times": phases, "cpu": cpu, "hwm": hwm, "vm": vm,
            "params": sum(p.numel() for p in model.parameters())}


def pipeline_child(spec: dict) -> dict:
    """Rank ``spec["rank"]`` of a 2-stage pipeline (the worker's PP trainer, gloo): CPU and
    wall seconds of each step."""
    from workers.memory import tune_allocator
    tune_allocator()  # before torch loads, as a worker does

    import torch
    torch.set_num_threads(1)

    from workers import dist as edist
    from workers import engine
    from workers.compute_probe import op_seconds
    from workers.config import JobConfig
    from workers.data import global_batch, load_dataset
    from workers.models import build_model
    from workers.parallel.pp import model_parts

    rank, port = spec["rank"], spec["port"]
    cut = spec["cut"]
    cfg = JobConfig(run_id="cal", world_size=2, master_addr="127.0.0.1", master_port=port,
                    addrs=["127.0.0.1"] * 2, devices=["d0", "d1"], model=spec["preset"], parallelism="pp",
                    batch_size=spec["batch"], seq_len=spec["seq"], steps=spec["steps"],
                    micro_batches=spec["micro_batches"], schedule=spec["schedule"],
                    stages=[{"ranks": [0], "layers": [0, cut]}, {"ranks": [1], "layers": [cut, spec["n_layer"]]}])
    op_probe_s = min(op_seconds(0.3) for _ in range(3))
    dev = edist.init(rank, 2, "127.0.0.1", port, "127.0.0.1")
    model = build_model(spec["preset"], parts=model_parts(cfg, rank))
    model.train()
    trainer = engine.build(cfg, rank, model, dev)
    data, _ = load_dataset(None, model.family, model.preset.vocab_size, spec["seq"], 0)
    cpu, wall = [], []
    for it in range(spec["steps"]):
        ids, labels = global_batch(data, it, spec["batch"], 0)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(it, ids, labels)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return {"spec": spec, "cpu": cpu, "wall": wall, "op_probe_s": op_probe_s}


def pipeline_calibration(micro_batches=(1, 2, 4, 8, 16), preset: str = "tiny-gpt2", batch: int = 128) -> None:
    """Fit ``Calibration.p2p_s``: the CPU a stage spends per boundary message beyond its
    compute (gloo send/recv, the schedule's bookkeeping per action), from 2-stage runs of
    the worker's PP trainer with 1 to 16 micro-batches of the same batch.

    Each stage's median CPU seconds per step (after the first) is set against the cost
    model's compute + optimizer for that stage at the stage's own op probe and this
    host's matmul rate; the residual, per micro-batch and message, is the fit.  Every
    stage sends one message and receives one per micro-batch and direction pair
    (forward activations one way, gradients back).
    """
    import numpy as np

    from app.planner import costmodel as cm
    from app.planner.links import Links
    from app.planner.pipeline import eval_pipeline
    from app.planner.shape import resolve_model
    from workers.config import RunSettings
    from workers.presets import PRESETS as P

    n_layer = P[preset].n_layer
    cut = n_layer // 2
    import torch
    torch.set_num_threads(1)
    g1 = max(matmul_gflops(torch, 0.3, time.process_time) for _ in range(3))
    xs, ys = [], []
    print(f"{preset} b{batch}, 2 stages [0,{cut}) [{cut},{n_layer}), gpipe, 1 thread each; host {g1:.0f} GFLOP/s")
    print(f"{'M':>3} {'stage':>5} {'cpu ms':>8} {'wall ms':>8} {'model ms':>9} {'resid/mb ms':>11}")
    for m in micro_batches:
        port = free_port()
        procs = []
        for rank in (0, 1):
            spec = dict(pipeline=True, rank=rank, port=port, preset=preset, batch=batch, seq=32, steps=8,
                        micro_batches=m, schedule="gpipe", cut=cut, n_layer=n_layer)
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
        outs = []
        for pr in procs:
            out, err = pr.communicate(timeout=900)
            if pr.returncode != 0:
                raise RuntimeError(err[-3000:])
            outs.append(json.loads(out.strip().splitlines()[-1]))
        st = RunSettings(model=preset, parallelism="pp", batch_size=batch, seq_len=32, micro_batches=m)
        for rank, r in enumerate(outs):
            spec = cm.DeviceSpec(f"d{rank}", gflops=g1, mem_bytes=None, op_probe_s=r["op_probe_s"])
            other = cm.DeviceSpec(f"d{1 - rank}", gflops=g1, mem_bytes=None, op_probe_s=r["op_probe_s"])
            specs = [spec, other] if rank == 0 else [other, spec]
            # the model without its per-message term: p2p_s 0, links instant
            cal0 = replace(cm.CALIBRATION, p2p_s=0.0)
            ev = eval_pipeline("pp", resolve_model(preset), st, specs, Links(default_mbps=1e9, default_rtt_ms=0.0),
                               stages=[{"ranks": [0], "layers": [0, cut]}, {"ranks": [1], "layers": [cut, n_layer]}],
                               cal=cal0)
            d = ev.devices[rank]
            model_s = d.compute_s + d.optimizer_s
            cpu = float(np.median(r["cpu"][1:]))
            wall = float(np.median(r["wall"][1:]))
            # two messages per micro-batch per stage (one sent, one received)
            xs.append(2 * m * cm.slowness(spec, cal0))
            ys.append(cpu - model_s)
            print(f"{m:>3} {rank:>5} {cpu * 1e3:8.1f} {wall * 1e3:8.1f} {model_s * 1e3:9.1f} "
                  f"{(cpu - model_s) / m * 1e3:11.2f}", flush=True)
    # residual = p2p_s x messages x slowness + a per-step constant (not the model's)
    a = np.stack([np.array(xs), np.ones(len(xs))], axis=1)
    (k, c), *_ = np.linalg.lstsq(a, np.array(ys), rcond=None)
    print(f"fit: p2p_s {k:.3g} s per message at the reference op probe (per-step residual {c * 1e3:.1f} ms)")


def run_child(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def saved_floats() -> None:
    """Print floats saved for backward per token by embed / one block / head."""
    import torch

    from workers.models import build_model
    torch.set_num_threads(1)

    def count(model, part: str, batch: int = 4, seq: int = 32) -> float:
        seen: dict[tuple[int, int], int] = {}

        def pack(t):
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
            return t

        ids = torch.randint(4, 100, (batch, seq))
        with torch.no_grad():
            h0 = model.embed(ids)
        h0.requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if part == "embed":
                model.embed(ids)
            elif part == "block":
                model.blocks[0](h0)
            else:
                model.head(h0)
        skip = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
        skip.add((h0.untyped_storage().data_ptr(), h0.untyped_storage().nbytes()))
        return sum(v for k, v in seen.items() if k not in skip) / (batch * seq * 4)

    for name in ("tiny-gpt2", "tiny-bert", "tiny-opt", "gpt2-s", "distilbert"):
        m = build_model(name)
        print(name, {part: round(count(m, part), 2) for part in ("embed", "block", "head")})


def embed_cost() -> None:
    """CPU time of half of gpt2-s with and without the embeddings, micro-batches of 8."""
    from workers.memory import tune_allocator
    tune_allocator()  # as a worker does (workers/train.py)
    import torch

    from workers.models import build_model
    torch.set_num_threads(1)
    m = build_model("gpt2-s")
    ids = torch.randint(4, 1000, (32, 32))

    from workers.engine import densify_grads, sparse_embedding_grads

    def stage(first: bool, tables: list | None = None) -> float:
        for p in m.parameters():
            p.grad = None
        c0 = time.process_time()
        for i in range(4):
            if first:
                h = m.embed(ids[8 * i:8 * (i + 1)])
                for b in m.blocks[:6]:
                    h = b(h)
                h.sum().backward()
            else:
                h = torch.randn(8, 32, 768, requires_grad=True)
                for b in m.blocks[6:]:
                    h = b(h)
                m.head(h).sum().backward()
        if tables:
            densify_grads(tables)  # as a pipeline stage does before its optimizer
        return (time.process_time() - c0) / 4

    t0 = min(stage(True) for _ in range(3))
    t1 = min(stage(False) for _ in range(3))
    emb = m.preset.vocab_size * m.preset.hidden * 4
    print(f"per micro-batch: embed+blocks 0-5 {t0:.3f} s, blocks 6-11+head {t1:.3f} s -> "
          f"{(t0 - t1) / emb:.3g} s per byte of the embedding gradient (embed_grad_s_per_byte)")
    tables = sparse_embedding_grads(m)  # a pipeline stage's way: sparse, dense once per step
    ts = min(stage(True, tables) for _ in range(3))
    print(f"sparse, made dense once per 4 micro-batches: embed+blocks 0-5 {ts:.3f} s per micro-batch -> "
          f"{4 * (ts - t1) / emb:.3g} s per byte per step (embed_densify_s_per_byte)")


def overhead() -> None:
    """RSS and virtual size of the worker runtime (imports + a gloo group), no model."""
    code = ("import resource, torch, transformers, socket\n"
            "import workers.train, workers.engine, workers.data, workers.models, workers.dist as d\n"
            "s=socket.socket(); s.bind(('127.0.0.1',0)); p=s.getsockname()[1]; s.close()\n"
            "d.init(0,1,'127.0.0.1',p,'127.0.0.1')\n"
            "st={l.split(':')[0]: int(l.split()[1])*1024 for l in open('/proc/self/status') if l.startswith('Vm')}\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024, st['VmRSS'], st['VmSize'])\n")
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        maxrss, rss, vms = map(int, out.stdout.split())
        print(f"threads {threads}: ru_maxrss {maxrss / 2**20:.0f} MiB  rss {rss / 2**20:.0f} MiB  "
              f"virtual {vms / 2**20:.0f} MiB")


def _nnls(a, y):
    """Non-negative least squares by trying every support (few unknowns: 2^n subsets)."""
    import itertools

    import numpy as np
    n = a.shape[1]
    best, best_r = np.zeros(n), float(np.sum(y ** 2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (x < 0).any():
                continue
            full = np.zeros(n)
            full[list(cols)] = x
            r = float(np.sum((a @ full - y) ** 2))
            if r < best_r:
                best, best_r = full, r
    return best


def fit(results: list[dict]) -> None:
    """Fit the time constants (one-thread runs, CPU time) and print the memory terms.

    One thread: torch runs its ops on the calling thread, so the process CPU time is
    the work's cost even when other processes share the host; the 2-thread rows are
    wall-clock checks of the thread scaling, not part of the fit.
    """
    from dataclasses import replace

    import numpy as np

    from app.planner.shape import ModelShape
    from workers.models import PRESETS

    rows, ys, orows, oys, info = [], [], [], [], []
    # the fixed terms scale by each run's op probe against the median (host drift between
    # configurations); files from before the probe existed have none: scale 1
    probes = [r["op_probe_s"] for r in results if r.get("op_probe_s")]
    ref_probe = float(np.median(probes)) if probes else None
    for r in results:
        scale = r["op_probe_s"] / ref_probe if ref_probe and r.get("op_probe_s") else 1.0
        sp = r["spec"]
        shape = ModelShape.from_preset(replace(PRESETS[sp["preset"]], **sp["overrides"]))
        tokens = sp["batch"] * sp["seq"]
        flops = 3 * (shape.n_layer * shape.block_fwd_flops(tokens, sp["seq"]) + shape.embed_fwd_flops(tokens)
                     + shape.head_fwd_flops(sp["batch"]))
        act = tokens * FP32 * (shape.n_layer * shape.block_saved_floats_per_token()
                               + shape.embed_saved_floats_per_token() + shape.head_saved_floats_per_token())
        one = sp["threads"] == 1
        src = r["cpu"] if one else r["times"]
        g = (r["gflops_cpu"] if one else r["gflops"]) * 1e9
        # min over the steady steps: other load on the host only ever adds time
        t_fb = min(a + b for a, b in zip(src["fwd"][1:], src["bwd"][1:]))
        t_opt = min(src["opt"][1:])
        n_t = 12 * shape.n_layer + 6
        # the dense token-embedding gradient is allocated and accumulated every micro-step:
        # a fixed cost per byte measured separately (``--embed``), taken out before the fit
        emb = shape.vocab_size * shape.proj * FP32
        t_fb -= EMBED_GRAD_S_PER_BYTE * emb * scale
        row = np.array([flops / g, act * scale, shape.n_layer * scale, scale])
        orow = np.array([r["params"] * scale, n_t * scale])
        if one:
            rows.append(row / t_fb), ys.append(1.0)
            orows.append(orow / t_opt), oys.append(1.0)
        info.append((r, shape, row, orow, t_fb, t_opt, g, act, one, scale))
    x = _nnls(np.array(rows), np.array(ys))
    xo = _nnls(np.array(orows), np.array(oys))
    g1 = max(r["gflops_cpu"] for r in results if r["spec"]["threads"] == 1)
    print(f"host matmul (512^3, 1 thread, CPU time): {g1:.0f} GFLOP/s  (ref_core_gflops)")
    if ref_probe:
        print(f"op probe (workers.compute_probe.op_seconds, median of the runs): {ref_probe * 1e3:.3f} ms  "
              f"(ref_op_probe_s; runs {min(probes) * 1e3:.3f}-{max(probes) * 1e3:.3f})")
    print(f"fit: matmul_efficiency {1 / x[0] if x[0] else float('inf'):.3f}  act_s_per_byte {x[1]:.3g}  "
          f"block_s {x[2]:.3g}  step_s {x[3]:.3g}  (embed_grad_s_per_byte {EMBED_GRAD_S_PER_BYTE:.3g}, fixed)")
    print(f"optimizer: opt_s_per_param {xo[0]:.3g}  opt_s_per_tensor {xo[1]:.3g}")
    mib = 2 ** 20
    print(f"{'config':<44} {'thr':>3} {'t_fb':>7} {'pred':>7} {'err':>5} {'t_opt':>7} {'pred':>7} | "
          f"{'rss0':>5} {'vm0':>5} | {'W':>6} {'act':>6} | {'hwm':>6} {'extra':>6} {'x act':>5} | {'vm-rss':>6}")
    for r, shape, row, orow, t_fb, t_opt, g, act, one, scale in info:
        sp = r["spec"]
        pred = float(row @ x) if one else float(row @ x)  # 2 threads: same formula, g is 2-thread
        if not one:  # fixed terms do not speed up with threads; matmuls do (row[0] uses g)
            pred = float(row[0] * x[0] + (row[1:] @ x[1:]))
        pred += EMBED_GRAD_S_PER_BYTE * shape.vocab_size * shape.proj * FP32 * scale
        t_fb += EMBED_GRAD_S_PER_BYTE * shape.vocab_size * shape.proj * FP32 * scale
        pred_o = float(orow @ xo)
        m = r["marks"]
        w = r["params"] * 4
        peak = max(max(v) for v in r["hwm"].values())
        extra = peak - m["runtime"]["VmRSS"] - 5 * w
        vm_gap = m["end"]["VmPeak"] - peak
        label = f"{sp['preset']}{sp['overrides'] or ''} b{sp['batch']} s{sp['seq']}"
        print(f"{label:<44} {sp['threads']:>3} {t_fb:7.3f} {pred:7.3f} {100 * (pred / t_fb - 1):+4.0f}% "
              f"{t_opt:7.4f} {pred_o:7.4f} | {m['runtime']['VmRSS'] / mib:5.0f} {m['runtime']['VmSize'] / mib:5.0f} | "
              f"{w / mib:6.1f} {act / mib:6.1f} | {peak / mib:6.0f} {extra / mib:6.0f} {extra / act:5.2f} | "
              f"{vm_gap / mib:6.0f}")


FP32 = 4
#: gpt2-s, one thread, CPU time: embeddings + blocks 0-5 take ~0.10 s more per micro-batch
#: of 8 than blocks 6-11 + head (0.59 vs 0.49 s): the dense 154 MB token-embedding
#: gradient, allocated and accumulated per micro-batch (``--embed`` re-measures it).
EMBED_GRAD_S_PER_BYTE = 0.65e-9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--saved", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--embed", action="store_true")
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--only", help="comma-separated indices of CONFIGS")
    ap.add_argument("--save", help="write raw results JSON here")
    ap.add_argument("--load", nargs="+", help="fit from saved results JSON files")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(pipeline_child(spec) if spec.get("pipeline") else child(spec)))
        return
    if args.pipeline:
        pipeline_calibration()
        return
    if args.saved:
        saved_floats()
        return
    if args.overhead:
        overhead()
        return
    if args.embed:
        embed_cost()
        return
    if args.load:
        results = [r for f in args.load for r in json.loads(Path(f).read_text())]
    else:
        picks = [int(i) for i in args.only.split(",")] if args.only else range(len(CONFIGS))
        results = []
        for i in picks:
            name, over, batch, seq, threads, steps = CONFIGS[i]
            spec = dict(preset=name, overrides=over, batch=batch, seq=seq, threads=threads, steps=steps)
            results.append(run_child(spec))
            print(f"done {name} {over} b{batch} t{threads}", file=sys.stderr, flush=True)
        if args.save:
            Path(args.save).write_text(json.dumps(results))
    fit(results)


if __name__ == "__main__":
    main()
