"""Tests for workers.data: QNLI reading/generation, tokenizer, encoding and batching."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from workers.data import (
    IGNORE_LABEL,
    Encoded,
    QnliRow,
    encode_qnli,
    generate_qnli,
    global_batch,
    load_dataset,
    load_tokenizer,
    read_qnli,
    save_tokenizer,
    synthetic,
    train_tokenizer,
)

PAD, UNK, CLS, SEP = 0, 1, 2, 3


@pytest.fixture(scope="module")
def qnli_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_qnli(tmp_path_factory.mktemp("qnli") / "train.tsv", n_rows=512, seed=0)


@pytest.fixture(scope="module")
def rows(qnli_file: Path) -> list[QnliRow]:
    return read_qnli(qnli_file)


@pytest.fixture(scope="module")
def tokenizer(rows: list[QnliRow]):
    return train_tokenizer([t for r in rows for t in (r.question, r.sentence)], vocab_size=1000)


def test_generated_file_reads_back(qnli_file: Path, rows: list[QnliRow], tmp_path: Path) -> None:
    assert len(rows) == 512
    assert qnli_file.read_text().splitlines()[0] == "index\tquestion\tsentence\tlabel"
    assert {r.label for r in rows} == {0, 1}
    assert 0.4 < sum(r.label for r in rows) / len(rows) < 0.6
    assert all(r.question.endswith("?") and r.sentence.endswith(".") for r in rows)
    again = generate_qnli(tmp_path / "again.tsv", n_rows=512, seed=0)
    assert again.read_bytes() == qnli_file.read_bytes()
    other = generate_qnli(tmp_path / "other.tsv", n_rows=512, seed=1)
    assert other.read_bytes() != qnli_file.read_bytes()


def test_average_length(rows: list[QnliRow], tokenizer) -> None:
    q = tokenizer.encode_batch([r.question for r in rows], add_special_tokens=False)
    s = tokenizer.encode_batch([r.sentence for r in rows], add_special_tokens=False)
    lengths = [len(a.ids) + len(b.ids) + 3 for a, b in zip(q, s)]  # + [CLS] [SEP] [SEP]
    assert 24 <= statistics.mean(lengths) <= 40
    assert all(UNK not in a.ids + b.ids for a, b in zip(q, s))


HEAD = "index\tquestion\tsentence\tlabel\n"


@pytest.mark.parametrize("text,where,problem", [
    ("", ":1:", "missing header"),
    ("id\tq\ts\tlabel\n0\ta?\tb.\tentailment\n", ":1:", "missing header"),
    (HEAD + "0\ta?\tb.\tentailment\n1\tc?\td.\n", ":3:", "expected 4 tab-separated columns.*found 3"),
    (HEAD + "0\ta?\tb.\tentailment\n1\tc?\td.\tmaybe\n", ":3:", "unknown label 'maybe'"),
    (HEAD + "0\t\tb.\tentailment\n", ":2:", "empty question"),
    (HEAD + "0\ta?\tb.\tentailment\textra\n", ":2:", "found 5"),
])
def test_read_errors(tmp_path: Path, text: str, where: str, problem: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"bad.tsv{where}.*{problem}"):
        read_qnli(path)


def test_test_split_without_labels(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("index\tquestion\tsentence\n0\tWhere is it?\tIt is here.\n\n")
    rows = read_qnli(path)
    assert rows == [QnliRow("0", "Where is it?", "It is here.", None)]
    assert encode_qnli(rows, tokenizer, 16, left_pad=False).labels.tolist() == [IGNORE_LABEL]
    with pytest.raises(ValueError, match="no labels"):
        load_dataset(path, "gpt2", 1000, 16, 0)


def test_padding_sides_and_truncation(rows: list[QnliRow], tokenizer) -> None:
    short = [QnliRow("0", "Who built it?", "Anna built it.", 0)]
    left = encode_qnli(short, tokenizer, 16, left_pad=True).input_ids[0].tolist()
    right = encode_qnli(short, tokenizer, 16, left_pad=False).input_ids[0].tolist()
    real = [CLS, *tokenizer.encode("Who built it?", add_special_tokens=False).ids, SEP,
            *tokenizer.encode("Anna built it.", add_special_tokens=False).ids, SEP]
    assert left == [PAD] * (16 - len(real)) + real
    assert right == real + [PAD] * (16 - len(real))
    enc = encode_qnli(rows, tokenizer, 12, left_pad=True)  # every row is longer than 12
    assert enc.input_ids.shape == (len(rows), 12)
    assert (enc.input_ids[:, 0] == CLS).all() and (enc.input_ids[:, -1] == SEP).all()
    assert ((enc.input_ids == SEP).sum(1) == 2).all()  # both parts keep a token
    assert enc.labels.tolist() == [r.label for r in rows]


def test_tokenizer_round_trip(tmp_path: Path, rows: list[QnliRow], tokenizer) -> None:
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")] == [0, 1, 2, 3]
    assert tokenizer.get_vocab_size() <= 1000
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tok"))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    texts = [r.sentence for r in rows[:20]]
    assert [e.ids for e in loaded.encode_batch(texts)] == [e.ids for e in tokenizer.encode_batch(texts)]
    ids = loaded.encode(rows[0].question, add_special_tokens=False).ids
    assert loaded.decode(ids) == rows[0].question.lower()
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_training_is_deterministic(rows: list[QnliRow]) -> None:
    texts = [t for r in rows for t in (r.question, r.sentence)]
    assert train_tokenizer(texts, 300).to_str() == train_tokenizer(texts, 300).to_str()
    assert train_tokenizer(texts, 300).get_vocab_size() == 300


def _indexed(n: int) -> Encoded:
    return Encoded(torch.arange(n).unsqueeze(1).repeat(1, 4), torch.arange(n) % 2)


def test_global_batch_deterministic_and_covering() -> None:
    data = _indexed(12)
    one_epoch = torch.cat([global_batch(data, k, 4, seed=5)[0][:, 0] for k in range(3)])
    assert sorted(one_epoch.tolist()) == list(range(12))
    assert one_epoch.tolist() != list(range(12))  # shuffled
    x, y = global_batch(data, 1, 4, seed=5)
    assert torch.equal(x, global_batch(data, 1, 4, seed=5)[0]) and torch.equal(y, x[:, 0] % 2)
    assert not torch.equal(x, global_batch(data, 1, 4, seed=6)[0])
    # Wrapping: 10 items, batch 4 -> step 2 spans the epoch boundary; 5 steps = 2 epochs.
    data = _indexed(10)
    stream = torch.cat([global_batch(data, k, 4, seed=0)[0][:, 0] for k in range(5)]).tolist()
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    big = global_batch(data, 0, 25, seed=0)[0][:, 0].tolist()  # batch > data: 2.5 epochs
    assert big == stream + global_batch(data, 4, 5, seed=0)[0][:, 0].tolist()


def test_synthetic() -> None:
    a = synthetic(50, 64, 16, seed=3)
    assert a.input_ids.shape == (64, 16) and a.labels.shape == (64,)
    assert torch.equal(a.input_ids, synthetic(50, 64, 16, seed=3).input_ids)
    has_one = (a.input_ids == 5).any(1)
    has_zero = (a.input_ids == 4).any(1)
    assert torch.equal(has_one, a.labels == 1) and torch.equal(has_zero, a.labels == 0)
    assert int(a.input_ids.max()) < 50


def test_load_dataset(qnli_file: Path, tmp_path: Path, tokenizer) -> None:
    data, vocab = load_dataset(None, "bert", 123, 8, 0)
    assert vocab == 123 and data.input_ids.shape[1] == 8
    data, vocab = load_dataset(qnli_file, "opt", 400, 32, 0)
    assert vocab <= 400 and int(data.input_ids.max()) < vocab
    assert (data.input_ids[:, -1] == SEP).all()  # left padded for causal families
    tok_dir = save_tokenizer(tokenizer, tmp_path / "tok")
    data, vocab = load_dataset(qnli_file, "bert", 50, 32, 0, tokenizer_dir=tok_dir)
    assert vocab == tokenizer.get_vocab_size() and (data.input_ids[:, 0] == CLS).all()
