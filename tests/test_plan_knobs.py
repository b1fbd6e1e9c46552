"""The planner's memory knobs: optimizer state, checkpointing, accumulation, DP shares,
the memory-aware pipeline split and the "what would make it fit" search.  Pure functions: fast."""
from __future__ import annotations

from dataclasses import replace

import pytest

from app.boards import get_board
from app.planner import costmodel as cm
from app.planner import knobs
from app.planner.costmodel import GIB, DeviceSpec
from app.planner.links import Links
from app.planner.plan import Plan, compare, make_plan
from app.planner.shape import resolve_model
from app.planner.suggest import SUGGEST_HEADROOM, apply_suggestion
from workers.config import RunSettings

FREE = [DeviceSpec("a", 200.0, None)]  # no memory limit: nothing OOMs, nothing is searched


def _nanos(n: int = 4) -> list[DeviceSpec]:
    """Jetson Nano 4 GB boards: physical memory (RSS against 4 GiB), as on a real board."""
    return [replace(cm.spec_from_preset(f"nano{i}", get_board("jetson-nano")), mem_is_virtual=False)
            for i in range(n)]


def _mem(model: str, par: str, specs, **kw) -> dict[str, int]:
    plan = make_plan(model, par, specs, settings=RunSettings(model=model, parallelism=par, **kw), propose=False)
    return plan.predictions[0].mem_bytes


def _gpt2l(par: str, **kw) -> RunSettings:
    return RunSettings(model="gpt2-l", parallelism=par, batch_size=128, seq_len=32, **kw)


# --------------------------------------------------------------------------- each knob


def test_sgd_saves_one_param_size_of_state_and_adafactor_nearly_two():
    params = resolve_model("gpt2-s").total_params()
    adamw, sgd, ada = (_mem("gpt2-s", "dp", FREE, optimizer=o) for o in ("adamw", "sgd", "adafactor"))
    for phase in ("forward", "backward"):
        assert adamw[phase] - sgd[phase] == pytest.approx(4 * params, rel=1e-6)
        saved = adamw[phase] - ada[phase]
        assert 0.97 * 8 * params < saved < 8 * params
    # Adafactor's state: a row and a column per matrix, biases and LayerNorms in full
    shape = resolve_model("gpt2-s")
    factored = (knobs.block_state_elems(shape) * shape.n_layer + knobs.edge_state_elems(shape, True, True))
    assert factored < 0.01 * params
    # the optimizer phase (small batch: temporaries would outgrow the activations): the
    # fused AdamW and SGD make none, so they differ by SGD's state; Adafactor saves its
    # state but keeps one temporary of the largest tensor
    small = {o: _mem("gpt2-s", "dp", FREE, optimizer=o, batch_size=1)["optimizer"] for o in knobs.OPTIMIZERS}
    assert small["adamw"] - small["sgd"] == pytest.approx(4 * params, rel=1e-6)
    assert small["sgd"] - small["adafactor"] > 4 * (params - shape.largest_tensor_params())
    assert small["sgd"] - small["adafactor"] < 4 * params


def test_activation_checkpointing_keeps_block_inputs_and_costs_a_third_of_forward():
    shape = resolve_model("gpt2-l")  # 36 blocks
    st = RunSettings(model="gpt2-l", batch_size=8, seq_len=32)
    full = make_plan("gpt2-l", "dp", FREE, settings=st)
    ckpt = make_plan("gpt2-l", "dp", FREE, settings=replace(st, activation_checkpointing=True))
    kept_full = sum(knobs.activation_bytes(shape, st, 8 * 32, 36, True, True)[:2])
    kept_ckpt = sum(knobs.activation_bytes(shape, replace(st, activation_checkpointing=True), 8 * 32, 36, True,
                                           True)[:2])
    assert kept_ckpt < 0.1 * kept_full  # 36 block inputs + one block, against 36 blocks
    f = cm.CALIBRATION.act_factor["gpt2"]
    for phase in ("forward", "backward"):
        cut = full.predictions[0].mem_bytes[phase] - ckpt.predictions[0].mem_bytes[phase]
        assert cut == pytest.approx(f * (kept_full - kept_ckpt), rel=1e-3)
    ratio = ckpt.predictions[0].compute_s / full.predictions[0].compute_s
    assert 1.2 < ratio < 1 + knobs.RECOMPUTE_FRACTION + 1e-9  # +1/3 of the blocks, not of the embeddings


