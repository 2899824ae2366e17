"""The report as one self-contained HTML page: requests, changed quantizers, and a precision map.

The page needs nothing from the network: CSS and JavaScript are inlined from
``assets/``, and the graph is laid out in the browser by that script (a layered DAG
by topological depth, drawn as inline SVG) from the report's ``layers`` rows. Layers are
coloured by the precision they compute at, each edge by the precision of the tensor it carries,
layers where precision changes are marked, and module groups collapse so that models with
hundreds of layers stay readable.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Protocol


class _HasDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


# A MixedPrecisionReport or its ``to_dict()``: this module reads only the dict, so it does not
# import the report's model (which imports this module for ``to_html``).
ReportData = Mapping[str, Any] | _HasDict

# One color per precision; integers run purple (narrow) -> blue (int8) -> orange (int16).
PALETTE: dict[str, str] = {
    "int2": "#6a3d9a",
    "int3": "#7b4fae",
    "int4": "#9467bd",
    "int5": "#a17fc8",
    "int6": "#8c9fd4",
    "int7": "#7aa6dc",
    "int8": "#6baed6",
    "int9": "#9ecae1",
    "int10": "#c6dbef",
    "int11": "#fdd0a2",
    "int12": "#fdae6b",
    "int13": "#fd9b50",
    "int14": "#fd8d3c",
    "int15": "#f67f2e",
    "int16": "#f28e2b",
    "int32": "#8c564b",
    "fp16": "#59a14f",
    "bf16": "#76b7b2",
    "fp8_e4m3": "#e377c2",
    "fp8_e5m2": "#d45fa6",
    "fp32": "#d9d9d9",
}
UNKNOWN_COLOR = "#bdbdbd"
MAX_VISIBLE = 120  # nodes shown before module groups start collapsed
_ASSETS = "assets"


def precision_color(precision: str | None) -> str:
    """The fill of a layer computing at ``precision`` (None, unquantized, is drawn as fp32)."""
    return PALETTE.get(precision or "fp32", UNKNOWN_COLOR)


def write_html(report: ReportData, path: str | Path, title: str | None = None) -> Path:
    """Write the report as one HTML file (no network access needed to view it) and return its path.

    Example:
        >>> report = mp.apply()
        >>> mixprec.report.html.write_html(report, "out/report.html")  # or report.to_html(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, title), encoding="utf-8")
    return path


def render_html(report: ReportData, title: str | None = None) -> str:
    """The HTML text of :func:`write_html` (``report``: a report or its ``to_dict()``)."""
    data = report if isinstance(report, Mapping) else report.to_dict()
    title = title or "Mixed precision report"
    used = sorted(
        {row["computes"] or "fp32" for row in data["layers"]}
        | {p for row in data["layers"] for p in row.get("reads", []) if p}
        | _io_precisions(data),
        key=_precision_order,
    )
    payload = {
        "report": data,
        "palette": {p: precision_color(p) for p in PALETTE},
        "max_visible": MAX_VISIBLE,
    }
    # "</" would end the <script> element early; JSON allows the escaped form.
    embedded = json.dumps(payload).replace("</", "<\\/")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_asset('report.css')}</style>",
        "</head><body>",
        f"<header><h1>{_e(title)}</h1>{_summary(data)}</header>",
        _legend(used),
        _graph_section(),
        _requests_table(data["requests"]),
        _precision_changes_table(data["precision_changes"]),
        _requested_table(data["requested_layers"]),
        _changes_table(data["changes"]),
        _other_sections(data),
        f'<script type="application/json" id="mixprec-data">{embedded}</script>',
        f"<script>{_asset('layout.js')}\n{_asset('report.js')}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _asset(name: str) -> str:
    return resources.files("mixprec.report").joinpath(_ASSETS, name).read_text(encoding="utf-8")


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _precision_order(name: str) -> tuple[int, str]:
    names = list(PALETTE)
    return (names.index(name), name) if name in names else (len(names), name)


