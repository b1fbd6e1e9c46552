"""Real board limits for emulated devices: a cgroup per device for memory and CPU (root only).

A real 4 GB board limits *physical* memory, and its kernel's OOM killer ends the process
that overruns it; its CPU is slower than another board's by a fixed ratio.  As root, each
emulated device gets its own cgroup (v1 ``memory`` + ``cpu`` controllers, or v2 with
``memory.max`` / ``cpu.max``), and every command the device starts is moved into it before
``exec``:

* memory: the board's RAM as a hard limit (swap included where the kernel accounts it),
  so an overrun is a kernel OOM kill, counted in the cgroup's ``oom_kill`` counter;
* CPU: a CFS quota of ``cpu_share`` cores per 100 ms period.

Without root (or without writable controllers) the testbed falls back to ``RLIMIT_AS``
(:func:`app.testbed.emulation.make_preexec`) and says so: that caps address space, which
is stricter than the same RAM on a board.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edgetrain.testbed")

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
#: The smallest quota the kernel accepts is 1 ms per period; keep a usable minimum.
MIN_SHARE = 0.02


@dataclass(frozen=True)
class DeviceCgroup:
    """The cgroup directories of one emulated device (one per hierarchy used)."""

    device: str
    dirs: tuple[str, ...]          # cgroup.procs is written in each
    memory_dir: str | None         # where memory.* (limit, OOM counter) lives
    version: str                   # "cgroup1" or "cgroup2"


def _v1(controller: str) -> Path:
    return ROOT / controller


def _v2_ok() -> bool:
    try:
        ctrl = (ROOT / "cgroup.controllers").read_text().split()
    except OSError:
        return False
    return "memory" in ctrl and "cpu" in ctrl and os.access(ROOT / "cgroup.subtree_control", os.W_OK)


def unavailable_reason() -> str | None:
    """Why real (cgroup) limits cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root (cgroup limits need root; address-space limits are used instead)"
    if all(os.access(_v1(c), os.W_OK) and (_v1(c) / "cgroup.procs").exists() for c in ("memory", "cpu")):
        return None
    if _v2_ok():
        return None
    return "no writable cgroup memory and cpu controllers (v1 or v2)"


def _tag(testbed_dir: Path) -> str:
    # testbeds run side by side (tests): each gets its own subtree
    return "tb-" + hashlib.sha1(str(Path(testbed_dir).resolve()).encode()).hexdigest()[:10]


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def create(testbed_dir: Path, device: str, mem_bytes: int | None, cpu_share: float | None) -> DeviceCgroup:
    """Make (or reset) ``device``'s cgroup with its memory limit and CPU quota.

    Raises
    ------
    OSError
        The controllers refused (the caller falls back to address-space limits).
    """
    tag = _tag(testbed_dir)
    quota = None if cpu_share is None else max(1000, int(max(MIN_SHARE, cpu_share) * PERIOD_US))
    if unavailable_reason() is None and (_v1("memory") / "cgroup.procs").exists():
        mem = _v1("memory") / "edgetrain" / tag / device
        cpu = _v1("cpu") / "edgetrain" / tag / device
        mem.mkdir(parents=True, exist_ok=True)
        cpu.mkdir(parents=True, exist_ok=True)
        limit = str(mem_bytes) if mem_bytes else "-1"
        if (mem / "memory.memsw.limit_in_bytes").exists():
            # memsw must stay >= the RAM limit: lift it first, then set both
            _write(mem / "memory.memsw.limit_in_bytes", "-1")
            _write(mem / "memory.limit_in_bytes", limit)
            _write(mem / "memory.memsw.limit_in_bytes", limit)
        else:
            _write(mem / "memory.limit_in_bytes", limit)
        _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota) if quota else "-1")
        return DeviceCgroup(device, (str(mem), str(cpu)), str(mem), "cgroup1")
    parent = ROOT / "edgetrain"
    for d in (ROOT, parent, parent / tag):
        d.mkdir(exist_ok=True)
        try:  # each level hands the controllers down to its children
            _write(d / "cgroup.subtree_control", "+memory +cpu")
        except OSError:
            pass  # already enabled
    cg = parent / tag / device
    cg.mkdir(exist_ok=True)
    _write(cg / "memory.max", str(mem_bytes) if mem_bytes else "max")
    if (cg / "memory.swap.max").exists():
        _write(cg / "memory.swap.max", "0")
    _write(cg / "cpu.max", f"{quota} {PERIOD_US}" if quota else f"max {PERIOD_US}")
    return DeviceCgroup(device, (str(cg),), str(cg), "cgroup2")


def remove(testbed_dir: Path, wait_s: float = 5.0) -> None:
    """Remove the testbed's cgroups, killing what is still in them.

    A process killed a moment ago (a worker the kernel OOM-killed, a shell whose command
    was killed) stays in its cgroup until it is reaped, and ``rmdir`` fails with EBUSY
    meanwhile: retry for up to ``wait_s`` seconds, killing any process left inside, so a
    stopped testbed leaves no cgroup behind.
    """
    tag = _tag(testbed_dir)
    bases = [_v1("memory") / "edgetrain" / tag, _v1("cpu") / "edgetrain" / tag, ROOT / "edgetrain" / tag]
    deadline = time.monotonic() + wait_s
    for base in bases:
        if not base.is_dir():
            continue
        for d in sorted((x for x in base.iterdir() if x.is_dir()), reverse=True) + [base]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() >= deadline:
                        log.warning("cannot remove cgroup %s: %s", d, exc)
                        break
                    _kill_members(d)
                    time.sleep(0.05)


def _kill_members(cgroup_dir: Path) -> None:
    try:
        pids = [int(x) for x in (cgroup_dir / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def joiner(cgroup: DeviceCgroup):
    """A ``preexec_fn`` that moves the child into ``cgroup`` before ``exec`` (so the limits
    hold from the first allocation of the command)."""
    paths = [os.path.join(d, "cgroup.procs") for d in cgroup.dirs]

    def _join() -> None:
        pid = str(os.getpid())
        for p in paths:
            with open(p, "w") as f:
                f.write(pid)
    return _join
