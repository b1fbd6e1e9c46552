"""Harness for equivalence tests: a parallel run vs one-device training.

``reference(...)`` trains the whole StagedModel in this process on the same global
batches (with gradient accumulation over ``sync_every`` iterations for DP).
``run_parallel(...)`` spawns ``world`` real torch.distributed ranks (gloo bound to
127.0.0.x like the testbed's devices), runs the parallelism's trainer for the given
iterations and returns each rank's losses and ``full_state()``.
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
from workers.dist import free_port  # noqa: F401 (re-exported for the parallel tests)


def make_cfg(parallelism: str, world: int, model: str = "tiny-gpt2", steps: int = 3, batch_size: int = 16,
             seq_len: int = 16, sync_every: int = 1, micro_batches: int = 4, stages: list[dict] | None = None,
             schedule: str = "gpipe", lr: float = 1e-3, seed: int = 0) -> JobConfig:
    return JobConfig(run_id="equiv", world_size=world, master_addr="127.0.0.1", master_port=free_port(),
                     addrs=[f"127.0.0.{i + 1}" for i in range(world)], devices=[f"d{i}" for i in range(world)],
                     model=model, parallelism=parallelism, batch_size=batch_size, seq_len=seq_len,
                     micro_batches=micro_batches, sync_every=sync_every, steps=steps, lr=lr, seed=seed,
                     stages=stages or [], schedule=schedule, timeout_s=60)


def _data(cfg: JobConfig, model):
    from workers.data import load_dataset
    data, _ = load_dataset(cfg.dataset, model.family, model.preset.vocab_size, cfg.seq_len, cfg.seed)
    return data


def reference(cfg: JobConfig) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, full model, same batches; optimizer step every ``sync_every`` iterations
    (DP) or every iteration (others).  Returns per-iteration losses and final params."""
    from workers.data import global_batch
    from workers.engine import make_optimizer
    from workers.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, seed=cfg.seed)
    data = _data(cfg, model)
    opt = make_optimizer(model.parameters(), cfg)
    k = cfg.sync_every if cfg.parallelism == "dp" else 1
    losses = []
    for it in range(cfg.steps):
        ids, labels = global_batch(data, it, cfg.batch_size, cfg.seed)
        loss = F.cross_entropy(model(ids), labels)
        (loss / k).backward()
        losses.append(float(loss.detach()))
        if (it + 1) % k == 0 or it + 1 == cfg.steps:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


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
    losses = []
    for it in range(cfg.steps):
        ids, labels = global_batch(data, it, cfg.batch_size, cfg.seed)
        res = trainer.train_step(it, ids, labels)
        losses.append(res.loss)
    trainer.finish()
    state = {n: t.detach().cpu().clone() for n, t in trainer.full_state().items()}
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump({"losses": losses, "state": state, "role": trainer.role}, f)
    edist.shutdown()


def run_parallel(cfg: JobConfig) -> list[dict]:
    """Spawn the ranks; returns ``[{"losses", "state", "role"}, ...]`` by rank."""
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
            torch.testing.assert_close(value, ref_state[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
            covered.add(name)
    missing = set(ref_state) - covered
    assert not missing, f"no rank holds {sorted(missing)[:5]}"
