"""Telemetry values are checked before they are believed: one test per kind of bad value.

Lines are written as a worker writes them (JSON on stdout, NaN and infinity spelled as
Python's ``json`` spells them), fed to the parser the launcher builds for a run
(:meth:`TelemetryParser.for_run`), and every rejection must be counted per device and
reason in the run state and its record, while a valid line still gets through.
"""
from __future__ import annotations

import json

import pytest

from app.devices.inventory import Device
from app.devices.ssh import KnownHosts
from app.run.launcher import Launcher
from app.run.runstate import RunState
from app.run.telemetry import MAX_BYTES, Reject, TelemetryParser
from workers.config import JobConfig

DEVICES = ["dev0", "dev1", "dev2"]


def step(device: str = "dev1", rank: int = 1, **change) -> str:
    rec = {"v": 1, "type": "step", "run": "r", "rank": rank, "device": device, "t": 1.8e9, "step": 3,
           "samples": 8, "local_samples": 4, "latency_s": 0.1, "latency_per_sample_s": 0.0125, "loss": 0.7,
           "energy_j": 1.5, "peak_mem_bytes": 600 * 2**20, **change}
    return json.dumps(rec)


@pytest.fixture
def run(tmp_path):
    state = RunState("r", DEVICES, {}, run_dir=tmp_path / "r")
    return state, TelemetryParser.for_run(state)


def assert_rejected(run, line: str, reason: Reject, needle: str, device: str = "dev1") -> None:
    state, parser = run
    assert parser.feed(device, line) is None
    assert parser.rejected[device] == 1 and parser.by_reason[device] == {reason: 1}
    assert needle in parser.reasons[0], parser.reasons
    assert state.rejected == {device: {str(reason): 1}} and state.rejected_lines == 1
    assert [e.kind for e in state.events] == ["telemetry"] and needle in state.events[0].message
    # the same device's next valid line is believed and applied
    rec = parser.feed(device, step(device, DEVICES.index(device), step=4))
    assert rec is not None and rec["step"] == 4
    state.feed(rec)
    assert state.devices[device].steps == 5
    state.finish("done")
    summary = json.loads((state.run_dir / "record.json").read_text())["summary"]
    assert summary["rejected_telemetry_lines"] == 1
    assert summary["rejected_telemetry"] == {device: {str(reason): 1}}
    assert needle in summary["rejected_telemetry_examples"][0]
    assert [d["rejected_telemetry_lines"] for d in summary["devices"]] == [int(d == device) for d in DEVICES]


def test_valid_line_is_accepted(run):
    state, parser = run
    rec = parser.feed("dev1", step())
    assert rec is not None and rec["latency_s"] == 0.1
    state.feed(rec)
    assert state.devices["dev1"].steps == 4 and parser.total_rejected == 0 and state.rejected == {}
    # a diverged model's loss is reported, not rejected
    assert parser.feed("dev1", step(loss=float("nan"))) is not None
    assert parser.feed("dev1", step(loss=float("inf"))) is not None


def test_nan_is_rejected(run):
    assert_rejected(run, step(latency_s=float("nan")), Reject.NOT_FINITE, "'latency_s' is nan")


def test_infinity_is_rejected(run):
    assert_rejected(run, step(energy_j=float("inf")), Reject.NOT_FINITE, "'energy_j' is inf")


@pytest.mark.parametrize("field", ["latency_per_sample_s", "samples", "energy_j", "peak_mem_bytes", "step"])
def test_negative_is_rejected(run, field):
    assert_rejected(run, step(**{field: -1}), Reject.NEGATIVE, f"'{field}' is -1")


def test_rank_outside_the_world_is_rejected(run):
    assert_rejected(run, step(rank=3), Reject.RANK, "outside the world of 3 ranks")


def test_negative_rank_is_rejected(run):
    assert_rejected(run, step(rank=-1), Reject.RANK, "rank -1 is negative")


def test_rank_of_another_sender_is_rejected(run):
    assert_rejected(run, step(rank=2), Reject.RANK, "claims rank 2; this device was started as rank 1")


def test_hello_with_another_world_size_is_rejected(run):
    hello = {"v": 1, "type": "hello", "run": "r", "rank": 1, "device": "dev1", "t": 1.8e9, "world_size": 4,
             "parallelism": "dp", "model": "tiny-gpt2", "pid": 42}
    assert_rejected(run, json.dumps(hello), Reject.RANK, "world_size 4")


@pytest.mark.parametrize("change, needle", [
    ({"peak_mem_bytes": MAX_BYTES + 1}, "'peak_mem_bytes'"),      # over 16 TiB
    ({"rss_bytes": 10**400}, "'rss_bytes'"),                      # a 400-digit integer
    ({"latency_s": 2 * 86_400.0}, "'latency_s' is 172800.0, above 86400.0"),
    ({"t": 1e300}, "'t'"),
])
def test_absurd_size_is_rejected(run, change, needle):
    assert_rejected(run, step(**change), Reject.OUT_OF_RANGE, needle)


def test_bounded_field_of_the_wrong_type_is_a_schema_reject(run):
    ckpt = {"v": 1, "type": "event", "run": "r", "rank": 1, "device": "dev1", "t": 1.8e9, "name": "resumed",
            "message": "m", "seconds": "fast"}
    assert_rejected(run, json.dumps(ckpt), Reject.SCHEMA, "'seconds' is str")


@pytest.mark.parametrize("field", ["cpu_s", "period_s"])
def test_negative_cpu_time_or_period_is_rejected(run, field):
    assert_rejected(run, step("dev0", 0, **{field: -0.5}), Reject.NEGATIVE, field, device="dev0")


def test_record_for_another_device_counts_as_device(run):
    assert_rejected(run, step(device="dev2", rank=2), Reject.DEVICE, "claims device 'dev2'")


def test_reasons_are_counted_per_device_and_kind(run):
    state, parser = run
    for _ in range(3):
        parser.feed("dev0", step("dev0", 0, comm_s=float("nan")))
    parser.feed("dev0", step("dev0", 1))
    parser.feed("dev2", '{"v": 1, "type": "step"')
    assert state.rejected == {"dev0": {"not finite": 3, "rank": 1}, "dev2": {"schema": 1}}
    assert state.rejected_lines == parser.total_rejected == 5
    # one event per (device, reason): a device spewing garbage does not flood the log
    assert [(e.device, e.kind) for e in state.events] == [("dev0", "telemetry")] * 2 + [("dev2", "telemetry")]


def test_launcher_checks_ranks_and_reports_to_the_run(tmp_path):
    devices = [Device(name, "127.0.0.1", port=2200 + i) for i, name in enumerate(DEVICES)]
    state = RunState("r", DEVICES, {})
    job = JobConfig(run_id="r", world_size=3, master_addr="127.0.0.1", master_port=29500,
                    addrs=["127.0.0.1"] * 3, devices=list(DEVICES))
    launcher = Launcher(devices, job, KnownHosts(tmp_path / "known_hosts"), state)
    assert dict(launcher.parser.ranks) == {"dev0": 0, "dev1": 1, "dev2": 2}
    assert launcher.parser.feed("dev2", step("dev2", 0)) is None
    assert state.rejected == {"dev2": {"rank": 1}}
    assert launcher.parser.feed("dev2", step("dev2", 2)) is not None
