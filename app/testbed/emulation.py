"""Emulated edge devices: which devices a testbed has, and the limits applied to their commands.

A :class:`app.boards.BoardPreset` describes one kind of board (memory, a thread budget, idle and
peak power). :func:`plan_devices` turns a testbed request ("4 devices", "heterogeneous", an explicit
list of presets) into one :class:`DeviceSpec` per device, and :func:`emulation_env` /
:func:`make_preexec` apply a spec to a command started on that device.
:class:`app.testbed.server.EmulatedDevice` serves one device over SSH (see :mod:`app.testbed.local` for the
behaviour); the testbed module runs several of them and manages their files.

What is emulated:

* **Memory**, as root, is the board's physical RAM: a cgroup memory limit per device
  (:mod:`app.testbed.cgroups`), shared by every command on the device; an overrun is a
  kernel OOM kill, as on the board.  Without root it falls back to ``RLIMIT_AS`` on each
  command's process: a real, catchable allocation failure, but on *virtual* size
  (``import torch`` alone maps ~0.65 GB, a gloo rank ~1 GB), so stricter than the same RAM,
  and per process.  ``testbed status`` and every run record say which kind was used.
* **CPU speed**, as root, is a cgroup CPU quota that keeps the boards' relative speeds
  (:attr:`app.boards.BoardPreset.cpu_gflops`): the fastest board of the testbed gets its fair
  share of the host (host CPUs / devices), the others that share times their speed ratio.
  Without root, speed is not emulated.  Each device also gets a thread budget
  (``OMP_NUM_THREADS``): ``min(preset.threads, max(1, host_cpus // n_devices))`` unless
  overridden.
* **Power** figures are only exported to the command's environment for energy models.
"""

from __future__ import annotations

import logging
import re
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from app.boards import BoardPreset, get_board, host_cpus

log = logging.getLogger("edgetrain.testbed")

DEFAULT_PRESET = "unlimited"
DEFAULT_N_DEVICES = 4

TESTBED_PRESETS: dict[str, tuple[str, ...]] = {
    "homogeneous": ("jetson-nano",) * 4,
    "heterogeneous": ("jetson-nano", "jetson-nano", "jetson-tx2", "jetson-nx"),
}


@dataclass(frozen=True)
class DeviceSpec:
    """The emulation applied to one device of a testbed.

    Attributes
    ----------
    name : str
        Device name (``nano0``, ``tx2-0``, ``dev1``...).
    preset : BoardPreset
        The board it emulates.
    mem_bytes : int or None
        Effective memory cap (preset value or override); None means no cap.
    threads : int
        Effective thread budget (``OMP_NUM_THREADS``).
    cpu_share : float or None
        CPU quota in host cores where cgroups are used (relative board speed); None: none.
    """

    name: str
    preset: BoardPreset
    mem_bytes: int | None
    threads: int
    cpu_share: float | None = None


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a memory size such as ``"1.5G"``, ``"512MiB"``, ``"2GB"`` or ``"1048576"``.

    ``K/M/G/T`` alone and ``KiB/MiB/GiB/TiB`` are binary (powers of 1024); ``KB/MB/GB/TB``
    are decimal.

    Raises
    ------
    ValueError
        If the text is not a size.
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (try 1.5G, 512MiB, 4GB)")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = "kmgt".find(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base**power)


def _device_names(presets: Sequence[BoardPreset]) -> list[str]:
    counts: dict[str, int] = {}
    names = []
    for p in presets:
        i = counts.get(p.short, 0)
        counts[p.short] = i + 1
        # "tx2-0" rather than "tx20", which reads as a twentieth TX.
        sep = "-" if p.short[-1].isdigit() else ""
        names.append(f"{p.short}{sep}{i}")
    return names


