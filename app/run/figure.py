"""The sweep as the paper's Fig. 5/6: energy and latency per sample, grouped bars per model.

A plain SVG writer (no plotting library: the controller must install without one).  Two
panels side by side, (a) energy per sample and (b) latency per sample; one group of bars
per model, one slot per cell (``single``, ``dp``, ``sp``, ...) in a fixed colour, and in
each slot the measured value (solid) beside the planner's prediction (hatched).  A cell
that ran out of memory gets a red ``OOM`` where its bar would be, as in the paper; a
predicted OOM is marked the same way in the predicted half.  A panel whose values span
more than two decades is drawn on a log scale, so a small cell is not a flat line.

Every bar and mark carries ``class`` and ``data-*`` attributes (cell, model, metric,
value), so a test or a script reads the figure back with :mod:`xml.etree`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

from app.paths import atomic_write_text

if TYPE_CHECKING:
    from app.run.sweep import SweepCell
    from workers.config import RunSettings

FONT = "DejaVu Sans, Arial, Helvetica, sans-serif"
WIDTH, HEIGHT = 1000, 420
OOM_RED = "#d62728"
INK, MUTED, GRID = "#212529", "#6c757d", "#e9ecef"
#: One colour per cell label, in the paper's order; labels not listed take the spares.
LABEL_COLOURS = {"single": "#7f7f7f", "dp": "#1f77b4", "sp": "#2ca02c", "tp": "#ff7f0e", "pp": "#9467bd",
                 "hybrid": "#8c564b"}
SPARE_COLOURS = ("#17becf", "#e377c2", "#bcbd22", "#393b79", "#637939", "#843c39")
LOG_SPAN = 100.0    # more than two decades between the smallest and largest value: log scale


@dataclass(frozen=True)
class Metric:
    """One panel: which value of a cell it shows and in which base unit."""

    key: str          # the SweepCell / CellPrediction attribute
    title: str
    unit: str         # base SI unit: 'J' or 's'


METRICS = (Metric("energy_per_sample_j", "Energy per sample", "J"),
           Metric("latency_per_sample_s", "Latency per sample", "s"))


@dataclass(frozen=True)
class Slot:
    """One cell's two bars in one panel."""

    model: str
    label: str
    measured: float | None
    predicted: float | None
    measured_oom: bool
    predicted_oom: bool
    outcome: str


# --------------------------------------------------------------------------- numbers

def _unit(vmax: float, unit: str) -> tuple[float, str]:
    """A scale and prefixed unit that put ``vmax`` in [1, 1000) (values print short)."""
    for scale, prefix in ((1.0, ""), (1e3, "m"), (1e6, "µ")):
        if vmax * scale >= 1.0:
            return scale, prefix + unit
    return 1e9, "n" + unit


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _tick_text(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.6g}"


@dataclass(frozen=True)
class Axis:
    """A panel's y axis: maps a (scaled) value to a pixel row."""

    lo: float
    hi: float
    log: bool
    ticks: tuple[float, ...]

    @classmethod
    def fit(cls, values: Sequence[float]) -> "Axis":
        vals = [v for v in values if v > 0]
        if not vals:
            return cls(0.0, 1.0, False, (0.0, 0.5, 1.0))
        vmin, vmax = min(vals), max(vals)
        if vmax / vmin > LOG_SPAN:
            # a value just above a decade would be a sliver: start a decade lower then
            lo, hi = math.floor(math.log10(vmin) - 0.3), math.ceil(math.log10(vmax))
            hi = hi if hi > lo else lo + 1
            return cls(float(lo), float(hi), True, tuple(10.0 ** e for e in range(lo, hi + 1)))
        step = _nice_step(vmax * 1.08)
        top = step * math.ceil(vmax * 1.08 / step)
        ticks = tuple(round(i * step, 12) for i in range(int(round(top / step)) + 1))
        return cls(0.0, top, False, ticks)

    def frac(self, v: float) -> float:
        """Where ``v`` sits between the bottom (0) and the top (1) of the axis."""
        if self.log:
            return (math.log10(max(v, 10 ** self.lo)) - self.lo) / (self.hi - self.lo)
        return v / self.hi if self.hi else 0.0


# --------------------------------------------------------------------------- svg pieces

def _text_w(text: str, size: float) -> float:
    """Approximate rendered width (no font metrics here): DejaVu Sans averages ~0.6 em."""
    return 0.6 * size * len(text)


def _text(x: float, y: float, text: str, size: float = 12, anchor: str = "start", fill: str = INK,
          weight: str = "normal", rotate: float = 0, cls: str = "", data: dict[str, str] | None = None) -> str:
    attrs = f'x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}"'
    if weight != "normal":
        attrs += f' font-weight="{weight}"'
    if rotate:
        attrs += f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"'
    if cls:
        attrs += f' class="{cls}"'
    for k, v in (data or {}).items():
        attrs += f" data-{k}={quoteattr(v)}"
    return f"<text {attrs}>{escape(text)}</text>"


