"""Worker entry point: ``python -m workers.train --rank R --config-b64 JOB``.

One worker per device.  It joins the run's process group, builds its part of the model,
trains on the deterministic global batches, and reports everything as telemetry v1 on
stdout (``workers.protocol``).  The loop itself (checkpoints, evaluation, stop, recovery
when a peer is lost) is :mod:`workers.loop`.  Exit codes: 0 done, 3 out of memory, 5 the
controller went away (after an emergency checkpoint if there was time), 6 stopped by the
controller (after a checkpoint), 1 any other error.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
import traceback

from . import lifeline
from .lifeline import EXIT_ERROR, EXIT_OK, EXIT_OOM


def _param_digest(state: dict) -> str:
    """sha256 over names and exact bytes of the parameters this rank holds."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _param_moments(state: dict, full_counts: dict[str, int], chunk: int = 1 << 20) -> dict[str, list]:
    """Layout-independent fingerprint of this rank's parameters (``param_moments``).

    Per full parameter name: ``[local_count, full_count, sum, sum_of_squares]`` of the
    tensor held here, summed in float64.  A shard's moments add up with its siblings'
    to the full tensor's whatever the shard layout (split, transposed, permuted), so the
    controller can assemble the whole model's moments from every rank and compare them
    with a one-device run (``app.run.fingerprint``).  Summed in chunks: no float64 copy
    of a large tensor on a small device.
    """
    import torch

    out: dict[str, list] = {}
    for name in sorted(state):
        t = state[name].detach()
        if t.is_meta or t.numel() == 0:
            continue
        total = squares = torch.zeros((), dtype=torch.float64, device=t.device)
        for part in t.reshape(-1).split(chunk):
            part = part.to(torch.float64)
            total = total + part.sum()
            squares = squares + part.dot(part)
        out[name] = [t.numel(), max(t.numel(), full_counts.get(name, 0)), float(total), float(squares)]
    return out


def _full_counts(model) -> dict[str, int]:
    """Element count of every parameter of the one-device model, by full name (a sharded
    DTensor parameter counts its global shape; a part left on ``meta`` still has its shape)."""
    return {name: p.numel() for name, p in model.named_parameters()}


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    # 0 means "not emulated": let the meter use its documented defaults
    return number if number and number > 0 else None


def _peak(tracker) -> int:
    """The memory that limits this device: the CUDA allocator's peak on a GPU, else RSS."""
    gpu = tracker.cuda_peak()
    return gpu if gpu is not None else tracker.peak()


def _cap_cuda_memory(torch, device) -> None:
    """Emulate a smaller GPU: cap the caching allocator at EDGETRAIN_EMU_MEM_BYTES.

    Allocations past the cap raise a real ``torch.OutOfMemoryError`` from the allocator.
    """
    cap = _env_float("EDGETRAIN_EMU_MEM_BYTES")
    if cap:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)


