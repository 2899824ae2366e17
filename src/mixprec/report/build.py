"""Building a MixedPrecisionReport from a resolved plan."""

from __future__ import annotations

from typing import Any

from mixprec.core.precision import FP32, Precision, name_of
from mixprec.plan.requests import LayerRequest, RequestKind
from mixprec.plan.resolve import Claim, Conflict, Plan, PlannedState, Reason, group_end
from mixprec.report.model import MixedPrecisionReport
from mixprec.sim.effective import compute_precision, effective_input_precisions, value_precision
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionState


def _lr_row(sim: PrecisionState, lr: LayerRequest) -> dict[str, Any]:
    return {
        "layer": sim.graph.layers[lr.layer].name,
        "request": lr.request.id,
        "inputs": [name_of(p) for p in lr.inputs],
        "outputs": [name_of(lr.output)],
        "params": {k: str(v) for k, v in lr.params.items()},
    }


def _why(sim: PrecisionState, claim: Claim) -> str:
    names = sim.graph.layers
    if claim.reason is Reason.REQUESTED:
        if claim.place.kind is PlaceKind.PARAM or claim.reader is None or claim.place.layer == claim.reader:
            return "requested"
        return f"requested: input of layer {names[claim.reader].name}"
    if claim.reason is Reason.EMITTED:
        if claim.via is None:
            return "requested: output"
        return f"requested: output of layer {names[claim.reader].name} (end of its fused group)"
    if claim.reason is Reason.PROPAGATED:
        return f"propagated upstream from layer {names[claim.via].name}"
    if claim.reason is Reason.SHARED:
        peer = names[claim.via].name if claim.via is not None else "a model input request"
        return f"shared tensor with layer {peer}"
    return claim.reason.value


def empty_rows(sim: PrecisionState) -> list[dict[str, Any]]:
    """One row (``layer``, ``quantizer``) per quantizer listed in ``sim.empty_at_calibration``."""
    empty = set(getattr(sim, "empty_at_calibration", ()))
    rows = []
    for place, q in sim.quantizers():
        label = q.label or sim.describe(place)
        if label in empty:
            layer = "model input" if place.layer is None else sim.graph.layers[place.layer].name
            rows.append({"layer": layer, "quantizer": label})
    return rows


