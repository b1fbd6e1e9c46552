"""Preflight on real testbed devices whose interpreters lack torch or have the wrong one."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.devices.inventory import load_inventory
from app.devices.preflight import format_reports, preflight
from app.devices.ssh import KnownHosts
from app.testbed.daemon import start_testbed, stop_testbed
from app.testbed.local import Testbed

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def plain_venv(path: Path) -> Path:
    """A real interpreter without torch (a device where nobody installed it)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def old_torch_venv(path: Path, version: str = "2.1.0") -> Path:
    """An interpreter whose installed ``torch`` package is an unsupported version."""
    py = plain_venv(path)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    meta = site / f"torch-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return py


def test_preflight_reports_missing_and_wrong_torch_with_fixes(tmp_path):
    no_torch = plain_venv(tmp_path / "bare")
    old_torch = old_torch_venv(tmp_path / "old")

    async def scenario():
        async with Testbed(tmp_path / "tb", n_devices=4, base_addr="127.0.12.21", port=0) as tb:
            inv = load_inventory(tb.inventory_path)
            inv.devices[1].python = str(no_torch)
            inv.devices[2].python = str(old_torch)
            inv.devices[3].python = "/nonexistent/python3"
            return await preflight(inv.devices, KnownHosts(tb.known_hosts_path))

    reports = asyncio.run(scenario())
    text = format_reports(reports)
    ok, bare, old, missing = reports
    assert ok.ok, text
    assert [c.name for c in ok.checks] == ["ssh", "python", "torch", "transformers", "disk", "clock",
                                           "rendezvous"]
    assert "reachable from 2/2" in ok.get("rendezvous").detail

    assert not bare.ok
    t = bare.get("torch")
    assert not t.ok and "No module named 'torch'" in t.detail
    assert f"install torch on '{bare.name}'" in t.fix and f"{no_torch} -m pip install 'torch==" in t.fix
    assert bare.get("rendezvous").ok  # the probe itself needs no torch

    assert not old.ok
    t = old.get("torch")
    assert not t.ok and "torch 2.1.0" in t.detail and "outside the supported range" in t.fix

    assert not missing.ok
    p = missing.get("python")
    assert not p.ok and "was not found" in p.detail and "'python:'" in p.fix
    assert "FAIL" in text and f"not ready: {bare.name}, {old.name}, {missing.name}" in text


def test_preflight_ssh_failures_name_the_fix(tmp_path):
    async def scenario():
        async with Testbed(tmp_path / "tb", n_devices=2, base_addr="127.0.12.25", port=0) as tb:
            inv = load_inventory(tb.inventory_path)
            inv.devices[1].port = 1  # nothing listens there
            return await preflight(inv.devices, KnownHosts(tmp_path / "empty_known_hosts"))

    untrusted, unreachable = asyncio.run(scenario())
    assert untrusted.get("ssh").fix == f"edgetrain devices trust {untrusted.name}"
    assert "SHA256:" in untrusted.get("ssh").detail
    assert "unreachable" in unreachable.get("ssh").detail and "powered on" in unreachable.get("ssh").fix
    assert [c.name for c in untrusted.checks] == ["ssh"]


def test_cli_preflight_exit_code_and_report(tmp_path):
    no_torch = plain_venv(tmp_path / "bare")
    info = start_testbed(tmp_path / "tb", n_devices=2, base_addr="127.0.12.27", port=0)
    try:
        inv = load_inventory(info.inventory_path)
        inv.devices[1].python = str(no_torch)
        inv.save(tmp_path / "inventory.yaml")
        env = {**os.environ, "EDGETRAIN_HOME": str(tmp_path / "home")}
        res = subprocess.run([sys.executable, "-m", "app.cli", "preflight", "--inventory",
                              str(tmp_path / "inventory.yaml")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        ok_only = subprocess.run([sys.executable, "-m", "app.cli", "preflight", inv.devices[0].name,
                                  "--inventory", str(tmp_path / "inventory.yaml")], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)
    finally:
        stop_testbed(tmp_path / "tb")
    assert res.returncode == 1, res.stdout + res.stderr
    name = inv.devices[1].name
    assert f"{name} (" in res.stdout and "FAILED" in res.stdout
    assert f"fix: install torch on '{name}'" in res.stdout
    assert f"not ready: {name}" in res.stdout
    assert ok_only.returncode == 0, ok_only.stdout + ok_only.stderr
    assert "1/1 device(s) ready" in ok_only.stdout
