"""Telemetry protocol v1: one JSON object per line on the worker's stdout.

The worker writes, the controller (``app.run.telemetry``) parses.  This module is the
single definition of the schema; it has no dependency beyond the standard library so
the controller can import it without torch.

Every record has ``v`` (protocol version), ``type``, ``run``, ``rank``, ``device`` and
``t`` (unix time, seconds).  Per type, the fields below are required; any other field
is optional and carried through unchanged.  See ``docs/TELEMETRY.md``.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from .checkpoint_manifest import KINDS as CHECKPOINT_KINDS

VERSION = 1
#: Prefix-free marker so the controller can tell telemetry from library chatter that
#: also lands on stdout (warnings, prints of third-party code).
COMMON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int,
    "type": str,
    "run": str,
    "rank": int,
    "device": str,
    "t": (int, float),
}
NUM = (int, float)
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    # first line of every worker: what it is and how it measures
    "hello": {"world_size": int, "parallelism": str, "model": str, "pid": int},
    # one optimizer step (or micro step for accumulation) finished on this rank
    "step": {"step": int, "samples": int, "latency_s": NUM, "latency_per_sample_s": NUM},
    # a held-out evaluation after `step` completed steps (workers.evaluate; check_eval)
    "eval": {"step": int, "loss": NUM, "accuracy": NUM, "samples": int},
    # the answer to a controller heartbeat: this worker is not frozen (not logged)
    "beat": {},
    # a notable event: phase changes, sync, warnings
    "event": {"name": str, "message": str},
    # an allocation failed on this device
    "oom": {"phase": str, "message": str},
    # any other failure
    "error": {"message": str},
    # this rank's part of a complete checkpoint is on its disk (files: name, bytes, sha256)
    "checkpoint": {"step": int, "kind": str, "dir": str, "bytes": int, "files": list},
    # the worker finished normally
    "done": {"steps": int, "samples": int, "wall_s": NUM},
}
TYPES = tuple(REQUIRED)
#: Optional fields the controller computes with: when present (and not null) they must
#: have these types, so a bad value is rejected here instead of breaking the summary.
OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "local_samples": int, "throughput_sps": NUM, "loss": NUM, "energy_j": NUM, "rss_bytes": int,
    "peak_mem_bytes": int, "peak_rss_bytes": int, "limit_bytes": int, "mem_limit_bytes": int,
    "comm_s": NUM, "cpu_s": NUM, "period_s": NUM, "energy_source": str, "energy_method": str, "role": str, "param_digest": str,
    "phase": str, "mem_limit_kind": str, "mem_cgroup": str, "oom_kills": int,
}


def check_param_moments(value: Any) -> str | None:
    """Why ``value`` is not a valid ``param_moments`` field, or ``None`` when it is.

    The field maps each parameter's full name (its name in the one-device model) to
    ``[local_count, full_count, sum, sum_of_squares]`` over the tensor this rank holds:
    element counts (``0 < local_count <= full_count``; less for a shard of a tensor split
    over ranks) and float64 sums.  The sums may be NaN/inf (a diverged run reports
    them; they compare unequal to everything) but a sum of squares is never negative.
    """
    if not isinstance(value, dict):
        return f"is a {type(value).__name__}, expected an object of name -> moments"
    for name, m in value.items():
        if not name:
            return "has an empty parameter name"
        if not isinstance(m, list) or len(m) != 4:
            return f"[{name!r}] is {m!r}, expected [local_count, full_count, sum, sum_of_squares]"
        local, full, total, squares = m
        if any(isinstance(x, bool) for x in m) or not isinstance(local, int) or not isinstance(full, int):
            return f"[{name!r}] counts {local!r}, {full!r} are not whole numbers"
        if not 0 < local <= full:
            return f"[{name!r}] counts {local}, {full}: need 0 < local_count <= full_count"
        if not isinstance(total, NUM) or not isinstance(squares, NUM):
            return f"[{name!r}] sums {total!r}, {squares!r} are not numbers"
        if squares < 0:
            return f"[{name!r}] sum of squares {squares!r} is negative"
    return None


#: Optional fields with structure: a checker returns why a value is malformed (or None).
STRUCTURED: dict[str, Callable[[Any], str | None]] = {"param_moments": check_param_moments}


def check_eval(rec: dict) -> str | None:
    """Why an ``eval`` record's values are out of range, or ``None`` when they are not.

    ``step >= 0``, ``samples > 0`` (an evaluation of nothing is not reported) and
    ``0 <= accuracy <= 1``.  The loss is a mean cross-entropy, never negative; NaN and
    infinity are allowed (a diverged model reports them, as ``param_moments`` does).
    """
    if rec["step"] < 0:
        return f"step {rec['step']} is negative"
    if rec["samples"] <= 0:
        return f"samples {rec['samples']}: an evaluation needs at least one sample"
    if not 0.0 <= rec["accuracy"] <= 1.0:
        return f"accuracy {rec['accuracy']!r} lies outside [0, 1]"
    if rec["loss"] < 0:
        return f"loss {rec['loss']!r} is negative"
    return None


def check_checkpoint(rec: dict) -> str | None:
    """Why a ``checkpoint`` record's values are wrong, or ``None`` when they are right.

    ``files`` lists this rank's files as ``{name, rank, device, bytes, sha256}``: plain
    names (no path), byte counts that add up to ``bytes``, 64-hex-digit hashes; ``kind``
    is one of the checkpoint kinds.
    """
    if rec["kind"] not in CHECKPOINT_KINDS:
        return f"kind {rec['kind']!r} is not one of {', '.join(CHECKPOINT_KINDS)}"
    if rec["step"] < 0 or rec["bytes"] < 0:
        return "step and bytes must not be negative"
    total = 0
    for i, f in enumerate(rec["files"]):
        if not isinstance(f, dict):
            return f"files[{i}] is not an object"
        name, size, digest = f.get("name"), f.get("bytes"), f.get("sha256")
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            return f"files[{i}] has a bad name {name!r}"
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"files[{i}] has a bad size {size!r}"
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            return f"files[{i}] has a bad sha256 {digest!r}"
        total += size
    if total != rec["bytes"]:
        return f"files add up to {total} bytes, the record says {rec['bytes']}"
    return None


#: Per record type, a check of the values once their types are right.
VALUE_CHECKS: dict[str, Callable[[dict], str | None]] = {"eval": check_eval, "checkpoint": check_checkpoint}


class ProtocolError(ValueError):
    """A telemetry line that does not follow protocol v1."""


def validate(obj: Any) -> dict:
    """Check one decoded record against the v1 schema.

    Parameters
    ----------
    obj
        The decoded JSON value.

    Returns
    -------
    dict
        The same record.

    Raises
    ------
    ProtocolError
        Naming the first field that is missing or of the wrong type.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"record is a {type(obj).__name__}, expected a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version v={obj.get('v')!r} (this controller speaks v{VERSION})")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in REQUIRED:  # a list or dict is unhashable
        raise ProtocolError(f"unknown record type {kind!r}; expected one of {', '.join(TYPES)}")
    for fields in (COMMON_FIELDS, REQUIRED[kind]):
        for name, typ in fields.items():
            if name not in obj:
                raise ProtocolError(f"{kind} record lacks field {name!r}")
            value = obj[name]
            # bool is an int subclass; a flag where a count belongs is a bug upstream
            if isinstance(value, bool) or not isinstance(value, typ):
                raise ProtocolError(f"{kind} record field {name!r} has {type(value).__name__} {value!r}")
    for name, typ in OPTIONAL.items():
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, typ)):
            raise ProtocolError(f"{kind} record field {name!r} has {type(value).__name__} {value!r}")
    for name, check in STRUCTURED.items():
        value = obj.get(name)
        reason = check(value) if value is not None else None
        if reason:
            raise ProtocolError(f"{kind} record field {name!r} {reason[:200]}")
    reason = VALUE_CHECKS[kind](obj) if kind in VALUE_CHECKS else None
    if reason:
        raise ProtocolError(f"{kind} record: {reason[:200]}")
    return obj