def _io_precisions(data: dict[str, Any]) -> set[str]:
    return {c["new"] for c in data["changes"] if c["layer"].startswith("model input ") and c["new"]}


def _chip(precision: str | None) -> str:
    if precision is None:
        return '<span class="chip none">-</span>'
    return f'<span class="chip" style="background:{precision_color(precision)}">{_e(precision)}</span>'


def _summary(data: dict[str, Any]) -> str:
    changed = sum(1 for row in data["layers"] if row["status"] != "unchanged")
    verb = "applied" if data["applied"] else "preview (nothing changed)"
    items = [
        f"{verb}, strict={data['strict']}",
        f"{len(data['layers'])} layers",
        f"{len(data['requests'])} requests ({len(data['unmatched'])} matched nothing)",
        f"{len(data['changes'])} quantizers changed on {changed} layers",
        f"{data['precision_change_count']} precision changes",
        f"{len(data['conflicts'])} conflicts",
        f"{len(data['kernel_findings'])} kernel findings",
    ]
    return '<p class="summary">' + " &middot; ".join(_e(i) for i in items) + "</p>"


def _legend(used: list[str]) -> str:
    swatches = "".join(
        f'<span class="swatch" data-precision="{_e(p)}" data-color="{precision_color(p)}">'
        f'<i style="background:{precision_color(p)}"></i>{_e(p)}</span>'
        for p in used
    )
    return (
        '<section id="legend"><h2>Legend</h2>'
        f'<div class="swatches"><b>Precision</b> (a layer: what it computes at; an edge: its tensor):'
        f" {swatches}</div>"
        '<div class="marks"><b>Layer:</b>'
        '<span class="mark requested">requested</span>'
        '<span class="mark propagated">propagated upstream</span>'
        '<span class="mark shared">shared tensor</span>'
        '<span class="mark unchanged">unchanged</span>'
        '<span class="mark group">collapsed module group (click to open)</span>'
        '<span class="mark change"><b>\u0394</b>precision changes here (a convert or a mixed kernel)</span>'
        '<b>Edge:</b><span class="edge-key mixed">several precisions (edges merged by a collapsed group)</span>'
        "</div></section>"
    )


def _graph_section() -> str:
    return (
        '<section id="graph-section"><h2>Precision map</h2>'
        '<div class="toolbar"><button id="btn-expand" type="button">Expand all</button>'
        '<button id="btn-collapse" type="button">Collapse all</button>'
        '<button id="btn-auto" type="button">Auto</button>'
        '<input id="search" type="search" placeholder="Find layer (name or type)...">'
        '<span id="graph-status"></span></div>'
        '<div class="graph-layout"><nav id="tree" aria-label="Module groups"></nav>'
        '<div id="graph-scroll"><svg id="graph" xmlns="http://www.w3.org/2000/svg" role="img" '
        'aria-label="Model graph colored by precision"></svg></div>'
        '<aside id="details"><p class="hint">Click a layer for its details; click a group to open it.</p></aside></div>'
        "<noscript><p>The precision map needs JavaScript; the tables below do not.</p></noscript></section>"
    )


