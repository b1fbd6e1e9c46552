"""DiLoCo (low-communication DP): exact where it must equal DP, and cheaper where it should be.

With one inner step, a plain outer step (lr 1, no momentum) and an fp32 sync, averaging
the replicas' one-step moves is DP's step on the averaged gradient when the inner
optimizer is linear in the gradient (SGD with momentum is): the parameters must equal
one-device training.  With several inner steps and the paper's outer step, the replicas
must still end identical (every run ends with an outer step), having synchronised once
per ``sync_every`` iterations in half-size (bf16) messages.
"""
from __future__ import annotations

import pytest

from tests.equiv import assert_matches, make_cfg, reference, run_parallel
from workers.config import RunSettings

pytestmark = pytest.mark.slow


def test_one_inner_step_and_a_plain_outer_step_equal_dp():
    cfg = make_cfg("dp", 2, model="tiny-gpt2", steps=4, sync_every=1, batch_size=16, lr=5e-2)
    cfg.optimizer = "sgd"
    ref_losses, ref_state, _ = reference(cfg)         # one device, SGD, a step per batch
    cfg.dp_mode, cfg.outer_lr, cfg.outer_momentum, cfg.sync_dtype = "diloco", 1.0, 0.0, "fp32"
    ranks = run_parallel(cfg)
    for r in ranks:
        assert_matches(ref_state, [r["state"]], rtol=1e-4, atol=1e-6)
    # the equal slices' local losses average to the global batch's
    for it, ref in enumerate(ref_losses):
        assert sum(r["losses"][it] for r in ranks) / 2 == pytest.approx(ref, rel=1e-4)


def test_several_inner_steps_end_with_identical_replicas():
    cfg = make_cfg("dp", 2, model="tiny-gpt2", steps=6, sync_every=3, batch_size=16)
    cfg.dp_mode = "diloco"                              # AdamW inside, Nesterov outside, bf16 sync
    ranks = run_parallel(cfg)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert set(a) == set(b)
    for name in a:
        assert a[name].equal(b[name]), name             # the same outer step on the same average
    _, ref_state, _ = reference(make_cfg("dp", 2, model="tiny-gpt2", steps=6, sync_every=1, batch_size=16))
    moved = sum(float((a[n] - ref_state[n]).abs().sum()) for n in a)
    assert moved > 0                                    # not DP: the replicas moved alone in between


@pytest.mark.parametrize("bad, message", [
    ({"dp_mode": "gossip"}, "dp_mode"), ({"sync_dtype": "int8"}, "sync_dtype"),
    ({"outer_lr": 0}, "outer_lr"), ({"outer_momentum": 1.0}, "outer_momentum"),
])
def test_bad_diloco_settings_name_the_setting_and_the_fix(bad, message):
    s = RunSettings(**bad)
    with pytest.raises(ValueError, match=message) as err:
        s.check_knobs()
    assert "Fix:" in str(err.value)


def test_the_planner_predicts_diloco_communication_and_memory():
    from app.planner.costmodel import DeviceSpec
    from app.planner.links import Links
    from app.planner.plan import make_plan

    specs = [DeviceSpec(f"d{i}", 100.0, None) for i in range(4)]
    slow = Links(default_mbps=50.0)                     # home Wi-Fi
    base = dict(model="gpt2-s", parallelism="dp", sync_every=8, batch_size=32)

    def plan(**kw):
        return make_plan("gpt2-s", "dp", specs, slow, settings=RunSettings(**base, **kw), propose=False)
    ddp, fp32, bf16 = plan(), plan(dp_mode="diloco", sync_dtype="fp32"), plan(dp_mode="diloco")
    bytes_of = {name: p.totals["comm_bytes_per_step"] for name, p in (("ddp", ddp), ("fp32", fp32), ("bf16", bf16))}
    # per step, DDP and fp32 DiLoCo move the same (one fp32 all-reduce every 8 steps); bf16 half
    assert bytes_of["fp32"] == pytest.approx(bytes_of["ddp"])
    assert bytes_of["bf16"] == pytest.approx(bytes_of["ddp"] / 2)
    # every iteration steps the inner optimizer; the anchor and outer momentum cost memory
    assert bf16.predictions[0].peak_rss_bytes > ddp.predictions[0].peak_rss_bytes
    # against DP synchronising every step: 8 steps per sync x half the bytes
    every_step = make_plan("gpt2-s", "dp", specs, slow, settings=RunSettings(**{**base, "sync_every": 1}),
                           propose=False)
    assert bf16.totals["comm_bytes_per_step"] * 16 == pytest.approx(every_step.totals["comm_bytes_per_step"])
    assert bf16.totals["latency_per_sample_s"] < every_step.totals["latency_per_sample_s"]


def test_the_run_form_selects_diloco(qtbot):
    pytest.importorskip("PySide6")
    from app.qt.qt_runconfig import QtRunConfigPanel

    form = QtRunConfigPanel()
    qtbot.addWidget(form)
    assert form.settings().dp_mode == "ddp"
    form.dp_mode.setCurrentIndex(form.dp_mode.findData("diloco"))
    assert form.settings().dp_mode == "diloco"
    form.set_settings(RunSettings(parallelism="pp", dp_mode="diloco"))
    assert not form.dp_mode.isEnabled() and form.settings().dp_mode == "diloco"


def test_a_diloco_run_over_ssh_evaluates_checkpoints_and_ends_with_one_model(tmp_path):
    import asyncio

    from app.devices.inventory import load_inventory
    from app.run.jobs import prepare_run
    from app.testbed.local import Testbed
    from tests.test_e2e_spine import base_addr

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=2, port=0, base_addr=base_addr(), cgroups=False) as tb:
            s = RunSettings(model="tiny-gpt2", parallelism="dp", dp_mode="diloco", sync_every=4, steps=10,
                            batch_size=32, eval_every=5, checkpoint_every=5, checkpoint_minutes=0)
            launcher, state = prepare_run(load_inventory(tb.inventory_path), None, s, tmp_path / "runs")
            return await launcher.run(), state

    outcome, state = asyncio.run(main())
    assert outcome == "done", state.events
    summ = state.summary()
    assert summ["eval_step"] == 10 and 0 <= summ["eval_accuracy"] <= 1
    assert len({d.param_digest for d in state.devices.values()}) == 1   # the last step ends with an outer step
    assert any(c.get("complete") for c in state.checkpoints.values()), state.checkpoints