def run(cfg, rank: int, emitter, run_flags=None) -> int:
    """Train per ``cfg`` as ``rank``; returns the exit code.  Imports torch lazily so
    the ``hello`` line goes out before the slow imports."""
    from .memory import PeakTracker, is_oom_error, memory_limit_bytes, rss_bytes, tune_allocator

    limit, limit_src = memory_limit_bytes()
    tune_allocator()  # before the first tensor
    if run_flags is None:
        from .loop import RunFlags
        run_flags = RunFlags()
    phase = "import"
    trainer = None
    tracker = PeakTracker(cfg.device)
    try:
        import torch

        from . import dist as edist
        from . import engine
        from .data import load_dataset, split_eval
        from .energy import select_meter
        from .loop import TrainingLoop
        from .models import build_model

        threads = cfg.threads or int(os.environ.get("EDGETRAIN_EMU_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        phase = run_flags.phase = "rendezvous"
        # a stranger refused at the rendezvous gate goes into the run's events
        device = edist.init(rank, cfg.world_size, cfg.master_addr, cfg.master_port, cfg.addrs[rank],
                            device=cfg.device, timeout_s=cfg.timeout_s,
                            on_refused=lambda m: emitter.emit("event", name="rendezvous_refused", message=m))
        if cfg.device == "cuda":
            _cap_cuda_memory(torch, device)
        emitter.emit("event", name="joined", message=f"joined process group as rank {rank}/{cfg.world_size}")
        phase = run_flags.phase = "load"
        for field in ("dataset", "weights", "tokenizer"):  # pushed assets live under ~
            if getattr(cfg, field):
                setattr(cfg, field, os.path.expanduser(getattr(cfg, field)))
        model = build_model(cfg.model, weights=cfg.weights, seed=cfg.seed,
                            parts=engine.model_parts(cfg, rank))
        data, _vocab = load_dataset(cfg.dataset, model.family, model.preset.vocab_size, cfg.seq_len,
                                    cfg.seed, tokenizer_dir=cfg.tokenizer)
        data, eval_data = split_eval(data, cfg.seed)  # held out: never trained on
        trainer = run_flags.trainer = engine.build(cfg, rank, model, device)
        tracker.sample()
        meter = select_meter(cfg.device, cuda_index=device.index or 0,
                             p_idle_w=cfg.power.get("p_idle_w") or _env_float("EDGETRAIN_EMU_P_IDLE_W"),
                             p_max_w=cfg.power.get("p_max_w") or _env_float("EDGETRAIN_EMU_P_MAX_W"),
                             # the CPU share is over the threads this device may use, not the host's cores
                             threads=torch.get_num_threads())
        meter.start()
        emitter.emit("event", name="ready", message=f"model {cfg.model} loaded as {trainer.role}",
                     role=trainer.role, rss_bytes=rss_bytes(), mem_limit_bytes=limit,
                     energy_source=meter.source, energy_method=meter.method)
        loop = TrainingLoop(cfg, rank, trainer, data, eval_data, emitter, meter, tracker, run_flags, _peak)
        start = loop.resume() if cfg.resume_from else 0
        t_start = time.perf_counter()
        code = loop.run(start)
        if code is not None:
            return code
        trainer.phase = "finish"
        trainer.finish()
        wall = time.perf_counter() - t_start
        total = meter.read()
        meter.close()
        local = trainer.local_state()
        emitter.emit("done", steps=cfg.steps, samples=loop.samples, wall_s=wall,
                     energy_j=total.joules, energy_source=total.source, energy_method=total.method,
                     energy_detail=total.detail, peak_mem_bytes=_peak(tracker), peak_rss_bytes=tracker.peak(),
                     param_digest=_param_digest(local),
                     param_moments=_param_moments(local, _full_counts(model)), role=trainer.role)
        # No destroy_process_group: with gloo it can block when peers exit first (seen in
        # CI: a rank hung after its `done`). Every collective has finished by now and the
        # process leaves through os._exit, which closes its sockets.
        return EXIT_OK
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the controller
        if trainer is not None:
            phase = trainer.phase
        if isinstance(exc, KeyboardInterrupt):
            emitter.emit("error", message="interrupted", phase=phase)
            return EXIT_ERROR
        if is_oom_error(exc):
            emitter.emit("oom", phase=phase, message=str(exc).strip().splitlines()[0][:300] if str(exc) else type(exc).__name__,
                         rss_bytes=rss_bytes(), peak_mem_bytes=tracker.peak(), limit_bytes=limit,
                         limit_source=limit_src, role=getattr(trainer, "role", None))
            return EXIT_OOM
        tb = traceback.format_exc().strip().splitlines()
        emitter.emit("error", message=f"{type(exc).__name__}: {exc}"[:500], phase=phase,
                     traceback=tb[-6:])
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    from .config import JobConfig
    from .protocol import Emitter

    ap = argparse.ArgumentParser(prog="workers.train")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--config-b64", required=True)
    args = ap.parse_args(argv)
    cfg = JobConfig.from_b64(args.config_b64)
    emitter = Emitter(cfg.run_id, args.rank, cfg.devices[args.rank])
    cfg.validate()
    from .memory import limit_kind, memory_cgroup, memory_limit_bytes, oom_kill_count, rss_bytes
    limit, source = memory_limit_bytes()
    cgroup = memory_cgroup()
    # the controller tells a kernel OOM kill (SIGKILL, no word from us) by this counter rising
    mem = {"mem_limit_bytes": limit, "mem_limit_kind": limit_kind(source)}
    if cgroup is not None:
        mem.update(mem_cgroup=f"{cgroup[0]}:{cgroup[1]}", oom_kills=oom_kill_count(*cgroup))
    emitter.emit("hello", world_size=cfg.world_size, parallelism=cfg.parallelism, model=cfg.model,
                 pid=os.getpid(), host=socket.gethostname(), addr=cfg.addrs[args.rank],
                 python=sys.version.split()[0], **mem)
    from .loop import RunFlags  # torch: after the hello line

    flags = RunFlags()
    if cfg.lifeline_s > 0:
        # every heartbeat is answered: the controller tells a frozen worker by its silence
        lifeline.watch(cfg.lifeline_s, on_lost=flags.lost, on_command=flags.command,
                       on_beat=lambda: emitter.emit("beat", phase=flags.current_phase(), rss_bytes=rss_bytes()))
    code = EXIT_ERROR
    try:
        code = run(cfg, args.rank, emitter, flags)
        sys.stdout.flush()
    finally:
        # os._exit: a failed process group can leave gloo threads that block interpreter exit
        os._exit(code)


if __name__ == "__main__":
    main()
