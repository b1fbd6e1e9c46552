"""QNLI data: read/generate GLUE-format TSVs, tokenize, encode, and batch identically on every rank.

Distributed runs are compared with one process, so everything here is deterministic
across processes: the generated data, the tokenizer trained on it and the global
mini-batch of each step.  Every rank computes the same global batch and takes its
slice.

Runs on devices: imports torch, tokenizers, transformers and the standard library only.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from .qnli import LABELS, QnliRow, generate_qnli, read_qnli, write_qnli  # noqa: F401 (the data API)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # ids 0..3 in trained tokenizers
IGNORE_LABEL = -100  # label of unlabeled rows (torch's cross-entropy ignore_index)
SYNTHETIC_ROWS = 2048
CAUSAL_FAMILIES = ("gpt2", "opt")

# Candidate names of special tokens in tokenizers we did not train (BERT, RoBERTa/OPT, GPT-2).
CLS_NAMES = ("[CLS]", "<s>", "<|endoftext|>")
SEP_NAMES = ("[SEP]", "</s>", "<|endoftext|>")
PAD_NAMES = ("[PAD]", "<pad>", "<|endoftext|>")


@dataclass
class Encoded:
    """Token ids ``input_ids[N, S]`` and labels ``labels[N]`` (``IGNORE_LABEL`` if unknown)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- tokenizer