def test_checkpointing_helps_every_parallelism():
    specs = [DeviceSpec(f"d{i}", 200.0, None) for i in range(4)]
    for par in ("dp", "sp", "tp", "pp", "hybrid"):
        plain = _mem("gpt2-s", par, specs, batch_size=32)
        ck = _mem("gpt2-s", par, specs, batch_size=32, activation_checkpointing=True)
        assert ck["backward"] < plain["backward"], par


@pytest.mark.parametrize("g", [2, 4, 8])
def test_grad_accumulation_cuts_dp_activations_about_g_fold(g):
    shape = resolve_model("gpt2-s")
    specs = [DeviceSpec(f"d{i}", 200.0, None) for i in range(2)]
    one = _mem("gpt2-s", "dp", specs, batch_size=128)
    acc = _mem("gpt2-s", "dp", specs, batch_size=128, grad_accumulation=g)
    act = cm.CALIBRATION.act_factor["gpt2"] * knobs.activation_bytes(shape, RunSettings(), 64 * 32, 12, True, True)[0]
    # backward holds the gradients either way: the difference is the activations
    assert one["backward"] - acc["backward"] == pytest.approx(act * (1 - 1 / g), rel=1e-6)
    # accumulating replicas keep their gradients through the next micro-batch's forward
    assert acc["forward"] < one["forward"]


def test_bf16_halves_activations_but_adds_weight_copies():
    shape = resolve_model("gpt2-s")
    st = RunSettings(model="gpt2-s", batch_size=64)
    fp32 = _mem("gpt2-s", "dp", FREE, batch_size=64)
    bf16 = _mem("gpt2-s", "dp", FREE, batch_size=64, precision="bf16")
    act = cm.CALIBRATION.act_factor["gpt2"] * knobs.activation_bytes(shape, st, 64 * 32, 12, True,
                                                                      True)[0]
    copies = knobs.BF16_COPY_BYTES * (shape.total_params() - shape.embed_params())
    assert fp32["forward"] - bf16["forward"] == pytest.approx(act * (1 - knobs.BF16_ACT_FACTOR) - copies, rel=1e-6)
    assert bf16["load"] == fp32["load"] and bf16["optimizer"] <= fp32["optimizer"]


# --------------------------------------------------------------------------- DP shares


def test_dp_shares_follow_device_speed_and_balance_the_step():
    specs = [DeviceSpec(f"d{i}", g, None, threads=1) for i, g in enumerate((100.0, 200.0, 300.0, 400.0))]
    st = RunSettings(model="gpt2-s", batch_size=128)
    plan = make_plan("gpt2-s", "dp", specs, settings=st)
    assert plan.dp_shares == pytest.approx([0.1, 0.2, 0.3, 0.4])
    compute = [d.compute_s for d in plan.predictions]
    assert max(compute) / min(compute) < 1.1
    even = make_plan("gpt2-s", "dp", specs, settings=replace(st, dp_shares=[1, 1, 1, 1]))
    assert even.dp_shares == [0.25] * 4
    assert plan.totals["step_s"] < 0.75 * even.totals["step_s"]
    # memory follows the share: the fastest rank keeps the most activations
    peaks = [d.mem_bytes["backward"] for d in plan.predictions]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    assert plan.to_job_fields()["dp_shares"] == plan.dp_shares


def test_equal_devices_keep_equal_shares_and_user_shares_win():
    near = [DeviceSpec("a", 200.0, None), DeviceSpec("b", 206.0, None)]  # within 5 %
    assert make_plan("gpt2-s", "dp", near).dp_shares is None
    user = make_plan("gpt2-s", "dp", near, settings=RunSettings(model="gpt2-s", dp_shares=[3, 1]))
    assert user.dp_shares == [0.75, 0.25]
    # shares for another device count (a re-plan on survivors): picked again, with a note
    fast = [DeviceSpec("a", 100.0, None), DeviceSpec("b", 300.0, None)]
    again = make_plan("gpt2-s", "dp", fast, settings=RunSettings(model="gpt2-s", dp_shares=[1, 1, 1]))
    assert again.dp_shares == pytest.approx([0.25, 0.75]) and any("dp_shares" in w for w in again.warnings)
    # non-DP plans carry no shares
    assert make_plan("gpt2-s", "pp", fast).dp_shares is None


