"""Inventory validation: every bad file names the file, the entry and the field."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.devices.inventory import Device, Inventory, InventoryError, load_inventory


@pytest.fixture
def key(tmp_path):
    p = tmp_path / "id_test"
    p.write_text("not really a key, only needs to exist\n")
    return p


def write(tmp_path, text):
    p = tmp_path / "inv.yaml"
    p.write_text(text)
    return p


def test_valid_inventory_round_trips(tmp_path, key):
    p = write(tmp_path, f"""
version: 1
known_hosts: kh
devices:
  - name: nano0
    host: 10.0.0.5
    key: {key.name}
    labels: {{room: lab}}
  - name: tx2
    host: tx2.local
    port: 2222
    user: edge
    python: /opt/py/bin/python3
""")
    inv = load_inventory(p)
    assert [d.name for d in inv.devices] == ["nano0", "tx2"]
    assert inv.devices[0].port == 22 and inv.devices[0].key == str(key.resolve())
    assert inv.devices[1].user == "edge" and inv.devices[1].python == "/opt/py/bin/python3"
    assert inv.known_hosts == tmp_path / "kh"
    inv.save(tmp_path / "copy.yaml")
    again = load_inventory(tmp_path / "copy.yaml")
    assert [(d.name, d.host, d.port, d.user, d.key, d.labels) for d in again.devices] == \
        [(d.name, d.host, d.port, d.user, d.key, d.labels) for d in inv.devices]
    assert inv.select(["tx2", "nano0"])[0].name == "tx2"


@pytest.mark.parametrize("body, where, what", [
    ("devices:\n  - host: 1.2.3.4\n", "device #1", "'name' is missing"),
    ("devices:\n  - name: a\n", "device #1 ('a')", "'host' is missing"),
    ("devices:\n  - name: a\n    host: h\n    port: 70000\n", "field 'port'", "not a TCP port"),
    ("devices:\n  - name: a\n    host: h\n    port: '22'\n", "field 'port'", "not a TCP port"),
    ("devices:\n  - name: a\n    host: h\n  - name: a\n    host: g\n", "device #2 ('a'), field 'name'", "duplicates"),
    ("devices:\n  - name: a\n    host: h\n    key: missing_key\n", "field 'key'", "does not exist"),
    ("devices:\n  - name: a\n    host: h\n    hots: x\n", "field 'hots'", "not a known field"),
    ("devices:\n  - name: 'bad name'\n    host: h\n", "field 'name'", "not a valid device name"),
    ("devices:\n  - name: a\n    host: 'http://h/x'\n", "field 'host'", "not a host name"),
    ("devices: []\n", "field 'devices'", "non-empty list"),
    ("version: 7\ndevices:\n  - name: a\n    host: h\n", "field 'version'", "not supported"),
    ("devices:\n  - name: a\n\thost: h\n", "line", "not valid YAML"),
    ("devices:\n  - just-a-string\n", "device #1", "expected a mapping"),
    ("", "top level", "empty"),
])
def test_malformed_inventory_names_file_entry_field(tmp_path, body, where, what):
    p = write(tmp_path, body)
    with pytest.raises(InventoryError) as info:
        load_inventory(p)
    msg = str(info.value)
    assert str(p) in msg
    assert where in msg
    assert what in msg
    assert "Fix:" in msg


def test_missing_file_says_how_to_get_one(tmp_path):
    with pytest.raises(InventoryError, match="testbed up"):
        load_inventory(tmp_path / "nope.yaml")


def test_unknown_device_name_lists_known(tmp_path):
    inv = Inventory([Device("a", "h1"), Device("b", "h2")])
    with pytest.raises(KeyError, match="devices: a, b"):
        inv.select(["c"])


def test_selecting_a_device_twice_is_refused():
    inv = Inventory([Device("a", "h1"), Device("b", "h2")])
    with pytest.raises(ValueError, match="'a' is selected twice"):
        inv.select(["a", "b", "a"])


def test_save_keeps_previous_when_dump_fails(tmp_path, monkeypatch):
    path = tmp_path / "inv.yaml"
    Inventory([Device("a", "h1")]).save(path)
    before = path.read_text()
    import yaml
    monkeypatch.setattr(yaml, "safe_dump", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        Inventory([Device("b", "h2")]).save(path)
    assert path.read_text() == before


# A process that saves a 100-device inventory with Inventory.save and is SIGKILLed by its
# own file layer once KILL_AT characters have gone into a file it opened for writing in
# the target's folder (KILL_AT = everything: killed when it closes that file; -1: never).
# Every way Python opens a file for writing goes through io.open (open(), Path.open,
# Path.write_text, os.fdopen, tempfile), so wherever save writes, the crash lands mid-write.
CRASHING_SAVE = """
import builtins, io, os, signal, sys
root, target, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, root)
from app.devices.inventory import Device, Inventory

inv = Inventory([Device(f"dev{i}", f"10.0.{i // 200}.{1 + i % 200}", port=2200 + i, labels={"rack": str(i)})
                 for i in range(100)])
folder = os.path.dirname(os.path.abspath(target))
real_open = io.open


class Crashing:
    def __init__(self, f):
        self._f, self._n = f, 0

    def _die(self):
        self._f.flush()                       # what was written reaches the file, then: SIGKILL
        os.kill(os.getpid(), signal.SIGKILL)

    def write(self, data):
        if kill_at >= 0 and self._n + len(data) > kill_at:
            self._f.write(data[:kill_at - self._n])
            self._die()
        self._n += len(data)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def close(self):
        if kill_at >= 0:
            self._die()                       # all written, not yet closed (or renamed)
        return self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def crashing_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    where = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(os.fspath(file))
    if any(c in mode for c in "wax+") and os.path.dirname(where) == folder:
        return Crashing(f)
    return f


builtins.open = io.open = crashing_open
inv.save(target)
"""


def crashing_save(target, kill_at: int) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parent.parent)
    return subprocess.run([sys.executable, "-c", CRASHING_SAVE, root, str(target), str(kill_at)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_save_killed_mid_write_leaves_old_or_new_file_never_a_torn_one(tmp_path):
    path = tmp_path / "inv.yaml"
    Inventory([Device("old0", "h1"), Device("old1", "h2", port=2022)]).save(path)
    old = path.read_text()
    done = crashing_save(tmp_path / "expected.yaml", -1)     # the same save, never killed
    assert done.returncode == 0, done.stderr
    new = (tmp_path / "expected.yaml").read_text()
    assert new != old and len(load_inventory(tmp_path / "expected.yaml").devices) == 100
    n = len(new)
    kill_points = sorted({0, 1, n - 1, n, *(n * i // 8 for i in range(1, 8))})
    for kill_at in kill_points:
        proc = crashing_save(path, kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr)
        now = path.read_text()
        assert now in (old, new), f"killed after {kill_at} of {n} characters: the inventory is torn " \
                                  f"({len(now)} characters: {now[-80:]!r})"
        assert [d.name for d in load_inventory(path).devices] in (["old0", "old1"],
                                                                  [f"dev{i}" for i in range(100)])
    proc = crashing_save(path, -1)
    assert proc.returncode == 0, proc.stderr
    assert path.read_text() == new
