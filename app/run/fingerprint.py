"""A layout-independent fingerprint of trained parameters, compared across parallelisms.

Every worker reports in its ``done`` record, per full parameter name (the name in the
one-device model), ``[local_count, full_count, sum, sum_of_squares]`` of the tensor it
holds (``param_moments``, see ``docs/TELEMETRY.md``).  :func:`combine` assembles the whole
model's moments from all ranks, whatever the split:

* a rank holding the whole tensor (``local_count == full_count``: DP/SP/hybrid replicas,
  a PP stage, TP's replicated embeddings and norms) gives it directly; several such
  ranks are replicas and must agree;
* shards (``local_count < full_count``: TP) add up: counts, sums and sums of squares of
  the parts are those of the whole, in any layout (transposed, permuted, split).

:func:`differing` compares two fingerprints (e.g. a TP run with a one-device run).  The
tolerance is the element-wise one of ``torch.testing.assert_close``, carried over to
the moments: if every element satisfies ``|a_i - b_i| <= atol + rtol * |b_i|`` then the
difference vector has L2 norm at most ``e = atol * sqrt(n) + rtol * sqrt(sum b_i^2)``,
so the sums differ by at most ``sqrt(n) * e`` and the sums of squares by at most
``e * (2 * sqrt(sum b_i^2) + e)``.  Moments outside those bounds prove the tensors are
not element-wise close; moments inside do not prove they are (a fingerprint, not a copy).

Pure functions of plain data: no torch, no I/O.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

#: One tensor's moments: element count, sum, sum of squares.
Moments = tuple[int, float, float]


def combine(ranks: Iterable[Mapping[str, Sequence]], rtol: float = 1e-6,
            atol: float = 0.0) -> tuple[dict[str, Moments], list[str]]:
    """The full model's moments from every rank's ``param_moments``.

    Parameters
    ----------
    ranks
        One ``param_moments`` mapping per rank (any order).
    rtol, atol
        How closely replicas of a whole tensor must agree (they should be identical).

    Returns
    -------
    (moments, problems)
        Per full name, the whole tensor's moments; and one message per name whose
        replicas disagree or whose shards do not add up to the full count (such a name
        is left out of ``moments``, so a comparison reports it as differing).
    """
    whole: dict[str, list[Moments]] = {}
    shards: dict[str, list[Moments]] = {}
    full_count: dict[str, int] = {}
    for rank in ranks:
        for name, (local, full, total, squares) in rank.items():
            full_count.setdefault(name, full)
            if full != full_count[name]:
                full_count[name] = -1          # ranks disagree on the tensor's size
            (whole if local == full else shards).setdefault(name, []).append((local, total, squares))
    out: dict[str, Moments] = {}
    problems: list[str] = []
    for name in sorted(full_count):
        n = full_count[name]
        if n < 0:
            problems.append(f"{name}: ranks report different full sizes")
        elif name in whole:
            first, *others = whole[name]
            bad = [m for m in others if not close(m, first, rtol, atol)]
            if bad:
                problems.append(f"{name}: replicas disagree: {first} vs {bad[0]}")
            else:
                out[name] = first
        else:
            parts = shards[name]
            count = sum(m[0] for m in parts)
            if count != n:
                problems.append(f"{name}: shards hold {count} of {n} elements")
            else:
                out[name] = (n, math.fsum(m[1] for m in parts), math.fsum(m[2] for m in parts))
    return out, problems


def close(got: Moments, ref: Moments, rtol: float = 1e-4, atol: float = 0.0) -> bool:
    """Whether ``got`` is consistent with a tensor element-wise close to ``ref``'s
    (see the module docstring for the bounds).  Non-finite moments are never close."""
    n, total, squares = got
    n_ref, total_ref, squares_ref = ref
    if n != n_ref or not all(math.isfinite(x) for x in (total, squares, total_ref, squares_ref)):
        return False
    norm = math.sqrt(squares_ref)
    err = atol * math.sqrt(n) + rtol * norm
    return (abs(total - total_ref) <= math.sqrt(n) * err
            and abs(squares - squares_ref) <= err * (2 * norm + err))


def differing(got: Mapping[str, Moments], ref: Mapping[str, Moments], rtol: float = 1e-4,
              atol: float = 0.0, atol_for: Mapping[str, float] | None = None) -> list[str]:
    """Names whose moments differ between two fingerprints, or that only one side has.

    ``atol_for`` gives some names a looser absolute tolerance (a substring of the name
    -> atol), e.g. parameters whose exact gradient is zero and whose updates are noise.
    """
    out = []
    for name in sorted(set(got) | set(ref)):
        if name not in got or name not in ref:
            out.append(name)
            continue
        tol = max([atol] + [a for key, a in (atol_for or {}).items() if key in name])
        if not close(tuple(got[name]), tuple(ref[name]), rtol, tol):
            out.append(name)
    return out


def describe(got: Mapping[str, Moments], ref: Mapping[str, Moments], names: Iterable[str]) -> str:
    """One line per name: both sides' moments (for an assertion message or a log)."""
    return "\n".join(f"{name}: got {got.get(name)}, reference {ref.get(name)}" for name in names)
