"""A checkpoint is not tied to the layout that wrote it: 2 pipeline stages resume as 3 stages
and as DP replicas, and the first loss after resuming is the saved model's loss on that
batch.  Also: time-based checkpoints, retention, and a layout that cannot be resharded.

Real worker processes (``python -m workers.train``) with real gloo process groups on
loopback addresses; no SSH needed for what is tested here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workers.checkpoint_manifest import MANIFEST_NAME, Manifest, step_dirname
from workers.config import JobConfig
from workers.dist import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ST2 = [{"ranks": [0], "layers": [0, 2]}, {"ranks": [1], "layers": [2, 4]}]
ST3 = [{"ranks": [0], "layers": [0, 1]}, {"ranks": [1], "layers": [1, 3]}, {"ranks": [2], "layers": [3, 4]}]


def run_workers(parallelism: str, world: int, steps: int, ckdir: Path, resume: Path | None = None,
                stages=None, **kw) -> list[dict]:
    """Run ``world`` real workers to the end; returns every telemetry record."""
    base = dict(model="tiny-gpt2", batch_size=16, seq_len=16, sync_every=1, micro_batches=4,
                checkpoint_every=2, checkpoint_minutes=0, eval_every=0)
    base.update(kw)
    cfg = JobConfig(run_id=f"r-{ckdir.name}", world_size=world, master_addr="127.0.0.1", master_port=free_port(),
                    addrs=[f"127.0.0.{i + 1}" for i in range(world)], devices=[f"d{i}" for i in range(world)],
                    parallelism=parallelism, steps=steps, checkpoint_dir=str(ckdir),
                    resume_from=str(resume or ""), stages=stages or [], **base)
    procs = [subprocess.Popen([sys.executable, "-m", "workers.train", "--rank", str(r), "--config-b64", cfg.to_b64()],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for r in range(world)]
    recs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        recs += [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    errors = [r["message"] for r in recs if r["type"] in ("error", "oom")]
    if errors or any(p.returncode for p in procs):
        raise WorkerError("; ".join(errors) or f"exit codes {[p.returncode for p in procs]}")
    return recs


class WorkerError(Exception):
    pass


def losses(recs: list[dict]) -> dict[int, list[float]]:
    """Step -> the losses the ranks that know it reported (DP: one per replica's slice)."""
    out: dict[int, list[float]] = {}
    for r in recs:
        if r["type"] == "step" and r.get("loss") is not None:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def test_two_stages_resume_as_three_stages_and_as_dp(tmp_path):
    full = run_workers("pp", 2, 6, tmp_path / "a", stages=ST2)
    ckpt = tmp_path / "a" / step_dirname(4)
    assert Manifest.from_json((ckpt / MANIFEST_NAME).read_text()).layout == "canonical"
    saved_loss = losses(full)[4][0]           # the model of step 4 on batch 4
    pp3 = run_workers("pp", 3, 6, tmp_path / "b", resume=ckpt, stages=ST3)
    assert losses(pp3)[4] == pytest.approx([saved_loss], rel=1e-6)
    assert sorted(losses(pp3)) == [4, 5]      # it did not start over
    dp = run_workers("dp", 2, 6, tmp_path / "c", resume=ckpt)
    # equal slices: the mean of the replicas' slice losses is the batch loss
    assert sum(losses(dp)[4]) / 2 == pytest.approx(saved_loss, rel=1e-5)
    # and training from there is the same training: step 5's loss agrees too
    assert losses(pp3)[5][0] == pytest.approx(losses(full)[5][0], rel=1e-5)
    assert sum(losses(dp)[5]) / 2 == pytest.approx(losses(full)[5][0], rel=1e-5)


def test_retention_time_trigger_and_a_layout_that_cannot_reshard(tmp_path):
    # every 2 steps for 8 steps with keep 2: only the last two survive, each complete
    run_workers("tp", 2, 8, tmp_path / "tp", keep_checkpoints=2)
    kept = sorted(d.name for d in (tmp_path / "tp").iterdir())
    assert kept == [step_dirname(6), step_dirname(8)]
    man = Manifest.from_json((tmp_path / "tp" / step_dirname(8) / MANIFEST_NAME).read_text())
    assert man.layout == "tp-gpt2/2" and {f.rank for f in man.files} == {0, 1}
    # tp's gpt2 layout (transposed, permuted per world size) must not load into dp
    with pytest.raises(WorkerError, match="layout 'tp-gpt2/2'.*Fix: resume with parallelism tp on 2 devices"):
        run_workers("dp", 2, 10, tmp_path / "bad", resume=tmp_path / "tp" / step_dirname(8))
    # a minute-based trigger alone (no step trigger) still checkpoints: 0.001 min = 60 ms
    recs = run_workers("dp", 2, 4, tmp_path / "timed", checkpoint_every=0, checkpoint_minutes=0.001)
    kinds = sorted({(r["step"], r["kind"]) for r in recs if r["type"] == "checkpoint"})
    assert ("periodic" in {k for _, k in kinds}) and (4, "final") in kinds
