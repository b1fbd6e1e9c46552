"""Every parallelism, through the real worker path over SSH, trains like one device.

One in-process testbed; each run goes through :func:`app.run.jobs.prepare_run` and the
launcher exactly as ``edgetrain run`` does.  Each worker's ``done`` record carries the
moments of the parameters it holds (``param_moments``); the run state assembles the
whole model's (``app.run.fingerprint``) and they must match a one-device run of the same
settings (a ``dp`` run on one device, optimizer step every iteration).

``tests/test_parallel_*.py`` check the same equivalence element by element in spawned
processes; this file checks what a user's run actually executed: the pushed worker
code, the launcher's job config, the stage split it sent.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from app.devices.inventory import load_inventory
from app.run.fingerprint import describe, differing
from app.run.jobs import prepare_run
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr
from workers.config import RunSettings

pytestmark = pytest.mark.slow

LR = 1e-3
BASE = {"model": "tiny-gpt2", "steps": 3, "batch_size": 16, "seq_len": 16, "micro_batches": 4, "sync_every": 1,
        "lr": LR}
# tiny-gpt2 has 4 blocks
STAGES_PP = [{"ranks": [0], "layers": [0, 2]}, {"ranks": [1], "layers": [2, 4]}]
STAGES_HYBRID = [{"ranks": [0, 1], "layers": [0, 2]}, {"ranks": [2, 3], "layers": [2, 4]}]
CASES: dict[str, tuple[list[int], dict]] = {      # name -> (testbed devices, settings)
    "reference": ([0], {"parallelism": "dp"}),
    "tp": ([1, 2], {"parallelism": "tp"}),
    "pp": ([3, 4], {"parallelism": "pp", "stages": STAGES_PP}),
    "sp": ([5, 6], {"parallelism": "sp"}),
    "hybrid": ([0, 1, 2, 3], {"parallelism": "hybrid", "stages": STAGES_HYBRID}),
}
# Runs on disjoint devices go together (their workers' start-up overlaps), then the rest.
WAVES = [["reference", "tp", "pp", "sp"], ["hybrid"]]
# c_attn.bias holds the key bias, whose exact gradient is zero (softmax ignores q·b_k):
# its float gradient is rounding noise that AdamW turns into small arbitrary updates,
# so two correct runs differ there (tests/test_parallel_tp_sp.py: atol = lr / 10).
ATOL_FOR = {"attn.c_attn.bias": LR / 10}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case run once on one testbed: name -> RunState."""
    tmp = tmp_path_factory.mktemp("e2e-equivalence")

    async def one(inv, name):
        devices, extra = CASES[name]
        settings = RunSettings(**BASE, **extra)
        launcher, state = prepare_run(inv, [f"dev{i}" for i in devices], settings, tmp / "runs")
        outcome = await launcher.run()
        assert outcome == "done", (name, state.events)
        return state

    async def main():
        async with Testbed(tmp / "tb", n_devices=7, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            out = {}
            for wave in WAVES:
                out.update(zip(wave, await asyncio.gather(*(one(inv, name) for name in wave))))
            return out

    with pytest.MonkeyPatch.context() as mp:   # the profile cache, like every test's home
        mp.setenv("EDGETRAIN_HOME", str(tmp / "home"))
        return asyncio.run(main())


def test_reference_fingerprint_covers_the_model(runs):
    ref = runs["reference"]
    moments, problems = ref.param_moments()
    assert not problems
    # every tensor, whole: embeddings, 4 blocks, final norm, head
    assert any(".h.3." in n for n in moments) and any("wte" in n for n in moments)
    assert all(count > 0 and squares > 0 for count, _, squares in moments.values() if count > 1)
    saved = json.loads((ref.run_dir / "record.json").read_text())["summary"]
    assert saved["param_moments"].keys() == moments.keys() and saved["param_moments_problems"] == []


@pytest.mark.parametrize("case", [c for c in CASES if c != "reference"])
def test_run_matches_one_device(runs, case):
    ref, _ = runs["reference"].param_moments()
    state = runs[case]
    got, problems = state.param_moments()
    assert not problems, problems            # replicas agree, shards add up
    bad = differing(got, ref, rtol=1e-4, atol_for=ATOL_FOR)
    assert not bad, f"{case}: {len(bad)} of {len(ref)} parameters differ from one device:\n" \
                    + describe(got, ref, bad[:8])
    # the last step's loss, wherever a rank knows it
    ref_loss = runs["reference"].devices["dev0"].last_loss
    losses = [d.last_loss for d in state.devices.values() if d.last_loss is not None]
    assert losses and losses == pytest.approx([ref_loss] * len(losses), rel=1e-4)


def test_tp_shards_and_pp_stages_report_parts(runs):
    """The fingerprint really is assembled: TP ranks hold shards, PP stages disjoint names."""
    tp = [d.param_moments for d in runs["tp"].devices.values()]
    sharded = [n for n, (local, full, *_) in tp[0].items() if local < full]
    assert sharded and all(tp[1][n][0] == tp[0][n][1] - tp[0][n][0] for n in sharded)
    pp = [set(d.param_moments) for d in runs["pp"].devices.values()]
    assert pp[0] and pp[1] and not pp[0] & pp[1]
