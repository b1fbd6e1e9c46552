"""Model presets and a uniform "staged" view of HF sequence-classification models.

Every parallelism (data, tensor, sequence, pipeline) works on the same three-part view
of a model, :class:`StagedModel`::

    logits = head(blocks[n-1](... blocks[0](embed(input_ids)) ...))

``embed``, each ``blocks[i]`` and ``head`` are small wrapper modules around the HF
model's own submodules, so the HF model (``StagedModel.hf``) keeps owning every
parameter and ``hf.save_pretrained`` / ``from_pretrained`` keep working.

Conventions that distributed runs rely on:

* All dropouts are 0 (``hf_config``), so a distributed run can be compared exactly with
  one process: no random masks whose streams would differ between ranks.
* Blocks get no padding mask: pad tokens are ordinary tokens.  Causal families
  (gpt2, opt) are left-padded by ``workers.data`` so the pooled last position is real;
  bert is right-padded so the pooled first position is ``[CLS]``.
* Attention is ``sdpa``; with no mask, HF's sdpa path is causal exactly when the module
  says so, and the blocks pass ``is_causal`` explicitly as well.
* A model can be built in part (``build_model(parts=...)``): the HF model is created on
  ``meta`` and only the listed parts are allocated, each initialised from its own seed
  (``workers.materialise``), so a pipeline stage never holds the other stages' blocks.

Runs on devices: imports torch, transformers and the standard library only.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    OPTConfig,
    OPTForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from .materialise import TensorReader, check_weights_dir, materialise, part_seed  # noqa: F401 (re-exported)
from .model_parts import BertEmbed, BertHead, Block, GPT2Embed, GPT2Head, OPTEmbed, OPTHead
from .presets import FAMILIES, NUM_LABELS, PAD_TOKEN_ID, PRESETS, Preset  # noqa: F401 (re-exported)

# HF model_type -> our family name ('bert' is the DistilBERT architecture).
_MODEL_TYPES = {"gpt2": "gpt2", "distilbert": "bert", "opt": "opt"}
_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": GPT2ForSequenceClassification,
    "bert": DistilBertForSequenceClassification,
    "opt": OPTForSequenceClassification,
}


def pool_position(family: str) -> int:
    """Sequence position the classification head pools.

    Parameters
    ----------
    family
        ``gpt2``, ``bert`` or ``opt``.

    Returns
    -------
    int
        ``0`` ([CLS]) for bert, ``-1`` (last token; data is left-padded) otherwise.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return 0 if family == "bert" else -1


def hf_config(preset: Preset, vocab_size: int | None = None) -> PretrainedConfig:
    """HF config for a preset: 2 labels, all dropouts 0, sdpa attention, pad id 0.

    Dropouts are 0 so distributed runs can be compared exactly with one process (no
    random masks drawn from per-rank RNG streams).

    Parameters
    ----------
    preset
        The architecture.
    vocab_size
        Overrides ``preset.vocab_size`` (e.g. a tokenizer trained on the data).

    Returns
    -------
    PretrainedConfig
        ``GPT2Config``, ``DistilBertConfig`` or ``OPTConfig``.
    """
    vocab = vocab_size or preset.vocab_size
    common = dict(num_labels=NUM_LABELS, pad_token_id=PAD_TOKEN_ID, attn_implementation="sdpa")
    if preset.family == "gpt2":
        cfg: PretrainedConfig = GPT2Config(
            vocab_size=vocab, n_positions=preset.max_positions, n_embd=preset.hidden,
            n_layer=preset.n_layer, n_head=preset.heads, n_inner=preset.ffn,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            # GPT-2's bos/eos id 50256 is out of range for a small tokenizer's vocabulary
            # (HF warns); classification never uses them.
            bos_token_id=50256 if vocab > 50256 else None,
            eos_token_id=50256 if vocab > 50256 else None,
            **common,
        )
    elif preset.family == "bert":
        cfg = DistilBertConfig(
            vocab_size=vocab, max_position_embeddings=preset.max_positions,
            n_layers=preset.n_layer, n_heads=preset.heads, dim=preset.hidden,
            hidden_dim=preset.ffn, dropout=0.0, attention_dropout=0.0,
            seq_classif_dropout=0.0, qa_dropout=0.0, **common,
        )
    elif preset.family == "opt":
        cfg = OPTConfig(
            vocab_size=vocab, max_position_embeddings=preset.max_positions,
            hidden_size=preset.hidden, num_hidden_layers=preset.n_layer,
            num_attention_heads=preset.heads, ffn_dim=preset.ffn,
            word_embed_proj_dim=preset.word_embed_proj_dim or preset.hidden,
            do_layer_norm_before=preset.do_layer_norm_before,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
            **common,
        )
    else:
        raise ValueError(f"preset {preset.name!r} has unknown family {preset.family!r}")
    return cfg


