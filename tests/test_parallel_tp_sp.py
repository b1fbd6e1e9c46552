"""TP and SP equivalence: sharded weights / split sequences train like one device.

Spawned tests run real gloo ranks through ``tests/equiv.py`` and compare the gradients
of the first optimizer step (sharded ones gathered) and every parameter after a few
optimizer steps with one-process training on the same global batches.  The
in-process tests pin down the pieces those runs rely on (the gpt2 q/k/v re-ordering, the
chunk-offset causal mask, the re-expressed layer forwards).
"""
from __future__ import annotations

import pytest
import torch

from tests.equiv import assert_grads_match, assert_matches, free_port, make_cfg, reference, run_parallel

# Parameters whose exact gradient is zero: a key bias adds q·b_k to every score of a
# query, which softmax ignores.  Their float "gradient" is rounding noise (~1e-9) that
# AdamW normalises into real but arbitrary updates (~1 % of lr per step), so two correct
# runs that sum in different orders disagree there.  Compared with atol = lr / 10.
# (Their gradients need no such care: the noise is far below the gradient check's atol.)
_KEY_BIAS = {"bert": "attention.k_lin.bias", "opt": "self_attn.k_proj.bias"}


def _split_key_biases(state: dict[str, torch.Tensor], family: str, width: int) -> tuple[dict, dict]:
    """(everything but key-bias entries, key-bias entries) of a full-name state dict."""
    rest, keys = {}, {}
    for name, t in state.items():
        if family == "gpt2" and name.endswith("attn.c_attn.bias"):
            rest[name + "[q,v]"] = torch.cat([t[:width], t[2 * width:]])
            keys[name + "[k]"] = t[width:2 * width]
        elif family in _KEY_BIAS and name.endswith(_KEY_BIAS[family]):
            keys[name] = t
        else:
            rest[name] = t
    return rest, keys


def _check_run(cfg, family: str, width: int) -> list[dict]:
    ref_losses, ref_state, ref_grads = reference(cfg)
    # A fresh port just before spawning: make_cfg's port sat free during the reference
    # run, long enough for a concurrent test to take it.
    cfg.master_port = free_port()
    ranks = run_parallel(cfg)
    ref_rest, ref_keys = _split_key_biases(ref_state, family, width)
    for r in ranks:
        # Gradients first: AdamW's update hides a wrong gradient scale (a sum averaged,
        # a missing or doubled all-reduce) from the parameter check below.
        assert_grads_match(ref_grads, [r["grads0"]])
        rest, keys = _split_key_biases(r["state"], family, width)
        # atol lr / 50: the same amplified rounding noise reaches entries whose summed
        # gradient nearly cancels (a tied gpt2 embedding row: 0.86e-5 with foreach AdamW,
        # 1.08e-5 with fused, over 3 steps); a wrong shard or reduction is off by ~lr.
        assert_matches(ref_rest, [rest], rtol=1e-4, atol=cfg.lr / 50)
        assert_matches(ref_keys, [keys], rtol=1e-4, atol=cfg.lr / 10)
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)
    # Replicas of every parameter (replicated ones held locally, sharded ones gathered)
    # are bit-identical across ranks: no rank drifts, no hidden all-reduce is missing.
    for r in ranks[1:]:
        for name, t in ranks[0]["state"].items():
            assert torch.equal(t, r["state"][name]), f"{name} differs between rank 0 and {r['role']}"
    return ranks


# --------------------------------------------------------------------- spawned ranks

_WIDTH = 64  # every tiny preset


