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


# --------------------------------------------------------------------- param_moments

DONE = {"v": 1, "type": "done", "run": "r", "rank": 0, "device": "d0", "t": 1.0, "steps": 3, "samples": 48,
        "wall_s": 1.5}


def test_param_moments_parse_back():
    buf = io.StringIO()
    moments = {"hf.score.weight": [128, 128, 0.25, 1.5], "hf.transformer.h.0.mlp.c_fc.weight": [8192, 16384, -3.0, 40.0],
               "diverged": [4, 4, float("nan"), float("inf")]}
    Emitter("r", 0, "d0", buf).emit("done", steps=3, samples=48, wall_s=1.5, param_moments=moments)
    rec = parse_line(buf.getvalue())
    assert rec["param_moments"]["hf.transformer.h.0.mlp.c_fc.weight"] == [8192, 16384, -3.0, 40.0]
    assert rec["param_moments"]["diverged"][2] != rec["param_moments"]["diverged"][2]   # NaN survives


@pytest.mark.parametrize("moments, reason", [
    ([1, 1, 0.0, 0.0], "is a list, expected an object"),
    ({"w": [4, 4, 0.0]}, "expected [local_count, full_count, sum, sum_of_squares]"),
    ({"w": "4,4,0,0"}, "expected [local_count"),
    ({"w": [4.0, 4, 0.0, 1.0]}, "are not whole numbers"),
    ({"w": [True, 4, 0.0, 1.0]}, "are not whole numbers"),
    ({"w": [0, 4, 0.0, 1.0]}, "need 0 < local_count <= full_count"),
    ({"w": [8, 4, 0.0, 1.0]}, "need 0 < local_count <= full_count"),
    ({"w": [4, 4, "0.5", 1.0]}, "are not numbers"),
    ({"w": [4, 4, 0.5, None]}, "are not numbers"),
    ({"w": [4, 4, 0.5, -1.0]}, "is negative"),
    ({"": [4, 4, 0.5, 1.0]}, "empty parameter name"),
])
def test_malformed_param_moments_are_rejected(moments, reason):
    p = TelemetryParser()
    assert p.feed("d0", json.dumps({**DONE, "param_moments": moments})) is None
    assert p.rejected["d0"] == 1
    assert "'param_moments'" in p.reasons[0] and reason in p.reasons[0]
    with pytest.raises(ProtocolError, match="param_moments"):
        Emitter("r", 0, "d0", io.StringIO()).emit("done", steps=3, samples=48, wall_s=1.5, param_moments=moments)


def test_fingerprint_assembles_shards_stages_and_replicas():
    from app.run.fingerprint import combine, differing
    full = {"a": (4, 2.0, 3.0), "b": (6, -1.0, 5.0)}
    tp = [{"a": [2, 4, 0.5, 1.0], "b": [6, 6, -1.0, 5.0]}, {"a": [2, 4, 1.5, 2.0], "b": [6, 6, -1.0, 5.0]}]
    pp = [{"a": [4, 4, 2.0, 3.0]}, {"b": [6, 6, -1.0, 5.0]}]
    for ranks in (tp, pp, pp + pp):                           # shards add, stages join, replicas agree
        got, problems = combine(ranks)
        assert not problems and not differing(got, full)
    got, problems = combine([tp[0]])                              # a missing shard
    assert problems == ["a: shards hold 2 of 4 elements"] and differing(got, full) == ["a"]
    _, problems = combine([pp[0], {"a": [4, 4, 2.5, 3.0]}])     # replicas drifted
    assert problems and problems[0].startswith("a: replicas disagree")
    assert differing({**full, "a": (4, 2.0 + 1e-7, 3.0)}, full) == []            # rounding
    assert differing({**full, "a": (4, 2.01, 3.0)}, full) == ["a"]
    assert differing({**full, "a": (4, 2.0, float("nan"))}, full) == ["a"]
    assert differing({**full, "a": (4, 2.01, 3.0)}, full, atol_for={"a": 0.01}) == []


# --------------------------------------------------------------------- eval

