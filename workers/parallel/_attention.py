"""Per-family transformer-layer forwards with a pluggable key/value exchange.

Sequence parallelism runs each HF layer on a *chunk* of the sequence, with the queries of
that chunk attending to keys and values gathered from every rank.  HF's own attention
cannot do this: ``sdpa_attention_forward``, when causal with no mask and more keys than
queries, silently keeps only the first ``S`` keys.  So the layers are re-expressed here
with the HF submodules (their parameters stay where they are) and attention computed by
``F.scaled_dot_product_attention`` with an explicit boolean mask.

Each ``*_layer`` function mirrors the HF forward of one family in transformers 5.x
(``GPT2Block``, DistilBERT ``TransformerBlock``, ``OPTDecoderLayer``), dropouts omitted
(they are 0 in every preset, see ``workers.models``).  The head count is derived from
the projection's output width and the head dimension, so the functions work unchanged
on column-sharded projections too.

Imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Gathers a local [B, s, C] tensor into the [B, S, C] tensor of the whole sequence.
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SeqChunk:
    """Where this rank's chunk sits in the sequence and how to see the whole of it.

    Attributes
    ----------
    start, length, total
        First global position, number of positions of this chunk, full sequence length.
    causal
        Whether a query may only attend to keys at or before its own position.
    gather
        Collects the chunks of all ranks along the sequence dimension (autograd-aware).
    mask
        Boolean ``[length, total]`` mask (True = attend), or ``None`` for full attention;
        built once per step by :func:`make_chunk`.
    """

    start: int
    length: int
    total: int
    causal: bool
    gather: Gather
    mask: torch.Tensor | None = None


def make_chunk(start: int, length: int, total: int, causal: bool, gather: Gather,
               device: torch.device) -> SeqChunk:
    """Build a :class:`SeqChunk` with its causal mask offset by ``start``.

    Query ``i`` of the chunk is global position ``start + i``; it sees key ``j`` iff
    ``j <= start + i``.  An explicit mask is needed because sdpa's ``is_causal`` aligns
    the diagonal to the top-left corner, which is wrong whenever ``start > 0``.
    """
    mask = None
    if causal:
        q_pos = torch.arange(start, start + length, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        mask = k_pos <= q_pos
    return SeqChunk(start, length, total, causal, gather, mask)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                    scale: float, chunk: SeqChunk) -> torch.Tensor:
    """Local-query attention over the gathered keys and values.

    Parameters
    ----------
    q, k, v
        ``[B, s, C]`` projections of this chunk (``C`` = local heads x ``head_dim``).
    head_dim
        Width of one head.
    scale
        Softmax scale passed to sdpa (1.0 where the family pre-scales ``q``).
    chunk
        This rank's place in the sequence.

    Returns
    -------
    torch.Tensor
        ``[B, s, C]``, heads merged, ready for the output projection.
    """
    bsz, s, width = q.shape
    heads = width // head_dim
    # One collective for keys and values together: half the messages of two gathers.
    kv = chunk.gather(torch.cat([k, v], dim=-1))
    k_all, v_all = kv.split(width, dim=-1)

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(bsz, x.shape[1], heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split_heads(q), split_heads(k_all), split_heads(v_all),
                                         attn_mask=chunk.mask, scale=scale)
    return out.transpose(1, 2).reshape(bsz, s, width)


def gpt2_layer(layer: nn.Module, hidden: torch.Tensor, chunk: SeqChunk) -> torch.Tensor:
    """``GPT2Block`` (pre-LN) on a sequence chunk."""
    attn = layer.attn
    residual = hidden
    x = layer.ln_1(hidden)
    # c_attn's output is [q | k | v], each split_size wide (Conv1D or Linear alike).
    q, k, v = attn.c_attn(x).split(attn.split_size, dim=-1)
    a = chunk_attention(q, k, v, attn.head_dim, attn.scaling, chunk)
    hidden = residual + attn.c_proj(a)
    return hidden + layer.mlp(layer.ln_2(hidden))


def bert_layer(layer: nn.Module, hidden: torch.Tensor, chunk: SeqChunk) -> torch.Tensor:
    """DistilBERT ``TransformerBlock`` (post-LN, bidirectional) on a sequence chunk."""
    attn = layer.attention
    a = chunk_attention(attn.q_lin(hidden), attn.k_lin(hidden), attn.v_lin(hidden),
                        attn.attention_head_size, attn.scaling, chunk)
    x = layer.sa_layer_norm(attn.out_lin(a) + hidden)
    return layer.output_layer_norm(layer.ffn(x) + x)


def opt_layer(layer: nn.Module, hidden: torch.Tensor, chunk: SeqChunk) -> torch.Tensor:
    """``OPTDecoderLayer`` (pre- or post-LN per ``do_layer_norm_before``) on a chunk."""
    attn = layer.self_attn
    pre = layer.do_layer_norm_before
    residual = hidden
    x = layer.self_attn_layer_norm(hidden) if pre else hidden
    # OPT scales q before the product and calls sdpa with scale 1.0; keep that order so
    # rounding matches the one-device model.
    q = attn.q_proj(x) * attn.scaling
    a = chunk_attention(q, attn.k_proj(x), attn.v_proj(x), attn.head_dim, 1.0, chunk)
    hidden = residual + attn.out_proj(a)
    if not pre:
        hidden = layer.self_attn_layer_norm(hidden)
    residual = hidden
    x = layer.final_layer_norm(hidden) if pre else hidden
    hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))
    if not pre:
        hidden = layer.final_layer_norm(hidden)
    return hidden


LAYER_FORWARDS: dict[str, Callable[[nn.Module, torch.Tensor, SeqChunk], torch.Tensor]] = {
    "gpt2": gpt2_layer,
    "bert": bert_layer,
    "opt": opt_layer,
}
