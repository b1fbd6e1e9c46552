"""QNLI files: read, write and generate GLUE-format TSVs.

Standard library only, so the controller can write a demo dataset without torch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

LABELS = ("entailment", "not_entailment")  # GLUE order: entailment = 0
HEADER = ("index", "question", "sentence", "label")


@dataclass
class QnliRow:
    """One QNLI example; ``label`` is 0 (entailment), 1 (not_entailment) or None (test split)."""

    index: str
    question: str
    sentence: str
    label: int | None


# --------------------------------------------------------------------------- reading


def read_qnli(path: str | Path) -> list[QnliRow]:
    """Read a GLUE QNLI TSV (``index, question, sentence[, label]``).

    Parameters
    ----------
    path
        The file.  The test split (no ``label`` column) is accepted: labels are None.

    Returns
    -------
    list[QnliRow]

    Raises
    ------
    ValueError
        Naming the file, the 1-based line number and the problem: missing header,
        wrong column count, unknown label, empty field.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        lines = fh.read().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}:1: missing header: expected columns {', '.join(HEADER)} "
                         "(file is empty)")
    header = tuple(lines[0].split("\t"))
    if header not in (HEADER, HEADER[:3]):
        raise ValueError(f"{path}:1: missing header: expected columns {', '.join(HEADER)} "
                         f"(label optional), found {', '.join(header)}")
    ncol = len(header)
    rows: list[QnliRow] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no row
        cols = line.split("\t")
        if len(cols) != ncol:
            raise ValueError(f"{path}:{lineno}: expected {ncol} tab-separated columns "
                             f"({', '.join(header)}), found {len(cols)}")
        for name, value in zip(header[1:3], cols[1:3]):
            if not value.strip():
                raise ValueError(f"{path}:{lineno}: empty {name}")
        label: int | None = None
        if ncol == 4:
            if cols[3] not in LABELS:
                raise ValueError(f"{path}:{lineno}: unknown label {cols[3]!r} "
                                 f"(expected {' or '.join(LABELS)})")
            label = LABELS.index(cols[3])
        rows.append(QnliRow(cols[0], cols[1], cols[2], label))
    return rows


def write_qnli(path: str | Path, rows: list[QnliRow]) -> Path:
    """Write rows as a QNLI TSV (with a label column unless every label is None)."""
    path = Path(path)
    labelled = any(r.label is not None for r in rows)
    header = HEADER if labelled else HEADER[:3]
    lines = ["\t".join(header)]
    for r in rows:
        cols = [r.index, r.question, r.sentence]
        if labelled:
            cols.append(LABELS[r.label if r.label is not None else 1])
        lines.append("\t".join(cols))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- generating

_ADJ = ("old", "great", "royal", "northern", "eastern", "little", "new", "golden", "silver",
        "ancient", "western", "southern", "grand", "quiet", "stone", "red")
_THINGS = ("bridge", "library", "cathedral", "museum", "harbor", "observatory", "university",
           "railway station", "theatre", "canal", "tower", "market", "fortress", "monastery",
           "stadium", "lighthouse", "garden", "palace", "mill", "academy")
_PLACES = ("Belvor", "Aldon", "Marwick", "Tessaly", "Orran", "Kelmouth", "Dunrae", "Varesca",
           "Pellham", "Istrand", "Coroway", "Fennick", "Lorvale", "Amberly", "Quenton", "Solvay",
           "Rhyssa", "Brackholm", "Elsmere", "Tarnow", "Greyhaven", "Hollis", "Mirebourne",
           "Ostwick")
_FIRST = ("Marta", "Henrik", "Clara", "Tomas", "Ingrid", "Felix", "Rosa", "Anton", "Lena",
          "Oskar", "Greta", "Pavel", "Irene", "Victor", "Sofia", "Emil")