def _zero_dropouts(cfg: PretrainedConfig) -> None:
    """Set every dropout of a loaded config to 0 (see :func:`hf_config`)."""
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "dropout",
                "attention_dropout", "seq_classif_dropout", "qa_dropout", "activation_dropout",
                "layerdrop"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)


def preset_from_config(cfg: PretrainedConfig, name: str) -> Preset:
    """Describe a loaded HF config as a :class:`Preset` named ``name``."""
    family = _MODEL_TYPES.get(cfg.model_type)
    if family == "gpt2":
        return Preset(name, family, cfg.n_layer, cfg.n_embd, cfg.n_head,
                      cfg.n_inner or 4 * cfg.n_embd, cfg.vocab_size, cfg.n_positions)
    if family == "bert":
        return Preset(name, family, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.hidden_dim,
                      cfg.vocab_size, cfg.max_position_embeddings)
    if family == "opt":
        proj = cfg.word_embed_proj_dim
        return Preset(name, family, cfg.num_hidden_layers, cfg.hidden_size,
                      cfg.num_attention_heads, cfg.ffn_dim, cfg.vocab_size,
                      cfg.max_position_embeddings,
                      word_embed_proj_dim=None if proj == cfg.hidden_size else proj,
                      do_layer_norm_before=cfg.do_layer_norm_before)
    raise ValueError(f"model_type {cfg.model_type!r} is not supported; "
                     f"expected one of {', '.join(_MODEL_TYPES)}")


# --------------------------------------------------------------------------- model


