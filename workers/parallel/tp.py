"""Tensor parallelism (Megatron-style) with DTensor on a 1-D device mesh.

Every rank runs the whole batch through every layer, holding a 1/W shard of each
layer's attention and MLP weights:

* attention is split by heads: q/k/v projections column-wise (each rank computes whole
  heads), the output projection row-wise (partial sums all-reduced);
* the MLP is split by its hidden width: first linear column-wise, second row-wise.

So each layer costs two all-reduces of ``[B, S, H]`` forward and two backward (DTensor's
``ColwiseParallel``/``RowwiseParallel`` insert them).  Embeddings, LayerNorms and the
classification head are replicated: their inputs are the all-reduced activations,
identical on every rank, and so are their gradients (the equivalence test checks this
bit for bit), so they need no collective and every rank's optimizer step keeps them
equal.

Family specifics (transformers 5.x):

* gpt2 uses ``Conv1D`` (weight ``[in, out]``) with q, k and v fused in one ``c_attn``;
  ``ColwiseParallel`` refuses ``Conv1D``.  Each ``Conv1D`` becomes an ``nn.Linear`` with the
  transposed weight, and ``c_attn``'s output columns are re-ordered from
  ``[q | k | v]`` to ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (``x_r`` = rank r's heads), so a
  contiguous column split gives each rank whole heads of q, k *and* v.  ``split_size``
  becomes H/W.  :meth:`TensorParallel.full_state` undoes both, giving tensors in the HF
  layout under the HF names.
* opt reads ``self_attn.num_heads`` in ``view(bsz, -1, num_heads, head_dim)``: left at H
  it silently folds heads into the sequence axis, so it is set to H_heads/W.
* DistilBERT's attention infers heads from the width (``view(..., -1, head_size)``);
  ``n_heads`` is set to the local count anyway so the module describes itself truly.

The HF layers' own forwards run unchanged on the local shards (the full sequence is
present, so HF's causal sdpa path is exact).  The optimizer steps every iteration.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..config import JobConfig
from ..engine import EvalCounts, StepResult, Trainer, autocast, eval_counts, loss_fn, make_optimizer
from ..materialise import TensorReader, materialise
from ..memory import release_freed_memory

# Per family: module paths inside one HF layer -> "col" / "row".
_PLANS: dict[str, dict[str, str]] = {
    "gpt2": {"attn.c_attn": "col", "attn.c_proj": "row", "mlp.c_fc": "col", "mlp.c_proj": "row"},
    "bert": {"attention.q_lin": "col", "attention.k_lin": "col", "attention.v_lin": "col",
             "attention.out_lin": "row", "ffn.lin1": "col", "ffn.lin2": "row"},
    "opt": {"self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col",
            "self_attn.out_proj": "row", "fc1": "col", "fc2": "row"},
}


def check_divisible(model_name: str, heads: int, ffn: int, world: int) -> None:
    """Raise ``ValueError`` unless heads and FFN width split evenly over ``world`` ranks."""
    if heads % world:
        raise ValueError(f"tensor parallelism splits attention by heads: model {model_name!r} has "
                         f"{heads} heads, not divisible by world size {world}")
    if ffn % world:
        raise ValueError(f"tensor parallelism splits the MLP by width: model {model_name!r} has "
                         f"FFN width {ffn}, not divisible by world size {world}")


def qkv_permutation(width: int, world: int) -> torch.Tensor:
    """Row order that turns ``[q | k | v]`` into per-rank ``[q_r k_r v_r]`` blocks.

    ``new = old[perm]``; ``width`` is the model width (each of q, k, v is that wide).
    """
    per = width // world
    idx = [part * width + r * per + torch.arange(per) for r in range(world) for part in range(3)]
    return torch.cat(idx)


def _conv_to_linear(conv: nn.Module, row_perm: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` computing what HF ``Conv1D`` does, optionally with output rows permuted."""
    weight = conv.weight.detach().t()            # Conv1D: [in, out]; Linear: [out, in]
    bias = conv.bias.detach()
    if row_perm is not None:
        weight, bias = weight[row_perm], bias[row_perm]
    lin = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return lin


