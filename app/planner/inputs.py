"""Planner inputs for inventory devices: a measured profile, a board preset or a default.

For each device, in order of preference:

1. its measured profile (``app.devices.profile.DeviceProfile``: matmul rate, memory
   limit, power figures), when the caller has one;
2. its board preset (``labels.preset``, an :data:`app.boards.BOARDS` entry);
3. a generic laptop-like device, flagged "no profile: run edgetrain profile".

Emulated devices of the local testbed (``labels.testbed == "local"``) share the host's
cores: their rate is scaled by ``host cpus / threads of the devices in the run`` when
that is below 1, since they compute at the same time.

Pure: the caller reads profiles and links from wherever they are kept and passes them in.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from app.boards import BOARDS
from app.planner import costmodel as cm
from app.planner.costmodel import DeviceSpec

#: Loopback gloo (2 and 4 one-thread ranks, 16-64 MiB all-reduce and send/recv): 3-10
from app.planner.links import Links

#: Loopback gloo (2 and 4 one-thread ranks, 16-64 MiB all-reduce and send/recv): 3-10
#: Gbit/s effective on the shared 2-core host, more on an idle one; small collectives
#: ~0.3 ms when idle.  The testbed's default link.
TESTBED_LINK = dict(default_mbps=6000.0, default_rtt_ms=0.3)


def is_testbed(device: Any) -> bool:
    """Whether ``device`` is an emulated device of the local testbed."""
    return (getattr(device, "labels", None) or {}).get("testbed") == "local"


def specs_for_devices(devices: Sequence[Any], all_devices: Sequence[Any] | None = None,
                      profiles: Mapping[str, Any] | None = None,
                      link_pairs: Mapping[str, Mapping[str, Any]] | None = None, n_cpus: int = 1,
                      gflops_per_thread: float | None = None) -> tuple[list[DeviceSpec], Links]:
    """Device specs (rank order = ``devices`` order) and links for a run.

    Parameters
    ----------
    devices
        Inventory ``Device`` objects in the run (``name`` and ``labels`` are used).
    all_devices
        The whole inventory (testbed thread shares depend on how many devices it has).
    profiles
        Measured profiles by device name (``DeviceProfile``-like objects).
    link_pairs
        Measured links, ``{"a->b": {"mbps": ..., "rtt_ms": ...}}``.
    n_cpus
        Host CPUs shared by testbed devices.
    gflops_per_thread
        Host matmul rate per thread for preset-based testbed devices (default: the
        calibration host's).
    """
    profiles = profiles or {}
    n_testbed = sum(1 for d in (all_devices or devices) if is_testbed(d)) or 1
    share = max(1, n_cpus // n_testbed)
    per_thread = gflops_per_thread or cm.HOST_GFLOPS_PER_THREAD
    specs: list[DeviceSpec] = []
    for dev in devices:
        labels = getattr(dev, "labels", None) or {}
        board = BOARDS.get(labels.get("preset", ""))
        if dev.name in profiles:
            spec = cm.spec_from_profile(profiles[dev.name])
        elif board is not None:
            # the testbed's thread rule (app.testbed.emulation.plan_devices)
            threads = min(board.threads or share, share) if is_testbed(dev) else board.threads
            try:
                cpu_share = float(labels["cpu_share"]) if labels.get("cpu_share") else None
            except ValueError:
                cpu_share = None  # a hand-edited label: plan without the quota
            spec = cm.spec_from_preset(dev.name, board, threads=threads, gflops_per_thread=per_thread,
                                       mem_is_virtual=labels.get("mem_cap") != "cgroup", cpu_share=cpu_share)
        else:
            spec = cm.generic_spec(dev.name)
        specs.append(spec)
    # devices with a CPU quota already have their share of the host (it adds up to at most
    # the host's cores); the others share what is left
    quota = sum(float((getattr(d, "labels", None) or {}).get("cpu_share") or 0) for d in devices if is_testbed(d))
    testbed = [s for s, d in zip(specs, devices)
               if is_testbed(d) and not (getattr(d, "labels", None) or {}).get("cpu_share")]
    n_cpus = max(1, n_cpus - int(quota))
    busy = sum(s.threads for s in testbed)
    if busy > n_cpus:
        for s in testbed:
            s.gflops *= n_cpus / busy
            if s.op_probe_s:
                s.op_probe_s *= busy / n_cpus
            s.source += f" (shares {n_cpus} host cpus)"
    defaults = TESTBED_LINK if devices and all(is_testbed(d) for d in devices) else {}
    links = Links.from_pairs(dict(link_pairs), **defaults) if link_pairs else Links(**defaults)
    return specs, links
