"""Harness for equivalence tests: a parallel run vs one-device training.

``reference(...)`` trains the whole StagedModel in this process on the same global
batches (with gradient accumulation over ``sync_every`` iterations for DP).
``run_parallel(...)`` spawns ``world`` real torch.distributed ranks (gloo bound to
127.0.0.x like the testbed's devices), runs the parallelism's trainer for the given
iterations and returns each rank's losses, ``full_state()`` and the gradients its first
optimizer step applied.

Why gradients: the optimizer is AdamW, whose update ``m / (sqrt(v) + eps)`` is almost
blind to the gradients' scale, so parameters after a few steps barely notice a gradient
that is k times too big (a missing ``/k``) or W times too small (an average where a sum
was due).  ``assert_grads_match`` compares the first step's gradients entry by entry
with a tolerance that no wrong scale passes.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from workers.config import JobConfig
from workers.dist import free_port  # also re-exported for the parallel tests


def make_cfg(parallelism: str, world: int, model: str = "tiny-gpt2", steps: int = 3, batch_size: int = 16,
             seq_len: int = 16, sync_every: int = 1, micro_batches: int = 4, stages: list[dict] | None = None,
             schedule: str = "gpipe", lr: float = 1e-3, seed: int = 0) -> JobConfig:
    return JobConfig(run_id="equiv", world_size=world, master_addr="127.0.0.1", master_port=free_port(),
                     addrs=[f"127.0.0.{i + 1}" for i in range(world)], devices=[f"d{i}" for i in range(world)],
                     model=model, parallelism=parallelism, batch_size=batch_size, seq_len=seq_len,
                     micro_batches=micro_batches, sync_every=sync_every, steps=steps, lr=lr, seed=seed,
                     stages=stages or [], schedule=schedule, timeout_s=60)


def _data(cfg: JobConfig, model):
    """The training rows, as a worker sees them (the held-out split removed)."""
    from workers.data import load_dataset, split_eval
    data, _ = load_dataset(cfg.dataset, model.family, model.preset.vocab_size, cfg.seq_len, cfg.seed)
    return split_eval(data, cfg.seed)[0]


def reference(cfg: JobConfig) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, full model, same batches; optimizer step every ``sync_every`` iterations
    (DP) or every iteration (others).  Returns per-iteration losses, final params and the
    gradients the first optimizer step applied (accumulated over ``sync_every`` iterations
    for DP), all by full parameter name."""
    from workers.data import global_batch
    from workers.engine import make_optimizer
    from workers.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, seed=cfg.seed)
    data = _data(cfg, model)
    opt = make_optimizer(model.parameters(), cfg)
    k = cfg.sync_every if cfg.parallelism == "dp" else 1
    losses: list[float] = []
    grads0: dict[str, torch.Tensor] = {}
    for it in range(cfg.steps):
        ids, labels = global_batch(data, it, cfg.batch_size, cfg.seed)
        loss = F.cross_entropy(model(ids), labels)
        (loss / k).backward()
        losses.append(float(loss.detach()))
        if (it + 1) % k == 0 or it + 1 == cfg.steps:
            if not grads0:
                grads0 = {n: _grad_or_zeros(p).clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, grads0


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """What the optimizer sees; a parameter no loss reached counts as a zero gradient."""
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p.detach())


def _grads_as_state(trainer) -> dict[str, torch.Tensor]:
    """The gradients the optimizer holds now, under the names and in the layout of
    ``trainer.full_state()``.

    Each parameter briefly takes its gradient's values, ``full_state()`` reads them out
    (so the trainer's own mapping applies: full names, gathered DTensor shards, TP's
    undone gpt2 re-ordering), then every parameter gets its exact old values back.  A
    collective where ``full_state()`` has one (TP): every rank must call this together,
    which the optimizer step (the same iteration on every rank) guarantees.
    """
    params = [p for group in trainer.opt.param_groups for p in group["params"]]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        try:
            for p in params:
                p.copy_(_grad_or_zeros(p))
            # .cpu() of a CPU tensor is the tensor itself: clone before restoring
            return {n: t.detach().cpu().clone() for n, t in trainer.full_state().items()}
        finally:
            for p, old in zip(params, saved):
                p.copy_(old)


