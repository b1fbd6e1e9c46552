"""Profile devices over SSH: what each one is, how fast it computes, how fast its links are.

``profile_devices`` runs ``workers/probe.py`` on every device (pushed with the rest of
``workers/``, as a run does) and returns one :class:`DeviceProfile` per device plus a
:class:`LinkMatrix`.  The planner consumes both; keep their field names stable.

How it keeps to a few seconds for four devices:

* one long-lived probe *agent* per device, driven over one SSH channel (each fresh
  ``exec`` costs a shell start-up);
* ``import torch`` runs on all devices at once; the matmul benchmark then runs one device
  at a time, so that devices sharing a host (the testbed) do not slow each other;
* links are measured one pair at a time (on a shared medium concurrent transfers would
  split the bandwidth), each for ``link_seconds``, in one direction: device *i* sends to
  device *j* for *i* < *j*, the controller sends to each device, and the matrix is filled
  symmetrically (``directed=True`` measures both directions);
* results are cached in ``$EDGETRAIN_HOME/profiles`` and reused until the device's
  Python/torch/transformers versions change (checked with a cheap metadata read, no
  ``import torch``) or ``refresh=True``.

Bandwidth is TCP goodput measured by the receiving device's own process, so it is a
little below a shaper's line rate (headers: ~95 % at MTU 1500).
"""
from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import asyncssh

from app.devices.inventory import Device
from app.devices.probe_agent import ProbeAgent, ProfileError
from app.devices.remote import workers_digest
from app.devices.ssh import KnownHosts, connect
from app.paths import atomic_write_text, edgetrain_home
from workers import probe as probe_mod
from workers.energy_meters import DEFAULT_P_IDLE_W, DEFAULT_P_MAX_W

log = logging.getLogger("edgetrain.profile")
CONTROLLER = "controller"
PROFILE_SCHEMA = 1
#: Versions whose change invalidates a cached profile.
CACHE_KEYS = ("python", "torch", "transformers", "probe")
_VERSIONS_CODE = ("import sys,json,platform\n"
                  "try:\n import importlib.metadata as m\nexcept ImportError:\n m=None\n"
                  "def v(n):\n try:\n  return m.version(n)\n except Exception:\n  return None\n"
                  "print(json.dumps({'python':platform.python_version(),'torch':v('torch'),"
                  "'transformers':v('transformers')}))")


@dataclass
class GpuInfo:
    """The device's first CUDA GPU, as torch sees it."""

    name: str
    mem_bytes: int
    cuda: str | None


@dataclass
class DeviceProfile:
    """What one device is and how fast it computes (see the module docstring).

    ``mem_limit_bytes`` is the memory a worker can really use: the smallest of the
    emulated cap, ``RLIMIT_AS``, the cgroup limit and physical memory.  ``p_idle_w`` /
    ``p_max_w`` come from the emulation, else generic defaults; ``power_source`` is the
    meter a worker will use (``estimate`` when no sensor is attributable to the device).
    ``op_probe_s`` is the seconds of a fixed piece of non-matmul work on one thread
    (``workers.compute_probe.op_seconds``; ``None`` on a GPU, without torch, or in a
    profile from before probe version 2): the planner scales its non-matmul time by it.
    ``from_cache`` is not stored: it says whether this object came from the cache.
    """

    name: str
    collected_at: float
    versions: dict[str, Any]
    os: str
    arch: str
    cpu_model: str
    cores: int
    threads: int
    mem_total_bytes: int | None
    mem_available_bytes: int | None
    mem_limit_bytes: int | None
    gpu: GpuInfo | None
    sensors: dict[str, Any]
    gflops_fp32: float | None
    gflops_fp16: float | None
    p_idle_w: float
    p_max_w: float
    power_source: str
    labels: dict[str, str] = field(default_factory=dict)
    host: str = ""
    port: int = 22
    torch_error: str | None = None
    op_probe_s: float | None = None
    from_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("from_cache")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "from_cache"}
        gpu = known.get("gpu")
        known["gpu"] = GpuInfo(**gpu) if isinstance(gpu, dict) else None
        return cls(**known)


