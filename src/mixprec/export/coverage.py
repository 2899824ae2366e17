"""Export's self-check: every quantizer of the sim is in the written files, at its precision.

A quantizer is covered when its tensor exists in the float model, the encodings file has an
entry for it with the sim's bitwidth and dtype (one per channel where it is per-channel), and
the QDQ model has the nodes of its form on that tensor, quantizing to the type its precision
needs (per channel along the sim's axis). Anything less is an :class:`ExportError` naming the
layer and the quantizer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from mixprec.core.granularity import PerChannel
from mixprec.errors import ExportError
from mixprec.export.encodings import SECTIONS
from mixprec.export.missing import missing_error
from mixprec.export.onnx_graph import MarkerSite, iter_nodes, marker_index, tensor_names
from mixprec.export.qdq import Form, QdqSpec, form_of
from mixprec.export.trace import TracedModel
from mixprec.quant.quantizers import QuantizerBase
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionState

_FORM_OPS = {
    "qdq": {"QuantizeLinear", "DequantizeLinear"},
    "qdq+clip": {"Max", "Min", "QuantizeLinear", "DequantizeLinear"},
    "cast": {"Cast"},
    "emulated": {"Mul", "Round", "Max", "Min"},
}
Entries = list[tuple[Place, QuantizerBase]]


def keys_by_quantizer(
    sim: PrecisionState, entries: Entries, sites: list[MarkerSite], traced: TracedModel | None = None
) -> list[list[str]]:
    """The float-model tensor names of each quantizer (usually one).

    Raises:
        ExportCoverageError: a quantizer left no marker in the exported graph; the message says
            why for each (see :mod:`mixprec.export.missing`).
    """
    keys: list[list[str]] = [[] for _ in entries]
    for site in sites:
        if site.key not in keys[site.index]:
            keys[site.index].append(site.key)
    lost = [i for i, k in enumerate(keys) if not k]
    if lost:
        raise missing_error(sim, entries, lost, traced)
    return keys


def gap_error(sim: PrecisionState, entries: Entries, gaps: list[tuple[int, str]]) -> ExportError:
    """The error listing ``gaps`` (quantizer index, what is wrong), one line per quantizer."""
    lines = [f"  {_layer(sim, entries[i][0])}: quantizer {_label(sim, i, entries)} {why}" for i, why in gaps]
    return ExportError(
        f"export would drop {len(gaps)} of {len(entries)} quantizers:\n"
        + "\n".join(lines)
        + "\nNothing was written. This is a bug of mixprec's export; please report it with the model."
    )


def check_coverage(
    sim: PrecisionState,
    entries: Entries,
    keys: list[list[str]],
    specs: list[QdqSpec],
    opset: int,
    onnx_path: Path,
    encodings_path: Path,
    qdq_path: Path,
) -> tuple[Counter, Counter]:
    """Read the written files back and check every quantizer is in both, at its precision."""
    float_graph = onnx.load(str(onnx_path), load_external_data=False).graph
    qdq = onnx.load(str(qdq_path), load_external_data=False).graph
    document = json.loads(encodings_path.read_text())
    names = tensor_names(float_graph)
    if any(marker_index(n) is not None for n in iter_nodes(float_graph)):
        raise ExportError("internal error: a marker node is left in the float model; nothing was written")
    zero_points = {t.name: t.data_type for t in qdq.initializer}
    chains: dict[str, list[onnx.NodeProto]] = {}
    for node in qdq.node:
        chains.setdefault(node.name.rsplit("/", 1)[0], []).append(node)
    spec_of = {s.key: s for s in specs}
    gaps: list[tuple[int, str]] = []
    by_precision: Counter = Counter()
    by_form: Counter = Counter()
    for i, (place, q) in enumerate(entries):
        problem = None
        for key in keys[i]:
            form = form_of(spec_of[key], opset)
            problem = problem or _check_one(
                q, place, key, form, names, document, chains.get(key, []), zero_points
            )
        if problem:
            gaps.append((i, problem))
        else:
            by_precision[q.precision.name] += 1
            by_form[form.kind] += 1
    if gaps:
        raise gap_error(sim, entries, gaps)
    return by_precision, by_form


def _check_one(
    q: QuantizerBase,
    place: Place,
    key: str,
    form: Form,
    names: set[str],
    document: dict[str, Any],
    chain: list[onnx.NodeProto],
    zero_points: dict[str, int],
) -> str | None:
    if key not in names:
        return f"is keyed by {key!r}, which is not a tensor of the float model"
    entries = document.get(SECTIONS[place.kind is PlaceKind.PARAM], {}).get(key)
    if not entries:
        return f"has no entry {key!r} in the encodings file"
    dtype = "float" if q.precision.is_float else "int"
    if any(e.get("bitwidth") != q.precision.bits or e.get("dtype") != dtype for e in entries):
        return f"is {q.precision} in the sim but not in the encodings entry {key!r}"
    count = q.scale.numel() if q.needs_encoding else 1
    if len(entries) != count:
        return (
            f"has {count} encodings ({q.granularity}) but the encodings file lists {len(entries)} for {key!r}"
        )
    ops = {n.op_type for n in chain}
    if not _FORM_OPS[form.kind] <= ops:
        return f"has no {form.kind} nodes on {key!r} in the QDQ model"
    if form.elem_type is not None:
        q_nodes = [n for n in chain if n.op_type in ("QuantizeLinear", "Cast")]
        types = {
            zero_points.get(n.input[2]) if n.op_type == "QuantizeLinear" else n.attribute[0].i
            for n in q_nodes
        }
        if form.elem_type not in types:
            return f"is {q.precision} in the sim but its QDQ nodes on {key!r} use another type"
    if isinstance(q.granularity, PerChannel) and form.kind.startswith("qdq"):
        axes = {a.i for n in chain if n.op_type == "QuantizeLinear" for a in n.attribute if a.name == "axis"}
        if axes != {q.granularity.axis}:
            return f"is {q.granularity} in the sim but its QuantizeLinear on {key!r} is not (axes {sorted(axes)})"
    return None


def _layer(sim: PrecisionState, place: Place) -> str:
    return "model input" if place.layer is None else f"layer {sim.graph.layers[place.layer].name!r}"


def _label(sim: PrecisionState, i: int, entries: Entries) -> str:
    place, q = entries[i]
    return f"{q.label or sim.describe(place)!r} ({q.precision})"
