"""Cost model: memory, time and energy of one rank's share of a training step.

The planner (:mod:`app.planner.plan`) describes what each rank holds and computes as a
:class:`RankLoad`; :func:`rank_cost` turns that plus the device's :class:`DeviceSpec`
into per-phase memory, compute/optimizer time and energy.  Collective times over the
measured links come from :func:`app.planner.links.ring_allreduce_s` and friends.  Nothing here imports
torch: the GUI re-plans on every settings change.

Calibration (``bench/plan_calibrate.py``, fp32, torch 2.13 CPU, one rank in a real
gloo group with the DP trainer: DDP + AdamW; see :data:`CALIBRATION` for the numbers)::

    compute   = FLOPs / (eff * G) + (k_act * activation bytes + k_block * block passes
                + k_step * micro-steps + k_embed * embedding-gradient bytes
                + k_densify * sparse-to-dense embedding-gradient bytes
                + k_tp * tensor-parallel linears) * slowness
    optimizer = (k_opt * params + k_tensor * tensors) * slowness, every k steps
    RSS       = runtime + first-step runtime + weights + grads + 2 x AdamW state
                + DDP bucket + f_family * saved activations (+ AdamW temporaries)

The memory knobs (:mod:`app.planner.knobs`) keep these constants' meaning: another
optimizer replaces "2 x AdamW state" by its own state and its own temporaries and
scales ``k_opt``/``k_tensor`` (estimates, not calibrated); activation checkpointing,
gradient accumulation and bf16 change the saved activations and FLOPs the planner
passes in; bf16 adds autocast's weight copies to forward and backward.
    virtual   = RSS + address space reserved but not resident (thread arenas/stacks)

``G`` is the device's fp32 matmul rate (a profile's ``gflops_fp32``: all its threads);
``slowness`` its op probe's seconds over the calibration host's (:func:`slowness`; a
device without one: ``G_ref_core / G_core``, ``G_core`` the matmul rate per thread):
fixed per-op costs do not get faster with more threads.
The measurements behind every constant are in ``bench/RESULTS.md`` ("Calibration of
the cost model"); the raw data in ``bench/data/plan_calibration.json``.

Memory is what the workers measure: process RSS.  An emulated device's cap is
``RLIMIT_AS`` on *virtual* size, which is always larger than RSS (about 0.58 GB more
with one torch thread, 0.13 GB per extra thread: glibc reserves an arena per thread and
the torch/gloo libraries map more than they touch), so OOM against such a cap compares
the virtual prediction; a real device's RAM compares RSS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from app.planner import knobs

# the constants live in app.planner.calibration; the planner's modules and the tests
# reach them through this module
from app.planner.calibration import CALIBRATION, GIB, MIB, Calibration  # noqa: F401

PHASES = ("load", "forward", "backward", "optimizer")
SENSOR_SOURCES = ("nvml", "ina3221", "rapl")


# --------------------------------------------------------------------------- inputs


@dataclass
class DeviceSpec:
    """What the planner needs to know about one device.

    Attributes
    ----------
    name
        Device name (inventory).
    gflops
        fp32 matmul rate with all the threads a worker uses, GFLOP/s.
    mem_bytes
        Memory a worker may use, or ``None`` when unknown (never OOM then).
    p_idle_w, p_max_w
        Board power at idle and at full load, watts.
    power_source
        ``nvml``/``ina3221``/``rapl`` when a sensor measured them, else ``estimate``.
    threads
        Torch threads of a worker on this device.
    mem_is_virtual
        ``mem_bytes`` caps the address space (``RLIMIT_AS``: emulated devices), not RAM.
    profiled
        False for a generic default (no profile, no preset): flagged in the output.
    source
        Where the numbers came from (``profile``, ``preset jetson-nano``, ``default``).
    op_probe_s
        Seconds of the profile's fixed piece of non-matmul work on one thread
        (``workers.compute_probe.op_seconds``), or ``None`` (no profile, a GPU, an older one):
        see :func:`slowness`.
    """

    name: str
    gflops: float
    mem_bytes: int | None
    p_idle_w: float = 5.0
    p_max_w: float = 15.0
    power_source: str = "estimate"
    threads: int = 1
    mem_is_virtual: bool = False
    profiled: bool = True
    source: str = "profile"
    op_probe_s: float | None = None

    @property
    def core_gflops(self) -> float:
        return self.gflops / max(1, self.threads)


def slowness(spec: DeviceSpec, cal: Calibration | None = None) -> float:
    """How many times slower than the calibration host ``spec`` runs the non-matmul work.

    From the device's op probe where its profile has one (``workers.compute_probe.op_seconds``);
    else from its per-thread matmul rate, which does not track that work across CPUs (the
    same non-matmul work ran 2x faster on an AMD EPYC host than on an Intel one of the
    same matmul rate) but is all a board preset gives.
    """
    cal = cal or CALIBRATION
    if spec.op_probe_s and cal.ref_op_probe_s:
        return spec.op_probe_s / cal.ref_op_probe_s
    return cal.ref_core_gflops / max(1e-9, spec.core_gflops)


#: Per-thread fp32 matmul rate of this kind of host (512^3, ``edgetrain profile``'s
#: method); emulated devices get ``threads x`` this.
HOST_GFLOPS_PER_THREAD = 200.0
#: A laptop-like device for inventory entries with neither profile nor preset.
GENERIC_DEVICE = dict(gflops=2 * HOST_GFLOPS_PER_THREAD, mem_bytes=8 * GIB, p_idle_w=8.0, p_max_w=45.0, threads=2)


def spec_from_profile(profile: Any) -> DeviceSpec:
    """Adapter for ``app.devices.profile.DeviceProfile`` (duck-typed on its field names).

    An emulated device (``labels``/``emu`` cap) reports ``mem_limit_bytes`` from
    ``RLIMIT_AS``; that is compared with the virtual-size prediction.
    """
    threads = max(1, int(getattr(profile, "threads", 1) or 1))
    gflops = getattr(profile, "gflops_fp32", None) or HOST_GFLOPS_PER_THREAD * threads
    limit = getattr(profile, "mem_limit_bytes", None)
    avail = getattr(profile, "mem_available_bytes", None) or getattr(profile, "mem_total_bytes", None)
    labels = getattr(profile, "labels", None) or {}
    # a testbed device capped by RLIMIT_AS compares virtual size; a cgroup cap (as root) is
    # physical memory, compared with RSS as on a real board
    emulated = bool(labels.get("testbed") or labels.get("preset")) and limit is not None \
        and labels.get("mem_cap") != "cgroup"
    mem = limit if limit is not None else avail
    return DeviceSpec(name=profile.name, gflops=float(gflops), mem_bytes=int(mem) if mem else None,
                      p_idle_w=float(getattr(profile, "p_idle_w", 5.0) or 5.0),
                      p_max_w=float(getattr(profile, "p_max_w", 15.0) or 15.0),
                      power_source=str(getattr(profile, "power_source", "estimate") or "estimate"),
                      threads=threads, mem_is_virtual=emulated, source="profile",
                      op_probe_s=getattr(profile, "op_probe_s", None))


def spec_from_preset(name: str, preset: Any, threads: int | None = None,
                     gflops_per_thread: float = HOST_GFLOPS_PER_THREAD, mem_is_virtual: bool = True,
                     cpu_share: float | None = None) -> DeviceSpec:
    """A device emulated with a testbed preset (``app.testbed.emulation.DevicePreset``-like).

    Parameters
    ----------
    name
        Device name.
    preset
        Anything with ``name``, ``mem_bytes``, ``threads``, ``p_idle_w``, ``p_max_w``.
    threads
        The thread budget the testbed gave the device (default: the preset's, or 1).
    gflops_per_thread
        Host matmul rate per thread: the emulated board computes with host threads.
    mem_is_virtual
        The cap is ``RLIMIT_AS`` (address space); False for a cgroup (physical) limit.
    cpu_share
        The board's CPU quota in host cores (a cgroup testbed); it computes at
        ``gflops_per_thread x cpu_share`` instead of its threads' rate.
    """
    t = max(1, int(threads or getattr(preset, "threads", None) or 1))
    p_idle = float(getattr(preset, "p_idle_w", 0.0) or 0.0)
    p_max = float(getattr(preset, "p_max_w", 0.0) or 0.0)
    if not (p_idle > 0 and p_max >= p_idle):
        p_idle, p_max = 5.0, 15.0  # workers.energy's generic figures, as the meter would use
    mem = getattr(preset, "mem_bytes", None)
    rate = gflops_per_thread * (min(cpu_share, t) if cpu_share else t)
    return DeviceSpec(name=name, gflops=rate, mem_bytes=mem, p_idle_w=p_idle, p_max_w=p_max,
                      power_source="estimate", threads=t, mem_is_virtual=mem is not None and mem_is_virtual,
                      source=f"preset {getattr(preset, 'name', '?')}" + (f", {cpu_share:.2f} cores" if cpu_share else ""))


def generic_spec(name: str) -> DeviceSpec:
    """A laptop-like guess for a device with no profile and no preset label."""
    return DeviceSpec(name=name, profiled=False, source="default (no profile: run edgetrain profile)",
                      **GENERIC_DEVICE)


# --------------------------------------------------------------------------- one rank


@dataclass
class RankLoad:
    """What one rank holds and does per training step (built by the planner).

    Attributes
    ----------
    params
        Parameters held (and trained: gradients and AdamW state have the same size).
    load_params
        Parameters resident at the peak of loading, when that is more than ``params``
        (the worker builds the whole model, then keeps its shard or stage); 0: ``params``.
    bucket_params
        Parameters in a flat gradient buffer for all-reduce (DDP buckets, or the
        largest flat bucket of a hand-written all-reduce), else 0.
    ddp
        Wrapped in DDP: its constructor broadcasts through a flat copy and reserves
        the buckets.
    largest_tensor
        Elements of the largest parameter tensor held (AdamW temporaries).
    n_tensors
        Parameter tensors held (per-tensor optimizer overhead).
    saved_act_bytes
        Activations saved for backward at the peak (all micro-batches in flight).
    act_bytes_per_step
        Saved-activation bytes produced over the whole step (time term).
    family
        Model family (activation peak factor).
    flops_per_step
        Forward + backward FLOPs per step.
    embed_grad_bytes
        Bytes of the dense token-embedding gradient (embedding holders): made per
        micro-step, or once per step from sparse pieces where ``sparse_embed``.
    sparse_embed
        The embedding tables take sparse gradients, made dense once per step (pipeline
        stages, ``workers.engine.sparse_embedding_grads``).
    tp_modules
        Tensor-parallel linears this rank runs per step.
    block_passes, micro_steps
        Per step: forward+backward passes through a block, and micro-batch steps.
    opt_every
        The optimizer runs once every this many steps (DP ``sync_every``).
    accumulate
        Gradients persist between steps (DP with ``sync_every > 1``).
    peers
        Other ranks in the process group.
    store
        This rank hosts the rendezvous store (rank 0 of a group of more than one).
    optimizer
        ``adamw``, ``sgd`` or ``adafactor`` (:data:`app.planner.knobs.OPTIMIZERS`).
    opt_state_elems
        fp32 elements of optimizer state held; ``None``: from ``optimizer`` and
        ``params`` (AdamW 2 per parameter, SGD 1, Adafactor at most 1).
    cast_params
        Weights autocast keeps a bf16 copy of during forward and backward (bf16 runs;
        0 for fp32).
    """

    params: int
    load_params: int = 0
    bucket_params: int = 0
    ddp: bool = False
    largest_tensor: int = 0
    n_tensors: int = 0
    saved_act_bytes: float = 0.0
    act_bytes_per_step: float = 0.0
    family: str = "gpt2"
    flops_per_step: float = 0.0
    embed_grad_bytes: float = 0.0
    sparse_embed: bool = False
    tp_modules: int = 0
    block_passes: float = 0.0
    micro_steps: float = 1.0
    opt_every: int = 1
    accumulate: bool = False
    peers: int = 0
    store: bool = False
    optimizer: str = "adamw"
    opt_state_elems: float | None = None
    cast_params: int = 0


@dataclass
class RankCost:
    """Predicted memory and time of one rank (see :func:`rank_cost`)."""

    rss: dict[str, float]
    virtual: dict[str, float]
    compute_s: float
    optimizer_s: float
    # the first step's forward/backward (no AdamW state yet) and its optimizer, which
    # allocates the state: in time order these come before the steady phases
    first_rss: dict[str, float] = field(default_factory=dict)
    first_virtual: dict[str, float] = field(default_factory=dict)
    # file-backed resident pages (the runtime's shared libraries): in RSS, but a memory
    # cgroup at its limit reclaims them instead of killing the process
    reclaimable: float = 0.0

    def timeline(self, virtual: bool) -> list[tuple[str, float]]:
        """(phase, bytes) in the order a run goes through them."""
        steady, first = (self.virtual, self.first_virtual) if virtual else (self.rss, self.first_rss)
        seq = [("load", steady["load"])]
        seq += [(p, first[p]) for p in PHASES[1:] if p in first]
        seq += [(p, steady[p]) for p in PHASES[1:]]
        return seq

    @property
    def peak_rss(self) -> float:
        return max(self.rss.values())

    @property
    def peak_virtual(self) -> float:
        return max(self.virtual.values())


def compute_seconds(spec: DeviceSpec, flops: float, act_bytes: float, block_passes: float,
                    micro_steps: float, cal: Calibration = CALIBRATION, embed_bytes: float = 0.0,
                    tp_modules: int = 0, densify_bytes: float = 0.0) -> float:
    """Forward + backward time of some work on ``spec`` (see the module formula).

    ``embed_bytes`` is the dense embedding gradient summed over the micro-steps;
    ``densify_bytes`` the dense gradients made from sparse ones (once per step).
    """
    slow = slowness(spec, cal)
    return (flops / (cal.matmul_efficiency * spec.gflops * 1e9)
            + (cal.act_s_per_byte * act_bytes + cal.block_s * block_passes + cal.step_s * micro_steps
               + cal.embed_grad_s_per_byte * embed_bytes + cal.tp_module_s * tp_modules) * slow
            + densify_seconds(spec, densify_bytes, cal))


def densify_seconds(spec: DeviceSpec, nbytes: float, cal: Calibration = CALIBRATION) -> float:
    """Making ``nbytes`` of dense embedding gradient from its sparse pieces, once per step."""
    return cal.embed_densify_s_per_byte * nbytes * slowness(spec, cal)


def optimizer_seconds(spec: DeviceSpec, params: int, n_tensors: int, cal: Calibration = CALIBRATION,
                      optimizer: str = "adamw") -> float:
    """One optimizer step (AdamW calibrated; others scaled) over ``params`` parameters in ``n_tensors`` tensors."""
    slow = slowness(spec, cal)
    return (cal.opt_s_per_param * knobs.OPT_TIME_PER_PARAM[optimizer] * params
            + cal.opt_s_per_tensor * knobs.OPT_TIME_PER_TENSOR[optimizer] * n_tensors) * slow


def rank_cost(load: RankLoad, spec: DeviceSpec, cal: Calibration = CALIBRATION) -> RankCost:
    """Per-phase RSS and virtual size, forward+backward and optimizer seconds per step.

    Phases are steady-state (optimizer state exists after the first step; peaks repeat):
    ``load`` is before the first step; ``forward``/``backward`` hold weights, optimizer
    state, the DDP bucket, the activations, autocast's bf16 weight copies and
    (backward, or accumulating DP) the gradients; ``optimizer`` adds the optimizer's
    temporaries of one parameter at a time.
    ``first_rss``/``first_virtual`` are the first step's phases (no AdamW state before
    its optimizer; autograd's threads appear with its backward), which decide in which
    phase a run that does not fit fails.
    """
    w = 4.0 * load.params
    bucket = 4.0 * load.bucket_params
    opt = load.optimizer
    elems = load.opt_state_elems if load.opt_state_elems is not None else knobs.STATE_PER_PARAM[opt] * load.params
    state = 4.0 * elems
    casts = knobs.BF16_COPY_BYTES * load.cast_params  # freed once backward has used them
    base = cal.runtime_rss_bytes + cal.rss_per_peer_bytes * load.peers
    run = base + cal.first_step_rss_bytes
    act = cal.act_factor.get(load.family, 1.8) * load.saved_act_bytes
    opt_tmp = knobs.OPT_TMP_PER_TENSOR[opt] * 4.0 * load.largest_tensor
    rss = {
        # DDP's constructor broadcasts the parameters through a flat copy
        "load": base + max(w, 4.0 * load.load_params) + (w if load.ddp else 0.0),
        "forward": run + w + state + bucket + (w if load.accumulate else 0.0) + act + casts,
        "backward": run + w + state + bucket + w + act + casts,
        # temporaries reuse what backward freed when activations dominate
        "optimizer": run + w + state + bucket + w + max(act, load.saved_act_bytes + opt_tmp),
    }
    threads = max(1, spec.threads)
    store = cal.virtual_store_bytes if load.store else 0
    vextra = cal.virtual_base_bytes + cal.virtual_per_thread_bytes * threads + store
    vload = cal.virtual_load_base_bytes + cal.virtual_load_per_thread_bytes * threads + store
    # DDP reserves its buckets at construction; they become resident in the first backward
    virtual = {k: v + (vload + (bucket if load.ddp else 0.0) if k == "load" else vextra) for k, v in rss.items()}
    first_rss = {"forward": run + w + bucket + act + casts, "backward": run + w + bucket + w + act + casts,
                 "optimizer": rss["optimizer"]}
    first_virtual = {"forward": first_rss["forward"] + vload + (bucket if load.ddp else 0.0),
                     "backward": first_rss["backward"] + vextra, "optimizer": first_rss["optimizer"] + vextra}
    dense_embed = 0.0 if load.sparse_embed else load.embed_grad_bytes * load.micro_steps
    compute = compute_seconds(spec, load.flops_per_step, load.act_bytes_per_step, load.block_passes,
                              load.micro_steps, cal, dense_embed, load.tp_modules,
                              load.embed_grad_bytes if load.sparse_embed else 0.0)
    opt_s = optimizer_seconds(spec, load.params, load.n_tensors, cal, opt) / max(1, load.opt_every)
    return RankCost(rss=rss, virtual=virtual, compute_s=compute, optimizer_s=opt_s, first_rss=first_rss,
                    first_virtual=first_virtual, reclaimable=float(cal.runtime_file_bytes))


@dataclass
class MemoryVerdict:
    """OOM prediction of one rank against its device's memory."""

    limit_bytes: int | None
    limit_kind: str          # "virtual" (RLIMIT_AS cap), "rss" (RAM) or "none"
    margin_bytes: float | None
    margin: float | None     # (limit - predicted) / limit; negative means OOM
    oom: bool
    oom_phase: str | None


def memory_verdict(cost: RankCost, spec: DeviceSpec) -> MemoryVerdict:
    """Compare the prediction that matches how the device's memory is limited."""
    if not spec.mem_bytes:
        return MemoryVerdict(None, "none", None, None, False, None)
    pred = cost.virtual if spec.mem_is_virtual else cost.rss
    limit = int(spec.mem_bytes)
    # a physical cap is met by what cannot be reclaimed: RSS less the file-backed pages
    spare = 0.0 if spec.mem_is_virtual else cost.reclaimable
    # the first phase, in time order, that does not fit is where the run would fail
    oom_phase = next((p for p, need in cost.timeline(spec.mem_is_virtual) if need - spare > limit), None)
    peak = max(pred.values()) - spare
    return MemoryVerdict(limit, "virtual" if spec.mem_is_virtual else "rss", limit - peak,
                         (limit - peak) / limit, oom_phase is not None, oom_phase)


def energy_joules(spec: DeviceSpec, step_s: float, busy_s: float) -> float:
    """Energy of one step: ``P_idle`` for the whole step plus the load share when busy.

    The same linear model the workers' estimate meter integrates (busy = CPU share),
    with the profile's measured idle/peak power where a sensor provided them.
    """
    busy = min(max(busy_s, 0.0), step_s)
    return spec.p_idle_w * step_s + (spec.p_max_w - spec.p_idle_w) * busy


def energy_method(spec: DeviceSpec) -> str:
    """``measured-power`` when a sensor gave the power figures, else ``estimate``."""
    return "measured-power" if spec.power_source in SENSOR_SOURCES else "estimate"


def names_of(specs: Iterable[DeviceSpec]) -> list[str]:
    return [s.name for s in specs]
