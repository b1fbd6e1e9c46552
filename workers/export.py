"""Export a run's checkpoint as a Hugging Face model directory.

``python -m workers.export --checkpoint DIR --out DIR [--weights DIR] [--dataset TSV]
[--tokenizer DIR] [--seq-len N] [--seed N] [--overwrite]`` prints one JSON line (the
:class:`ExportResult`) or exits 1 with a one-line error on stderr.  The controller runs it
as a local subprocess, so ``app/`` stays torch-free.

One process reads a checkpoint written by any number of ranks: DCP reshards the saved
pieces into the full tensors asked for.  The ``tp-gpt2/<W>`` layout (gpt2's Conv1Ds saved
as ``nn.Linear`` weights, c_attn's rows re-ordered per rank) is undone with the trainer's
own :func:`workers.parallel.tp.qkv_permutation`.  The result is ``config.json`` +
``model.safetensors``, the run's tokenizer when it had one, and ``edgetrain.json`` (where it
came from, the sha256 of every file, why there is no tokenizer), written into a temp
directory beside ``out_dir`` and renamed at the end: a crash never leaves half a model there.

Runs on the controller's machine: torch, transformers, tokenizers and the standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from .checkpoint import read_manifest
from .checkpoint_manifest import sha256_file
from .config import RunSettings
from .data import CAUSAL_FAMILIES, CLS_NAMES, PAD_NAMES, SEP_NAMES, load_tokenizer, read_qnli, train_tokenizer
from .models import PRESETS, build_model
from .parallel.tp import qkv_permutation

NOTE_NAME = "edgetrain.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tokenizer.model")  # not a model's


@dataclass
class ExportResult:
    """What :func:`export` wrote (``edgetrain.json`` holds it too, less ``out_dir`` and ``seconds``).

    ``tokenizer``: ``copied`` (the run's tokenizer dir), ``trained`` (from its dataset) or ``None``
    (why in ``no_tokenizer``); ``files``: sha256 of every file written but ``edgetrain.json``.
    """

    out_dir: str
    checkpoint: str
    run_id: str
    step: int
    kind: str
    model: str
    family: str
    layout: str
    parallelism: str
    world_size: int
    tokenizer: str | None
    no_tokenizer: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def verify_files(directory: Path, manifest) -> None:
    """Raise ``ValueError`` naming the first listed file missing or unlike the manifest."""
    for f in manifest.files:
        path, where = directory / f.name, f"checkpoint {directory}: file {f.name} (rank {f.rank}, device {f.device})"
        if not path.is_file():
            raise ValueError(f"{where} is missing; copy it from device {f.device}")
        size, digest = path.stat().st_size, sha256_file(path)
        if size != f.bytes or digest != f.sha256:
            raise ValueError(f"{where} has {size} bytes and sha256 {digest[:16]}…, the manifest says {f.bytes} "
                             f"and {f.sha256[:16]}…: corrupt or changed; copy it again from device {f.device}")


def _tp_world(layout: str, family: str) -> int | None:
    """World size of a ``tp-gpt2/<W>`` layout, ``None`` for ``canonical``."""
    if layout == "canonical":
        return None
    kind, _, world = layout.partition("/")
    if kind != "tp-gpt2" or not world.isdigit() or int(world) < 1 or family != "gpt2":
        raise ValueError(f"checkpoint layout {layout!r} cannot be read for a {family} model; "
                         "this export reads canonical, and tp-gpt2/<W> for gpt2")
    return int(world)


def _build(manifest, saved: dict, weights: str | None, seed: int):
    """The run's model on CPU: the preset sized to the saved vocabulary, or the weights dir's config."""
    if weights is None and manifest.model not in PRESETS and not os.path.isdir(manifest.model):
        raise ValueError(f"the run's model {manifest.model!r} is not a preset: it started from a Hugging "
                         "Face directory. Fix: pass --weights with that directory")
    if weights is not None or manifest.model not in PRESETS:
        return build_model(manifest.model, weights=weights, seed=seed)
    # A run may size the embedding to its tokenizer: take the vocabulary the checkpoint
    # holds, found through a model built on meta (no memory)
    probe = build_model(manifest.model, parts=[])
    embedding = probe.hf.get_input_embeddings().weight
    meta = saved.get("model/" + next(n for n, p in probe.named_parameters() if p is embedding))
    return build_model(manifest.model, vocab_size=int(meta.size[0]) if meta is not None else None,
                       seed=seed)


def load_checkpoint_model(directory: Path, manifest, weights: str | None = None, seed: int = 0):
    """The run's ``StagedModel`` (CPU, eval) holding the checkpoint's ``model/*`` tensors in
    the one-device (HF) layout.  ``ValueError``: a parameter missing or of another shape
    (named), or a layout this export cannot read."""
    reader = dcp.FileSystemReader(directory)
    saved = reader.read_metadata().state_dict_metadata
    model = _build(manifest, saved, weights, seed)
    world = _tp_world(manifest.layout, model.family)
    # tp-gpt2 converts every Conv1D of the layers (TensorParallel._convert_gpt2_layer):
    # found by type, so this cannot drift from the model.  Value: is it q/k/v (permuted)?
    converted = {f"hf.{m}.{kind}": m.endswith("attn.c_attn") for m, mod in model.hf.named_modules()
                 if isinstance(mod, Conv1D) for kind in ("weight", "bias")} if world else {}
    params = dict(model.named_parameters())
    wanted: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        key = f"model/{name}"
        if key not in saved:
            raise ValueError(f"checkpoint {directory} has no tensor for parameter {name!r} (model "
                             f"{manifest.model}); is it a checkpoint of this model?")
        size = tuple(saved[key].size)
        expect = tuple(p.shape)[::-1] if name in converted else tuple(p.shape)  # Linear: [out, in]
        if size != expect:
            raise ValueError(f"checkpoint {directory}: {name!r} has shape {list(size)}, the model "
                             f"({manifest.model}, layout {manifest.layout}) expects {list(expect)}")
        # Allocated by the saved sizes: DCP fills whole tensors from every rank's pieces
        wanted[key] = torch.empty(size, dtype=saved[key].properties.dtype)
    with warnings.catch_warnings():  # DCP warns that it loads in one process: what we ask for
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    inverse = torch.argsort(qkv_permutation(model.hidden, world)) if world else None
    with torch.no_grad():
        for name, p in params.items():
            t = wanted[f"model/{name}"]
            if converted.get(name):
                t = t[inverse]  # rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] back to [q | k | v]
            if name in converted and t.dim() == 2:
                t = t.t()       # back to Conv1D's [in, out]
            p.copy_(t)
    return model.eval()


def _wrap(tok: Tokenizer, family: str, seq_len: int) -> PreTrainedTokenizerFast:
    """An HF fast tokenizer around a ``tokenizers`` one, encoding as the run did.

    The run encodes ``[CLS] q [SEP] s [SEP]`` padded to ``seq_len``, on the left for causal
    families (their head pools the last position): the post-processor and padding side
    make ``tok(q, s, padding="max_length")`` give the same ids.  Truncation may differ by
    a token: HF's ``longest_first`` shortens the question on a tie, the run the sentence.
    """
    tok = Tokenizer.from_str(tok.to_str())  # a copy: leave the caller's alone
    tok.no_truncation()
    tok.no_padding()
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {role: next(n for n in names if n in vocab) for role, names in (
        ("cls_token", CLS_NAMES), ("sep_token", SEP_NAMES), ("pad_token", PAD_NAMES), ("unk_token", ("[UNK]",)))
        if any(n in vocab for n in names)}
    if tok.post_processor is None and {"cls_token", "sep_token"} <= set(special):
        cls, sep = special["cls_token"], special["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    side = "left" if family in CAUSAL_FAMILIES else "right"
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=seq_len, padding_side=side, **special)


def _write_tokenizer(tmp: Path, family: str, vocab_size: int, dataset: str | None, tokenizer: str | None,
                     seq_len: int) -> tuple[str | None, str | None]:
    """Write the run's tokenizer into ``tmp``; returns ``(how, why there is none)``."""
    if tokenizer is not None:
        src = Path(tokenizer)
        if (src / "tokenizer_config.json").is_file():  # a complete HF tokenizer: kept as it is
            for name in _TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        else:  # a bare tokenizer.json (workers.data.save_tokenizer): AutoTokenizer needs the config
            _wrap(load_tokenizer(src), family, seq_len).save_pretrained(str(tmp))
        return "copied", None
    if dataset is not None:
        # What workers.data.load_dataset trains (deterministically) for the run
        rows = read_qnli(dataset)
        tok = train_tokenizer([t for r in rows for t in (r.question, r.sentence)], vocab_size)
        _wrap(tok, family, seq_len).save_pretrained(str(tmp))
        return "trained", None
    return None, ("the run trained on generated token ids (no dataset, no tokenizer): there is no text "
                  "vocabulary to export; feed the model token ids, or train on a dataset")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out} exists and is not empty; pass overwrite=True "
                         "(--overwrite) to replace it")


def export(checkpoint_dir: str | Path, out_dir: str | Path, *, weights: str | None = None,
           dataset: str | None = None, tokenizer: str | None = None, seq_len: int = RunSettings.seq_len,
           seed: int = 0, overwrite: bool = False) -> ExportResult:
    """Write a checkpoint's model as a Hugging Face directory.

    Parameters
    ----------
    checkpoint_dir
        A complete checkpoint: ``manifest.json`` and every rank's files in one directory.
    out_dir
        Gets ``config.json``, ``model.safetensors``, tokenizer files, ``edgetrain.json``.
    weights, dataset, tokenizer
        The run's settings of these names (local paths): ``weights`` gives the architecture
        of a run that started from an HF directory; the tokenizer is the ``tokenizer``
        directory's, else the one the run trained from ``dataset``, else none.
    seq_len, seed
        The run's: the tokenizer's ``model_max_length``; the seed the model is built with
        before the checkpoint overwrites every parameter.
    overwrite
        Replace a non-empty ``out_dir``.

    Raises
    ------
    ValueError
        A corrupt checkpoint (the file named), a non-empty ``out_dir`` without ``overwrite``.
    """
    t0 = time.perf_counter()
    src, out = (Path(os.path.expanduser(str(d))).resolve() for d in (checkpoint_dir, out_dir))
    _check_out(out, overwrite)  # before the slow part
    manifest = read_manifest(src)
    verify_files(src, manifest)
    model = load_checkpoint_model(src, manifest, weights, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside out_dir: the same filesystem, so the final rename is atomic.  Not mkdtemp:
    # the export is the user's, with the umask's modes, not 0700
    tmp, old = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}", None
    tmp.mkdir()
    try:
        model.hf.save_pretrained(str(tmp))  # transformers 5: config.json + model.safetensors, always
        how, why = _write_tokenizer(tmp, model.family, model.preset.vocab_size, dataset, tokenizer, seq_len)
        for f in tmp.iterdir():  # transformers writes model.safetensors 0600 (a temp file renamed)
            f.chmod(tmp.stat().st_mode & 0o666)
        result = ExportResult(str(out), str(src), manifest.run_id, manifest.step, manifest.kind, manifest.model,
                              model.family, manifest.layout, manifest.parallelism, manifest.world_size, how, why,
                              {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()})
        note = {k: v for k, v in asdict(result).items() if k not in ("out_dir", "seconds")}
        note.update(format=1, weights=weights, dataset=dataset, tokenizer_dir=tokenizer, seq_len=seq_len)
        (tmp / NOTE_NAME).write_text(json.dumps(note, indent=1, sort_keys=True) + "\n")
        _check_out(out, overwrite)  # again: something may have appeared meanwhile
        if out.is_dir():  # rename() replaces only an empty directory: move the old one aside
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 1, as for every other failure
        self.exit(1, f"export failed: {message}\n")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="workers.export", description="a checkpoint as a Hugging Face directory")
    ap.add_argument("--checkpoint", required=True, help="a step-NNNNNNNN directory with manifest.json")
    ap.add_argument("--out", required=True)
    for name in ("weights", "dataset", "tokenizer"):  # the run's settings of these names
        ap.add_argument(f"--{name}")
    for name, default in (("seq-len", RunSettings.seq_len), ("seed", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()  # stderr is for the one-line error
    try:
        result = export(args.checkpoint, args.out, weights=args.weights, dataset=args.dataset,
                        tokenizer=args.tokenizer, seq_len=args.seq_len, seed=args.seed, overwrite=args.overwrite)
    except Exception as exc:  # noqa: BLE001 - one line for the controller, whatever failed
        print(f"export failed: {type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