@dataclass
class LinkMatrix:
    """Measured links: ``bandwidth_mbps[i][j]`` (Mbit/s) and ``rtt_ms[i][j]`` from
    ``names[i]`` to ``names[j]``; ``None`` on the diagonal and where not measured.
    ``names`` are the devices followed by ``'controller'``."""

    names: list[str]
    bandwidth_mbps: list[list[float | None]]
    rtt_ms: list[list[float | None]]
    measured_at: float = 0.0

    @classmethod
    def empty(cls, names: list[str]) -> LinkMatrix:
        n = len(names)
        return cls(list(names), [[None] * n for _ in range(n)], [[None] * n for _ in range(n)], time.time())

    def index(self, name: str) -> int:
        return self.names.index(name)

    def bandwidth(self, a: str, b: str) -> float | None:
        """Mbit/s from ``a`` to ``b``."""
        return self.bandwidth_mbps[self.index(a)][self.index(b)]

    def rtt(self, a: str, b: str) -> float | None:
        """Round-trip time between ``a`` and ``b`` in ms."""
        return self.rtt_ms[self.index(a)][self.index(b)]

    def set(self, a: str, b: str, mbps: float | None, rtt_ms: float | None, symmetric: bool = True) -> None:
        i, j = self.index(a), self.index(b)
        self.bandwidth_mbps[i][j], self.rtt_ms[i][j] = mbps, rtt_ms
        if symmetric:
            self.bandwidth_mbps[j][i], self.rtt_ms[j][i] = mbps, rtt_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    return edgetrain_home() / "profiles"


class ProfileCache:
    """``<dir>/<device>.json`` per device and ``<dir>/links.json`` for the pairs."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.dir = Path(path) if path is not None else default_cache_dir()

    def _atomic(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write_text(path, json.dumps(data, indent=1))

    def load(self, name: str) -> DeviceProfile | None:
        try:
            data = json.loads((self.dir / f"{name}.json").read_text())
            if data.get("schema") != PROFILE_SCHEMA:
                return None
            prof = DeviceProfile.from_dict(data["profile"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        prof.from_cache = True
        return prof

    def save(self, prof: DeviceProfile) -> None:
        self._atomic(self.dir / f"{prof.name}.json", {"schema": PROFILE_SCHEMA, "profile": prof.to_dict()})

    def load_links(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(json.loads((self.dir / "links.json").read_text()).get("pairs", {}))
        except (OSError, ValueError, AttributeError):
            return {}

    def save_links(self, pairs: dict[str, dict[str, Any]]) -> None:
        self._atomic(self.dir / "links.json", {"schema": PROFILE_SCHEMA, "pairs": pairs})


def cache_valid(prof: DeviceProfile, device: Device, remote: dict[str, Any]) -> bool:
    """A cached profile is still right for ``device`` whose versions are ``remote`` now."""
    if (prof.host, prof.port) != (device.host, device.port):
        return False
    have = {**prof.versions}
    remote = {**remote, "probe": probe_mod.PROBE_VERSION}
    return all(have.get(k) == remote.get(k) for k in CACHE_KEYS)


async def remote_versions(conn: asyncssh.SSHClientConnection, device: Device) -> dict[str, Any]:
    """Python/torch/transformers versions on the device from package metadata (~50 ms)."""
    res = await conn.run(f"{shlex.quote(device.python)} -c {shlex.quote(_VERSIONS_CODE)}", check=False)
    try:
        return dict(json.loads(str(res.stdout).strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"python": None, "torch": None, "transformers": None}


def _pair_key(a: str, b: str) -> str:
    return f"{a}->{b}"


def _positive(value: Any) -> float | None:
    """A measured duration, or ``None`` for anything that is not a positive finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if 0 < v < float("inf") else None


