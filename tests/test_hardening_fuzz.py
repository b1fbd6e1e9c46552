"""Fuzzing (hypothesis, 1000 cases each): hostile input never escapes as a crash.

* the telemetry parser accepts only believable records, counts the rest, and the run
  state applies whatever it accepts without an exception;
* the inventory and session loaders return a value or raise their own error type, whose
  message names the file and the fix, and leave the file exactly as it was;
* the known_hosts store reads anything that fits, refuses what does not with its own
  error naming the file, and a trust() keeps every earlier byte.

Inputs are mostly *almost valid* (a valid record or file with a few hostile values), so
the checks behind the first type check are reached, plus raw bytes and mangled text.
"""
from __future__ import annotations

import base64
import json
import math
import os
import struct
from pathlib import Path

import asyncssh
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.devices.inventory import Inventory, InventoryError, load_inventory
from app.devices.ssh import KnownHosts, KnownHostsError
from app.run.runstate import RunState
from app.run.telemetry import BOUNDS, MAY_DIVERGE, TelemetryParser
from app.workspace.session import Session, SessionError, load_session
from workers.config import RunSettings
from workers.protocol import OPTIONAL, REQUIRED

FUZZ = settings(max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

#: Hostile and ordinary values of every JSON/YAML type: one draw picks one (drawing
#: nested structures piece by piece would make each case ten times slower).
ODD = [math.nan, math.inf, -math.inf, -1, -1e-9, 0, 0.0, 1, 2, 0.5, 1e300, -1e300, 2**63, 10**30, 16 * 2**40 + 1,
       86_401.0, 1 << 16, 2**31, None, True, False, "", "x", "22", "~", "~nobody/k", "a b", "../../x", "\x00",
       "caf\u00e9", "1e400", [], [1.0], [[]], [None], {}, {"a": 1}, {"name": "a"}, {1: 2},
       [{"name": "a", "host": "h"}], {"ranks": [0], "layers": [0, 4]}]
MISSING = object()   # a change that removes the field
NUMBERS = st.sampled_from([v for v in ODD if isinstance(v, (int, float))]) | st.integers() | st.floats()
VALUE = st.sampled_from(ODD) | NUMBERS | st.text(max_size=8)


def changes(fields: list[str], max_size: int = 3) -> st.SearchStrategy[list[tuple[str, object]]]:
    """A few (field, value) changes: mostly one draw each from the pools, some arbitrary."""
    pairs = [(f, v) for f in fields for v in [*ODD, MISSING]]
    return st.lists(st.sampled_from(pairs) | st.tuples(st.sampled_from(fields) | st.text(max_size=5), VALUE),
                    max_size=max_size)


def apply(base: dict, change: list[tuple[str, object]]) -> dict:
    out = dict(base)
    for name, value in change:
        if value is MISSING:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def mangled(text: str) -> st.SearchStrategy[str]:
    """``text`` with a random slice replaced by random characters."""
    return st.tuples(st.integers(0, len(text)), st.integers(0, 20), st.text(max_size=8)).map(
        lambda t: text[:t[0]] + t[2] + text[t[0] + t[1]:])


def check_file_loader(path: Path, content: bytes, load, error: type[Exception]) -> object | None:
    """Write ``content``, load it: a value or ``error`` naming the file; the file unchanged."""
    path.write_bytes(content)
    try:
        result = load(path)
    except error as exc:
        msg = str(exc)
        assert str(path) in msg and "Fix:" in msg, msg
        result = None
    assert path.read_bytes() == content
    return result


# ------------------------------------------------------------------------------ telemetry

DEVICES = ["dev0", "dev1"]
FILE = {"name": "__0_0.distcp", "rank": 0, "device": "dev0", "bytes": 10, "sha256": "a" * 64}
TEMPLATES = {
    "hello": {"world_size": 2, "parallelism": "dp", "model": "tiny-gpt2", "pid": 42, "mem_limit_bytes": 2**30},
    "step": {"step": 3, "samples": 8, "local_samples": 4, "latency_s": 0.1, "latency_per_sample_s": 0.0125,
             "throughput_sps": 80.0, "loss": 0.7, "energy_j": 1.0, "peak_mem_bytes": 2**29, "comm_s": 0.01,
             "rss_bytes": 2**28},
    "eval": {"step": 4, "loss": 0.6, "accuracy": 0.5, "samples": 32, "seconds": 0.5},
    "beat": {"phase": "forward", "rss_bytes": 2**28},
    "event": {"name": "ready", "message": "m", "role": "stage 0/2", "step": 2, "seconds": 0.1, "generation": 1},
    "oom": {"phase": "forward", "message": "m", "limit_bytes": 2**30, "peak_mem_bytes": 2**31},
    "error": {"message": "boom", "phase": "load"},
    "checkpoint": {"step": 4, "kind": "periodic", "dir": "x", "bytes": 10, "files": [FILE], "seconds": 0.2,
                   "total_bytes": 20},
    "done": {"steps": 4, "samples": 32, "wall_s": 2.0, "energy_j": 5.0, "param_moments": {"w": [4, 4, 1.0, 2.0]}},
}
assert set(TEMPLATES) == set(REQUIRED)
FIELDS = sorted({"v", "type", "run", "rank", "device", "t"} | set(BOUNDS) | set(OPTIONAL)
                | {f for fields in REQUIRED.values() for f in fields} | {"param_moments", "files", "synced"})


BASES = [(kind, rank, device) for kind in sorted(TEMPLATES) for rank in (0, 1, 2, -1) for device in DEVICES]
TELEMETRY_CHANGES = changes(FIELDS)


@st.composite
def telemetry_lines(draw) -> str:
    kind, rank, device = draw(st.sampled_from(BASES))
    rec = {"v": 1, "type": kind, "run": "r", "rank": rank, "device": device, "t": 1.8e9, **TEMPLATES[kind]}
    line = json.dumps(apply(rec, draw(TELEMETRY_CHANGES)))
    how = draw(st.sampled_from(["as is"] * 12 + ["mangled", "big int", "text"]))
    if how == "mangled":
        return draw(mangled(line))
    if how == "big int":  # json refuses integers of over 4300 digits with a plain ValueError
        return line[:-1] + ', "step": ' + "9" * 5000 + "}"
    if how == "text":
        return draw(st.text(max_size=60))
    return line


def believable(rec: dict, device: str) -> None:
    """What an accepted record guarantees (docs/TELEMETRY.md, 'Values checked on arrival')."""
    assert rec["device"] == device and rec["rank"] == DEVICES.index(device)
    for name, value in rec.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            assert name not in BOUNDS or value is None, (name, value)
            continue
        low, high = MAY_DIVERGE.get(name) or BOUNDS.get(name) or (-math.inf, math.inf)
        if name not in MAY_DIVERGE:
            assert not isinstance(value, float) or math.isfinite(value), (name, value)
        assert not (value < low or value > high), (name, value)


@FUZZ
@given(lines=st.lists(st.tuples(st.sampled_from(DEVICES), telemetry_lines()), min_size=1, max_size=3))
def test_fuzz_telemetry_parser(lines):
    state = RunState("r", DEVICES, {})
    parser = TelemetryParser.for_run(state)
    accepted = 0
    for device, line in lines:
        rec = parser.feed(device, line)
        if rec is None:
            continue
        accepted += 1
        believable(rec, device)
        state.feed(rec)            # whatever is believed can be applied
    json.dumps(state.summary(), default=str)
    assert state.rejected_lines == parser.total_rejected <= len(lines) - accepted
    assert sum(sum(r.values()) for r in state.rejected.values()) == state.rejected_lines


# ------------------------------------------------------------------------------ inventory

DEVICE_KEYS = ["name", "host", "port", "user", "key", "python", "workdir", "labels", "hots"]
GOOD_DEVICES = [{"name": n, "host": h} for n in ("a", "b", "nano0") for h in ("h", "10.0.0.1")]
DEVICE = st.tuples(st.sampled_from(GOOD_DEVICES), changes(DEVICE_KEYS)).map(lambda t: apply(*t)) | VALUE
INVENTORY = st.tuples(st.lists(DEVICE, max_size=3) | VALUE,
                      changes(["version", "known_hosts", "extra", "devices"], max_size=2)).map(
    lambda t: apply({"version": 1, "devices": t[0]}, t[1]))
INVENTORY_TEXT = "version: 1\nknown_hosts: kh\ndevices:\n  - name: a\n    host: h\n    port: 2222\n"


def yaml_bytes(structured: st.SearchStrategy, valid_text: str) -> st.SearchStrategy[bytes]:
    """Dumped structures, mangled valid text, raw bytes, YAML edge cases (deep nesting,
    slow for PyYAML's scanner, is its own test in test_hardening_files.py)."""
    tricky = st.sampled_from(["", "~", "- a", "[[[[[[[[[[", "a: *x", "!!binary AAAA", "version: 2024-13-45\n",
                              "&a [*a]", "{? [a]: b}", "\t- x", "\x00", "'" * 3, "[" * 50, "a: 0x" + "f" * 5000])
    return (structured.map(lambda d: yaml.safe_dump(d, allow_unicode=True)).map(str.encode)
            | mangled(valid_text).map(lambda t: t.encode("utf-8", "surrogatepass"))
            | st.binary(max_size=200) | tricky.map(str.encode))


@FUZZ
@given(content=yaml_bytes(INVENTORY, INVENTORY_TEXT))
def test_fuzz_inventory_loader(tmp_path, content):
    inv = check_file_loader(tmp_path / "inventory.yaml", content, load_inventory, InventoryError)
    assert inv is None or (isinstance(inv, Inventory) and inv.devices)


# ------------------------------------------------------------------------------ session

SETTING_NAMES = sorted(RunSettings().to_dict()) + ["batch_sise"]
SESSION = st.tuples(
    st.lists(st.sampled_from(SETTING_NAMES + [1, None, "x"]) | st.text(max_size=6), max_size=2).flatmap(
        lambda names: st.tuples(*[VALUE for _ in names]).map(lambda vals: dict(zip(names, vals)))) | VALUE,
    st.lists(st.sampled_from(GOOD_DEVICES) | VALUE, max_size=2) | VALUE,
    changes(["version", "participants", "inventory", "extra"], max_size=2)).map(
    lambda t: apply({"version": 1, "participants": ["a"], "settings": t[0], "manual_devices": t[1]}, t[2]))
SESSION_TEXT = "version: 1\ninventory: inv.yaml\nparticipants: [a, b]\nsettings: {batch_size: 8, model: tiny-gpt2}\n"


@FUZZ
@given(content=yaml_bytes(SESSION, SESSION_TEXT))
def test_fuzz_session_loader(tmp_path, content):
    ses = check_file_loader(tmp_path / "session.yaml", content, load_session, SessionError)
    assert ses is None or isinstance(ses, Session)


# ------------------------------------------------------------------------------ known_hosts

KEYS = [asyncssh.generate_private_key(alg).convert_to_public() for alg in ("ssh-ed25519", "ecdsa-sha2-nistp256")]
KEY_TEXT = [k.export_public_key("openssh").decode().strip() for k in KEYS]


def _wire(*fields: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(f)) + f for f in fields)).decode()


