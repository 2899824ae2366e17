"""The precision at which each layer reads its inputs and computes (docs/rules.md, rule 2 and ``effective_inputs``).

Works on any :class:`~mixprec.sim.state.PrecisionView`: the sim as it is, or a plan's
``PlannedState`` (the sim with a plan's changes laid over it).
"""

from __future__ import annotations

from mixprec.capture.graph import Layer
from mixprec.core.precision import Precision
from mixprec.sim.placement import Place, PlaceKind, passes_through
from mixprec.sim.state import PrecisionView


def value_precision(
    sim: PrecisionView, tensor_id: int | None, memo: dict[int, Precision | None]
) -> Precision | None:
    """Precision of the quantizer that last quantized ``tensor_id``.

    Walks upstream through data-movement layers; a producer without an output quantizer
    (fused with its consumer) passes on the precision it computes at.
    """
    if tensor_id is None:
        return None
    graph = sim.graph
    source = graph.source(tensor_id)
    node = graph.tensors[source]
    if node.model_input is not None:
        return (
            sim.precision_at(Place(PlaceKind.MODEL_INPUT, None, node.model_input))
            if sim.placement.model_inputs[node.model_input]
            else None
        )
    if node.producer is None:
        return None
    layer_index, slot = node.producer
    if sim.placement.outputs[layer_index][slot] is not None:
        q = sim.precision_at(Place(PlaceKind.OUTPUT, layer_index, slot))
        if q is not None or not passes_through(sim.placement, layer_index, slot):
            return q
    return compute_precision(sim, graph.layers[layer_index], memo)


def compute_precision(
    sim: PrecisionView, layer: Layer, memo: dict[int, Precision | None]
) -> Precision | None:
    """The precision a layer computes at: the highest precision among its float inputs."""
    if layer.index in memo:
        return memo[layer.index]
    memo[layer.index] = None  # cycles cannot happen in a captured DAG; this guards recursion anyway
    found = [p for p in effective_input_precisions(sim, layer, memo) if p is not None]
    memo[layer.index] = max(found) if found else None
    return memo[layer.index]


def effective_input_precisions(
    sim: PrecisionView, layer: Layer, memo: dict[int, Precision | None] | None = None
) -> list[Precision | None]:
    memo = {} if memo is None else memo
    result = []
    for slot, tid in enumerate(layer.inputs):
        if not layer.input_is_float[slot]:
            result.append(None)
            continue
        own = (
            sim.precision_at(Place(PlaceKind.INPUT, layer.index, slot))
            if sim.placement.inputs[layer.index][slot]
            else None
        )
        result.append(own if own is not None else value_precision(sim, tid, memo))
    return result