def _new_wordpiece(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_tokenizer(texts: list[str], vocab_size: int = 1000) -> Tokenizer:
    """Train a lowercase WordPiece tokenizer deterministically.

    The ``tokenizers`` trainers are not deterministic: tied merges are broken by hash-map
    order, so two processes training on the same texts get different vocabularies
    (measured with tokenizers 0.23.3; huggingface/tokenizers#1794).  Each rank trains
    its own tokenizer, so the vocabulary is chosen here instead, from counts with ties
    broken by the token string: the special tokens, every character seen (plus its
    ``##`` continuation form) so any word can be encoded, then the word pieces (whole
    words, word-initial prefixes, ``##`` suffixes) that save the most characters.

    Parameters
    ----------
    texts
        Training text.
    vocab_size
        Upper bound on the vocabulary; the result is smaller when the text needs fewer.

    Returns
    -------
    tokenizers.Tokenizer
        ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3``; BERT normalizer and pre-tokenizer.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    probe = _new_wordpiece({t: i for i, t in enumerate(SPECIAL_TOKENS)})
    words: Counter[str] = Counter()
    for text in texts:
        normalized = probe.normalizer.normalize_str(text)
        words.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(normalized))
    chars: Counter[str] = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    budget = vocab_size - len(SPECIAL_TOKENS)
    # Characters by frequency (ties by character); keep room for word pieces.
    alphabet = sorted(chars, key=lambda c: (-chars[c], c))[: max(1, budget // 4)]
    vocab_list = list(SPECIAL_TOKENS)
    for c in sorted(alphabet):
        vocab_list += [c, "##" + c]
    vocab_list = vocab_list[:vocab_size]
    known = set(vocab_list)
    # Score pieces by characters saved over spelling them out; whole words count fully.
    score: Counter[str] = Counter()
    for w, n in words.items():
        if len(w) < 2 or not set(w) <= set(alphabet):
            continue
        score[w] += n * (len(w) - 1)
        for k in range(2, min(len(w), 8)):
            score[w[:k]] += n * (k - 1) // 2
            score["##" + w[-k:]] += n * (k - 1) // 2
    for piece, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab_list) >= vocab_size:
            break
        if piece not in known:
            vocab_list.append(piece)
            known.add(piece)
    return _new_wordpiece({t: i for i, t in enumerate(vocab_list)})


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Save as ``tokenizer.json`` in ``directory`` (readable by :func:`load_tokenizer`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer from a local directory.

    Parameters
    ----------
    directory
        Holds ``tokenizer.json`` (read with ``tokenizers``), or another HF tokenizer
        layout that ``transformers.AutoTokenizer`` can turn into a fast tokenizer
        (``local_files_only=True``).

    Returns
    -------
    tokenizers.Tokenizer

    Raises
    ------
    ValueError
        The directory is missing or holds no loadable tokenizer.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"tokenizer directory {str(directory)!r} does not exist")
    if (directory / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:
            raise ValueError(f"tokenizer directory {str(directory)!r}: "
                             f"cannot read tokenizer.json ({exc})") from exc
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return hf_tok.backend_tokenizer
    except Exception as exc:
        raise ValueError(f"tokenizer directory {str(directory)!r} has no tokenizer.json and "
                         f"transformers cannot load it ({exc})") from exc


def _special_id(tokenizer: Tokenizer, names: tuple[str, ...], what: str) -> int:
    for name in names:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return tid
    raise ValueError(f"tokenizer has no {what} token (tried {', '.join(names)})")


# --------------------------------------------------------------------------- encoding


def encode_qnli(rows: list[QnliRow], tokenizer: Tokenizer, seq_len: int = 32, *,
                left_pad: bool) -> Encoded:
    """Encode rows as ``[CLS] question [SEP] sentence [SEP]``, truncated/padded to ``seq_len``.

    Parameters
    ----------
    rows
        QNLI rows; unlabeled ones get label ``IGNORE_LABEL``.
    tokenizer
        Needs [CLS]/[SEP]/[PAD]-like tokens (``<s>``, ``</s>``, ``<pad>`` and GPT-2's
        ``<|endoftext|>`` are accepted too).
    seq_len
        Output length; longest-first truncation of question/sentence (each keeps at
        least one token).
    left_pad
        True for causal families (gpt2, opt), which pool the last position; False
        (right padding) for bert, which pools position 0.  Keyword-only on purpose:
        the wrong side silently makes the pooled token a pad token.

    Returns
    -------
    Encoded
    """
    if seq_len < 5:
        raise ValueError(f"seq_len {seq_len} is too short for [CLS] q [SEP] s [SEP]")
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: leave the caller's alone
        tokenizer.no_truncation()
        tokenizer.no_padding()
    cls = _special_id(tokenizer, CLS_NAMES, "[CLS]-like")
    sep = _special_id(tokenizer, SEP_NAMES, "[SEP]-like")
    pad = _special_id(tokenizer, PAD_NAMES, "[PAD]-like")
    qs = tokenizer.encode_batch([r.question for r in rows], add_special_tokens=False)
    ss = tokenizer.encode_batch([r.sentence for r in rows], add_special_tokens=False)
    budget = seq_len - 3
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    for i, (q, s) in enumerate(zip(qs, ss)):
        nq, ns = len(q.ids), len(s.ids)
        while nq + ns > budget:  # longest first, sentence on ties
            if ns >= nq:
                ns -= 1
            else:
                nq -= 1
        seq = [cls, *q.ids[:nq], sep, *s.ids[:ns], sep]
        if left_pad:
            ids[i, seq_len - len(seq):] = torch.tensor(seq)
        else:
            ids[i, : len(seq)] = torch.tensor(seq)
    labels = torch.tensor([IGNORE_LABEL if r.label is None else r.label for r in rows],
                          dtype=torch.long)
    return Encoded(ids, labels)


def synthetic(vocab_size: int, n: int, seq_len: int, seed: int) -> Encoded:
    """Random tokens with a learnable label: which of two trigger tokens the row contains.

    Tokens are drawn from ``[6, vocab_size)``; each row then gets one to three copies
    of token 5 (label 1) or token 4 (label 0) at random positions.  Ids 0..3 are left
    to the special tokens.

    Parameters
    ----------
    vocab_size, n, seq_len, seed
        Vocabulary (>= 8), rows, tokens per row, seed (same seed, same data).

    Returns
    -------
    Encoded
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size {vocab_size} is too small for synthetic data (need >= 8)")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab_size, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    copies = torch.randint(1, 4, (n,), generator=g)
    pos = torch.rand((n, seq_len), generator=g).argsort(dim=1)
    for i in range(n):
        ids[i, pos[i, : int(copies[i])]] = 4 + labels[i]
    return Encoded(ids, labels)


# --------------------------------------------------------------------------- batching


@lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # random.Random, not torch.randperm: the order must be the same on every device,
    # whatever torch build it runs, and Python's seeded shuffle is stable across versions.
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return torch.tensor(order, dtype=torch.long)


def global_batch(data: Encoded, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global mini-batch of ``step``: the same in every process.

    Example order is a seeded permutation per epoch, concatenated epoch after epoch;
    step ``k`` takes items ``[k*B, (k+1)*B)`` of that stream, so a batch may span an
    epoch boundary and every example is seen once per epoch.

    Parameters
    ----------
    data
        The whole data set.
    step, batch_size, seed
        Step (from 0), global batch size, data seed.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``input_ids[B, S]`` and ``labels[B]``; each rank then takes its own slice.
    """
    n = len(data)
    if n == 0 or batch_size <= 0 or step < 0:
        raise ValueError(f"need data, batch_size > 0 and step >= 0 (n={n}, "
                         f"batch_size={batch_size}, step={step})")
    start, end = step * batch_size, (step + 1) * batch_size
    parts = []
    for epoch in range(start // n, (end - 1) // n + 1):
        lo, hi = max(start - epoch * n, 0), min(end - epoch * n, n)
        parts.append(_epoch_order(n, seed, epoch)[lo:hi])
    idx = torch.cat(parts)
    return data.input_ids[idx], data.labels[idx]


def split_eval(data: Encoded, seed: int, fraction: float = 0.1) -> tuple[Encoded, Encoded]:
    """Hold out a deterministic evaluation set: ``(train, eval)``.

    The held-out rows are drawn from the *labelled* rows (an unlabeled row could not be
    scored); unlabeled rows stay with the training data, where cross-entropy ignores
    them.  The draw is a seeded :class:`random.Random` shuffle, so every rank of a run
    (and a one-device run with the same seed) holds out exactly the same rows.  Both
    parts keep the rows' original order: training batches are then shuffled by
    :func:`global_batch` as before, and evaluation always walks the same rows in the
    same order, so evaluations at different steps are comparable.

    Parameters
    ----------
    data
        The whole data set (from :func:`load_dataset`).
    seed
        The run's data seed.
    fraction
        Share of the labelled rows to hold out, ``0 < fraction < 1``.  At least one
        row is held out when the data has two rows or more and one of them is
        labelled; at least one row always stays for training.

    Returns
    -------
    tuple[Encoded, Encoded]
        The training rows and the evaluation rows (disjoint; together all rows).  The
        evaluation part is empty when ``data`` has fewer than two rows or no labels.

    Raises
    ------
    ValueError
        ``fraction`` outside ``(0, 1)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction {fraction} must lie strictly between 0 and 1")
    n = len(data)
    labelled = [i for i, y in enumerate(data.labels.tolist()) if y != IGNORE_LABEL]
    # A stream of its own (a string seed is hashed with SHA-512, the same in every
    # process): the hold-out does not repeat the epoch shuffles of the same seed.
    random.Random(f"edgetrain-eval-split/{seed}").shuffle(labelled)
    k = min(max(1, round(len(labelled) * fraction)), len(labelled), n - 1) if n >= 2 else 0
    held = torch.zeros(n, dtype=torch.bool)
    held[sorted(labelled[:k])] = True
    train, ev = (~held).nonzero().flatten(), held.nonzero().flatten()
    return (Encoded(data.input_ids[train], data.labels[train]),
            Encoded(data.input_ids[ev], data.labels[ev]))


def load_dataset(path: str | Path | None, family: str, vocab_size: int, seq_len: int, seed: int,
                 tokenizer_dir: str | Path | None = None) -> tuple[Encoded, int]:
    """Data for a run: generated tokens, or a QNLI TSV tokenized and encoded.

    Parameters
    ----------
    path
        QNLI TSV with labels, or None for :func:`synthetic` data (``SYNTHETIC_ROWS`` rows).
    family
        ``gpt2``/``opt`` (left padding) or ``bert`` (right padding).
    vocab_size
        Synthetic vocabulary, or the bound for a tokenizer trained on the data.
    seq_len, seed
        Tokens per example; data seed.
    tokenizer_dir
        A local tokenizer directory to use instead of training one (its own
        vocabulary size is returned, whatever ``vocab_size`` says).

    Returns
    -------
    tuple[Encoded, int]
        The data and the vocabulary size actually used (size the model to it).
    """
    if path is None:
        return synthetic(vocab_size, SYNTHETIC_ROWS, seq_len, seed), vocab_size
    rows = read_qnli(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    if any(r.label is None for r in rows):
        raise ValueError(f"{path}: has no labels (a test split?); training needs labels")
    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
    else:
        tok = train_tokenizer([t for r in rows for t in (r.question, r.sentence)], vocab_size)
    data = encode_qnli(rows, tok, seq_len, left_pad=family in CAUSAL_FAMILIES)
    return data, tok.get_vocab_size(with_added_tokens=True)
