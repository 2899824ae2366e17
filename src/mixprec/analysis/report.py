"""The result of a sensitivity sweep: ranked rows, JSON, HTML, and a profile to start from."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mixprec.analysis.candidates import Candidate
from mixprec.analysis.html import write_html
from mixprec.analysis.metrics import Metric, sqnr_db
from mixprec.analysis.suggest import suggest

if TYPE_CHECKING:
    from mixprec.analysis.session import Session
    from mixprec.mixed.profile import Profile


@dataclass(frozen=True)
class SensitivityRow:
    """One candidate: the model's metric with only this layer at the tried precision."""

    layer: str
    type: str
    tried: str
    metric: float
    delta: float  # metric - baseline metric
    local_sqnr_db: float | None  # the layer's own output against the float model's, in dB
    params: int
    macs: int | None  # multiply-accumulates per batch item (first dimension), where known
    quantizers_changed: int


@dataclass
class SensitivityReport:
    """Rows most sensitive first (the tried precision hurts the metric most there).

    Example:
        >>> rep = mixprec.analyze_sensitivity(sim, batches, targets=nn.Conv2d, param={"weight": "int4"})
        >>> rep.rows[0].layer, rep.rows[0].delta
        >>> rep.to_html("sensitivity.html")
        >>> profile = rep.suggest(min_sqnr_db=25.0)
    """

    rows: list[SensitivityRow]
    baseline: float
    metric: str
    unit: str
    higher_is_better: bool
    tried: str
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    _candidates: list[Candidate] = field(default_factory=list, repr=False)
    _session: Session | None = field(default=None, repr=False)
    _settings: dict[str, Any] = field(default_factory=dict, repr=False)
    _metric: Metric | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the metric, the baseline, one dict per row, and how long each pass took."""
        return {
            "tried": self.tried,
            "metric": {"name": self.metric, "unit": self.unit, "higher_is_better": self.higher_is_better},
            "baseline": self.baseline,
            "rows": [asdict(r) for r in self.rows],
            "timings_s": dict(self.timings),
            "counts": dict(self.counts),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (infinite values as the strings "inf"/"-inf"); written to ``path`` when given."""
        text = json.dumps(_finite(self.to_dict()), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def to_html(self, path: str | Path, title: str | None = None) -> Path:
        """One self-contained HTML page (no network): a sorted bar chart of deltas and the table."""
        return write_html(self, Path(path), title)

    def suggest(
        self,
        *,
        min_sqnr_db: float | None = None,
        target: float | None = None,
        max_kept: int | None = None,
        num_changed: int | None = None,
    ) -> Profile:
        """The fewest layers at the higher precision that meet a target, as a :class:`Profile`.

        Exactly one of: ``min_sqnr_db`` (default metric), ``target`` (any metric: at least this
        good), ``max_kept`` (a budget of layers left at the higher precision) or ``num_changed``
        (how many layers get the lower precision). See :func:`mixprec.analysis.suggest.suggest`.
        """
        return suggest(
            self, min_sqnr_db=min_sqnr_db, target=target, max_kept=max_kept, num_changed=num_changed
        )

    def table(self, limit: int | None = None) -> str:
        """The rows as fixed-width text (most sensitive first)."""
        unit = f" [{self.unit}]" if self.unit else ""
        head = f"{'#':>3}  {'layer':<40} {'type':<12} {'metric' + unit:>14} {'delta':>9} {'local SQNR':>10}"
        lines = [f"baseline {self.metric}: {_fmt(self.baseline)}{unit}; tried: {self.tried}", head]
        for i, r in enumerate(self.rows[:limit], 1):
            local = "-" if r.local_sqnr_db is None else _fmt(r.local_sqnr_db)
            lines.append(
                f"{i:>3}  {r.layer:<40.40} {r.type:<12.12} {_fmt(r.metric):>14} {r.delta:>+9.3f} {local:>10}"
            )
        return "\n".join(lines)


def build_report(
    candidates: list[Candidate],
    stats: torch.Tensor,
    local: torch.Tensor,
    metric: Metric,
    tried: str,
    timings: dict[str, float],
    counts: dict[str, Any],
    macs: dict[str, int] | None = None,
) -> SensitivityReport:
    """Rows from the summed statistics (``stats[-1]`` is the baseline), ranked most sensitive first."""
    baseline = metric.value(stats[-1])
    rows = []
    for i, c in enumerate(candidates):
        value = metric.value(stats[i])
        local_db = sqnr_db(local[i]) if float(local[i][0]) > 0 else None
        rows.append(
            SensitivityRow(
                c.name, c.type_name, tried, value, _delta(value, baseline), local_db, c.params,
                (macs or {}).get(c.name), len(c.changes),
            )
        )  # fmt: skip
    order = sorted(range(len(rows)), key=lambda i: (-metric.badness(rows[i].delta), rows[i].layer))
    return SensitivityReport(
        [rows[i] for i in order],
        baseline,
        metric.name,
        metric.unit,
        metric.higher_is_better,
        tried,
        dict(timings),
        dict(counts),
        _candidates=[candidates[i] for i in order],
        _metric=metric,
    )


def _delta(value: float, baseline: float) -> float:
    if math.isinf(value) and math.isinf(baseline) and (value > 0) == (baseline > 0):
        return 0.0
    return value - baseline


def _fmt(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else str(x)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
