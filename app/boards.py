"""Kinds of edge board EdgeTrain knows: memory, a thread budget, idle and peak power.

The planner uses a board's figures for a device that has no measured profile yet, and
the local testbed emulates devices of these kinds.  Plain data, standard library only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class BoardPreset:
    """One kind of board.

    Attributes
    ----------
    name : str
        Preset name, e.g. ``"jetson-nano"``.
    mem_bytes : int or None
        Memory cap applied to each command (``RLIMIT_AS``); None means no cap.
    threads : int or None
        Thread budget that approximates the board's CPU throughput relative to one core of
        the host (a Nano's four A57 cores are worth about one desktop core); None: no limit
        beyond the host share.
    p_idle_w, p_max_w : float
        Idle and peak board power in watts; 0.0 means no power model.
    short : str
        Prefix for device names (``nano`` -> ``nano0``, ``nano1``).
    description : str
        Human description with the published figures used.
    cpu_gflops : float
        Peak fp32 throughput of the board's CPU, GFLOP/s: cores x clock x fp32 FLOP per
        cycle per core, from the vendors' datasheets (Cortex-A57 and Denver2: 8; Carmel:
        16; a laptop core with AVX2 and two FMA units: 32).  Only ratios are used: the
        testbed's CPU quotas keep the boards' relative speeds.  0.0: not emulated.
    """

    name: str
    mem_bytes: int | None
    threads: int | None
    p_idle_w: float
    p_max_w: float
    short: str
    description: str
    cpu_gflops: float = 0.0


BOARDS: dict[str, BoardPreset] = {
    p.name: p
    for p in (
        BoardPreset(
            "jetson-nano", 4 * GIB, 1, 1.25, 10.0, "nano",
            "NVIDIA Jetson Nano 4 GB: 4x Cortex-A57 @ 1.43 GHz, 5 W / 10 W power modes, "
            "~1.25 W idle",
            cpu_gflops=4 * 1.43 * 8,
        ),
        BoardPreset(
            "jetson-tx2", 8 * GIB, 2, 2.5, 15.0, "tx2",
            "NVIDIA Jetson TX2 8 GB: 2x Denver2 + 4x Cortex-A57 @ 2.0 GHz, 7.5 W (Max-Q) / 15 W (Max-P), "
            "~2.5 W idle",
            cpu_gflops=6 * 2.0 * 8,
        ),
        BoardPreset(
            "jetson-nx", 8 * GIB, 2, 3.0, 15.0, "nx",
            "NVIDIA Jetson Xavier NX 8 GB: 6x Carmel ARMv8.2 @ 1.4 GHz, 10 W / 15 W power modes, "
            "~3 W idle",
            cpu_gflops=6 * 1.4 * 16,
        ),
        BoardPreset(
            "laptop", 16 * GIB, 4, 8.0, 45.0, "laptop",
            "Laptop with 16 GB and a 45 W mobile CPU (4 cores @ 3 GHz, AVX2), ~8 W idle",
            cpu_gflops=4 * 3.0 * 32,
        ),
        BoardPreset(
            "unlimited", None, None, 0.0, 0.0, "dev",
            "The host itself: no memory cap, no power model",
        ),
    )
}

def get_board(name: str) -> BoardPreset:
    """Return the board preset called ``name``.

    Raises
    ------
    ValueError
        If there is no such preset; the message lists the known ones.
    """
    try:
        return BOARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown board preset {name!r}; known: {', '.join(BOARDS)}"
        ) from None


def host_cpus() -> int:
    """Number of CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
