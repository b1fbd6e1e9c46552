"""Inventory validation: every bad file names the file, the entry and the field."""
from __future__ import annotations

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


def test_save_is_atomic_and_keeps_previous_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "inv.yaml"
    Inventory([Device("a", "h1")]).save(path)
    before = path.read_text()
    import yaml
    monkeypatch.setattr(yaml, "safe_dump", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        Inventory([Device("b", "h2")]).save(path)
    assert path.read_text() == before