def build_report(
    sim: PrecisionState, plan: Plan, planned: PlannedState, *, applied: bool, strict: bool
) -> MixedPrecisionReport:
    graph = sim.graph
    report = MixedPrecisionReport(applied=applied, strict=strict)
    memo: dict[int, Precision | None] = {}  # compute precisions of the planned state, shared below
    for r in plan.requests:
        report.requests.append(
            {
                "id": r.id,
                "api": r.kind.value,
                "target": r.target,
                "target_kind": r.target_kind.value,
                "activation": r.describe_activation()
                if r.kind is RequestKind.LAYER
                else [
                    [
                        graph.inputs[i].path if r.kind is RequestKind.MODEL_INPUT else graph.outputs[i].path,
                        p.name,
                    ]
                    for i, p in r.io
                ],
                "param": {k: str(v) for k, v in r.params},
                "location": r.location,
                "layer_count": len(r.layers) if r.kind is RequestKind.LAYER else len(r.io),
                "layers": [graph.layers[i].name for i in r.layers],
            }
        )
        if r.kind is RequestKind.LAYER and not r.layers:
            report.unmatched.append({"id": r.id, "target": r.target, "location": r.location})
    report.empty_at_calibration = empty_rows(sim)
    report.before_preprocessing = [_lr_row(sim, lr) for lr in plan.expanded]
    for r in plan.requests:
        if r.kind is not RequestKind.LAYER:
            for i, p in r.io:
                io = graph.inputs[i] if r.kind is RequestKind.MODEL_INPUT else graph.outputs[i]
                row = {"layer": f"{'model input' if r.kind is RequestKind.MODEL_INPUT else 'model output'} {io.path}",
                       "request": r.id, "inputs": [p.name], "outputs": [p.name], "params": {}}  # fmt: skip
                report.before_preprocessing.append(row)
    report.after_preprocessing = [
        _lr_row(sim, lr) for lr in sorted(plan.winners.values(), key=lambda lr: lr.layer)
    ]
    for (kind, i), (r, p) in sorted(plan.io_winners.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        io = graph.inputs[i] if kind is RequestKind.MODEL_INPUT else graph.outputs[i]
        label = "model input" if kind is RequestKind.MODEL_INPUT else "model output"
        report.after_preprocessing.append(
            {
                "layer": f"{label} {io.path}",
                "request": r.id,
                "inputs": [p.name],
                "outputs": [p.name],
                "params": {},
            }
        )
    for index in sorted(plan.treated):
        t = plan.treated[index]
        layer = graph.layers[index]
        report.after_propagation.append(
            {
                "layer": layer.name,
                "request": t.request,
                "reason": t.reason.value,
                "inputs": [name_of(p) for p in effective_input_precisions(planned, layer, memo)],
                "outputs": _emits(planned, index, memo),
                "params": {
                    n: name_of(planned.precision_at(Place(PlaceKind.PARAM, index, n))) for n in layer.params
                },
            }
        )
    report.requested_layers = [
        _requested_row(sim, plan, planned, lr, memo)
        for lr in sorted(plan.winners.values(), key=lambda w: w.layer)
    ]
    for change in plan.changes:
        place = change.place
        layer_name, slot = _place_columns(sim, place)
        report.changes.append(
            {
                "layer": layer_name,
                "slot": slot,
                "quantizer": sim.describe(place),
                "old": name_of(change.old),
                "new": name_of(change.new),
                "granularity": None if change.claim.granularity is None else str(change.claim.granularity),
                "request": change.claim.request,
                "reason": change.claim.reason.value,
                "why": _why(sim, change.claim),
                "shared_by": _param_sharers(sim, place),
            }
        )
    winners_by_request: dict[int, set[int]] = {}
    for lr in plan.winners.values():
        winners_by_request.setdefault(lr.request.id, set()).add(lr.layer)
    for r in plan.requests:
        if r.kind is RequestKind.LAYER and r.layers and r.id not in winners_by_request:
            by = sorted({plan.winners[i].request.id for i in r.layers})
            report.shadowed.append({"id": r.id, "target": r.target, "location": r.location, "by": by})
    for c in plan.conflicts:
        report.conflicts.append(
            {
                "quantizer": sim.describe(c.place),
                "winner": c.winner.request,
                "winner_precision": c.winner.precision.name,
                "winner_layer": graph.layers[c.winner.reader].name if c.winner.reader is not None else None,
                "loser": c.loser.request,
                "loser_precision": c.loser.precision.name,
                "loser_layer": graph.layers[c.loser.reader].name if c.loser.reader is not None else None,
                "loser_direct": c.loser.direct,
            }
        )
    for k in plan.kernel_findings:
        report.kernel_findings.append(
            {
                "layer": graph.layers[k.layer].name,
                "op_type": k.op_type,
                "activation": name_of(k.activation),
                "param": name_of(k.param),
                "supported": list(k.supported),
            }
        )
    changed = {c.layer for c in plan.precision_changes}
    report.layers = _layer_map(sim, plan, planned, memo, changed)
    for c in plan.precision_changes:
        layer = graph.layers[c.layer]
        report.precision_changes.append(
            {
                "layer": layer.name,
                "type": layer.type_name,
                "inputs": [name_of(p) for p in c.inputs],
                "outputs": [name_of(p) for p in c.outputs],
            }
        )
    return report


def _layer_map(
    sim: PrecisionState,
    plan: Plan,
    planned: PlannedState,
    memo: dict[int, Precision | None],
    changed: set[int],
) -> list[dict[str, Any]]:
    """Every compute layer with its final precision and its upstream compute layers (for graph views)."""
    graph = sim.graph
    requested = {lr.layer for lr in plan.winners.values()}
    rows = []
    for layer in graph.layers:
        if layer.data_movement:
            continue
        sources, reads = [], []
        effective = effective_input_precisions(planned, layer, memo)
        for slot, tid in enumerate(layer.inputs):
            if tid is None:
                continue
            node = graph.tensors[graph.source(tid)]
            if node.producer is not None:
                sources.append(graph.layers[node.producer[0]].name)
            elif node.model_input is not None:
                sources.append(f"model input {graph.inputs[node.model_input].path}")
            else:
                continue
            # the precision the tensor carries on this edge (fp32 where nothing quantized it)
            reads.append(name_of(effective[slot] or FP32) if layer.input_is_float[slot] else None)
        treatment = plan.treated.get(layer.index)
        status = (
            "requested"
            if layer.index in requested
            else (treatment.reason.value if treatment else "unchanged")
        )
        outputs = planned.placement.outputs[layer.index]
        rows.append(
            {
                "name": layer.name,
                "type": layer.type_name,
                "op_type": layer.op_type,
                "module": layer.module_name,
                "computes": name_of(compute_precision(planned, layer, memo)),
                "outputs": [
                    name_of(planned.precision_at(Place(PlaceKind.OUTPUT, layer.index, s))) if t else None
                    for s, t in enumerate(outputs)
                ],
                "params": {
                    n: name_of(planned.precision_at(Place(PlaceKind.PARAM, layer.index, n)))
                    for n in layer.params
                },
                "sources": sources,
                "reads": reads,
                "emits": [name_of(p) for p in _value_precisions(planned, layer.index, memo)],
                "precision_change": layer.index in changed,
                "status": status,
            }
        )
    return rows


def _place_columns(sim: PrecisionState, place: Place) -> tuple[str, str]:
    if place.kind is PlaceKind.MODEL_INPUT:
        return f"model input {sim.graph.inputs[int(place.slot)].path}", "input"
    name = sim.graph.layers[place.layer].name
    if place.kind is PlaceKind.PARAM:
        return name, f"param {place.slot}"
    return name, f"{place.kind.value} {place.slot}"


def _param_sharers(sim: PrecisionState, place: Place) -> list[str]:
    if place.kind is not PlaceKind.PARAM:
        return []
    key = sim.graph.layers[place.layer].params[str(place.slot)].key
    return [sim.graph.layers[i].name for i in sim.param_layers(key)]


def _value_precisions(
    planned: PlannedState, index: int, memo: dict[int, Precision | None]
) -> list[Precision | None]:
    """What each float output of a layer carries to its readers (fp32 where nothing quantizes it)."""
    layer = planned.graph.layers[index]
    return [
        (value_precision(planned, t, memo) or FP32) if f else None
        for f, t in zip(layer.output_is_float, layer.outputs, strict=True)
    ]


def _emits(planned: PlannedState, index: int, memo: dict[int, Precision | None]) -> list[str | None]:
    """What a layer emits: the precision at its output quantizer, or at the end of its fused group."""
    layer = planned.graph.layers[index]
    result = []
    for slot, is_float in enumerate(layer.output_is_float):
        if not is_float:
            result.append(None)
            continue
        end, end_slot = group_end(planned.graph, planned.placement, index, slot)
        result.append(
            name_of(value_precision(planned, planned.graph.layers[end].outputs[end_slot], memo) or FP32)
        )
    return result


def _same(asked: Precision | None, got: str | None) -> bool:
    return (asked.name if asked is not None else None) == got or (
        asked is not None and asked.is_full and got in (None, "fp32")
    )


def _requested_row(
    sim: PrecisionState,
    plan: Plan,
    planned: PlannedState,
    lr: LayerRequest,
    memo: dict[int, Precision | None],
) -> dict[str, Any]:
    """A requested layer as realized: what it reads, computes with and emits, and why where that differs."""
    graph = sim.graph
    layer = graph.layers[lr.layer]
    reads = [name_of(p) for p in effective_input_precisions(planned, layer, memo)]
    reads = [
        (r or "fp32") if f and t is not None else None
        for r, f, t in zip(reads, layer.input_is_float, layer.inputs, strict=True)
    ]
    params = {n: name_of(planned.precision_at(Place(PlaceKind.PARAM, lr.layer, n))) for n in layer.params}
    emits = _emits(planned, lr.layer, memo)
    ends = {
        Place(PlaceKind.OUTPUT, *group_end(graph, planned.placement, lr.layer, s))
        for s in range(len(layer.outputs))
    }
    lost = [
        c
        for c in plan.conflicts
        if c.loser.request == lr.request.id and lr.layer in (c.loser.reader, c.loser.via)
    ]
    why: list[str] = []
    for slot, asked in enumerate(lr.inputs):
        if asked is None or reads[slot] is None or _same(asked, reads[slot]):
            continue
        found = [c for c in lost if c.place.kind is not PlaceKind.PARAM and c.place not in ends]
        why.append(
            f"reads input {slot} at {reads[slot]}, not {asked.name}: "
            + (_lost_to(sim, found) if found else "no quantizer upstream can hold another precision")
        )
    if lr.output is not None:
        for got in emits:
            if got is None or _same(lr.output, got):
                continue
            found = [c for c in lost if c.place in ends]
            why.append(
                f"emits {got}, not {lr.output.name}: "
                + (
                    _lost_to(sim, found)
                    if found
                    else "its output has no quantizer; it carries what the layer computes at"
                )
            )
    for name, spec in lr.params.items():
        if name not in params or _same(spec.precision, params[name]):
            continue
        found = [c for c in lost if c.place.kind is PlaceKind.PARAM]
        why.append(
            f"param {name} is {params[name] or 'fp32'}, not {spec.precision.name}: "
            + (_lost_to(sim, found) if found else "unchanged")
        )
    return {
        "layer": layer.name,
        "request": lr.request.id,
        "asked": {
            "inputs": [name_of(p) for p in lr.inputs],
            "output": name_of(lr.output),
            "params": {k: str(v) for k, v in lr.params.items()},
        },
        "reads": reads,
        "computes": name_of(compute_precision(planned, layer, memo)),
        "params": params,
        "emits": emits,
        "why": why,
    }


def _lost_to(sim: PrecisionState, conflicts: list[Conflict]) -> str:
    c = conflicts[0]
    return f"request {c.winner.request} set {sim.describe(c.place)} to {c.winner.precision.name} (the later request wins)"
