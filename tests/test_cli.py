"""``edgetrain`` as a user runs it: a separate process, its exit code and what it prints.

Every command runs as ``python -m app.cli`` (what the ``edgetrain`` script runs) from this
checkout, with ``EDGETRAIN_HOME`` set to a temporary directory, on random loopback
addresses and free ports, so nothing of the user's is touched.  One 5-device testbed,
brought up and always brought down with the CLI, serves every ``run``: the five
parallelisms (runs on disjoint devices go at once) and a run that fails on its device.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.test_e2e_spine import base_addr, gone
from workers.dist import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
#: A hang guard only (two shared cores); never a speed check.
TIMEOUT_S = 300


def edgetrain(home: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGETRAIN_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def processes_under(d: Path) -> list[psutil.Process]:
    """Live processes that belong to the testbed in ``d``: the daemon (``--dir d`` on its
    command line) and device commands (their cwd is a device home under ``d``)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if str(d) in " ".join(p.cmdline()) or p.cwd().startswith(str(d) + os.sep):
                out.append(p)
        except psutil.Error:
            continue
    return out


def device_rows(stdout: str) -> list[dict]:
    """The per-device table of the run summary: device, rank, role, status, steps."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("device ") and " role " in ln)
    assert set(lines[start + 1]) == {"-"}
    rows = []
    for ln in lines[start + 2:]:
        m = re.match(r"^(\S+)\s+(\d+) (.{18}) (\S+)\s+(\d+) ", ln)
        if not m:
            break
        rows.append({"device": m[1], "rank": int(m[2]), "role": m[3].strip(), "status": m[4], "steps": int(m[5])})
    return rows


@dataclass
class Bed:
    home: Path
    dir: Path
    inventory: Path
    pid: int
    devices: list[str]


def _up(home: Path, d: Path, n: int) -> subprocess.CompletedProcess[str]:
    addr = base_addr()
    return edgetrain(home, "testbed", "up", "--devices", n, "--base-addr", addr, "--port", free_port(addr),
                     "--dir", d)


def test_testbed_up_status_down(tmp_path):
    home, d = tmp_path / "home", tmp_path / "tb"
    try:
        up = _up(home, d, 2)
        assert up.returncode == 0, up.stderr
        state = json.loads((d / "state.json").read_text())
        devices = [(x["name"], f"{x['host']}:{x['port']}") for x in state["devices"]]
        assert [n for n, _ in devices] == ["dev0", "dev1"]
        assert f"inventory {d / 'inventory.yaml'}" in up.stdout
        for name, hostport in devices:
            assert re.search(rf"^\s+{name}\s+{re.escape(hostport)}\s", up.stdout, re.MULTILINE), up.stdout
        daemon = psutil.Process(state["pid"])
        assert daemon.is_running() and str(d) in " ".join(daemon.cmdline())

        status = edgetrain(home, "testbed", "status", "--dir", d)
        assert status.returncode == 0, status.stdout + status.stderr
        for name, hostport in devices:
            # and says what enforces the memory cap (physical as root, else address space)
            assert re.search(rf"^\s+{name}\s+{re.escape(hostport)}\s+reachable\s+limits: memory "
                             rf"(cgroup|address-space)$", status.stdout, re.MULTILINE), status.stdout

        # a second `up` in the same directory is refused and leaves the first one running
        again = _up(home, d, 2)
        assert again.returncode != 0 and "already running" in again.stderr
        assert daemon.is_running()
    finally:
        down = edgetrain(home, "testbed", "down", "--dir", d)
    assert down.returncode == 0 and "testbed stopped" in down.stdout, down.stdout + down.stderr
    assert gone(state["pid"]) and not processes_under(d)
    after = edgetrain(home, "testbed", "status", "--dir", d)
    assert after.returncode == 1 and "no testbed running" in after.stdout
    assert not any(name in after.stdout for name, _ in devices)
    again = edgetrain(home, "testbed", "down", "--dir", d)
    assert again.returncode == 0 and "no testbed was running" in again.stdout
    assert not (home / "testbed").exists()          # --dir was used, not the default


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """Five testbed devices started with ``edgetrain testbed up``; always brought down."""
    home = tmp_path_factory.mktemp("cli-home")
    d = home / "tb"
    try:
        up = _up(home, d, 5)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((d / "state.json").read_text())
        yield Bed(home, d, d / "inventory.yaml", state["pid"], [x["name"] for x in state["devices"]])
    finally:
        edgetrain(home, "testbed", "down", "--dir", d)
    assert not processes_under(d), "testbed processes left after `testbed down`"


#: Each parallelism's run: its devices (rank order) and the role every rank must report
#: (hybrid: 2 stages x 2 replicas).  Runs of one wave go at once, on disjoint devices.
RUNS = {"dp": (["dev0", "dev1"], "replica"), "sp": (["dev2", "dev3"], "seq"),
        "tp": (["dev0", "dev1"], "shard"), "pp": (["dev2", "dev3"], "stage"),
        "hybrid": (["dev0", "dev1", "dev2", "dev3"], "stage")}
#: A run that fails on its device: a data set path that is read there and does not exist.
MISSING_DATA = "/nonexistent/edgetrain-test/qnli.tsv"
WAVES = (("dp", "sp", "bad-data"), ("tp", "pp"), ("hybrid",))


def _run_argv(bed: Bed, run: str) -> list[str]:
    argv = [sys.executable, "-m", "app.cli", "run", "--inventory", str(bed.inventory), "--model", "tiny-gpt2",
            "--steps", "2", "--batch-size", "8", "--micro-batches", "2", "--no-profile"]
    # (--no-profile: these test the parallelisms; the demo below tests profiling first)
    if run == "bad-data":
        return argv + ["--devices", "dev4", "--parallelism", "dp", "--dataset", MISSING_DATA]
    # the DP run also brings its trained model home (the export is the same for all)
    return argv + ["--devices", ",".join(RUNS[run][0]), "--parallelism", run] + (["--no-export"] if run != "dp" else [])


@pytest.fixture(scope="module")
def runs(bed) -> dict[str, subprocess.CompletedProcess[str]]:
    """``edgetrain run`` of tiny-gpt2 for every parallelism (and one doomed run) on the
    module's testbed, wave by wave."""
    assert bed.devices == RUNS["hybrid"][0] + ["dev4"]
    env = {**os.environ, "EDGETRAIN_HOME": str(bed.home)}
    out: dict[str, subprocess.CompletedProcess[str]] = {}
    for wave in WAVES:
        procs = {}
        try:
            for run in wave:
                procs[run] = subprocess.Popen(_run_argv(bed, run), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
            for run, proc in procs.items():
                stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
                out[run] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    return out


@pytest.mark.parametrize("parallelism", list(RUNS))
def test_run_each_parallelism(bed, runs, parallelism):
    names, role = RUNS[parallelism]
    n = len(names)
    r = runs[parallelism]
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^run (\S+): done ", r.stdout, re.MULTILINE)
    assert m, r.stdout
    run_id = m[1]
    rows = device_rows(r.stdout)
    assert [x["device"] for x in rows] == names and [x["rank"] for x in rows] == list(range(n)), r.stdout
    assert all(x["status"] == "done" and x["steps"] == 2 for x in rows), r.stdout
    assert re.search(r"^checkpoints: 1 \(last: step 2, final\)", r.stdout, re.MULTILINE), r.stdout
    model = re.search(r"^trained model: (\S+)", r.stdout, re.MULTILINE)
    assert bool(model) == (parallelism == "dp"), r.stdout
    if model:
        assert (Path(model[1]) / "config.json").is_file() and (Path(model[1]) / "model.safetensors").is_file()
    roles = [x["role"] for x in rows]
    assert all(x.startswith(role) for x in roles), (parallelism, roles)
    if parallelism in ("sp", "tp", "pp"):
        assert len(set(roles)) == n, roles               # each device holds its own part
    if parallelism == "hybrid":
        assert all("replica" in x for x in roles) and len(set(roles)) == n, roles
    # the record it names exists, under $EDGETRAIN_HOME, and says the same
    rec_line = re.search(r"^run record: (.+)$", r.stdout, re.MULTILINE)
    assert rec_line, r.stdout
    path = Path(rec_line[1])
    assert path.is_file() and path == bed.home / "runs" / run_id / "record.json"
    rec = json.loads(path.read_text())
    assert rec["run_id"] == run_id and rec["outcome"] == "done"
    assert rec["config"]["settings"]["parallelism"] == parallelism
    assert [(d["device"], d["role"]) for d in rec["summary"]["devices"]] == list(zip(names, roles))


def test_second_testbed_up_is_a_clean_error(bed):
    r = edgetrain(bed.home, "testbed", "up", "--devices", 1, "--dir", bed.dir)
    assert psutil.Process(bed.pid).is_running()
    assert "already running" in r.stderr
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_run_that_fails_on_its_device_exits_1_and_says_why(bed, runs):
    r = runs["bad-data"]
    assert r.returncode == 1, r.stdout + r.stderr
    m = re.search(r"^run (\S+): failed ", r.stdout, re.MULTILINE)
    assert m, r.stdout
    rows = device_rows(r.stdout)
    assert [(x["device"], x["status"]) for x in rows] == [("dev4", "failed")], r.stdout
    errors = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("ERROR:")]
    assert errors and any("dev4" in e and "qnli.tsv" in e for e in errors), r.stdout
    rec = json.loads((bed.home / "runs" / m[1] / "record.json").read_text())
    assert rec["outcome"] == "failed"
    assert any(e["device"] == "dev4" and e["kind"] == "error" for e in rec["events"]), rec["events"]


