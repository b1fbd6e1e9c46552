"""Materialise a model part by part: seeded init, checkpoint tensors read by name.

``workers.models.build_model`` builds the HF model on the ``meta`` device, then this
module allocates only the requested parts (embeddings, some blocks, the head).

A pipeline stage must load only its own blocks (GPT2-L is 3.1 GB in fp32; a 4 GB
Jetson Nano holds a quarter of it), so we never call ``from_pretrained`` on the whole
model.  :class:`TensorReader` finds each tensor by name across ``model.safetensors``,
sharded safetensors, or ``pytorch_model.bin`` and copies it straight into a parameter.

Safetensors files are parsed here (8-byte header length, JSON header, raw data)
instead of through ``safetensors.safe_open``: that one memory-maps the whole file, and
on an emulated device capped with ``RLIMIT_AS`` the mapping alone (3.2 GB for GPT2-L)
counts against the cap although only a quarter of it is ever read.  Seeking and
reading one tensor at a time costs no address space beyond the destination.

Runs on devices: imports torch and the standard library only.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def check_weights_dir(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is an HF model directory with weights."""
    if not path.is_dir():
        raise ValueError(f"weights directory {str(path)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"weights directory {str(path)!r} is not a Hugging Face model "
                         "directory: config.json is missing")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"weights directory {str(path)!r} has no weights file: expected one "
                         f"of {', '.join(WEIGHT_FILES)}")


class _SafetensorsFile:
    """Header of one ``.safetensors`` file; tensors are read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n

    def read_into(self, key: str, out: torch.Tensor) -> None:
        entry = self.entries[key]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        if end == begin:
            return
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if dtype == out.dtype and out.is_contiguous() and out.device.type == "cpu" \
                    and dtype != torch.bfloat16:
                # Straight into the parameter's memory: no temporary copy.
                view = memoryview(out.detach().numpy()).cast("B")
                if f.readinto(view) != end - begin:
                    raise ValueError(f"{self.path}: tensor {key!r} is truncated")
                return
            buf = bytearray(f.read(end - begin))
        out.copy_(torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"]))


class TensorReader:
    """Tensors of a local HF model directory, by checkpoint key.

    Parameters
    ----------
    path
        A directory accepted by :func:`check_weights_dir`.

    Notes
    -----
    ``pytorch_model.bin`` checkpoints are opened with ``torch.load(mmap=True)``: only
    the tensors read become resident, but the mapping counts against ``RLIMIT_AS``
    (safetensors does not have that cost, see the module docstring).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._where: dict[str, object] = {}   # key -> _SafetensorsFile or a loaded .bin dict
        if (path / "model.safetensors").is_file():
            self._add_safetensors(path / "model.safetensors")
        elif (path / "model.safetensors.index.json").is_file():
            for shard in sorted(set(self._index(path / "model.safetensors.index.json").values())):
                self._add_safetensors(path / shard)
        elif (path / "pytorch_model.bin").is_file():
            self._add_bin(path / "pytorch_model.bin")
        else:
            for shard in sorted(set(self._index(path / "pytorch_model.bin.index.json").values())):
                self._add_bin(path / shard)

    @staticmethod
    def _index(path: Path) -> dict[str, str]:
        return json.loads(path.read_text())["weight_map"]

    def _add_safetensors(self, path: Path) -> None:
        st = _SafetensorsFile(path)
        for key in st.entries:
            self._where[key] = st

    def _add_bin(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        for key in state:
            self._where[key] = state

    def keys(self) -> set[str]:
        return set(self._where)

    def resolve(self, name: str, prefix: str) -> str | None:
        """The checkpoint key of model parameter ``name``, or ``None``.

        A checkpoint of the base model (``h.0...``) lacks the task model's
        ``base_model_prefix`` (``transformer.h.0...``); some carry it twice over.
        """
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        if prefix:
            candidates.append(f"{prefix}.{name}")
        return next((c for c in candidates if c in self._where), None)

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._where[key]
        if isinstance(src, _SafetensorsFile):
            return tuple(src.entries[key]["shape"])
        return tuple(src[key].shape)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy checkpoint tensor ``key`` into ``out`` (same shape; dtype is cast)."""
        if self.shape(key) != tuple(out.shape):
            raise ValueError(f"weights directory {str(self.path)!r}: {key!r} has shape "
                             f"{list(self.shape(key))}, the model expects {list(out.shape)}")
        src = self._where[key]
        with torch.no_grad():
            if isinstance(src, _SafetensorsFile):
                src.read_into(key, out)
            else:
                out.copy_(src[key])


# --------------------------------------------------------------------------- parts


def part_seed(seed: int, part: int | str) -> int:
    """Initialisation seed of one part: a hash of ``(seed, part)``.

    Each part draws from its own seed so any subset of parts builds bit-identically
    to the same parts of the full model, whatever else is (not) built.
    """
    digest = hashlib.sha256(f"edgetrain-part:{seed}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    # Children before parents, like HF's own init pass: GPT-2 rescales c_proj in the
    # attention/MLP module's init after the Conv1D's generic init.
    for child in module.children():
        yield from _post_order(child)
    yield module


def _tensor_names(hf: nn.Module, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(hf name, tensor)`` of the parameters and persistent buffers under ``module``."""
    where = {id(m): n for n, m in hf.named_modules()}
    out = []
    for sub in module.modules():
        prefix = where.get(id(sub))
        if prefix is None:  # our wrappers (GPT2Embed, Block, ...) own no tensors
            continue
        for pname, t in sub.named_parameters(recurse=False):
            out.append((f"{prefix}.{pname}" if prefix else pname, t))
        for bname, t in sub.named_buffers(recurse=False):
            if bname not in sub._non_persistent_buffers_set:
                out.append((f"{prefix}.{bname}" if prefix else bname, t))
    return out


def materialise(model, parts: frozenset, seed: int, reader: TensorReader | None) -> None:
    """Allocate ``parts`` of a meta-built model on CPU and fill them.

    Each part is initialised with the HF model's own ``_init_weights`` under
    :func:`part_seed`, then overwritten with what the checkpoint has.  A part absent
    from the checkpoint (a fresh head on an LM checkpoint) keeps its seeded init;
    embeddings and blocks must be complete.

    Parameters
    ----------
    model
        A :class:`~workers.models.StagedModel` whose HF model was built on ``meta``.
    parts
        ``'embed'``, ``'head'`` and block indices to materialise.
    seed
        The build seed.
    reader
        The checkpoint, or ``None`` for a fresh build.
    """
    hf = model.hf
    # to_empty also empties buffers; transformers 5's _init_weights refills them
    # (DistilBERT's position_ids) - the same path its from_pretrained uses for a model
    # built on meta.  (4.x left such buffers alone; our forward passes position ids.)
    for part in sorted(parts, key=lambda p: (p == "head", p != "embed", p if type(p) is int else 0)):
        module = model.part_module(part)
        module.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(part_seed(seed, part))
            for sub in _post_order(module):
                hf._init_weights(sub)
        if reader is None:
            continue
        missing = []
        for name, tensor in _tensor_names(hf, module):
            key = reader.resolve(name, hf.base_model_prefix)
            if key is None:
                missing.append(name)
            else:
                reader.read_into(key, tensor)
        if missing and part != "head":
            raise ValueError(f"weights directory {str(reader.path)!r} lacks {missing[:3]} "
                             f"(part {part!r}); is it a {model.family} checkpoint?")
    model.parts = parts
