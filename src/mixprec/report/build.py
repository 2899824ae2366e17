"""Building a MixedPrecisionReport from a resolved plan."""

from __future__ import annotations

from typing import Any

from mixprec.core.precision import Precision, name_of
from mixprec.plan.requests import LayerRequest, RequestKind
from mixprec.plan.resolve import Claim, Plan, PlannedState, Reason
from mixprec.report.model import MixedPrecisionReport
from mixprec.sim.effective import compute_precision, effective_input_precisions
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
    if claim.reason is Reason.PROPAGATED:
        return f"propagated upstream from layer {names[claim.via].name}"
    if claim.reason is Reason.SHARED:
        peer = names[claim.via].name if claim.via is not None else "a model input request"
        return f"shared tensor with layer {peer}"
    return claim.reason.value


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
                "outputs": [
                    name_of(planned.precision_at(Place(PlaceKind.OUTPUT, index, s))) if tpl else None
                    for s, tpl in enumerate(planned.placement.outputs[index])
                ],
                "params": {
                    n: name_of(planned.precision_at(Place(PlaceKind.PARAM, index, n))) for n in layer.params
                },
            }
        )
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
    report.layers = _layer_map(sim, plan, planned, memo)
    for t in plan.transitions:
        report.transitions.append(
            {
                "producer": t.producer,
                "consumer": graph.layers[t.consumer].name,
                "slot": t.slot,
                "tensor": t.tensor_precision.name,
                "computes": t.compute_precision.name,
            }
        )
    return report


def _layer_map(
    sim: PrecisionState, plan: Plan, planned: PlannedState, memo: dict[int, Precision | None]
) -> list[dict[str, Any]]:
    """Every compute layer with its final precision and its upstream compute layers (for graph views)."""
    graph = sim.graph
    requested = {lr.layer for lr in plan.winners.values()}
    rows = []
    for layer in graph.layers:
        if layer.data_movement:
            continue
        sources = []
        for tid in layer.inputs:
            if tid is None:
                continue
            node = graph.tensors[graph.source(tid)]
            if node.producer is not None:
                sources.append(graph.layers[node.producer[0]].name)
            elif node.model_input is not None:
                sources.append(f"model input {graph.inputs[node.model_input].path}")
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
