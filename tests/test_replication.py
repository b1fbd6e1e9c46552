"""Replication: a local dataset and local pretrained weights reach the devices over SFTP,
and the worker trains from exactly those weights on exactly that data."""
from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from app.devices.inventory import load_inventory
from app.run.jobs import prepare_run
from app.testbed.local import Testbed
from tests.test_e2e_spine import base_addr
from workers.config import RunSettings

pytestmark = pytest.mark.slow


def test_weights_and_dataset_pushed_first_loss_matches_saved_model(tmp_path):
    from workers.data import generate_qnli, global_batch, load_dataset, split_eval
    from workers.models import build_model

    weights = tmp_path / "my-tiny-gpt2"
    build_model("tiny-gpt2", seed=123).hf.save_pretrained(weights)
    data_path = generate_qnli(tmp_path / "qnli.tsv", n_rows=256, seed=5)
    settings = RunSettings(model="tiny-gpt2", weights=str(weights), dataset=str(data_path), steps=1,
                           batch_size=16, seed=7)

    async def main():
        async with Testbed(tmp_path / "tb", n_devices=1, port=0, base_addr=base_addr()) as tb:
            inv = load_inventory(tb.inventory_path)
            launcher, state = prepare_run(inv, None, settings, tmp_path / "runs")
            losses = []
            state.record.connect(lambda r: losses.append(r["loss"]) if r["type"] == "step" else None)
            outcome = await launcher.run()
            homes = [d.home for d in tb.devices]
            return outcome, state, losses, launcher.job, homes
    outcome, state, losses, job, homes = asyncio.run(main())
    assert outcome == "done", [e.message for e in state.events]
    # the job the worker got points at copies on the device, not at our files
    assert job.weights.startswith("~/") and job.dataset.startswith("~/")
    copied = list((homes[0] / ".edgetrain" / "assets").rglob("qnli.tsv"))
    assert copied and copied[0].read_bytes() == data_path.read_bytes()
    assert any(e.message.startswith("copied weights my-tiny-gpt2") for e in state.events)

    model = build_model("tiny-gpt2", weights=str(weights))
    data, _ = load_dataset(str(data_path), model.family, model.preset.vocab_size, settings.seq_len, settings.seed)
    data, _ = split_eval(data, settings.seed)  # the worker trains on the rest
    ids, labels = global_batch(data, 0, settings.batch_size, settings.seed)
    with torch.no_grad():
        expected = F.cross_entropy(model(ids), labels).item()
    assert losses[0] == pytest.approx(expected, rel=1e-5)