def build_profile(device: Device, info: dict[str, Any]) -> DeviceProfile:
    """A :class:`DeviceProfile` from the probe's ``info`` answer."""
    v = info.get("versions", {})
    versions = {"python": v.get("python"), "torch": v.get("torch"), "transformers": v.get("transformers"),
                "workers": workers_digest(), "probe": info.get("probe")}
    limits = [x for x in (info.get("mem_limit", {}).get("bytes"), info.get("mem_total_bytes")) if x]
    gpu = info.get("gpu")
    labels = dict(device.labels)
    if info.get("emu_preset"):
        labels.setdefault("preset", str(info["emu_preset"]))
    return DeviceProfile(
        name=device.name, collected_at=time.time(), versions=versions,
        os=f"{info.get('os_pretty')} ({info.get('os')})", arch=str(info.get("arch")),
        cpu_model=str(info.get("cpu_model")), cores=int(info.get("cores") or 1),
        threads=int(info.get("threads") or 1), mem_total_bytes=info.get("mem_total_bytes"),
        mem_available_bytes=info.get("mem_available_bytes"),
        mem_limit_bytes=min(limits) if limits else None,
        gpu=GpuInfo(**gpu) if gpu else None, sensors=dict(info.get("sensors") or {}),
        gflops_fp32=info.get("gflops_fp32"), gflops_fp16=info.get("gflops_fp16"),
        p_idle_w=float(info.get("p_idle_w") or DEFAULT_P_IDLE_W),
        p_max_w=float(info.get("p_max_w") or DEFAULT_P_MAX_W),
        power_source=str(info.get("power_source") or "estimate"), labels=labels,
        host=device.host, port=device.port, torch_error=info.get("torch_error"),
        op_probe_s=_positive(info.get("op_probe_s")))


# --------------------------------------------------------------------------- profiling