EVAL = {"v": 1, "type": "eval", "run": "r", "rank": 1, "device": "d0", "t": 1.0, "step": 25, "loss": 0.61,
        "accuracy": 0.75, "samples": 128}


def test_eval_records_parse_back():
    buf = io.StringIO()
    em = Emitter("r", 1, "d0", buf)
    em.emit("eval", step=25, loss=0.61, accuracy=0.75, samples=128, role="stage 1/2")
    em.emit("eval", step=0, loss=float("nan"), accuracy=0.0, samples=1)       # a diverged model: NaN allowed
    em.emit("eval", step=50, loss=float("inf"), accuracy=1.0, samples=3)
    recs = [parse_line(line) for line in buf.getvalue().splitlines()]
    assert [(r["type"], r["step"], r["accuracy"], r["samples"]) for r in recs] == [
        ("eval", 25, 0.75, 128), ("eval", 0, 0.0, 1), ("eval", 50, 1.0, 3)]
    assert recs[0]["loss"] == 0.61 and recs[1]["loss"] != recs[1]["loss"]
    assert TelemetryParser().feed("d0", json.dumps(EVAL))["accuracy"] == 0.75


@pytest.mark.parametrize("change, reason", [
    ({"accuracy": 1.5}, "accuracy 1.5 lies outside [0, 1]"),
    ({"accuracy": -0.1}, "accuracy -0.1 lies outside [0, 1]"),
    ({"accuracy": float("nan")}, "accuracy nan lies outside [0, 1]"),
    ({"samples": 0}, "samples 0: an evaluation needs at least one sample"),
    ({"samples": 12.0}, "field 'samples' has float"),
    ({"step": -1}, "step -1 is negative"),
    ({"loss": -0.5}, "loss -0.5 is negative"),
    ({"loss": "0.5"}, "field 'loss' has str"),
    ({"accuracy": True}, "field 'accuracy' has bool"),
    ({"loss": None}, "field 'loss' has NoneType"),
])
def test_malformed_eval_records_are_rejected(change, reason):
    p = TelemetryParser()
    assert p.feed("d0", json.dumps({**EVAL, **change})) is None
    assert p.rejected["d0"] == 1 and reason in p.reasons[0], p.reasons
    fields = {k: v for k, v in {**EVAL, **change}.items() if k in ("step", "loss", "accuracy", "samples")}
    with pytest.raises(ProtocolError):
        Emitter("r", 0, "d0", io.StringIO()).emit("eval", **fields)
    missing = {k: v for k, v in EVAL.items() if k != "accuracy"}
    assert p.feed("d0", json.dumps(missing)) is None and "lacks field 'accuracy'" in p.reasons[1]


GOOD_FILE = {"name": "__0_0.distcp", "rank": 0, "device": "d0", "bytes": 10, "sha256": "a" * 64}


def test_checkpoint_records_parse_back():
    buf = io.StringIO()
    Emitter("r", 0, "d0", buf).emit("checkpoint", step=4, kind="periodic", dir="../checkpoints/r/step-00000004",
                                    bytes=10, files=[GOOD_FILE])
    rec = parse_line(buf.getvalue())
    assert rec["files"] == [GOOD_FILE] and rec["kind"] == "periodic"


@pytest.mark.parametrize("change, reason", [
    ({"kind": "whenever"}, "kind"),
    ({"files": [dict(GOOD_FILE, name="../../etc/passwd")]}, "bad name"),
    ({"files": [dict(GOOD_FILE, sha256="xyz")]}, "bad sha256"),
    ({"files": [dict(GOOD_FILE, bytes=-1)]}, "bad size"),
    ({"bytes": 11}, "add up"),
    ({"files": ["__0_0.distcp"]}, "not an object"),
])
def test_malformed_checkpoint_records_are_rejected(change, reason):
    rec = {"v": 1, "type": "checkpoint", "run": "r", "rank": 0, "device": "d0", "t": 1.0, "step": 4,
           "kind": "periodic", "dir": "x", "bytes": 10, "files": [GOOD_FILE], **change}
    with pytest.raises(ProtocolError, match=reason):
        parse_line(json.dumps(rec))
