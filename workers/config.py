"""The run settings and the job description: the contract between controller and workers.

:class:`RunSettings` is the one settings type: what a user chooses for a run, with every
default written once here.  The CLI's flags, the GUI's run form, the planner and the
launcher all read it.  :class:`JobConfig` is those settings plus what the controller
decides for one run (rendezvous, ranks, addresses); it travels to every device as base64
JSON on the command line, and each worker adds its own rank.  Plain data, standard
library only: the controller imports this module without torch.
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any


class Parallelism(str, Enum):
    """How a run splits the work over devices."""

    DP = "dp"          # DDP replicas, gradients synchronised every k iterations
    SP = "sp"          # sequence split, keys/values all-gathered
    TP = "tp"          # Megatron heads/MLP split (DTensor)
    PP = "pp"          # pipeline stages (torch.distributed.pipelining)
    HYBRID = "hybrid"  # pipeline stages with data-parallel replicas

    def __str__(self) -> str:
        return self.value

    @property
    def pipelined(self) -> bool:
        """Whether the run has stages (and so a stage split and micro-batches)."""
        return self in (Parallelism.PP, Parallelism.HYBRID)

    @property
    def label(self) -> str:
        return _PARALLELISM_LABELS[self]


_PARALLELISM_LABELS = {Parallelism.DP: "Data parallel (DP)", Parallelism.SP: "Sequence parallel (SP)",
                       Parallelism.TP: "Tensor parallel (TP)", Parallelism.PP: "Pipeline (PP)",
                       Parallelism.HYBRID: "Hybrid PP × DP"}


class Schedule(str, Enum):
    """Pipeline schedule (pp and hybrid)."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"

    def __str__(self) -> str:
        return self.value


PARALLELISMS: tuple[str, ...] = tuple(p.value for p in Parallelism)
SCHEDULES: tuple[str, ...] = tuple(s.value for s in Schedule)
DEVICE_KINDS = ("cpu", "cuda")
#: The environment variable that holds a run's rendezvous secret on a device.  The launcher
#: writes the secret on the worker's stdin and the worker's shell reads it into this
#: variable, so it is never on a command line (``ps``) nor in a job or a run record.
SECRET_ENV = "EDGETRAIN_RUN_SECRET"
OPTIMIZERS = ("adamw", "sgd", "adafactor")
#: How DP replicas agree: ``ddp`` all-reduces gradients every ``sync_every`` iterations;
#: ``diloco`` lets each replica step alone and averages their moves every ``sync_every``.
DP_MODES = ("ddp", "diloco")
SYNC_DTYPES = ("fp32", "bf16", "fp16")
PRECISIONS = ("fp32", "bf16")