async def connect_all(devices: list[Device], known_hosts: KnownHosts) -> list[asyncssh.SSHClientConnection]:
    """Connect to every device at once; on any failure close the others and raise it."""
    results = await asyncio.gather(*(connect(d, known_hosts) for d in devices), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if not isinstance(r, BaseException):
                r.close()
        raise errors[0]
    return list(results)  # type: ignore[arg-type]


async def profile_devices(devices: list[Device], known_hosts: KnownHosts, cache_dir: Path | str | None = None,
                          refresh: bool = False, pairs: bool = True, *, bench_seconds: float = 0.3,
                          link_seconds: float = 0.5, directed: bool = False,
                          progress: Callable[[str], None] | None = None) -> tuple[list[DeviceProfile], LinkMatrix]:
    """Profile ``devices`` and the links between them (and from the controller).

    Parameters
    ----------
    devices
        The devices, each reached with strict host-key checking.
    known_hosts
        EdgeTrain's trusted-domain store.
    cache_dir
        Profile cache (default ``$EDGETRAIN_HOME/profiles``).
    refresh
        Remeasure everything instead of reusing cached results.
    pairs
        Measure links between every pair of devices (the controller's links always are).
    bench_seconds, link_seconds
        Duration of each matmul benchmark and each link transfer.
    directed
        Measure both directions of each device pair (default: one, mirrored).
    progress
        Called with a short line per phase (the CLI prints them).

    Returns
    -------
    tuple
        ``(profiles in the order of devices, LinkMatrix)``.

    Raises
    ------
    HostKeyError, SSHError
        A device cannot be reached or is not trusted.
    ProfileError
        The probe cannot run on a device (message: the device and the fix).
    """
    say = progress or (lambda msg: log.info("%s", msg))
    names = [d.name for d in devices]
    if CONTROLLER in names or len(set(names)) != len(names):
        raise ProfileError(f"device names must be unique and not '{CONTROLLER}': {names}")
    cache = ProfileCache(cache_dir)
    t_start = time.monotonic()
    conns = await connect_all(devices, known_hosts)
    agents: dict[str, ProbeAgent] = {}
    try:
        profiles: dict[str, DeviceProfile] = {}
        if not refresh:
            cached = {d.name: cache.load(d.name) for d in devices}
            todo = [(d, c) for d, c in zip(devices, conns) if cached[d.name] is not None]
            remote = await asyncio.gather(*(remote_versions(c, d) for d, c in todo))
            for (d, _), rv in zip(todo, remote):
                prof = cached[d.name]
                assert prof is not None
                if cache_valid(prof, d, rv):
                    profiles[d.name] = prof
                else:
                    say(f"{d.name}: cached profile is stale (versions now {rv}); remeasuring")
        need_info = [d for d in devices if d.name not in profiles]

        endpoints = names + [CONTROLLER]
        matrix = LinkMatrix.empty(endpoints)
        wanted = [(CONTROLLER, d.name) for d in devices]
        if pairs:
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    wanted.append((a, b))
                    if directed:
                        wanted.append((b, a))
        old_links = {} if refresh else cache.load_links()
        remeasured = {d.name for d in need_info}
        to_measure = []
        for a, b in wanted:
            hit = old_links.get(_pair_key(a, b))
            if hit is None or a in remeasured or b in remeasured:
                to_measure.append((a, b))
            else:
                matrix.set(a, b, hit.get("mbps"), hit.get("rtt_ms"), symmetric=not directed)
        need_agent = {d.name for d in need_info} | {x for pair in to_measure for x in pair} - {CONTROLLER}
        by_name = {d.name: (d, c) for d, c in zip(devices, conns)}

        async def start(name: str) -> None:
            d, c = by_name[name]
            agent = ProbeAgent(d, c)
            agents[name] = agent
            await agent.start()

        if need_agent:
            say(f"starting probes on {', '.join(sorted(need_agent))}")
            await asyncio.gather(*(start(n) for n in names if n in need_agent))
        if need_info:
            # import torch everywhere at once (seconds each), then benchmark one at a time
            await asyncio.gather(*(agents[d.name].request("torch", timeout=120) for d in need_info))
            for d in need_info:
                info = await agents[d.name].request("info", timeout=120, bench=bench_seconds)
                prof = build_profile(d, info)
                cache.save(prof)
                profiles[d.name] = prof
                gf = f"{prof.gflops_fp32:.0f} GFLOP/s" if prof.gflops_fp32 else f"no torch ({prof.torch_error})"
                say(f"{d.name}: {prof.arch}, {prof.threads} threads, {gf}")

        links = dict(old_links)
        for a, b in to_measure:
            dst = agents[b]
            try:
                if a == CONTROLLER:
                    res = await asyncio.to_thread(probe_mod.measure_link, dst.device.host, dst.sink_port,
                                                  link_seconds)
                else:
                    res = await agents[a].request("send", timeout=link_seconds * 10 + 30,
                                                  host=dst.device.host, port=dst.sink_port, seconds=link_seconds)
            except (OSError, ProfileError) as exc:
                say(f"link {a} -> {b}: not measured ({exc})")
                continue
            matrix.set(a, b, res.get("mbps"), res.get("rtt_ms"), symmetric=not directed)
            links[_pair_key(a, b)] = {"mbps": res.get("mbps"), "rtt_ms": res.get("rtt_ms"),
                                      "measured_at": time.time()}
            say(f"link {a} -> {b}: {res.get('mbps') or 0:.0f} Mbit/s, rtt {res.get('rtt_ms') or 0:.2f} ms")
        if to_measure:
            cache.save_links(links)
        matrix.measured_at = time.time()
        say(f"profiled {len(devices)} device(s) in {time.monotonic() - t_start:.1f} s")
        return [profiles[n] for n in names], matrix
    finally:
        await asyncio.gather(*(a.close() for a in agents.values()), return_exceptions=True)
        for c in conns:
            c.close()


def is_stale(prof: DeviceProfile, device: Device, inventory_path: Path | None) -> bool:
    """Whether ``prof`` no longer describes ``device``.

    A profile of another address is another machine's.  An emulated device of the local
    testbed computes with a share of this host, whose speed drifts (this VM's matmul rate
    read 90 to 180 GFLOP/s within minutes): its profile holds only for the testbed
    instance it was measured on, so one taken before the testbed last wrote its
    inventory (``inventory_path``, written at start) is measured again.
    """
    if (prof.host, prof.port) != (device.host, device.port):
        return True
    if device.labels.get("testbed") != "local" or inventory_path is None:
        return False
    try:
        return prof.collected_at < Path(inventory_path).stat().st_mtime
    except OSError:
        return False


def load_cached_profiles(names: list[str], cache_dir: Path | str | None = None) -> dict[str, DeviceProfile]:
    """Cached profiles of ``names`` that exist (no device is contacted; for the planner/GUI)."""
    cache = ProfileCache(cache_dir)
    out = {}
    for n in names:
        prof = cache.load(n)
        if prof is not None:
            out[n] = prof
    return out

