"""The planner: model counts, memory/OOM, plan JSON, comparison, jobs hook and CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from app.boards import BOARDS
from app.planner import costmodel as cm
from app.planner.costmodel import GIB, DeviceSpec, RankLoad
from app.planner.inputs import specs_for_devices
from app.planner.links import Links
from app.planner.plan import PLAN_VERSION, Plan, compare, make_plan, plan_stages
from app.planner.shape import resolve_model
from workers.config import PARALLELISMS, JobConfig, RunSettings
from workers.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def _nano(name: str, **kw) -> DeviceSpec:
    return cm.spec_from_preset(name, BOARDS["jetson-nano"], **kw)


def _testbed() -> list[DeviceSpec]:
    return [_nano("nano0"), _nano("nano1"), cm.spec_from_preset("tx2-0", BOARDS["jetson-tx2"]),
            cm.spec_from_preset("nx0", BOARDS["jetson-nx"])]


# --------------------------------------------------------------------------- model counts


def test_param_counts_match_the_built_models():
    models = pytest.importorskip("workers.models")
    for name in PRESETS:
        assert resolve_model(name).total_params() == models.param_count(name), name


def test_shape_from_preset_and_unknown_name():
    shape = resolve_model("opt-350m")
    assert shape.proj == 512 and not shape.pre_ln
    assert resolve_model(shape) is shape
    with pytest.raises(KeyError, match="unknown model"):
        resolve_model("gpt5")


def test_tp_shards_activations_but_not_layernorm_inputs():
    shape = resolve_model("gpt2-s")
    one, four = shape.block_saved_floats_per_token(1), shape.block_saved_floats_per_token(4)
    assert four < one / 2
    assert four > 4 * shape.hidden  # the replicated part stays


# --------------------------------------------------------------------------- memory and OOM


def test_phases_grow_and_accumulating_dp_holds_gradients_in_forward():
    spec = DeviceSpec("d", gflops=200.0, mem_bytes=None)
    load = RankLoad(params=10_000_000, bucket_params=10_000_000, largest_tensor=1_000_000,
                    saved_act_bytes=50e6, family="gpt2")
    cost = cm.rank_cost(load, spec)
    assert cost.rss["load"] < cost.rss["forward"] < cost.rss["backward"] <= cost.rss["optimizer"]
    acc = cm.rank_cost(RankLoad(**{**load.__dict__, "accumulate": True}), spec)
    assert acc.rss["forward"] - cost.rss["forward"] == pytest.approx(4 * load.params)
    assert all(cost.virtual[p] > cost.rss[p] for p in cm.PHASES)


def test_emulated_cap_compares_virtual_size_real_ram_compares_rss():
    load = RankLoad(params=1000, family="gpt2")
    rss_peak = cm.rank_cost(load, DeviceSpec("d", 200.0, None)).peak_rss
    cap = int(rss_peak + 100 * cm.MIB)  # above RSS, below virtual size
    emulated = DeviceSpec("d", 200.0, cap, mem_is_virtual=True)
    board = DeviceSpec("d", 200.0, cap, mem_is_virtual=False)
    v_emul = cm.memory_verdict(cm.rank_cost(load, emulated), emulated)
    v_board = cm.memory_verdict(cm.rank_cost(load, board), board)
    assert v_emul.oom and v_emul.limit_kind == "virtual" and v_emul.margin < 0
    assert not v_board.oom and v_board.limit_kind == "rss" and v_board.margin > 0


def test_oom_flags_on_the_emulated_testbed():
    specs = _testbed()
    tiny = make_plan("tiny-gpt2", "dp", specs)
    assert not tiny.oom and all(not d.oom and d.margin > 0.5 for d in tiny.predictions)
    big = make_plan("gpt2-l", "dp", specs)
    assert big.oom
    nano = big.predictions[0]
    assert nano.oom and nano.oom_phase == "load" and nano.margin < 0
    assert nano.limit_bytes == 4 * GIB and nano.limit_kind == "virtual"
    assert "OOM on nano0" in big.explanation


def test_unknown_memory_never_ooms():
    plan = make_plan("gpt2-l", "dp", [DeviceSpec("x", 200.0, None)])
    assert not plan.oom and plan.predictions[0].limit_kind == "none"


# --------------------------------------------------------------------------- plan JSON


def test_plan_json_round_trip_and_job_fields():
    plan = make_plan("tiny-gpt2", "pp", _testbed(), settings=RunSettings(micro_batches=8, schedule="1f1b"))
    data = json.loads(plan.to_json())
    assert data["version"] == PLAN_VERSION
    for key in ("parallelism", "model", "settings", "devices", "stages", "predictions", "totals", "explanation"):
        assert key in data
    pred = data["predictions"][0]
    for key in ("mem_bytes", "virtual_bytes", "limit_bytes", "margin", "oom", "oom_phase", "compute_s", "comm_s",
                "latency_per_sample_s", "energy_per_sample_j", "energy_method"):
        assert key in pred
    assert set(pred["mem_bytes"]) == set(cm.PHASES)
    assert data["dp_shares"] is None and data["suggestion"] is None
    assert data["settings"]["optimizer"] == "adamw" and data["settings"]["grad_accumulation"] == 1
    again = Plan.from_dict(data)
    assert again.to_dict() == data
    fields = plan.to_job_fields()
    job = JobConfig(run_id="r", world_size=4, master_addr="a", master_port=1, addrs=["a"] * 4,
                    **{k: v for k, v in fields.items()})
    job.validate()
    assert job.stages == plan.stages and job.micro_batches == 8 and job.schedule == "1f1b"
    with pytest.raises(ValueError, match="version"):
        Plan.from_dict({**data, "version": 99})


def test_1f1b_keeps_fewer_activations_than_gpipe():
    specs = [DeviceSpec(f"d{i}", 200.0, None) for i in range(4)]
    gpipe = make_plan("gpt2-s", "pp", specs, settings=RunSettings(micro_batches=8, batch_size=64, schedule="gpipe"),
                      propose=False)
    ofob = make_plan("gpt2-s", "pp", specs, settings=RunSettings(micro_batches=8, batch_size=64, schedule="1f1b"),
                     propose=False)
    assert ofob.predictions[0].peak_rss_bytes < gpipe.predictions[0].peak_rss_bytes
    assert ofob.totals["step_s"] == pytest.approx(gpipe.totals["step_s"])


def test_dp_sync_every_amortises_the_all_reduce():
    specs = [DeviceSpec(f"d{i}", 200.0, None) for i in range(4)]
    slow = Links(default_mbps=100.0)
    k1 = make_plan("gpt2-s", "dp", specs, slow, RunSettings(sync_every=1))
    k5 = make_plan("gpt2-s", "dp", specs, slow, RunSettings(sync_every=5))
    assert k5.totals["comm_s"] == pytest.approx(k1.totals["comm_s"] / 5)
    assert k5.totals["comm_bytes_per_step"] == pytest.approx(k1.totals["comm_bytes_per_step"] / 5)


def test_infeasible_parallelisms_say_why():
    specs = [DeviceSpec(f"d{i}", 200.0, None) for i in range(5)]
    tp = make_plan("gpt2-s", "tp", specs)
    assert not tp.feasible and "heads" in tp.explanation
    pp = make_plan("tiny-gpt2", "pp", specs)
    assert not pp.feasible and "stages" in pp.explanation


def test_energy_method_follows_the_power_source():
    est = make_plan("tiny-gpt2", "dp", [DeviceSpec("a", 200.0, None, power_source="estimate")])
    meas = make_plan("tiny-gpt2", "dp", [DeviceSpec("a", 200.0, None, power_source="ina3221")])
    assert est.predictions[0].energy_method == "estimate"
    assert meas.predictions[0].energy_method == "measured-power"
    # idle power for the whole step plus the busy share up to P_max
    d = est.predictions[0]
    assert 5.0 * d.step_s / 128 <= d.energy_per_sample_j <= 15.0 * d.step_s / 128 + 1e-12


# --------------------------------------------------------------------------- compare


def test_compare_ranks_feasible_parallelisms_with_one_line_each():
    specs = [DeviceSpec(f"d{i}", 200.0, 8 * GIB) for i in range(4)]
    slow = Links(default_mbps=100.0, default_rtt_ms=2.0)
    cmp = compare("gpt2-s", specs, slow, objective="latency")
    assert set(p.parallelism for p in cmp.plans) == set(PARALLELISMS)
    lats = [next(p for p in cmp.plans if p.parallelism == r).totals["latency_per_sample_s"] for r in cmp.ranking]
    assert lats == sorted(lats)
    assert len(cmp.lines) == len(PARALLELISMS)
    tp_line = next(line for line in cmp.lines if "TP" in line)
    assert "GB/step over the slowest link" in tp_line or "MB/step over the slowest link" in tp_line
    energy = compare("gpt2-s", specs, slow, objective="energy")
    ens = [next(p for p in energy.plans if p.parallelism == r).totals["energy_per_sample_j"] for r in energy.ranking]
    assert ens == sorted(ens)
    mix = compare("gpt2-s", specs, slow, objective="mix")
    assert mix.best is not None
    with pytest.raises(ValueError):
        compare("gpt2-s", specs, objective="speed")


def test_64_devices_36_layers_every_parallelism():
    specs = [DeviceSpec(f"d{i}", 100.0 + 10 * (i % 7), (4 + 4 * (i % 3)) * GIB, threads=1 + i % 2,
                        mem_is_virtual=True) for i in range(64)]
    cmp = compare("gpt2-l", specs, Links(), RunSettings(batch_size=128))
    by = {p.parallelism: p for p in cmp.plans}
    assert len(by["dp"].predictions) == 64
    assert by["hybrid"].stages and sum(len(s["ranks"]) for s in by["hybrid"].stages) == 64
    assert not by["pp"].feasible  # 64 stages > 36 blocks


# --------------------------------------------------------------------------- jobs hook


def test_plan_stages_for_jobs():

    pp = RunSettings(model="gpt2-s", parallelism="pp")
    stages = plan_stages(pp, 4)
    assert [s["ranks"] for s in stages] == [[0], [1], [2], [3]]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 12
    assert plan_stages(pp, 4) == stages
    assert plan_stages(RunSettings(model="gpt2-s", parallelism="dp"), 4) == []
    hyb = plan_stages(RunSettings(model="tiny-gpt2", parallelism="hybrid"), 4)
    assert sorted(r for s in hyb for r in s["ranks"]) == [0, 1, 2, 3] and len(hyb) == 2
    # a slow device gets fewer blocks when specs are given
    specs = [DeviceSpec("a", 200.0, None), DeviceSpec("b", 50.0, None)]
    a, b = plan_stages(RunSettings(model="gpt2-s", parallelism="pp", batch_size=32), 2, specs)
    assert a["layers"][1] - a["layers"][0] > b["layers"][1] - b["layers"][0]


def test_planner_is_torch_free_and_qt_free():
    code = ("import sys, app.planner.plan, app.planner.inputs, app.cli.plan\n"
            "from app.planner.plan import compare\n"
            "compare('gpt2-s', [app.planner.costmodel.DeviceSpec('a', 200.0, None)])\n"
            "print(sorted(m for m in ('torch', 'PySide6', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- CLI


@pytest.fixture()
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text(
        "version: 1\ndevices:\n"
        "  - {name: nano0, host: 127.0.10.1, labels: {preset: jetson-nano, testbed: local}}\n"
        "  - {name: nano1, host: 127.0.10.2, labels: {preset: jetson-nano, testbed: local}}\n"
        "  - {name: box, host: 10.0.0.9}\n")
    return path


def test_cli_plan_prints_memory_latency_energy_and_oom(inventory, capsys):
    from app.cli.main import main

    rc = main(["plan", "--inventory", str(inventory), "--model", "tiny-gpt2", "--parallelism", "pp",
               "--devices", "nano0,nano1"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("nano0", "nano1", "ms/sample", "J/sample", "OOM", "stages:", "4.00Gv"):
        assert text in out
    rc = main(["plan", "--inventory", str(inventory), "--model", "gpt2-l", "--devices", "nano0,nano1"])
    out = capsys.readouterr().out
    assert rc == 1 and "OOM load" in out
    assert "no fit: DP does not fit with any of" in out  # the knobs were searched


def test_cli_compare_and_json(inventory, capsys, tmp_path):
    from app.cli.main import main

    rc = main(["plan", "--inventory", str(inventory), "--model", "tiny-gpt2", "--compare", "--objective", "energy"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "recommendation:" in out and "ranking by energy" in out
    assert "no profile for box" in out
    assert "as is" in out  # every parallelism fits without knobs
    for p in PARALLELISMS:
        assert p.upper() in out
    dest = tmp_path / "plan.json"
    rc = main(["plan", "--inventory", str(inventory), "--model", "tiny-gpt2", "--parallelism", "dp", "--json",
               "--devices", "nano0,nano1", "--output", str(dest)])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["version"] == PLAN_VERSION and data["devices"] == ["nano0", "nano1"]
    assert json.loads(dest.read_text()) == data


def test_testbed_devices_share_the_host_cpus(inventory):
    from app.devices.inventory import load_inventory
    from app.planner.inputs import specs_for_devices

    inv = load_inventory(inventory)
    specs, links = specs_for_devices(inv.devices[:2], inv.devices, n_cpus=1,
                                     gflops_per_thread=100.0)
    assert [s.threads for s in specs] == [1, 1]
    assert all(s.gflops == pytest.approx(50.0) and s.mem_is_virtual for s in specs)
    assert links.default_mbps > 1000  # loopback
    specs, _ = specs_for_devices(inv.devices, inv.devices, n_cpus=8)
    assert not specs[2].profiled and "no profile" in specs[2].source


def test_spec_from_profile_duck_typed():
    class Prof:
        name, threads, gflops_fp32 = "p", 2, 300.0
        mem_limit_bytes, mem_available_bytes, mem_total_bytes = 4 * GIB, 6 * GIB, 8 * GIB
        p_idle_w, p_max_w, power_source = 2.0, 10.0, "ina3221"
        labels = {"preset": "jetson-nano", "testbed": "local"}

    spec = cm.spec_from_profile(Prof())
    assert spec.gflops == 300.0 and spec.mem_bytes == 4 * GIB and spec.mem_is_virtual
    assert cm.energy_method(spec) == "measured-power"
    Prof.labels, Prof.mem_limit_bytes = {}, None
    spec = cm.spec_from_profile(Prof())
    assert spec.mem_bytes == 6 * GIB and not spec.mem_is_virtual


def test_the_op_probe_scales_the_non_matmul_time_and_nothing_else():
    """A device whose profile ran the op probe twice as slow as the calibration host spends
    twice the fixed (non-matmul) seconds; its matmul seconds follow its matmul rate; a
    device without the probe falls back to its per-thread matmul rate."""
    cal = cm.CALIBRATION
    base = cm.DeviceSpec("a", gflops=cal.ref_core_gflops, mem_bytes=None, op_probe_s=cal.ref_op_probe_s)
    slow_ops = replace(base, op_probe_s=2 * cal.ref_op_probe_s)
    assert cm.slowness(base) == pytest.approx(1.0) and cm.slowness(slow_ops) == pytest.approx(2.0)
    flops, act = 4e9, 64 * 2 ** 20
    matmul = cm.compute_seconds(base, flops, 0.0, 0, 0, cal)
    fixed = cm.compute_seconds(base, 0.0, act, 4, 1, cal)
    assert matmul == pytest.approx(flops / (cal.matmul_efficiency * cal.ref_core_gflops * 1e9))
    assert cm.compute_seconds(slow_ops, flops, 0.0, 0, 0, cal) == pytest.approx(matmul)
    assert cm.compute_seconds(slow_ops, 0.0, act, 4, 1, cal) == pytest.approx(2 * fixed)
    assert cm.optimizer_seconds(slow_ops, 10 ** 6, 50, cal) == pytest.approx(
        2 * cm.optimizer_seconds(base, 10 ** 6, 50, cal))
    # no probe: the matmul rate stands in (a board preset, an older profile)
    half = replace(base, gflops=cal.ref_core_gflops / 2, op_probe_s=None)
    assert cm.slowness(half) == pytest.approx(2.0)

    class Prof:
        name, threads, gflops_fp32, op_probe_s = "p", 1, 90.0, 0.004
        mem_limit_bytes = mem_available_bytes = mem_total_bytes = None
        p_idle_w, p_max_w, power_source, labels = 2.0, 10.0, "estimate", {}

    assert cm.spec_from_profile(Prof()).op_probe_s == 0.004


def test_a_pipeline_stage_pays_its_per_message_cost_at_its_own_speed():
    """``p2p_s`` is CPU work on the stage: a stage whose op probe is twice as slow pays it
    twice per message (links made instant so only that term is left)."""
    from app.planner.pipeline import eval_pipeline

    cal = cm.CALIBRATION
    st = RunSettings(model="tiny-gpt2", parallelism="pp", batch_size=32, micro_batches=4)
    stages = [{"ranks": [0], "layers": [0, 2]}, {"ranks": [1], "layers": [2, 4]}]
    links = Links(default_mbps=1e12, default_rtt_ms=0.0)

    def comm(probe_s: float) -> float:
        specs = [DeviceSpec(f"d{i}", gflops=cal.ref_core_gflops, mem_bytes=None, op_probe_s=probe_s)
                 for i in range(2)]
        return eval_pipeline("pp", resolve_model("tiny-gpt2"), st, specs, links, stages=stages).devices[0].comm_s

    # stage 0 sends one message per micro-batch forward (its gradient comes back to it)
    assert comm(cal.ref_op_probe_s) == pytest.approx(4 * cal.p2p_s, rel=1e-3)
    assert comm(2 * cal.ref_op_probe_s) == pytest.approx(8 * cal.p2p_s, rel=1e-3)


def test_testbed_devices_sharing_cores_run_the_op_probe_slower_in_proportion():
    """Four one-thread testbed devices on two host cores: half the matmul rate and twice
    the op probe's seconds each, as they compute at the same time."""
    from app.devices.inventory import Device

    class Prof:
        threads, gflops_fp32, op_probe_s = 1, 90.0, 0.004
        mem_limit_bytes = mem_available_bytes = mem_total_bytes = None
        p_idle_w, p_max_w, power_source, labels = 2.0, 10.0, "estimate", {"testbed": "local"}

    devs = [Device(name=f"d{i}", host="127.0.0.1", labels={"testbed": "local"}) for i in range(4)]
    profiles = {}
    for d in devs:
        profiles[d.name] = type("P", (Prof,), {"name": d.name})()
    specs, _ = specs_for_devices(devs, profiles=profiles, n_cpus=2)
    assert [s.gflops for s in specs] == [45.0] * 4
    assert [s.op_probe_s for s in specs] == [pytest.approx(0.008)] * 4