def _hatch(x: float, y: float, w: float, h: float, step: float = 5.0) -> str:
    """Diagonal lines inside a rectangle, as one path (drawn, not an SVG pattern, so every
    renderer shows them the same way)."""
    d = []
    k = x + y + step
    while k < x + w + y + h:
        a, b = max(x, k - (y + h)), min(x + w, k - y)
        if b > a:
            d.append(f"M{a:.1f},{k - a:.1f}L{b:.1f},{k - b:.1f}")
        k += step
    return "".join(d)


def label_colours(labels: Iterable[str]) -> dict[str, str]:
    """A colour per cell label: the paper's parallelisms fixed, other labels (``pp-1f1b``)
    in order from the spares."""
    out: dict[str, str] = {}
    spare = iter(SPARE_COLOURS * 4)
    for lab in labels:
        if lab not in out:
            out[lab] = LABEL_COLOURS.get(lab) or next(spare)
    return out


def slots(cells: Sequence[SweepCell], metric: Metric, default_model: str = "") -> list[Slot]:
    """The cells as one panel's slots (the value of ``metric``, measured and predicted)."""
    return [Slot(c.model or default_model, c.label, getattr(c, metric.key), getattr(c.predicted, metric.key),
                 c.outcome == "oom", c.predicted.oom, c.outcome) for c in cells]


def _panel(x0: float, x1: float, top: float, bottom: float, metric: Metric, tag: str, data: list[Slot],
           models: list[str], labels: list[str], colours: dict[str, str]) -> list[str]:
    values = [v for s in data for v in (s.measured, s.predicted) if v is not None and v > 0]
    scale, unit = _unit(max(values), metric.unit) if values else (1.0, metric.unit)
    axis = Axis.fit([v * scale for v in values])
    h = bottom - top
    out = [f'<g class="panel" data-metric="{metric.key}" data-log="{str(axis.log).lower()}" data-unit="{unit}">']
    scale_note = "  (log scale)" if axis.log else ""
    out.append(_text(x0, top - 12, f"({tag}) {metric.title}{scale_note}", 13, weight="bold"))
    for t in axis.ticks:
        y = bottom - axis.frac(t) * h
        out.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{GRID}" stroke-width="1"/>')
        out.append(_text(x0 - 6, y + 4, _tick_text(t), 11, anchor="end", fill=MUTED))
    mid = (top + bottom) / 2
    out.append(_text(x0 - 52, mid, f"{metric.title.lower()} ({unit})", 12, anchor="middle", rotate=-90))
    group_w = (x1 - x0) / max(1, len(models))
    slot_w = group_w * 0.84 / max(1, len(labels))
    bar_w = min(24.0, slot_w * 0.42)
    by_key = {(s.model, s.label): s for s in data}
    # every slot named under its bars, or none (the legend names them all)
    label_room = all(slot_w >= _text_w(lab, 9) + 2 for lab in labels)
    for gi, model in enumerate(models):
        gx = x0 + gi * group_w + group_w * 0.08
        for si, lab in enumerate(labels):
            s = by_key.get((model, lab))
            if s is None:
                continue
            sx = gx + si * slot_w + (slot_w - 2 * bar_w) / 2
            for kind, v, oom, bx in (("measured", s.measured, s.measured_oom, sx),
                                     ("predicted", s.predicted, s.predicted_oom, sx + bar_w)):
                attrs = {"cell": lab, "model": model, "metric": metric.key, "kind": kind}
                cx = bx + bar_w / 2
                if oom:
                    out.append(_text(cx + 4, bottom - 4, "OOM", 11, fill=OOM_RED, weight="bold", rotate=-90,
                                     cls="oom", data=attrs))
                elif v is None or v <= 0:
                    why = "n/a" if kind == "predicted" else s.outcome
                    out.append(_text(cx + 4, bottom - 4, why, 10, fill=MUTED, rotate=-90, cls="missing", data=attrs))
                else:
                    bh = max(1.0, axis.frac(v * scale) * h)
                    tip = f"{model} {lab} {kind}: {v * scale:.4g} {unit}"
                    attrs["value"] = f"{v:.6g}"
                    data_attrs = "".join(f" data-{k}={quoteattr(val)}" for k, val in attrs.items())
                    colour = colours[lab]
                    if kind == "measured":
                        out.append(f'<rect class="bar measured" x="{bx:.1f}" y="{bottom - bh:.1f}" '
                                   f'width="{bar_w:.1f}" height="{bh:.1f}" fill="{colour}"{data_attrs}>'
                                   f"<title>{escape(tip)}</title></rect>")
                    else:
                        out.append(f'<rect class="bar predicted" x="{bx:.1f}" y="{bottom - bh:.1f}" '
                                   f'width="{bar_w:.1f}" height="{bh:.1f}" fill="{colour}" fill-opacity="0.12" '
                                   f'stroke="{colour}" stroke-width="1.2"{data_attrs}>'
                                   f"<title>{escape(tip)}</title></rect>")
                        path = _hatch(bx, bottom - bh, bar_w, bh)
                        if path:
                            out.append(f'<path d="{path}" stroke="{colour}" stroke-width="1" fill="none"/>')
            if label_room:
                out.append(_text(sx + bar_w, bottom + 13, lab, 9, anchor="middle", fill=MUTED))
        out.append(_text(x0 + (gi + 0.5) * group_w, bottom + 32, model, 12, anchor="middle", weight="bold"))
    for ax, ay, bx, by in ((x0, bottom, x1, bottom), (x0, top, x0, bottom)):   # the axes, over the grid
        out.append(f'<line x1="{ax:.1f}" y1="{ay:.1f}" x2="{bx:.1f}" y2="{by:.1f}" stroke="{INK}" stroke-width="1"/>')
    out.append("</g>")
    return out


