"""The memory knobs: optimizer, activation checkpointing, DP gradient accumulation and
batch shares, precision; each against one-device training (or the knob turned off).

The distributed cases run in ONE spawn of 3 real ranks (spawning costs seconds): each
rank walks the case list and joins a fresh process group for every case it takes part
in, as ``tests/test_parallel_pp.py`` does.  The optimizer cases also write a checkpoint
(DCP, every rank its part), load it into a freshly built trainer and check that the
optimizer state came back and trains on identically.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.equiv import _data, assert_grads_match, assert_matches, make_cfg, record_first_grads, reference
from tests.test_parallel_pp import _case_port
from workers.checkpoint_manifest import step_dirname
from workers.config import JobConfig, RunSettings, share_bounds


def _cfg(parallelism: str, world: int, **knobs) -> JobConfig:
    base = {k: knobs.pop(k) for k in ("batch_size", "sync_every", "stages", "micro_batches", "steps")
            if k in knobs}
    cfg = make_cfg(parallelism, world, **base)
    for k, v in knobs.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


_TWO_STAGES = [{"ranks": [0], "layers": [0, 2]}, {"ranks": [1], "layers": [2, 4]}]

# name -> config; every case trains 3 steps of tiny-gpt2
CASES: dict[str, JobConfig] = {
    # (a) accumulation, with sync every 2 (the last step syncs alone): slices of 7, micro 4+3
    "dp-ga1": _cfg("dp", 2, batch_size=14, sync_every=2),
    "dp-ga2": _cfg("dp", 2, batch_size=14, sync_every=2, grad_accumulation=2),
    # (b) uneven shares: rows 0-9, 10-15, 16-19 of 20
    "dp-shares": _cfg("dp", 3, batch_size=20, dp_shares=[0.5, 0.3, 0.2]),
    # (c) activation checkpointing (DP, PP, and the layers SP and TP run their own way)
    "dp-plain": _cfg("dp", 2),
    "dp-ac": _cfg("dp", 2, activation_checkpointing=True),
    "pp-plain": _cfg("pp", 2, stages=_TWO_STAGES),
    "pp-ac": _cfg("pp", 2, stages=_TWO_STAGES, activation_checkpointing=True),
    "sp-plain": _cfg("sp", 2),
    "sp-ac": _cfg("sp", 2, activation_checkpointing=True),
    "tp-ac": _cfg("tp", 2, activation_checkpointing=True),
    # TP runs the whole batch on every shard: accumulation chunks it (with checkpointing, as
    # the planner suggests for GPT2-L on Nanos)
    "tp-ga": _cfg("tp", 2, activation_checkpointing=True, grad_accumulation=3),
    # (d) optimizers (+ (e) their checkpoint round trip)
    "dp-sgd": _cfg("dp", 2, optimizer="sgd"),
    "dp-adafactor": _cfg("dp", 2, optimizer="adafactor"),
    # bf16 autocast: runs, replicas agree, and it is close to fp32
    "dp-bf16": _cfg("dp", 2, precision="bf16", grad_accumulation=2, activation_checkpointing=True),
    "pp-bf16": _cfg("pp", 2, stages=_TWO_STAGES, precision="bf16"),
}
ROUND_TRIP = {"dp-sgd", "dp-adafactor"}

pytestmark = pytest.mark.slow


def _build(cfg: JobConfig, rank: int):
    from workers import engine
    from workers.models import build_model

    model = build_model(cfg.model, seed=cfg.seed, parts=engine.model_parts(cfg, rank))
    return model, engine.build(cfg, rank, model, torch.device("cpu"))


def _opt_state(trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in trainer.opt.state.get(p, {}).items()}
            for n, p in trainer.checkpoint_params().items()}


def _round_trip(cfg: JobConfig, rank: int, trainer, data, out_dir: str, name: str) -> dict:
    """Save a checkpoint, load it into a fresh trainer, train one more step on both."""
    from workers.checkpoint import Checkpointer
    from workers.data import global_batch

    cfg.checkpoint_dir = str(Path(out_dir) / f"ckpt-{name}")
    Checkpointer(cfg, rank, trainer, None).save(cfg.steps, "final")
    _, fresh = _build(cfg, rank)
    Checkpointer(cfg, rank, fresh, None).load(Path(cfg.checkpoint_dir) / step_dirname(cfg.steps))
    before, loaded = _opt_state(trainer), _opt_state(fresh)
    ids, labels = global_batch(data, cfg.steps, cfg.batch_size, cfg.seed)
    cfg.steps += 1  # the extra step is the last one: both sync
    for t in (trainer, fresh):
        t.train_step(cfg.steps - 1, ids, labels)
    return {"saved": before, "loaded": loaded,
            "after": [{n: p.detach().clone() for n, p in t.checkpoint_params().items()} for t in (trainer, fresh)]}


def _rank_main(rank: int, cases: dict[str, JobConfig], out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from workers import dist as edist
    from workers.data import global_batch

    results = {}
    for name, cfg in cases.items():
        if rank >= cfg.world_size:
            continue
        edist.init(rank, cfg.world_size, cfg.master_addr, _case_port(name, rank, out_dir),
                   cfg.addrs[rank], timeout_s=cfg.timeout_s)
        model, trainer = _build(cfg, rank)
        data = _data(cfg, model)
        grads0 = record_first_grads(trainer)
        losses, saved = [], [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += 1
            return t

        for it in range(cfg.steps):
            ids, labels = global_batch(data, it, cfg.batch_size, cfg.seed)
            # the first step counts the tensors autograd keeps for backward (checkpointed
            # blocks keep only their inputs; their insides are recomputed)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if it == 0 else nullcontext():
                losses.append(trainer.train_step(it, ids, labels).loss)
        trainer.finish()
        res = {"losses": losses, "grads0": grads0, "saved": saved[0],
               "state": {n: t.clone() for n, t in trainer.full_state().items()},
               "eval": trainer.eval_batch(*global_batch(data, 100, cfg.batch_size, cfg.seed))}
        if name in ROUND_TRIP:
            res["trip"] = _round_trip(cfg, rank, trainer, data, out_dir, name)
        results[name] = res
        edist.shutdown()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    """``{case: [rank results]}`` from one spawn of 3 ranks."""
    nprocs = max(c.world_size for c in CASES.values())
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(CASES, tmp), nprocs=nprocs, start_method="spawn", join=True)
        per_rank = []
        for r in range(nprocs):
            with open(Path(tmp) / f"rank{r}.pkl", "rb") as f:
                per_rank.append(pickle.load(f))
    return {name: [per_rank[r][name] for r in range(cfg.world_size)] for name, cfg in CASES.items()}


_REFS: dict[tuple, tuple] = {}


def _reference(cfg: JobConfig):
    """``tests.equiv.reference``, once per distinct one-device run (most cases share one:
    the knobs under test do not change what one device computes)."""
    k = cfg.sync_every if cfg.parallelism == "dp" else 1
    key = (cfg.model, cfg.batch_size, cfg.seq_len, cfg.steps, k, cfg.optimizer, cfg.lr, cfg.seed)
    if key not in _REFS:
        _REFS[key] = reference(cfg)
    return _REFS[key]


def _ref_eval(cfg: JobConfig, state: dict[str, torch.Tensor]):
    """One-device evaluation counts of the eval batch the ranks scored, with ``state``."""
    from workers.data import global_batch
    from workers.engine import eval_counts
    from workers.models import build_model

    model = build_model(cfg.model, seed=cfg.seed)
    model.load_state_dict(state, strict=False)  # parameters by name (aliases ignored)
    ids, labels = global_batch(_data(cfg, model), 100, cfg.batch_size, cfg.seed)
    with torch.no_grad():
        return eval_counts(model(ids), labels)


@pytest.mark.parametrize("case", ["dp-ga2", "dp-shares", "dp-ac", "pp-ac", "sp-ac", "tp-ac", "tp-ga", "dp-sgd",
                                  "dp-adafactor"])
def test_matches_single_device(case: str, runs) -> None:
    cfg = CASES[case]
    _, ref_state, ref_grads = _reference(cfg)
    ranks = runs[case]
    # pipeline stages each hold their part; every other parallelism holds it all
    together = cfg.parallelism == "pp"
    groups = [[r["grads0"] for r in ranks]] if together else [[r["grads0"]] for r in ranks]
    for g in groups:
        assert_grads_match(ref_grads, g)
    # Parameters after 3 AdamW steps: a rare token's embedding row turns last-bit
    # differences of summation order into up to ~lr * 1e-2 (see test_parallel_pp); the
    # gradients above are the tight check.
    states = [[r["state"] for r in ranks]] if together else [[r["state"]] for r in ranks]
    for s in states:
        assert_matches(ref_state, s, atol=1e-4)
    if cfg.parallelism == "dp":
        # the evaluation follows the shares too, and counts the whole batch once
        ref = _ref_eval(cfg, ranks[0]["state"])
        for r in ranks:
            assert r["eval"].samples == ref.samples and r["eval"].correct == ref.correct
            assert r["eval"].loss_sum == pytest.approx(ref.loss_sum, rel=1e-5)


def test_accumulation_equals_one_pass(runs) -> None:
    # (a) directly against the same run without accumulation.  The gradients of the first
    # optimizer step agree entry by entry (a wrong micro-batch scale moves every entry);
    # parameters after 3 AdamW steps within 1e-5 (lr 1e-3): adding the micro-batches'
    # gradients in another order changes last bits, which AdamW's m / sqrt(v) lifts to
    # ~4e-6 on an embedding row that a rare token barely touches (one device alike).
    for one, two in zip(runs["dp-ga1"], runs["dp-ga2"]):
        assert_grads_match(one["grads0"], [two["grads0"]], rtol=1e-5)
        for n, p in one["state"].items():
            torch.testing.assert_close(two["state"][n], p, rtol=0, atol=1e-5, msg=n)
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)


def test_shares_split_the_batch(runs) -> None:
    # (b) each replica reports its own slice's mean; weighted by 10/6/4 rows they make
    # the global loss
    ref_losses, _, _ = _reference(CASES["dp-shares"])
    ranks = runs["dp-shares"]
    for it, ref in enumerate(ref_losses):
        mean = sum(ranks[r]["losses"][it] * n for r, n in enumerate((10, 6, 4))) / 20
        assert mean == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("on, off", [("dp-ac", "dp-plain"), ("pp-ac", "pp-plain"), ("sp-ac", "sp-plain")])
def test_checkpointing_equals_plain(on: str, off: str, runs) -> None:
    # (c) recomputation is exact: the same losses and parameters as without it; and it
    # happened: far fewer tensors kept for backward
    for r_on, r_off in zip(runs[on], runs[off]):
        assert r_on["saved"] < r_off["saved"] / 2, (r_on["saved"], r_off["saved"])
        assert r_on["losses"] == r_off["losses"]
        assert r_on["state"].keys() == r_off["state"].keys()
        for n, p in r_off["state"].items():
            torch.testing.assert_close(r_on["state"][n], p, rtol=0, atol=1e-7, msg=n)


@pytest.mark.parametrize("case", sorted(ROUND_TRIP))
def test_optimizer_state_round_trip(case: str, runs) -> None:
    # (e) every optimizer state (SGD's momentum, Adafactor's step and row/column factors)
    # comes back from the DCP checkpoint, and a step from it equals a step from the original
    for r in runs[case]:
        trip = r["trip"]
        assert trip["saved"].keys() == trip["loaded"].keys()
        kinds = set()
        for n, states in trip["saved"].items():
            assert states.keys() == trip["loaded"][n].keys(), n
            for k, v in states.items():
                kinds.add(k)
                assert torch.equal(trip["loaded"][n][k], v), (n, k)
        expected = {"momentum_buffer"} if case == "dp-sgd" else {"step", "row_var", "col_var", "variance"}
        assert kinds == expected
        original, resumed = trip["after"]
        for n in original:
            assert torch.equal(original[n], resumed[n]), n


def test_bf16_runs_close_to_fp32(runs) -> None:
    for case, last in (("dp-bf16", [0, 1]), ("pp-bf16", [1])):
        cfg = CASES[case]
        ref_losses, _, _ = _reference(cfg)
        ranks = runs[case]
        for r in last:
            losses = ranks[r]["losses"]
            if cfg.parallelism == "dp":  # equal slices: the replicas' mean is the batch's
                losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
            assert losses == pytest.approx(ref_losses, rel=2e-2), case
        if cfg.parallelism == "dp":
            for n, p in ranks[0]["state"].items():
                assert torch.equal(ranks[1]["state"][n], p), n  # replicas stay identical
        for r in ranks:
            assert all(t.dtype == torch.float32 for t in r["state"].values())


# ------------------------------------------------------------------ no spawn needed


def _job(**kw) -> JobConfig:
    world = kw.pop("world_size", 3)
    return JobConfig(run_id="k", world_size=world, master_addr="127.0.0.1", master_port=1,
                     addrs=["a"] * world, devices=["d"] * world, **kw)


@pytest.mark.parametrize("knobs, match", [
    ({"optimizer": "adam"}, "optimizer 'adam' is not one of adamw, sgd, adafactor"),
    ({"optimizer": "adafactor", "parallelism": "tp"}, "'adafactor' does not work with tensor parallelism"),
    ({"precision": "fp16"}, "precision 'fp16' is not one of fp32, bf16"),
    ({"grad_accumulation": 0}, "grad_accumulation must be a whole number >= 1"),
    ({"grad_accumulation": 1.5}, "grad_accumulation must be a whole number"),
    ({"activation_checkpointing": "yes"}, "activation_checkpointing must be true or false"),
    ({"dp_shares": [0.5, 0.5]}, "dp_shares has 2 entries for 3 ranks"),
    ({"dp_shares": [0.5, 0.0, 0.5]}, "dp_shares must be positive numbers"),
    ({"dp_shares": [1, "a", 1]}, "dp_shares must be positive numbers"),
    ({"dp_shares": [0.98, 0.01, 0.01], "batch_size": 16}, "gives rank 1 .* no row of the batch of 16"),
])
def test_bad_settings_are_named(knobs, match) -> None:
    # (f) the worker's check (JobConfig.validate, also run by the launcher before starting)
    with pytest.raises(ValueError, match=match) as err:
        _job(**knobs).validate()
    assert "Fix:" in str(err.value) or "must" in str(err.value)


def test_good_settings_and_shares() -> None:
    _job(optimizer="sgd", precision="bf16", grad_accumulation=4, dp_shares=[2, 1, 1],
         activation_checkpointing=True).validate()
    # dp_shares acts on DP only: a pipeline run keeps a planner's shares without complaint
    _job(parallelism="pp", dp_shares=[1, 1], stages=[{"ranks": [0, 1, 2], "layers": [0, 4]}],
         world_size=3).settings().check_knobs(world_size=3)
    RunSettings(grad_accumulation=2).check_knobs()
    assert share_bounds(20, [0.5, 0.3, 0.2]) == [0, 10, 16, 20]
    assert share_bounds(10, [1, 1, 1]) == [0, 3, 6, 10]
    from workers.engine import rank_slice
    assert [rank_slice(20, r, 3, [5, 3, 2]) for r in range(3)] == [slice(0, 10), slice(10, 16), slice(16, 20)]
    assert rank_slice(14, 1, 2) == slice(7, 14)


def test_survivors_keep_their_planned_shares() -> None:
    """After a loss, DP survivors keep their planned shares, renormalised; equal stays equal,
    and a survivor that would get no row falls back to equal shares."""
    from workers.engine import survivor_shares
    assert survivor_shares([1.0, 2.0, 3.0, 2.0], (0, 1, 3), 48) == [1.0, 2.0, 2.0]
    assert share_bounds(48, survivor_shares([1.0, 2.0, 3.0, 2.0], (0, 1, 3), 48)) == [0, 9, 28, 48]
    assert survivor_shares(None, (0, 2), 48) is None
    assert survivor_shares([1.0, 1000.0, 1.0], (0, 2, 1), 8) is None   # original ranks 0 and 2 would get no row
    assert survivor_shares([1.0, 2.0], None, 8) is None


def test_cli_flags_reach_the_settings() -> None:
    import argparse

    from app.cli.flags import add_settings_flags, settings_from_args

    p = argparse.ArgumentParser()
    add_settings_flags(p)
    s = settings_from_args(p.parse_args(["--optimizer", "adafactor", "--activation-checkpointing",
                                         "--grad-accumulation", "2", "--dp-shares", "0.4,0.3,0.3",
                                         "--precision", "bf16"]))
    assert (s.optimizer, s.activation_checkpointing, s.grad_accumulation, s.dp_shares, s.precision) == \
        ("adafactor", True, 2, [0.4, 0.3, 0.3], "bf16")
    d = settings_from_args(p.parse_args([]))
    assert (d.optimizer, d.activation_checkpointing, d.grad_accumulation, d.dp_shares, d.precision) == \
        ("adamw", False, 1, None, "fp32")
    with pytest.raises(ValueError, match="grad_accumulation"):
        settings_from_args(p.parse_args(["--grad-accumulation", "0"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--dp-shares", "0.5,-1"])
