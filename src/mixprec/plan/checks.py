"""Checks of a planned state: backend kernels (docs/rules.md, rule 5) and precision transitions.

Both read a :class:`~mixprec.sim.state.PrecisionView` (the plan laid over the sim), so they run
before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixprec.capture.graph import Graph
from mixprec.config.rules import SimConfig
from mixprec.core.precision import FP32, Precision
from mixprec.sim.effective import compute_precision, effective_input_precisions
from mixprec.sim.placement import Place, PlaceKind
from mixprec.sim.state import PrecisionView


@dataclass(frozen=True)
class KernelFinding:
    """A layer whose final (activation, weight) precision pair is not among its kernels."""

    layer: int
    op_type: str
    activation: Precision | None
    param: Precision | None
    supported: tuple[str, ...]


@dataclass(frozen=True)
class Transition:
    """An edge where a tensor's precision differs from the precision its reader computes at."""

    producer: str  # layer name or model input path
    consumer: int
    slot: int
    tensor_precision: Precision
    compute_precision: Precision


def _weight_precision(state: PrecisionView, layer_index: int) -> tuple[bool, Precision | None]:
    layer = state.graph.layers[layer_index]
    for name, ref in layer.params.items():
        if ref.attr == "weight" or (ref.ndim >= 2 and name.endswith("weight")):
            return True, state.precision_at(Place(PlaceKind.PARAM, layer_index, name))
    return False, None


def check_kernels(state: PrecisionView, config: SimConfig) -> list[KernelFinding]:
    """Rule 5: each layer's final (activation, weight) precision must be in its kernel list."""
    findings = []
    memo: dict[int, Precision | None] = {}
    for layer in state.graph.layers:
        if layer.data_movement:
            continue
        kernels = config.kernels_for(layer.op_type)
        if not kernels:
            continue
        activation = compute_precision(state, layer, memo)
        has_weight, weight = _weight_precision(state, layer.index)
        if activation is None and weight is None:
            continue
        act = activation or FP32
        ok = any(
            (activation is None or k.activation == act)
            and (not has_weight or k.param is None or k.param == (weight or FP32))
            for k in kernels
        )
        if not ok:
            supported = tuple(f"{k.activation.name}/{k.param.name if k.param else '*'}" for k in kernels)
            findings.append(KernelFinding(layer.index, layer.op_type, activation, weight, supported))
    return findings


def find_transitions(state: PrecisionView) -> list[Transition]:
    """Edges where a tensor's precision differs from the precision its reader computes at."""
    graph = state.graph
    memo: dict[int, Precision | None] = {}
    result = []
    for layer in graph.layers:
        if layer.data_movement or not any(layer.input_is_float):
            continue
        computes = compute_precision(state, layer, memo)
        for slot, precision in enumerate(effective_input_precisions(state, layer, memo)):
            if precision is None or computes is None or precision == computes:
                continue
            result.append(
                Transition(_producer_name(graph, layer.inputs[slot]), layer.index, slot, precision, computes)
            )
    return result


def _producer_name(graph: Graph, tensor_id: int | None) -> str:
    if tensor_id is None:
        return "constant"
    node = graph.tensors[graph.source(tensor_id)]
    if node.model_input is not None:
        return f"model input {graph.inputs[node.model_input].path}"
    return graph.layers[node.producer[0]].name if node.producer else "constant"