def parse_line(line: str | bytes) -> dict:
    """Decode and validate one telemetry line (raises :class:`ProtocolError`)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line.startswith("{"):
        raise ProtocolError(f"not a JSON object: {line[:80]!r}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"bad JSON ({exc.msg} at column {exc.colno}): {line[:80]!r}") from None
    except RecursionError:
        raise ProtocolError(f"JSON nested too deeply: {line[:80]!r}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ProtocolError(f"bad JSON value ({exc}): {line[:80]!r}") from None
    return validate(obj)


class Emitter:
    """Writes telemetry records for one worker; thread-safe, one flush per record."""

    def __init__(self, run: str, rank: int, device: str, stream: IO[str] | None = None) -> None:
        self.run, self.rank, self.device = run, rank, device
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()

    def emit(self, type: str, **fields: Any) -> dict:
        """Write one record of ``type`` with ``fields``; returns the record."""
        rec = {"v": VERSION, "type": type, "run": self.run, "rank": self.rank,
               "device": self.device, "t": time.time(), **fields}
        validate(rec)
        line = json.dumps(rec, separators=(",", ":"), default=_default)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                # the controller is gone (broken pipe / closed stream): nobody to tell;
                # the worker's own exit path still runs
                pass
        return rec


def _default(value: Any) -> Any:
    # numpy / torch scalars
    if hasattr(value, "item"):
        return value.item()
    return str(value)