@pytest.mark.slow
@pytest.mark.parametrize("model, world", [
    ("tiny-gpt2", 2),   # Conv1D -> Linear with q/k/v re-ordered
    ("tiny-bert", 2),
    ("tiny-opt", 4),    # num_heads patched (one head per rank); projected embeddings, post-LN
])
def test_tp_matches_single_device(model, world):
    cfg = make_cfg("tp", world, model=model, steps=3, batch_size=8, seq_len=16)
    ranks = _check_run(cfg, model.split("-")[1], _WIDTH)
    assert [r["role"] for r in ranks] == [f"shard {i + 1}/{world}" for i in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("model, world, seq", [
    ("tiny-gpt2", 2, 16),   # head on the last rank
    ("tiny-bert", 2, 16),   # head on rank 0, bidirectional attention
    ("tiny-opt", 4, 18),    # uneven chunks 5/5/4/4: padding in the K/V gather, causal offsets
])
def test_sp_matches_single_device(model, world, seq):
    cfg = make_cfg("sp", world, model=model, steps=3, batch_size=8, seq_len=seq)
    _check_run(cfg, model.split("-")[1], _WIDTH)


# --------------------------------------------------------------------- in process


def test_tp_rejects_indivisible_heads():
    from workers.parallel.tp import check_divisible

    with pytest.raises(ValueError, match=r"'tiny-gpt2' has 4 heads, not divisible by world size 3"):
        check_divisible("tiny-gpt2", 4, 256, 3)
    check_divisible("tiny-gpt2", 4, 256, 4)


def test_gpt2_qkv_reorder_gives_whole_heads_and_round_trips():
    from transformers.pytorch_utils import Conv1D

    from workers.parallel.tp import _conv_to_linear, qkv_permutation

    width, world = 8, 2
    perm = qkv_permutation(width, world)
    # rank 0's rows: q[0:4], k[0:4], v[0:4]; rank 1's: q[4:8], k[4:8], v[4:8]
    assert perm[:12].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    conv = Conv1D(3 * width, width)
    torch.nn.init.normal_(conv.bias)
    lin = _conv_to_linear(conv, perm)
    x = torch.randn(2, 5, width)
    torch.testing.assert_close(lin(x), conv(x)[..., perm])
    inverse = torch.argsort(perm)
    torch.testing.assert_close(lin.weight.detach()[inverse].t(), conv.weight.detach())


def test_chunk_mask_is_causal_with_offset():
    from workers.parallel._attention import make_chunk

    c = make_chunk(start=3, length=2, total=6, causal=True, gather=lambda x: x, device=torch.device("cpu"))
    assert c.mask.tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False]]
    assert make_chunk(3, 2, 6, False, lambda x: x, torch.device("cpu")).mask is None


def _whole_sequence_kv(family: str, inner, hidden: torch.Tensor) -> torch.Tensor:
    """``[k | v]`` of every position, projected as the chunk forwards project them."""
    if family == "gpt2":
        _, k, v = inner.attn.c_attn(inner.ln_1(hidden)).split(inner.attn.split_size, dim=-1)
    elif family == "bert":
        k, v = inner.attention.k_lin(hidden), inner.attention.v_lin(hidden)
    else:
        x = inner.self_attn_layer_norm(hidden) if inner.do_layer_norm_before else hidden
        k, v = inner.self_attn.k_proj(x), inner.self_attn.v_proj(x)
    return torch.cat([k, v], dim=-1)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert", "tiny-opt"])
def test_layer_forwards_match_hf_blocks(name):
    """The chunk forwards equal the HF layer on the whole sequence, and a chunk at an
    offset (positions 6..9, seeing every rank's keys through ``gather``) equals the
    matching rows: the offset mask is right for causal and bidirectional families."""
    from workers.models import build_model
    from workers.parallel._attention import LAYER_FORWARDS, make_chunk

    model = build_model(name)
    forward, cpu = LAYER_FORWARDS[model.family], torch.device("cpu")
    ids = torch.randint(1, 1000, (2, 10))
    with torch.no_grad():
        hidden = model.embed(ids)
        block = model.blocks[0]
        full = forward(block.inner, hidden, make_chunk(0, 10, 10, model.causal, lambda x: x, cpu))
        torch.testing.assert_close(full, block(hidden), rtol=1e-5, atol=1e-6)
        kv = _whole_sequence_kv(model.family, block.inner, hidden)
        part = forward(block.inner, hidden[:, 6:], make_chunk(6, 4, 10, model.causal, lambda x: kv, cpu))
        torch.testing.assert_close(part, full[:, 6:], rtol=1e-5, atol=1e-6)
