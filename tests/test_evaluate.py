"""Held-out evaluation: the split, the batches, and every parallelism against one device.

The distributed cases run in ONE spawn of 4 real gloo ranks (as ``test_parallel_pp``):
each rank walks the cases, joins a fresh process group for each one it takes part in,
holds out the evaluation rows itself with ``split_eval`` (spawned processes hash
strings differently, so this also checks the split is the same in every process),
evaluates, trains ``cfg.steps`` steps, and evaluates again.  The parent evaluates the
one-device model at the same two points with its own arithmetic (not
``engine.eval_counts``) and compares: loss within 1e-5 relative, correct counts equal.
Training losses after the first evaluation must still equal one-device training: an
evaluation leaves no trace on the model, the gradients or the schedule.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.equiv import _data, make_cfg, reference
from tests.test_parallel_pp import _case_port, _st
from workers.config import JobConfig
from workers.data import IGNORE_LABEL, Encoded, split_eval, synthetic
from workers.evaluate import eval_batches, evaluate

# 45 held-out rows with batches of 16: two full batches and one padded with 3 rows;
# row 5 made unlabeled: 44 rows count.
EVAL_ROWS, UNLABELED_ROW = 45, 5


def _eval_data(cfg: JobConfig, data: Encoded) -> Encoded:
    _, held = split_eval(data, cfg.seed)
    labels = held.labels[:EVAL_ROWS].clone()
    labels[UNLABELED_ROW] = IGNORE_LABEL
    return Encoded(held.input_ids[:EVAL_ROWS], labels)


CASES: dict[str, JobConfig] = {
    "dp": make_cfg("dp", 2, "tiny-gpt2", steps=2),
    "sp": make_cfg("sp", 2, "tiny-bert", steps=2),                       # head on rank 0
    "tp": make_cfg("tp", 2, "tiny-gpt2", steps=2),
    "pp-gpipe": make_cfg("pp", 2, "tiny-gpt2", steps=2, stages=_st(([0], 0, 3), ([1], 3, 4))),
    "pp-1f1b": make_cfg("pp", 2, "tiny-opt", steps=2, schedule="1f1b", micro_batches=2,
                        stages=_st(([1], 0, 1), ([0], 1, 2))),          # last stage on rank 0
    "hybrid": make_cfg("hybrid", 4, "tiny-gpt2", steps=2, micro_batches=2,
                       stages=_st(([0, 2], 0, 2), ([1, 3], 2, 4))),
}


def _rank_main(rank: int, cases: dict[str, JobConfig], out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from workers import dist as edist
    from workers import engine
    from workers.data import global_batch
    from workers.models import build_model

    results = {}
    for name, cfg in cases.items():
        if rank >= cfg.world_size:
            continue
        edist.init(rank, cfg.world_size, cfg.master_addr, _case_port(name, rank, out_dir),
                   cfg.addrs[rank], timeout_s=cfg.timeout_s)
        model = build_model(cfg.model, seed=cfg.seed, parts=engine.model_parts(cfg, rank))
        data = _data(cfg, model)
        held = _eval_data(cfg, data)
        trainer = engine.build(cfg, rank, model, torch.device("cpu"))
        before = evaluate(trainer, held, cfg)
        losses = [trainer.train_step(it, *global_batch(data, it, cfg.batch_size, cfg.seed)).loss
                  for it in range(cfg.steps)]
        after = evaluate(trainer, held, cfg)
        results[name] = {"before": before, "after": after, "losses": losses,
                         "held": (held.input_ids.clone(), held.labels.clone())}
        edist.shutdown()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    nprocs = max(c.world_size for c in CASES.values())
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(CASES, tmp), nprocs=nprocs, start_method="spawn", join=True)
        per_rank = []
        for r in range(nprocs):
            with open(Path(tmp) / f"rank{r}.pkl", "rb") as f:
                per_rank.append(pickle.load(f))
    return {name: [per_rank[r][name] for r in range(cfg.world_size)] for name, cfg in CASES.items()}


def _one_device_eval(model, held: Encoded, batch_size: int) -> tuple[float, int, int]:
    """(summed loss, correct, labelled) over every held-out row, by plain arithmetic."""
    with torch.no_grad():
        logits = torch.cat([model(held.input_ids[i:i + batch_size]) for i in range(0, len(held), batch_size)])
    keep = held.labels != IGNORE_LABEL
    logits, labels = logits[keep], held.labels[keep]
    loss = F.cross_entropy(logits.double(), labels, reduction="sum")
    return float(loss), int((logits.argmax(-1) == labels).sum()), int(keep.sum())


def _knowing_ranks(cfg: JobConfig) -> list[int]:
    return list(cfg.stages[-1]["ranks"]) if cfg.parallelism in ("pp", "hybrid") else list(range(cfg.world_size))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_distributed_eval_matches_one_device(case: str, runs) -> None:
    from workers.models import build_model

    cfg = CASES[case]
    ref_losses, ref_state, _ = reference(cfg)
    model = build_model(cfg.model, seed=cfg.seed)
    held = _eval_data(cfg, _data(cfg, model))
    at_start = _one_device_eval(model, held, cfg.batch_size)
    with torch.no_grad():                                  # the one-device model after training
        for n, p in model.named_parameters():
            p.copy_(ref_state[n])
    at_end = _one_device_eval(model, held, cfg.batch_size)
    assert at_start[2] == EVAL_ROWS - 1 and at_start != at_end      # training moved the model
    knowing = _knowing_ranks(cfg)
    for r, res in enumerate(runs[case]):
        # every rank held out exactly the parent's rows
        assert torch.equal(res["held"][0], held.input_ids) and torch.equal(res["held"][1], held.labels)
        if r not in knowing:
            assert res["before"] is None and res["after"] is None, (case, r)
            continue
        for got, (loss_sum, correct, samples) in ((res["before"], at_start), (res["after"], at_end)):
            assert got.samples == samples, (case, r)
            assert got.accuracy * samples == pytest.approx(correct, abs=1e-9), (case, r)
            assert got.loss == pytest.approx(loss_sum / samples, rel=1e-5), (case, r)
        if res["losses"][0] is not None and cfg.parallelism != "dp":       # dp: rank-local losses
            assert res["losses"] == pytest.approx(ref_losses, rel=1e-5), (case, r)


# ------------------------------------------------------------------ no spawn needed


def test_split_eval_is_disjoint_deterministic_and_labelled() -> None:
    data = synthetic(64, 200, 8, seed=3)
    data.labels[::7] = IGNORE_LABEL                       # some unlabeled rows
    train, held = split_eval(data, seed=11)
    again_train, again_held = split_eval(data, seed=11)
    assert torch.equal(held.input_ids, again_held.input_ids) and torch.equal(train.labels, again_train.labels)

    def rows(e: Encoded) -> set[tuple[int, ...]]:
        return {tuple(r) for r in e.input_ids.tolist()}

    assert len(rows(data)) == len(data)                   # rows are unique: sets compare them
    assert rows(train).isdisjoint(rows(held)) and rows(train) | rows(held) == rows(data)
    assert (held.labels != IGNORE_LABEL).all()            # held out only what can be scored
    labelled = int((data.labels != IGNORE_LABEL).sum())
    assert len(held) == round(labelled * 0.1)
    other = split_eval(data, seed=12)[1]
    assert not torch.equal(other.input_ids, held.input_ids)
    # tiny data sets: one row held out from two, none from one; a row always trains
    two = Encoded(data.input_ids[1:3], data.labels[1:3])
    assert [len(p) for p in split_eval(two, 0)] == [1, 1]
    assert [len(p) for p in split_eval(Encoded(data.input_ids[:1], data.labels[:1]), 0)] == [1, 0]
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_eval(data, 0, fraction=1.0)


class _OneDevice:
    """A trainer stand-in: the whole model in this process, the engine's counting."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []

    def eval_batch(self, ids, labels):
        from workers.engine import eval_counts
        self.calls.append(ids.shape[0])
        with torch.no_grad():
            return eval_counts(self.model(ids), labels)


