"""Sessions (YAML, atomic) and the run history read from run records."""
from __future__ import annotations

import json
import time

import pytest

from app.run.runstate import RunState
from app.workspace.history import iter_telemetry, list_runs
from app.workspace.session import Session, SessionError, load_session, save_session
from workers.config import RunSettings


def test_session_round_trip(tmp_path):
    ses = Session(inventory=str(tmp_path / "inv.yaml"), participants=["dev2", "dev0"],
                  settings=RunSettings(model="gpt2-s", parallelism="pp", batch_size=64, micro_batches=8),
                  manual_devices=[{"name": "nano3", "host": "192.168.1.23", "port": 22, "user": "edge"}])
    path = save_session(tmp_path / "s" / "session.yaml", ses)
    assert path.read_text().startswith("# EdgeTrain session")
    assert not list(path.parent.glob("*.tmp"))
    back = load_session(path)
    assert back == ses


def test_session_overwrite_is_atomic(tmp_path, monkeypatch):
    """A write that fails after the new text is on disk (here: the flush to disk reports
    a full disk) leaves the old session whole and no temp file behind."""
    path = tmp_path / "session.yaml"
    save_session(path, Session(participants=["a"]))
    import app.paths

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(app.paths.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_session(path, Session(participants=["b"] * 500))
    monkeypatch.undo()
    assert load_session(path).participants == ["a"]   # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.yaml"]


@pytest.mark.parametrize("text, needle", [
    ("version: 2\n", "version 2"),
    ("version: 1\nparticipants: 3\n", "participants"),
    ("version: 1\nsettings: {batch_sise: 3}\n", "batch_sise"),
    ("version: 1\nsettings: {batch_size: lots}\n", "expected a number"),
    (": : :\n", "not valid YAML"),
])
def test_bad_session_files(tmp_path, text, needle):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(SessionError, match=needle):
        load_session(p)
    with pytest.raises(SessionError, match="cannot read"):
        load_session(tmp_path / "missing.yaml")


def test_settings_dict_round_trip():
    s = RunSettings(lr=None, stages=[{"ranks": [0], "layers": [0, 4]}])
    assert RunSettings.from_dict(s.to_dict()) == s
    assert RunSettings.from_dict({"lr": 1}).lr == 1.0


def _run(tmp_path, run_id: str, outcome: str, started: float) -> None:
    state = RunState(run_id, ["dev0", "dev1"], {"settings": {"model": "tiny-gpt2", "parallelism": "dp"}},
                     run_dir=tmp_path / run_id)
    state.started = started
    for step in range(3):
        state.feed({"v": 1, "type": "step", "run": run_id, "rank": 0, "device": "dev0", "t": started + step,
                    "step": step, "samples": 8, "latency_s": 0.1, "latency_per_sample_s": 0.0125,
                    "energy_j": 0.5})
    state.finish(outcome)


def test_history_lists_runs_newest_first(tmp_path):
    now = time.time()
    _run(tmp_path, "r-old", "done", now - 100)
    _run(tmp_path, "r-new", "oom", now)
    (tmp_path / "r-broken").mkdir()                       # no record: not listed
    (tmp_path / "r-bad").mkdir()
    (tmp_path / "r-bad" / "record.json").write_text("{nope")
    runs = list_runs(tmp_path)
    assert [r.run_id for r in runs] == ["r-new", "r-old"]
    assert runs[0].outcome == "oom" and runs[0].model == "tiny-gpt2" and runs[0].devices == ["dev0", "dev1"]
    assert "oom" in runs[0].label
    assert list_runs(tmp_path / "nothing") == []


def test_iter_telemetry_skips_torn_lines(tmp_path):
    _run(tmp_path, "r1", "done", time.time())
    with open(tmp_path / "r1" / "telemetry.jsonl", "a") as f:
        f.write('{"type": "step", "device": "dev0"')            # a crash mid-line
    recs = list(iter_telemetry(tmp_path / "r1"))
    assert len(recs) == 3 and all(r["type"] == "step" for r in recs)
    assert list(iter_telemetry(tmp_path / "none")) == []
    assert json.loads((tmp_path / "r1" / "record.json").read_text())["outcome"] == "done"
