"""Export: a real run's checkpoint comes home as a Hugging Face directory.

The checkpoints come from real worker processes (``python -m workers.train``, two gloo
ranks each): a DP run on generated data and a TP run (the ``tp-gpt2/2`` layout:
transposed, q/k/v rows re-ordered) on a QNLI file.  The exported directories are checked
against the checkpoint's own tensors, against one-device training, against the losses the
workers reported, and by starting a new run from one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.equiv import reference
from workers.checkpoint_manifest import CheckpointFile, Manifest, step_dirname
from workers.config import JobConfig
from workers.data import global_batch, load_dataset, read_qnli, save_tokenizer, split_eval, train_tokenizer
from workers.dist import free_port
from workers.export import export, main
from workers.models import build_model
from workers.parallel.tp import qkv_permutation
from workers.qnli import generate_qnli

ROOT = Path(__file__).resolve().parent.parent
B, S, SEED, VOCAB, WIDTH = 16, 16, 0, 1000, 64  # tiny-gpt2: vocabulary 1000, width 64

pytestmark = [pytest.mark.slow,
              # the test reads checkpoints in one process on purpose, as the export does
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


def _cfg(run_id: str, parallelism: str, world: int, steps: int, checkpoint_dir: str = "", **extra) -> JobConfig:
    return JobConfig(run_id=run_id, world_size=world, master_addr="127.0.0.1", master_port=free_port(),
                     addrs=[f"127.0.0.{i + 1}" for i in range(world)], devices=[f"d{i}" for i in range(world)],
                     model="tiny-gpt2", parallelism=parallelism, batch_size=B, seq_len=S, steps=steps,
                     sync_every=2, checkpoint_dir=checkpoint_dir, checkpoint_every=2, eval_every=0, threads=1,
                     timeout_s=60, seed=SEED, **extra)


def _start(cfg: JobConfig) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "workers.train", "--rank", str(r), "--config-b64", cfg.to_b64()],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True) for r in range(cfg.world_size)]


def _finish(procs: list[subprocess.Popen]) -> list[list[dict]]:
    """Each rank's telemetry records; fails on a rank that did not end cleanly."""
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=240)
            records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            errors = [r for r in records if r["type"] in ("error", "oom")]
            assert p.returncode == 0 and not errors, f"worker failed ({p.returncode}): {errors}"
            out.append(records)
    finally:
        _kill(procs)  # a failed or hung rank leaves its peers waiting
    return out


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _loss_at(ranks: list[list[dict]], it: int) -> float:
    """The global-batch loss of iteration ``it``: the mean over equal rank slices (DP), or
    the loss every rank reports alike (TP)."""
    losses = [r["loss"] for recs in ranks for r in recs if r["type"] == "step" and r["step"] == it]
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A DP run (generated data, 4 steps: checkpoints at 2 and 4) and a TP run (QNLI, 3
    steps: checkpoints at 2 and 3), both 2 ranks, run side by side."""
    root = tmp_path_factory.mktemp("runs")
    qnli = generate_qnli(root / "qnli.tsv", n_rows=256, seed=SEED)
    dp = _cfg("export-dp", "dp", 2, 4, str(root / "dp"))
    tp = _cfg("export-tp", "tp", 2, 3, str(root / "tp"), dataset=str(qnli))
    procs = {"dp": _start(dp), "tp": _start(tp)}  # side by side: half the wall time
    try:
        records = {name: _finish(p) for name, p in procs.items()}
    finally:
        _kill(procs["tp"])  # still running when the DP run failed
    return {"root": root, "qnli": str(qnli), "dp_cfg": dp, "tp_cfg": tp, "dp": records["dp"], "tp": records["tp"],
            "dp2": root / "dp" / step_dirname(2), "tp2": root / "tp" / step_dirname(2),
            "tp3": root / "tp" / step_dirname(3)}


@pytest.fixture(scope="module")
def dp_export(runs):
    """The DP step-2 checkpoint exported the way the controller does: the CLI, a subprocess."""
    out = runs["root"] / "export-dp"
    proc = subprocess.run([sys.executable, "-m", "workers.export", "--checkpoint", str(runs["dp2"]),
                           "--out", str(out), "--seq-len", str(S)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return out, json.loads(lines[0])


def _saved_model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every ``model/*`` tensor of a checkpoint, whole, read in this process."""
    reader = dcp.FileSystemReader(directory)
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model/")}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len("model/hf."):]: t for k, t in state.items()}


def _hf(directory: Path):
    model, info = AutoModelForSequenceClassification.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- DP


