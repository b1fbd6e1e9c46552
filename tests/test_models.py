"""Tests for workers.models: the staged view matches the HF models exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.models import PRESETS, StagedModel, build_model, param_count, pool_position

TINY = ("tiny-gpt2", "tiny-bert", "tiny-opt")


def _ids(batch: int = 3, seq: int = 16, seed: int = 1) -> torch.Tensor:
    """Token ids with no pad token (id 0), so HF pools the last position too."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (batch, seq), generator=g)


@pytest.mark.parametrize("name", TINY)
def test_staged_forward_matches_hf(name: str) -> None:
    model = build_model(name).eval()
    ids = _ids()
    with torch.no_grad():
        staged = model(ids)
        ref = model.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert staged.shape == (3, 2)
    torch.testing.assert_close(staged, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_interface_attributes(name: str) -> None:
    model = build_model(name)
    preset = PRESETS[name]
    assert isinstance(model, StagedModel)
    assert model.family == preset.family and model.preset == preset
    assert model.n_blocks == len(model.blocks) == preset.n_layer
    assert model.hidden == preset.hidden
    assert model.causal == (preset.family != "bert")
    assert model.pool_position == pool_position(preset.family)
    # The HF model owns every parameter: the staged parts add none of their own.
    hf_params = {id(p) for p in model.hf.parameters()}
    staged = [model.embed, *model.blocks, model.head]
    assert {id(p) for m in staged for p in m.parameters()} == hf_params
    assert all(b.inner is not None for b in model.blocks)


@pytest.mark.parametrize("name", TINY)
def test_causality(name: str) -> None:
    model = build_model(name).eval()
    ids = _ids(batch=2, seq=12)
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] % 999) + 1  # a different non-pad token
    with torch.no_grad():
        a = model.blocks[0](model.embed(ids))
        b = model.blocks[0](model.embed(changed))
    earlier_same = torch.allclose(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    assert earlier_same == model.causal


@pytest.mark.parametrize("name", TINY)
def test_position_offset(name: str) -> None:
    """A sequence-parallel chunk embedded with its global offset equals the full slice."""
    model = build_model(name).eval()
    ids = _ids(seq=16)
    with torch.no_grad():
        full = model.embed(ids)
        chunk = model.embed(ids[:, 10:], position_offset=10)
    torch.testing.assert_close(chunk, full[:, 10:], atol=0, rtol=0)
    with pytest.raises(ValueError, match="position"):
        model.embed(ids, position_offset=PRESETS[name].max_positions - 4)


def test_deterministic_build() -> None:
    a, b = build_model("tiny-gpt2", seed=3), build_model("tiny-gpt2", seed=3)
    c = build_model("tiny-gpt2", seed=4)
    for (na, pa), (_, pb) in zip(a.hf.named_parameters(), b.hf.named_parameters()):
        assert torch.equal(pa, pb), na
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.hf.parameters(), c.hf.parameters()))


def test_vocab_override() -> None:
    model = build_model("tiny-bert", vocab_size=321)
    assert model.hf.config.vocab_size == 321 and model.preset.vocab_size == 321
    assert model(torch.randint(0, 321, (2, 8))).shape == (2, 2)


def test_dropouts_zero_and_sdpa() -> None:
    for name in TINY:
        model = build_model(name)
        assert model.hf.config._attn_implementation == "sdpa"
        assert model.hf.config.num_labels == 2 and model.hf.config.pad_token_id == 0
        for m in model.hf.modules():
            if isinstance(m, torch.nn.Dropout):
                assert m.p == 0.0, (name, m)


@pytest.mark.parametrize("name,quoted", [("distilbert", 66e6), ("gpt2-s", 124e6),
                                         ("opt-350m", 331e6), ("gpt2-l", 774e6)])
def test_param_counts(name: str, quoted: float) -> None:
    assert abs(param_count(name) - quoted) / quoted < 0.03


def test_big_preset_positions() -> None:
    for name in ("distilbert", "gpt2-s", "opt-350m", "gpt2-l"):
        assert PRESETS[name].max_positions >= 512
    assert PRESETS["opt-350m"].word_embed_proj_dim == 512
    assert not PRESETS["opt-350m"].do_layer_norm_before