def _table(section_id: str, title: str, columns: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<section id="{section_id}"><h2>{_e(title)}</h2><p class="empty">{_e(empty)}</p></section>'
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<section id="{section_id}"><h2>{_e(title)} ({len(rows)})</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>'


def _activation(value: Any) -> str:
    if isinstance(value, list):
        if value and all(isinstance(v, list) and len(v) == 2 for v in value):  # model I/O: [path, precision]
            return " ".join(f"{_e(path)} {_chip(p)}" for path, p in value)
        return "[" + ", ".join(_chip(v) for v in value) + "]"
    return _chip(value)


def _requests_table(requests: list[dict[str, Any]]) -> str:
    rows = [
        [
            _e(r["id"]),
            f"<code>{_e(r['api'])}</code>",
            f"<code>{_e(r['target'])}</code><br><small>{_e(r['target_kind'])}</small>",
            _activation(r["activation"]),
            " ".join(f"{_e(k)} {_chip(v)}" for k, v in r["param"].items()) or "-",
            _e(r["layer_count"]),
            f"<small>{_e(r['location'])}</small>",
        ]
        for r in requests
    ]
    columns = ["Id", "API", "Target", "Activation", "Params", "Layers", "Where"]
    return _table("requests", "Requests", columns, rows, "No requests.")


def _changes_table(changes: list[dict[str, Any]]) -> str:
    rows = [
        [
            f"<code>{_e(c['layer'])}</code>",
            _e(c["slot"]),
            _chip(c["old"]),
            _chip(c["new"]),
            _e(c["request"]),
            _e(c["why"]),
        ]
        for c in changes
    ]
    columns = ["Layer", "Slot", "Old", "New", "Request", "Why"]
    return _table("changes", "Quantizers changed", columns, rows, "No quantizer changed.")


def _chips(values: list[str | None]) -> str:
    return " ".join(_chip(v) for v in values) or "-"


def _precision_changes_table(changes: list[dict[str, Any]]) -> str:
    rows = [
        [f"<code>{_e(c['layer'])}</code>", _e(c["type"]), _chips(c["inputs"]), _chips(c["outputs"])]
        for c in changes
    ]
    columns = ["Layer", "Type", "Reads", "Emits"]
    return _table("precision-changes", "Precision changes", columns, rows, "No layer changes precision.")


def _requested_table(rows_in: list[dict[str, Any]]) -> str:
    rows = [
        [
            f"<code>{_e(r['layer'])}</code>",
            _e(r["request"]),
            _chips(r["reads"]),
            _chip(r["computes"]),
            " ".join(f"{_e(k)} {_chip(v)}" for k, v in r["params"].items()) or "-",
            _chips(r["emits"]),
            "<br>".join(_e(w) for w in r["why"]) or "as requested",
        ]
        for r in rows_in
    ]
    columns = ["Layer", "Request", "Reads", "Computes", "Params", "Emits", "Why"]
    return _table("requested", "Requested layers as realized", columns, rows, "No layer was requested.")


def _other_sections(data: dict[str, Any]) -> str:
    sections = [
        ("unmatched", "Requests that matched nothing", ["Id", "Target", "Where"],
         [[_e(r["id"]), f"<code>{_e(r['target'])}</code>", _e(r["location"])] for r in data["unmatched"]]),
        ("shadowed", "Requests shadowed by later ones", ["Id", "Target", "Taken by"],
         [[_e(r["id"]), f"<code>{_e(r['target'])}</code>", _e(r["by"])] for r in data["shadowed"]]),
        ("conflicts", "Conflicts (the later request won)", ["Quantizer", "Winner", "Loser", "Loser layer"],
         [[_e(c["quantizer"]), f"{_e(c['winner'])} {_chip(c['winner_precision'])}",
           f"{_e(c['loser'])} {_chip(c['loser_precision'])}", _e(c["loser_layer"])] for c in data["conflicts"]]),
        ("kernels", "Backend kernel findings", ["Layer", "Op type", "Activation", "Weight", "Supported"],
         [[_e(k["layer"]), _e(k["op_type"]), _chip(k["activation"]), _chip(k["param"]), _e(", ".join(k["supported"]))]
          for k in data["kernel_findings"]]),
        ("empty-at-calibration", "Layers that saw only empty tensors during calibration (no encoding)",
         ["Layer", "Quantizer"],
         [[f"<code>{_e(r['layer'])}</code>", _e(r["quantizer"])] for r in data.get("empty_at_calibration", [])]),
    ]  # fmt: skip
    return "\n".join(_table(sid, title, cols, rows, "None.") for sid, title, cols, rows in sections)
