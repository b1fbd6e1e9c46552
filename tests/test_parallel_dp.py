"""DP equivalence: DDP replicas with sync every k equal one device accumulating over k.

The first optimizer step's gradients are compared too, not only the parameters: AdamW
hides a wrong gradient scale (a missing ``/k`` moved 47 of 64,000 entries past the
parameter tolerance), the gradients show it on every entry."""
from __future__ import annotations

import pytest

from tests.equiv import assert_grads_match, assert_matches, make_cfg, reference, run_parallel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model, world, k, batch", [
    ("tiny-gpt2", 2, 2, 16),
    ("tiny-bert", 3, 1, 14),   # uneven slices: 5/5/4
])
def test_dp_matches_single_device(model, world, k, batch):
    cfg = make_cfg("dp", world, model=model, steps=4, sync_every=k, batch_size=batch)
    ref_losses, ref_state, ref_grads = reference(cfg)
    ranks = run_parallel(cfg)
    for r in ranks:
        # every replica steps on the global mean gradient of the k accumulated batches
        assert_grads_match(ref_grads, [r["grads0"]])
        assert_matches(ref_state, [r["state"]])
    # the ranks' local losses average (weighted by slice) to the global loss
    from workers.engine import rank_slice
    for it, ref in enumerate(ref_losses):
        sizes = [len(range(*rank_slice(batch, r, world).indices(batch))) for r in range(world)]
        mean = sum(ranks[r]["losses"][it] * sizes[r] for r in range(world)) / batch
        assert mean == pytest.approx(ref, rel=1e-4)