def plan_devices(
    n_devices: int | None = None,
    preset: str | None = None,
    device_presets: Sequence[str] | None = None,
    mem_overrides: Mapping[str | int, int | str | None] | int | str | None = None,
    threads: int | None = None,
    n_cpus: int | None = None,
) -> list[DeviceSpec]:
    """Decide which boards a testbed emulates.

    Parameters
    ----------
    n_devices : int, optional
        Number of devices. Defaults to the length of the preset list, else 4.
    preset : str, optional
        A device preset (``jetson-nano``; every device is one) or a testbed preset
        (``homogeneous``: N x jetson-nano, 4 by default; ``heterogeneous``: 2 x jetson-nano,
        jetson-tx2, jetson-nx). Defaults to ``unlimited``.
    device_presets : sequence of str, optional
        One device preset per device; takes precedence over ``preset``.
    mem_overrides : mapping or int or str, optional
        Memory cap per device, keyed by device name or index (None value: no cap); a single
        value applies to every device. Sizes may be strings (``"1.5G"``).
    threads : int, optional
        Thread budget for every device, replacing the host-share rule.
    n_cpus : int, optional
        Host CPUs to share (defaults to :func:`host_cpus`).

    Returns
    -------
    list of DeviceSpec

    Raises
    ------
    ValueError
        For unknown presets, a device count that contradicts the presets, or overrides that
        name no device.
    """
    if device_presets:
        names = list(device_presets)
        if n_devices is not None and n_devices != len(names):
            raise ValueError(f"{n_devices} devices requested but {len(names)} presets given")
    elif preset in TESTBED_PRESETS:
        names = list(TESTBED_PRESETS[preset])
        if n_devices is not None and n_devices != len(names):
            if preset != "homogeneous":
                raise ValueError(f"testbed preset {preset!r} has exactly {len(names)} devices")
            names = [names[0]] * n_devices
    else:
        n = DEFAULT_N_DEVICES if n_devices is None else n_devices
        names = [preset or DEFAULT_PRESET] * n
    if not names:
        raise ValueError("a testbed needs at least one device")
    presets = [get_board(n) for n in names]
    dev_names = _device_names(presets)

    if mem_overrides is None:
        overrides: dict[str | int, int | str | None] = {}
    elif isinstance(mem_overrides, (int, str)):
        overrides = {i: mem_overrides for i in range(len(presets))}
    else:
        overrides = dict(mem_overrides)
    unknown = [k for k in overrides if k not in dev_names and k not in range(len(presets))]
    if unknown:
        raise ValueError(f"memory override for unknown device(s) {unknown}; devices: {dev_names}")

    cpus = n_cpus or host_cpus()
    share = max(1, cpus // len(presets))
    fastest = max((p.cpu_gflops for p in presets), default=0.0)
    specs = []
    for i, (name, p) in enumerate(zip(dev_names, presets)):
        mem: int | str | None = p.mem_bytes
        if name in overrides:
            mem = overrides[name]
        elif i in overrides:
            mem = overrides[i]
        mem_b = None if mem is None else parse_size(mem)
        t = threads if threads is not None else min(p.threads or share, share)
        # relative, not absolute: the fastest board gets its fair share of the host
        cpu = cpus / len(presets) * p.cpu_gflops / fastest if p.cpu_gflops and fastest else None
        specs.append(DeviceSpec(name, p, mem_b, max(1, t), cpu))
    return specs


def emulation_env(spec: DeviceSpec, mem_kind: str = "address-space") -> dict[str, str]:
    """Environment variables that tell a command which board it runs on.

    ``EDGETRAIN_EMU_MEM_BYTES`` is ``"0"`` when there is no cap; the power figures are left
    out when the preset has no power model, so the worker's meter falls back to its own
    labelled defaults instead of reading 0 W.
    """
    t = str(spec.threads)
    env = {
        "EDGETRAIN_EMU_PRESET": spec.preset.name,
        "EDGETRAIN_EMU_MEM_BYTES": str(spec.mem_bytes or 0),
        "EDGETRAIN_EMU_MEM_KIND": mem_kind if spec.mem_bytes else "none",
        "EDGETRAIN_EMU_THREADS": t,
        "EDGETRAIN_EMU_P_IDLE_W": repr(spec.preset.p_idle_w),
        "EDGETRAIN_EMU_P_MAX_W": repr(spec.preset.p_max_w),
        # torch sizes its intra-op pool from OMP_NUM_THREADS; MKL/OpenBLAS if present.
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
    }
    if not (spec.preset.p_idle_w > 0 and spec.preset.p_max_w > 0):
        del env["EDGETRAIN_EMU_P_IDLE_W"], env["EDGETRAIN_EMU_P_MAX_W"]
    return env


def make_preexec(mem_bytes: int | None) -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that applies the memory cap in the child, or None.

    The hard limit is lowered too, so the command cannot raise it back (a board cannot grow
    RAM); it is clamped to the current hard limit, which an unprivileged process cannot raise.
    """
    if mem_bytes is None:
        return None
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mem_bytes if hard == resource.RLIM_INFINITY else min(mem_bytes, hard)

    def _apply() -> None:
        # Runs between fork and exec: keep it to one system call.
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return _apply


# Signal names of RFC 4254 (what OpenSSH accepts and reports without an @openssh.com suffix).
class TestbedError(RuntimeError):
    """The testbed cannot start, or is not in the expected state."""

    __test__ = False  # not a pytest class