@pytest.mark.parametrize("name", TINY)
def test_weights_round_trip(name: str, tmp_path: Path) -> None:
    model = build_model(name, seed=7).eval()
    model.hf.save_pretrained(tmp_path)
    ids = _ids()
    loaded = build_model(name, weights=str(tmp_path)).eval()
    by_path = build_model(str(tmp_path)).eval()
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(loaded(ids), ref, atol=0, rtol=0)
        torch.testing.assert_close(by_path(ids), ref, atol=0, rtol=0)
    assert loaded.family == model.family and loaded.n_blocks == model.n_blocks
    assert loaded.hf.config._attn_implementation == "sdpa"


def test_bad_weights_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope.*does not exist"):
        build_model("tiny-gpt2", weights=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*config.json is missing"):
        build_model("tiny-gpt2", weights=str(empty))
    build_model("tiny-gpt2").hf.config.save_pretrained(empty)
    with pytest.raises(ValueError, match="empty.*no weights file"):
        build_model("tiny-gpt2", weights=str(empty))
    with pytest.raises(ValueError, match="bert model, but preset 'tiny-gpt2'"):
        saved = tmp_path / "bert"
        build_model("tiny-bert").hf.save_pretrained(saved)
        build_model("tiny-gpt2", weights=str(saved))


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        build_model("gpt5")


# ------------------------------------------------------------ partial materialisation


def _tensors(model: StagedModel) -> dict[str, torch.Tensor]:
    return {**dict(model.hf.named_parameters()), **dict(model.hf.named_buffers())}


def _held_keys(model: StagedModel, parts: list) -> set[str]:
    """HF names of the tensors that belong to ``parts``."""
    ids = {id(t) for p in parts for t in [*model.part_module(p).parameters(),
                                          *model.part_module(p).buffers()]}
    return {k for k, t in _tensors(model).items() if id(t) in ids}


@pytest.mark.parametrize("name", TINY)
def test_subset_equals_full_build(name: str) -> None:
    """Any subset of parts builds bit-identically to the same parts of the full model;
    the rest stays on meta (never allocated)."""
    full = _tensors(build_model(name, seed=5))
    n = PRESETS[name].n_layer
    for parts in (["embed"], [n - 1], ["head", 0], ["embed", *range(n), "head"]):
        model = build_model(name, seed=5, parts=parts)
        assert model.parts == frozenset(parts)
        held = _held_keys(model, parts)
        for key, t in _tensors(model).items():
            if key in held:
                assert not t.is_meta and torch.equal(t, full[key]), (parts, key)
            else:
                assert t.is_meta, (parts, key)


def test_bad_parts() -> None:
    with pytest.raises(ValueError, match=r"unknown model parts \[4\]"):
        build_model("tiny-gpt2", parts=[0, 4])
    with pytest.raises(ValueError, match="unknown model parts"):
        build_model("tiny-gpt2", parts=["blocks"])


@pytest.mark.parametrize("name", TINY)
def test_subset_from_weights(name: str, tmp_path: Path) -> None:
    saved = build_model(name, seed=7)
    saved.hf.save_pretrained(tmp_path)
    ref = _tensors(saved)
    part = build_model(name, weights=str(tmp_path), parts=[1, "head"], seed=99)
    built = {k for k, t in _tensors(part).items() if not t.is_meta}
    assert built == _held_keys(part, [1, "head"]) and built
    for key in built:
        assert torch.equal(_tensors(part)[key], ref[key]), key


def test_base_model_checkpoint_and_fp16(tmp_path: Path) -> None:
    """A base-model checkpoint (no ``transformer.`` prefix, no classification head, fp16)
    loads its tensors into the task model; the missing head is seeded like a fresh build."""
    src = build_model("tiny-gpt2", seed=1)
    src.hf.transformer.half().save_pretrained(tmp_path)
    loaded = build_model("tiny-gpt2", weights=str(tmp_path), seed=3)
    fresh = build_model("tiny-gpt2", seed=3)
    w = loaded.blocks[2].inner.attn.c_attn.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, src.blocks[2].inner.attn.c_attn.weight.half().float())
    assert torch.equal(loaded.hf.score.weight, fresh.hf.score.weight)
    assert torch.equal(loaded.hf.transformer.ln_f.weight, src.hf.transformer.ln_f.weight.half().float())


def test_missing_block_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_model("tiny-gpt2")
    model.hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.hf.state_dict().items() if ".h.3." not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    build_model("tiny-gpt2", weights=str(tmp_path), parts=[0, 1, 2])  # block 3 not needed
    with pytest.raises(ValueError, match=r"lacks .*h\.3\..*part 3"):
        build_model("tiny-gpt2", weights=str(tmp_path))
