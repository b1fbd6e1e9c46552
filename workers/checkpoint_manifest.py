"""The manifest of a sharded checkpoint: what the worker writes last and the controller reads.

A checkpoint is one directory per step, ``<workdir>/checkpoints/<run_id>/step-NNNNNNNN/``
on every device of the run, holding :mod:`torch.distributed.checkpoint` files: one
``__<rank>_0.distcp`` per rank on that rank's device and ``.metadata`` on rank 0's.  When
every rank's files are complete (written and fsynced by DCP), every rank writes
``manifest.json`` into its own copy of the directory (temp file, fsync, rename): the list
of every rank's files with sizes and sha256.  A directory without a manifest was
interrupted while being written and is never loaded.

Standard library only: the controller reads manifests without torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST_NAME = "manifest.json"
METADATA_NAME = ".metadata"
#: Why a checkpoint was written.
KINDS = ("periodic", "final", "emergency", "stop")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoint files are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dirname(step: int) -> str:
    """``step-00000042``: sorts by step as text."""
    return f"step-{step:08d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a ``step-NNNNNNNN`` directory name, or ``None`` for anything else."""
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


@dataclass
class CheckpointFile:
    """One file of a checkpoint, on the device of the rank that wrote it."""

    name: str
    rank: int
    device: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """A complete checkpoint.

    Attributes
    ----------
    run_id, step, kind
        The run, the number of completed steps it holds (training resumes at this
        iteration), and why it was written (:data:`KINDS`).
    world_size, devices, parallelism, stages, model
        The layout that wrote it (``devices[rank]`` = device name).
    layout
        ``canonical``: every tensor is keyed ``model/<name>`` / ``optim/<name>/<state>``
        by the one-device model's parameter names, and loads into any parallelism.
        Anything else (``tp-gpt2/<world>``) loads only into the same layout.
    files
        Every rank's files (``.metadata`` included) with sizes and sha256.
    seconds
        Wall time of the save.
    """

    run_id: str
    step: int
    kind: str
    world_size: int
    devices: list[str]
    parallelism: str
    model: str
    layout: str
    files: list[CheckpointFile]
    stages: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    created: float = 0.0
    format: int = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def files_of(self, rank: int) -> list[CheckpointFile]:
        return [f for f in self.files if f.rank == rank]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        """Parse and check a manifest.

        Raises
        ------
        ValueError
            Naming ``where`` and the first field that is missing or malformed.
        """
        try:
            data: Any = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: checkpoint format {data.get('format')!r}, this EdgeTrain reads {FORMAT}")
        want = {"run_id": str, "step": int, "kind": str, "world_size": int, "devices": list,
                "parallelism": str, "model": str, "layout": str, "files": list}
        for name, typ in want.items():
            if not isinstance(data.get(name), typ) or isinstance(data.get(name), bool):
                raise ValueError(f"{where}: field {name!r} is missing or not a {typ.__name__}")
        if data["kind"] not in KINDS:
            raise ValueError(f"{where}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
        if data["step"] < 0 or data["world_size"] < 1 or len(data["devices"]) != data["world_size"]:
            raise ValueError(f"{where}: step, world_size and devices disagree")
        files = []
        for i, f in enumerate(data["files"]):
            try:
                cf = CheckpointFile(name=str(f["name"]), rank=int(f["rank"]), device=str(f["device"]),
                                    bytes=int(f["bytes"]), sha256=str(f["sha256"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: files[{i}] is malformed: {f!r}") from None
            if "/" in cf.name or cf.name in ("", ".", "..") or not 0 <= cf.rank < data["world_size"]:
                raise ValueError(f"{where}: files[{i}] has a bad name or rank: {f!r}")
            files.append(cf)
        if not any(f.name == METADATA_NAME for f in files):
            raise ValueError(f"{where}: lists no {METADATA_NAME} file")
        data["files"] = files
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