def _legend(y: float, labels: list[str], colours: dict[str, str]) -> list[str]:
    """One centred row: a swatch per cell label, then measured / predicted / OOM."""
    items: list[tuple[str, str]] = [(lab, "colour") for lab in labels]
    items += [("measured", "solid"), ("predicted", "hatched"), ("out of memory", "oom")]
    widths = [14 + 6 + _text_w(t, 12) + 18 + (10 if k == "oom" else 0) for t, k in items]
    x = max(10.0, (WIDTH - sum(widths)) / 2)
    out = ['<g class="legend">']
    for (text, kind), w in zip(items, widths):
        if kind == "colour":
            out.append(f'<rect class="swatch" data-cell="{escape(text)}" x="{x:.1f}" y="{y - 11:.1f}" width="14" '
                       f'height="14" fill="{colours[text]}"/>')
        elif kind == "solid":
            out.append(f'<rect x="{x:.1f}" y="{y - 11:.1f}" width="14" height="14" fill="{INK}"/>')
        elif kind == "hatched":
            out.append(f'<rect x="{x:.1f}" y="{y - 11:.1f}" width="14" height="14" fill="{INK}" '
                       f'fill-opacity="0.12" stroke="{INK}" stroke-width="1.2"/>')
            out.append(f'<path d="{_hatch(x, y - 11, 14, 14, 4)}" stroke="{INK}" stroke-width="1" fill="none"/>')
        else:
            out.append(_text(x - 2, y + 1, "OOM", 10, fill=OOM_RED, weight="bold"))
            x += 10   # the mark is wider than a swatch
        out.append(_text(x + 20, y + 1, text, 12))
        x += w
    out.append("</g>")
    return out


def figure_svg(cells: Sequence[SweepCell], title: str = "", subtitle: str = "", default_model: str = "") -> str:
    """The sweep's figure as an SVG document.

    Parameters
    ----------
    cells
        The sweep's cells (any outcome); groups follow the cells' model order, slots
        their label order.
    title, subtitle
        Printed at the top (the subtitle in grey: the settings the cells ran with).
    default_model
        The model of cells whose ``model`` is empty.
    """
    models = list(dict.fromkeys(c.model or default_model for c in cells))
    labels = list(dict.fromkeys(c.label for c in cells))
    colours = label_colours(labels)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="{FONT}">',
           f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>']
    out.append(_text(WIDTH / 2, 26, title or "Energy and latency per sample", 16, anchor="middle", weight="bold"))
    if subtitle:
        out.append(_text(WIDTH / 2, 46, subtitle, 12, anchor="middle", fill=MUTED))
    if not cells:
        out.append(_text(WIDTH / 2, HEIGHT / 2, "no cells", 14, anchor="middle", fill=MUTED))
        return "\n".join(out + ["</svg>"]) + "\n"
    out += _legend(74, labels, colours)
    top, bottom = 128.0, HEIGHT - 50.0
    half = WIDTH / 2
    for i, (metric, tag) in enumerate(zip(METRICS, "ab")):
        out += _panel(i * half + 78, (i + 1) * half - 18, top, bottom, metric, tag,
                      slots(cells, metric, default_model), models, labels, colours)
    return "\n".join(out + ["</svg>"]) + "\n"


def describe(settings: RunSettings, cells: Sequence[SweepCell]) -> str:
    """The subtitle: what every cell shared (devices, batch, sequence, steps)."""
    n = max((len(c.devices) for c in cells), default=0)
    return (f"{n} device{'s' if n != 1 else ''} per cell (single: 1) · batch {settings.batch_size} "
            f"× seq {settings.seq_len} · {settings.steps} steps · measured solid, predicted hatched")


def write_figure(cells: Sequence[SweepCell], settings: RunSettings, out_dir: Path) -> Path:
    """Write ``figure.svg`` into ``out_dir`` (made if missing); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "figure.svg"
    atomic_write_text(path, figure_svg(cells, "EdgeTrain sweep: energy and latency per sample",
                                       describe(settings, cells), default_model=settings.model))
    return path
