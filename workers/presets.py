"""Model presets: architecture numbers only, no torch.

The controller (planner, GUI) reads these without importing torch; ``workers.models``
builds the models from them on the devices.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("gpt2", "bert", "opt")
NUM_LABELS = 2
PAD_TOKEN_ID = 0


@dataclass(frozen=True)
class Preset:
    """Architecture of one model preset.

    Attributes
    ----------
    name, family
        Preset name and one of ``gpt2``, ``bert`` (DistilBERT), ``opt``.
    n_layer, hidden, heads, ffn
        Transformer blocks, model width, attention heads, feed-forward width.
    vocab_size, max_positions
        Default vocabulary (overridable per build) and learned position table size.
    word_embed_proj_dim
        OPT only: token-embedding width when it differs from ``hidden`` (OPT-350M: 512),
        which adds ``project_in``/``project_out``; ``None`` means equal to ``hidden``.
    do_layer_norm_before
        OPT only: pre-LN (True) or post-LN (False, OPT-350M; no final layer norm then).
    """

    name: str
    family: str
    n_layer: int
    hidden: int
    heads: int
    ffn: int
    vocab_size: int
    max_positions: int
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("distilbert", "bert", 6, 768, 12, 3072, 30522, 512),
        Preset("gpt2-s", "gpt2", 12, 768, 12, 3072, 50257, 1024),
        Preset("opt-350m", "opt", 24, 1024, 16, 4096, 50272, 2048,
               word_embed_proj_dim=512, do_layer_norm_before=False),
        Preset("gpt2-l", "gpt2", 36, 1280, 20, 5120, 50257, 1024),
        Preset("tiny-bert", "bert", 2, 64, 4, 256, 1000, 128),
        Preset("tiny-gpt2", "gpt2", 4, 64, 4, 256, 1000, 128),
        # Same shape quirks as opt-350m (projected embeddings, post-LN) so tests on the
        # tiny model exercise the code paths the big one needs.
        Preset("tiny-opt", "opt", 2, 64, 4, 256, 1000, 128,
               word_embed_proj_dim=32, do_layer_norm_before=False),
    )
}