class StagedModel(nn.Module):
    """An HF sequence-classification model seen as ``embed -> blocks -> head``.

    Attributes
    ----------
    hf
        The HF ``*ForSequenceClassification`` model; it owns every parameter.
    family, preset
        ``gpt2`` / ``bert`` / ``opt`` and the architecture.
    n_blocks, hidden, causal
        Number of blocks, model width, whether attention is causal.
    embed
        ``forward(input_ids[B,S], position_offset=0) -> [B,S,H]``.
    blocks
        ``nn.ModuleList`` of :class:`Block`; ``blocks[i].inner`` is the HF layer.
    head
        ``forward(hidden[B,S,H]) -> logits[B,2]``.
    parts
        The materialised parts (``'embed'``, block indices, ``'head'``); the others'
        parameters are on the ``meta`` device (see :func:`build_model`).

    Notes
    -----
    ``embed``, ``blocks`` and ``head`` are registered as submodules too (so module
    paths such as ``blocks.0.inner`` resolve for ``parallelize_module``); their
    parameters are the HF model's, so ``parameters()`` yields each once but
    ``state_dict()`` lists aliases.  Checkpoint with ``hf.save_pretrained``.
    GPT-2/OPT sequence-classification models have no LM head, so no embedding/head
    weight tie exists to preserve across pipeline stages.
    """

    def __init__(self, hf: PreTrainedModel, preset: Preset) -> None:
        super().__init__()
        impl = hf.config._attn_implementation
        if impl != "sdpa":
            # Blocks run without a mask; only the sdpa path honours is_causal then.
            raise ValueError(f"attention implementation must be 'sdpa', got {impl!r}")
        self.hf = hf
        self.family = preset.family
        self.preset = preset
        self.causal = preset.family != "bert"
        self.hidden = preset.hidden
        if preset.family == "gpt2":
            self.embed: nn.Module = GPT2Embed(hf)
            layers = hf.transformer.h
            self.head: nn.Module = GPT2Head(hf)
        elif preset.family == "bert":
            self.embed = BertEmbed(hf)
            layers = hf.distilbert.transformer.layer
            self.head = BertHead(hf)
        else:
            self.embed = OPTEmbed(hf)
            layers = hf.model.decoder.layers
            self.head = OPTHead(hf)
        self.blocks = nn.ModuleList(Block(layer, self.causal) for layer in layers)
        self.n_blocks = len(self.blocks)
        self.parts: frozenset[Part] = frozenset(all_parts(self.n_blocks))

    def part_module(self, part: Part) -> nn.Module:
        """The module of one part: ``embed``, ``blocks[i]`` or ``head``."""
        if part == "embed":
            return self.embed
        if part == "head":
            return self.head
        return self.blocks[part]

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute every block's activations in backward (``on``) or keep them."""
        for block in self.blocks:
            block.checkpointing = on

    @property
    def pool_position(self) -> int:
        """Position the head pools (see :func:`pool_position`)."""
        return pool_position(self.family)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits[B, 2] for ``input_ids[B, S]``: ``head(blocks(embed(ids)))``."""
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


Part = int | str  # 'embed', 'head' or a block index


def all_parts(n_blocks: int) -> list[Part]:
    """Every part of a model with ``n_blocks`` blocks, in forward order."""
    return ["embed", *range(n_blocks), "head"]


def _check_parts(parts: Iterable[Part] | None, n_blocks: int) -> frozenset[Part]:
    if parts is None:
        return frozenset(all_parts(n_blocks))
    out = frozenset(parts)
    bad = [p for p in out if not (p in ("embed", "head") or (type(p) is int and 0 <= p < n_blocks))]
    if bad:
        raise ValueError(f"unknown model parts {bad!r}: expected 'embed', 'head' or block "
                         f"indices 0..{n_blocks - 1}")
    return out


def _weights_config(path: Path, name: str | None, vocab_size: int | None) -> tuple[PretrainedConfig, str]:
    """Config of a local HF directory, checked against the preset; and our family."""
    from transformers import AutoConfig

    check_weights_dir(path)
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # a broken config.json: say which directory
        raise ValueError(f"weights directory {str(path)!r}: cannot read config.json ({exc})") from exc
    family = _MODEL_TYPES.get(cfg.model_type)
    if family is None:
        raise ValueError(f"weights directory {str(path)!r} holds a {cfg.model_type!r} model; "
                         f"supported: {', '.join(_MODEL_TYPES)}")
    if name in PRESETS and PRESETS[name].family != family:
        raise ValueError(f"weights directory {str(path)!r} holds a {family} model, "
                         f"but preset {name!r} is {PRESETS[name].family}")
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise ValueError(f"weights directory {str(path)!r} has a vocabulary of {cfg.vocab_size}, "
                         f"smaller than the tokenizer's {vocab_size}")
    _zero_dropouts(cfg)
    cfg.num_labels = NUM_LABELS
    if cfg.pad_token_id is None:
        cfg.pad_token_id = PAD_TOKEN_ID
    cfg._attn_implementation = "sdpa"
    return cfg, family


def build_model(name: str, weights: str | None = None, vocab_size: int | None = None,
                seed: int = 0, parts: Iterable[Part] | None = None) -> StagedModel:
    """Build a preset with seeded random weights, or load a local HF model directory.

    Parameters
    ----------
    name
        A key of :data:`PRESETS`, or a path to a local HF model directory (then treated
        as ``weights``).
    weights
        Optional local HF directory (``config.json`` + weights); its config decides the
        architecture.  Only the tensors of the built ``parts`` are read.  A head
        missing from it (e.g. an LM checkpoint) is initialised from ``seed``.
    vocab_size
        Vocabulary for a fresh build (defaults to the preset's); with ``weights`` it
        must not exceed the checkpoint's.
    seed
        Each part is drawn under its own seed derived from ``(seed, part)``
        (:func:`part_seed`) in a forked RNG: the same seed gives identical parameters,
        the caller's RNG state is untouched.
    parts
        What to materialise: ``'embed'``, ``'head'`` and block indices; ``None`` means
        all.  The rest stays on the ``meta`` device (no memory); a part built alone is
        bit-identical to the same part of the full build.

    Returns
    -------
    StagedModel
        In train mode; materialised parts on CPU in float32, ``model.parts`` lists them.

    Raises
    ------
    ValueError
        Unknown preset or part, or a ``weights`` directory that is missing, lacks
        ``config.json`` or a weights file, holds an unsupported model, or lacks
        tensors of an embedding or block.
    """
    if weights is None and name not in PRESETS and os.path.isdir(name):
        weights = name
    if weights is None and name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)} "
                         "(or give a local Hugging Face model directory)")
    reader = None
    if weights is not None:
        path = Path(weights)
        cfg, family = _weights_config(path, name, vocab_size)
        preset = preset_from_config(cfg, name if name in PRESETS else path.name)
        try:
            reader = TensorReader(path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # a corrupt weights file
            raise ValueError(f"weights directory {str(path)!r}: cannot read the weights ({exc})") from exc
    else:
        family = PRESETS[name].family
        preset = PRESETS[name]
        if vocab_size is not None:
            preset = replace(preset, vocab_size=vocab_size)
        cfg = hf_config(preset)
    # Built on meta first: nothing is allocated until a part is materialised.
    with torch.device("meta"):
        hf = _MODEL_CLASSES[family](cfg)
    model = StagedModel(hf, preset)
    materialise(model, _check_parts(parts, model.n_blocks), seed, reader)
    model.train()
    return model


def param_count(name: str, vocab_size: int | None = None) -> int:
    """Number of parameters of a preset, without allocating it (built on ``meta``).

    Parameters
    ----------
    name
        A key of :data:`PRESETS`.
    vocab_size
        Optional vocabulary override.

    Returns
    -------
    int
        Distinct parameters of the sequence-classification model.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    with torch.device("meta"):
        hf = _MODEL_CLASSES[preset.family](hf_config(preset, vocab_size))
    return sum(p.numel() for p in hf.parameters())
