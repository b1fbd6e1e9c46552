"""The parts a staged model is made of: embeddings, transformer blocks, classification heads.

Each wraps the Hugging Face module it came from (same parameter names), so weights load
into a stage exactly as into the whole model."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    DistilBertForSequenceClassification,
    GPT2ForSequenceClassification,
    OPTForSequenceClassification,
)

# --------------------------------------------------------------------------- embed


def _positions(input_ids: torch.Tensor, position_offset: int, max_positions: int) -> torch.Tensor:
    seq = input_ids.shape[1]
    if position_offset < 0 or position_offset + seq > max_positions:
        raise ValueError(f"positions {position_offset}..{position_offset + seq - 1} do not fit "
                         f"the model's {max_positions} position embeddings")
    return torch.arange(position_offset, position_offset + seq,
                        device=input_ids.device).unsqueeze(0)


class GPT2Embed(nn.Module):
    """Token + learned position embeddings of GPT-2 (``wte``, ``wpe``)."""

    def __init__(self, hf: GPT2ForSequenceClassification) -> None:
        super().__init__()
        self.wte = hf.transformer.wte
        self.wpe = hf.transformer.wpe
        self.drop = hf.transformer.drop
        self.max_positions = hf.config.n_positions

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        pos = _positions(input_ids, position_offset, self.max_positions)
        return self.drop(self.wte(input_ids) + self.wpe(pos))


class BertEmbed(nn.Module):
    """DistilBERT embeddings: token + position, then LayerNorm (the HF module itself)."""

    def __init__(self, hf: DistilBertForSequenceClassification) -> None:
        super().__init__()
        self.inner = hf.distilbert.embeddings
        self.max_positions = hf.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        pos = _positions(input_ids, position_offset, self.max_positions)
        return self.inner(input_ids, None, pos)


class OPTEmbed(nn.Module):
    """OPT embeddings: tokens (then ``project_in`` if present) + learned positions.

    ``OPTLearnedPositionalEmbedding`` adds its offset of 2 to the position ids itself;
    the HF model numbers unpadded positions 0..S-1, and so do we (no padding mask).
    """

    def __init__(self, hf: OPTForSequenceClassification) -> None:
        super().__init__()
        dec = hf.model.decoder
        self.embed_tokens = dec.embed_tokens
        self.embed_positions = dec.embed_positions
        self.project_in = dec.project_in
        self.max_positions = hf.config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        pos = _positions(input_ids, position_offset, self.max_positions)
        tokens = self.embed_tokens(input_ids)
        if self.project_in is not None:
            tokens = self.project_in(tokens)
        return tokens + self.embed_positions(None, 0, position_ids=pos)


# --------------------------------------------------------------------------- blocks


class Block(nn.Module):
    """One transformer layer: ``hidden[B,S,H] -> hidden[B,S,H]``, no padding mask.

    ``inner`` is the HF layer (``GPT2Block``, DistilBERT ``TransformerBlock`` or
    ``OPTDecoderLayer``).  ``is_causal`` is passed explicitly down to the attention
    function: with no mask, HF's sdpa path would otherwise fall back to the module's
    own ``is_causal`` attribute, and the eager path ignores causality entirely.
    """

    #: Recompute this block's activations in the backward pass instead of keeping them
    #: (``RunSettings.activation_checkpointing``).  Exact: the models draw no random numbers.
    checkpointing: bool = False

    def __init__(self, inner: nn.Module, causal: bool) -> None:
        super().__init__()
        self.inner = inner
        self.causal = causal

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # non-reentrant: works under DDP, DTensor hooks and pipeline stages, and
            # restores the autocast state when it recomputes
            return checkpoint(self._forward, hidden, use_reentrant=False)
        return self._forward(hidden)

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Keywords only: the layers disagree on positional order (GPT2Block's second
        # argument is past_key_values, OPTDecoderLayer's is attention_mask).
        out = self.inner(hidden, attention_mask=None, is_causal=self.causal)
        # transformers 5.x layers return a tensor; 4.x returned a tuple.
        return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------- heads


class GPT2Head(nn.Module):
    """``ln_f``, pool the last position, ``score`` -> logits[B, 2]."""

    def __init__(self, hf: GPT2ForSequenceClassification) -> None:
        super().__init__()
        self.ln_f = hf.transformer.ln_f
        self.score = hf.score

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(self.ln_f(hidden)[:, -1])


class OPTHead(nn.Module):
    """``final_layer_norm`` and ``project_out`` if present, pool last position, ``score``."""

    def __init__(self, hf: OPTForSequenceClassification) -> None:
        super().__init__()
        dec = hf.model.decoder
        self.final_layer_norm = dec.final_layer_norm
        self.project_out = dec.project_out
        self.score = hf.score

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = hidden[:, -1]  # both optional layers act per position: pool first
        if self.final_layer_norm is not None:
            pooled = self.final_layer_norm(pooled)
        if self.project_out is not None:
            pooled = self.project_out(pooled)
        return self.score(pooled)


class BertHead(nn.Module):
    """Pool position 0 ([CLS]), ``pre_classifier``, ReLU, ``classifier`` -> logits[B, 2]."""

    def __init__(self, hf: DistilBertForSequenceClassification) -> None:
        super().__init__()
        self.pre_classifier = hf.pre_classifier
        self.dropout = hf.dropout
        self.classifier = hf.classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.pre_classifier(hidden[:, 0]))
        return self.classifier(self.dropout(pooled))
