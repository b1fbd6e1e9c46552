"""Sharded checkpoints on the devices, with ``torch.distributed.checkpoint`` (DCP).

Each rank saves what it holds: its parameters under the one-device model's names
(``model/<name>``) and their optimizer state (``optim/<name>/<state>``), so a checkpoint
written by 2 pipeline stages loads into 3 stages, into DP replicas or into one process:
DCP reads, for every tensor a rank asks for, whichever saved pieces overlap it.  Replicated
tensors (DP replicas) are written once, spread over the ranks (DCP's de-duplication).

What is not saved, and why that is exact: the data position is the step (every batch is a
pure function of the step and the seed, :func:`workers.data.global_batch`), and training
draws no random numbers (all dropouts are 0), so model, optimizer and step are the whole
state.  DP checkpoints only at a gradient sync (no accumulated gradients in flight): a
checkpoint asked for between syncs is labelled with the last synced step, whose state the
parameters and optimizer still are.

Atomicity: see :mod:`workers.checkpoint_manifest`.  Every collective here runs on the
run's control group, never on the training groups.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .checkpoint_manifest import (
    MANIFEST_NAME,
    METADATA_NAME,
    CheckpointFile,
    Manifest,
    parse_step_dirname,
    sha256_file,
    step_dirname,
)
from .config import JobConfig


def _write_atomic(path: Path, text: str, tag: str) -> None:
    # tag: ranks sharing a device write the same manifest; each through its own temp file
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a checkpoint directory.

    Raises
    ------
    ValueError
        No manifest (the checkpoint was interrupted while being written), or a malformed one.
    """
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"checkpoint {directory} is incomplete: no {MANIFEST_NAME} (interrupted while writing)")
    return Manifest.from_json(path.read_bytes(), str(path))


def state_dict(trainer) -> dict[str, torch.Tensor]:
    """The tensors a rank saves: its parameters and their optimizer state, by full name."""
    out: dict[str, torch.Tensor] = {}
    for name, p in trainer.checkpoint_params().items():
        out[f"model/{name}"] = p.detach()
        for key, value in trainer.opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"optim/{name}/{key}"] = value
    return out