_LAST = ("Holm", "Varga", "Brandt", "Lindqvist", "Moreau", "Castell", "Okafor", "Novak",
         "Petrov", "Ferreira", "Albrecht", "Sandoval", "Kowal", "Delacroix")
_BUILT = ("built", "founded", "completed", "opened", "restored", "designed")
_UNITS = ("rooms", "windows", "towers", "gates", "floors", "statues", "bells", "arches")
_RIVERS = ("Ember", "Sella", "Vorn", "Glass", "Tamber", "Lune")
_PREFIX = ("", "", "", "Records show that ", "Historians agree that ", "Locals say that ")
_SUFFIX = ("", "", ", which attracts many visitors", ", a popular meeting place",
           " and it is still famous", ", according to the city council")


def _subject(rng: random.Random) -> tuple[str, str]:
    """A subject phrase and a key that differs for different subjects."""
    adj, thing, place = rng.choice(_ADJ), rng.choice(_THINGS), rng.choice(_PLACES)
    return f"the {adj} {thing} of {place}", f"{adj}|{thing}|{place}"


def _question(rng: random.Random, rel: str, subj: str) -> str:
    verb = rng.choice(_BUILT)
    if rel == "when":
        return rng.choice((f"When was {subj} {verb}?", f"In which year was {subj} {verb}?"))
    if rel == "who":
        return rng.choice((f"Who {verb} {subj}?", f"Which architect {verb} {subj}?"))
    if rel == "where":
        return rng.choice((f"Where is {subj} located?", f"Near which river does {subj} stand?"))
    unit = rng.choice(_UNITS)
    return rng.choice((f"How many {unit} does {subj} have?", f"What is the number of {unit} in {subj}?"))


def _answer(rng: random.Random, rel: str) -> str:
    if rel == "when":
        return f"was {rng.choice(_BUILT)} in {rng.randint(1450, 1990)}"
    if rel == "who":
        return f"was {rng.choice(_BUILT)} by {rng.choice(_FIRST)} {rng.choice(_LAST)}"
    if rel == "where":
        return f"stands on the bank of the {rng.choice(_RIVERS)} river near {rng.choice(_PLACES)}"
    return f"has exactly {rng.randint(3, 90)} {rng.choice(_UNITS)}"


def generate_qnli(path: str | Path, n_rows: int = 2048, seed: int = 0) -> Path:
    """Write a QNLI-format demo dataset of generated English-like question/sentence pairs.

    A question asks one thing (when / who / where / how many) about a subject such as
    "the royal library of Belvor".  The sentence entails it when it is about the same
    subject and answers that kind of question; otherwise (half the rows) it is about
    another subject or answers another kind of question.  The label is therefore
    learnable from the text.  Pairs average about 32 tokens with the tokenizer from
    :func:`train_tokenizer`.

    Parameters
    ----------
    path
        File to write (parent directories are created).
    n_rows
        Number of examples.
    seed
        Same seed, same file (``random.Random`` is stable across Python versions).

    Returns
    -------
    Path
        ``path``.
    """
    rng = random.Random(seed)
    relations = ("when", "who", "where", "count")
    rows: list[QnliRow] = []
    for i in range(n_rows):
        rel = rng.choice(relations)
        subj, key = _subject(rng)
        label = rng.randrange(2)
        s_subj, s_rel = subj, rel
        if label == 1:
            if rng.random() < 0.5:  # another subject, same kind of answer
                while True:
                    s_subj, s_key = _subject(rng)
                    if s_key != key:
                        break
            else:  # same subject, answers a different question
                s_rel = rng.choice([r for r in relations if r != rel])
        prefix = rng.choice(_PREFIX)
        start = s_subj if prefix else s_subj[0].upper() + s_subj[1:]
        sentence = f"{prefix}{start} {_answer(rng, s_rel)}{rng.choice(_SUFFIX)}."
        rows.append(QnliRow(str(i), _question(rng, rel, subj), sentence, label))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_qnli(path, rows)