# key blobs that decode as SSH wire format but hold random fields: deeper than bad base64
BLOBS = st.tuples(st.sampled_from([b"ssh-ed25519", b"ssh-rsa", b"ecdsa-sha2-nistp256", b"ssh-dss", b"x"]),
                  st.lists(st.binary(max_size=40), max_size=3)).map(
    lambda t: f"{t[0].decode()} {_wire(t[0], *t[1])}")
PATTERNS = st.sampled_from(["h", "[h]:2200", "h,g", "[h]:2200,g", "|1|abc=|def=", "@cert-authority *", "#", "*"])
LINE = (st.tuples(PATTERNS, st.sampled_from(KEY_TEXT) | BLOBS | st.text(max_size=20)).map(" ".join)
        | st.text(max_size=30) | st.sampled_from(["", " ", "\r", "\x0c", "\u2028"]))
SEPARATORS = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n"])


@st.composite
def known_hosts_files(draw) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=300))
    parts = [draw(LINE).encode("utf-8", "surrogatepass") + draw(SEPARATORS)
             for _ in range(draw(st.integers(0, 5)))]
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=10)))
    return b"".join(parts)


@FUZZ
@given(content=known_hosts_files(), trust=st.integers(0, 9))
def test_fuzz_known_hosts(tmp_path, content, trust):
    path = tmp_path / "known_hosts"
    path.write_bytes(content)
    try:
        kh = KnownHosts(path)
    except KnownHostsError as exc:   # nothing under 16 MiB that is a file should get here
        pytest.fail(f"refused {content!r}: {exc}")
    assert path.read_bytes() == content
    lines = "\n" + content.decode("utf-8", "replace").replace("\r\n", "\n") + "\n"
    for key, text in zip(KEYS, KEY_TEXT):   # a key on a line of its own is found
        if f"\n[h]:2200 {text}\n" in lines:
            assert key in kh.lookup("h", 2200)
    assert not kh.lookup("nowhere", 22)
    if trust == 0:   # rewriting is slower (fsync): a tenth of the cases, still over a hundred
        kh.trust("new", 22, KEYS[0], replace=False)
        new = path.read_bytes()
        base = content if content.endswith(b"\n") or not content else content + b"\n"
        assert new == base + f"new {KEY_TEXT[0]}\n".encode()
        assert KEYS[0] in KnownHosts(path).lookup("new", 22)
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
