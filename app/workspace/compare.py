"""Past runs side by side: each run's record read into comparable values and curves.

The history's *Compare* shows two or more runs over the same axes.  A run's devices
report per rank; here each run becomes **one** curve per chart, so runs on different
devices, device counts and parallelisms compare directly:

* latency per sample over time: per step, the slowest rank's (the run goes at its pace,
  as the summary's latency is its slowest device's median).  Time counts from the run's
  first step, not from its launch: connecting and loading differ from run to run and
  would shift the curves apart;
* energy per sample over time: per step, the ranks' values added up (each rank reports
  its energy over the global samples, so they add up to the run's);
* peak memory per device, over the ranks (x: rank);
* training loss over completed steps (per step, the reporting ranks' losses weighted by
  their samples: DP ranks each report their slice's mean, a pipeline only its last
  stage) with the held-out loss of the evaluations.

The table's values come from the record's summary (``record.json`` written by
:mod:`app.run.runstate`), the curves from ``telemetry.jsonl``; a run without telemetry
still has its column.  Everything is plain data, so it is tested without Qt.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from app.paths import atomic_write_text
from app.workspace.history import iter_telemetry, load_record

#: The charts of a comparison: title, unit of y, label of x.
CHARTS: dict[str, tuple[str, str, str]] = {
    "latency": ("Latency per sample (slowest device)", "ms/sample", "time since the first step (s)"),
    "energy": ("Energy per sample (all devices)", "J/sample", "time since the first step (s)"),
    "memory": ("Peak memory per device", "MiB", "rank"),
    "loss": ("Loss (dashed: held-out)", "cross-entropy", "completed steps"),
}


class CompareError(ValueError):
    """A run that cannot be compared; the message names its record file and the fix."""


@dataclass
class Curve:
    """Points of one run in one chart, sorted by x."""

    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.xs)


@dataclass
class ComparedRun:
    """One run's comparable values (from its record) and curves (from its telemetry)."""

    run_id: str
    path: Path
    model: str | None
    parallelism: str | None
    devices: list[str]                      # rank order
    steps: int | None                       # completed
    steps_planned: int | None               # what the settings asked for
    outcome: str | None
    latency_per_sample_s: float | None      # the slowest device's median
    energy_per_sample_j: float | None
    energy_methods: list[str]
    throughput_sps: float | None
    peak_mem_bytes: int | None              # the largest device's
    peak_mem_device: str | None
    final_train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None             # 0..1
    eval_step: int | None
    predicted_latency_per_sample_s: float | None   # the plan's slowest device
    curves: dict[str, Curve] = field(default_factory=dict)   # by chart (CHARTS), + "eval_loss"

    @property
    def label(self) -> str:
        """What the legend says: run id, model, parallelism."""
        return f"{self.run_id}  {self.model or '?'} {self.parallelism or ''}".rstrip()

    @property
    def latency_error(self) -> float | None:
        """Measured latency per sample against the plan's, as a fraction (+0.1: 10 % slower)."""
        p, m = self.predicted_latency_per_sample_s, self.latency_per_sample_s
        return (m - p) / p if p and m is not None else None


