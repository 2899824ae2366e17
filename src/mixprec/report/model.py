"""The report of an ``apply``/``preview``: how each request was realized.

``MixedPrecisionReport.to_dict()`` has these stable keys (documented in docs/rules.md, "The report"):
``requests``, ``before_preprocessing``, ``after_preprocessing``, ``after_propagation``,
``changes``, ``unmatched``, ``shadowed``, ``conflicts``, ``kernel_findings``,
``transitions``, ``transition_count``, ``applied``, ``strict``.
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
    "transitions",
    "transition_count",
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
    transitions: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)  # every compute layer after the plan
    applied: bool = False
    strict: bool = True

    @property
    def transition_count(self) -> int:
        return len(self.transitions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with the keys in ``REPORT_KEYS``."""
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
        _section(out, "Conflicts (the later request won)", self.conflicts,
                 lambda c: f"{c['quantizer']}: request {c['winner']} set {c['winner_precision']}, request "
                 f"{c['loser']} wanted {c['loser_precision']} for layer {c['loser_layer']}")  # fmt: skip
        _section(out, "Backend kernel findings", self.kernel_findings,
                 lambda k: f"{k['layer']} ({k['op_type']}): activation {k['activation']}, weight {k['param']} "
                 f"not in supported {k['supported']}")  # fmt: skip
        out.write(
            f"\nPrecision transitions (converts a deployment toolchain inserts): {self.transition_count}\n"
        )
        for t in self.transitions:
            out.write(
                f"  {t['producer']} -> {t['consumer']} input {t['slot']}: {t['tensor']} read at {t['computes']}\n"
            )
        return out.getvalue()

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


def _phase_cells(row: dict[str, Any]) -> tuple:
    params = ", ".join(f"{k}: {v}" for k, v in row["params"].items()) or "-"
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