def test_batches_pad_and_cap_and_evaluate_counts_labelled_rows() -> None:
    from workers.models import build_model

    data = synthetic(1000, 37, 8, seed=0)
    data.labels[2] = IGNORE_LABEL
    batches = list(eval_batches(data, 16))
    assert [b[0].shape[0] for b in batches] == [16, 16, 16]
    assert (batches[2][1][5:] == IGNORE_LABEL).all() and torch.equal(batches[2][1][:5], data.labels[32:])
    assert len(list(eval_batches(data, 4, max_batches=3))) == 3
    model = build_model("tiny-gpt2")
    trainer = _OneDevice(model)
    cfg = make_cfg("dp", 1, batch_size=16)
    res = evaluate(trainer, data, cfg, max_batches=None)
    loss_sum, correct, samples = _one_device_eval(model, data, 16)
    assert trainer.calls == [16, 16, 16] and res.samples == samples == 36
    assert res.loss == pytest.approx(loss_sum / samples, rel=1e-5)
    assert res.accuracy == pytest.approx(correct / samples)
    assert evaluate(trainer, data, cfg).samples == 36            # the cap (8 batches) is not reached
    assert evaluate(trainer, Encoded(data.input_ids[2:3], data.labels[2:3]), cfg) is None  # nothing labelled


