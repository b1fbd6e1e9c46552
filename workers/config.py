"""The job description a worker receives from the controller.

The controller builds one :class:`JobConfig` per run (from the plan) and sends it to
every device as base64 JSON on the command line; each worker adds its own rank.  Plain
data, standard library only.
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, fields

PARALLELISMS = ("dp", "sp", "tp", "pp", "hybrid")
SCHEDULES = ("gpipe", "1f1b")


@dataclass
class JobConfig:
    """Everything a worker needs to join a run.

    Attributes
    ----------
    run_id, world_size, master_addr, master_port
        Rendezvous: rank 0's device address and a free port there.
    addrs
        The address of each rank's device (index = rank); gloo binds to it.
    devices
        The device name of each rank (index = rank), for telemetry and errors.
    model, weights
        Preset name (``workers.models.PRESETS``) and an optional local HF directory.
    parallelism
        One of ``dp, sp, tp, pp, hybrid``.
    batch_size, seq_len, micro_batches, sync_every, steps, lr, seed
        Global mini-batch, sequence length, pipeline micro-batches, DP gradient sync
        period k, optimizer steps, learning rate, seed for weights and data.
    stages
        Pipeline/hybrid only: one entry per stage, ``{"ranks": [...], "layers": [a, b]}``
        with the half-open block range ``[a, b)``; stage order is list order.
    schedule
        ``gpipe`` or ``1f1b``.
    dataset
        A QNLI-format TSV path on the device, or ``None`` for generated data.
    device
        ``cpu`` or ``cuda``; the backend follows (gloo / nccl).
    threads
        Torch intra-op threads (0 = leave torch's default).
    timeout_s
        Process-group timeout: a frozen peer fails the run after this long.
    """

    run_id: str
    world_size: int
    master_addr: str
    master_port: int
    addrs: list[str]
    devices: list[str]
    model: str = "tiny-gpt2"
    weights: str | None = None
    tokenizer: str | None = None
    parallelism: str = "dp"
    batch_size: int = 128
    seq_len: int = 32
    micro_batches: int = 4
    sync_every: int = 5
    steps: int = 10
    lr: float = 1e-3
    seed: int = 0
    stages: list[dict] = field(default_factory=list)
    schedule: str = "gpipe"
    dataset: str | None = None
    device: str = "cpu"
    threads: int = 0
    timeout_s: float = 60.0
    telemetry_every: int = 1
    power: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism {self.parallelism!r} is not one of {', '.join(PARALLELISMS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if len(self.addrs) != self.world_size or len(self.devices) != self.world_size:
            raise ValueError("addrs and devices need one entry per rank")
        if self.batch_size < 1 or self.seq_len < 1 or self.steps < 0 or self.sync_every < 1:
            raise ValueError("batch_size, seq_len and sync_every must be positive, steps non-negative")
        if self.parallelism in ("pp", "hybrid"):
            ranks = sorted(r for s in self.stages for r in s["ranks"])
            if ranks != list(range(self.world_size)):
                raise ValueError("stages must use every rank exactly once")

    def to_b64(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(asdict(self)).encode()).decode()

    @classmethod
    def from_b64(cls, text: str) -> "JobConfig":
        data = json.loads(base64.urlsafe_b64decode(text.encode()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