def test_share_counts_match_the_workers_split():
    # workers.config.share_bounds: floors of the cumulative shares (12.7, 38.1, 76.2 of 127)
    assert knobs.share_counts(127, [0.1, 0.2, 0.3, 0.4], 4) == [12, 26, 38, 51]
    assert knobs.share_counts(10, None, 4) == [3, 3, 2, 2]  # workers.engine.rank_slice
    with pytest.raises(ValueError, match="no row"):
        knobs.share_counts(4, [0.01, 1, 1, 1], 4)


def test_prepare_run_applies_the_plans_shares_unless_the_user_gave_some(tmp_path):
    from app.devices.inventory import Device, Inventory
    from app.run.jobs import prepare_run

    inv = Inventory(devices=[Device("a", "10.0.0.1"), Device("b", "10.0.0.2")],
                    known_hosts=str(tmp_path / "known_hosts"))
    plan = {"dp_shares": [0.25, 0.75], "stages": []}
    launcher, _ = prepare_run(inv, None, RunSettings(model="gpt2-s"), tmp_path / "runs", plan=plan)
    assert launcher.job.dp_shares == [0.25, 0.75]
    launcher, _ = prepare_run(inv, None, RunSettings(model="gpt2-s", dp_shares=[1, 1]), tmp_path / "runs", plan=plan)
    assert launcher.job.dp_shares == [1, 1]
    launcher, _ = prepare_run(inv, None, RunSettings(model="gpt2-s", parallelism="pp"), tmp_path / "runs",
                              plan={**plan, "stages": [{"ranks": [0], "layers": [0, 6]},
                                                       {"ranks": [1], "layers": [6, 12]}]})
    assert launcher.job.dp_shares is None


def test_the_plan_for_survivors_keeps_their_shares(tmp_path):
    """What the launcher plans ahead for each possible loss uses the shares the DP workers
    keep (their planned ones, renormalised: workers.engine.survivor_shares)."""
    from app.devices.inventory import Device, Inventory
    from app.run.planning import fallback_plans

    inv = Inventory(devices=[Device(f"d{i}", f"10.0.0.{i + 1}", labels={"preset": "jetson-nano"}) for i in range(4)],
                    known_hosts=str(tmp_path / "known_hosts"))
    names = [d.name for d in inv.devices]
    out = fallback_plans(inv, names, RunSettings(model="tiny-gpt2", batch_size=48, dp_shares=[1, 2, 3, 2]),
                         use_cache=False)
    assert out["d2"].devices == ["d0", "d1", "d3"]
    assert out["d2"].plan["dp_shares"] == pytest.approx([0.2, 0.4, 0.4])
    assert out["d0"].plan["dp_shares"] == pytest.approx([2 / 7, 3 / 7, 2 / 7])


# --------------------------------------------------------------------------- memory-aware split


def test_memory_aware_split_fits_where_the_time_balanced_one_does_not():
    st = _gpt2l("pp", schedule="1f1b", micro_batches=8, activation_checkpointing=True)
    unlimited = [replace(s, mem_bytes=None) for s in _nanos()]
    balanced = make_plan("gpt2-l", "pp", unlimited, settings=st, propose=False).stages
    assert [s["layers"][1] - s["layers"][0] for s in balanced] == [9, 9, 9, 9]
    forced = make_plan("gpt2-l", "pp", _nanos(), settings=st, stages=balanced, propose=False, suggest=False)
    assert forced.predictions[0].oom and not any(d.oom for d in forced.predictions[1:])
    plan = make_plan("gpt2-l", "pp", _nanos(), settings=st, propose=False, suggest=False)
    assert plan.feasible and not plan.oom
    blocks = [s["layers"][1] - s["layers"][0] for s in plan.stages]
    # the embedding stage (tables + their AdamW state) gives blocks away
    assert blocks[0] < 9 and sum(blocks) == 36 and blocks[0] == min(blocks)


# --------------------------------------------------------------------------- what would make it fit