def test_run_state_and_cli_report_evaluations(tmp_path) -> None:
    """``eval`` lines from the workers' emitter: one per step in the run state, the record,
    the progress printer and the summary (every knowing rank sends the same one)."""
    import io
    import json

    from app.cli.run import Progress, print_summary
    from app.run.runstate import RunState
    from workers.protocol import Emitter, parse_line

    state = RunState("r1", ["a", "b"], {}, run_dir=tmp_path / "r1")
    err, out = io.StringIO(), io.StringIO()
    progress = Progress(state, 50, stream=err)
    lines = io.StringIO()
    for rank, dev in enumerate(("a", "b")):          # dp: both replicas report each evaluation
        em = Emitter("r1", rank, dev, lines)
        em.emit("step", step=24, samples=16, latency_s=0.1, latency_per_sample_s=0.1 / 16, loss=0.7)
        em.emit("eval", step=25, loss=0.6931, accuracy=0.5, samples=128)
        em.emit("eval", step=50, loss=0.4125, accuracy=0.8125, samples=128)
    for line in sorted(lines.getvalue().splitlines(), key=lambda ln: json.loads(ln)["step"]):
        state.feed(parse_line(line))
    assert [(e.step, e.loss, e.accuracy, e.samples) for e in state.evals] == [
        (25, 0.6931, 0.5, 128), (50, 0.4125, 0.8125, 128)]
    printed = [ln for ln in err.getvalue().splitlines() if ln.startswith("eval")]
    assert printed == ["eval  step 25/50  eval loss 0.6931  accuracy 50.0%  (128 held-out samples)",
                       "eval  step 50/50  eval loss 0.4125  accuracy 81.2%  (128 held-out samples)"]
    state.finish("done")
    saved = json.loads((tmp_path / "r1" / "record.json").read_text())["summary"]
    assert saved["evals"] == [{"step": 25, "loss": 0.6931, "accuracy": 0.5, "samples": 128},
                              {"step": 50, "loss": 0.4125, "accuracy": 0.8125, "samples": 128}]
    assert (saved["eval_step"], saved["eval_loss"], saved["eval_accuracy"]) == (50, 0.4125, 0.8125)
    print_summary(state, out=out)
    assert "held-out eval after step 50: loss 0.4125  accuracy 81.2%  (128 samples)" in out.getvalue()
    progress.close()
    empty = RunState("r2", ["a"], {})
    assert empty.summary()["eval_accuracy"] is None and empty.summary()["evals"] == []