def test_dp_export_holds_the_checkpoint_and_the_trained_model(runs, dp_export):
    out, result = dp_export
    assert (result["step"], result["layout"], result["tokenizer"]) == (2, "canonical", None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "edgetrain.json", "model.safetensors"]
    note = json.loads((out / "edgetrain.json").read_text())
    assert (note["run_id"], note["step"], note["parallelism"], note["world_size"]) == ("export-dp", 2, "dp", 2)
    assert note["checkpoint"] == str(runs["dp2"].resolve())
    assert "generated token ids" in note["no_tokenizer"]
    assert note["files"] == result["files"] == {n: _sha256(out / n) for n in ("config.json", "model.safetensors")}

    hf = _hf(out)
    saved = _saved_model_tensors(runs["dp2"])
    params = dict(hf.named_parameters())
    assert set(saved) == set(params)
    for name, t in saved.items():
        assert torch.equal(params[name].detach(), t), name

    data, _ = split_eval(load_dataset(None, "gpt2", VOCAB, S, SEED)[0], SEED)  # what the workers train on
    ids, labels = global_batch(data, 2, B, SEED)  # the batch of iteration 2: trained on step-2 parameters
    staged = build_model("tiny-gpt2", weights=str(out)).eval()
    with torch.no_grad():
        hf_out = hf(ids, labels=labels)
        logits = staged(ids)
    torch.testing.assert_close(hf_out.logits, logits, rtol=0, atol=1e-6)
    loss = float(F.cross_entropy(logits, labels))
    assert float(hf_out.loss) == pytest.approx(loss, rel=1e-6)
    # ... and it is the loss the two workers computed on the trained parameters
    assert loss == pytest.approx(_loss_at(runs["dp"], 2), rel=1e-5)


def test_a_new_run_starts_from_the_export(runs, dp_export):
    out, _ = dp_export
    cfg = _cfg("from-export", "dp", 1, 1, weights=str(out))
    first = _loss_at(_finish(_start(cfg)), 0)
    data, _ = split_eval(load_dataset(None, "gpt2", VOCAB, S, SEED)[0], SEED)
    ids, labels = global_batch(data, 0, B, SEED)
    with torch.no_grad():
        expected = float(_hf(out)(ids, labels=labels).loss)
    assert first == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- TP


def test_tp_export_undoes_the_layout(runs, tmp_path):
    out = tmp_path / "tp"
    result = export(runs["tp3"], out, dataset=runs["qnli"], seq_len=S)
    assert (result.layout, result.step, result.tokenizer) == ("tp-gpt2/2", 3, "trained")
    exported = {name: p.detach() for name, p in _hf(out).named_parameters()}
    # One-device training on the same batches: TP differs only in summation order.
    # atol = lr / 10 for the key biases, whose exact gradient is zero (see test_parallel_tp_sp).
    _, ref, _ = reference(runs["tp_cfg"])
    ref = {name[len("hf."):]: t for name, t in ref.items()}
    assert set(exported) == set(ref)
    for name, t in exported.items():
        torch.testing.assert_close(t, ref[name], rtol=1e-4, atol=1e-4, msg=name)
    # The check has teeth: the saved tensors with either undo step left out are far off
    saved = _saved_model_tensors(runs["tp3"])
    qkv, proj = "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"
    assert saved[qkv].shape == ref[qkv].shape[::-1]
    assert not torch.allclose(saved[qkv].t(), ref[qkv], rtol=1e-2, atol=1e-3)  # not un-permuted
    assert saved[proj].shape == ref[proj].shape  # square: a missing transpose keeps the shape
    assert not torch.allclose(saved[proj], ref[proj], rtol=1e-2, atol=1e-3)
    inverse = torch.argsort(qkv_permutation(WIDTH, 2))
    torch.testing.assert_close(saved[qkv][inverse].t(), exported[qkv], rtol=0, atol=0)


def test_tp_export_gives_the_loss_the_workers_trained_with(runs, tmp_path):
    out = tmp_path / "tp2"
    export(runs["tp2"], out, dataset=runs["qnli"], seq_len=S)
    data, _ = split_eval(load_dataset(runs["qnli"], "gpt2", VOCAB, S, SEED)[0], SEED)
    ids, labels = global_batch(data, 2, B, SEED)
    with torch.no_grad():
        loss = float(_hf(out)(ids, labels=labels).loss)
    assert loss == pytest.approx(_loss_at(runs["tp"], 2), rel=1e-5)