def _enum(kind: type[Enum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(k.value for k in kind)
        raise ValueError(f"{what} {value!r} is not one of {choices}") from None


@dataclass
class RunSettings:
    """What a user chooses for a run (CLI flags or the GUI's run form).

    Attributes
    ----------
    model
        A preset name (``workers.presets.PRESETS``) or a local Hugging Face directory.
    parallelism, schedule
        How the work is split; the pipeline schedule for pp/hybrid.
    steps, batch_size, seq_len, micro_batches, sync_every
        Optimizer steps, global mini-batch (the paper's 128), sequence length,
        pipeline micro-batches, DP gradient-sync period k.
    lr
        Learning rate; ``None`` picks by model (:meth:`resolved_lr`).
    seed
        Seed for weights and data.
    dataset, weights, tokenizer
        A QNLI-format TSV, a Hugging Face model directory and a tokenizer directory
        (local paths are copied to the devices); ``None``: generated data, preset weights.
    device
        ``cpu`` or ``cuda``; the backend follows (gloo / nccl).
    timeout_s
        Seconds a collective waits for a silent peer (the process-group timeout).
    stall_s
        Controller side: no telemetry for this long makes it look for a frozen device.
    stages
        pp/hybrid: a fixed split, one ``{"ranks": [...], "layers": [a, b)}`` per stage in
        pipeline order; ``None``: the planner's balanced split.
    checkpoint_every, checkpoint_minutes
        A sharded checkpoint every this many steps and/or minutes, whichever comes
        first (0 turns that trigger off); one is always written at the end and when
        the controller goes away.  DP checkpoints at its next gradient sync.
    keep_checkpoints
        Complete checkpoints kept on each device (older ones are deleted).
    eval_every
        Held-out evaluation (loss, accuracy) every this many steps and at the end;
        0: at the end only.
    optimizer
        ``adamw`` (two moments per parameter), ``sgd`` (SGD with momentum 0.9: one
        buffer) or ``adafactor`` (factored second moment: far less state).
    activation_checkpointing
        Recompute each transformer block's activations in the backward pass instead of
        keeping them (less memory, about a third more compute).
    grad_accumulation
        DP and TP: each rank runs its part of the batch (DP: its slice; TP: the whole
        batch) in this many micro-batches, accumulating gradients (the step is unchanged;
        peak activations shrink).
    dp_shares
        DP: each rank's share of the global batch, in rank order (they are normalised);
        ``None``: equal shares.  The planner picks shares proportional to device speed.
    precision
        ``fp32``, or ``bf16`` autocast where the device supports it.
    dp_mode
        DP: ``ddp`` (gradients all-reduced every ``sync_every`` iterations) or ``diloco``
        (low-communication: each replica takes ``sync_every`` optimizer steps alone,
        then one all-reduce of their parameter moves and an outer step; for slow links).
    outer_lr, outer_momentum
        DiLoCo's outer step: SGD with Nesterov momentum on the averaged move (0.7 and
        0.9 as in the DiLoCo paper; 1 and 0 make it plain averaging).
    sync_dtype
        DiLoCo: the all-reduce's precision (``bf16`` halves the bytes; ``fp32``, ``fp16``).
    """

    model: str = "tiny-gpt2"
    parallelism: Parallelism = Parallelism.DP
    steps: int = 10
    batch_size: int = 128
    seq_len: int = 32
    micro_batches: int = 4
    sync_every: int = 5
    lr: float | None = None
    seed: int = 0
    schedule: Schedule = Schedule.GPIPE
    dataset: str | None = None
    weights: str | None = None
    tokenizer: str | None = None
    device: str = "cpu"
    timeout_s: float = 60.0
    stall_s: float = 30.0
    stages: list[dict] | None = None
    checkpoint_every: int = 50
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2
    eval_every: int = 25
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    grad_accumulation: int = 1
    dp_shares: list[float] | None = None
    precision: str = "fp32"
    dp_mode: str = "ddp"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    sync_dtype: str = "bf16"

    def __setattr__(self, name: str, value: Any) -> None:
        # the enums hold on every assignment, not only at construction ("pp" -> Parallelism.PP)
        if name == "parallelism":
            value = _enum(Parallelism, value, "parallelism")
        elif name == "schedule":
            value = _enum(Schedule, value, "schedule")
        super().__setattr__(name, value)

    def check_knobs(self, world_size: int | None = None) -> None:
        """Check the memory knobs (optimizer, checkpointing, accumulation, shares, precision).

        Parameters
        ----------
        world_size
            The run's ranks, when known: DP's ``dp_shares`` needs one share per rank, and
            every rank at least one row of ``batch_size`` (:func:`share_bounds`).
            ``dp_shares`` only acts on DP and ``grad_accumulation`` on DP and TP; other
            parallelisms ignore them (the GUI keeps a planner's shares when the parallelism changes).

        Raises
        ------
        ValueError
            Naming the setting and the fix.
        """
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}. "
                             "Fix: pick one (--optimizer)")
        if self.optimizer == "adafactor" and self.parallelism is Parallelism.TP:
            # its factors are row/column means of whole matrices and its step size the
            # whole tensor's RMS: a column or row shard holds neither (torch refuses too)
            raise ValueError("optimizer 'adafactor' does not work with tensor parallelism (its factored "
                             "moments need whole matrices). Fix: use adamw or sgd with tp, or another "
                             "parallelism")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}. "
                             "Fix: pick one (--precision)")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing must be true or false, not "
                             f"{self.activation_checkpointing!r}")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"dp_mode {self.dp_mode!r} is not one of {', '.join(DP_MODES)}. Fix: --dp-mode ddp "
                             "(synchronous) or --dp-mode diloco (low-communication)")
        if self.sync_dtype not in SYNC_DTYPES:
            raise ValueError(f"sync_dtype {self.sync_dtype!r} is not one of {', '.join(SYNC_DTYPES)}. "
                             "Fix: pick one (--sync-dtype)")
        for name, ok, what, example in (("outer_lr", lambda v: 0 < v <= 2, "in (0, 2]", 0.7),
                                        ("outer_momentum", lambda v: 0 <= v < 1, "in [0, 1)", 0.9)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise ValueError(f"{name} must be a number {what}, not {v!r}. "
                                 f"Fix: e.g. --{name.replace('_', '-')} {example}")
        g = self.grad_accumulation
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"grad_accumulation must be a whole number >= 1, not {g!r}. "
                             "Fix: 1 runs each replica's slice at once (--grad-accumulation)")
        if self.dp_shares is None:
            return
        shares = self.dp_shares
        if (not isinstance(shares, (list, tuple)) or not shares
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in shares)
                or not all(0 < x < float("inf") for x in shares)):
            raise ValueError(f"dp_shares must be positive numbers, one per rank, not {shares!r}. "
                             "Fix: e.g. --dp-shares 0.4,0.3,0.3, or leave it unset for equal shares")
        if world_size is None or self.parallelism is not Parallelism.DP:
            return
        if len(shares) != world_size:
            raise ValueError(f"dp_shares has {len(shares)} entries for {world_size} ranks. "
                             "Fix: give one share per device in rank order, or leave it unset")
        share_bounds(self.batch_size, shares)

    def resolved_lr(self) -> float:
        """The learning rate to train with: 1e-3 for tiny presets, 5e-5 (fine-tuning) otherwise."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-3 if self.model.startswith("tiny-") else 5e-5

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML data (enums as their names' values)."""
        out = asdict(self)
        out["parallelism"], out["schedule"] = self.parallelism.value, self.schedule.value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "RunSettings":
        """Settings from :meth:`to_dict` data (a session file, a run record).

        Raises
        ------
        ValueError
            Naming the setting: not a mapping, an unknown key (a typo must show), a
            number that is not one, a parallelism or schedule that does not exist.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping of settings, got {type(data).__name__}")
        known = {f.name: f for f in fields(RunSettings)}
        unknown = sorted(str(k) for k in set(data) - set(known))  # str: keys may mix types
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}. Fix: use only {', '.join(known)}")
        out = {}
        for k, v in data.items():
            hint = str(known[k].type)
            if v is not None and hint.startswith(("int", "float")):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{k}: expected a number, got {v!r}")
                v = float(v) if hint.startswith("float") else v
                if hint.startswith("int") and not isinstance(v, int):
                    raise ValueError(f"{k}: expected a whole number, got {v!r}")
            out[k] = v
        return cls(**out)

    def settings(self) -> "RunSettings":
        """Just the user's settings (drops what a :class:`JobConfig` adds)."""
        return RunSettings(**{f.name: getattr(self, f.name) for f in fields(RunSettings)})