def _finite(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _step_curves(run_dir: Path) -> dict[str, Curve]:
    """The per-run latency, energy and training-loss curves from ``telemetry.jsonl``."""
    by_step: dict[int, dict] = {}
    for rec in iter_telemetry(run_dir):
        if rec.get("type") != "step" or not isinstance(rec.get("step"), int):
            continue
        agg = by_step.setdefault(rec["step"], {"t": None, "lat": None, "energy": None, "loss": 0.0, "w": 0.0})
        t = _finite(rec.get("t"))
        if t is not None:
            agg["t"] = t if agg["t"] is None else max(agg["t"], t)
        lat = _finite(rec.get("latency_per_sample_s"))
        if lat is not None:
            agg["lat"] = lat if agg["lat"] is None else max(agg["lat"], lat)
        energy, samples = _finite(rec.get("energy_j")), rec.get("samples") or 0
        if energy is not None and samples:
            agg["energy"] = (agg["energy"] or 0.0) + energy / samples
        loss = _finite(rec.get("loss"))
        if loss is not None:   # a diverged (NaN) loss cannot be drawn; the summary shows the run's state
            w = float(rec.get("local_samples") or 1)
            agg["loss"] += loss * w
            agg["w"] += w
    lat, energy, train = Curve(), Curve(), Curve()
    t0 = min((a["t"] for a in by_step.values() if a["t"] is not None), default=None)
    for step in sorted(by_step):
        agg = by_step[step]
        if agg["t"] is not None and t0 is not None:
            x = agg["t"] - t0
            if agg["lat"] is not None:
                lat.xs.append(x)
                lat.ys.append(agg["lat"] * 1e3)
            if agg["energy"] is not None:
                energy.xs.append(x)
                energy.ys.append(agg["energy"])
        if agg["w"]:
            train.xs.append(float(step + 1))   # a step record's step is 0-based
            train.ys.append(agg["loss"] / agg["w"])
    return {"latency": lat, "energy": energy, "loss": train}


def load_compared(run_dir: Path | str) -> ComparedRun:
    """One run of a comparison, from ``run_dir/record.json`` and ``telemetry.jsonl``.

    Raises
    ------
    CompareError
        The record is missing or not valid JSON (naming the file).
    """
    run_dir = Path(run_dir)
    try:
        rec = load_record(run_dir)
    except OSError as exc:
        raise CompareError(f"{run_dir / 'record.json'}: cannot read the run record ({exc.strerror}). "
                           "Fix: pick a run that has finished writing its record") from None
    except ValueError as exc:
        raise CompareError(f"{run_dir / 'record.json'}: not a valid run record ({exc})") from None
    if not isinstance(rec, dict):
        raise CompareError(f"{run_dir / 'record.json'}: not a valid run record (expected a JSON object)")
    config = rec.get("config") or {}
    settings = config.get("settings") or {}
    summary = rec.get("summary") or {}
    devs = sorted(summary.get("devices") or [], key=lambda d: d.get("rank", 0))
    names = [str(d.get("device")) for d in devs] or [str(n) for n in (config.get("job") or {}).get("devices", [])]
    peak = max(devs, key=lambda d: d.get("peak_mem_bytes") or 0, default=None)
    preds = [p.get("latency_per_sample_s") for p in (rec.get("plan") or {}).get("predictions") or []]
    preds = [p for p in preds if _finite(p) is not None]
    curves = _step_curves(run_dir)
    measured = [(float(d.get("rank", i)), d["peak_mem_bytes"] / 2**20)   # a device that never reported: no point
                for i, d in enumerate(devs) if d.get("peak_mem_bytes")]
    curves["memory"] = Curve([x for x, _ in measured], [y for _, y in measured])
    evals = [(e.get("step"), _finite(e.get("loss"))) for e in summary.get("evals") or []]
    curves["eval_loss"] = Curve([float(s) for s, v in evals if v is not None],
                                [v for _s, v in evals if v is not None])
    train = curves["loss"]
    return ComparedRun(
        run_id=str(rec.get("run_id") or run_dir.name), path=run_dir,
        model=settings.get("model"), parallelism=settings.get("parallelism"), devices=names,
        steps=summary.get("steps"), steps_planned=settings.get("steps"), outcome=rec.get("outcome"),
        latency_per_sample_s=_finite(summary.get("latency_per_sample_s")),
        energy_per_sample_j=_finite(summary.get("energy_per_sample_j")),
        energy_methods=list(summary.get("energy_methods") or []),
        throughput_sps=_finite(summary.get("throughput_sps")),
        peak_mem_bytes=(peak.get("peak_mem_bytes") or None) if peak else None,
        peak_mem_device=peak.get("device") if peak and peak.get("peak_mem_bytes") else None,
        final_train_loss=train.ys[-1] if train.ys else None,
        eval_loss=_finite(summary.get("eval_loss")), eval_accuracy=_finite(summary.get("eval_accuracy")),
        eval_step=summary.get("eval_step"),
        predicted_latency_per_sample_s=max(preds) if preds else None, curves=curves)


def load_comparison(run_dirs: Sequence[Path | str]) -> list[ComparedRun]:
    """The runs to compare, in the order given (raises :class:`CompareError` for the first bad one)."""
    return [load_compared(d) for d in run_dirs]


# ------------------------------------------------------------------ the table


def _num(v: float | None, spec: str = ".3g", unit: str = "") -> str:
    return "–" if v is None else format(v, spec) + (f" {unit}" if unit else "")


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _mib(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _steps(r: ComparedRun) -> str:
    done = "–" if r.steps is None else str(r.steps)
    return done if r.steps_planned is None else f"{done}/{r.steps_planned}"


def _energy(r: ComparedRun) -> str:
    text = _num(r.energy_per_sample_j, unit="J")
    return f"{text} ({', '.join(r.energy_methods)})" if r.energy_methods and r.energy_per_sample_j else text


def _peak(r: ComparedRun) -> str:
    return f"{_mib(r.peak_mem_bytes)} ({r.peak_mem_device})" if r.peak_mem_device else _mib(r.peak_mem_bytes)


def _evaluation(r: ComparedRun) -> str:
    if r.eval_loss is None and r.eval_accuracy is None:
        return "–"
    acc = "–" if r.eval_accuracy is None else f"{r.eval_accuracy * 100:.1f}%"
    return f"{_num(r.eval_loss, '.4f')} / {acc} (step {r.eval_step})"


def _predicted(r: ComparedRun) -> str:
    if r.predicted_latency_per_sample_s is None:
        return "no plan"
    err = r.latency_error
    return (f"{_ms(r.predicted_latency_per_sample_s)} vs {_ms(r.latency_per_sample_s)}"
            + ("" if err is None else f" ({err:+.0%})"))


#: The table's rows: label, and the cell of a run.
TABLE_ROWS: tuple[tuple[str, Callable[[ComparedRun], str]], ...] = (
    ("model", lambda r: r.model or "–"),
    ("parallelism", lambda r: r.parallelism or "–"),
    ("devices", lambda r: f"{len(r.devices)}: {', '.join(r.devices)}"),
    ("steps", _steps),
    ("outcome", lambda r: r.outcome or "incomplete"),
    ("latency/sample (median, slowest device)", lambda r: _ms(r.latency_per_sample_s)),
    ("energy/sample", _energy),
    ("throughput", lambda r: _num(r.throughput_sps, ".4g", "samples/s")),
    ("peak memory (largest device)", _peak),
    ("final train loss", lambda r: _num(r.final_train_loss, ".4f")),
    ("held-out loss / accuracy", _evaluation),
    ("latency/sample predicted vs measured", _predicted),
)


def table(runs: Sequence[ComparedRun]) -> list[tuple[str, list[str]]]:
    """The summary table: one row per :data:`TABLE_ROWS` entry, one cell per run."""
    return [(label, [cell(r) for r in runs]) for label, cell in TABLE_ROWS]


def write_table_csv(runs: Sequence[ComparedRun], path: Path | str) -> Path:
    """The table as CSV (a header row of run ids); returns the path."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["", *(r.run_id for r in runs)])
    for label, cells in table(runs):
        w.writerow([label, *cells])
    return atomic_write_text(path, buf.getvalue())
