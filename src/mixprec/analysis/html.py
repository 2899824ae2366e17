"""A sensitivity report as one HTML page: a sorted bar chart (inline SVG) and the table, no network."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

# The report passes itself in (it imports this module): ``report`` below is a SensitivityReport.
SensitivityReport = Any

_BAR_H, _GAP, _LABEL_W, _PLOT_W, _VALUE_W = 16, 4, 300, 520, 90
_WORSE, _BETTER = "#d95f02", "#1b9e77"

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} .sub{color:#555;margin:0 0 16px}
svg text{font:12px system-ui,sans-serif;fill:#222} svg .axis{stroke:#999;stroke-width:1}
table{border-collapse:collapse;margin-top:20px;font-size:13px}
th,td{border-bottom:1px solid #e4e4e4;padding:4px 10px;text-align:right}
th{background:#f5f5f5;position:sticky;top:0} td.l,th.l{text-align:left;font-family:ui-monospace,monospace;white-space:nowrap}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:-2px}
"""


def write_html(report: SensitivityReport, path: Path, title: str | None = None) -> Path:
    """Write ``report`` as a self-contained page at ``path`` and return the path."""
    title = title or f"Sensitivity: {report.tried}"
    unit = f" {report.unit}" if report.unit else ""
    sub = (
        f"metric: {html.escape(report.metric)}; baseline {report.baseline:.3f}{unit}; "
        f"{len(report.rows)} candidates, one at a time at {html.escape(report.tried)}; most sensitive first"
    )
    legend = (
        f'<div class="legend"><span style="background:{_WORSE}"></span>worse than the baseline'
        f'<span style="background:{_BETTER}"></span>better</div>'
    )
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='sub'>{sub}</p>{legend}"
        f"{_chart(report)}{_table(report)}</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _chart(report: SensitivityReport) -> str:
    rows = report.rows
    deltas = [r.delta if math.isfinite(r.delta) else 0.0 for r in rows]
    worst = max((abs(d) for d in deltas), default=0.0) or 1.0
    lo, hi = min(0.0, *deltas), max(0.0, *deltas)
    span = (hi - lo) or worst
    x0 = _LABEL_W + (0 - lo) / span * _PLOT_W
    height = len(rows) * (_BAR_H + _GAP) + 30
    width = _LABEL_W + _PLOT_W + _VALUE_W
    unit = f" {report.unit}" if report.unit else ""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, (r, d) in enumerate(zip(rows, deltas, strict=True)):
        y = 20 + i * (_BAR_H + _GAP)
        x1 = _LABEL_W + (d - lo) / span * _PLOT_W
        bad = (d < 0) == report.higher_is_better and d != 0
        label = html.escape(r.layer if len(r.layer) <= 44 else "…" + r.layer[-43:])
        parts.append(
            f'<text x="{_LABEL_W - 6}" y="{y + _BAR_H - 4}" text-anchor="end">{label}</text>'
            f'<rect x="{min(x0, x1):.1f}" y="{y}" width="{max(abs(x1 - x0), 1):.1f}" height="{_BAR_H}" '
            f'fill="{_WORSE if bad else _BETTER}"><title>{html.escape(r.layer)}: {r.delta:+.4f}{unit}</title></rect>'
            f'<text x="{_LABEL_W + _PLOT_W + 6}" y="{y + _BAR_H - 4}">{r.delta:+.3f}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{x0:.1f}" y1="14" x2="{x0:.1f}" y2="{height - 8}"/>'
        f'<text x="{x0:.1f}" y="11" text-anchor="middle">Δ {html.escape(report.metric)}{unit}</text></svg>'
    )
    return "".join(parts)


def _table(report: SensitivityReport) -> str:
    unit = f" ({report.unit})" if report.unit else ""
    head = (
        "<tr><th>#</th><th class='l'>layer</th><th class='l'>type</th><th class='l'>tried</th>"
        f"<th>metric{unit}</th><th>Δ vs baseline</th><th>local SQNR (dB)</th><th>params</th><th>MACs</th>"
        "<th>quantizers changed</th></tr>"
    )
    body = []
    for i, r in enumerate(report.rows, 1):
        local = "–" if r.local_sqnr_db is None else f"{r.local_sqnr_db:.2f}"
        macs = "–" if r.macs is None else f"{r.macs:,}"
        body.append(
            f"<tr><td>{i}</td><td class='l'>{html.escape(r.layer)}</td><td class='l'>{html.escape(r.type)}</td>"
            f"<td class='l'>{html.escape(r.tried)}</td><td>{r.metric:.3f}</td><td>{r.delta:+.3f}</td>"
            f"<td>{local}</td><td>{r.params:,}</td><td>{macs}</td><td>{r.quantizers_changed}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"