class TensorParallel(Trainer):
    """Each rank holds 1/W of every layer's attention heads and MLP width."""

    def __init__(self, cfg: JobConfig, rank: int, model, device: torch.device) -> None:
        self.cfg, self.rank, self.world = cfg, rank, cfg.world_size
        preset = model.preset
        check_divisible(preset.name, preset.heads, preset.ffn, self.world)
        self.role = f"shard {rank + 1}/{self.world}"
        self.model = model
        self.device = device
        # full param name -> inverse row permutation (or None) for gpt2's converted Conv1Ds
        self._from_conv: dict[str, torch.Tensor | None] = {}
        mesh = init_device_mesh(device.type, (self.world,))
        styles = {"col": ColwiseParallel, "row": RowwiseParallel}
        plan = {path: styles[kind]() for path, kind in _PLANS[model.family].items()}
        reader = TensorReader(Path(cfg.weights)) if cfg.weights and set(range(model.n_blocks)) - model.parts \
            else None
        # Blocks are built one at a time and sharded at once (model_parts leaves them on
        # meta), so a rank's peak is its shards plus one full block, not the full model:
        # what lets a model too big for one device load under TP.
        for i, block in enumerate(model.blocks):
            if i not in model.parts:
                built = model.parts
                materialise(model, frozenset({i}), cfg.seed, reader)
                model.parts = frozenset(built | {i})
            block.to(device)
            if model.family == "gpt2":
                self._convert_gpt2_layer(i)
            self._localise_head_count(block)
            parallelize_module(block.inner, mesh, plan)
            release_freed_memory()
        self.model.to(device)
        # Sharded (DTensor) and replicated (plain) parameters in separate groups: the
        # foreach optimizer kernels (the default on CUDA) refuse a mix of the two.
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if isinstance(p, DTensor)]},
                  {"params": [p for p in params if not isinstance(p, DTensor)]}]
        self.opt = make_optimizer([g for g in groups if g["params"]], cfg)

    def _convert_gpt2_layer(self, i: int) -> None:
        layer = self.model.hf.transformer.h[i]
        perm = qkv_permutation(self.model.hidden, self.world)
        inverse = torch.argsort(perm)
        prefix = f"hf.transformer.h.{i}."
        for path in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            parent_path, attr = path.split(".")
            parent = getattr(layer, parent_path)
            is_qkv = path == "attn.c_attn"
            setattr(parent, attr, _conv_to_linear(getattr(parent, attr), perm if is_qkv else None))
            for kind in ("weight", "bias"):
                self._from_conv[f"{prefix}{path}.{kind}"] = inverse if is_qkv else None

    def _localise_head_count(self, block) -> None:
        """Set the head-count attributes the HF forward reads to this rank's share."""
        heads = self.model.preset.heads // self.world
        inner = block.inner
        if self.model.family == "gpt2":
            inner.attn.num_heads = heads
            inner.attn.split_size = heads * inner.attn.head_dim  # width of q (and k, v) here
        elif self.model.family == "opt":
            inner.self_attn.num_heads = heads
        else:
            inner.attention.n_heads = heads

    def train_step(self, it: int, ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        # every shard sees the whole batch, so activations are TP's memory peak: with
        # ``grad_accumulation`` g the batch runs in g chunks whose gradients add up to the
        # whole batch's (each chunk's summed loss over the batch size)
        n = ids.shape[0]
        g = max(1, min(self.cfg.grad_accumulation, n))
        total = 0.0
        for a, b in zip([n * i // g for i in range(g)], [n * (i + 1) // g for i in range(g)]):
            x, y = ids[a:b].to(self.device), labels[a:b].to(self.device)
            self.phase = "forward"
            with autocast(self.cfg, self.device):
                logits = self.model(x)
            loss = loss_fn(logits.float(), y) if g == 1 else \
                torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum") / n
            self.phase = "backward"
            loss.backward()
            total += float(loss.detach())
        self.phase = "optimizer"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return StepResult(loss=total, samples=ids.shape[0], local_samples=ids.shape[0], synced=True)

    def local_state(self) -> dict[str, torch.Tensor]:
        # full_state() would all-gather the whole model onto every rank: exactly what a
        # device that needs TP cannot hold
        return {n: (p.to_local() if isinstance(p, DTensor) else p).detach()
                for n, p in self.model.named_parameters()}

    def checkpoint_params(self) -> dict[str, torch.nn.Parameter]:
        # DTensor shards under the model's names.  bert and opt keep HF's nn.Linear, so
        # a shard is a slice of the one-device tensor and DCP reshards it anywhere;
        # gpt2's converted Conv1Ds are transposed and permuted per world size
        # (``checkpoint_layout``), so only TP on as many devices loads them directly.
        return dict(self.model.named_parameters())

    @property
    def checkpoint_layout(self) -> str:
        return f"tp-gpt2/{self.world}" if self.model.family == "gpt2" else "canonical"

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter as the full tensor in the HF layout, under the HF name.

        Sharded parameters are all-gathered, so every rank must call this together (in
        the same parameter order, which ``named_parameters`` guarantees).
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            t = p.detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()
            if name in self._from_conv:
                inverse = self._from_conv[name]
                if inverse is not None:
                    t = t[inverse]
                if name.endswith(".weight"):
                    t = t.t().contiguous()          # back to Conv1D's [in, out]
            out[name] = t.cpu()
        return out

    @torch.no_grad()
    def eval_batch(self, ids: torch.Tensor, labels: torch.Tensor) -> EvalCounts:
        # The sharded layers' all-reduces leave every rank with the same replicated
        # logits (as in training), so each rank counts the whole batch itself.
        self.phase = "eval"
        with autocast(self.cfg, self.device):
            logits = self.model(ids.to(self.device))
        return eval_counts(logits, labels)


def model_parts(cfg: JobConfig, rank: int) -> list:
    """Only embeddings and head up front; blocks are built and sharded one by one."""
    return ["embed", "head"]


def build(cfg: JobConfig, rank: int, model, device: torch.device) -> Trainer:
    return TensorParallel(cfg, rank, model, device)