def test_gpt2l_on_four_nanos_pp_fits_with_knobs():
    st = _gpt2l("pp")
    plan = make_plan("gpt2-l", "pp", _nanos(), settings=st)
    assert plan.oom and plan.suggestion and plan.suggestion["fits"]
    sug = plan.suggestion
    assert sug["changes"].get("schedule") == "1f1b" and sug["changes"]["micro_batches"] > st.micro_batches
    assert sug["text"].startswith("PP with 1F1B") and "GiB on nano" in sug["text"]
    # a suggestion leaves headroom for the planner's error (a 3.8-of-4 GiB one was OOM-killed),
    # counted as the cap counts: without the file-backed pages the kernel reclaims first
    assert sug["need_bytes"] < sug["limit_bytes"] == 4 * GIB
    fixed = apply_suggestion(st, plan)
    again = make_plan("gpt2-l", "pp", _nanos(), settings=fixed)
    assert again.feasible and not again.oom and again.suggestion is None
    tightest = min(again.predictions, key=lambda d: d.margin)
    assert tightest.name == sug["device"] and tightest.capped_peak_bytes == sug["need_bytes"]
    assert tightest.margin >= SUGGEST_HEADROOM
    assert apply_suggestion(fixed, again) == fixed
    # the suggestion travels with the plan JSON
    assert Plan.from_dict(plan.to_dict()).suggestion == sug


def test_gpt2l_does_not_fit_one_nano_dp_or_sp_whatever_the_knobs():
    for par, specs in (("dp", _nanos(1)), ("dp", _nanos()), ("sp", _nanos())):
        plan = make_plan("gpt2-l", par, specs, settings=_gpt2l(par))
        assert plan.oom and plan.suggestion is not None and not plan.suggestion["fits"], (par, len(specs))
        with pytest.raises(ValueError, match="does not fit"):
            apply_suggestion(_gpt2l(par), plan)
    # even every knob at once: the weights, gradients and the smallest state of 774 M parameters
    everything = _gpt2l("dp", optimizer="adafactor", activation_checkpointing=True, grad_accumulation=32)
    assert make_plan("gpt2-l", "dp", _nanos(), settings=everything, suggest=False).oom


def test_gpt2l_tp_on_four_nanos_fits_with_chunked_batches_and_never_with_adafactor():
    """Every TP shard runs the whole batch, so its activations dominate: gradient
    accumulation (the batch in chunks) makes it fit.  torch's Adafactor cannot step DTensor
    shards (the workers refuse it with TP), so the planner never suggests it there."""
    plan = make_plan("gpt2-l", "tp", _nanos(), settings=_gpt2l("tp"))
    assert plan.oom and plan.suggestion["fits"], plan.suggestion
    changes = plan.suggestion["changes"]
    assert changes.get("grad_accumulation", 1) > 1 and changes.get("optimizer") != "adafactor", changes
    fixed = apply_suggestion(_gpt2l("tp"), plan)
    again = make_plan("gpt2-l", "tp", _nanos(), settings=fixed, suggest=False)
    assert not again.oom

    def peak(**ch) -> float:
        p = make_plan("gpt2-l", "tp", _nanos(), settings=_gpt2l("tp", **ch), suggest=False)
        return max(d.peak_rss_bytes for d in p.predictions)
    # each knob cuts the peak; chunks cut it most, then checkpointing, then SGD's single buffer
    assert peak() > peak(activation_checkpointing=True) > peak(activation_checkpointing=True, optimizer="sgd")
    assert peak(grad_accumulation=8) < peak() / 2


def test_bf16_is_not_suggested_on_cpu_devices():
    plan = make_plan("gpt2-l", "sp", _nanos(), settings=_gpt2l("sp"))
    assert "bf16" not in plan.suggestion["text"]

    class Bf16Spec(DeviceSpec):
        supports_bf16 = True

    assert knobs.supports_bf16(Bf16Spec("x", 200.0, None)) and not knobs.supports_bf16(_nanos(1)[0])


def test_compare_says_per_parallelism_whether_it_fits_as_is_or_with_which_knobs():
    cmp = compare("gpt2-l", _nanos(), Links(), _gpt2l("dp"))
    assert cmp.best is None
    by = {p.parallelism: p for p in cmp.plans}
    assert by["pp"].suggestion["fits"] and not by["dp"].suggestion["fits"]
    lines = {line.split()[1]: line for line in cmp.lines}
    assert "to fit: PP with" in lines["PP"] and "does not fit with any of" in lines["DP"]
    assert cmp.best_with_knobs is not None and cmp.best_with_knobs.suggestion["fits"]


def test_version_one_plans_still_load():
    data = make_plan("tiny-gpt2", "dp", FREE).to_dict()
    old = {k: v for k, v in data.items() if k not in ("dp_shares", "suggestion")}
    old["version"] = 1
    plan = Plan.from_dict(old)
    assert plan.dp_shares is None and plan.suggestion is None