def test_exported_tokenizer_encodes_like_the_run(runs, tmp_path):
    out = tmp_path / "tok"
    export(runs["tp3"], out, dataset=runs["qnli"], seq_len=S)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.model_max_length == S and tok.padding_side == "left"  # gpt2 pools the last position
    rows = read_qnli(runs["qnli"])
    long = 64  # no row needs truncation at 64 tokens (HF breaks truncation ties differently)
    enc = tok([r.question for r in rows], [r.sentence for r in rows], padding="max_length", max_length=long)
    run_data, _ = load_dataset(runs["qnli"], "gpt2", VOCAB, long, SEED)
    assert torch.equal(torch.tensor(enc["input_ids"]), run_data.input_ids)
    # and the directory serves as a new run's --tokenizer: the same data as the run's
    again, vocab = load_dataset(runs["qnli"], "gpt2", VOCAB, S, SEED, tokenizer_dir=str(out))
    first, first_vocab = load_dataset(runs["qnli"], "gpt2", VOCAB, S, SEED)
    assert torch.equal(again.input_ids, first.input_ids) and vocab == first_vocab

    # A run given a bare tokenizer.json directory: copied, made loadable by AutoTokenizer
    bare = save_tokenizer(train_tokenizer([r.question for r in rows], 300), tmp_path / "bare")
    result = export(runs["dp2"], tmp_path / "copied", tokenizer=str(bare), seq_len=S)
    assert result.tokenizer == "copied" and result.no_tokenizer is None
    copied = AutoTokenizer.from_pretrained(str(tmp_path / "copied"))
    assert copied("what is it")["input_ids"][0] == copied.cls_token_id == 2


# --------------------------------------------------------------------------- failures


def test_tampered_checkpoint_is_refused_naming_the_file(runs, tmp_path, capsys):
    bad = tmp_path / "ck"
    shutil.copytree(runs["dp2"], bad)
    victim = bad / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"__1_0\.distcp \(rank 1, device d1\).*sha256"):
        export(bad, tmp_path / "out")
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "__1_0.distcp" in captured.err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    with pytest.raises(SystemExit) as usage:  # a usage error: exit 1 too
        main(["--out", str(tmp_path / "out")])
    assert usage.value.code == 1 and "--checkpoint" in capsys.readouterr().err


def test_existing_output_needs_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    export(runs["dp2"], out)  # an empty directory is fine
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty.*overwrite"):
        export(runs["dp2"], out)
    assert (out / "mine.txt").read_text() == "keep"
    # A failure after the model is written (a tokenizer directory that is not there)
    # leaves the previous directory as it was and no temp directory behind
    with pytest.raises(ValueError, match="nowhere"):
        export(runs["dp2"], out, tokenizer=str(tmp_path / "nowhere"), overwrite=True)
    assert (out / "mine.txt").read_text() == "keep" and _leftovers(tmp_path) == []
    result = export(runs["dp2"], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*result.files, "edgetrain.json"])
    assert _leftovers(tmp_path) == []


def test_a_run_from_weights_is_built_from_them(runs, dp_export, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(runs["dp2"], ck)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["model"] = "my-finetune"  # what a run started from a weights directory records
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="--weights"):
        export(ck, tmp_path / "out")
    # the manifest's sha256 covers the DCP files, not the manifest itself
    export(ck, tmp_path / "out", weights=str(dp_export[0]))
    saved = _saved_model_tensors(ck)
    for name, p in _hf(tmp_path / "out").named_parameters():
        assert torch.equal(p.detach(), saved[name]), name


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-opt"])
def test_other_families_export(name, tmp_path):
    """bert and opt (projected embeddings, post-LN) in the canonical layout.  The checkpoint
    is written in this process with DCP, in the format ``workers.checkpoint`` writes:
    cheaper than two more worker runs, and the layout has nothing rank-specific to undo."""
    model = build_model(name, seed=3).eval()
    with torch.no_grad():  # off the seeded init, so a parameter left at its init shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ck = tmp_path / "ck"
    dcp.save({f"model/{n}": p.detach() for n, p in model.named_parameters()},
             storage_writer=dcp.FileSystemWriter(ck), no_dist=True)
    files = [CheckpointFile(f.name, 0, "d0", f.stat().st_size, _sha256(f)) for f in ck.iterdir()]
    (ck / "manifest.json").write_text(Manifest("r", 1, "final", 1, ["d0"], "dp", name, "canonical", files).to_json())
    export(ck, tmp_path / "out")
    ids = torch.randint(6, VOCAB, (4, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "out")(ids).logits, model(ids), rtol=0, atol=1e-6)
