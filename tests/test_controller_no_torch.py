"""The controller installs and runs without the worker extra (torch, transformers).

Each check runs a child Python in which ``import torch``, ``import transformers`` and
``import tokenizers`` fail, as on a machine with ``pip install edgetrain`` (no extras):
a ``sitecustomize`` on ``PYTHONPATH`` puts a finder in front of every other one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "transformers", "tokenizers")
BLOCKER = f'''\
import sys

class _NoWorkerExtra:
    """As if the worker extra were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoWorkerExtra())
'''
INVENTORY = """\
version: 1
devices:
  - name: lap0
    host: 192.0.2.10
    labels: {preset: laptop}
  - name: lap1
    host: 192.0.2.11
    labels: {preset: laptop}
"""


@pytest.fixture
def no_torch(tmp_path, _edgetrain_home):
    """Environment for a child Python without the worker extra."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env["QT_QPA_PLATFORM"] = "offscreen"
    env["EDGETRAIN_HOME"] = str(_edgetrain_home)
    return env


def _py(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _edgetrain(env: dict, *args: str) -> subprocess.CompletedProcess:
    return _py(env, "-m", "app.cli", *args)


def test_the_blocker_blocks(no_torch):
    # without this the other tests would pass on a machine where torch is simply importable
    out = _py(no_torch, "-c", "import torch")
    assert out.returncode != 0 and "blocked by the test" in out.stderr


def test_controller_and_gui_modules_import_without_torch(no_torch):
    code = ("import sys\n"
            "import app.cli.main, app.qt.qt_main, app.qt.qt_app\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}))\n")
    out = _py(no_torch, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_and_plan_work_without_torch(no_torch, tmp_path):
    out = _edgetrain(no_torch, "--help")
    assert out.returncode == 0, out.stderr
    assert "plan" in out.stdout and "gui" in out.stdout
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY)
    out = _edgetrain(no_torch, "plan", "--model", "gpt2-s", "--parallelism", "pp", "--inventory", str(inv))
    assert out.returncode == 0, out.stderr
    assert "plan: gpt2-s PP on lap0, lap1" in out.stdout
    assert "stages:" in out.stdout


def test_gui_check_passes_without_torch(no_torch):
    out = _edgetrain(no_torch, "gui", "--check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok    qt-start" in out.stdout and "platform offscreen" in out.stdout


def test_commands_that_run_worker_code_here_name_the_extra(no_torch, _edgetrain_home):
    for args in (["export", "some-run"], ["testbed", "up", "--devices", "2"], ["demo"]):
        out = _edgetrain(no_torch, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "needs the worker extra" in out.stderr and "pip install 'edgetrain[worker]'" in out.stderr, args
        assert "Traceback" not in out.stderr
    assert not (_edgetrain_home / "testbed").exists()   # refused before anything started


def test_the_local_testbed_and_export_say_they_need_the_worker_extra(no_torch, tmp_path):
    code = f"""
from pathlib import Path
from app.workspace.local_testbed import LocalTestbed, TestbedRequest
from app.testbed.emulation import TestbedError
from app.extras import worker_extra_problem
try:
    LocalTestbed({str(tmp_path / 'tb')!r}).start(TestbedRequest(n_devices=2))
except TestbedError as exc:
    print("TESTBED:", exc)
print("EXPORT:", worker_extra_problem("exporting run r1", "the export assembles the model here"))
"""
    out = _py(no_torch, "-c", code)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if line.startswith(("TESTBED", "EXPORT")))
    for key in ("TESTBED", "EXPORT"):
        assert "worker extra" in lines[key] and "pip install 'edgetrain[worker]'" in lines[key], out.stdout
    assert not (tmp_path / "tb").exists() or not any((tmp_path / "tb").iterdir())   # nothing was started