class Checkpointer:
    """Saves and loads this rank's part of the run's checkpoints.

    Parameters
    ----------
    cfg, rank, trainer
        The job, this rank, and its trainer (``checkpoint_params``, ``opt``).
    group
        The control process group (every rank of the run).
    """

    def __init__(self, cfg: JobConfig, rank: int, trainer, group) -> None:
        self.cfg, self.rank, self.trainer, self.group = cfg, rank, trainer, group
        self.root = Path(os.path.expanduser(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
        self.last_step = -1

    # ------------------------------------------------------------------ save

    def save(self, step: int, kind: str) -> tuple[Manifest, list[CheckpointFile]]:
        """Write the checkpoint of ``step`` (collective over the control group).

        Returns the manifest and this rank's own files.

        Raises
        ------
        OSError, RuntimeError
            The save failed on some rank (full disk, unwritable directory); DCP raises on
            every rank alike, and the partial directory is removed here.
        """
        assert self.root is not None, "checkpoints are off (no checkpoint_dir)"
        t0 = time.perf_counter()
        directory = self.root / step_dirname(step)
        if directory.exists() and not (directory / MANIFEST_NAME).exists():
            shutil.rmtree(directory, ignore_errors=True)  # an interrupted earlier attempt
        try:
            directory.mkdir(parents=True, exist_ok=True)
            dcp.save(state_dict(self.trainer), storage_writer=dcp.FileSystemWriter(directory),
                     process_group=self.group)
            mine = [CheckpointFile(f.name, self.rank, self.cfg.devices[self.rank], f.stat().st_size, sha256_file(f))
                    for f in sorted(directory.iterdir())
                    if f.name.startswith(f"__{self.rank}_") or (self.rank == 0 and f.name == METADATA_NAME)]
            parts: list[list[CheckpointFile] | None] = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(parts, mine, group=self.group)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        manifest = Manifest(
            run_id=self.cfg.run_id, step=step, kind=kind, world_size=self.cfg.world_size,
            devices=list(self.cfg.devices), parallelism=str(self.cfg.parallelism), model=self.cfg.model,
            layout=self.trainer.checkpoint_layout, stages=list(self.cfg.stages),
            files=[f for part in parts for f in (part or [])], seconds=time.perf_counter() - t0,
            created=time.time())
        _write_atomic(directory / MANIFEST_NAME, manifest.to_json(), f"r{self.rank}")
        self.last_step = step
        self._retain()
        return manifest, mine

    def _retain(self) -> None:
        """Keep the newest ``keep_checkpoints`` complete checkpoints; drop older ones and
        interrupted ones older than the newest complete one."""
        keep = max(1, self.cfg.keep_checkpoints)
        steps = sorted(((parse_step_dirname(d.name), d) for d in self.root.iterdir()
                        if d.is_dir() and parse_step_dirname(d.name) is not None), reverse=True)
        complete = [d for _, d in steps if (d / MANIFEST_NAME).exists()]
        newest = parse_step_dirname(complete[0].name) if complete else None
        for step, d in steps:
            old_complete = d in complete[keep:]
            stale = d not in complete and newest is not None and step < newest
            if old_complete or stale:
                shutil.rmtree(d, ignore_errors=True)  # a rank sharing this device may race us

    # ------------------------------------------------------------------ load

    def load(self, directory: str | Path) -> Manifest:
        """Load a checkpoint into the trainer's parameters and optimizer, in place
        (collective over the control group); returns its manifest.

        Raises
        ------
        ValueError
            The checkpoint is incomplete, lacks a file here, was written in a layout this
            trainer cannot read, or lacks a parameter this rank needs (named).
        """
        directory = Path(os.path.expanduser(str(directory)))
        manifest = read_manifest(directory)
        for f in manifest.files:
            path = directory / f.name
            if not path.is_file() or path.stat().st_size != f.bytes:
                raise ValueError(f"checkpoint {directory} lacks {f.name} of rank {f.rank} ({f.device}) "
                                 "or it has the wrong size; the controller copies it before a resume")
        mine = self.trainer.checkpoint_layout
        if manifest.layout != mine:
            raise ValueError(f"checkpoint {directory} was written in layout {manifest.layout!r} "
                             f"({manifest.parallelism} on {manifest.world_size} devices); this run needs "
                             f"{mine!r}. Fix: resume with parallelism {manifest.parallelism} on "
                             f"{manifest.world_size} devices, or export the model and start from it")
        reader = dcp.FileSystemReader(directory)
        saved = reader.read_metadata().state_dict_metadata
        wanted: dict[str, torch.Tensor] = {}
        opt = self.trainer.opt
        for name, p in self.trainer.checkpoint_params().items():
            key = f"model/{name}"
            if key not in saved:
                raise ValueError(f"checkpoint {directory} has no tensor for parameter {name!r} "
                                 f"(model {manifest.model}); is it a checkpoint of this model?")
            wanted[key] = p.detach()
            state = {}
            for skey, meta in saved.items():
                prefix = f"optim/{name}/"
                if not skey.startswith(prefix):
                    continue
                size = tuple(getattr(meta, "size", ()))
                dtype = meta.properties.dtype
                # a state shaped like its parameter (AdamW's moments, SGD's momentum) follows
                # the parameter's layout (a DTensor shard under TP); any other shape (AdamW's
                # scalar step, Adafactor's row and column factors) is a plain tensor
                if size == tuple(p.shape):
                    value = torch.zeros_like(p, dtype=dtype)
                elif not size:
                    value = torch.zeros(size, dtype=dtype)  # optimizers keep step counts on the CPU
                else:
                    value = torch.zeros(size, dtype=dtype, device=p.device)
                state[skey[len(prefix):]] = value
                wanted[skey] = value
            if state:
                opt.state[p] = state
        dcp.load(wanted, storage_reader=reader, process_group=self.group)
        self.last_step = manifest.step
        return manifest


@dataclass
class Decision:
    """What every rank does after a step, agreed over the control group."""

    save: str | None = None   # the checkpoint kind to write now, or None
    stop: bool = False        # leave the loop after that


class Control:
    """One tiny all-reduce per step so every rank decides the same thing at the same step.

    Ranks see a lapsed lifeline, a stop request or a time-based checkpoint at different
    moments; acting on a local view would put one rank into a checkpoint collective while
    its peers run the next step.  The all-reduce (MAX of three flags) costs one message of
    24 bytes per step.  Rank 0's clock decides the time-based checkpoints.
    """

    def __init__(self, cfg: JobConfig, rank: int, group, lapsed: threading.Event, stop: threading.Event) -> None:
        self.cfg, self.rank, self.group = cfg, rank, group
        self.lapsed, self.stop = lapsed, stop
        self._due = False
        self._last_save = time.monotonic()

    def saved(self) -> None:
        self._due = False
        self._last_save = time.monotonic()

    def after_step(self, step: int, clean: bool) -> Decision:
        """Call on every rank after every step; ``clean``: no accumulated gradients pending."""
        cfg = self.cfg
        if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0:
            self._due = True
        timed = (self.rank == 0 and cfg.checkpoint_minutes > 0
                 and time.monotonic() - self._last_save >= cfg.checkpoint_minutes * 60)
        flags = torch.tensor([int(timed), int(self.lapsed.is_set()), int(self.stop.is_set())], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        timed, lapsed, stop = (bool(x) for x in flags.tolist())
        if lapsed or stop:
            return Decision(save="emergency" if lapsed else "stop", stop=True)
        self._due = self._due or timed
        if self._due and clean and step < cfg.steps:  # the end writes its own
            return Decision(save="periodic")
        return Decision()