def record_first_grads(trainer) -> dict[str, torch.Tensor]:
    """Wrap ``trainer.opt.step`` (in this process only) so that its first call records
    the gradients it is about to apply (see :func:`_grads_as_state`) into the returned
    dict, which stays empty until then.  Later steps run the optimizer untouched."""
    grads: dict[str, torch.Tensor] = {}
    step = trainer.opt.step

    def first_step(*args, **kwargs):
        trainer.opt.step = step
        grads.update(_grads_as_state(trainer))
        return step(*args, **kwargs)

    trainer.opt.step = first_step
    return grads


def _rank_main(rank: int, cfg: JobConfig, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from workers import dist as edist
    from workers import engine
    from workers.data import global_batch
    from workers.models import build_model

    device = edist.init(rank, cfg.world_size, cfg.master_addr, cfg.master_port, cfg.addrs[rank],
                        timeout_s=cfg.timeout_s)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, seed=cfg.seed, parts=engine.model_parts(cfg, rank))
    data = _data(cfg, model)
    trainer = engine.build(cfg, rank, model, device)
    grads0 = record_first_grads(trainer)
    losses = []
    for it in range(cfg.steps):
        ids, labels = global_batch(data, it, cfg.batch_size, cfg.seed)
        res = trainer.train_step(it, ids, labels)
        losses.append(res.loss)
    trainer.finish()
    state = {n: t.detach().cpu().clone() for n, t in trainer.full_state().items()}
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump({"losses": losses, "state": state, "grads0": grads0, "role": trainer.role}, f)
    edist.shutdown()


def run_parallel(cfg: JobConfig) -> list[dict]:
    """Spawn the ranks; returns ``[{"losses", "state", "grads0", "role"}, ...]`` by rank
    (``grads0``: the gradients of the rank's first optimizer step, by full name, as
    ``full_state()`` lays parameters out)."""
    # a port picked when the config was made may have been taken since (other tests)
    cfg.master_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(cfg, tmp), nprocs=cfg.world_size, start_method="spawn", join=True)
        out = []
        for r in range(cfg.world_size):
            with open(Path(tmp) / f"rank{r}.pkl", "rb") as f:
                out.append(pickle.load(f))
    return out


def assert_matches(ref_state: dict[str, torch.Tensor], parts: list[dict[str, torch.Tensor]],
                   rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Every parameter a rank holds equals the reference's (by full name); together the
    ranks cover every reference parameter."""
    covered = set()
    for state in parts:
        for name, value in state.items():
            assert name in ref_state, f"rank holds unknown parameter {name}"
            torch.testing.assert_close(value, ref_state[name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")
            covered.add(name)
    missing = set(ref_state) - covered
    assert not missing, f"no rank holds {sorted(missing)[:5]}"


def assert_grads_match(ref_grads: dict[str, torch.Tensor], parts: list[dict[str, torch.Tensor]],
                       rtol: float = 1e-4, atol_rel: float = 1e-6) -> None:
    """The first optimizer step's gradients equal the reference's, entry by entry.

    ``atol`` is ``atol_rel`` times the largest reference gradient entry: a floor for
    entries that are zero or cancel out (rounding noise, summation order; correct runs
    stay under 2e-7 of it).  A wrong scale (a factor k, or 1/W) moves every nonzero
    entry by at least half its size, against ``rtol`` of it.  Together the parts must
    cover every reference parameter.  The message names the parameter and the scale of
    the rank's gradient against the reference's (``<g, ref> / <ref, ref>``).
    """
    scale = max(float(g.abs().max()) for g in ref_grads.values() if g.numel())
    atol = atol_rel * scale
    covered = set()
    for grads in parts:
        assert grads, "no optimizer step recorded any gradients"
        for name, g in grads.items():
            assert name in ref_grads, f"rank has a gradient for unknown parameter {name}"
            ref = ref_grads[name]
            ratio = float((g.double() * ref.double()).sum() / (ref.double() ** 2).sum().clamp_min(1e-300))
            torch.testing.assert_close(
                g, ref, rtol=rtol, atol=atol,
                msg=lambda m, name=name, ratio=ratio: f"gradient of {name} (first optimizer step; scale vs "
                                                      f"reference {ratio:.4g}, atol {atol:.3g}): {m}")
            covered.add(name)
    missing = set(ref_grads) - covered
    assert not missing, f"no rank has a gradient for {sorted(missing)[:5]}"