@dataclass(kw_only=True)
class JobConfig(RunSettings):
    """A run as every worker receives it: the settings plus the controller's decisions.

    Attributes
    ----------
    run_id, world_size, master_addr, master_port
        Rendezvous: rank 0's device address and a free port there, for this run only.
        The run's secret is not here (:data:`SECRET_ENV`): a job is written to the
        run record and travels on the command line.
    addrs
        The address of each rank's device (index = rank); gloo binds to it.
    devices
        The device name of each rank (index = rank), for telemetry and errors.
    threads
        Torch intra-op threads (0 = leave torch's default).
    telemetry_every
        Steps between step records.
    power
        The device's power figures for the energy estimate (``p_idle_w``, ``p_max_w``).
    lifeline_s
        A worker that hears nothing from its controller for this long, or whose stdin
        closes, ends itself (:mod:`workers.lifeline`); 0 turns the lifeline off (a worker
        started by hand or by a bench, with no controller writing to it).
    checkpoint_dir
        Where this run's checkpoints go on each device (relative paths are relative to
        the worker's directory, ``<workdir>/workers-<hash>``); empty: no checkpoints.
    resume_from
        A checkpoint directory on the device (same convention) to start from: training
        continues at its step; empty: start at step 0.
    collective_timeout_s
        How long a training collective of a run that can lose a device waits for a peer
        (DP): bounded so that survivors stuck behind a lost peer give up in seconds, not
        after ``timeout_s``; 0 means ``timeout_s``.

    ``lr`` is resolved (never ``None``) and ``stages`` is a list (empty unless pipelined).
    """

    run_id: str
    world_size: int
    master_addr: str
    master_port: int
    addrs: list[str]
    devices: list[str]
    threads: int = 0
    telemetry_every: int = 1
    power: dict = field(default_factory=dict)
    lifeline_s: float = 0.0
    checkpoint_dir: str = ""
    resume_from: str = ""
    collective_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        self.lr = self.resolved_lr()
        self.stages = list(self.stages or [])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.device not in DEVICE_KINDS:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICE_KINDS)}")
        if len(self.addrs) != self.world_size or len(self.devices) != self.world_size:
            raise ValueError("addrs and devices need one entry per rank")
        if self.batch_size < 1 or self.seq_len < 1 or self.steps < 0 or self.sync_every < 1:
            raise ValueError("batch_size, seq_len and sync_every must be positive, steps non-negative")
        self.check_knobs(self.world_size)
        if self.parallelism.pipelined:
            ranks = sorted(r for s in self.stages for r in s["ranks"])
            if ranks != list(range(self.world_size)):
                raise ValueError("stages must use every rank exactly once")

    def to_b64(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(self.to_dict()).encode()).decode()

    @classmethod
    def from_b64(cls, text: str) -> "JobConfig":
        data = json.loads(base64.urlsafe_b64decode(text.encode()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def even_stages(n_blocks: int, n_stages: int, replicas: int = 1) -> list[dict]:
    """Contiguous near-equal block ranges, ``replicas`` consecutive ranks per stage."""
    base, extra = divmod(n_blocks, n_stages)
    stages, start = [], 0
    for s in range(n_stages):
        end = start + base + (1 if s < extra else 0)
        stages.append({"ranks": list(range(s * replicas, (s + 1) * replicas)), "layers": [start, end]})
        start = end
    return stages


def share_bounds(n: int, shares: list[float]) -> list[int]:
    """Where each rank's rows of a batch of ``n`` start and end, from its share.

    Rank ``r`` takes rows ``[bounds[r], bounds[r + 1])`` with ``bounds[r] =
    floor(cum_r * n)``, ``cum_r`` the normalised shares of the ranks before ``r``
    (``bounds[-1]`` is ``n`` exactly).

    Raises
    ------
    ValueError
        A rank would get no row (naming it, its share and the batch size).
    """
    total = float(sum(shares))
    bounds, cum = [0], 0.0
    for x in shares[:-1]:
        cum += x
        bounds.append(min(n, int(cum / total * n)))  # int() floors the non-negative value
    bounds.append(n)
    for r in range(len(shares)):
        if bounds[r + 1] <= bounds[r]:
            raise ValueError(f"dp_shares gives rank {r} (share {shares[r] / total:.3g}) no row of the "
                             f"batch of {n}. Fix: raise its share or batch_size, or leave dp_shares unset")
    return bounds
