"""Parameter, FLOP and activation counts of the model presets, from their shapes alone.

The planner needs these on every settings change in the GUI, so they are closed-form
(no model is built, torch is never imported).  The counts are exact for the HF
sequence-classification models that ``workers.models`` builds (checked against
``workers.models.param_count`` in the tests); activation sizes are the tensors autograd
saves for backward, measured with ``torch.autograd.graph.saved_tensors_hooks`` on the
real blocks (``bench/plan_calibrate.py --saved``)::

    floats saved per token of one block (fp32, sdpa/flash attention on CPU: no S x S matrix)
    gpt2  8h + 5 ffn + heads + 4   (gelu_new keeps 4 ffn-sized intermediates + its input)
    bert  8h + 2 ffn + heads + 4   (exact gelu keeps its input and output)
    opt   8h + 1 ffn + heads + 4   (ReLU's output is also fc2's input)

``8h`` is the block input, two LayerNorm outputs, q/k/v, the attention output and the
residual sum; ``heads`` is the attention's log-sum-exp; ``4`` the LayerNorm statistics.
Everything here is per token (tokens = samples x sequence length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.presets import PRESETS

FP32 = 4
# Floats saved per token and block: (per h, per ffn, per head, constant); see module doc.
_SAVED_PER_TOKEN = {"gpt2": (8, 5, 1, 4), "bert": (8, 2, 1, 4), "opt": (8, 1, 1, 4)}
# Of the 8h, the tensors a Megatron tensor-parallel block shards over ranks: q/k/v (3h)
# and the attention output feeding the row-parallel projection (1h).
_SHARDED_H = 4


class UnknownModelError(KeyError):
    """A model name that is neither a preset nor described by a shape."""


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers the cost model needs (a torch-free view of a ``Preset``).

    Attributes
    ----------
    name, family
        Preset name and ``gpt2``, ``bert`` (DistilBERT) or ``opt``.
    n_layer, hidden, heads, ffn
        Blocks, width, attention heads, feed-forward width.
    vocab_size, max_positions
        Embedding table sizes.
    proj
        OPT's token-embedding width (``word_embed_proj_dim``); equals ``hidden`` otherwise.
    pre_ln
        OPT only: pre-LN has a final LayerNorm, post-LN (OPT-350M) has none.
    num_labels
        Classifier outputs (2 for QNLI).
    """

    name: str
    family: str
    n_layer: int
    hidden: int
    heads: int
    ffn: int
    vocab_size: int
    max_positions: int
    proj: int
    pre_ln: bool = True
    num_labels: int = 2

    @classmethod
    def from_preset(cls, preset: Any) -> "ModelShape":
        """Build from a ``workers.presets.Preset`` (or anything with the same fields)."""
        proj = getattr(preset, "word_embed_proj_dim", None) or preset.hidden
        return cls(name=preset.name, family=preset.family, n_layer=preset.n_layer,
                   hidden=preset.hidden, heads=preset.heads, ffn=preset.ffn,
                   vocab_size=preset.vocab_size, max_positions=preset.max_positions, proj=proj,
                   pre_ln=bool(getattr(preset, "do_layer_norm_before", True)))

    # ------------------------------------------------------------------ parameters

    def block_params(self) -> int:
        """Parameters of one block: q/k/v/out (with biases), the MLP, two LayerNorms.

        The three families share the count: GPT-2's fused ``c_attn`` is ``h x 3h``,
        DistilBERT/OPT have four ``h x h`` projections, all with biases.
        """
        h, f = self.hidden, self.ffn
        return 4 * h * h + 2 * h * f + 9 * h + f

    def embed_params(self) -> int:
        """Token and position tables (+ DistilBERT's LayerNorm, OPT's ``project_in``)."""
        h = self.hidden
        if self.family == "gpt2":
            return self.vocab_size * h + self.max_positions * h
        if self.family == "bert":
            return self.vocab_size * h + self.max_positions * h + 2 * h
        # OPT's learned positions carry an offset of 2 rows.
        n = self.vocab_size * self.proj + (self.max_positions + 2) * h
        return n + (self.proj * h if self.proj != h else 0)

    def head_params(self) -> int:
        """Final norm / pooler and the classifier (``score`` has no bias in gpt2/opt)."""
        h, c = self.hidden, self.num_labels
        if self.family == "gpt2":
            return 2 * h + h * c
        if self.family == "bert":
            return h * h + h + h * c + c
        n = self.proj * c + (2 * h if self.pre_ln else 0)
        return n + (h * self.proj if self.proj != h else 0)

    def total_params(self) -> int:
        return self.embed_params() + self.n_layer * self.block_params() + self.head_params()

    def largest_tensor_params(self) -> int:
        """Elements of the largest single parameter (the token table, nearly always).

        The single-tensor AdamW that CPU torch uses makes temporaries of one parameter
        at a time, so its transient memory scales with this, not with the whole model.
        """
        return max(self.vocab_size * self.proj, self.hidden * self.ffn, 3 * self.hidden ** 2)

    # ------------------------------------------------------------------ FLOPs

    def block_fwd_flops(self, tokens: float, seq_len: int) -> float:
        """Forward FLOPs of one block for ``tokens`` tokens of sequences of ``seq_len``.

        Matmuls: 2 FLOPs per weight per token; attention scores and weighted sum:
        ``4 * S * h`` per token (full S: the CPU flash kernel does not skip the causal
        half at the short sequences used here).
        """
        h, f = self.hidden, self.ffn
        return tokens * (2 * (4 * h * h + 2 * h * f) + 4 * seq_len * h)

    def embed_fwd_flops(self, tokens: float) -> float:
        """Lookups are free; OPT's ``project_in`` is a matmul."""
        return tokens * 2 * self.proj * self.hidden if self.family == "opt" and self.proj != self.hidden else 0.0

    def head_fwd_flops(self, samples: float) -> float:
        """The classifier sees one pooled position per sample."""
        return samples * 2 * (self.head_params())

    # ------------------------------------------------------------------ activations

    def block_saved_floats_per_token(self, tp: int = 1) -> float:
        """Floats one block saves for backward per token, with tensor parallelism ``tp``.

        Under Megatron TP the q/k/v, attention output, MLP intermediates and per-head
        statistics are sharded; the block input and LayerNorm outputs are replicated.
        """
        a_h, a_f, a_heads, a_c = _SAVED_PER_TOKEN[self.family]
        h = self.hidden
        replicated = (a_h - _SHARDED_H) * h + a_c
        sharded = _SHARDED_H * h + a_f * self.ffn + a_heads * self.heads
        return replicated + sharded / max(1, tp)

    def embed_saved_floats_per_token(self) -> float:
        """Ids (int64 = 2 floats) plus DistilBERT's LayerNorm input or OPT's ``project_in`` input."""
        if self.family == "bert":
            return self.hidden + 4.5
        if self.family == "opt" and self.proj != self.hidden:
            return self.proj + 2.5
        return 2.5

    def head_saved_floats_per_token(self) -> float:
        """GPT-2 applies ``ln_f`` to every position before pooling; the others pool first."""
        return self.hidden + 2.0 if self.family == "gpt2" else 0.0

    def boundary_floats_per_token(self) -> int:
        """Hidden state passed between pipeline stages (and gathered by SP / reduced by TP)."""
        return self.hidden


def resolve_model(model: Any) -> ModelShape:
    """A :class:`ModelShape` from a shape, a preset object or a preset name.

    Names are looked up in ``workers.presets.PRESETS`` (torch-free).

    Raises
    ------
    UnknownModelError
        For a name that is not a preset.
    """
    if isinstance(model, ModelShape):
        return model
    if not isinstance(model, str):
        return ModelShape.from_preset(model)
    if model not in PRESETS:
        raise UnknownModelError(f"unknown model {model!r}; presets: {', '.join(PRESETS)}")
    return ModelShape.from_preset(PRESETS[model])
