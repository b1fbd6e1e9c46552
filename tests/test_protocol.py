"""Telemetry v1: the emitter's lines parse; malformed lines are rejected, counted, survived."""
from __future__ import annotations

import io
import json

import pytest

from app.run.telemetry import TelemetryParser
from workers.protocol import Emitter, ProtocolError, parse_line


def test_emitted_records_parse_back():
    buf = io.StringIO()
    em = Emitter("r1", 1, "nano1", buf)
    em.emit("hello", world_size=2, parallelism="dp", model="tiny-gpt2", pid=42)
    em.emit("step", step=0, samples=128, latency_s=0.5, latency_per_sample_s=0.5 / 128, loss=0.7)
    em.emit("done", steps=1, samples=128, wall_s=0.6)
    recs = [parse_line(line) for line in buf.getvalue().splitlines()]
    assert [r["type"] for r in recs] == ["hello", "step", "done"]
    assert all(r["v"] == 1 and r["rank"] == 1 and r["device"] == "nano1" for r in recs)
    assert recs[1]["loss"] == 0.7


def test_emitter_refuses_incomplete_record():
    with pytest.raises(ProtocolError, match="lacks field 'samples'"):
        Emitter("r", 0, "d", io.StringIO()).emit("step", step=0, latency_s=1.0, latency_per_sample_s=0.1)


GOOD = {"v": 1, "type": "step", "run": "r", "rank": 0, "device": "d0", "t": 1.0, "step": 3, "samples": 8,
        "latency_s": 0.1, "latency_per_sample_s": 0.0125}


@pytest.mark.parametrize("line, reason", [
    ('{"v": 1, "type": "step"', "bad JSON"),
    (json.dumps({**GOOD, "device": 5}), "field 'device' has int"),
    (json.dumps({**GOOD, "v": 2}), "unsupported protocol version"),
    (json.dumps({**GOOD, "type": "bogus"}), "unknown record type"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "samples"}), "lacks field 'samples'"),
    (json.dumps({**GOOD, "step": "three"}), "field 'step' has str"),
    (json.dumps({**GOOD, "rank": True}), "field 'rank' has bool"),
    (json.dumps({**GOOD, "local_samples": "8"}), "field 'local_samples' has str"),
    (json.dumps({**GOOD, "energy_j": "n/a"}), "field 'energy_j' has str"),
    ("{\"a\":" + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
])
def test_parser_rejects_with_reason_and_keeps_going(line, reason):
    p = TelemetryParser()
    assert p.feed("d0", line) is None
    assert p.rejected["d0"] == 1
    assert reason in p.reasons[0]
    assert p.feed("d0", json.dumps(GOOD))["step"] == 3  # still parsing afterwards


def test_non_json_chatter_is_ignored_not_counted():
    p = TelemetryParser()
    assert p.feed("d0", "UserWarning: something from a library") is None
    assert p.feed("d0", "") is None
    assert p.feed("d0", "[1, 2]") is None
    assert p.total_rejected == 0


def test_record_for_another_device_is_rejected():
    p = TelemetryParser()
    assert p.feed("d1", json.dumps(GOOD)) is None
    assert "claims device 'd0'" in p.reasons[0]
