"""The report of an ``apply``/``preview``: how each request was realized (docs/rules.md, "The report").

The conflict and kernel-finding lines are built here once, for the text report and for the
errors and warnings ``apply`` raises (``conflict_lines`` / ``kernel_lines``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mixprec.report.html import write_html

REPORT_KEYS = (
    "requests",
    "before_preprocessing",
    "after_preprocessing",
    "after_propagation",
    "changes",
    "unmatched",
    "shadowed",
    "conflicts",
    "kernel_findings",
    "empty_at_calibration",
    "requested_layers",
    "precision_changes",
    "precision_change_count",
    "layers",
    "applied",
    "strict",
)

_PHASE_COLUMNS = ("Layer", "Request id", "Inputs", "Outputs", "Params")
_CHANGE_COLUMNS = ("Layer", "Slot", "Old", "New", "Request id", "Why")


@dataclass
class MixedPrecisionReport:
    """What ``apply`` did (or, from ``preview``, would do). Plain data; rows are dicts."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    before_preprocessing: list[dict[str, Any]] = field(default_factory=list)
    after_preprocessing: list[dict[str, Any]] = field(default_factory=list)
    after_propagation: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    unmatched: list[dict[str, Any]] = field(default_factory=list)
    shadowed: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    kernel_findings: list[dict[str, Any]] = field(default_factory=list)
    # quantizers that saw only empty tensors in the last compute_encodings (sim.empty_at_calibration)
    empty_at_calibration: list[dict[str, Any]] = field(default_factory=list)
    requested_layers: list[dict[str, Any]] = field(default_factory=list)
    precision_changes: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)  # every compute layer after the plan
    applied: bool = False
    strict: bool = True

    @property
    def precision_change_count(self) -> int:
        return len(self.precision_changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with these stable keys (rows are dicts; precisions are names or None):

        - ``requests``: one row per ``set_*`` call: ``id``, ``api``, ``target``, ``target_kind``,
          ``activation``, ``param``, ``location`` (file:line), ``layer_count``, ``layers``.
        - ``before_preprocessing`` / ``after_preprocessing`` / ``after_propagation``: the three phase
          tables: ``layer``, ``request``, ``inputs``, ``outputs``, ``params`` (after propagation also
          ``reason``; its ``outputs`` are what the layer emits, at the end of its fused group).
        - ``changes``: every quantizer that changed: ``layer``, ``slot``, ``quantizer``, ``old``, ``new``,
          ``granularity``, ``request``, ``reason``, ``why``, ``shared_by``.
        - ``unmatched`` (``id``, ``target``, ``location``) and ``shadowed`` (also ``by``): requests that
          matched nothing, or whose every layer a later request took.
        - ``conflicts``: ``quantizer``, ``winner``, ``winner_precision``, ``winner_layer``, ``loser``,
          ``loser_precision``, ``loser_layer``, ``loser_direct``.
        - ``kernel_findings``: ``layer``, ``op_type``, ``activation``, ``param``, ``supported``.
        - ``empty_at_calibration``: quantizers that saw only empty tensors in the sim's last
          ``compute_encodings`` (no encoding; a detector that detected nothing): ``layer``,
          ``quantizer``. Filled when the report is built, and by ``note_calibration`` after it.
        - ``requested_layers``: each requested layer as realized: ``layer``, ``request``, ``asked``
          (``inputs``, ``output``, ``params``), ``reads`` (per input), ``computes``, ``params``,
          ``emits`` (per output), ``why`` (a sentence for each way it differs from ``asked``).
        - ``precision_changes``: every layer whose inputs differ among themselves or from what it
          emits: ``layer``, ``type``, ``inputs``, ``outputs`` (fp32 where nothing quantizes);
          ``precision_change_count`` is their number.
        - ``layers``: every compute layer for graph views: ``name``, ``type``, ``op_type``, ``module``,
          ``computes``, ``outputs`` (its own output quantizers), ``params``, ``sources`` (upstream
          layers or model inputs), ``reads`` (the precision of each source's tensor, in order),
          ``emits``, ``precision_change``, ``status``.
        - ``applied``, ``strict``.
        """
        data = {key: getattr(self, key) for key in REPORT_KEYS}
        return json.loads(json.dumps(data))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        out = io.StringIO()
        verb = "applied" if self.applied else "preview (nothing changed)"
        out.write(f"Manual mixed precision report: {verb}, strict={self.strict}\n\n")
        out.write("Requests\n")
        for r in self.requests:
            out.write(
                f"  [{r['id']}] {r['api']}({r['target']}) activation={r['activation']} "
                f"param={r['param']} at {r['location']}: {r['layer_count']} layer(s)\n"
            )
        for title, rows in (
            ("Mixed precision requests before preprocessing", self.before_preprocessing),
            ("Mixed precision requests after preprocessing", self.after_preprocessing),
            ("Mixed precision requests after propagation", self.after_propagation),
        ):
            out.write(f"\n{title}\n")
            out.write(_table(_PHASE_COLUMNS, [_phase_cells(r) for r in rows]))
        out.write(f"\nQuantizers changed ({len(self.changes)})\n")
        out.write(
            _table(
                _CHANGE_COLUMNS,
                [(c["layer"], c["slot"], c["old"], c["new"], c["request"], c["why"]) for c in self.changes],
            )
        )
        _section(
            out,
            "Requests that matched nothing",
            self.unmatched,
            lambda r: f"[{r['id']}] {r['target']} at {r['location']}",
        )
        _section(out, "Requests shadowed by later requests", self.shadowed,
                 lambda r: f"[{r['id']}] {r['target']}: every layer taken by request(s) {r['by']}")  # fmt: skip
        _lines(out, "Conflicts (the later request won)", self.conflict_lines())
        _lines(out, "Backend kernel findings", self.kernel_lines())
        _section(
            out,
            "Layers that saw only empty tensors during calibration (no encoding)",
            self.empty_at_calibration,
            lambda r: f"{r['layer']}: {r['quantizer']}",
        )
        out.write(f"\nRequested layers as realized: {len(self.requested_layers)}\n")
        for r in self.requested_layers:
            params = ", ".join(f"{k}: {v or '-'}" for k, v in r["params"].items()) or "-"
            out.write(
                f"  {r['layer']} [request {r['request']}]: reads {_fmt(r['reads'])}, computes {r['computes'] or 'fp32'}"
                f" (params {params}), emits {_fmt(r['emits'])}\n"
            )
            for why in r["why"]:
                out.write(f"    why: {why}\n")
        out.write(
            f"\nPrecision changes (a convert or a mixed-precision kernel at deployment): {self.precision_change_count}\n"
        )
        for c in self.precision_changes:
            out.write(
                f"  {c['layer']} ({c['type']}): reads {_fmt(c['inputs'])}, emits {_fmt(c['outputs'])}\n"
            )
        return out.getvalue()

    def note_calibration(self, rows: list[dict[str, Any]]) -> None:
        """Record the layers a later ``compute_encodings`` left without encoding (see
        ``mixprec.report.build.empty_rows``), so the report written after calibration lists them."""
        self.empty_at_calibration = list(rows)

    def conflict_lines(self, direct_only: bool = False) -> list[str]:
        """One line per lost conflict: the quantizer, both requests (what, where) and the layers."""
        requests = {r["id"]: r for r in self.requests}
        lines = []
        for c in self.conflicts:
            if direct_only and not c["loser_direct"]:
                continue
            loser_layer = c["loser_layer"] or "the model I/O"
            winner_layer = f" for layer {c['winner_layer']}" if c["winner_layer"] else ""
            lines.append(
                f"{c['quantizer']}: {_label(requests, c['loser'])} wants {c['loser_precision']} for layer "
                f"{loser_layer}, but later {_label(requests, c['winner'])} sets {c['winner_precision']}{winner_layer}"
            )
        return lines

    def kernel_lines(self) -> list[str]:
        """One line per backend kernel finding: the layer, its precisions and the supported kernels."""
        return [
            f"{k['layer']} ({k['op_type']}): activation {k['activation'] or 'fp32'}, weight {k['param'] or '-'}; "
            f"supported: {', '.join(k['supported'])}"
            for k in self.kernel_findings
        ]

    def __str__(self) -> str:
        return self.to_text()

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page: requests, changes, and the model's precision map."""
        return write_html(self.to_dict(), path)

    def write(self, log_file: str | Path | IO[str] | None) -> None:
        """Write the text report to a path or an open text stream (None writes nothing)."""
        if log_file is None:
            return
        if hasattr(log_file, "write"):
            log_file.write(self.to_text())
            return
        path = Path(log_file)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_text())


def _label(requests: dict[int, dict[str, Any]], rid: int) -> str:
    r = requests.get(rid)
    return f"request {rid}" if r is None else f"request {rid} ({r['api']}({r['target']}) at {r['location']})"


def _lines(out: io.StringIO, title: str, lines: list[str]) -> None:
    out.write(f"\n{title}: {len(lines)}\n")
    for line in lines:
        out.write(f"  {line}\n")


def _phase_cells(row: dict[str, Any]) -> tuple:
    # a param the config leaves unquantized (BatchNorm folded into its Conv, bias) prints as "-"
    params = ", ".join(f"{k}: {'-' if v is None else v}" for k, v in row["params"].items()) or "-"
    return (row["layer"], row["request"], _fmt(row["inputs"]), _fmt(row["outputs"]), params)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join("-" if v is None else str(v) for v in value) + "]"
    return str(value)


def _section(out: io.StringIO, title: str, rows: list, fmt) -> None:
    out.write(f"\n{title}: {len(rows)}\n")
    for row in rows:
        out.write(f"  {fmt(row)}\n")


def _table(columns: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(_fmt(c) if not isinstance(c, str) else c for c in row) for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+\n"

    def fmt_row(row: tuple) -> str:
        return "|" + "|".join(f" {c:<{w}} " for c, w in zip(row, widths, strict=True)) + "|\n"

    return line + fmt_row(columns) + line + "".join(fmt_row(r) for r in cells) + line