def test_run_on_unknown_device_fails_naming_it(bed):
    r = edgetrain(bed.home, "run", "--inventory", bed.inventory, "--devices", "dev0,nosuchdevice",
                  "--model", "tiny-gpt2", "--steps", 2, "--batch-size", 8)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nosuchdevice" in r.stderr and r.stderr.startswith("error:")
    assert "done" not in r.stdout
    assert not (bed.home / "runs").exists() or not any(
        "nosuchdevice" in p.read_text() for p in (bed.home / "runs").glob("*/record.json"))


def test_demo_runs_and_takes_its_testbed_down(tmp_path):
    home = tmp_path / "home"
    addr = base_addr()
    r = edgetrain(home, "demo", "--base-addr", addr, "--port", free_port(addr), "--devices", 2,
                  "--steps", 2, "--batch-size", 8)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^run (\S+): done ", r.stdout, re.MULTILINE)
    assert m, r.stdout
    rows = device_rows(r.stdout)
    assert [x["device"] for x in rows] == ["dev0", "dev1"], r.stdout
    assert all(x["status"] == "done" and x["role"].startswith("replica") for x in rows), rows
    assert f"{addr}" in r.stderr                        # it says where its devices were
    # it measured its devices before planning: the prediction printed is from measured speeds
    assert "profiling dev0, dev1" in r.stderr, r.stderr
    assert sorted(p.name for p in (home / "profiles").glob("dev*.json")) == ["dev0.json", "dev1.json"]
    assert re.search(r"^plan predicted [0-9.]+ ms/sample \(measured [0-9.]+", r.stdout, re.MULTILINE), r.stdout
    rec = Path(re.search(r"^run record: (.+)$", r.stdout, re.MULTILINE)[1])
    assert rec == home / "runs" / m[1] / "record.json" and rec.is_file()
    tb = home / "demo-testbed"
    assert (tb / "inventory.yaml").is_file()           # it used a testbed there ...
    status = edgetrain(home, "testbed", "status", "--dir", tb)
    assert status.returncode == 1, status.stdout      # ... which is down now
    assert not (tb / "state.json").exists() and not processes_under(tb)
